# -*- test-case-name: tests.test_conformance_smoke -*-
"""
Run the public HTTP cache test suite (C{http-cache-tests}, npm) through
icpmesh used as a forward proxy, and optionally through Squid 5.7 beside it.

Usage::

    python conformance/run.py [--squid] [--json OUT] [--id TEST-ID ...]
                              [--config FILE] [--keep] [--verbose]

Each proxy gets its own origin server (the suite's request handlers, bound
to 127.0.0.1 by C{conformance/origin.mjs}) and its own run of the suite's
client (C{conformance/client.mjs}, which routes the suite's C{node-fetch}
calls through the proxy with absolute-form requests).  Everything listens on
loopback only, every wait is bounded, and every process started here is
stopped by its PID.

The summary counts results the way the suite does (C{lib/display.mjs}):

 - B{passed}: the suite recorded C{true} (a pass, or "yes" for a C{check}
   test); B{failed}: anything else, over all 350 tests;
 - B{required failures}: tests of kind C{required} whose own result is not
   C{true}, whatever the reason (an assertion, a setup failure, a request
   that failed); the suite shows them as C{fail}, C{setup_fail} or, when a
   test they depend on did not pass either, C{dependency_fail};
 - the suite's own display classes (pass, fail, optional_fail, yes, no,
   setup_fail, dependency_fail, retry, harness_fail), where C{fail} is its
   red "conformance problem" mark.

See docs/http-cache-tests.md for the results and what the failures mean.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterator, Optional, Sequence

import attr

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SUITE_VERSION = "0.4.5"
ORIGIN_SCRIPT = os.path.join(HERE, "origin.mjs")
CLIENT_SCRIPT = os.path.join(HERE, "client.mjs")
SUITE_DIR = os.path.join(HERE, "node_modules", "http-cache-tests")
LOOPBACK = "127.0.0.1"

PASS_CLASSES = frozenset({"pass", "yes"})
"""
The suite's display classes that count as passing for C{depends_on}.
"""

CLASSES = (
    "pass", "fail", "optional_fail", "yes", "no", "setup_fail", "retry",
    "harness_fail", "dependency_fail", "untested",
)


class HarnessError(RuntimeError):
    """
    The harness itself could not run: Node or the suite is missing, or a
    process did not start or finish in time.
    """


# -- the suite's own bookkeeping ----------------------------------------------


def classify(tests: Sequence[dict[str, Any]]) -> dict[str, str]:
    """
    Give each test the display class the suite's C{determineTestResult}
    gives it, honouring C{depends_on}.

    @param tests: test records as written by C{client.mjs}: C{id}, C{kind}
        (C{required}, C{optimal} or C{check}), C{depends_on} (ids) and
        C{result} (C{True}, C{[errorName, message]}, or C{None} if the test
        did not run).
    @return: test id to one of L{CLASSES}.
    """
    byId = {test["id"]: test for test in tests}
    classes: dict[str, str] = {}

    def classOf(testId: str, seen: frozenset[str]) -> str:
        if testId in classes:
            return classes[testId]
        test = byId[testId]
        result = test["result"]
        if result is None:
            found = "untested"
        elif any(
            dep in byId and dep not in seen and classOf(dep, seen | {dep}) not in PASS_CLASSES
            for dep in test.get("depends_on") or ()
        ):
            found = "dependency_fail"
        elif isinstance(result, list) and result and result[0] == "Setup":
            found = "retry" if result[1:2] == ["retry"] else "setup_fail"
        elif result is False or (isinstance(result, list) and result[:1] == ["AbortError"]):
            # Newer versions of the suite show a timed-out fetch as a
            # harness failure too.
            found = "harness_fail"
        else:
            # As in the suite, any other error (an assertion, or a fetch
            # that threw) is a failure of the test's own kind.
            found = _kindClass(test["kind"], result is True)
        classes[testId] = found
        return found

    for test in tests:
        classOf(test["id"], frozenset({test["id"]}))
    return classes


def _kindClass(kind: str, passed: bool) -> str:
    if kind == "required":
        return "pass" if passed else "fail"
    if kind == "optimal":
        return "pass" if passed else "optional_fail"
    if kind == "check":
        return "yes" if passed else "no"
    raise ValueError(f"unknown test kind {kind!r}")


@attr.s(auto_attribs=True, frozen=True)
class Summary:
    """
    One proxy's results on the suite.

    @ivar name: the proxy's name (C{icpmesh}, C{squid}).
    @ivar total: tests run.
    @ivar passed: tests whose result is C{True}.
    @ivar failed: the others.
    @ivar requiredFailures: C{(id, class, message)} for every C{required}
        test whose result is not C{True}, with its display class (see
        L{classify}).
    @ivar classes: count per display class.
    @ivar results: test id to C{(kind, class, message)}; C{message} is
        C{""} for a pass.
    """

    name: str
    total: int
    passed: int
    failed: int
    requiredFailures: tuple[tuple[str, str, str], ...]
    classes: dict[str, int]
    results: dict[str, tuple[str, str, str]]


def _message(result: Any) -> str:
    if result is True:
        return ""
    if result is None:
        return "not run"
    if isinstance(result, list):
        return ": ".join(str(part) for part in result)
    return str(result)


def summarise(name: str, tests: Sequence[dict[str, Any]]) -> Summary:
    """
    Count one run's results.

    @param name: the proxy's name.
    @param tests: the C{tests} list written by C{client.mjs}.
    @return: the L{Summary}.
    """
    classes = classify(tests)
    passed = sum(1 for test in tests if test["result"] is True)
    counts = {c: 0 for c in CLASSES}
    for c in classes.values():
        counts[c] += 1
    results = {
        test["id"]: (test["kind"], classes[test["id"]], _message(test["result"])) for test in tests
    }
    required = tuple(
        (test["id"], classes[test["id"]], _message(test["result"]))
        for test in tests
        if test["kind"] == "required" and test["result"] is not True
    )
    return Summary(
        name=name, total=len(tests), passed=passed, failed=len(tests) - passed,
        requiredFailures=required, classes={c: n for c, n in counts.items() if n}, results=results,
    )


def formatSummary(summary: Summary, verbose: bool = False) -> str:
    """
    The printed summary of one proxy's run.

    @param verbose: list every test that did not pass, not only the
        required ones.
    """
    lines = [
        f"{summary.name}: {summary.passed} passed, {summary.failed} failed of {summary.total}; "
        f"{len(summary.requiredFailures)} required failures "
        f"({summary.classes.get('fail', 0)} shown as conformance failures by the suite)",
        "  classes: " + ", ".join(f"{c} {n}" for c, n in summary.classes.items()),
    ]
    for testId, cls, message in summary.requiredFailures:
        lines.append(f"  required {cls:<15} {testId}: {message}")
    if verbose:
        for testId, (kind, cls, message) in sorted(summary.results.items()):
            if kind != "required" and cls not in PASS_CLASSES:
                lines.append(f"  {kind:<8} {cls:<15} {testId}: {message}")
    return "\n".join(lines)


def formatComparison(ours: Summary, theirs: Summary) -> str:
    """
    The tests on which two proxies differ, pass against non-pass.
    """
    lines = [f"{ours.name} passes, {theirs.name} does not:"]
    onlyOurs = sorted(
        t for t, (_, c, _m) in ours.results.items()
        if c in PASS_CLASSES and theirs.results.get(t, ("", "", ""))[1] not in PASS_CLASSES
    )
    onlyTheirs = sorted(
        t for t, (_, c, _m) in theirs.results.items()
        if c in PASS_CLASSES and ours.results.get(t, ("", "", ""))[1] not in PASS_CLASSES
    )
    lines += [f"  {t}" for t in onlyOurs] or ["  (none)"]
    lines.append(f"{theirs.name} passes, {ours.name} does not:")
    lines += [f"  {t}: {ours.results[t][2]}" for t in onlyTheirs] or ["  (none)"]
    return "\n".join(lines)


# -- processes -----------------------------------------------------------------


def requireNode() -> tuple[str, str]:
    """
    Find C{node} and C{npm}.

    @return: their paths.
    @raise HarnessError: if either is missing.
    """
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        raise HarnessError("node and npm are needed (Debian: apt-get install nodejs npm)")
    return node, npm


def ensureSuite(install: bool = True, timeout: float = 300.0) -> None:
    """
    Make sure the pinned suite is installed in C{conformance/node_modules},
    running C{npm ci} (or C{npm install} without a lock file) if it is not.

    @param install: install it when missing; if C{False}, only check.
    @param timeout: seconds allowed for npm.
    @raise HarnessError: if it is missing and cannot be installed.
    """
    _, npm = requireNode()
    manifest = os.path.join(SUITE_DIR, "package.json")
    if os.path.exists(manifest):
        with open(manifest) as f:
            version = json.load(f).get("version")
        if version == SUITE_VERSION:
            return
    if not install:
        raise HarnessError(f"http-cache-tests {SUITE_VERSION} is not installed; run npm ci in {HERE}")
    command = "ci" if os.path.exists(os.path.join(HERE, "package-lock.json")) else "install"
    print(f"installing http-cache-tests {SUITE_VERSION}: npm {command} in {HERE}", file=sys.stderr)
    try:
        done = subprocess.run(
            [npm, command, "--no-audit", "--no-fund"], cwd=HERE, timeout=timeout,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
    except subprocess.TimeoutExpired as e:
        raise HarnessError(f"npm {command} did not finish in {timeout} s in {HERE}") from e
    if done.returncode != 0 or not os.path.exists(manifest):
        raise HarnessError(
            f"npm {command} failed in {HERE}:\n" + done.stdout.decode("utf-8", "replace")[-4000:]
        )


def _stopProcess(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


@contextlib.contextmanager
def originServer(logPath: str, timeout: float = 15.0, suite: str = SUITE_DIR) -> Iterator[str]:
    """
    Run the suite's origin server on a free loopback port.

    @param logPath: file for its output (the suite logs warnings there).
    @param suite: the suite's directory (default: the pinned npm release).
    @param timeout: seconds to wait for it to listen.
    @return: a context manager giving its base URL, C{http://127.0.0.1:PORT}.
    """
    node, _ = requireNode()
    with open(logPath, "w+b") as log:
        process = subprocess.Popen(
            [node, ORIGIN_SCRIPT, LOOPBACK, "0", suite], cwd=HERE, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + timeout
            base = None
            while base is None:
                log.seek(0)
                for line in log.read().decode("utf-8", "replace").splitlines():
                    if line.startswith("LISTENING "):
                        base = line.split(None, 1)[1].strip()
                if base is None:
                    if process.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        raise HarnessError("origin server did not start: " + log.read().decode("utf-8", "replace"))
                    time.sleep(0.05)
            yield base
        finally:
            _stopProcess(process)


def runSuite(
    base: str,
    proxy: Optional[str],
    ids: Sequence[str] = (),
    timeout: float = 600.0,
    requestTimeout: float = 30.0,
    dump: bool = False,
    suite: str = SUITE_DIR,
) -> dict[str, Any]:
    """
    Run the suite's client once.

    @param base: the origin's base URL.
    @param proxy: the forward proxy's URL, or C{None} to go direct.
    @param ids: run only these tests (default: all 350).
    @param timeout: seconds allowed for the whole run.
    @param requestTimeout: seconds allowed for each request.
    @param dump: have the suite print each request and response (with
        C{ids}) on stderr.
    @param suite: the suite's directory: the pinned npm release by
        default, or a checkout of a newer version (C{test-engine/} layout,
        after C{npm install} there).
    @return: the report C{client.mjs} writes (C{tests} holds the results).
    @raise HarnessError: if the client fails or overruns.
    """
    node, _ = requireNode()
    with tempfile.TemporaryDirectory(prefix="http-cache-tests-") as scratch:
        out = os.path.join(scratch, "results.json")
        command = [node, CLIENT_SCRIPT, "--base", base, "--out", out,
                   "--timeout", str(int(requestTimeout * 1000)), "--suite", suite]
        if proxy:
            command += ["--proxy", proxy]
        for testId in ids:
            command += ["--id", testId]
        if dump:
            command.append("--dump")
        process = subprocess.Popen(
            command, cwd=HERE, stdin=subprocess.DEVNULL,
            stdout=sys.stderr if dump else subprocess.PIPE, stderr=subprocess.PIPE,
        )
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stopProcess(process)
            raise HarnessError(f"the suite did not finish in {timeout} s")
        if process.returncode != 0 or not os.path.exists(out):
            raise HarnessError(
                f"the suite's client failed ({process.returncode}): "
                + (stderr or b"").decode("utf-8", "replace")[-4000:]
            )
        with open(out) as f:
            report: dict[str, Any] = json.load(f)
        return report


@contextlib.contextmanager
def icpmeshProxy(workdir: str, config: Optional[str] = None) -> Iterator[str]:
    """
    Run an icpmesh node (C{twistd -n icpmesh}) on loopback.

    @param workdir: directory for its log, access log and config.
    @param config: the text of an icpmesh config file, or C{None} for the
        built-in defaults (which allow loopback clients).
    @return: a context manager giving its proxy URL.
    """
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from tests.nodelab import Node

    workdir = os.path.abspath(workdir)
    node = Node(workdir, address=LOOPBACK, config=config,
                extraArgs=("--access-log", os.path.join(workdir, "access.log")))
    try:
        yield f"http://{LOOPBACK}:{node.httpPort}"
    finally:
        node.stop()
        if node.process.returncode not in (0, None, -signal.SIGTERM):
            print(f"icpmesh exited with {node.process.returncode}; see {workdir}/twistd.log", file=sys.stderr)


@contextlib.contextmanager
def squidProxy(workdir: str) -> Iterator[str]:
    """
    Run Squid 5.7 (C{tests/squidlab.py}: memory cache, loopback only).

    @param workdir: not used by Squid, which needs a directory its own
        user can reach; kept for symmetry.
    @return: a context manager giving its proxy URL.
    """
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import unittest

    from tests.squidlab import SquidInstance, requireSquid

    try:
        requireSquid()
    except unittest.SkipTest as e:
        raise HarnessError(str(e)) from e
    squid = SquidInstance(address=LOOPBACK)
    squid.start()
    try:
        yield squid.proxyURL
    finally:
        squid.stop()


def measure(
    name: str,
    proxy: Any,
    workdir: str,
    ids: Sequence[str] = (),
    timeout: float = 600.0,
    dump: bool = False,
    suite: str = SUITE_DIR,
) -> tuple[Summary, dict[str, Any]]:
    """
    Start an origin and a proxy, run the suite through it, stop both.

    @param name: the proxy's name for the summary.
    @param proxy: a callable taking a work directory and returning a
        context manager that gives the proxy URL (L{icpmeshProxy},
        L{squidProxy}), or C{None} to go straight to the origin.
    @param suite: the suite's directory (see L{runSuite}).
    @return: the L{Summary} and the raw report.
    """
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    with originServer(os.path.join(workdir, "origin.log"), suite=suite) as base:
        context = proxy(workdir) if proxy is not None else contextlib.nullcontext(None)
        with context as proxyURL:
            report = runSuite(base, proxyURL, ids=ids, timeout=timeout, dump=dump, suite=suite)
    return summarise(name, report["tests"]), report


def main(argv: Optional[Sequence[str]] = None) -> int:
    """
    The command line; see the module docstring.

    @return: the exit status: 0 when the runs completed, 1 on a harness
        error.
    """
    parser = argparse.ArgumentParser(description="Run http-cache-tests through icpmesh (and Squid).")
    parser.add_argument("--squid", action="store_true", help="also run it through Squid 5.7")
    parser.add_argument("--no-icpmesh", action="store_true", help="skip icpmesh (with --squid)")
    parser.add_argument("--json", metavar="OUT", help="write every result and summary here")
    parser.add_argument("--id", action="append", default=[], metavar="TEST-ID",
                        help="run only this test (repeatable)")
    parser.add_argument("--dump", action="store_true",
                        help="with --id: print the requests and responses")
    parser.add_argument("--suite", metavar="DIR",
                        help="a checkout of another version of the suite, after npm install there "
                        f"(default: http-cache-tests {SUITE_VERSION} from npm)")
    parser.add_argument("--config", metavar="FILE", help="icpmesh config file (default: built-in)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument("--verbose", "-v", action="store_true", help="list every non-passing test")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run (default 600)")
    args = parser.parse_args(argv)

    config = None
    if args.config:
        with open(args.config) as f:
            config = f.read()
    workdir = tempfile.mkdtemp(prefix="icpmesh-conformance-")
    runs: list[tuple[str, Any]] = []
    if not args.no_icpmesh:
        runs.append(("icpmesh", lambda w: icpmeshProxy(w, config)))
    if args.squid:
        runs.append(("squid", squidProxy))
    summaries: dict[str, Summary] = {}
    reports: dict[str, Any] = {}
    try:
        if args.suite:
            suite = os.path.abspath(args.suite)
            if not os.path.isdir(os.path.join(suite, "tests")):
                raise HarnessError(f"{suite} does not look like http-cache-tests")
        else:
            ensureSuite()
            suite = SUITE_DIR
        for name, proxy in runs:
            started = time.monotonic()
            summary, report = measure(name, proxy, os.path.join(workdir, name), ids=args.id,
                                      timeout=args.timeout, dump=args.dump, suite=suite)
            summaries[name], reports[name] = summary, report
            if len(reports) == 1:
                print(f"http-cache-tests {report.get('version')} ({report.get('layout')} layout, "
                      f"{'git checkout ' + suite if args.suite else 'npm'}): {summary.total} tests")
            print(formatSummary(summary, args.verbose))
            print(f"  ({time.monotonic() - started:.1f} s)", flush=True)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if "icpmesh" in summaries and "squid" in summaries:
        print(formatComparison(summaries["icpmesh"], summaries["squid"]))
    if args.json:
        first: dict[str, Any] = next(iter(reports.values()), {})
        document = {
            "suite": "http-cache-tests",
            "version": first.get("version"),
            "layout": first.get("layout"),
            "command": "python conformance/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "runs": {
                name: {
                    "passed": s.passed, "failed": s.failed, "total": s.total,
                    "required_failures": [list(f) for f in s.requiredFailures],
                    "classes": s.classes,
                    "tests": reports[name]["tests"],
                }
                for name, s in summaries.items()
            },
        }
        with open(args.json, "w") as f:
            json.dump(document, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
