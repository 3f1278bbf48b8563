#!/usr/bin/env python3
"""
CPU cost of one HTTP cache hit, measured in-process.

An icpmesh node is built from a config like C{http_bench.py}'s (memory store,
no access log, the default access rules) with L{makeMeshService} on a
L{MemoryReactorClock}: nothing listens.  Objects are stored by sending real
misses through the proxy to an in-memory origin whose responses carry the
headers nginx sends.  Then hits are sent as raw request bytes into one
persistent C{HTTPChannel} of the node's C{Site}, one request per
C{dataReceived}, as C{wrk} sends them, and the response bytes go to a
transport that only counts them.  For comparison the same is done with
the bare C{twisted.web} leaf resource of C{http_bench.py}.

The figure is CPU time per request (C{time.process_time}), the best of
C{--repeats} runs of C{--requests} requests: on a machine shared with other
jobs the best run is the one least disturbed.  Every response is checked to
be complete (status 200, headers ending, C{Content-Length} bytes of body).

    python benchmarks/hit_path.py [--requests 20000] [--repeats 5] [--profile]

For instruction counts, which do not depend on other load at all, run one
server and one mix under callgrind twice with different C{--requests} and
divide the difference of the totals by the difference of the counts (this
cancels the set-up)::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python benchmarks/hit_path.py --repeats 1 --no-bare --mixes hit1k --requests 1000
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from http_bench import bareLeaf, originBody, quietSite  # noqa: E402
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.testing import MemoryReactorClock, StringTransport  # noqa: E402

ORIGIN = "127.0.0.1:8081"
SIZES = {"hit1k": 1024, "hit64k": 64 * 1024}
URLS = 100


class BufferingTransport(StringTransport):
    """
    A transport that buffers writes in a list, as a TCP transport does
    (C{doWrite} joins the list before C{send}).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.buffer: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not isinstance(data, bytes):
            raise TypeError("data must be bytes")
        if data:
            self.buffer.append(data)

    def writeSequence(self, seq: Any) -> None:
        for data in seq:
            if not isinstance(data, bytes):
                raise TypeError("data must be bytes")
        self.buffer.extend(seq)


class CountingTransport(BufferingTransport):
    """
    A L{BufferingTransport} that counts the bytes L{flush} sends, and keeps
    them only while C{keep} is set, so that the cost of storing output does
    not grow with it.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.count = 0
        self.keep = True
        self.kept: list[bytes] = []

    def flush(self) -> None:
        """
        What C{doWrite} does with the buffer: one C{bytes} to send.
        """
        data = b"".join(self.buffer)
        self.buffer = []
        self.count += len(data)
        if self.keep:
            self.kept.append(data)


def idleReactor() -> Any:
    """
    A real reactor that is never run: its C{callLater} and C{seconds} cost
    what they cost in a running node (a L{MemoryReactorClock} sorts its
    calls on every C{callLater}), and nothing it schedules ever runs.
    """
    from twisted.internet.selectreactor import SelectReactor

    return SelectReactor()


def nodeSite(size: int) -> Any:
    """
    The node's C{Site}, with C{URLS} objects of C{size} bytes stored.
    """
    from icpmesh.service import makeMeshService
    from icpmesh.testing.origin import FakeOrigin, InMemoryUpstream

    reactor = idleReactor()
    clock = MemoryReactorClock()
    clock.advance(reactor.seconds())
    with tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False) as f:
        f.write("\n".join([
            "store memory max-size=2048MB max-object-size=8MB",
            "visible_hostname icpmesh-bench",
            "access_log none",
            "http_port 127.0.0.1:0",
            "icp_port 0",
            "",
        ]))
    try:
        node = makeMeshService(f.name, reactor=reactor)
    finally:
        os.unlink(f.name)
    origin = FakeOrigin(reactor=clock)
    content = originBody(size)
    for i in range(URLS):
        origin.setResponse(
            f"/obj/{size}/{i}",
            content,
            headers=[
                ("Server", "nginx/1.22.1"),
                ("Content-Type", "text/plain"),
                ("Last-Modified", "Mon, 23 Nov 2026 10:00:00 GMT"),
                ("ETag", f'"6561f0a0-{size:x}"'),
                ("Cache-Control", "max-age=36000"),
                ("Accept-Ranges", "bytes"),
            ],
        )
    upstream = InMemoryUpstream(origin)
    node.proxy.upstream = upstream
    site = node.site
    for i in range(URLS):
        channel, transport = connect(site)
        channel.dataReceived(request(size, i))
        for _ in range(5):
            clock.advance(0)
            upstream.flush()
    return site


def bareSite(size: int) -> Any:
    """
    C{http_bench.py}'s bare leaf resource over the same objects.
    """
    content = originBody(size)
    table = {
        f"http://{ORIGIN}/obj/{size}/{i}".encode(): (
            [(b"Content-Type", [b"text/plain"]), (b"Cache-Control", [b"max-age=36000"])],
            content,
        )
        for i in range(URLS)
    }
    return quietSite(bareLeaf(table), reactor=idleReactor())


def request(size: int, i: int) -> bytes:
    return (
        f"GET http://{ORIGIN}/obj/{size}/{i} HTTP/1.1\r\nHost: {ORIGIN}\r\n\r\n"
    ).encode()


def connect(site: Any) -> tuple[Any, CountingTransport]:
    address = IPv4Address("TCP", "127.0.0.1", 40000)
    channel = site.buildProtocol(address)
    transport = CountingTransport(
        peerAddress=address, hostAddress=IPv4Address("TCP", "127.0.0.1", 3128)
    )
    channel.makeConnection(transport)
    return channel, transport


def run(site: Any, size: int, n: int, hitCheck: bool) -> float:
    """
    Send C{n} hits down one connection; return CPU seconds per request.
    """
    requests = [request(size, i % URLS) for i in range(n)]
    channel, transport = connect(site)
    # Check one response in full first.
    channel.dataReceived(requests[0])
    transport.flush()
    response = b"".join(transport.kept)
    head, _, content = response.partition(b"\r\n\r\n")
    if (
        not head.startswith(b"HTTP/1.1 200 ")
        or (hitCheck and b"HIT from" not in head)
        or f"\r\nContent-Length: {size}\r\n".encode().lower() not in head.lower() + b"\r\n"
        or content != originBody(size)
    ):
        raise SystemExit(f"unexpected response: {head!r}")
    expected = transport.count
    transport.count = 0
    transport.keep = False
    dataReceived: Callable[[bytes], None] = channel.dataReceived
    flush = transport.flush
    start = time.process_time()
    for data in requests:
        dataReceived(data)
        flush()
    elapsed = time.process_time() - start
    if transport.count != expected * n:
        raise SystemExit(f"{transport.count} bytes sent, expected {expected * n}")
    return elapsed / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000, help="hits per run (default 20000)")
    parser.add_argument("--repeats", type=int, default=5, help="runs; the best is shown (default 5)")
    parser.add_argument("--mixes", default="hit1k,hit64k", help="from hit1k,hit64k")
    parser.add_argument("--no-bare", action="store_true", help="leave out the bare leaf resource")
    parser.add_argument("--no-icpmesh", action="store_true", help="leave out the icpmesh node")
    parser.add_argument("--profile", action="store_true",
                        help="also print a cProfile of one icpmesh run per mix")
    args = parser.parse_args()
    print(f"Python {sys.version.split()[0]}; best of {args.repeats} x {args.requests} hits, "
          "CPU us per request", flush=True)
    for mix in args.mixes.split(","):
        size = SIZES[mix]
        sites = [] if args.no_icpmesh else [("icpmesh", nodeSite(size), True)]
        if not args.no_bare:
            sites.append(("bare", bareSite(size), False))
        best = {}
        for name, site, hitCheck in sites:
            run(site, size, 200, hitCheck)  # warm up
            best[name] = min(run(site, size, args.requests, hitCheck) for _ in range(args.repeats))
            print(f"{mix:7} {name:8} {best[name] * 1e6:8.1f} us", flush=True)
        if "bare" in best and "icpmesh" in best:
            print(f"{mix:7} icpmesh/bare cost ratio {best['icpmesh'] / best['bare']:.2f}")
        if args.profile and not args.no_icpmesh:
            profiler = cProfile.Profile()
            profiler.enable()
            run(sites[0][1], size, args.requests, True)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
