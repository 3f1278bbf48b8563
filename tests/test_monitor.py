"""
Tests for L{icpmesh.monitor}: probes that revive neighbours, multicast member
counting, name resolution.
"""

from __future__ import annotations

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from icpmesh import icp
from icpmesh.config import parseConfig
from icpmesh.monitor import MCAST_FIRST_COUNT, MeshMonitor
from icpmesh.neighbours import Neighbour
from icpmesh.protocol import ICPProtocol
from icpmesh.testing import FakeICPNeighbour, FakeUDPReactor


def setup(text: str) -> tuple[FakeUDPReactor, list[Neighbour], ICPProtocol, MeshMonitor]:
    reactor = FakeUDPReactor()
    peers = [Neighbour(c, reactor=reactor) for c in parseConfig(text, "t").neighbours]
    proto = ICPProtocol(None, reactor=reactor)
    reactor.listenMulticast(3130, proto, interface="127.0.0.1")
    monitor = MeshMonitor(peers, proto, reactor=reactor, mcastTimeout=1.0)
    return reactor, peers, proto, monitor


class ProbeTests(SynchronousTestCase):
    """
    HTTP-port probes.
    """

    def test_probeRevives(self) -> None:
        """
        A neighbour down after failed connections is probed; a successful
        connection revives it; healthy neighbours are not probed.
        """
        reactor, [p, q], _, monitor = setup(
            "cache_peer 127.0.0.2 parent 3128 3130 connect-fail-limit=2 name=p\n"
            "cache_peer 127.0.0.3 parent 3128 3130 name=q\n")
        monitor.startService()
        self.addCleanup(monitor.stopService)
        p.noteFetchFailed()
        p.noteFetchFailed()
        self.assertFalse(p.isUp(10))
        reactor.advance(monitor.probeInterval)
        self.assertEqual([(h, port) for h, port, *_ in reactor.tcpClients], [("127.0.0.2", 3128)])
        factory = reactor.tcpClients[0][2]
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.assertTrue(p.isUp(10))
        self.assertTrue(transport.disconnecting)

    def test_probeFailureKeepsDown(self) -> None:
        """
        A failed probe leaves the neighbour down.
        """
        from twisted.internet.error import ConnectionRefusedError
        from twisted.python.failure import Failure

        reactor, [p], _, monitor = setup("cache_peer 127.0.0.2 parent 3128 3130 connect-fail-limit=1\n")
        monitor.startService()
        self.addCleanup(monitor.stopService)
        p.noteFetchFailed()
        reactor.advance(monitor.probeInterval)
        factory = reactor.tcpClients[0][2]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertFalse(p.isUp(10))


class MulticastCountTests(SynchronousTestCase):
    """
    Counting the members of a multicast group.
    """

    def test_count(self) -> None:
        """
        Ten seconds after start, a probe query goes to the group with its
        TTL, and the members that answer set the expected-reply average.
        """
        reactor, peers, proto, monitor = setup(
            "cache_peer 224.0.1.20 multicast 3128 3130 ttl=3 name=g\n"
            "cache_peer 127.0.0.2 sibling 3128 3130 multicast-responder\n"
            "cache_peer 127.0.0.3 sibling 3128 3130 multicast-responder\n")
        members = [FakeICPNeighbour(reactor, (h, 3130), icp.Opcode.MISS) for h in ("127.0.0.2", "127.0.0.3")]
        for m in members:
            m.port.joinGroup("224.0.1.20")
        monitor.startService()
        self.addCleanup(monitor.stopService)
        reactor.pump(MCAST_FIRST_COUNT + 0.1)
        self.assertEqual(peers[0].expectedReplies, 2)
        self.assertEqual(proto.transport.ttl, 3)
        [(query, _)] = members[0].queries
        self.assertEqual(query.url, "http://224.0.1.20:3130/")


class ResolveTests(SynchronousTestCase):
    """
    Neighbours given by name.
    """

    def test_resolved(self) -> None:
        """
        A host name is resolved at start and replies are then expected from
        the address.
        """
        from twisted.internet.defer import succeed

        reactor, [p], _, monitor = setup("cache_peer parent.example parent 3128 3130\n")
        reactor.resolve = lambda name, timeout=(1, 3, 11, 45): succeed("127.0.0.7")  # type: ignore[method-assign]
        monitor.startService()
        self.addCleanup(monitor.stopService)
        self.assertEqual(p.icpAddress, ("127.0.0.7", 3130))
