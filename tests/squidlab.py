"""
Run real Squid 5.7 processes on loopback for interoperability tests.

Each L{SquidInstance} gets its own directory with a generated
C{squid.conf}, PID file, logs and service name (C{-n}), so several can run at
once.  Squid runs in the foreground (C{-N}) as a child process and is always
stopped by its PID.

Typical use in a trial test::

    squid = startSquid(self, address="127.0.0.3", icpAllow=["127.0.0.2"])
    reply = squid.query("http://example.com/", source="127.0.0.2")
    self.assertEqual(reply.opcode, icp.Opcode.MISS)

Traps this module takes care of (see docs/squid-peering.md section 10.2):

 - Squid ignores ICP from its own IP address (IP only, not the port), so it
   is given its own 127.0.0.x (C{address}) and the helpers send from another
   (C{DEFAULT_CLIENT}, 127.0.0.2).
 - C{icp_access} and C{http_access} allow only the configured sources.
 - C{pinger_enable off}, C{minimum_direct_rtt 0}, C{minimum_direct_hops 0}
   and C{server_persistent_connections off}, so peer selection and C{%Sh}
   can be trusted; no C{cache_dir} (memory only).
 - Running as root, Squid drops to C{proxy}: the work directory is created
   under the system temporary directory and given to that user, because
   pytest's and trial's temporary directories are not reachable by it.
 - Readiness is read from C{cache.log} ("Accepting ... messages"), not by
   probing, so the access log holds only what the test did.

B{Never send ICPv3 to Squid 5.7}: it crashes (CVE-2026-32748).  Every address
used here must be loopback.
"""

from __future__ import annotations

import atexit
import glob
import http.client
import ipaddress
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import unittest
from typing import Any, Optional, Sequence

from icpmesh import icp

SQUID_PATHS = ("/usr/sbin/squid", "/usr/local/sbin/squid", "/usr/local/squid/sbin/squid")
DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_CLIENT = "127.0.0.2"
LOG_FORMAT = "%ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %Sh/%<a:%<p"
"""
The access log format (C{logformat squidlab}): time, elapsed ms, client,
code/status, size, method, URL, hierarchy/peer:port.  An ICP reply is logged
as, for example, C{UDP_MISS/000 60 ICP_QUERY http://x/ HIER_NONE/-:-}.
"""

_running: dict[int, "SquidInstance"] = {}


def requireSquid() -> str:
    """
    Find the Squid binary.

    @return: its path.
    @raise unittest.SkipTest: if Squid is not installed, unless C{CI} is set
        in the environment, where a missing Squid is a failure.
    """
    found = os.environ.get("SQUID") or shutil.which("squid")
    candidates = ([found] if found else []) + list(SQUID_PATHS)
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    message = "Squid is not installed (looked for " + ", ".join(SQUID_PATHS) + ")"
    if os.environ.get("CI"):
        raise AssertionError(message + "; CI must install it (.ci/run)")
    raise unittest.SkipTest(message)


def _checkLoopback(address: str) -> None:
    if not ipaddress.ip_address(address).is_loopback:
        raise ValueError(f"squidlab only uses loopback addresses, not {address}")


def freePort(kind: int = socket.SOCK_STREAM, address: str = DEFAULT_ADDRESS) -> int:
    """
    A port number free right now on C{address}.

    @param kind: C{socket.SOCK_STREAM} (TCP) or C{socket.SOCK_DGRAM} (UDP).
    @param address: the loopback address to bind.
    @return: the port.
    """
    _checkLoopback(address)
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def icpExchange(
    data: bytes,
    to: tuple[str, int],
    source: str = DEFAULT_CLIENT,
    timeout: float = 2.0,
    sourcePort: int = 0,
) -> Optional[bytes]:
    """
    Send one datagram and wait for the first datagram back from C{to}.

    Blocking; for tests only.

    @param data: the datagram.
    @param to: destination C{(address, port)}.
    @param source: loopback address to send from.
    @param timeout: seconds to wait.
    @param sourcePort: source port (0: any).
    @return: the reply, or C{None} if nothing came back in time.
    """
    _checkLoopback(to[0])
    _checkLoopback(source)
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((source, sourcePort))
        s.sendto(data, to)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            s.settimeout(remaining)
            try:
                reply, sender = s.recvfrom(65535)
            except socket.timeout:
                return None
            if (sender[0], sender[1]) == (to[0], to[1]):
                return reply


def parseAccessLine(line: str) -> dict[str, str]:
    """
    Split one line written with L{LOG_FORMAT}.

    @return: C{time, elapsed, client, code, status, size, method, url,
        hierarchy, peer} (C{peer} is C{address:port} or C{-:-}).
    """
    fields = line.split()
    when, elapsed, client, codeStatus, size, method, url, hier = fields[:8]
    code, _, status = codeStatus.partition("/")
    hierarchy, _, peer = hier.partition("/")
    return dict(
        time=when, elapsed=elapsed, client=client, code=code, status=status, size=size,
        method=method, url=url, hierarchy=hierarchy, peer=peer,
    )


class SquidError(RuntimeError):
    """
    Squid failed to start, or died.
    """


class SquidInstance:
    """
    One Squid process on loopback, memory cache only.

    @ivar workdir: its private directory (config, logs, PID file).
    @ivar address: the loopback address it listens on (HTTP and ICP).
    @ivar httpPort: its HTTP proxy port.
    @ivar icpPort: its ICP port.
    @ivar name: its service name (C{-n}).
    @ivar process: the C{subprocess.Popen}, once started.
    """

    def __init__(
        self,
        workdir: Optional[str] = None,
        address: str = DEFAULT_ADDRESS,
        httpPort: Optional[int] = None,
        icpPort: Optional[int] = None,
        extraConfig: str = "",
        name: Optional[str] = None,
        icpAllow: Sequence[str] = ("127.0.0.0/8",),
        httpAllow: Sequence[str] = ("127.0.0.0/8",),
        squid: Optional[str] = None,
    ) -> None:
        """
        @param workdir: directory for its files; by default a new one under
            the system temporary directory, removed by L{stop}.  If given, it
            must be reachable by the C{proxy} user when running as root.
        @param address: loopback address for its HTTP and ICP ports.
        @param httpPort: HTTP port (default: a free one).
        @param icpPort: ICP port (default: a free one).
        @param extraConfig: lines appended to the generated C{squid.conf}
            (e.g. C{cache_peer} lines, C{icp_hit_stale on}).  Later lines
            win for single-valued directives.  C{icp_access} and
            C{http_access} lines are moved before the generated allows, so
            they can deny part of C{icpAllow}/C{httpAllow} or allow more;
            a final C{deny all} always ends each list.
        @param name: service name (default: unique).
        @param icpAllow: sources (addresses or CIDR) C{icp_access} allows.
        @param httpAllow: sources C{http_access} allows.
        @param squid: the binary (default: L{requireSquid}).
        """
        _checkLoopback(address)
        self.squid = squid or requireSquid()
        self.address = address
        self._ownWorkdir = workdir is None
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix="squidlab-")
        os.makedirs(workdir, exist_ok=True)
        self.workdir = os.path.abspath(workdir)
        self.httpPort = httpPort or freePort(socket.SOCK_STREAM, address)
        self.icpPort = icpPort or freePort(socket.SOCK_DGRAM, address)
        self.name = name or f"squidlab{os.getpid()}x{self.icpPort}"
        self.extraConfig = extraConfig
        self.icpAllow = list(icpAllow)
        self.httpAllow = list(httpAllow)
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.configPath = os.path.join(self.workdir, "squid.conf")
        self.cacheLogPath = os.path.join(self.workdir, "cache.log")
        self.accessLogPath = os.path.join(self.workdir, "access.log")
        self.pidPath = os.path.join(self.workdir, "squid.pid")
        self.outputPath = os.path.join(self.workdir, "squid.out")

    # -- configuration --------------------------------------------------

    def config(self) -> str:
        """
        The generated C{squid.conf} text.
        """
        w = self.workdir
        extraAccess = [
            line for line in self.extraConfig.splitlines()
            if line.split()[:1] in (["icp_access"], ["http_access"])
        ]
        extraOther = [line for line in self.extraConfig.splitlines() if line not in extraAccess]
        lines = [
            "# generated by tests/squidlab.py",
            f"http_port {self._hostPort(self.httpPort)}",
            f"icp_port {self.icpPort}",
            f"udp_incoming_address {self.address}",
            f"pid_filename {w}/squid.pid",
            f"cache_log {w}/cache.log",
            f"logformat squidlab {LOG_FORMAT}",
            f"access_log stdio:{w}/access.log squidlab",
            "cache_store_log none",
            f"coredump_dir {w}",
            f"netdb_filename stdio:{w}/netdb.state",
            "logfile_rotate 0",
            "cache_mem 16 MB",
            "maximum_object_size_in_memory 1 MB",
            "pinger_enable off",
            "minimum_direct_rtt 0",
            "minimum_direct_hops 0",
            "server_persistent_connections off",
            "shutdown_lifetime 0 seconds",
            f"visible_hostname {self.name}",
            "acl squidlab_icp src " + " ".join(self.icpAllow) if self.icpAllow else "",
            "acl squidlab_http src " + " ".join(self.httpAllow) if self.httpAllow else "",
        ]
        if os.geteuid() == 0:
            lines.append("cache_effective_user proxy")
        lines += [line for line in extraOther if line.strip()]
        lines += extraAccess
        if self.icpAllow:
            lines.append("icp_access allow squidlab_icp")
        if self.httpAllow:
            lines.append("http_access allow squidlab_http")
        lines += ["icp_access deny all", "http_access deny all", ""]
        return "\n".join(line for line in lines if line is not None)

    def _hostPort(self, port: int) -> str:
        return f"[{self.address}]:{port}" if ":" in self.address else f"{self.address}:{port}"

    # -- lifecycle --------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """
        Write the config, start Squid, and wait until it accepts HTTP and
        ICP (as logged in C{cache.log}).

        @raise SquidError: if it exits or does not become ready in time;
            the message includes its output and C{cache.log}.
        """
        if self.process is not None:
            raise SquidError("already started")
        with open(self.configPath, "w") as f:
            f.write(self.config())
        if os.geteuid() == 0:
            proxy = pwd.getpwnam("proxy")
            os.chown(self.workdir, proxy.pw_uid, proxy.pw_gid)
            os.chmod(self.workdir, 0o755)
        check = subprocess.run(
            [self.squid, "-k", "parse", "-f", self.configPath, "-n", self.name],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
        )
        if check.returncode != 0:
            raise SquidError("squid.conf does not parse:\n" + check.stdout.decode("latin-1", "replace"))
        with open(self.outputPath, "wb") as out:
            self.process = subprocess.Popen(
                [self.squid, "-N", "-f", self.configPath, "-n", self.name],
                cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )
        _running[self.process.pid] = self
        wanted = (
            f"Accepting ICP messages on {self._hostPort(self.icpPort)}",
            f"local={self._hostPort(self.httpPort)}",
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SquidError(f"squid exited with {self.process.returncode}\n{self.diagnostics()}")
            log = self.cacheLog()
            if all(w in log for w in wanted):
                return
            time.sleep(0.05)
        self.stop()
        raise SquidError(f"squid did not become ready in {timeout} s\n{self.diagnostics()}")

    def alive(self) -> bool:
        """
        Whether the process is still running.
        """
        return self.process is not None and self.process.poll() is None

    def stop(self, graceful: bool = True, timeout: float = 10.0) -> None:
        """
        Stop Squid by its PID and wait for it, then remove the work
        directory if it was created here (set C{SQUIDLAB_KEEP=1} to keep
        it).  Safe to call more than once.

        @param graceful: send SIGTERM and let Squid shut down cleanly (it
            flushes its logs and takes about 2 s even with
            C{shutdown_lifetime 0}); if C{False}, SIGKILL at once.  Either
            way SIGKILL follows after C{timeout} seconds, and the
            instance's C{/dev/shm} segments are removed.
        """
        process = self.process
        if process is not None:
            if process.poll() is None:
                if graceful:
                    process.send_signal(signal.SIGTERM)
                else:
                    process.kill()
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout)
            _running.pop(process.pid, None)
            # Squid's shared memory segments are named after the service
            # name, which is unique to this instance; a killed Squid leaves
            # them behind.
            for path in glob.glob(os.path.join("/dev/shm", glob.escape(self.name) + "-*")):
                try:
                    os.unlink(path)
                except OSError:
                    pass
        if self._ownWorkdir and os.path.isdir(self.workdir) and not os.environ.get("SQUIDLAB_KEEP"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- inspection -------------------------------------------------------

    def _read(self, path: str) -> str:
        try:
            with open(path, encoding="latin-1") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def cacheLog(self) -> str:
        """
        The whole of C{cache.log}.
        """
        return self._read(self.cacheLogPath)

    def accessLogLines(self) -> list[str]:
        """
        The lines of C{access.log} (format L{LOG_FORMAT}).  Squid writes
        it through a buffer; see L{waitForAccessLog}.
        """
        return self._read(self.accessLogPath).splitlines()

    def accessLogEntries(self) -> list[dict[str, str]]:
        """
        C{access.log} split by L{parseAccessLine}.
        """
        return [parseAccessLine(line) for line in self.accessLogLines() if line.strip()]

    def waitForAccessLog(self, count: int, timeout: float = 5.0) -> list[str]:
        """
        Wait until C{access.log} has at least C{count} lines.

        @return: the lines (possibly fewer than C{count} after C{timeout}).
        """
        deadline = time.monotonic() + timeout
        lines = self.accessLogLines()
        while len(lines) < count and time.monotonic() < deadline:
            time.sleep(0.05)
            lines = self.accessLogLines()
        return lines

    def diagnostics(self) -> str:
        """
        Squid's own output and the tail of C{cache.log}, for error messages.
        """
        return (
            "--- squid output ---\n" + self._read(self.outputPath)[-4000:]
            + "\n--- cache.log ---\n" + self.cacheLog()[-8000:]
        )

    # -- talking to it ----------------------------------------------------

    @property
    def icpAddress(self) -> tuple[str, int]:
        """
        C{(address, icpPort)}.
        """
        return (self.address, self.icpPort)

    @property
    def proxyURL(self) -> str:
        """
        C{http://address:httpPort}, for clients that take a proxy URL.
        """
        return f"http://{self._hostPort(self.httpPort)}"

    def icpExchange(self, data: bytes, source: str = DEFAULT_CLIENT, timeout: float = 2.0) -> Optional[bytes]:
        """
        Send raw bytes to its ICP port and return the reply, or C{None}.

        B{Never send ICPv3}: Squid 5.7 crashes.
        """
        if len(data) >= 2 and data[1] == icp.VERSION_3:
            raise ValueError("refusing to send ICPv3 to Squid 5.7 (it crashes)")
        return icpExchange(data, self.icpAddress, source, timeout)

    def query(
        self,
        url: str,
        source: str = DEFAULT_CLIENT,
        reqnum: int = 1,
        options: int = 0,
        timeout: float = 2.0,
    ) -> Optional[icp.Message]:
        """
        Send an ICPv2 QUERY and decode the reply.

        @return: the reply, or C{None} if none came.
        @raise icp.DecodeError: if Squid sent something undecodable.
        """
        data = self.icpExchange(icp.encode(icp.query(reqnum, url, options=options)), source, timeout)
        return None if data is None else icp.decode(data)

    def fetch(
        self,
        url: str,
        headers: Optional[dict[str, str]] = None,
        method: str = "GET",
        timeout: float = 10.0,
    ) -> tuple[int, dict[str, str], bytes]:
        """
        Make one HTTP request to Squid: through it as a proxy when C{url}
        is absolute, or to Squid itself for a path (manager pages).

        @return: C{(status, headers, body)}.
        """
        conn = http.client.HTTPConnection(self.address, self.httpPort, timeout=timeout)
        try:
            conn.request(method, url, headers=headers or {})
            response = conn.getresponse()
            body = response.read()
            return response.status, dict(response.getheaders()), body
        finally:
            conn.close()

    def mgr(self, page: str, timeout: float = 10.0) -> str:
        """
        Fetch a cache manager page (C{counters}, C{server_list}, ...),
        asking Squid directly (origin-form request) rather than as a proxy.
        """
        status, _, body = self.fetch(f"/squid-internal-mgr/{page}", timeout=timeout)
        if status != 200:
            raise SquidError(f"mgr:{page} returned HTTP {status}")
        return body.decode("latin-1")


def startSquid(testCase: Any, graceful: bool = False, **kwargs: Any) -> SquidInstance:
    """
    Start a L{SquidInstance} for a test and stop it in the test's cleanup.

    @param testCase: a trial or unittest test case (skipped or failed by
        L{requireSquid} when Squid is missing).
    @param graceful: passed to L{SquidInstance.stop} at cleanup; the
        default, C{False}, kills Squid at once, which saves 2 s per test.
    @param kwargs: passed to L{SquidInstance}.
    @return: the running instance.
    """
    requireSquid()
    squid = SquidInstance(**kwargs)
    testCase.addCleanup(squid.stop, graceful)
    squid.start()
    return squid


@atexit.register
def _stopAll() -> None:
    # A test run that dies half-way must not leave Squids behind.
    for squid in list(_running.values()):
        squid.stop()

