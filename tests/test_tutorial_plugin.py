"""
The third-party plugin path of C{docs/tutorial-selector-plugin.md}, followed
the way a new user follows it: icpmesh and the tutorial's distribution
(C{docs/examples/icpmesh-lowest-rtt}) are I{installed} into a fresh
virtualenv, and everything runs from there, in a scratch directory, without
C{PYTHONPATH}, so nothing comes from the checkout.  The example store and
access-control plugins of C{docs/plugin-examples.md}
(C{docs/examples/icpmesh-examples-misc}) are installed and used the same way.

The in-process tests at the end load the example plugins' modules straight
from C{docs/examples} and exercise them, so they are checked even where no
virtualenv can be made.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from http.client import HTTPConnection
from types import ModuleType
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from icpmesh import icp
from icpmesh.config import ConfigError, parseConfig
from icpmesh.interfaces import AccessRequest, IAccessControl, IObjectStore
from icpmesh.testing.store import StoreConformanceMixin
from tests.nodelab import Origin, freePort, waitFor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "docs", "examples")
TUTORIAL = os.path.join(EXAMPLES, "icpmesh-lowest-rtt")
MISC = os.path.join(EXAMPLES, "icpmesh-examples-misc")

#: What is not copied from the checkout before building it: VCS data,
#: earlier build output (a stale C{build/lib} would end up in the wheel),
#: caches and the big non-Python trees.
IGNORED = shutil.ignore_patterns(
    ".git", ".tox", "build", "dist", "*.egg-info", "__pycache__", "*.py[co]",
    "dropin.cache", ".mypy_cache", ".hypothesis", ".pytest_cache", "_trial_temp",
    "node_modules", "conformance", "benchmarks", "venv", ".venv",
)

#: The URL the node is asked for.  C{.invalid} never resolves, so only a
#: parent can serve it: a request that went direct would fail.
URL = "http://origin.invalid/tutorial"


def _run(command: list[str], cwd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """
    Run C{command} in C{cwd} with an environment that cannot reach the
    checkout: no C{PYTHONPATH}, no inherited virtualenv.
    """
    return subprocess.run(command, cwd=cwd, env=_cleanEnv(), capture_output=True, text=True,
                          timeout=timeout)


def _cleanEnv() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP",
                        "PYTHONSAFEPATH", "ICPMESH_INSTALLED")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _check(result: subprocess.CompletedProcess[str], what: str) -> str:
    if result.returncode != 0:
        raise AssertionError(
            f"{what} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result.stdout


class FakeICPParent:
    """
    The ICP side of a fake parent: a UDP socket on loopback that answers
    every query with MISS after C{delay} seconds, in a thread.

    @ivar queries: URLs asked about.
    """

    def __init__(self, address: str, delay: float) -> None:
        self.delay = delay
        self.queries: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self._stopped = threading.Event()
        self._timers: list[threading.Timer] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stopped.is_set():
            try:
                data, source = self.sock.recvfrom(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                message = icp.decode(data)
            except icp.DecodeError:
                continue
            if message.opcode != icp.Opcode.QUERY:
                continue
            self.queries.append(message.url)
            answer = icp.encode(icp.reply(message, icp.Opcode.MISS))
            timer = threading.Timer(self.delay, self._send, (answer, source))
            timer.daemon = True
            self._timers.append(timer)
            timer.start()

    def _send(self, data: bytes, destination: Any) -> None:
        if not self._stopped.is_set():
            self.sock.sendto(data, destination)

    def stop(self) -> None:
        self._stopped.set()
        for timer in self._timers:
            timer.cancel()
        self.thread.join(2)
        self.sock.close()


class InstalledTutorialPluginTests(SynchronousTestCase):
    """
    The tutorial's steps in a fresh virtualenv (built once for the class).
    """

    tmp: str
    venv: str
    bin: str
    work: str
    sources: dict[str, str]

    @classmethod
    def setUpClass(cls) -> None:
        cls.tmp = tempfile.mkdtemp(prefix="icpmesh-tutorial-")
        try:
            cls._build()
        except BaseException:
            shutil.rmtree(cls.tmp, ignore_errors=True)
            raise

    @classmethod
    def _build(cls) -> None:
        cls.venv = os.path.join(cls.tmp, "venv")
        cls.bin = os.path.join(cls.venv, "bin")
        cls.work = os.path.join(cls.tmp, "work")
        os.mkdir(cls.work)
        made = subprocess.run([sys.executable, "-m", "venv", cls.venv], cwd=cls.work,
                              env=_cleanEnv(), capture_output=True, text=True, timeout=120)
        if made.returncode != 0 or not os.path.exists(os.path.join(cls.bin, "pip")):
            reason = "python -m venv is unavailable: " + (made.stderr or made.stdout).strip()[-500:]
            if os.environ.get("CI"):
                raise AssertionError(reason)
            raise SkipTest(reason)
        # Build from copies: pip builds in the source tree, and the copies
        # keep build output (and stale files in it) out of the checkout.
        cls.sources = {}
        for name, path in (("icpmesh", ROOT), ("lowest-rtt", TUTORIAL), ("misc", MISC)):
            copy = os.path.join(cls.tmp, "src", name)
            shutil.copytree(path, copy, ignore=IGNORED)
            cls.sources[name] = copy
        pip = [os.path.join(cls.bin, "pip"), "install", "--no-compile", "--disable-pip-version-check"]
        # The tutorial's order: icpmesh (with pytest, to test the plugin),
        # then the plugin distributions next to it, then a fresh plugin cache.
        _check(_run(pip + [cls.sources["icpmesh"], "pytest"], cls.work, 300), "pip install icpmesh")
        _check(_run(pip + [cls.sources["lowest-rtt"] + "[test]", cls.sources["misc"]], cls.work, 300),
               "pip install the plugins")
        cache = _run([cls.python(), "-c",
                      "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"],
                     cls.work)
        _check(cache, "regenerating the plugin cache")
        if cache.stderr:
            raise AssertionError("plugin scan wrote to stderr:\n" + cache.stderr)

    @classmethod
    def tearDownClass(cls) -> None:
        shutil.rmtree(cls.tmp, ignore_errors=True)

    @classmethod
    def python(cls) -> str:
        return os.path.join(cls.bin, "python")

    def script(self, name: str) -> str:
        return os.path.join(self.bin, name)

    def writeConfig(self, text: str, name: str = "icpmesh.conf") -> str:
        path = os.path.join(self.work, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_installedNotCheckout(self) -> None:
        """
        In the virtualenv, icpmesh, the tutorial's selector and the example
        plugins are imported from its site-packages, not from the checkout,
        and the drop-ins were installed without a C{twisted/plugins/__init__.py}.
        """
        out = _check(_run([self.python(), "-c",
                           "import icpmesh, icpmesh_lowestrtt, icpmesh_examples, twisted.plugins; "
                           "print(icpmesh.__file__); print(icpmesh_lowestrtt.__file__); "
                           "print(icpmesh_examples.__file__)"], self.work), "import")
        paths = out.split()
        self.assertEqual(len(paths), 3, out)
        for path in paths:
            self.assertTrue(path.startswith(self.venv + os.sep), path)
            self.assertFalse(path.startswith(ROOT + os.sep), path)
        site = os.path.dirname(os.path.dirname(paths[1]))
        plugins = os.path.join(site, "twisted", "plugins")
        self.assertTrue(os.path.exists(os.path.join(plugins, "icpmesh_lowestrtt_plugin.py")))
        self.assertTrue(os.path.exists(os.path.join(plugins, "icpmesh_examples_plugin.py")))
        self.assertFalse(os.path.exists(os.path.join(site, "tests")))

    def test_helpPlugins(self) -> None:
        """
        Step 1: C{twistd icpmesh --help-plugins} lists the tutorial's
        C{lowest-rtt} selector (with its description) next to the built-in
        ones, and the example C{fifo} store and C{subnets} access control.
        """
        result = _run([self.script("twistd"), "icpmesh", "--help-plugins"], self.work)
        out = _check(result, "twistd icpmesh --help-plugins")
        self.assertRegex(out, r"(?m)^selector\s+lowest-rtt\s+the parent with the lowest measured ICP")
        self.assertRegex(out, r"(?m)^selector\s+icp\s")
        self.assertRegex(out, r"(?m)^store\s+fifo\s")
        self.assertRegex(out, r"(?m)^access\s+subnets\s")
        self.assertEqual(result.stderr, "")

    def test_twistdHelpQuiet(self) -> None:
        """
        Step 2: C{twistd --help} lists C{icpmesh} and writes nothing to
        stderr: every drop-in imports cleanly (a broken one only shows
        there).
        """
        result = _run([self.script("twistd"), "--help"], self.work)
        out = _check(result, "twistd --help")
        self.assertRegex(out, r"(?m)^\s+icpmesh\s")
        self.assertEqual(result.stderr, "")

    def test_checkConfig(self) -> None:
        """
        Step 3: C{icpmesh-check} accepts a config that chooses
        C{selector lowest-rtt}, and refuses an unknown option of it with
        the file and line.
        """
        good = self.writeConfig(
            "selector lowest-rtt max-age=30s\n"
            "cache_peer 127.0.0.2 parent 3128 3130 name=a\n", "good.conf")
        result = _run([self.script("icpmesh-check"), good], self.work)
        self.assertEqual((result.returncode, result.stdout.strip(), result.stderr),
                         (0, f"{good}: OK", ""))
        bad = self.writeConfig("# comment\nselector lowest-rtt max-rtt=1\n", "bad.conf")
        result = _run([self.script("icpmesh-check"), bad], self.work)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.strip(),
                         f"icpmesh-check: {bad}:2: selector lowest-rtt: unknown option "
                         "'max-rtt'; known options: max-age")

    def test_nodeUsesLowestRTT(self) -> None:
        """
        Step 4: a real node, C{twistd -n --pidfile= icpmesh --config FILE}
        with C{selector lowest-rtt} and two parents on loopback (the slow one
        first in the config), asks both over ICP and fetches through the one
        that answered faster; its access log says C{CLOSEST_PARENT} and that
        parent's address.  The node also runs the example C{fifo} store and
        C{subnets} access control: the same URL again is a hit from the
        store, and no parent sees a second request.
        """
        slowICP = FakeICPParent("127.0.0.2", delay=0.4)
        fastICP = FakeICPParent("127.0.0.3", delay=0.0)
        slowHTTP = Origin("127.0.0.2")
        fastHTTP = Origin("127.0.0.3")
        for thing in (slowICP, fastICP, slowHTTP, fastHTTP):
            self.addCleanup(thing.stop)
        httpPort = freePort()
        icpPort = freePort(socket.SOCK_DGRAM)
        accessLog = os.path.join(self.work, "access.log")
        config = self.writeConfig(
            f"http_port 127.0.0.1:{httpPort}\n"
            f"icp_port 127.0.0.1:{icpPort}\n"
            "visible_hostname tutorial-node\n"
            "selector lowest-rtt\n"
            "store fifo max-size=16MB\n"
            "access subnets\n"
            "allow_subnet 127.0.0.0/8\n"
            f"access_log {accessLog}\n"
            f"cache_peer 127.0.0.2 parent {slowHTTP.port} {slowICP.port} name=slow\n"
            f"cache_peer 127.0.0.3 parent {fastHTTP.port} {fastICP.port} name=fast\n",
            "node.conf")
        logFile = os.path.join(self.work, "twistd.log")
        node = subprocess.Popen(
            [self.script("twistd"), "-n", "--pidfile=", "--logfile", logFile,
             "icpmesh", "--config", config],
            cwd=self.work, env=_cleanEnv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(_stop, node)
        self.assertTrue(waitFor(lambda: _listening(httpPort) or node.poll() is not None, 30),
                        "node did not start")
        self.assertIsNone(node.poll(), _read(logFile))

        first = _get(httpPort, URL)
        self.assertEqual(first[0], 200, _read(logFile))
        self.assertEqual(first[1], b"body of " + URL.encode())
        self.assertEqual((slowICP.queries, fastICP.queries), ([URL], [URL]))
        self.assertEqual((slowHTTP.counts.get(URL, 0), fastHTTP.counts.get(URL, 0)), (0, 1))
        second = _get(httpPort, URL)
        self.assertEqual(second[:2], first[:2])
        self.assertEqual((slowHTTP.counts.get(URL, 0), fastHTTP.counts.get(URL, 0)), (0, 1))

        def logged() -> list[list[str]]:
            return [line.split() for line in _read(accessLog).splitlines()
                    if line.split()[5:7] == ["GET", URL]]

        self.assertTrue(waitFor(lambda: len(logged()) == 2, 10), _read(accessLog))
        lines = logged()
        self.assertEqual(lines[0][3], "TCP_MISS/200")
        self.assertEqual(lines[0][8], "CLOSEST_PARENT/127.0.0.3")
        self.assertEqual(lines[1][3], "TCP_HIT/200")
        self.assertEqual(lines[1][8], "HIER_NONE/-")

    def test_pluginOwnTests(self) -> None:
        """
        Step 5: the tutorial plugin's own tests, and the example plugins'
        tests, pass when run with the virtualenv's pytest against the
        installed distributions, with none skipped.
        """
        for name, expected in (("lowest-rtt", "test_lowestrtt.py"), ("misc", "test_examples.py")):
            source = self.sources[name]
            result = _run([self.script("pytest"), "-p", "no:cacheprovider", "-rs",
                           os.path.join(source, "tests")], source)
            out = _check(result, f"pytest in {name}")
            self.assertIn(expected, out)
            self.assertRegex(out, r"\d+ passed")
            self.assertNotRegex(out, r"skipped|failed|error")


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _get(port: int, url: str) -> tuple[int, bytes, str]:
    """
    GET C{url} through the proxy at C{127.0.0.1:port}; return the status,
    the body and the C{X-Cache} header.
    """
    conn = HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("GET", url)
        response = conn.getresponse()
        return response.status, response.read(), response.getheader("X-Cache", "")
    finally:
        conn.close()


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ---------------------------------------------------------------------------
# The example plugins, loaded from their files


def _load(relative: str) -> ModuleType:
    """
    Import one example module from C{docs/examples} by its path, under a
    name of its own.
    """
    path = os.path.join(EXAMPLES, relative)
    name = "_example_" + re.sub(r"\W", "_", relative)
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


class FIFOStoreConformanceTests(StoreConformanceMixin, TestCase):
    """
    The example C{fifo} store of C{docs/plugin-examples.md} passes the
    store conformance suite.
    """

    def makeStore(self) -> Any:
        module = _load("icpmesh-examples-misc/icpmesh_examples/fifostore.py")
        section = parseConfig(
            f"store fifo max-size={self.storeMaxSize} max-object-size={self.storeMaxObjectSize}\n",
            "t.conf").plugins["store"]
        store = module.fifoStore.storeFromConfig(section, None)
        assert IObjectStore.providedBy(store)
        return store


class ExamplePluginsTests(SynchronousTestCase):
    """
    The example plugins as the docs describe them, and the tutorial's
    selector module, loaded from their files.
    """

    def test_subnetsAccess(self) -> None:
        """
        C{access subnets} with C{allow_subnet} lines allows clients in those
        networks and refuses the rest; a bad network names its line.
        """
        from icpmesh.plugins import resolvePlugins

        module = _load("icpmesh-examples-misc/icpmesh_examples/subnets.py")
        config = parseConfig("access subnets\nallow_subnet 192.0.2.0/24\n", "t.conf")
        section = config.plugins["access"]
        section.directives = list(config.extra)
        access = module.subnetAccess.accessControlFromConfig(section, None)
        self.assertTrue(IAccessControl.providedBy(access))
        inside = AccessRequest.fromURL("192.0.2.9", "GET", "http://example.com/")
        outside = AccessRequest.fromURL("198.51.100.1", "GET", "http://example.com/")
        self.assertEqual((access.allowHTTP(inside), access.allowHTTP(outside)), (True, False))
        self.assertEqual((access.allowICP("192.0.2.9", "u"), access.allowICP("127.0.0.1", "u")),
                         (True, False))
        bad = parseConfig("access subnets\nallow_subnet 192.0.2.0/33\n", "t.conf")
        section = bad.plugins["access"]
        section.directives = list(bad.extra)
        with self.assertRaises(ConfigError) as caught:
            module.subnetAccess.accessControlFromConfig(section, None)
        self.assertEqual(str(caught.exception), "t.conf:2: not a network: '192.0.2.0/33'")
        # An unclaimed directive is refused by the node when another access
        # plugin is chosen: allow_subnet belongs to subnets only.
        with self.assertRaises(ConfigError):
            resolvePlugins(parseConfig("allow_subnet 10.0.0.0/8\n", "t.conf"), build=False)

    def test_lowestRTTModule(self) -> None:
        """
        The tutorial's selector module, loaded from its file, builds from
        C{selector lowest-rtt} and routes by the neighbours' measured RTTs
        without asking when they are fresh.
        """
        from twisted.internet.task import Clock

        from icpmesh.neighbours import Neighbour

        module = _load("icpmesh-lowest-rtt/icpmesh_lowestrtt/__init__.py")
        clock = Clock()
        clock.advance(100)
        config = parseConfig("selector lowest-rtt max-age=10s\n"
                             "cache_peer 127.0.0.2 parent 3128 3130 name=a\n"
                             "cache_peer 127.0.0.3 parent 3128 3130 name=b\n", "t.conf")
        selector = module.lowestRTT.selectorFromConfig(config.plugins["selector"], clock)
        peers = [Neighbour(c, reactor=clock) for c in config.neighbours]
        for peer, rtt in zip(peers, (0.050, 0.020)):
            peer.noteQuerySent()
            peer.noteReply("MISS", rtt)

        class NoICP:
            def query(self, *args: Any, **kwargs: Any) -> Any:
                raise AssertionError("asked although the RTTs are fresh")

        request = AccessRequest.fromURL("127.0.0.1", "GET", "http://example.com/")
        routes = selector.selectRoutes(request, peers, NoICP())
        self.assertEqual([(r.neighbour.name if r.neighbour else None, r.code) for r in routes],
                         [("b", "CLOSEST_PARENT"), ("a", "ANY_OLD_PARENT"), (None, "HIER_DIRECT")])


# ---------------------------------------------------------------------------
# The docs show the example code as it is


_FENCE = re.compile(r"^```[a-z]*\n(.*?)^```", re.M | re.S)
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _excerpts(doc: str) -> list[tuple[str, str]]:
    """
    The fenced blocks of C{docs/DOC} that start with C{# file: PATH}, as
    C{(PATH, the rest of the block)}.
    """
    with open(os.path.join(ROOT, "docs", doc)) as f:
        text = f.read()
    found = []
    for match in _FENCE.finditer(text):
        first, _, rest = match.group(1).partition("\n")
        if first.startswith("# file: "):
            found.append((first[len("# file: "):].split()[0], rest))
    return found


def _slug(heading: str) -> str:
    """
    The anchor GitHub gives a heading.
    """
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


class DocsMatchExamplesTests(SynchronousTestCase):
    """
    The code the tutorial and C{plugin-examples.md} show is the code of the
    example distributions that the tests above install and run.
    """

    def assertExcerptsMatch(self, doc: str, base: str, minimum: int) -> list[tuple[str, str]]:
        excerpts = _excerpts(doc)
        self.assertGreaterEqual(len(excerpts), minimum, doc)
        for path, body in excerpts:
            with open(os.path.join(base, path)) as f:
                self.assertIn(body, f.read(), f"{doc}: excerpt of {path} differs from the file")
        return excerpts

    def test_tutorialExcerpts(self) -> None:
        """
        Every C{# file:} block of the tutorial appears verbatim in the
        tutorial distribution, and together its blocks show every line of
        the selector module, the drop-in and the packaging files, so a reader
        starting from an empty directory has all of them.
        """
        excerpts = self.assertExcerptsMatch("tutorial-selector-plugin.md", TUTORIAL, 8)
        for path in ("icpmesh_lowestrtt/__init__.py", "twisted/plugins/icpmesh_lowestrtt_plugin.py",
                     "pyproject.toml", "setup.cfg"):
            with open(os.path.join(TUTORIAL, path)) as f:
                rest = f.read()
            for shown, body in excerpts:
                if shown == path:
                    rest = rest.replace(body, "", 1)
            self.assertEqual(rest.strip(), "", f"the tutorial leaves out part of {path}")

    def test_pluginExamplesExcerpts(self) -> None:
        """
        Every C{# file:} block of C{plugin-examples.md} appears verbatim in
        the example distribution.
        """
        self.assertExcerptsMatch("plugin-examples.md", MISC, 4)

    def test_links(self) -> None:
        """
        The relative links of the tutorial, C{plugin-examples.md} and
        C{plugins.md} lead to files that exist and to headings that exist.
        """
        docs = os.path.join(ROOT, "docs")
        for doc in ("tutorial-selector-plugin.md", "plugin-examples.md", "plugins.md"):
            with open(os.path.join(docs, doc)) as f:
                text = f.read()
            links = [link for link in _LINK.findall(text) if "://" not in link]
            self.assertTrue(links, doc)
            for link in links:
                path, _, anchor = link.partition("#")
                target = os.path.normpath(os.path.join(docs, path)) if path else os.path.join(docs, doc)
                self.assertTrue(os.path.exists(target), f"{doc}: broken link {link}")
                if anchor:
                    with open(target) as f:
                        headings = [_slug(line.lstrip("#")) for line in f if line.startswith("#")]
                    self.assertIn(anchor, headings, f"{doc}: no heading for {link}")
