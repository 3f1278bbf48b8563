#!/usr/bin/env python3
"""
HTTP proxy benchmark: an icpmesh node against Squid 5.7, on loopback.

This is a script that prints figures, not a test.  It measures requests
per second through each proxy for three loads (the "mixes"):

 - C{hit1k}: cache hits of 1 KiB objects (C{--hit-urls} URLs, cycled);
 - C{hit64k}: cache hits of 64 KiB objects;
 - C{miss}: uncached 1 KiB requests: every request asks for a URL never
   asked before, and the origin answers it with C{Cache-Control:
   max-age=3600}, so each proxy looks it up, fetches it, streams it and
   stores it.  C{--mixes ...,nostore} adds the same with an origin that
   answers C{Cache-Control: no-store} (fetched and streamed, not stored).

The load comes from C{wrk} (Debian package C{wrk}), one thread on CPU 0,
with a Lua script written here that sends absolute-form proxy requests
(cycling through the hit URLs, or a fresh URL per request for misses).
Each proxy is pinned to CPU 1.  The servers take turns, round after round,
with the order rotating every round, so the machine's drift cancels out of
the per-round ratio icpmesh/Squid, printed as min/median/max.

The origin is nginx (Debian package C{nginx-light}, static files, access
log off, one process) on CPU 0 beside wrk.  Every run records how busy
each CPU was (from C{/proc/stat}): a run where CPU 1 (the proxy) is not
close to 100% while CPU 0 is, was limited by the load side, and is
flagged.  The C{origin} row of the miss mix is wrk straight at nginx:
what CPU 0 can do on its own.

Checks: hit URLs are fetched twice through each proxy before every round
and the second answer must say C{X-Cache: HIT}; nginx's request counter
(C{stub_status}) must not move during a hit run, and must move by the
number of requests during a miss run; every run must be free of socket
errors and non-2xx answers, and its bytes per response must cover the
body.  Failed checks are printed next to the run and in the summary.

Runs also report the share of CPU 1 the server itself used (from
C{/proc/PID/stat}) and its requests per CPU-second: on a machine shared
with other jobs the CPU-second figures, and their ratios, are steadier
than requests per second.  A run where other jobs took more than a
quarter of CPU 1 is flagged.

Besides icpmesh and Squid, two bare Twisted building blocks run under the
same interpreter as the node: C{bare} for hits is a C{twisted.web} leaf
resource answering from a dict of (headers, body), and C{bare} for misses
is a leaf resource forwarding with a persistent C{twisted.web.client.Agent}
pool and streaming the body back.  They show what icpmesh's caching logic
costs on top of them.

Usage::

    python benchmarks/http_bench.py [--seconds 5] [--rounds 3] [--pypy]

Needs Linux, at least 2 CPUs, taskset, wrk, nginx, Squid 5.7 and root
(Squid drops to user C{proxy}).  Figures and commands are in
docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (ROOT, HERE):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from icp_bench import LOAD_CPU, SERVER_CPU, Server, onCPU, pinTree, spread, startNode  # noqa: E402

ORIGIN_ADDRESS = "127.0.0.1"
NODE_ADDRESS = "127.0.0.2"
SQUID_ADDRESS = "127.0.0.3"
BARE_ADDRESS = "127.0.0.4"
ALL_MIXES = ("hit1k", "hit64k", "miss", "nostore")
BODY_SIZES = {"hit1k": 1024, "hit64k": 65536, "miss": 1024, "nostore": 1024}
DEFAULT_PYPY_VENV = "/tmp/icpmesh-pypy"


# -- helpers ---------------------------------------------------------------------


def cpuTimes() -> list[tuple[int, int]]:
    """
    C{(busy, total)} jiffies of every CPU, from C{/proc/stat}.
    """
    result = []
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                fields = [int(x) for x in line.split()[1:]]
                idle = fields[3] + fields[4]
                total = sum(fields[:8])
                result.append((total - idle, total))
    return result


def cpuBusy(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> list[float]:
    """
    The share of time each CPU was busy between two L{cpuTimes}.
    """
    return [
        (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
        for (b0, t0), (b1, t1) in zip(before, after)
    ]


def processCPU(pid: int) -> float:
    """
    CPU seconds (user and system) used so far by C{pid} and its
    descendants.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    pids = [pid]
    while pids:
        p = pids.pop()
        with contextlib.suppress(OSError):
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
            for tid in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{p}/task/{tid}/children") as f:
                    pids.extend(int(c) for c in f.read().split())
    return total / ticks


def stopProcess(process: subprocess.Popen[Any]) -> None:
    """
    Stop one process we started, by its PID: SIGTERM, then SIGKILL.
    """
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def waitForTCP(address: tuple[str, int], what: str, process: Optional[subprocess.Popen[Any]] = None,
               timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            socket.create_connection(address, timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} does not accept connections on {address[0]}:{address[1]}")


def get(proxy: tuple[str, int], url: str, host: str) -> tuple[int, dict[str, str], bytes]:
    """
    One GET of C{url} through the proxy at C{proxy}, on a new connection.
    """
    conn = http.client.HTTPConnection(proxy[0], proxy[1], timeout=30)
    try:
        conn.request("GET", url, headers={"Host": host})
        response = conn.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        conn.close()


# -- the origin: nginx ---------------------------------------------------------------


class Origin:
    """
    nginx on L{ORIGIN_ADDRESS}, one process, serving C{/hit/1k/*},
    C{/hit/64k/*} and C{/miss/*} (1 KiB, C{max-age=3600}), C{/nostore/*}
    (1 KiB, C{no-store}), and its request counter at C{/nginx-status}.
    """

    def __init__(self, workdir: str) -> None:
        from tests.nodelab import freePort

        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if not os.path.exists(nginx):
            raise SystemExit("http_bench: needs nginx (apt-get install -y nginx-light)")
        self.workdir = os.path.join(workdir, "origin")
        www = os.path.join(self.workdir, "www")
        os.makedirs(www)
        for name, size in (("body-1k", 1024), ("body-64k", 65536)):
            with open(os.path.join(www, name), "wb") as f:
                f.write(originBody(size))
        self.port = freePort(socket.SOCK_STREAM, ORIGIN_ADDRESS)
        self.host = f"{ORIGIN_ADDRESS}:{self.port}"
        w = self.workdir
        config = f"""
daemon off;
master_process off;
worker_processes 1;
pid {w}/nginx.pid;
error_log {w}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    sendfile on;
    tcp_nodelay on;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    default_type text/plain;
    client_body_temp_path {w}/tmp;
    proxy_temp_path {w}/tmp;
    fastcgi_temp_path {w}/tmp;
    uwsgi_temp_path {w}/tmp;
    scgi_temp_path {w}/tmp;
    server {{
        listen {self.host} backlog=4096;
        root {www};
        location /hit/1k/ {{ add_header Cache-Control "max-age=3600"; rewrite ^ /body-1k break; }}
        location /hit/64k/ {{ add_header Cache-Control "max-age=3600"; rewrite ^ /body-64k break; }}
        location /miss/ {{ add_header Cache-Control "max-age=3600"; rewrite ^ /body-1k break; }}
        location /nostore/ {{ add_header Cache-Control "no-store"; rewrite ^ /body-1k break; }}
        location = /nginx-status {{ stub_status; }}
    }}
}}
"""
        self.configPath = os.path.join(w, "nginx.conf")
        with open(self.configPath, "w") as f:
            f.write(config)
        with onCPU(LOAD_CPU):
            self.process = subprocess.Popen(
                [nginx, "-p", w, "-c", self.configPath, "-e", os.path.join(w, "error.log")],
                stdin=subprocess.DEVNULL,
            )
        waitForTCP((ORIGIN_ADDRESS, self.port), "nginx", self.process)

    def url(self, path: str) -> str:
        return f"http://{self.host}{path}"

    def counters(self) -> tuple[int, int]:
        """
        How many connections nginx has accepted and requests it has
        handled, each status check included.
        """
        conn = http.client.HTTPConnection(ORIGIN_ADDRESS, self.port, timeout=10)
        try:
            conn.request("GET", "/nginx-status")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        # "Active connections: N \nserver accepts handled requests\n A H R \n..."
        accepts, handled, requests = text.splitlines()[2].split()
        return int(accepts), int(requests)

    def stop(self) -> None:
        stopProcess(self.process)


# -- the load: wrk ----------------------------------------------------------------------

LUA_COMMON = """
local host = "%(host)s"
local threads = 0
setup = function(thread)
    thread:set("tid", threads)
    threads = threads + 1
end
done = function(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        "BENCH requests=%%d bytes=%%d duration_us=%%d connect=%%d read=%%d write=%%d status=%%d timeout=%%d p50_us=%%d p99_us=%%d\\n",
        summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write, e.status,
        e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""

LUA_HITS = """
local urls = {%(urls)s}
local reqs = {}
local i = 0
init = function(args)
    local headers = {["Host"] = host}
    for k, u in ipairs(urls) do
        reqs[k] = wrk.format("GET", u, headers)
    end
    i = (tid or 0) * 7 %% #reqs
end
request = function()
    i = i + 1
    if i > #reqs then i = 1 end
    return reqs[i]
end
"""

LUA_MISSES = """
local prefix = "%(prefix)s"
local headers = {["Host"] = host}
local n = 0
local mine = prefix
init = function(args)
    mine = prefix .. (tid or 0) .. "/"
end
request = function()
    n = n + 1
    return wrk.format("GET", mine .. n, headers)
end
"""


def writeLua(path: str, host: str, urls: Optional[Sequence[str]] = None, prefix: Optional[str] = None) -> str:
    text = LUA_COMMON % dict(host=host)
    if urls is not None:
        text += LUA_HITS % dict(urls=", ".join(json.dumps(u) for u in urls))
    else:
        text += LUA_MISSES % dict(prefix=prefix)
    with open(path, "w") as f:
        f.write(text)
    return path


def runWrk(args: argparse.Namespace, target: tuple[str, int], script: str, seconds: float,
           pid: Optional[int] = None) -> dict[str, Any]:
    """
    One wrk run on L{LOAD_CPU} against C{target}; its figures, with the
    busy share of each CPU over the run and, given the server's C{pid},
    the share of a CPU that the server itself used (C{serverCPU}) and its
    requests per CPU-second (C{rpcs}).
    """
    command = [
        "taskset", "-c", str(LOAD_CPU), "wrk", "-t", str(args.threads), "-c", str(args.connections),
        "-d", f"{int(seconds)}s", "--timeout", "10s", "-s", script, f"http://{target[0]}:{target[1]}/",
    ]
    before = cpuTimes()
    serverBefore = processCPU(pid) if pid else 0.0
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    wall = time.monotonic() - started
    serverCPU = (processCPU(pid) - serverBefore) / wall if pid else 0.0
    busy = cpuBusy(before, cpuTimes())
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()} {done.stdout.strip()}")
    figures: dict[str, Any] = {}
    for line in done.stdout.splitlines():
        if line.startswith("BENCH "):
            for item in line.split()[1:]:
                key, _, value = item.partition("=")
                figures[key] = int(value)
    if "requests" not in figures:
        raise RuntimeError(f"wrk said nothing usable: {done.stdout!r} {done.stderr!r}")
    figures["rps"] = figures["requests"] / (figures["duration_us"] / 1e6)
    figures["cpu"] = busy
    figures["serverCPU"] = serverCPU
    figures["rpcs"] = figures["rps"] / serverCPU if serverCPU > 0 else 0.0
    return figures


# -- the servers ---------------------------------------------------------------------------


def nodeConfig(args: argparse.Namespace) -> str:
    return "\n".join([
        f"store memory max-size={args.store_mb}MB max-object-size=8MB",
        "visible_hostname icpmesh-bench",
        "access_log none",
        "",
    ])


def startSquid(stack: contextlib.ExitStack, args: argparse.Namespace) -> Server:
    """
    Squid 5.7 via C{tests/squidlab.py}, pinned to L{SERVER_CPU}: memory
    cache of C{--store-mb}, objects up to 1 MB in memory, no access log,
    and persistent connections to the origin (Squid's default; squidlab
    turns them off for its tests).
    """
    from tests import squidlab

    class BenchSquid(squidlab.SquidInstance):
        def config(self) -> str:
            lines = [
                "access_log none" if line.startswith("access_log ") else line
                for line in super().config().splitlines()
            ]
            return "\n".join(lines) + "\n"

    squid = BenchSquid(
        address=SQUID_ADDRESS,
        extraConfig="\n".join([
            f"cache_mem {args.store_mb} MB",
            "maximum_object_size_in_memory 1 MB",
            "server_persistent_connections on",
            "client_persistent_connections on",
        ]),
    )
    with onCPU(SERVER_CPU):
        squid.start()
    stack.callback(squid.stop)
    pinTree(squid.process.pid, SERVER_CPU)  # type: ignore[union-attr]
    server = Server("squid", squid.icpAddress, (SQUID_ADDRESS, squid.httpPort), squid.stop)
    server.squid = squid  # type: ignore[attr-defined]
    server.pid = squid.process.pid  # type: ignore[attr-defined, union-attr]
    return server


def startBare(stack: contextlib.ExitStack, args: argparse.Namespace, kind: str, tableFile: str) -> Server:
    """
    A bare Twisted building block (L{serveBare}) pinned to L{SERVER_CPU}.
    """
    from tests.nodelab import checkoutEnv, freePort

    port = freePort(socket.SOCK_STREAM, BARE_ADDRESS)
    with onCPU(SERVER_CPU):
        process = subprocess.Popen(
            [args.python or sys.executable, os.path.abspath(__file__), "--serve-bare", kind,
             BARE_ADDRESS, str(port), tableFile],
            env=checkoutEnv(),
        )
    stack.callback(stopProcess, process)
    waitForTCP((BARE_ADDRESS, port), f"the bare {kind} server", process)
    server = Server("bare", (BARE_ADDRESS, 0), (BARE_ADDRESS, port), lambda: stopProcess(process))
    server.pid = process.pid  # type: ignore[attr-defined]
    return server


def originBody(size: int) -> bytes:
    """
    The body of a C{size}-byte object, as this benchmark's origin serves it.
    """
    return (b"icpmesh http_bench origin body. " * (size // 32 + 1))[:size]


def quietSite(root: Any, reactor: Any = None) -> Any:
    """
    A C{twisted.web} C{Site} for C{root} that writes no per-request log line.
    """
    from twisted.web.server import Site

    class QuietSite(Site):
        def log(self, request: Any) -> None:
            pass

    return QuietSite(root) if reactor is None else QuietSite(root, reactor=reactor)


def bareLeaf(table: dict[bytes, tuple[list[tuple[bytes, list[bytes]]], bytes]]) -> Any:
    """
    The bare hit block: a C{twisted.web} leaf resource that answers a GET
    from C{table}, request target to C{(headers, body)}; 404 otherwise.
    """
    from twisted.web.resource import Resource

    class Leaf(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            entry = table.get(request.uri)
            if entry is None:
                request.setResponseCode(404)
                return b""
            headers, body = entry
            for name, values in headers:
                request.responseHeaders.setRawHeaders(name, values)
            return body

    return Leaf()


def bareForwarder(agent: Any) -> Any:
    """
    The bare miss block: a leaf resource that forwards a GET to its absolute
    URL with C{agent}, copies the status and the end-to-end headers, and
    streams the body back as it comes.
    """
    from twisted.internet.protocol import Protocol
    from twisted.web.http_headers import Headers
    from twisted.web.iweb import UNKNOWN_LENGTH
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET

    hop = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length",
           b"proxy-connection", b"te", b"trailer", b"upgrade"}

    class Relay(Protocol):
        def __init__(self, request: Any) -> None:
            self.request = request

        def dataReceived(self, data: bytes) -> None:
            self.request.write(data)

        def connectionLost(self, reason: Any) -> None:
            if not self.request.finished and not self.request._disconnected:
                self.request.finish()

    class Forward(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> Any:
            d = agent.request(b"GET", request.uri, Headers({b"Host": [request.getHeader(b"host") or b""]}))

            def got(response: Any) -> None:
                request.setResponseCode(response.code)
                for name, values in response.headers.getAllRawHeaders():
                    if name.lower() not in hop:
                        request.responseHeaders.setRawHeaders(name, values)
                if response.length is not UNKNOWN_LENGTH:
                    request.setHeader(b"content-length", b"%d" % response.length)
                response.deliverBody(Relay(request))

            def failed(reason: Any) -> None:
                request.setResponseCode(502)
                request.finish()

            d.addCallbacks(got, failed)
            return NOT_DONE_YET

    return Forward()


def serveBare(kind: str, address: str, port: int, tableFile: str) -> None:
    """
    The bare building blocks, for reference; each runs until SIGTERM (or
    an hour): C{leaf} is L{bareLeaf} over the objects in C{tableFile}
    (JSON: URL to [size, cache-control]), C{forward} is L{bareForwarder}
    with a persistent C{Agent} pool (256 connections per host).  Neither
    writes a per-request log line.
    """
    from twisted.internet import reactor
    from twisted.web.client import Agent, HTTPConnectionPool

    if kind == "leaf":
        with open(tableFile) as f:
            spec = json.load(f)
        root = bareLeaf({
            url.encode(): (
                [(b"Content-Type", [b"text/plain"]), (b"Cache-Control", [cc.encode()])],
                originBody(size),
            )
            for url, (size, cc) in spec.items()
        })
    else:
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 256
        root = bareForwarder(Agent(reactor, pool=pool))
    reactor.listenTCP(port, quietSite(root), backlog=4096, interface=address)  # type: ignore[attr-defined]
    reactor.callLater(3600, reactor.stop)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


# -- the benchmark ---------------------------------------------------------------------------


def warmHits(server: Server, urls: Sequence[str], host: str) -> Optional[str]:
    """
    Fetch every hit URL through C{server} twice; the second answer must be
    a 200 that says C{X-Cache: HIT}.  Why not, if not.
    """
    assert server.http is not None
    for url in urls:
        for attempt in (1, 2):
            status, headers, body = get(server.http, url, host)
            if status != 200:
                return f"GET {url}: HTTP {status}"
        if "HIT" not in headers.get("x-cache", ""):
            return f"second GET of {url} said X-Cache: {headers.get('x-cache')!r}"
    return None


def runProblems(mix: str, name: str, figures: dict[str, Any], originDelta: int, connections: int) -> list[str]:
    """
    Why a run's figures cannot be trusted, if they cannot.
    """
    problems = []
    n = figures["requests"]
    errors = {k: figures[k] for k in ("connect", "read", "write", "status", "timeout") if figures[k]}
    if errors:
        problems.append("errors " + ",".join(f"{k}={v}" for k, v in errors.items()))
    if n and figures["bytes"] / n < BODY_SIZES[mix]:
        problems.append(f"{figures['bytes'] / n:.0f} bytes/response")
    if name == "origin":
        return problems
    if mix.startswith("hit"):
        if originDelta > 0:
            problems.append(f"{originDelta} requests reached the origin")
    elif not (n <= originDelta <= n + 2 * connections):
        # Up to one request per connection is in flight when wrk stops,
        # in this run and in the one before (its stragglers).
        problems.append(f"origin saw {originDelta} requests for {n}")
    busy = figures["cpu"][SERVER_CPU]
    if busy < 0.9 and figures["cpu"][LOAD_CPU] > 0.95:
        problems.append(f"load-bound (CPU{SERVER_CPU} {busy:.0%} busy)")
    if busy - figures["serverCPU"] > 0.25:
        problems.append(f"CPU{SERVER_CPU} shared: the server had {figures['serverCPU']:.0%} of it")
    return problems


def benchmark(args: argparse.Namespace, stack: contextlib.ExitStack, tmp: str) -> dict[str, Any]:
    mixes = [m.strip() for m in args.mixes.split(",") if m.strip()]
    for mix in mixes:
        if mix not in ALL_MIXES:
            raise SystemExit(f"http_bench: unknown mix {mix!r} (have {', '.join(ALL_MIXES)})")
    print("starting nginx (origin) ...", flush=True)
    origin = Origin(tmp)
    stack.callback(origin.stop)
    hitURLs = {
        "hit1k": [origin.url(f"/hit/1k/{i:04d}") for i in range(args.hit_urls)],
        "hit64k": [origin.url(f"/hit/64k/{i:04d}") for i in range(args.hit_urls)],
    }
    tableFile = os.path.join(tmp, "bare-table.json")
    with open(tableFile, "w") as f:
        json.dump({u: [BODY_SIZES[mix], "max-age=3600"] for mix, urls in hitURLs.items() for u in urls}, f)

    print("starting icpmesh and Squid ...", flush=True)
    node = startNode(stack, os.path.join(tmp, "node"), NODE_ADDRESS, nodeConfig(args), args.python)
    node.pid = node.node.process.pid  # type: ignore[attr-defined]
    squid = startSquid(stack, args)
    servers: dict[str, list[Server]] = {}
    bareLeaf = bareForward = None
    if not args.no_bare:
        if any(m.startswith("hit") for m in mixes):
            bareLeaf = startBare(stack, args, "leaf", tableFile)
        if any(not m.startswith("hit") for m in mixes):
            bareForward = startBare(stack, args, "forward", tableFile)
    for mix in mixes:
        group = [node, squid]
        bare = bareLeaf if mix.startswith("hit") else bareForward
        if bare is not None:
            group.append(bare)
        servers[mix] = group

    lua = os.path.join(tmp, "lua")
    os.makedirs(lua)
    scripts = {
        mix: writeLua(os.path.join(lua, f"{mix}.lua"), origin.host, urls=urls)
        for mix, urls in hitURLs.items() if mix in mixes
    }
    missRun = 0

    def missScript(mix: str) -> str:
        nonlocal missRun
        missRun += 1
        path = "miss" if mix == "miss" else "nostore"
        return writeLua(os.path.join(lua, f"run{missRun}.lua"), origin.host,
                        prefix=origin.url(f"/{path}/{missRun}/"))

    def scriptFor(mix: str) -> str:
        return scripts[mix] if mix.startswith("hit") else missScript(mix)

    warmProblems: list[str] = []

    def warm(r: int) -> None:
        for mix in mixes:
            if not mix.startswith("hit"):
                continue
            for server in servers[mix]:
                if server.name == "bare":
                    continue
                problem = warmHits(server, hitURLs[mix], origin.host)
                if problem:
                    warmProblems.append(f"round {r + 1} {mix} {server.name}: {problem}")
                    print(f"  !! {mix} {server.name}: {problem}", flush=True)

    warm(-1)
    if args.prewarm > 0:
        print(f"prewarming every server on every mix for {args.prewarm:g} s ...", flush=True)
        for mix in mixes:
            for server in servers[mix]:
                runWrk(args, server.http, scriptFor(mix), args.prewarm)  # type: ignore[arg-type]

    runs: list[dict[str, Any]] = []
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds} ...", flush=True)
        warm(r)
        for mix in mixes:
            group = servers[mix]
            shift = r % len(group)
            order = group[shift:] + group[:shift]
            targets: list[tuple[str, tuple[str, int], Optional[int]]] = [
                (s.name, s.http, s.pid) for s in order  # type: ignore[attr-defined, misc]
            ]
            if not mix.startswith("hit") and not args.no_origin and r == 0:
                # wrk straight at nginx: what the load side can do alone.
                targets.append(("origin", (ORIGIN_ADDRESS, origin.port), None))
            for name, target, pid in targets:
                script = scriptFor(mix)
                if name == "origin":
                    script = writeLua(script, origin.host, prefix=f"/{'miss' if mix == 'miss' else 'nostore'}/{missRun}/")
                acceptsBefore, before = origin.counters()
                figures = runWrk(args, target, script, args.seconds, pid)
                acceptsAfter, after = origin.counters()
                delta = after - before - 1
                figures["originConnections"] = acceptsAfter - acceptsBefore - 1
                problems = runProblems(mix, name, figures, delta, args.connections * args.threads)
                runs.append(dict(round=r, mix=mix, server=name, figures=figures, origin=delta, problems=problems))
                cpu = " ".join(f"cpu{i} {c:4.0%}" for i, c in enumerate(figures["cpu"][:2]))
                cpu += f"  server {figures['serverCPU']:4.0%}  {figures['rpcs']:7.0f} req/cpu-s" if pid else ""
                flag = ("  !! " + "; ".join(problems)) if problems else ""
                print(
                    f"  {mix:7} {name:8} {figures['rps']:9.0f} req/s  p50 {figures['p50_us'] / 1000:6.2f} ms"
                    f"  p99 {figures['p99_us'] / 1000:6.2f} ms  {cpu}  origin +{delta} req"
                    f" +{figures['originConnections']} conn{flag}",
                    flush=True,
                )
    profiles: dict[str, Any] = {}
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        pid = node.node.process.pid  # type: ignore[attr-defined]
        for mix in mixes:
            print(f"profiling icpmesh on {mix} with py-spy for {args.seconds} s ...", flush=True)
            profiles[mix] = profileRun(args, pid, node.http, scriptFor(mix), mix)  # type: ignore[arg-type]
    return dict(runs=runs, mixes=mixes, warmProblems=warmProblems, profiles=profiles)


def profileRun(args: argparse.Namespace, pid: int, target: tuple[str, int], script: str, mix: str) -> dict[str, Any]:
    """
    One more wrk run against the node while C{py-spy record} samples it
    (from L{LOAD_CPU}); the collapsed stacks go to C{--profile}, and the
    functions with the most samples, by self and by total time, are kept.
    """
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        raise SystemExit("http_bench: --profile needs py-spy (pip install py-spy)")
    out = os.path.join(args.profile, f"{mix}.collapsed")
    spy = subprocess.Popen(
        ["taskset", "-c", str(LOAD_CPU), pyspy, "record", "-p", str(pid), "-d", str(args.seconds + 1),
         "-r", "200", "-f", "raw", "-o", out, "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        figures = runWrk(args, target, script, args.seconds)
        spy.wait(args.seconds + 30)
    finally:
        stopProcess(spy)
    selfCount: dict[str, int] = {}
    ownTotal: dict[str, int] = {}
    areas: dict[str, int] = {}
    samples = 0
    with open(out) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            n = int(count)
            frames = stack.split(";")
            samples += n
            leaf = frames[-1]
            name, _, where = leaf.partition(" (")
            path = where.rsplit(":", 1)[0]
            selfCount[f"{name} ({path})"] = selfCount.get(f"{name} ({path})", 0) + n
            area = next((a for a in ("icpmesh/", "twisted/web/", "twisted/internet/", "twisted/")
                         if path.startswith(a)), "other")
            areas[area.rstrip("/")] = areas.get(area.rstrip("/"), 0) + n
            seen = set()
            for frame in frames:
                name, _, where = frame.partition(" (")
                path = where.rsplit(":", 1)[0]
                if path.startswith("icpmesh/") and name not in seen:
                    seen.add(name)
                    key = f"{name} ({path})"
                    ownTotal[key] = ownTotal.get(key, 0) + n

    def top(counts: dict[str, int], limit: int) -> list[tuple[str, float]]:
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:limit]
        return [(k, v / max(samples, 1)) for k, v in ranked]

    return dict(rps=figures["rps"], samples=samples, file=out, self=top(selfCount, args.profile_top),
                total=top(ownTotal, args.profile_top), areas=top(areas, 10))


def ratioLine(runs: list[dict[str, Any]], rounds: int, mix: str, a: str, b: str, key: str) -> Optional[str]:
    """
    C{a}/C{b} on C{key} per round: the median, min and max over rounds.
    """
    ratios = []
    for r in range(rounds):
        x = [run for run in runs if run["round"] == r and run["mix"] == mix and run["server"] == a]
        y = [run for run in runs if run["round"] == r and run["mix"] == mix and run["server"] == b]
        if x and y and y[0]["figures"][key] > 0:
            ratios.append(x[0]["figures"][key] / y[0]["figures"][key])
    if not ratios:
        return None
    lo, med, hi = spread(ratios)
    return f"{med:5.2f} (min {lo:.2f}, max {hi:.2f})"


def printSummary(result: dict[str, Any], args: argparse.Namespace) -> None:
    runs = result["runs"]
    rounds = 1 + max((run["round"] for run in runs), default=0)
    print()
    print(
        f"HTTP proxy: {rounds} rounds x {args.seconds:g} s per server and mix, wrk -t{args.threads} "
        f"-c{args.connections}, node under {args.python or sys.executable}"
    )
    print(f"{'mix':8} {'server':8} {'req/s min':>10} {'median':>9} {'max':>9}  {'req/cpu-s':>9}  "
          f"{'p50 ms':>7} {'p99 ms':>7}  {'cpu0':>5} {'cpu1':>5} {'server':>6} {'conn/req':>8}")
    for mix in result["mixes"]:
        names: list[str] = []
        for run in runs:
            if run["mix"] == mix and run["server"] not in names:
                names.append(run["server"])
        for name in names:
            mine = [x for x in runs if x["mix"] == mix and x["server"] == name]
            rps = spread([x["figures"]["rps"] for x in mine])
            rpcs = statistics.median(x["figures"].get("rpcs", 0) for x in mine)
            p50 = statistics.median(x["figures"]["p50_us"] for x in mine) / 1000
            p99 = statistics.median(x["figures"]["p99_us"] for x in mine) / 1000
            c0 = statistics.median(x["figures"]["cpu"][0] for x in mine)
            c1 = statistics.median(x["figures"]["cpu"][1] for x in mine)
            sc = statistics.median(x["figures"].get("serverCPU", 0) for x in mine)
            cpr = statistics.median(x["figures"]["originConnections"] / max(x["figures"]["requests"], 1)
                                    for x in mine)
            bad = sum(1 for x in mine if x["problems"])
            note = f"  ({bad} run(s) flagged)" if bad else ""
            print(f"{mix:8} {name:8} {rps[0]:10.0f} {rps[1]:9.0f} {rps[2]:9.0f}  {rpcs:9.0f}  {p50:7.2f} {p99:7.2f}  "
                  f"{c0:5.0%} {c1:5.0%} {sc:6.0%} {cpr:8.3f}{note}")
    print()
    print(f"{'mix':8} {'ratio':14} {'req/s: median (min, max)':>28}   {'req/cpu-s: median (min, max)':>30}")
    targets = {"hit1k": 0.35, "hit64k": 2.0, "miss": 0.22, "nostore": 0.22}
    for mix in result["mixes"]:
        for a, b in (("icpmesh", "squid"), ("bare", "squid"), ("icpmesh", "bare")):
            byRate = ratioLine(runs, rounds, mix, a, b, "rps")
            if byRate is None:
                continue
            byCPU = ratioLine(runs, rounds, mix, a, b, "rpcs") or "-"
            target = f"   target >= {targets[mix]:.2f}" if (a, b) == ("icpmesh", "squid") else ""
            print(f"{mix:8} {a + '/' + b:14} {byRate:>28}   {byCPU:>30}{target}")
    for problem in result["warmProblems"]:
        print("warm-up check failed: " + problem)
    for run in runs:
        if run["problems"]:
            print(f"flagged: round {run['round'] + 1} {run['mix']} {run['server']}: " + "; ".join(run["problems"]))
    for mix, profile in result.get("profiles", {}).items():
        print()
        print(f"py-spy profile of icpmesh, {mix}: {profile['rps']:.0f} req/s while sampled, "
              f"{profile['samples']} samples in {profile['file']}")
        print("  self time by package: " + ", ".join(f"{name} {share:.0%}" for name, share in profile["areas"]))
        print("  self time:")
        for name, share in profile["self"]:
            print(f"    {share:6.1%}  {name}")
        print("  total time of icpmesh functions (including callees):")
        for name, share in profile["total"]:
            print(f"    {share:6.1%}  {name}")


# -- PyPy -------------------------------------------------------------------------------------


def pypyPython(venv: str) -> str:
    """
    The interpreter of a PyPy venv with icpmesh's dependencies, made with
    C{pypy3 -m venv} and pip on first use.
    """
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        pypy = shutil.which("pypy3")
        if pypy is None:
            raise SystemExit("http_bench: --pypy needs pypy3 (apt-get install -y pypy3 pypy3-venv)")
        print(f"creating a PyPy venv in {venv} ...", flush=True)
        subprocess.run([pypy, "-m", "venv", venv], check=True)
    check = subprocess.run([python, "-c", "import twisted, treq, attrs, OpenSSL, zope.interface"],
                           capture_output=True)
    if check.returncode != 0:
        # PyPy 3.9 (Debian bookworm's pypy3): the newest cryptography with a
        # pp39 wheel is 43.0.3, which pins pyOpenSSL below 25, and the newest
        # Twisted that installs beside them is 26.4.0.  Newer cryptography
        # builds from source and needs Rust crates from the network.
        subprocess.run([python, "-m", "pip", "install", "-q", "cryptography==43.0.3", "pyopenssl<25",
                        "twisted==26.4.0", "treq", "attrs", "zope.interface"], check=True)
    return python


# -- main ---------------------------------------------------------------------------------------


def parseArgs(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--seconds", type=int, default=5, help="measured seconds per run (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of turns (default 3)")
    parser.add_argument("--mixes", default="hit1k,hit64k,miss",
                        help="comma-separated, from hit1k,hit64k,miss,nostore (default hit1k,hit64k,miss)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument("--hit-urls", type=int, default=100, help="URLs cycled by the hit mixes (default 100)")
    parser.add_argument("--store-mb", type=int, default=2048,
                        help="memory store of both proxies, MB (default 2048)")
    parser.add_argument("--prewarm", type=int, default=2,
                        help="unmeasured seconds per server and mix before the rounds (default 2)")
    parser.add_argument("--nice", type=int, default=-10,
                        help="nice value for this script and everything it starts, when root (default -10)")
    parser.add_argument("--no-bare", action="store_true", help="leave out the bare Twisted building blocks")
    parser.add_argument("--no-origin", action="store_true", help="leave out wrk straight at the origin")
    parser.add_argument("--python", default=None, help="interpreter for the node and the bare servers")
    parser.add_argument("--pypy", action="store_true",
                        help="run the node and the bare servers under PyPy (a venv in --pypy-venv)")
    parser.add_argument("--pypy-venv", default=DEFAULT_PYPY_VENV,
                        help=f"the PyPy venv, made if missing (default {DEFAULT_PYPY_VENV})")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="after the rounds, sample the node with py-spy during one more run per mix; "
                             "collapsed stacks go to DIR")
    parser.add_argument("--profile-top", type=int, default=25, help="functions listed per profile (default 25)")
    parser.add_argument("--report", default=None, metavar="JSON",
                        help="print the summary of a run saved with --json, and exit")
    parser.add_argument("--json", default=None, help="also write every run's figures to this file")
    parser.add_argument("--serve-bare", nargs=4, metavar=("KIND", "ADDRESS", "PORT", "TABLE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (0 < args.seconds <= 600 and 1 <= args.rounds <= 50):
        parser.error("--seconds must be in (0, 600] and --rounds in [1, 50]")
    if not (1 <= args.connections <= 10000 and 1 <= args.threads <= 64 and 1 <= args.hit_urls <= 10000):
        parser.error("--connections in [1, 10000], --threads in [1, 64], --hit-urls in [1, 10000]")
    if not (0 <= args.prewarm <= 600 and -20 <= args.nice <= 19 and 16 <= args.store_mb <= 65536):
        parser.error("--prewarm in [0, 600], --nice in [-20, 19], --store-mb in [16, 65536]")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parseArgs(argv)
    if args.serve_bare:
        kind, address, port, table = args.serve_bare
        serveBare(kind, address, int(port), table)
        return 0
    if args.report:
        with open(args.report) as f:
            saved = json.load(f)
        savedArgs = {k: v for k, v in saved.get("args", {}).items() if k != "report"}
        printSummary(saved["result"], argparse.Namespace(**{**vars(args), **savedArgs}))
        return 0
    if sys.platform != "linux" or len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("http_bench: needs Linux and at least 2 CPUs (servers on CPU 1, load on CPU 0)")
    for tool in ("taskset", "wrk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"http_bench: needs {tool} (apt-get install -y {'util-linux' if tool == 'taskset' else tool})")
    from tests import squidlab

    try:
        squid = squidlab.requireSquid()
    except Exception as e:
        raise SystemExit(f"http_bench: {e}")
    if args.pypy:
        args.python = pypyPython(args.pypy_venv)

    signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))
    os.sched_setaffinity(0, {LOAD_CPU})
    if os.geteuid() == 0 and args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)
    results: dict[str, Any] = dict(
        argv=sys.argv, args=vars(args), python=args.python or sys.executable, squid=squid,
        started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    )
    with contextlib.ExitStack() as stack:
        tmp = tempfile.mkdtemp(prefix="httpbench-")
        stack.callback(shutil.rmtree, tmp, True)
        results["result"] = benchmark(args, stack, tmp)
    printSummary(results["result"], args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
