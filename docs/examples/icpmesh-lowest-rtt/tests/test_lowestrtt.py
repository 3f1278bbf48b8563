"""
Tests for the C{lowest-rtt} selector, on icpmesh's fake UDP network.

Run them against the installed distribution (C{pip install .[test]}, then
C{pytest} in this directory): the plugin-discovery test looks for the
drop-in where Twisted looks for it.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import maybeDeferred
from twisted.plugin import IPlugin, getPlugins
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from icpmesh import icp
from icpmesh.config import ConfigError, parseConfig
from icpmesh.interfaces import AccessRequest, IPeerSelector, IPeerSelectorPlugin
from icpmesh.neighbours import Neighbour
from icpmesh.protocol import ICPProtocol
from icpmesh.querier import ICPClient
from icpmesh.testing import FakeICPNeighbour, FakeUDPReactor
from icpmesh_lowestrtt import LowestRTTSelector, lowestRTT

URL = "http://example.com/page"

#: Two parents and a sibling.  The slow parent comes first, so a selector
#: that ignored RTTs would pick it.
PEERS = """\
cache_peer 127.0.0.2 parent 3128 3130 name=slow
cache_peer 127.0.0.3 parent 3128 3130 name=fast
cache_peer 127.0.0.4 sibling 3128 3130 name=sib
"""


def request(url: str = URL, method: str = "GET") -> AccessRequest:
    """
    A request from a client on the local network.
    """
    return AccessRequest.fromURL("10.0.0.7", method, url)


class LowestRTTTests(SynchronousTestCase):
    """
    The selector with a real ICP client on a fake network: the node at
    127.0.0.1, fake neighbours that answer after a delay.
    """

    def setUp(self) -> None:
        self.reactor = FakeUDPReactor(latency=0.001)
        self.protocol = ICPProtocol(None, reactor=self.reactor)
        self.reactor.listenUDP(3130, self.protocol, interface="127.0.0.1")
        self.icp = ICPClient(self.protocol, reactor=self.reactor, timeout=1.0)
        self.slow = FakeICPNeighbour(self.reactor, ("127.0.0.2", 3130), icp.Opcode.MISS, delay=0.080)
        self.fast = FakeICPNeighbour(self.reactor, ("127.0.0.3", 3130), icp.Opcode.MISS, delay=0.010)
        self.sib = FakeICPNeighbour(self.reactor, ("127.0.0.4", 3130), icp.Opcode.HIT)

    def build(self, config: str = "selector lowest-rtt\n") -> tuple[Any, list[Neighbour]]:
        """
        The selector a config builds through its plugin, and its neighbours.
        """
        parsed = parseConfig(config + PEERS, "test.conf")
        selector = lowestRTT.selectorFromConfig(parsed.plugins["selector"], self.reactor)
        peers = [Neighbour(c, reactor=self.reactor) for c in parsed.neighbours]
        return selector, peers

    def select(self, selector: Any, peers: list[Neighbour],
               req: Optional[AccessRequest] = None) -> list[tuple[Optional[str], str, bool]]:
        """
        Run C{selectRoutes}, moving the clock until it has an answer, and
        return C{(neighbour name, code, timedOut)} per route.
        """
        results: list[Any] = []
        d = maybeDeferred(selector.selectRoutes, req or request(), peers, self.icp)
        d.addCallback(results.append)
        for _ in range(1000):
            if results:
                break
            self.reactor.advance(0.002)
        self.assertEqual(len(results), 1, "selectRoutes never fired")
        return [(r.neighbour.name if r.neighbour else None, r.code, r.timedOut)
                for r in results[0]]

    def queries(self) -> dict[str, int]:
        """
        How many queries each fake neighbour has received.
        """
        return {"slow": len(self.slow.queries), "fast": len(self.fast.queries),
                "sib": len(self.sib.queries)}

    def test_plugin(self) -> None:
        """
        The plugin object provides the plugin interfaces, is called
        C{lowest-rtt}, builds an L{IPeerSelector}, and is found by
        C{twisted.plugin} the way the node finds it (so this test passes
        only once the distribution is installed).
        """
        self.assertTrue(verifyObject(IPeerSelectorPlugin, lowestRTT))
        self.assertTrue(IPlugin.providedBy(lowestRTT))
        self.assertEqual(lowestRTT.name, "lowest-rtt")
        selector, _ = self.build()
        self.assertTrue(verifyObject(IPeerSelector, selector))
        found = [p for p in getPlugins(IPeerSelectorPlugin) if p.name == "lowest-rtt"]
        self.assertEqual(len(found), 1)
        self.assertIsInstance(found[0], type(lowestRTT))

    def test_asksWhenUnknown(self) -> None:
        """
        With no RTT measured yet, both parents (and not the sibling) are
        asked, and the one that answered first is chosen, even though it
        comes second in the config; the other parent and the origin follow
        as fallbacks.
        """
        selector, peers = self.build()
        routes = self.select(selector, peers)
        self.assertEqual(self.queries(), {"slow": 1, "fast": 1, "sib": 0})
        self.assertEqual(routes, [("fast", "CLOSEST_PARENT", False),
                                  ("slow", "ANY_OLD_PARENT", False),
                                  (None, "HIER_DIRECT", False)])

    def test_waitsForEveryParent(self) -> None:
        """
        The round does not stop at the first reply: both parents' RTTs are
        measured, so the next request can be routed without asking.
        """
        selector, peers = self.build()
        self.select(selector, peers)
        slow, fast = peers[0], peers[1]
        self.assertGreater(slow.rtt, fast.rtt)
        self.assertGreater(fast.rtt, 0)

    def test_knownRTTsNoQuery(self) -> None:
        """
        Within C{max-age} of the last replies, a request is routed from the
        measured RTTs at once, without sending any query.
        """
        selector, peers = self.build("selector lowest-rtt max-age=30s\n")
        self.select(selector, peers)
        self.reactor.advance(20)
        routes = selector.selectRoutes(request("http://example.com/other"), peers, self.icp)
        self.assertIsInstance(routes, list)
        self.assertEqual(routes[0].neighbour.name, "fast")
        self.assertEqual(routes[0].code, "CLOSEST_PARENT")
        self.assertEqual(self.queries(), {"slow": 1, "fast": 1, "sib": 0})

    def test_asksAgainWhenStale(self) -> None:
        """
        Once the measurements are older than C{max-age}, the parents are
        asked again, and a parent that has become the faster one is chosen.
        """
        selector, peers = self.build("selector lowest-rtt max-age=30s\n")
        self.assertEqual(self.select(selector, peers)[0][0], "fast")
        self.reactor.advance(31)
        self.fast.delay = 0.300
        self.slow.delay = 0.002
        routes = self.select(selector, peers)
        self.assertEqual(self.queries(), {"slow": 2, "fast": 2, "sib": 0})
        self.assertEqual(routes[0], ("slow", "CLOSEST_PARENT", False))

    def test_silentParentNotChosen(self) -> None:
        """
        A parent that does not answer is not chosen: the round times out,
        the parent that answered is chosen (marked as timed out, for the
        C{TIMEOUT_} log prefix), and the silent one is still a fallback
        while it counts as up.
        """
        self.reactor.silence(("127.0.0.3", 3130))
        selector, peers = self.build()
        routes = self.select(selector, peers)
        self.assertEqual(routes, [("slow", "CLOSEST_PARENT", True),
                                  ("fast", "ANY_OLD_PARENT", False),
                                  (None, "HIER_DIRECT", True)])

    def test_noFetchNotChosen(self) -> None:
        """
        A parent that answers MISS_NOFETCH is fast but asks not to be
        fetched from, so the other parent is chosen, also for the requests
        routed from the measured RTTs afterwards; once it answers MISS
        again (when the RTTs are next measured), it is chosen again.
        """
        self.fast.answer = icp.Opcode.MISS_NOFETCH
        selector, peers = self.build("selector lowest-rtt max-age=30s\n")
        self.assertEqual(self.select(selector, peers)[0], ("slow", "CLOSEST_PARENT", False))
        self.reactor.advance(5)
        routes = selector.selectRoutes(request("http://example.com/2"), peers, self.icp)
        self.assertEqual(routes[0].neighbour.name, "slow")
        self.assertEqual(self.queries(), {"slow": 1, "fast": 1, "sib": 0})
        self.fast.answer = icp.Opcode.MISS
        self.reactor.advance(30)
        self.assertEqual(self.select(selector, peers)[0], ("fast", "CLOSEST_PARENT", False))

    def test_noParentAnswers(self) -> None:
        """
        When no parent answers at all, there is no C{CLOSEST_PARENT}: the
        built-in fallbacks decide.
        """
        self.reactor.silence(("127.0.0.2", 3130))
        self.reactor.silence(("127.0.0.3", 3130))
        selector, peers = self.build()
        self.assertEqual(self.select(selector, peers),
                         [("slow", "ANY_OLD_PARENT", False), ("fast", "ANY_OLD_PARENT", False),
                          (None, "HIER_DIRECT", True)])

    def test_notHierarchical(self) -> None:
        """
        A POST and a URL on the default stop list go to the origin first,
        with the parents as fallbacks, and nobody is asked.
        """
        selector, peers = self.build()
        for req in (request(method="POST"), request("http://example.com/cgi-bin/x")):
            routes = self.select(selector, peers, req)
            self.assertEqual(routes[0], (None, "HIER_DIRECT", False))
            self.assertEqual([r[0] for r in routes[1:]], ["slow", "fast"])
        self.assertEqual(self.queries(), {"slow": 0, "fast": 0, "sib": 0})

    def test_insideFirewall(self) -> None:
        """
        With C{inside_firewall}, a request outside it never gets a route to
        the origin.
        """
        selector, peers = self.build("selector lowest-rtt\ninside_firewall intranet.example\n")
        routes = self.select(selector, peers)
        self.assertEqual([r[0] for r in routes], ["fast", "slow"])

    def test_options(self) -> None:
        """
        C{max-age} takes a duration; an unknown option or a bad value stops
        the node with the file and line.
        """
        selector, _ = self.build("selector lowest-rtt max-age=2min\n")
        self.assertIsInstance(selector, LowestRTTSelector)
        self.assertEqual(selector.maxAge, 120.0)
        for line in ("selector lowest-rtt max-rtt=5\n", "selector lowest-rtt max-age=soon\n"):
            with self.assertRaises(ConfigError) as caught:
                self.build(line)
            self.assertTrue(str(caught.exception).startswith("test.conf:1: "),
                            str(caught.exception))
