"""
Peer selection cost per request as the number of neighbours grows.

For 1, 8, 64 and 256 neighbours, prints the wall-clock microseconds one
C{selectRoutes} call costs for every built-in selector:

  - C{round-robin}, C{weighted-round-robin}, C{first-up-parent}: one scan
    of the parents;
  - C{sourcehash}: a new client address each request (cold), and one
    client over and over (its ranking remembered);
  - C{carp}: a new URL each request (cold: Squid's quirk hashes the URL
    once per member, so this grows with members x URL length), and the
    same URL again (warm: the remembered ranking);
  - C{icp} and C{rounds}: a whole ICP query round over
    L{icpmesh.testing.FakeUDPReactor} with a L{FakeICPNeighbour} per
    neighbour answering MISS.  "all" is the wall-clock time of the round:
    the node's work plus the fake network (whose clock keeps its calls in a
    sorted list, so it grows faster than linearly) and every fake
    neighbour decoding and answering.  "node's share" counts only the
    selector call and the node's handling of each reply (decoding,
    matching, liveness, ranking), less the fake transport's delivery of
    what the node sends.  C{rounds} puts half the neighbours in round 2, so
    both rounds run.

Usage::

    python benchmarks/selector_scale.py [--sizes 1,8,64,256] [--requests 2000]

A script that prints figures, not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.task import Clock  # noqa: E402

from icpmesh import icp  # noqa: E402
from icpmesh.config import parseConfig  # noqa: E402
from icpmesh.interfaces import AccessRequest  # noqa: E402
from icpmesh.neighbours import Neighbour  # noqa: E402
from icpmesh.protocol import ICPProtocol  # noqa: E402
from icpmesh.querier import ICPClient  # noqa: E402
from icpmesh.selection import icpSelectorPlugin  # noqa: E402
from icpmesh.selectors import (  # noqa: E402
    carpSelectorPlugin,
    firstUpSelectorPlugin,
    roundsSelectorPlugin,
    rrSelectorPlugin,
    sourcehashSelectorPlugin,
    wrrSelectorPlugin,
)
from icpmesh.testing import FakeICPNeighbour, FakeUDPReactor  # noqa: E402

URL = "http://www.example.com/images/2024/banner-{}.png"


def address(i: int) -> str:
    return f"127.{10 + i // 250}.{(i // 250) % 250}.{i % 250 + 1}"


def meshText(size: int, plugin: Any, icpPort: int = 0, rounds: bool = False) -> str:
    lines = []
    for i in range(size):
        extra = f" weight={i % 3 + 1}"
        if rounds and i >= size // 2:
            extra += " round=2"
        lines.append(f"cache_peer {address(i)} parent 3128 {icpPort} name=n{i}{extra}\n")
    return "".join(lines) + f"selector {plugin.name}\nicp_query_timeout 50ms\n"


def timeIt(count: int, call: Callable[[int], Any]) -> float:
    """
    Microseconds per call of C{call(i)}, i in range(count).
    """
    start = time.perf_counter()
    for i in range(count):
        call(i)
    return (time.perf_counter() - start) / count * 1e6


def localSelector(size: int, plugin: Any) -> tuple[Any, list[Neighbour]]:
    reactor = Clock()
    config = parseConfig(meshText(size, plugin), "bench")
    neighbours = [Neighbour(c, reactor=reactor) for c in config.neighbours]
    for i, n in enumerate(neighbours):
        n.rtt = 0.010 + 0.001 * (i % 7)
    return plugin.selectorFromConfig(config.plugins["selector"], reactor), neighbours


def benchLocal(size: int, plugin: Any, requests: int, vary: str) -> float:
    selector, neighbours = localSelector(size, plugin)
    if vary == "url":
        reqs = [AccessRequest.fromURL("10.0.0.1", "GET", URL.format(i)) for i in range(requests)]
    elif vary == "client":
        reqs = [
            AccessRequest.fromURL(f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}", "GET", URL.format(0))
            for i in range(requests)
        ]
    else:
        reqs = [AccessRequest.fromURL("10.0.0.1", "GET", URL.format(0))] * requests
    selector.selectRoutes(reqs[0], neighbours, None)
    return timeIt(requests, lambda i: selector.selectRoutes(reqs[i], neighbours, None))


class Stopwatch:
    """
    Wraps callables and adds up the wall-clock time spent in them.
    """

    def __init__(self) -> None:
        self.total = 0.0

    def wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kw: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kw)
            finally:
                self.total += time.perf_counter() - start

        return timed


def benchFanOut(size: int, plugin: Any, requests: int) -> tuple[float, float]:
    """
    @return: microseconds per request in all (fake network and fake
        neighbours included), and the node's own share: the selector call
        and the node's handling of each reply, less the time the fake
        transport spends delivering what the node writes.
    """
    reactor = FakeUDPReactor(latency=0.001)
    protocol = ICPProtocol(None, reactor=reactor)
    port = reactor.listenUDP(3130, protocol, interface="127.0.0.1")
    client = ICPClient(protocol, reactor=reactor, timeout=0.05)
    config = parseConfig(meshText(size, plugin, icpPort=3130, rounds=True), "bench")
    neighbours = [Neighbour(c, reactor=reactor) for c in config.neighbours]
    for i in range(size):
        FakeICPNeighbour(reactor, (address(i), 3130), icp.Opcode.MISS)
    selector = plugin.selectorFromConfig(config.plugins["selector"], reactor)
    reqs = [AccessRequest.fromURL("10.0.0.1", "GET", URL.format(i)) for i in range(requests)]
    node, network = Stopwatch(), Stopwatch()
    select = node.wrap(selector.selectRoutes)
    protocol.datagramReceived = node.wrap(protocol.datagramReceived)  # type: ignore[method-assign]
    port.write = network.wrap(port.write)  # type: ignore[method-assign]

    def one(i: int) -> None:
        done: list[Any] = []
        d = select(reqs[i], neighbours, client)
        d.addBoth(done.append)
        while not done:
            reactor.advance(0.001)
        if not done[0] or not done[0][0].neighbour:
            raise RuntimeError(f"unexpected routes: {done[0]}")

    one(0)
    node.total = network.total = 0.0
    total = timeIt(requests, one)
    return total, (node.total - network.total) / requests * 1e6


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,8,64,256", help="neighbour counts, comma-separated")
    parser.add_argument("--requests", type=int, default=2000, help="requests per figure")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows: list[tuple[str, Callable[[int, int], float]]] = [
        ("round-robin", lambda n, r: benchLocal(n, rrSelectorPlugin, r, "none")),
        ("weighted-round-robin", lambda n, r: benchLocal(n, wrrSelectorPlugin, r, "none")),
        ("first-up-parent", lambda n, r: benchLocal(n, firstUpSelectorPlugin, r, "none")),
        ("sourcehash (new client)", lambda n, r: benchLocal(n, sourcehashSelectorPlugin, r, "client")),
        ("sourcehash (same client)", lambda n, r: benchLocal(n, sourcehashSelectorPlugin, r, "none")),
        ("carp (new URL)", lambda n, r: benchLocal(n, carpSelectorPlugin, max(50, r // (1 + n // 8)), "url")),
        ("carp (same URL)", lambda n, r: benchLocal(n, carpSelectorPlugin, r, "none")),
        ("icp fan-out: all", lambda n, r: fanOut(n, icpSelectorPlugin, r)[0]),
        ("icp fan-out: node's share", lambda n, r: fanOut(n, icpSelectorPlugin, r)[1]),
        ("rounds (2 rounds): all", lambda n, r: fanOut(n, roundsSelectorPlugin, r)[0]),
        ("rounds (2 rounds): node's share", lambda n, r: fanOut(n, roundsSelectorPlugin, r)[1]),
    ]
    measured: dict[tuple[str, int], tuple[float, float]] = {}

    def fanOut(n: int, plugin: Any, r: int) -> tuple[float, float]:
        key = (plugin.name, n)
        if key not in measured:
            measured[key] = benchFanOut(n, plugin, max(20, r // (1 + n // 4)))
        return measured[key]

    width = max(len(name) for name, _ in rows)
    print(f"selectRoutes cost per request, microseconds (Python {sys.version.split()[0]})")
    print(f"{'selector':<{width}} " + " ".join(f"{n:>10}" for n in sizes))
    for name, bench in rows:
        figures = []
        for n in sizes:
            figures.append(f"{bench(n, args.requests):10.1f}")
        print(f"{name:<{width}} " + " ".join(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
