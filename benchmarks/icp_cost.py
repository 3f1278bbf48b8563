#!/usr/bin/env python3
"""
CPU cost of the ICP reply path and of the querier, per query, measured in
process.

Unlike L{icp_bench}, which measures queries per second against Squid on a
quiet machine, this script measures CPU time (C{time.process_time}) spent
by this process, so its figures hold up while other jobs share the
machine.  It prints microseconds per query for:

  - C{hit}: a query for one of 1,000 URLs held fresh in the memory store;
  - C{miss}: a query for a URL never asked before (the responder's URL
    table is filled first, so the steady state is measured);
  - C{bare}: the bare Twisted responder of L{icp_bench} (framing check, a
    set lookup, C{transport.write}) on the same miss datagrams;
  - C{querier N}: one query round to N sibling neighbours through the
    C{icp} peer selector - sending N queries, then matching N MISS replies
    and ranking them - for N in C{--neighbours}.

The responder cases are measured at two levels:

  - C{dispatch}: the recorded datagrams are handed straight to the
    protocol's C{datagramReceived}, with a transport whose C{write} and
    C{socket.sendto} discard the reply: the Python cost of the policy and
    dispatch alone;
  - C{socket}: a real UDP port on loopback - the node's own port class
    (L{icpmesh.udpport.listenICP}), and for the bare responder Twisted's
    C{listenUDP} - is filled with a batch of queries from another socket,
    and its C{doRead} is called: the cost then includes the port's read
    loop and the C{recvfrom} and C{sendto} system calls.  The reactor is
    never run.

Each figure is the minimum over C{--repeat} runs.  For instruction counts,
which do not depend on the machine's load, run one case under callgrind
with two query counts and take the difference, less the same difference
with C{--levels none} (which builds the datagrams and does nothing else)::

    valgrind --tool=callgrind python benchmarks/icp_cost.py --only miss --levels dispatch --repeat 1 --warm 0 --queries 5000

(C{python} must be the interpreter itself, not a shell shim such as
pyenv's.)  At the socket level callgrind counts user-space instructions
only, not the kernel's work in the system calls.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
import time
from typing import Any, Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from icpmesh import icp  # noqa: E402

CLIENT = ("127.0.0.10", 40000)
HIT_URLS = 1000


class _DiscardSocket:
    """
    A socket whose C{sendto} does nothing.
    """

    @staticmethod
    def sendto(data: bytes, address: Any) -> int:
        return len(data)


class _DiscardTransport:
    """
    A UDP transport that discards what is written.
    """

    socket = _DiscardSocket()

    @staticmethod
    def write(data: bytes, address: Any = None) -> None:
        pass

    def getHost(self) -> Any:
        from twisted.internet.address import IPv4Address

        return IPv4Address("UDP", "127.0.0.2", 3130)


def queryDatagram(reqnum: int, url: str) -> bytes:
    return icp.encode(icp.query(reqnum, url))


def makeNode(reactor: Any) -> tuple[Any, Any]:
    """
    A node's ICP protocol and responder, built from a config like
    L{icp_bench}'s node (memory store, default access control, no log).
    """
    from icpmesh.config import parseConfig
    from icpmesh.plugins import resolvePlugins
    from icpmesh.protocol import ICPProtocol
    from icpmesh.server import FailureRatio, ICPResponder
    from icpmesh.testing.store import makeMeta

    config = parseConfig("store memory max-size=256MB\nvisible_hostname icpmesh-cost\n")
    components = resolvePlugins(config, reactor=reactor, build=True)
    store = components.store
    for i in range(HIT_URLS):
        writer = store.begin(hitURL(i), makeMeta(freshUntil=reactor.seconds() + 1e9, size=5))
        writer.write(b"hello")
        writer.finish()
    responder = ICPResponder(
        store, components.access, reactor=reactor, failureRatio=FailureRatio(reactor)
    )
    return ICPProtocol(responder, reactor=reactor), responder


def hitURL(i: int) -> str:
    return f"http://127.0.0.1:8099/bench/hit/{i:05d}"


def missURL(i: int) -> str:
    return f"http://127.0.0.1:8099/bench/miss/{i:09d}"


def makeBare() -> Any:
    """
    The bare responder of C{icp_bench.serveBare}.
    """
    from icp_bench import bareResponder

    return bareResponder({hitURL(i).encode("ascii") for i in range(HIT_URLS)})


def datagrams(case: str, n: int, offset: int) -> list[bytes]:
    if case == "hit":
        return [queryDatagram(i + 1, hitURL(i % HIT_URLS)) for i in range(n)]
    return [queryDatagram(i + 1, missURL(offset + i)) for i in range(n)]


def timeDispatch(protocol: Any, data: list[bytes]) -> float:
    """
    CPU seconds to hand every datagram in C{data} to C{protocol}.
    """
    receive = protocol.datagramReceived
    address = CLIENT
    gc.collect()
    start = time.process_time()
    for d in data:
        receive(d, address)
    return time.process_time() - start


class SocketRig:
    """
    A real UDP port (the reactor's own C{listenUDP}) fed from a client
    socket in batches; only the port's C{doRead} is timed.
    """

    def __init__(self, protocol: Any, batch: int, node: bool = True) -> None:
        from twisted.internet import reactor

        if node:
            # The port the node's ICP service uses.
            try:
                from icpmesh.udpport import listenICP
            except ImportError:  # an older checkout
                self.port = reactor.listenUDP(0, protocol, interface="127.0.0.2")  # type: ignore[attr-defined]
            else:
                self.port = listenICP(reactor, 0, protocol, interface="127.0.0.2")
        else:
            self.port = reactor.listenUDP(0, protocol, interface="127.0.0.2")  # type: ignore[attr-defined]
        reactor.removeReader(self.port)  # type: ignore[attr-defined]
        self.address = ("127.0.0.2", self.port.getHost().port)
        self.client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.client.bind(("127.0.0.10", 0))
        self.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.client.setblocking(False)
        self.batch = batch

    def run(self, data: list[bytes]) -> tuple[float, int]:
        """
        @return: CPU seconds in C{doRead}, and replies received back.
        """
        sendto = self.client.sendto
        address = self.address
        doRead = self.port.doRead
        elapsed = 0.0
        replies = 0
        gc.collect()
        for i in range(0, len(data), self.batch):
            for d in data[i : i + self.batch]:
                sendto(d, address)
            start = time.process_time()
            doRead()
            elapsed += time.process_time() - start
            while True:
                try:
                    self.client.recv(65536)
                except BlockingIOError:
                    break
                replies += 1
        return elapsed, replies

    def close(self) -> None:
        self.client.close()
        self.port.stopListening()


def responderCases(args: argparse.Namespace) -> dict[str, float]:
    from twisted.internet import reactor

    results: dict[str, float] = {}
    n = args.queries
    offset = 0
    cases = ["hit", "miss", "bare"]
    if args.only in cases:
        cases = [args.only]
    for level in args.levels.split(","):
        for case in cases:
            best = float("inf")
            for _ in range(args.repeat):
                if case == "bare":
                    protocol = makeBare()
                    responder = None
                else:
                    protocol, responder = makeNode(reactor)
                if case == "miss" and responder is not None:
                    # Fill the URL table first: the steady state.
                    warm = datagrams("miss", args.warm, offset)
                    offset += args.warm
                    for d in warm:
                        responder.handleRawQuery(d, CLIENT)
                data = datagrams("hit" if case == "hit" else "miss", n, offset)
                offset += n
                if level == "none":
                    # Only the set-up: for subtracting from instruction
                    # counts (see the module docstring).
                    results[f"{case} {level}"] = 0.0
                    continue
                if level == "dispatch":
                    protocol.makeConnection(_DiscardTransport())
                    elapsed = timeDispatch(protocol, data)
                else:
                    rig = SocketRig(protocol, args.batch, node=case != "bare")
                    try:
                        elapsed, replies = rig.run(data)
                    finally:
                        rig.close()
                    if replies != n:
                        print(f"  warning: {case}/{level}: {replies} replies to {n} queries", flush=True)
                if responder is not None:
                    expected = "UDP_HIT" if case == "hit" else "UDP_MISS"
                    got = responder.stats().get(expected, 0)
                    if got < n:
                        raise SystemExit(f"{case}: only {got} of {n} replies were {expected}")
                best = min(best, elapsed)
            if level == "none":
                print(f"{case:6} {level:9} (set-up only)", flush=True)
                continue
            results[f"{case} {level}"] = best / n * 1e6
            print(f"{case:6} {level:9} {best / n * 1e6:8.2f} us/query", flush=True)
    return results


def querierCase(neighbourCount: int, rounds: int) -> tuple[float, float]:
    """
    One C{icp} selector round to C{neighbourCount} siblings that all answer
    MISS.

    @return: CPU microseconds per round spent sending (selector, client,
        C{N} queries) and receiving (C{N} replies matched, the round
        completed and ranked).
    """
    from twisted.internet import reactor

    from icpmesh.config import parseConfig
    from icpmesh.interfaces import AccessRequest
    from icpmesh.neighbours import Neighbour
    from icpmesh.protocol import ICPProtocol
    from icpmesh.querier import ICPClient
    from icpmesh.selection import ICPSelector

    lines = [f"cache_peer 127.0.1.{i + 1} sibling 3128 3130" for i in range(neighbourCount)]
    config = parseConfig("\n".join(lines) + "\n")
    neighbours = [Neighbour(c, reactor=reactor) for c in config.neighbours]
    protocol = ICPProtocol(None, reactor=reactor)
    sent: list[tuple[bytes, Any]] = []

    class Recorder(_DiscardTransport):
        class socket:  # noqa: N801
            @staticmethod
            def sendto(data: bytes, address: Any) -> int:
                sent.append((data, address))
                return len(data)

        @staticmethod
        def write(data: bytes, address: Any = None) -> None:
            sent.append((data, address))

    protocol.makeConnection(Recorder())
    client = ICPClient(protocol, reactor=reactor, timeout=2.0)
    selector = ICPSelector()
    receive = protocol.datagramReceived
    sendTime = receiveTime = 0.0
    outcome: list[Any] = []
    gc.collect()
    clock = time.process_time
    for r in range(rounds):
        url = missURL(r)
        request = AccessRequest.fromURL("127.0.0.1", "GET", url)
        del sent[:]
        t0 = clock()
        d = selector.selectRoutes(request, neighbours, client)
        d.addCallback(outcome.append)
        t1 = clock()
        replies = [
            (
                icp.encodeReply(icp.Opcode.MISS, int.from_bytes(data[4:8], "big"), data[24:-1]),
                address,
            )
            for data, address in sent
        ]
        if len(replies) != neighbourCount:
            raise SystemExit(f"{len(replies)} queries sent to {neighbourCount} neighbours")
        t2 = clock()
        for data, address in replies:
            receive(data, address)
        t3 = clock()
        if len(outcome) != r + 1:
            raise SystemExit("the round did not complete on its last reply")
        sendTime += t1 - t0
        receiveTime += t3 - t2
        # Expire the round timeouts that are due, as the reactor would.
        reactor.runUntilCurrent()  # type: ignore[attr-defined]
    for call in reactor.getDelayedCalls():  # type: ignore[attr-defined]
        call.cancel()
    return sendTime / rounds * 1e6, receiveTime / rounds * 1e6


def querierSocketCase(
    neighbourCounts: list[int], rounds: int, gapMs: float = 0.0, evictMB: int = 0
) -> dict[int, tuple[float, float]]:
    """
    Query rounds over real sockets: the node's protocol on a loopback port
    driven by the real reactor, and fake neighbours that answer MISS at
    once (C{icpload -R}, compiled from C{icpload.c}, one process on
    127.0.1.1 and up).  Each round runs the reactor until the selector's
    result arrives.

    With C{gapMs}, the process sleeps that long before each round, and
    with C{evictMB} it first writes to a buffer that large: like a node
    that does other work between requests, each round then starts with
    cold CPU caches.  Neither is timed.

    @return: by neighbour count, the median wall-clock milliseconds from
        sending the round to its ranked result, and the CPU microseconds
        this process spent per round.
    """
    import shutil
    import statistics
    import subprocess
    import tempfile

    from twisted.internet import reactor

    from icpmesh.config import parseConfig
    from icpmesh.interfaces import AccessRequest
    from icpmesh.neighbours import Neighbour
    from icpmesh.protocol import ICPProtocol
    from icpmesh.querier import ICPClient
    from icpmesh.selection import ICPSelector

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from icp_bench import compileTool

    tmp = tempfile.mkdtemp(prefix="icpcost-")
    results: dict[int, tuple[float, float]] = {}
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.1.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    fake = subprocess.Popen(
        [compileTool(tmp), "-R", "-a", "127.0.1.1", "-n", str(max(neighbourCounts)), "-P", str(port), "-t", "600"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert fake.stdout is not None
        if fake.stdout.readline().strip() != "ready":
            raise SystemExit("icpload -R did not start")
        protocol = ICPProtocol(None, reactor=reactor)
        listening = reactor.listenUDP(0, protocol, interface="127.0.0.1")  # type: ignore[attr-defined]
        client = ICPClient(protocol, reactor=reactor, timeout=2.0)
        selector = ICPSelector()
        for count in neighbourCounts:
            lines = [f"cache_peer 127.0.1.{i + 1} sibling 3128 {port}" for i in range(count)]
            config = parseConfig("\n".join(lines) + "\n")
            neighbours = [Neighbour(c, reactor=reactor) for c in config.neighbours]
            walls: list[float] = []
            cpu = 0.0
            evict = bytearray(evictMB << 20)
            for r in range(rounds + 20):
                request = AccessRequest.fromURL("127.0.0.1", "GET", missURL(r))
                if gapMs:
                    time.sleep(gapMs / 1000.0)
                for i in range(0, len(evict), 64):
                    evict[i] = r & 0xFF
                outcome: list[Any] = []
                c0 = time.process_time()
                w0 = time.perf_counter()
                selector.selectRoutes(request, neighbours, client).addCallback(outcome.append)
                while not outcome:
                    reactor.iterate(0.5)  # type: ignore[attr-defined]
                w1 = time.perf_counter()
                c1 = time.process_time()
                route = outcome[0][0]
                if route.code != "HIER_DIRECT" or route.timedOut:
                    raise SystemExit(f"round with {count} neighbours ended with {route}")
                if r >= 20:  # the first rounds warm up
                    walls.append(w1 - w0)
                    cpu += c1 - c0
            results[count] = (statistics.median(walls) * 1e3, cpu / rounds * 1e6)
            print(
                f"querier {count:3} neighbours, sockets{' (cold)' if gapMs or evictMB else ''}: "
                f"median {results[count][0]:.3f} ms per round, "
                f"{results[count][1]:.0f} us CPU per round",
                flush=True,
            )
        listening.stopListening()
        for call in reactor.getDelayedCalls():  # type: ignore[attr-defined]
            call.cancel()
    finally:
        fake.terminate()
        fake.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=100_000, help="queries per responder run")
    parser.add_argument("--warm", type=int, default=70_000, help="new URLs asked before a miss run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the minimum is shown")
    parser.add_argument("--batch", type=int, default=64, help="datagrams per doRead at the socket level")
    parser.add_argument("--levels", default="dispatch,socket",
                        help="dispatch, socket or both (none: set-up only, for instruction counts)")
    parser.add_argument("--neighbours", default="1,8,64", help="neighbour counts for the querier")
    parser.add_argument("--rounds", type=int, default=2000, help="query rounds per querier run")
    parser.add_argument("--only", choices=("hit", "miss", "bare", "querier", "responder"))
    parser.add_argument("--no-querier-sockets", action="store_true",
                        help="leave out the querier rounds over real sockets (they need gcc)")
    parser.add_argument("--socket-rounds", type=int, default=300,
                        help="rounds per neighbour count over real sockets")
    parser.add_argument("--gap-ms", type=float, default=5.0,
                        help="also run the socket rounds with this sleep before each round (0: not)")
    parser.add_argument("--evict-mb", type=int, default=16,
                        help="... and with this many MB written before each round, to cool the caches")
    args = parser.parse_args(argv)

    print(f"CPython {sys.version.split()[0]}, {args.queries} queries per run, best of {args.repeat}")
    if args.only != "querier":
        responderCases(args)
    if args.only in (None, "querier"):
        for count in [int(c) for c in args.neighbours.split(",")]:
            best = (float("inf"), float("inf"))
            for _ in range(args.repeat):
                result = querierCase(count, args.rounds)
                if sum(result) < sum(best):
                    best = result
            send, receive = best
            print(
                f"querier {count:3} neighbours: {send + receive:8.1f} us/round "
                f"(send {send:.1f}, replies {receive:.1f}; {(send + receive) / count:.2f} us per neighbour)",
                flush=True,
            )
        if not args.no_querier_sockets:
            counts = [int(c) for c in args.neighbours.split(",")]
            querierSocketCase(counts, args.socket_rounds)
            if args.gap_ms or args.evict_mb:
                querierSocketCase(counts, args.socket_rounds, args.gap_ms, args.evict_mb)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
