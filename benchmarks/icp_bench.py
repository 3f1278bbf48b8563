#!/usr/bin/env python3
"""
ICP reply-path benchmark: an icpmesh node against Squid 5.7, on loopback.

This is a script that prints figures, not a test.  It measures:

 1. B{Reply rate}: ICP queries answered per second, and p50/p99 latency, for
    a hit-only, a miss-only and a 50/50 mix, with ICP query logging on and
    off.  The load comes from C{benchmarks/icpload.c}, compiled here with
    C{gcc -O2}, which keeps a window of queries outstanding and matches
    replies by request number.  Each server is pinned to CPU 1, the load
    generator (and this script) to CPU 0.  The servers take turns on the
    same load, round after round (the order alternates: A B, B A, ...), so
    that the machine's drift cancels out of the ratio icpmesh/Squid, which
    is printed per mix as min/median/max over the rounds.  The latency
    percentiles are at saturation (they mostly measure the window's
    queueing); an unloaded latency (one query outstanding) is printed too.
    A bare Twisted C{DatagramProtocol} that checks a query's framing and
    answers it from a set (no access control, freshness, counters or
    logging) runs as a third server, to show what the policy costs over
    the protocol.

 2. B{What ICP adds to a miss}: an icpmesh node with 1, 8 and 64
    neighbours (siblings answering MISS, all in one C{icpload -R} process)
    and a local origin; the median time of a GET of an uncached URL through
    the node, less the median with no neighbours.  The same for Squid 5.7
    with the same neighbours as C{cache_peer ... sibling}.  All the setups
    take turns request by request.

Hits are cached first by fetching them through each proxy with HTTP from a
local origin (C{Cache-Control: max-age=3600}); misses are URLs never asked
before.  Addresses: load from 127.0.0.10 (Squid ignores queries from its
own address), servers on their own 127.0.0.x, fake neighbours on
127.0.1.1 and up.  Every process started is stopped by its PID at the end.

Usage::

    python benchmarks/icp_bench.py [--seconds 5] [--rounds 3]

Needs Linux, at least 2 CPUs, gcc, Squid 5.7 (C{/usr/sbin/squid}) and
root (Squid drops to user C{proxy}).  See benchmarks/README.md.
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
from typing import Any, Iterator, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

LOAD_SOURCE = "127.0.0.10"
ORIGIN_ADDRESS = "127.0.0.1"
FAKE_NEIGHBOURS = "127.0.1.1"
SERVER_CPU = 1
LOAD_CPU = 0
MIXES = ("hit", "miss", "mix")


# -- small helpers -------------------------------------------------------------


@contextlib.contextmanager
def onCPU(cpu: int) -> Iterator[None]:
    """
    Run the block on C{cpu}: processes started inside inherit the pinning.
    """
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def pinTree(pid: int, cpu: int) -> None:
    """
    Pin every thread of C{pid} and of its descendants to C{cpu}.
    """
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), {cpu})
                with contextlib.suppress(OSError), open(f"/proc/{p}/task/{tid}/children") as f:
                    pids.extend(int(c) for c in f.read().split())
        except OSError:
            pass


def icpProbe(address: tuple[str, int], url: str, timeout: float = 2.0) -> Optional[int]:
    """
    Send one ICPv2 QUERY from L{LOAD_SOURCE}; the reply's opcode, or None.
    """
    from icpmesh import icp

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOAD_SOURCE, 0))
        s.settimeout(timeout)
        s.sendto(icp.encode(icp.query(4242, url)), address)
        try:
            data, sender = s.recvfrom(65536)
        except socket.timeout:
            return None
    return data[0]


def waitForICP(address: tuple[str, int], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if icpProbe(address, "http://127.0.0.1/icp-bench-probe", timeout=0.5) is not None:
            return
    raise RuntimeError(f"{what} does not answer ICP on {address[0]}:{address[1]}")


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    return (min(values), statistics.median(values), max(values))


def compileTool(workdir: str) -> str:
    """
    Compile C{icpload.c} with C{gcc -O2}; the path of the binary.
    """
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise SystemExit("icp_bench: gcc is needed to build the load generator")
    binary = os.path.join(workdir, "icpload")
    subprocess.run(
        [gcc, "-O2", "-Wall", "-o", binary, os.path.join(HERE, "icpload.c")],
        check=True,
    )
    return binary


def runLoad(
    tool: str,
    address: tuple[str, int],
    mode: str,
    seconds: float,
    window: int,
    hitFile: str,
    missPrefix: str,
    warmup: float,
) -> dict[str, float]:
    """
    One run of the load generator (on L{LOAD_CPU}); its figures.
    """
    command = [
        "taskset", "-c", str(LOAD_CPU), tool,
        "-s", LOAD_SOURCE, "-d", f"{address[0]}:{address[1]}",
        "-t", str(seconds), "-W", str(warmup), "-w", str(window),
        "-m", mode, "-H", hitFile, "-p", missPrefix,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + warmup + 60)
    if done.returncode != 0:
        raise RuntimeError(f"icpload failed ({done.returncode}): {done.stderr.strip()}")
    figures: dict[str, float] = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition("=")
        figures[key] = float(value)
    return figures


def mixProblem(mode: str, figures: dict[str, float]) -> Optional[str]:
    """
    Why a run's replies are not what its mix asked for, if they are not.
    """
    n = figures.get("measured", 0)
    if n <= 0:
        return "no replies"
    hit = figures.get("op_HIT", 0) / n
    miss = figures.get("op_MISS", 0) / n
    expected = {"hit": (1.0, 0.0), "miss": (0.0, 1.0), "mix": (0.5, 0.5)}[mode]
    if abs(hit - expected[0]) > 0.01 or abs(miss - expected[1]) > 0.01:
        return f"{hit:.1%} HIT, {miss:.1%} MISS"
    if figures.get("lost", 0) > 0.001 * figures.get("sent", 1):
        return f"{figures['lost']:.0f} of {figures['sent']:.0f} queries lost"
    return None


def fetchAll(proxy: tuple[str, int], urls: Sequence[str]) -> None:
    """
    GET every URL through the HTTP proxy at C{proxy} (one persistent
    connection, reopened when the proxy closes it).
    """
    conn: Optional[http.client.HTTPConnection] = None
    for url in urls:
        for attempt in (1, 2):
            if conn is None:
                conn = http.client.HTTPConnection(proxy[0], proxy[1], timeout=30)
            try:
                conn.request("GET", url)
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    raise RuntimeError(f"GET {url} via {proxy}: HTTP {response.status}")
                if response.will_close:
                    conn.close()
                    conn = None
                break
            except (http.client.HTTPException, ConnectionError):
                if conn is not None:
                    conn.close()
                conn = None
                if attempt == 2:
                    raise
    if conn is not None:
        conn.close()


class Timer:
    """
    Times GETs through one proxy over a persistent connection.
    """

    def __init__(self, proxy: tuple[str, int]) -> None:
        self.proxy = proxy
        self.conn: Optional[http.client.HTTPConnection] = None

    def get(self, url: str) -> float:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.proxy[0], self.proxy[1], timeout=30)
            self.conn.connect()
        start = time.perf_counter()
        self.conn.request("GET", url)
        response = self.conn.getresponse()
        response.read()
        elapsed = time.perf_counter() - start
        if response.status != 200:
            raise RuntimeError(f"GET {url} via {self.proxy}: HTTP {response.status}")
        if response.will_close:
            self.close()
        return elapsed

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# -- servers ----------------------------------------------------------------------


class Server:
    """
    One server under test: a name, an ICP address, maybe an HTTP proxy.
    """

    def __init__(self, name: str, icp: tuple[str, int], http: Optional[tuple[str, int]], stop: Any) -> None:
        self.name = name
        self.icp = icp
        self.http = http
        self.stop = stop


def startNode(
    stack: contextlib.ExitStack, workdir: str, address: str, config: str, python: Optional[str]
) -> Server:
    """
    Start C{twistd -n icpmesh} pinned to L{SERVER_CPU}.
    """
    from tests import nodelab

    if python is not None:
        # Another interpreter (a PyPy venv, say): its own twistd script.
        twistd = os.path.join(os.path.dirname(python), "twistd")
        command = [twistd] if os.path.exists(twistd) else [python, "-m", "twisted"]
        nodelab.twistdCommand = lambda: command
    with onCPU(SERVER_CPU):
        node = nodelab.Node(workdir, address=address, config=config)
    stack.callback(node.stop)
    pinTree(node.process.pid, SERVER_CPU)
    server = Server("icpmesh", (address, node.icpPort), (address, node.httpPort), node.stop)
    server.node = node  # type: ignore[attr-defined]
    waitForICP(server.icp, "icpmesh")
    return server


def startSquid(stack: contextlib.ExitStack, address: str, extraConfig: str, daemonLog: bool) -> Server:
    """
    Start Squid 5.7 with C{tests/squidlab.py}, pinned to L{SERVER_CPU}.

    @param daemonLog: write the access log through Squid's log daemon (its
        default, and its fastest way) instead of squidlab's unbuffered
        C{stdio:} log.
    """
    from tests import squidlab

    class BenchSquid(squidlab.SquidInstance):
        def config(self) -> str:
            text = super().config()
            if daemonLog:
                text = text.replace("access_log stdio:", "access_log daemon:")
            return text

    squid = BenchSquid(address=address, extraConfig=extraConfig)
    with onCPU(SERVER_CPU):
        squid.start()
    stack.callback(squid.stop)
    pinTree(squid.process.pid, SERVER_CPU)  # type: ignore[union-attr]
    server = Server("squid", squid.icpAddress, (address, squid.httpPort), squid.stop)
    server.squid = squid  # type: ignore[attr-defined]
    waitForICP(server.icp, "squid")
    return server


def startBare(stack: contextlib.ExitStack, address: str, hitFile: str, python: Optional[str]) -> Server:
    """
    Start the bare Twisted responder (L{serveBare}) pinned to L{SERVER_CPU}.
    """
    from tests.nodelab import checkoutEnv, freePort

    port = freePort(socket.SOCK_DGRAM, address)
    with onCPU(SERVER_CPU):
        process = subprocess.Popen(
            [python or sys.executable, os.path.abspath(__file__), "--serve-bare", address, str(port), hitFile],
            env=checkoutEnv(),
        )

    def stop() -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    stack.callback(stop)
    server = Server("bare", (address, port), None, stop)
    waitForICP(server.icp, "the bare responder")
    return server


def bareResponder(hits: set[bytes]) -> Any:
    """
    The least a Twisted C{DatagramProtocol} can do to answer ICP: it checks
    the framing of a version 2 QUERY with a few byte comparisons, answers
    HIT if its URL is in C{hits} and MISS otherwise, and sends the reply
    with C{transport.write}.  Anything else is dropped.
    """
    import struct

    from twisted.internet.protocol import DatagramProtocol

    start = struct.Struct("!BBH")
    zeros = bytes(12)

    class Bare(DatagramProtocol):
        def datagramReceived(self, data: bytes, sender: Any) -> None:
            size = len(data)
            if size > 24 and data[0] == 1 and data[1] == 2 and (data[2] << 8 | data[3]) == size \
                    and data.find(b"\0", 24) == size - 1:
                url = data[24:-1]
                self.transport.write(
                    start.pack(2 if url in hits else 3, 2, size - 4) + data[4:8] + zeros + url + b"\0",
                    sender,
                )

    return Bare()


def serveBare(address: str, port: int, hitFile: str) -> None:
    """
    The reference, L{bareResponder} for the URLs in C{hitFile}: no access
    control, freshness, counters or logging.  Runs until SIGTERM (or an
    hour).
    """
    from twisted.internet import reactor

    with open(hitFile) as f:
        hits = {line.strip().encode("latin-1") for line in f if line.strip()}
    reactor.listenUDP(port, bareResponder(hits), interface=address)  # type: ignore[attr-defined]
    reactor.callLater(3600, reactor.stop)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


# -- part 1: reply rate ---------------------------------------------------------------


def nodeConfig(workdir: str, logICP: bool, extra: str = "") -> str:
    lines = ["store memory max-size=256MB", "visible_hostname icpmesh-bench"]
    if logICP:
        lines += [f"access_log {os.path.join(workdir, 'access.log')}", "log_icp_queries on"]
    return "\n".join(lines) + "\n" + extra


def squidConfig(logICP: bool, extra: str = "") -> str:
    lines = ["cache_mem 256 MB", "log_icp_queries " + ("on" if logICP else "off")]
    return "\n".join(lines) + "\n" + extra


def rateBenchmark(args: argparse.Namespace, stack: contextlib.ExitStack, tool: str, origin: Any, tmp: str) -> dict[str, Any]:
    hitURLs = [origin.url(f"/bench/hit/{i:05d}") for i in range(args.hits)]
    hitFile = os.path.join(tmp, "hits.txt")
    with open(hitFile, "w") as f:
        f.write("\n".join(hitURLs) + "\n")

    logModes = {"both": (True, False), "on": (True,), "off": (False,)}[args.icp_log]
    servers: dict[bool, list[Server]] = {}
    addresses = iter(f"127.0.0.{i}" for i in range(2, 10))
    for logICP in logModes:
        group: list[Server] = []
        label = "on" if logICP else "off"
        print(f"starting icpmesh and Squid (ICP logging {label}) ...", flush=True)
        nodeDir = os.path.join(tmp, f"node-log-{label}")
        group.append(startNode(stack, nodeDir, next(addresses), nodeConfig(nodeDir, logICP), args.python))
        group.append(startSquid(stack, next(addresses), squidConfig(logICP), daemonLog=True))
        if not logICP and not args.no_bare:
            group.append(startBare(stack, next(addresses), hitFile, args.python))
        for server in group:
            if server.http is not None:
                print(f"  caching {len(hitURLs)} URLs in {server.name} through HTTP ...", flush=True)
                fetchAll(server.http, hitURLs)
            check = runLoad(tool, server.icp, "hit", 0.5, 8, hitFile, origin.url("/bench/check/"), 0.1)
            problem = mixProblem("hit", check)
            if problem is not None:
                raise SystemExit(
                    f"icp_bench: {server.name} does not answer HIT for the URLs fetched "
                    f"through it ({problem}); is its HTTP caching working?"
                )
        servers[logICP] = group

    # Warm up every server once on the mixed load, unmeasured: connection
    # and URL tables, and the JIT on PyPy.
    missRun = 0
    if args.prewarm > 0:
        print(f"warming up ({args.prewarm:g} s per server) ...", flush=True)
        for logICP in logModes:
            for server in servers[logICP]:
                missRun += 1
                runLoad(tool, server.icp, "mix", args.prewarm, args.window, hitFile,
                        origin.url(f"/bench/miss/{missRun}/"), 0.0)

    runs: list[dict[str, Any]] = []
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds} ...", flush=True)
        for logICP in logModes:
            group = servers[logICP]
            # Take turns: the order rotates every round.
            shift = r % len(group)
            order = group[shift:] + group[:shift]
            for mix in MIXES:
                for server in order:
                    missRun += 1
                    prefix = origin.url(f"/bench/miss/{missRun}/")
                    loaded = runLoad(tool, server.icp, mix, args.seconds, args.window, hitFile, prefix, args.warmup)
                    missRun += 1
                    prefix = origin.url(f"/bench/miss/{missRun}/")
                    idle = runLoad(tool, server.icp, mix, args.idle_seconds, 1, hitFile, prefix, 0.2)
                    problem = mixProblem(mix, loaded) or mixProblem(mix, idle)
                    runs.append(
                        dict(round=r, log=logICP, mix=mix, server=server.name,
                             loaded=loaded, idle=idle, problem=problem)
                    )
                    flag = f"  !! {problem}" if problem else ""
                    print(
                        f"  log {'on ' if logICP else 'off'} {mix:4} {server.name:8} "
                        f"{loaded['qps']:9.0f} q/s  p50 {loaded['p50_us']:6.0f} us  "
                        f"p99 {loaded['p99_us']:6.0f} us  idle p50 {idle['p50_us']:4.0f} us{flag}",
                        flush=True,
                    )
    return dict(runs=runs, logModes=list(logModes))


def printRate(result: dict[str, Any], args: argparse.Namespace) -> None:
    runs = result["runs"]
    for logICP in result["logModes"]:
        print()
        print(
            f"ICP reply path, ICP query logging {'on' if logICP else 'off'}: "
            f"{args.rounds} rounds x {args.seconds:g} s per server and mix, window {args.window}"
        )
        print(
            f"{'mix':5} {'server':8} {'q/s min':>9} {'median':>9} {'max':>9}   "
            f"{'p50 us':>7} {'p99 us':>7}   {'idle p50':>8} {'idle p99':>8}"
        )
        for mix in MIXES:
            names: list[str] = []
            for run in runs:
                if run["log"] == logICP and run["mix"] == mix and run["server"] not in names:
                    names.append(run["server"])
            for name in names:
                mine = [x for x in runs if x["log"] == logICP and x["mix"] == mix and x["server"] == name]
                qps = spread([x["loaded"]["qps"] for x in mine])
                p50 = statistics.median(x["loaded"]["p50_us"] for x in mine)
                p99 = statistics.median(x["loaded"]["p99_us"] for x in mine)
                i50 = statistics.median(x["idle"]["p50_us"] for x in mine)
                i99 = statistics.median(x["idle"]["p99_us"] for x in mine)
                bad = sum(1 for x in mine if x["problem"])
                note = f"  ({bad} run(s) flagged)" if bad else ""
                print(
                    f"{mix:5} {name:8} {qps[0]:9.0f} {qps[1]:9.0f} {qps[2]:9.0f}   "
                    f"{p50:7.0f} {p99:7.0f}   {i50:8.0f} {i99:8.0f}{note}"
                )
            for name in names:
                if name == "squid":
                    continue
                ratios = []
                for r in range(args.rounds):
                    a = [x for x in runs if x["round"] == r and x["log"] == logICP and x["mix"] == mix and x["server"] == name]
                    b = [x for x in runs if x["round"] == r and x["log"] == logICP and x["mix"] == mix and x["server"] == "squid"]
                    if a and b and b[0]["loaded"]["qps"] > 0:
                        ratios.append(a[0]["loaded"]["qps"] / b[0]["loaded"]["qps"])
                if ratios:
                    lo, med, hi = spread(ratios)
                    print(f"{mix:5} {name + '/squid':15} ratio {med:.2f}  (min {lo:.2f}, max {hi:.2f})")


# -- part 2: latency ICP adds to a miss -------------------------------------------------


def responderCount(responder: subprocess.Popen[str]) -> int:
    """
    Ask the fake neighbours how many queries they have answered so far.
    """
    assert responder.stdout is not None
    responder.send_signal(signal.SIGUSR1)
    line = responder.stdout.readline()
    if not line.startswith("queries="):
        raise RuntimeError(f"fake neighbours said {line!r}")
    return int(line.split("=", 1)[1])


def neighbourBenchmark(
    args: argparse.Namespace, stack: contextlib.ExitStack, tool: str, origin: Any, tmp: str
) -> dict[str, Any]:
    from tests.nodelab import freePort

    counts = sorted({int(n) for n in args.neighbours.split(",") if n.strip()})
    if not counts or counts[0] < 1 or counts[-1] > 200:
        raise SystemExit("icp_bench: --neighbours takes counts from 1 to 200")
    port = freePort(socket.SOCK_DGRAM, FAKE_NEIGHBOURS)
    # One process answers MISS on 127.0.1.1 .. 127.0.1.N, UDP and TCP.
    responder = subprocess.Popen(
        ["taskset", "-c", str(LOAD_CPU), tool, "-R", "-a", FAKE_NEIGHBOURS,
         "-n", str(counts[-1]), "-P", str(port), "-t", "3600"],
        stdout=subprocess.PIPE, text=True,
    )

    def stopResponder() -> None:
        if responder.poll() is None:
            responder.terminate()
            try:
                responder.wait(10)
            except subprocess.TimeoutExpired:
                responder.kill()
                responder.wait()

    stack.callback(stopResponder)
    assert responder.stdout is not None
    if responder.stdout.readline().strip() != "ready":
        raise RuntimeError("fake neighbours did not start")

    def peers(n: int, squid: bool) -> str:
        base = [int(x) for x in FAKE_NEIGHBOURS.split(".")]
        lines = []
        for i in range(n):
            host = ".".join(map(str, base[:3] + [base[3] + i]))
            lines.append(f"cache_peer {host} sibling {port} {port} name=fake{i + 1}")
        lines.append("icp_query_timeout 2000" if squid else "icp_query_timeout 2 seconds")
        return "\n".join(lines) + "\n"

    setups: list[tuple[str, int, Server]] = []
    print("starting icpmesh nodes and Squids with 0, " + ", ".join(map(str, counts)) + " neighbours ...", flush=True)
    for n in [0] + counts:
        workdir = os.path.join(tmp, f"nb-node-{n}")
        setups.append(("icpmesh", n, startNode(stack, workdir, "127.0.0.11", nodeConfig(workdir, False, peers(n, False) if n else ""), args.python)))
        if not args.no_squid_neighbours:
            setups.append(("squid", n, startSquid(stack, "127.0.0.12", squidConfig(False, peers(n, True) if n else ""), daemonLog=True)))
    timers = {id(server): Timer(server.http) for _, _, server in setups}  # type: ignore[arg-type]
    stack.callback(lambda: [t.close() for t in timers.values()])

    seq = 0

    def url() -> str:
        nonlocal seq
        seq += 1
        return origin.url(f"/bench/nb/{seq}")

    # Warm up (connections, Squid's first TCP probes of its neighbours),
    # and check that every request of a setup asks every neighbour.
    queries: dict[tuple[str, int], int] = {}
    checks = args.requests // 10 + 5
    for name, n, server in setups:
        for _ in range(3):
            timers[id(server)].get(url())
        before = responderCount(responder)
        for _ in range(checks):
            timers[id(server)].get(url())
        queries[(name, n)] = responderCount(responder) - before
    # Measure: the setups take turns request by request, so that drift in
    # the machine's speed touches them all alike.
    samples: dict[tuple[str, int], list[float]] = {}
    slow: dict[tuple[str, int], int] = {}
    names = sorted({name for name, _, _ in setups}, key=lambda s: s != "icpmesh")
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds} ...", flush=True)
        times: dict[tuple[str, int], list[float]] = {(name, n): [] for name, n, _ in setups}
        for i in range(args.requests):
            order = setups if (i + r) % 2 == 0 else setups[::-1]
            for name, n, server in order:
                times[(name, n)].append(timers[id(server)].get(url()))
        for key, values in times.items():
            slow[key] = slow.get(key, 0) + sum(1 for t in values if t > 1.0)
            samples.setdefault(key, []).append(statistics.median(values) * 1000)
    rows = []
    for name in names:
        for n in [0] + counts:
            key = (name, n)
            if key not in samples:
                continue
            base = samples[(name, 0)]
            added = [samples[key][r] - base[r] for r in range(args.rounds)]
            rows.append(
                dict(server=name, neighbours=n, medianMs=statistics.median(samples[key]),
                     addedMs=spread(added) if n else (0.0, 0.0, 0.0),
                     queriesPerRequest=queries[key] / checks,
                     slowRequests=slow[key])
            )
    return dict(rows=rows, requests=args.requests)


def printNeighbours(result: dict[str, Any], args: argparse.Namespace) -> None:
    print()
    print(
        f"Latency ICP adds to a miss (GET of an uncached URL through the proxy), "
        f"{result['requests']} requests x {args.rounds} rounds per setup"
    )
    print(f"{'server':8} {'neighbours':>10} {'median ms':>10} {'added ms (min / median / max over rounds)':>44} {'queries/req':>12}")
    for row in result["rows"]:
        lo, med, hi = row["addedMs"]
        extra = f"  ({row['slowRequests']} requests over 1 s)" if row["slowRequests"] else ""
        print(
            f"{row['server']:8} {row['neighbours']:10d} {row['medianMs']:10.2f} "
            f"{lo:14.2f} / {med:6.2f} / {hi:6.2f}{'':14} {row['queriesPerRequest']:12.2f}{extra}"
        )


# -- main ---------------------------------------------------------------------------------


def parseArgs(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of turns (default 3)")
    parser.add_argument("--window", type=int, default=64, help="queries outstanding (default 64)")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each run (default 0.5)")
    parser.add_argument("--idle-seconds", type=float, default=1.0, help="seconds of the unloaded latency run (default 1)")
    parser.add_argument("--prewarm", type=float, default=2.0,
                        help="unmeasured seconds of mixed load per server before the rounds (default 2)")
    parser.add_argument("--nice", type=int, default=-10,
                        help="nice value for this script and everything it starts, when root (default -10)")
    parser.add_argument("--hits", type=int, default=1000, help="URLs cached for the hit mix (default 1000)")
    parser.add_argument("--icp-log", choices=("both", "on", "off"), default="both",
                        help="measure with ICP query logging on, off, or both (default)")
    parser.add_argument("--no-bare", action="store_true", help="leave out the bare Twisted responder")
    parser.add_argument("--neighbours", default="1,8,64", help="neighbour counts for part 2 (default 1,8,64)")
    parser.add_argument("--requests", type=int, default=200, help="GETs per setup and round in part 2 (default 200)")
    parser.add_argument("--no-squid-neighbours", action="store_true", help="part 2 for icpmesh only")
    parser.add_argument("--skip-rate", action="store_true", help="skip part 1 (reply rate)")
    parser.add_argument("--skip-neighbours", action="store_true", help="skip part 2 (neighbours)")
    parser.add_argument("--python", default=None, help="interpreter for the icpmesh node (e.g. pypy3)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--serve-bare", nargs=3, metavar=("ADDRESS", "PORT", "HITFILE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (0 < args.seconds <= 600 and 1 <= args.rounds <= 50 and 1 <= args.window <= 4096):
        parser.error("--seconds must be in (0, 600], --rounds in [1, 50], --window in [1, 4096]")
    if not (0 <= args.prewarm <= 600 and -20 <= args.nice <= 19):
        parser.error("--prewarm must be in [0, 600] and --nice in [-20, 19]")
    if not (1 <= args.hits <= 100000 and 1 <= args.requests <= 100000):
        parser.error("--hits and --requests must be from 1 to 100000")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parseArgs(argv)
    if args.serve_bare:
        address, port, hitFile = args.serve_bare
        serveBare(address, int(port), hitFile)
        return 0
    if sys.platform != "linux" or len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("icp_bench: needs Linux and at least 2 CPUs (server on CPU 1, load on CPU 0)")
    if shutil.which("taskset") is None:
        raise SystemExit("icp_bench: needs taskset (util-linux)")
    from tests import squidlab

    try:
        squidlab.requireSquid()
    except Exception as e:
        raise SystemExit(f"icp_bench: {e}")

    # A signal ends the run through the same clean-up as an error.
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))
    os.sched_setaffinity(0, {LOAD_CPU})
    if os.geteuid() == 0 and args.nice:
        # Inherited by the servers and the load generator alike, so that
        # other jobs on the machine preempt them less often.
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)
    results: dict[str, Any] = dict(
        argv=sys.argv, python=args.python or sys.executable, squid=squidlab.requireSquid(),
        started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    )
    with contextlib.ExitStack() as stack:
        tmp = tempfile.mkdtemp(prefix="icpbench-")
        stack.callback(shutil.rmtree, tmp, True)
        tool = compileTool(tmp)
        from tests.nodelab import Origin

        origin = Origin(ORIGIN_ADDRESS)
        stack.callback(origin.stop)
        # http.server writes the headers and the body separately; without
        # TCP_NODELAY, Nagle holds the body back until the proxy's delayed
        # ACK (40 ms) on a persistent connection.  Real origins set it.
        origin.server.RequestHandlerClass.disable_nagle_algorithm = True
        if not args.skip_rate:
            results["rate"] = rateBenchmark(args, stack, tool, origin, tmp)
        if not args.skip_neighbours:
            results["neighbours"] = neighbourBenchmark(args, stack, tool, origin, tmp)
    if "rate" in results:
        printRate(results["rate"], args)
    if "neighbours" in results:
        printNeighbours(results["neighbours"], args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
