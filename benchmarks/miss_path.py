#!/usr/bin/env python3
"""
CPU cost of one HTTP cache miss, measured in-process.

An icpmesh node is built from a config like C{http_bench.py}'s (memory
store, no access log unless C{--access-log}, the default access rules and
the default C{icp} selector with no neighbours) with L{makeMeshService}.
Its upstream is the node's real L{icpmesh.proxy.Upstream} (an C{Agent} over
a persistent L{icpmesh.upstreamclient.UpstreamConnectionPool}); only its
connections are in memory: the reactor is a real one that is never run,
except that C{connectTCP} wires the client to an origin protocol in this
process.  The origin answers every request at once with the same
prebuilt response (1 KiB, C{Cache-Control: max-age=3600}, nginx's
headers), so its own cost is a buffer search and a write.

Misses are sent as raw request bytes down one persistent client
connection of the node's C{Site}, one request per C{dataReceived}, each
for a URL never asked before, as C{http_bench.py --mixes miss} does.  After
each, the bytes written on the in-memory connections are carried across
(joined once per turn, as C{doWrite} joins a TCP transport's buffer) until
nothing moves, and the reactor's due calls run (C{runUntilCurrent}, what
a running reactor does between reads).

For comparison the same is done with the bare forwarder of
C{http_bench.py} (a C{twisted.web} leaf resource forwarding with a plain
persistent C{Agent} pool, no cache, no access control, no C{Via}).

The figure is CPU time per miss (C{time.process_time}), the best of
C{--repeats} runs.  Every response is checked: status 200, C{X-Cache: MISS}
for the node, C{Content-Length} and the whole body; and every miss must
have reached the origin, over one upstream connection.

    python benchmarks/miss_path.py [--requests 5000] [--repeats 5] [--profile]

For instruction counts, which do not depend on other load at all, run one
server under callgrind at two values of C{--requests} and divide the
difference of the totals by the difference of the counts (this cancels the
set-up)::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python benchmarks/miss_path.py --repeats 1 --no-bare --requests 1000
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.protocol import Protocol  # noqa: E402
from twisted.internet.selectreactor import SelectReactor  # noqa: E402
from hit_path import BufferingTransport  # noqa: E402
from http_bench import bareForwarder, originBody, quietSite  # noqa: E402

ORIGIN = "127.0.0.1:8081"
SIZE = 1024


def body(size: int = SIZE) -> bytes:
    return originBody(size)


#: What the origin sends for every request: nginx's headers, as
#: C{http_bench.py}'s origin sends them for the miss load.
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Server: nginx/1.22.1\r\n"
    b"Date: Tue, 24 Nov 2026 05:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: %d\r\n"
    b"Last-Modified: Mon, 23 Nov 2026 10:00:00 GMT\r\n"
    b"Connection: keep-alive\r\n"
    b'ETag: "6561f0a0-400"\r\n'
    b"Cache-Control: max-age=3600\r\n"
    b"Accept-Ranges: bytes\r\n"
    b"\r\n" % (SIZE,)
) + body()


class PipeTransport(BufferingTransport):
    """
    One end of an in-memory connection: writes are buffered in a list, as a
    TCP transport buffers them, and L{Pipe.pump} joins and delivers them.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.peer: Any = None
        self.aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True

    def loseConnection(self) -> None:
        self.disconnecting = True


class Origin(Protocol):
    """
    Answers every request (a header section without a body) with
    L{RESPONSE}.
    """

    requests = 0

    def connectionMade(self) -> None:
        self.pending = b""

    def dataReceived(self, data: bytes) -> None:
        data = self.pending + data
        while True:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                break
            data = data[end + 4:]
            Origin.requests += 1
            self.transport.write(RESPONSE)
        self.pending = data


class BenchReactor(SelectReactor):
    """
    A real reactor that is never run: its C{callLater} and C{seconds} cost
    what they cost in a running node, and L{connectTCP} connects the client
    factory to an L{Origin} in memory (the connection is made at once).
    """

    def __init__(self) -> None:
        super().__init__()
        self.pipes: list[tuple[PipeTransport, Protocol, PipeTransport, Protocol]] = []

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = 30,
                   bindAddress: Any = None) -> Any:
        local = IPv4Address("TCP", "127.0.0.1", 50000 + len(self.pipes))
        remote = IPv4Address("TCP", host, port)
        client = factory.buildProtocol(remote)
        server = Origin()
        clientTransport = PipeTransport(hostAddress=local, peerAddress=remote)
        serverTransport = PipeTransport(hostAddress=remote, peerAddress=local)
        clientTransport.protocol = client
        serverTransport.protocol = server
        self.pipes.append((clientTransport, client, serverTransport, server))
        server.makeConnection(serverTransport)
        client.makeConnection(clientTransport)

        class Connector:
            def stopConnecting(self) -> None:
                pass

            def disconnect(self) -> None:
                pass

            def getDestination(self) -> Any:
                return remote

        return Connector()

    def pump(self) -> None:
        """
        Carry buffered bytes both ways until nothing moves.
        """
        moved = True
        while moved:
            moved = False
            for clientTransport, client, serverTransport, server in self.pipes:
                if clientTransport.buffer:
                    data = b"".join(clientTransport.buffer)
                    clientTransport.buffer = []
                    server.dataReceived(data)
                    moved = True
                if serverTransport.buffer:
                    data = b"".join(serverTransport.buffer)
                    serverTransport.buffer = []
                    client.dataReceived(data)
                    moved = True


class ClientTransport(PipeTransport):
    """
    The downstream client's connection: counts what the server sends, and
    keeps it only while C{keep} is set.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.count = 0
        self.keep = True
        self.kept: list[bytes] = []

    def flush(self) -> None:
        data = b"".join(self.buffer)
        self.buffer = []
        self.count += len(data)
        if self.keep:
            self.kept.append(data)


def nodeSite(reactor: BenchReactor, accessLog: Optional[str]) -> tuple[Any, Any]:
    """
    The node's C{Site} and proxy resource, with the node's own L{Upstream}
    on C{reactor}.
    """
    from icpmesh.proxy import Upstream
    from icpmesh.service import makeMeshService

    with tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False) as f:
        f.write("\n".join([
            "store memory max-size=2048MB max-object-size=8MB",
            "visible_hostname icpmesh-bench",
            f"access_log {accessLog}" if accessLog else "access_log none",
            "http_port 127.0.0.1:0",
            "icp_port 0",
            "",
        ]))
    try:
        node = makeMeshService(f.name, reactor=reactor)
    finally:
        os.unlink(f.name)
    node.proxy.upstream = Upstream(reactor)
    if accessLog:
        log = node.proxy.accessLog
        log._file = open(accessLog, "a", encoding="utf-8", buffering=1 << 16)
    return node.site, node.proxy


def bareSite(reactor: BenchReactor) -> Any:
    """
    C{http_bench.py}'s bare forwarder.
    """
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.web.client import Agent, HTTPConnectionPool

    class Endpoints:
        # http_bench.py's forwarder uses Agent's own endpoints (a
        # HostnameEndpoint, whose lookup needs a running reactor); the
        # connection is made once and reused, so per miss this is the same.
        def endpointForURI(self, uri: Any) -> Any:
            return TCP4ClientEndpoint(reactor, uri.host.decode(), uri.port)

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 256
    agent = Agent.usingEndpointFactory(reactor, Endpoints(), pool=pool)
    return quietSite(bareForwarder(agent), reactor=reactor)


class Bench:
    """
    One server (node or bare) on its own reactor, and the client
    connection the misses go down.
    """

    def __init__(self, name: str, accessLog: Optional[str] = None) -> None:
        self.name = name
        self.reactor = BenchReactor()
        self.proxy = None
        if name == "icpmesh":
            self.site, self.proxy = nodeSite(self.reactor, accessLog)
        else:
            self.site = bareSite(self.reactor)
        address = IPv4Address("TCP", "127.0.0.1", 40000)
        self.channel = self.site.buildProtocol(address)
        self.transport = ClientTransport(
            peerAddress=address, hostAddress=IPv4Address("TCP", "127.0.0.1", 3128)
        )
        self.channel.makeConnection(self.transport)
        self.serial = 0

    def requests(self, n: int) -> list[bytes]:
        first = self.serial
        self.serial += n
        return [
            f"GET http://{ORIGIN}/miss/{self.name}/{i} HTTP/1.1\r\nHost: {ORIGIN}\r\n"
            "User-Agent: wrk\r\n\r\n".encode()
            for i in range(first, first + n)
        ]

    def check(self) -> int:
        """
        Send one miss and check its response in full; return its size.
        """
        transport = self.transport
        transport.keep = True
        transport.kept = []
        transport.count = 0
        self.one(self.requests(1)[0])
        response = b"".join(transport.kept)
        head, _, content = response.partition(b"\r\n\r\n")
        lowered = head.lower() + b"\r\n"
        if (
            not head.startswith(b"HTTP/1.1 200 ")
            or (self.name == "icpmesh" and b"\r\nx-cache: miss from" not in lowered)
            or f"\r\ncontent-length: {SIZE}\r\n".encode() not in lowered
            or content != body()
        ):
            raise SystemExit(f"{self.name}: unexpected response: {response[:600]!r}")
        transport.keep = False
        return transport.count

    def one(self, data: bytes) -> None:
        self.channel.dataReceived(data)
        self.reactor.pump()
        self.transport.flush()
        self.reactor.runUntilCurrent()

    def run(self, n: int) -> float:
        """
        Send C{n} misses; return CPU seconds per miss.
        """
        expected = self.check()
        requests = self.requests(n)
        before = Origin.requests
        transport = self.transport
        transport.count = 0
        one = self.one
        start = time.process_time()
        for data in requests:
            one(data)
        elapsed = time.process_time() - start
        if transport.count != expected * n:
            raise SystemExit(f"{self.name}: {transport.count} bytes sent, expected {expected * n}")
        if Origin.requests - before != n:
            raise SystemExit(f"{self.name}: {Origin.requests - before} origin requests, expected {n}")
        if len(self.reactor.pipes) != 1:
            raise SystemExit(f"{self.name}: {len(self.reactor.pipes)} upstream connections, expected 1")
        return elapsed / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000, help="misses per run (default 5000)")
    parser.add_argument("--repeats", type=int, default=5, help="runs; the best is shown (default 5)")
    parser.add_argument("--no-bare", action="store_true", help="leave out the bare forwarder")
    parser.add_argument("--no-icpmesh", action="store_true", help="leave out the icpmesh node")
    parser.add_argument("--access-log", metavar="FILE",
                        help="give the node this access log (default: none, as http_bench.py)")
    parser.add_argument("--profile", action="store_true",
                        help="also print a cProfile of one more icpmesh run")
    args = parser.parse_args()
    # As twistd icpmesh does (tuneGarbageCollector), for both.
    from icpmesh.service import tuneGarbageCollector

    tuneGarbageCollector()
    print(f"Python {sys.version.split()[0]}; best of {args.repeats} x {args.requests} misses, "
          "CPU us per miss", flush=True)
    benches = [] if args.no_icpmesh else [Bench("icpmesh", args.access_log)]
    if not args.no_bare:
        benches.append(Bench("bare"))
    best = {}
    for bench in benches:
        bench.run(200)  # warm up
        best[bench.name] = min(bench.run(args.requests) for _ in range(args.repeats))
        print(f"miss    {bench.name:8} {best[bench.name] * 1e6:8.1f} us", flush=True)
    if "bare" in best and "icpmesh" in best:
        print(f"miss    icpmesh/bare cost ratio {best['icpmesh'] / best['bare']:.2f}")
    if args.profile and not args.no_icpmesh:
        profiler = cProfile.Profile()
        profiler.enable()
        benches[0].run(args.requests)
        profiler.disable()
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(35)
        stats.sort_stats("cumulative").print_stats(60)


if __name__ == "__main__":
    main()
