"""
Tests for L{icpmesh.selection}: RFC 2187 5.1.1 and 5.3.9.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.trial.unittest import SynchronousTestCase

from icpmesh import icp
from icpmesh.config import parseConfig
from icpmesh.interfaces import DIRECT, AccessRequest
from icpmesh.neighbours import Neighbour
from icpmesh.querier import QueryRound, Reply
from icpmesh.selection import ICPSelector, SelectorPolicy, icpSelectorPlugin
from icpmesh.testing import FakeUDPReactor

URL = "http://example.com/x"


class ScriptedICP:
    """
    An IICPClient that answers from a script: neighbour name -> (opcode,
    rtt, srcRtt).
    """

    def __init__(self, script: dict[str, tuple[int, float, Optional[tuple[int, int]]]],
                 timedOut: bool = False) -> None:
        self.script = script
        self.timedOut = timedOut
        self.asked: list[list[str]] = []

    def query(self, url: str, neighbours: Any, timeout: Any = None, stopOnHit: bool = True) -> Any:
        self.asked.append([n.name for n in neighbours])
        replies = [Reply(n, *self.script[n.name]) for n in neighbours if n.name in self.script]
        replies.sort(key=lambda r: r.rtt)
        from twisted.internet.defer import succeed
        return succeed(QueryRound(url, list(neighbours), len(neighbours), replies, self.timedOut, 2.0))


def mesh(text: str) -> list[Neighbour]:
    reactor = FakeUDPReactor()
    return [Neighbour(c, reactor=reactor) for c in parseConfig(text, "t").neighbours]


def request(url: str = URL, method: str = "GET", **headers: str) -> AccessRequest:
    return AccessRequest.fromURL("10.0.0.1", method, url, headers=headers)


PEERS = ("cache_peer 127.0.0.2 parent 3128 3130 name=p1\n"
         "cache_peer 127.0.0.3 parent 3128 3130 name=p2 weight=2\n"
         "cache_peer 127.0.0.4 sibling 3128 3130 name=s1\n")


class ICPSelectorTests(SynchronousTestCase):
    """
    The order of 5.3.9.
    """

    def select(self, selector: ICPSelector, req: AccessRequest, peers: list[Neighbour],
               client: ScriptedICP) -> list[tuple[Optional[str], str]]:
        from twisted.internet.defer import maybeDeferred
        routes = self.successResultOf(maybeDeferred(selector.selectRoutes, req, peers, client))
        return [(r.neighbour.name if r.neighbour else None, r.code) for r in routes]

    def test_noNeighboursDirect(self) -> None:
        """
        With no neighbours, the origin.
        """
        self.assertEqual(self.select(ICPSelector(), request(), [], ScriptedICP({})),
                         [(None, "HIER_DIRECT")])

    def test_noNeighboursAtOnce(self) -> None:
        """
        With no neighbours the routes are a list, given at once (no
        Deferred for the proxy to wait on), whatever the method or URL;
        none when the origin is outside the firewall.
        """
        for req in (request(), request(method="POST"), request(URL + "?q=1")):
            self.assertEqual(ICPSelector().selectRoutes(req, [], ScriptedICP({})), [DIRECT])
        firewalled = ICPSelector(SelectorPolicy(insideFirewall=[".corp.example"]))
        self.assertEqual(firewalled.selectRoutes(request(), [], ScriptedICP({})), [])
        self.assertEqual(
            firewalled.selectRoutes(request("http://a.corp.example/"), (), ScriptedICP({})), [DIRECT]
        )

    def test_siblingHit(self) -> None:
        """
        A sibling HIT comes first, with only-if-cached; misses follow.
        """
        peers = mesh(PEERS)
        client = ScriptedICP({"p1": (icp.Opcode.MISS, 0.01, None), "p2": (icp.Opcode.MISS, 0.02, None),
                              "s1": (icp.Opcode.HIT, 0.005, None)})
        from twisted.internet.defer import maybeDeferred
        routes = self.successResultOf(maybeDeferred(ICPSelector().selectRoutes, request(), peers, client))
        self.assertEqual((routes[0].neighbour.name, routes[0].code, routes[0].onlyIfCached),
                         ("s1", "SIBLING_HIT", True))
        self.assertEqual([(r.neighbour.name if r.neighbour else None, r.code) for r in routes[1:]],
                         [("p1", "FIRST_PARENT_MISS"), (None, "HIER_DIRECT"), ("p2", "ANY_OLD_PARENT")])

    def test_parentHit(self) -> None:
        """
        A parent HIT is a PARENT_HIT without only-if-cached.
        """
        peers = mesh(PEERS)
        client = ScriptedICP({"p2": (icp.Opcode.HIT, 0.01, None)})
        self.assertEqual(self.select(ICPSelector(), request(), peers, client)[0], ("p2", "PARENT_HIT"))

    def test_firstParentMissWeighted(self) -> None:
        """
        FIRST_PARENT_MISS divides RTT by weight: p2 (weight 2, 30 ms -> 15)
        beats p1 (20 ms).
        """
        peers = mesh(PEERS)
        client = ScriptedICP({"p1": (icp.Opcode.MISS, 0.020, None), "p2": (icp.Opcode.MISS, 0.030, None),
                              "s1": (icp.Opcode.MISS, 0.001, None)})
        self.assertEqual(self.select(ICPSelector(), request(), peers, client)[:2],
                         [("p2", "FIRST_PARENT_MISS"), (None, "HIER_DIRECT")])

    def test_closestParentMiss(self) -> None:
        """
        SRC_RTT from parents picks the one closest to the origin.
        """
        peers = mesh(PEERS)
        client = ScriptedICP({"p1": (icp.Opcode.MISS, 0.001, (50, 3)), "p2": (icp.Opcode.MISS, 0.03, (20, 5))})
        self.assertEqual(self.select(ICPSelector(), request(), peers, client)[0], ("p2", "CLOSEST_PARENT_MISS"))

    def test_noFetchAndSiblingMissNeverChosen(self) -> None:
        """
        MISS_NOFETCH and sibling MISS replies are not routes; DECHO counts
        as a parent miss.
        """
        peers = mesh(PEERS)
        client = ScriptedICP({"p1": (icp.Opcode.MISS_NOFETCH, 0.001, None),
                              "p2": (icp.Opcode.DECHO, 0.05, None),
                              "s1": (icp.Opcode.MISS, 0.001, None)})
        self.assertEqual(self.select(ICPSelector(), request(), peers, client)[:2],
                         [("p2", "FIRST_PARENT_MISS"), (None, "HIER_DIRECT")])

    def test_timedOutMarked(self) -> None:
        """
        Routes after a timeout are marked for the TIMEOUT_ log prefix.
        """
        peers = mesh(PEERS)
        from twisted.internet.defer import maybeDeferred
        routes = self.successResultOf(maybeDeferred(
            ICPSelector().selectRoutes, request(), peers, ScriptedICP({}, timedOut=True)))
        self.assertTrue(routes[0].timedOut)
        self.assertEqual(routes[0].code, "HIER_DIRECT")

    def test_nonHierarchicalDirect(self) -> None:
        """
        POST, stop-listed URLs (? and cgi-bin) and local domains are not
        queried.
        """
        peers = mesh(PEERS)
        selector = ICPSelector(SelectorPolicy(localDomains=[".local.lan"]))
        for req in [request(method="POST"), request("http://e.com/search?q=secret"),
                    request("http://e.com/cgi-bin/x"), request("http://www.local.lan/")]:
            client = ScriptedICP({})
            routes = self.select(selector, req, peers, client)
            self.assertEqual(routes[0], (None, "HIER_DIRECT"))
            self.assertEqual(client.asked, [])

    def test_noCacheSkipsSiblings(self) -> None:
        """
        Pragma: no-cache or Cache-Control: no-cache: only parents asked.
        """
        peers = mesh(PEERS)
        for headers in ({"pragma": "no-cache"}, {"cache-control": "max-age=0, no-cache"}):
            client = ScriptedICP({})
            self.select(ICPSelector(), request(**headers), peers, client)
            self.assertEqual(client.asked, [["p1", "p2"]])

    def test_firewall(self) -> None:
        """
        Outside the inside_firewall domains, no direct route: the default
        parent, then the other parents.
        """
        peers = mesh("cache_peer 127.0.0.2 parent 3128 3130 name=p1\n"
                     "cache_peer 127.0.0.3 parent 3128 3130 name=p2 default\n")
        selector = ICPSelector(SelectorPolicy(insideFirewall=[".corp.example"]))
        outside = self.select(selector, request(), peers, ScriptedICP({}, timedOut=True))
        self.assertEqual(outside, [("p2", "DEFAULT_PARENT"), ("p1", "ANY_OLD_PARENT")])
        inside = self.select(selector, request("http://w.corp.example/"), peers, ScriptedICP({}))
        self.assertEqual(inside[0], (None, "HIER_DIRECT"))

    def test_domainRestriction(self) -> None:
        """
        Neighbours restricted to other domains are not asked.
        """
        peers = mesh(PEERS + "neighbour_domain p1 .edu\n")
        client = ScriptedICP({})
        self.select(ICPSelector(), request(), peers, client)
        self.assertEqual(client.asked, [["p2", "s1"]])

    def test_singleParentBypass(self) -> None:
        """
        With single_parent_bypass and one parent, no query.
        """
        peers = mesh("cache_peer 127.0.0.2 parent 3128 3130 name=p1\n")
        client = ScriptedICP({})
        routes = self.select(ICPSelector(singleParentBypass=True), request(), peers, client)
        self.assertEqual(routes[0], ("p1", "SINGLE_PARENT"))
        self.assertEqual(client.asked, [])

    def test_pluginFromConfig(self) -> None:
        """
        The plugin reads the core settings and refuses unknown options.
        """
        config = parseConfig("selector icp query-head=on\nhierarchy_stoplist none\n"
                             "inside_firewall .corp\n", "t")
        selector = icpSelectorPlugin.selectorFromConfig(config.plugins["selector"], None)
        self.assertEqual(selector.policy.methods, ("GET", "HEAD"))
        self.assertEqual(selector.policy.stoplist, ())
        self.assertEqual(selector.policy.insideFirewall, (".corp",))
        bad = parseConfig("selector icp fast=1\n", "t")
        from icpmesh.config import ConfigError
        self.assertRaises(ConfigError, icpSelectorPlugin.selectorFromConfig, bad.plugins["selector"], None)


class SourceFastestTests(SynchronousTestCase):
    """
    The SECHO reply routes direct.
    """

    def test_sourceFastest(self) -> None:
        """
        A round whose SECHO came back first routes direct as SOURCE_FASTEST.
        """
        from twisted.internet.defer import maybeDeferred, succeed

        from icpmesh.querier import ORIGIN

        peers = mesh(PEERS)

        class Client:
            def query(self, url: str, neighbours: Any, timeout: Any = None, stopOnHit: bool = True) -> Any:
                return succeed(QueryRound(url, list(neighbours), 3,
                                          [Reply(ORIGIN, icp.Opcode.SECHO, 0.001)], False, 2.0))

        routes = self.successResultOf(maybeDeferred(ICPSelector().selectRoutes, request(), peers, Client()))
        self.assertEqual((routes[0].neighbour, routes[0].code), (None, "SOURCE_FASTEST"))
