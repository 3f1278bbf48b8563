"""
Tests for L{icpmesh.querier} and L{icpmesh.neighbours} on the fake UDP
network: who is asked, how long we wait, liveness.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from icpmesh import icp
from icpmesh.config import parseConfig
from icpmesh.neighbours import Neighbour
from icpmesh.protocol import ICPProtocol
from icpmesh.querier import ICPClient
from icpmesh.testing import FakeICPNeighbour, FakeUDPReactor

URL = "http://example.com/x"


def neighbours(reactor: Any, text: str) -> list[Neighbour]:
    return [Neighbour(c, reactor=reactor) for c in parseConfig(text, "t").neighbours]


class QuerierTests(SynchronousTestCase):
    """
    Query rounds through L{ICPClient}.
    """

    def setUp(self) -> None:
        self.reactor = FakeUDPReactor(latency=0.001)
        self.proto = ICPProtocol(None, reactor=self.reactor)
        self.reactor.listenUDP(3130, self.proto, interface="127.0.0.1")

    def client(self, **kw: Any) -> ICPClient:
        return ICPClient(self.proto, reactor=self.reactor, **kw)

    def runRound(self, client: ICPClient, peers: list[Neighbour], **kw: Any) -> Any:
        results: list[Any] = []
        client.query(URL, peers, **kw).addCallback(results.append)
        for _ in range(400):
            if results:
                break
            self.reactor.advance(0.005)
        return results[0]

    def test_allReply(self) -> None:
        """
        Every neighbour is asked; the round ends when all replied, with
        their opcodes and RTTs, and RTT averages are updated.
        """
        ps = neighbours(self.reactor, "cache_peer 127.0.0.2 parent 3128 3130\n"
                                      "cache_peer 127.0.0.3 sibling 3128 3130\n")
        FakeICPNeighbour(self.reactor, ("127.0.0.2", 3130), icp.Opcode.MISS)
        FakeICPNeighbour(self.reactor, ("127.0.0.3", 3130), icp.Opcode.MISS)
        result = self.runRound(self.client(), ps)
        self.assertFalse(result.timedOut)
        self.assertEqual(sorted(r.neighbour.name for r in result.replies), ["127.0.0.2", "127.0.0.3"])
        self.assertTrue(all(n.rtt > 0 for n in ps))
        self.assertEqual(ps[0].replyCounts["MISS"], 1)

    def test_hitEndsWait(self) -> None:
        """
        A HIT ends the round at once, even though a slow neighbour has not
        answered.
        """
        ps = neighbours(self.reactor, "cache_peer 127.0.0.2 parent 3128 3130\n"
                                      "cache_peer 127.0.0.3 sibling 3128 3130\n")
        FakeICPNeighbour(self.reactor, ("127.0.0.2", 3130), icp.Opcode.MISS, delay=1.0)
        FakeICPNeighbour(self.reactor, ("127.0.0.3", 3130), icp.Opcode.HIT)
        before = self.reactor.seconds()
        result = self.runRound(self.client(), ps)
        self.assertLess(self.reactor.seconds() - before, 0.1)
        self.assertEqual(result.hit.neighbour.name, "127.0.0.3")

    def test_timeoutAndSkipped(self) -> None:
        """
        A silent neighbour costs the timeout; no-query and ICP-port-0
        neighbours are never asked.
        """
        ps = neighbours(self.reactor, "cache_peer 127.0.0.2 parent 3128 3130\n"
                                      "cache_peer 127.0.0.4 parent 3128 3130 no-query\n"
                                      "cache_peer 127.0.0.5 parent 3128 0\n")
        silent = FakeICPNeighbour(self.reactor, ("127.0.0.2", 3130), None)
        noq = FakeICPNeighbour(self.reactor, ("127.0.0.4", 3130), icp.Opcode.HIT)
        result = self.runRound(self.client(timeout=0.5), ps)
        self.assertTrue(result.timedOut)
        self.assertEqual(result.timeout, 0.5)
        self.assertEqual(len(silent.queries), 1)
        self.assertEqual(noq.queries, [])
        self.assertEqual([n.name for n in result.queried], ["127.0.0.2"])

    def test_deadNeighbourNotWaitedFor(self) -> None:
        """
        A neighbour silent for longer than dead_peer_timeout is down: not
        waited for, re-asked only once per dead_peer_timeout, and up again
        as soon as it answers.
        """
        [p] = neighbours(self.reactor, "cache_peer 127.0.0.2 parent 3128 3130\n")
        fake = FakeICPNeighbour(self.reactor, ("127.0.0.2", 3130), None)
        client = self.client(timeout=1.0, deadTimeout=10.0)
        for _ in range(11):
            self.runRound(client, [p])
        self.assertFalse(p.isUp(10.0))
        asked = len(fake.queries)
        before = self.reactor.seconds()
        result = self.runRound(client, [p])
        self.assertEqual(len(fake.queries), asked)
        self.assertEqual(result.expected, 0)
        self.assertLess(self.reactor.seconds() - before, 0.01)
        self.reactor.advance(10.1)
        fake.answer = icp.Opcode.MISS
        result = self.runRound(client, [p])
        self.assertEqual(result.expected, 0)
        self.reactor.pump(0.01)
        self.assertEqual(len(fake.queries), asked + 1)
        self.assertTrue(p.isUp(10.0))

    def test_dynamicTimeout(self) -> None:
        """
        Without a fixed timeout, the wait is twice the parents' average RTT,
        clamped to the floor and the ceiling.
        """
        [p] = neighbours(self.reactor, "cache_peer 127.0.0.2 parent 3128 3130\n")
        client = self.client(timeout=None, minTimeout=0.05, maxTimeout=2.0)
        self.assertEqual(client.computeTimeout([p]), 2.0)
        p.rtt = 0.1
        self.assertAlmostEqual(client.computeTimeout([p]), 0.2)
        p.rtt = 0.001
        self.assertEqual(client.computeTimeout([p]), 0.05)
        p.rtt = 5
        self.assertEqual(client.computeTimeout([p]), 2.0)

    def test_deniedDisables(self) -> None:
        """
        A neighbour that answers more than 95% of more than 100 queries
        with DENIED stops being queried.
        """
        [p] = neighbours(self.reactor, "cache_peer 127.0.0.2 parent 3128 3130\n")
        fake = FakeICPNeighbour(self.reactor, ("127.0.0.2", 3130), icp.Opcode.DENIED)
        client = self.client(timeout=0.1)
        for _ in range(102):
            self.runRound(client, [p])
        self.assertTrue(p.disabled)
        asked = len(fake.queries)
        self.runRound(client, [p])
        self.assertEqual(len(fake.queries), asked)

    def test_multicastGroup(self) -> None:
        """
        One query goes to a multicast group; replies from its configured
        responders count; the expected count is the group's average.
        """
        ps = neighbours(self.reactor,
                        "cache_peer 224.0.1.20 multicast 3128 3130 ttl=4\n"
                        "cache_peer 127.0.0.2 sibling 3128 3130 multicast-responder\n"
                        "cache_peer 127.0.0.3 sibling 3128 3130 multicast-responder\n")
        group = ps[0]
        a = FakeICPNeighbour(self.reactor, ("127.0.0.2", 3130), icp.Opcode.MISS)
        b = FakeICPNeighbour(self.reactor, ("127.0.0.3", 3130), icp.Opcode.MISS)
        stranger = FakeICPNeighbour(self.reactor, ("127.0.0.9", 3130), icp.Opcode.HIT)
        for f in (a, b, stranger):
            f.port.joinGroup("224.0.1.20")
        group.noteGroupCount(2)
        result = self.runRound(self.client(timeout=1.0), ps)
        self.assertFalse(result.timedOut)
        self.assertEqual(sorted(r.neighbour.name for r in result.replies), ["127.0.0.2", "127.0.0.3"])
        self.assertEqual(len(a.queries), 1)
        self.assertIsNone(result.hit)

    def test_multicastBeforeFirstCount(self) -> None:
        """
        Before the first member count, a group is expected to answer with
        every configured responder (Squid expects none and does not wait):
        a HIT from the slower member is still waited for and used.  After a
        count that found one member, one reply completes the round.
        """
        ps = neighbours(self.reactor,
                        "cache_peer 224.0.1.20 multicast 3128 3130 ttl=4\n"
                        "cache_peer 127.0.0.2 sibling 3128 3130 multicast-responder\n"
                        "cache_peer 127.0.0.3 sibling 3128 3130 multicast-responder\n")
        group = ps[0]
        self.assertFalse(group.groupCounted)
        fast = FakeICPNeighbour(self.reactor, ("127.0.0.2", 3130), icp.Opcode.MISS, delay=0.01)
        slow = FakeICPNeighbour(self.reactor, ("127.0.0.3", 3130), icp.Opcode.HIT, delay=0.2)
        for f in (fast, slow):
            f.port.joinGroup("224.0.1.20")
        result = self.runRound(self.client(timeout=1.0), ps)
        self.assertEqual(result.expected, 2)
        self.assertFalse(result.timedOut)
        self.assertIsNotNone(result.hit)
        self.assertEqual(result.hit.neighbour.name, "127.0.0.3")

        group.noteGroupCount(1)
        self.assertTrue(group.groupCounted)
        result = self.runRound(self.client(timeout=1.0), ps)
        self.assertEqual(result.expected, 1)
        self.assertEqual([r.neighbour.name for r in result.replies], ["127.0.0.2"])
        self.assertIsNone(result.hit)


class NeighbourTests(SynchronousTestCase):
    """
    Per-request type and domain rules.
    """

    def test_domains(self) -> None:
        """
        neighbour_domain: first match decides, else the opposite of the
        last rule; neighbour_type_domain changes the type per host.
        """
        reactor = FakeUDPReactor()
        p, q = neighbours(reactor,
                          "cache_peer 127.0.0.2 sibling 3128 3130 name=p\n"
                          "cache_peer 127.0.0.3 sibling 3128 3130 name=q\n"
                          "neighbour_domain p .example.com\n"
                          "neighbour_domain q !.example.com\n"
                          "neighbour_type_domain p parent .edu\n")
        self.assertTrue(p.allowsHost("www.example.com"))
        self.assertFalse(p.allowsHost("www.other.org"))
        self.assertFalse(q.allowsHost("example.com"))
        self.assertTrue(q.allowsHost("other.org"))
        self.assertEqual(p.typeFor("mit.edu"), "parent")
        self.assertEqual(p.typeFor("example.com"), "sibling")

    def test_tcpFailures(self) -> None:
        """
        connect-fail-limit failed fetches mark a neighbour down; one success
        revives it.
        """
        reactor = FakeUDPReactor()
        [p] = neighbours(reactor, "cache_peer 127.0.0.2 parent 3128 3130 connect-fail-limit=3\n")
        for _ in range(3):
            self.assertTrue(p.isUp(10))
            p.noteFetchFailed()
        self.assertFalse(p.isUp(10))
        p.noteFetchSucceeded()
        self.assertTrue(p.isUp(10))


class Echo:
    """
    A UDP echo service (port 7) on the fake network.
    """

    def __init__(self, reactor: FakeUDPReactor, host: str, delay: float = 0.0) -> None:
        from twisted.internet.protocol import DatagramProtocol

        echo = self

        class Proto(DatagramProtocol):
            def datagramReceived(self, data: bytes, addr: Any) -> None:  # type: ignore[override]
                echo.seen.append(icp.decode(data))
                reactor.callLater(delay, self.transport.write, data, addr)

        self.seen: list[icp.Message] = []
        reactor.listenUDP(7, Proto(), interface=host)


class EchoTests(SynchronousTestCase):
    """
    source_ping (SECHO to the origin) and DECHO to a parent on the echo
    port.
    """

    def setUp(self) -> None:
        self.reactor = FakeUDPReactor(latency=0.001)
        self.proto = ICPProtocol(None, reactor=self.reactor)
        self.reactor.listenUDP(3130, self.proto, interface="127.0.0.1")

    def runRound(self, client: ICPClient, url: str, peers: list[Neighbour]) -> Any:
        results: list[Any] = []
        client.query(url, peers).addCallback(results.append)
        for _ in range(400):
            if results:
                break
            self.reactor.advance(0.005)
        return results[0]

    def test_sourcePingFastest(self) -> None:
        """
        With source_ping, the origin's echo port gets a SECHO; when it comes
        back before any HIT, the round ends at once with sourceFastest.
        """
        [p] = neighbours(self.reactor, "cache_peer 127.0.0.2 parent 3128 3130\n")
        FakeICPNeighbour(self.reactor, ("127.0.0.2", 3130), icp.Opcode.MISS, delay=0.5)
        echo = Echo(self.reactor, "127.0.0.9")
        client = ICPClient(self.proto, reactor=self.reactor, timeout=2.0, sourcePing=True)
        before = self.reactor.seconds()
        result = self.runRound(client, "http://127.0.0.9/x", [p])
        self.assertEqual([m.opcode for m in echo.seen], [icp.Opcode.SECHO])
        self.assertTrue(result.sourceFastest)
        self.assertLess(self.reactor.seconds() - before, 0.1)

    def test_hitBeatsSlowSource(self) -> None:
        """
        A HIT that arrives before the SECHO wins.
        """
        [p] = neighbours(self.reactor, "cache_peer 127.0.0.2 sibling 3128 3130\n")
        FakeICPNeighbour(self.reactor, ("127.0.0.2", 3130), icp.Opcode.HIT)
        Echo(self.reactor, "127.0.0.9", delay=0.3)
        client = ICPClient(self.proto, reactor=self.reactor, sourcePing=True)
        result = self.runRound(client, "http://127.0.0.9/x", [p])
        self.assertFalse(result.sourceFastest)
        self.assertEqual(result.hit.neighbour, p)

    def test_namedOriginLearnedInBackground(self) -> None:
        """
        An origin named by host name is looked up in the background; the
        first request does not wait for it, later ones ping it.
        """
        from twisted.internet.defer import succeed

        self.reactor.resolve = lambda name, timeout=(1,): succeed("127.0.0.9")  # type: ignore[method-assign]
        client = ICPClient(self.proto, reactor=self.reactor, sourcePing=True)
        self.assertIsNone(client.originAddress("http://origin.example/x"))
        self.assertEqual(client.originAddress("http://origin.example/y"), "127.0.0.9")

    def test_dechoParent(self) -> None:
        """
        A parent whose ICP port is the echo port gets DECHO, and the echo
        counts as its reply.
        """
        [p] = neighbours(self.reactor, "cache_peer 127.0.0.8 parent 3128 7\n")
        echo = Echo(self.reactor, "127.0.0.8")
        result = self.runRound(ICPClient(self.proto, reactor=self.reactor), "http://e.com/", [p])
        self.assertEqual([m.opcode for m in echo.seen], [icp.Opcode.DECHO])
        self.assertFalse(result.timedOut)
        self.assertEqual([(r.neighbour, r.opcode) for r in result.replies], [(p, icp.Opcode.DECHO)])
