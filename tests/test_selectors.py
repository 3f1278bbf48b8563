"""
Tests for L{icpmesh.selectors}: round-robin, weighted-round-robin,
sourcehash, first-up-parent, carp (with its membership table) and the
iPlanet polling rounds, each also with 64 and 256 neighbours.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from twisted.internet.defer import maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from icpmesh import icp
from icpmesh.carp import DRAFT, MembershipTable, TableError, TableMember, parseTable
from icpmesh.config import ConfigError, parseConfig
from icpmesh.interfaces import AccessRequest, IPeerSelector, IPeerSelectorPlugin, Route
from icpmesh.neighbours import Neighbour
from icpmesh.protocol import ICPProtocol
from icpmesh.querier import ICPClient, QueryRound, Reply
from icpmesh.selection import icpSelectorPlugin
from icpmesh.selectors import (
    CARPSelector,
    CARPTableResource,
    FirstUpSelector,
    RoundRobinSelector,
    RoundsSelector,
    carpSelectorPlugin,
    clientKey,
    fetchTable,
    firstUpSelectorPlugin,
    proxyNeighbour,
    roundsSelectorPlugin,
    rrSelectorPlugin,
    sourcehashSelectorPlugin,
    wrrSelectorPlugin,
)
from icpmesh.testing import FakeICPNeighbour, FakeUDPReactor
from tests.test_carp import VECTORS, referenceSelect, syntheticURLs

URL = "http://example.com/x"

PARENT_PLUGINS = [
    rrSelectorPlugin,
    wrrSelectorPlugin,
    sourcehashSelectorPlugin,
    firstUpSelectorPlugin,
    carpSelectorPlugin,
]
ALL_PLUGINS = PARENT_PLUGINS + [roundsSelectorPlugin]


class Node:
    """
    A config, its neighbours on a clock, and the selector it configures.
    """

    def __init__(self, text: str, reactor: Any = None) -> None:
        self.reactor = reactor if reactor is not None else Clock()
        self.config = parseConfig(text, "t.conf")
        self.neighbours = [Neighbour(c, reactor=self.reactor) for c in self.config.neighbours]
        self.byName = {n.name: n for n in self.neighbours}

    def selector(self, plugin: Any = None) -> Any:
        if plugin is None:
            plugins = {p.name: p for p in ALL_PLUGINS}
            plugin = plugins[self.config.plugins["selector"].name]
        return plugin.selectorFromConfig(self.config.plugins["selector"], self.reactor)

    def __getitem__(self, name: str) -> Neighbour:
        return self.byName[name]


def request(
    url: str = URL, client: str = "10.0.0.1", method: str = "GET", **headers: str
) -> AccessRequest:
    return AccessRequest.fromURL(client, method, url, headers=headers)


def route(
    testCase: SynchronousTestCase,
    selector: Any,
    node: Node,
    req: Optional[AccessRequest] = None,
    icpClient: Any = None,
    neighbours: Optional[Sequence[Any]] = None,
) -> list[tuple[Optional[str], str]]:
    routes = testCase.successResultOf(
        maybeDeferred(
            selector.selectRoutes,
            req or request(),
            node.neighbours if neighbours is None else neighbours,
            icpClient,
        )
    )
    return [(r.neighbour.name if r.neighbour is not None else None, r.code) for r in routes]


def first(testCase: SynchronousTestCase, selector: Any, node: Node, req: Optional[AccessRequest] = None) -> Optional[str]:
    routes = route(testCase, selector, node, req)
    return routes[0][0] if routes else None


def down(neighbour: Neighbour) -> None:
    neighbour.tcpFailures = neighbour.connectFailLimit


def revive(neighbour: Neighbour) -> None:
    neighbour.tcpFailures = 0


def parents(count: int, options: str = "", icpPort: int = 0) -> str:
    return "".join(
        f"cache_peer 10.1.{i // 250}.{i % 250 + 1} parent 3128 {icpPort} name=p{i} {options}\n"
        for i in range(count)
    )


class ScriptedICP:
    """
    An IICPClient answering from a script: neighbour name -> (opcode, rtt);
    replies in RTT order; remembers each round's neighbours and timeout.
    """

    def __init__(self, script: dict[str, tuple[int, float]], timedOut: bool = False) -> None:
        self.script = script
        self.timedOut = timedOut
        self.asked: list[tuple[list[str], Optional[float]]] = []

    def query(self, url: str, neighbours: Any, timeout: Any = None, stopOnHit: bool = True) -> Any:
        self.asked.append(([n.name for n in neighbours], timeout))
        replies = [Reply(n, *self.script[n.name]) for n in neighbours if n.name in self.script]
        replies.sort(key=lambda r: r.rtt)
        return succeed(QueryRound(url, list(neighbours), len(neighbours), replies, self.timedOut, 2.0))


# ---------------------------------------------------------------------------


class CommonTests(SynchronousTestCase):
    """
    What every parent-choosing selector shares: only parents, domain rules,
    participation flags, fallbacks, direct.
    """

    MESH = (
        "cache_peer 10.0.0.9 sibling 3128 0 name=s1\n"
        "cache_peer 10.0.0.2 parent 3128 0 name=p1\n"
        "cache_peer 10.0.0.3 parent 3128 0 name=p2 default\n"
        "cache_peer 10.0.0.4 parent 3128 0 name=p3\n"
    )

    def node(self, plugin: Any, extra: str = "", mesh: Optional[str] = None) -> tuple[Node, Any]:
        node = Node((mesh or self.MESH) + extra + f"selector {plugin.name}\n")
        return node, node.selector(plugin)

    def test_interfaces(self) -> None:
        """
        Every plugin provides L{IPeerSelectorPlugin} with a unique name and
        builds an L{IPeerSelector}.
        """
        self.assertEqual(
            sorted(p.name for p in ALL_PLUGINS),
            ["carp", "first-up-parent", "round-robin", "rounds", "sourcehash", "weighted-round-robin"],
        )
        for plugin in ALL_PLUGINS:
            verifyObject(IPeerSelectorPlugin, plugin)
            self.assertEqual(plugin.directives, ())
            self.assertTrue(plugin.description)
            node = Node(self.MESH + f"selector {plugin.name}\n")
            verifyObject(IPeerSelector, node.selector(plugin))

    def test_onlyParentsThenFallbacksThenDirect(self) -> None:
        """
        The chosen route is a parent, never the sibling; then every other
        parent that is up (the default one first, except for the hashing
        selectors, whose members follow in score order), then the origin.
        """
        for plugin in PARENT_PLUGINS:
            node, selector = self.node(plugin)
            down(node["p3"])
            routes = route(self, selector, node)
            self.assertIn(routes[0][0], ("p1", "p2"), plugin.name)
            self.assertEqual(routes[-1], (None, "HIER_DIRECT"), plugin.name)
            names = [n for n, _ in routes]
            self.assertEqual(sorted(names[:-1]), ["p1", "p2"], plugin.name)
            hashing = plugin in (sourcehashSelectorPlugin, carpSelectorPlugin)
            if routes[0][0] == "p1":
                code = "ANY_OLD_PARENT" if hashing else "DEFAULT_PARENT"
                self.assertEqual(routes[1], ("p2", code), plugin.name)

    def test_codes(self) -> None:
        """
        Each selector logs its own hierarchy code for its choice.
        """
        codes = {
            "round-robin": "ROUNDROBIN_PARENT",
            "weighted-round-robin": "ROUNDROBIN_PARENT",
            "sourcehash": "SOURCEHASH_PARENT",
            "first-up-parent": "FIRSTUP_PARENT",
            "carp": "CARP",
        }
        for plugin in PARENT_PLUGINS:
            node, selector = self.node(plugin)
            self.assertEqual(route(self, selector, node)[0][1], codes[plugin.name])

    def test_domainRules(self) -> None:
        """
        A parent that C{neighbour_domain} excludes for the host, or that
        C{neighbour_type_domain} makes a sibling for it, is never chosen
        for that host, but is for others.
        """
        extra = (
            "neighbour_domain p1 !.example.org\n"
            "neighbour_type_domain p2 sibling .example.org\n"
        )
        for plugin in PARENT_PLUGINS:
            node, selector = self.node(plugin, extra)
            for i in range(30):
                req = request(f"http://www{i}.example.org/{i}", client=f"10.9.0.{i}")
                routes = route(self, selector, node, req)
                self.assertEqual([n for n, _ in routes], ["p3", None], plugin.name)
            chosen = {first(self, selector, node, request(f"http://h{i}.example.com/", client=f"10.9.0.{i}"))
                      for i in range(60)}
            self.assertTrue(chosen & {"p1", "p2"}, plugin.name)

    def test_participationFlag(self) -> None:
        """
        When some parents carry the selector's flag, only they are chosen
        (the others remain fallbacks); without any flag every parent takes
        part.
        """
        flags = {
            "round-robin": "round-robin",
            "weighted-round-robin": "weighted-round-robin",
            "sourcehash": "sourcehash",
            "first-up-parent": "first-up",
            "carp": "carp",
        }
        for plugin in PARENT_PLUGINS:
            flag = flags[plugin.name]
            mesh = (
                "cache_peer 10.0.0.2 parent 3128 0 name=p1\n"
                f"cache_peer 10.0.0.3 parent 3128 0 name=p2 {flag}\n"
                f"cache_peer 10.0.0.4 parent 3128 0 name=p3 {flag}\n"
            )
            node, selector = self.node(plugin, mesh=mesh)
            chosen = set()
            for i in range(60):
                routes = route(self, selector, node, request(f"http://h/{i}", client=f"10.9.0.{i}"))
                chosen.add(routes[0][0])
                self.assertIn(("p1", "ANY_OLD_PARENT"), routes, plugin.name)
            expected = {"p2"} if plugin is firstUpSelectorPlugin else {"p2", "p3"}
            self.assertEqual(chosen, expected, plugin.name)
            if plugin is not firstUpSelectorPlugin:
                node, selector = self.node(plugin, mesh=mesh.replace(flag, ""))
                chosen = {first(self, selector, node, request(f"http://h/{i}", client=f"10.9.0.{i}"))
                          for i in range(60)}
                self.assertEqual(chosen, {"p1", "p2", "p3"}, plugin.name)

    def test_firewall(self) -> None:
        """
        With C{inside_firewall} and an origin outside it, the origin is not
        among the routes; when no parent is up there is no route at all.
        """
        for plugin in PARENT_PLUGINS:
            node, selector = self.node(plugin, "inside_firewall .inside.example\n")
            routes = route(self, selector, node)
            self.assertNotIn(None, [n for n, _ in routes], plugin.name)
            self.assertEqual(len(routes), 3)
            for n in node.neighbours:
                down(n)
            self.assertEqual(route(self, selector, node), [], plugin.name)
            inside = route(self, selector, node, request("http://www.inside.example/"))
            self.assertEqual(inside, [(None, "HIER_DIRECT")], plugin.name)

    def test_nonGetAndLocalGoDirectFirst(self) -> None:
        """
        A POST, and a GET to a C{local_domain} server, go to the origin
        first, then to the parents.
        """
        for plugin in PARENT_PLUGINS:
            node, selector = self.node(plugin, "local_domain .lan\n")
            for req in (request(method="POST"), request("http://printer.lan/")):
                routes = route(self, selector, node, req)
                self.assertEqual(routes[0], (None, "HIER_DIRECT"), plugin.name)
                self.assertEqual(sorted(n for n, _ in routes[1:]), ["p1", "p2", "p3"])

    def test_postThroughParentsBehindFirewall(self) -> None:
        """
        When the origin may not be reached directly, a POST still goes
        through the selector's choice.
        """
        for plugin in PARENT_PLUGINS:
            node, selector = self.node(plugin, "inside_firewall .inside.example\n")
            routes = route(self, selector, node, request(method="POST"))
            self.assertNotEqual(routes[0][1], "HIER_DIRECT", plugin.name)
            self.assertEqual(len(routes), 3)

    def test_stoplistNotApplied(self) -> None:
        """
        C{hierarchy_stoplist} (default C{?} and C{cgi-bin}) keeps URLs out
        of ICP queries; these selectors send such URLs to their parents
        like any other (as Squid does).
        """
        for plugin in PARENT_PLUGINS:
            node, selector = self.node(plugin)
            routes = route(self, selector, node, request("http://example.com/cgi-bin/a?b=c"))
            self.assertNotEqual(routes[0][0], None, plugin.name)

    def test_unknownOption(self) -> None:
        """
        An unknown option is a config error naming the file and line.
        """
        for plugin in ALL_PLUGINS:
            node = Node(self.MESH + f"\nselector {plugin.name} colour=blue\n")
            with self.assertRaises(ConfigError) as caught:
                node.selector(plugin)
            self.assertTrue(str(caught.exception).startswith("t.conf:6: "), str(caught.exception))
            self.assertIn("colour", str(caught.exception))

    def test_noNeighbours(self) -> None:
        """
        Without any neighbour every selector sends the request direct.
        """
        for plugin in ALL_PLUGINS:
            node = Node(f"selector {plugin.name}\n")
            self.assertEqual(
                route(self, node.selector(plugin), node, icpClient=ScriptedICP({})),
                [(None, "HIER_DIRECT")],
                plugin.name,
            )


class RoundRobinTests(SynchronousTestCase):
    """
    C{round-robin}: Squid's C{getRoundRobinParent}.
    """

    MESH = (
        "cache_peer 10.0.0.2 parent 3128 0 name=a\n"
        "cache_peer 10.0.0.3 parent 3128 0 name=b\n"
        "cache_peer 10.0.0.4 parent 3128 0 name=c\n"
        "selector round-robin\n"
    )

    def test_tiesGoToLater(self) -> None:
        """
        With equal counts the later parent in config order wins, so three
        parents are used c, b, a, c, b, a.
        """
        node = Node(self.MESH)
        selector = node.selector()
        self.assertEqual([first(self, selector, node) for _ in range(6)], list("cbacba"))

    def test_weights(self) -> None:
        """
        A parent of weight 2 gets twice the requests of one of weight 1.
        """
        node = Node(
            "cache_peer 10.0.0.2 parent 3128 0 name=a\n"
            "cache_peer 10.0.0.3 parent 3128 0 name=b weight=2\n"
            "selector round-robin\n"
        )
        selector = node.selector()
        picks = [first(self, selector, node) for _ in range(300)]
        self.assertEqual((picks.count("a"), picks.count("b")), (100, 200))
        self.assertEqual(picks[:3], ["b", "b", "a"])

    def test_downSkipped(self) -> None:
        """
        A parent that is down is not chosen, and is not a fallback.
        """
        node = Node(self.MESH)
        selector = node.selector()
        down(node["b"])
        routes = [route(self, selector, node) for _ in range(4)]
        self.assertEqual([r[0][0] for r in routes], list("caca"))
        self.assertTrue(all("b" not in [n for n, _ in r] for r in routes))

    def test_resetEveryFiveMinutes(self) -> None:
        """
        Counts start again every 5 minutes of reactor time (Squid's
        C{peerClearRR}), so the later parent wins the tie again.
        """
        node = Node(self.MESH)
        selector = node.selector()
        self.assertEqual([first(self, selector, node) for _ in range(2)], ["c", "b"])
        node.reactor.advance(299)
        self.assertEqual(first(self, selector, node), "a")
        node.reactor.advance(1)
        self.assertEqual(first(self, selector, node), "c")
        self.assertEqual(first(self, selector, node), "b")
        node.reactor.advance(1000)
        self.assertEqual(first(self, selector, node), "c")

    def test_resetIntervalOption(self) -> None:
        """
        C{reset-interval=0} never clears the counts by time.
        """
        node = Node(self.MESH.replace("round-robin", "round-robin reset-interval=0"))
        selector = node.selector()
        self.assertEqual([first(self, selector, node) for _ in range(2)], ["c", "b"])
        node.reactor.advance(3600)
        self.assertEqual(first(self, selector, node), "a")
        bad = Node(self.MESH.replace("round-robin", "round-robin reset-interval=-1s"))
        self.assertRaises(ConfigError, bad.selector)

    def test_resetOnRevival(self) -> None:
        """
        When a parent that was down comes back, every count starts again.
        """
        node = Node(self.MESH)
        selector = node.selector()
        down(node["a"])
        self.assertEqual([first(self, selector, node) for _ in range(3)], ["c", "b", "c"])
        revive(node["a"])
        self.assertEqual(first(self, selector, node), "c")
        self.assertEqual(selector.counts, {"c": 2})

    def test_directConstruction(self) -> None:
        """
        Built directly (no config), the selector decides per request which
        parents take part.
        """
        node = Node(self.MESH)
        selector = RoundRobinSelector(reactor=node.reactor)
        self.assertEqual([first(self, selector, node) for _ in range(3)], list("cba"))


class WeightedRoundRobinTests(SynchronousTestCase):
    """
    C{weighted-round-robin}: Squid's C{getWeightedRoundRobinParent}.
    """

    MESH = (
        "cache_peer 10.0.0.2 parent 3128 0 name=fast\n"
        "cache_peer 10.0.0.3 parent 3128 0 name=slow\n"
        "selector weighted-round-robin\n"
    )

    def test_rttShares(self) -> None:
        """
        A parent with a quarter of the other's RTT gets four times the
        requests.
        """
        node = Node(self.MESH)
        node["fast"].rtt = 0.010
        node["slow"].rtt = 0.040
        selector = node.selector()
        picks = [first(self, selector, node) for _ in range(100)]
        self.assertEqual((picks.count("fast"), picks.count("slow")), (80, 20))

    def test_basetimeAndWeight(self) -> None:
        """
        The charge is C{(rtt - basetime) / weight} in milliseconds, at
        least 1.
        """
        node = Node(self.MESH.replace("name=slow", "name=slow basetime=30 weight=2"))
        node["fast"].rtt = 0.010
        node["slow"].rtt = 0.050
        selector = node.selector()
        self.assertEqual([first(self, selector, node) for _ in range(2)], ["slow", "fast"])
        self.assertEqual(selector.counts, {"slow": 1 + 10, "fast": 1 + 10})
        node["fast"].rtt = 0.0
        self.assertEqual([first(self, selector, node) for _ in range(2)], ["slow", "fast"])
        self.assertEqual(selector.counts, {"slow": 21, "fast": 12})

    def test_countLimit(self) -> None:
        """
        Once the chosen count passes 1,000,000 every count restarts at 0.
        """
        node = Node(self.MESH)
        selector = node.selector()
        selector.counts.update({"fast": 1000001, "slow": 1000005})
        self.assertEqual(first(self, selector, node), "fast")
        self.assertEqual(selector.counts, {"fast": 1, "slow": 0})


class SourceHashTests(SynchronousTestCase):
    """
    C{sourcehash}: the client address hashed with CARP maths, once.
    """

    MESH = (
        "cache_peer 10.0.0.2 parent 3128 0 name=p1\n"
        "cache_peer 10.0.0.3 parent 3128 0 name=p2 weight=2\n"
        "cache_peer 10.0.0.4 parent 3128 0 name=p3\n"
        "selector sourcehash\n"
    )
    WEIGHTS = [("p1", 1), ("p2", 2), ("p3", 1)]

    def test_stickyAndSquidCompatible(self) -> None:
        """
        Every client sticks to one parent, whatever the URL, and it is the
        one the reference model of Squid's sourcehash picks.
        """
        node = Node(self.MESH)
        selector = node.selector()
        seen = set()
        for i in range(200):
            client = f"192.168.{i // 100}.{i % 100}"
            picks = {first(self, selector, node, request(f"http://h{j}/", client=client)) for j in range(3)}
            self.assertEqual(len(picks), 1)
            self.assertEqual(picks, {referenceSelect(self.WEIGHTS, client, quirk=False)})
            seen |= picks
        self.assertEqual(seen, {"p1", "p2", "p3"})

    def test_clientKey(self) -> None:
        """
        Addresses are hashed as Squid prints them: IPv4-mapped IPv6 as
        IPv4, IPv6 compressed.
        """
        self.assertEqual(clientKey("::ffff:10.1.2.3"), "10.1.2.3")
        self.assertEqual(clientKey("2001:DB8:0:0::1"), "2001:db8::1")
        self.assertEqual(clientKey("not-an-address"), "not-an-address")
        node = Node(self.MESH)
        selector = node.selector()
        self.assertEqual(
            first(self, selector, node, request(client="::ffff:10.1.2.3")),
            first(self, selector, node, request(client="10.1.2.3")),
        )

    def test_downGoesToNextBest(self) -> None:
        """
        When a client's parent is down, it goes to its next-best parent;
        other clients keep theirs.
        """
        node = Node(self.MESH)
        selector = node.selector()
        clients = [f"172.16.0.{i}" for i in range(100)]
        before = {c: first(self, selector, node, request(client=c)) for c in clients}
        down(node["p2"])
        for c in clients:
            after = first(self, selector, node, request(client=c))
            if before[c] == "p2":
                self.assertEqual(after, referenceSelect(self.WEIGHTS, c, {"p1", "p3"}, quirk=False))
            else:
                self.assertEqual(after, before[c])


class FirstUpTests(SynchronousTestCase):
    """
    C{first-up-parent}.
    """

    def test_firstUp(self) -> None:
        """
        The first parent in config order that is up.
        """
        node = Node(parents(3) + "selector first-up-parent\n")
        selector = node.selector()
        self.assertEqual(route(self, selector, node)[0], ("p0", "FIRSTUP_PARENT"))
        down(node["p0"])
        self.assertEqual(route(self, selector, node)[:2], [("p1", "FIRSTUP_PARENT"), ("p2", "ANY_OLD_PARENT")])
        selector = FirstUpSelector()
        self.assertEqual(first(self, selector, node), "p1")


class CARPTests(SynchronousTestCase):
    """
    C{carp}: URLs go where Squid 5.7 sends them.
    """

    MESH = (
        "cache_peer 127.0.0.11 parent 3128 0 name=p1 carp\n"
        "cache_peer 127.0.0.12 parent 3128 0 name=p2 carp weight=2\n"
        "cache_peer 127.0.0.13 parent 3128 0 name=p3 carp\n"
    )

    def node(self, options: str = "", mesh: Optional[str] = None) -> tuple[Node, CARPSelector]:
        node = Node((mesh or self.MESH) + f"selector carp {options}\n")
        return node, node.selector()

    def test_vectors(self) -> None:
        """
        The notes' section 7.4 URLs go to Squid's picks (two of them seen
        on a live Squid 5.7); with C{hash=draft}, to the draft's picks.
        """
        node, selector = self.node()
        _, draft = self.node("hash=draft")
        self.assertEqual(draft.variant, DRAFT)
        for url, (squidPick, draftPick) in VECTORS.items():
            self.assertEqual(route(self, selector, node, request(url))[0], (squidPick, "CARP"))
            self.assertEqual(first(self, draft, node, request(url)), draftPick)

    def test_373URLs(self) -> None:
        """
        373 URLs route as the independent model of Squid predicts, with
        the other members following in score order and the origin last.
        """
        node, selector = self.node()
        weights = [("p1", 1), ("p2", 2), ("p3", 1)]
        for url in syntheticURLs(373):
            routes = route(self, selector, node, request(url))
            self.assertEqual(routes[0], (referenceSelect(weights, url), "CARP"))
            self.assertEqual(len(routes), 4)
            self.assertEqual(routes[-1], (None, "HIER_DIRECT"))
            rest = {n for n, _ in routes[:3]}
            self.assertEqual(rest, {"p1", "p2", "p3"})

    def test_downMemberMovesOnlyItsURLs(self) -> None:
        """
        A member that is down hands each of its URLs to that URL's
        next-best member; no other URL moves.
        """
        node, selector = self.node()
        urls = syntheticURLs(600, seed=11)
        before = {u: route(self, selector, node, request(u)) for u in urls}
        down(node["p2"])
        moved = 0
        for u in urls:
            after = route(self, selector, node, request(u))
            if before[u][0][0] == "p2":
                moved += 1
                self.assertEqual(after[0], (before[u][1][0], "CARP"))
            else:
                self.assertEqual(after[0], before[u][0])
            self.assertNotIn("p2", [n for n, _ in after])
        self.assertGreater(moved, 200)

    def test_memberNotAllowedIsSkipped(self) -> None:
        """
        A member that the domain rules exclude for a host is skipped like a
        down one: the host's URLs go to their next-best members.
        """
        node, selector = self.node(mesh=self.MESH + "neighbour_domain p3 !.blocked.example\n")
        _, plain = self.node()
        for i in range(100):
            url = f"http://www.blocked.example/{i}"
            routes = route(self, selector, node, request(url))
            ranking = [m.name for m, _ in plain.array.ranking(url)]
            expected = [n for n in ranking if n != "p3"][0]
            self.assertEqual(routes[0], (expected, "CARP"))

    def test_carpKey(self) -> None:
        """
        C{carp-key=host} sends every path of a host to one member; a bad
        carp-key is a config error at its cache_peer line.
        """
        node, selector = self.node(mesh=self.MESH.replace(" carp", " carp carp-key=host"))
        for host in ("a.example", "b.example", "c.example"):
            picks = {first(self, selector, node, request(f"http://{host}/{i}")) for i in range(40)}
            self.assertEqual(len(picks), 1)
        bad = Node(self.MESH.replace("name=p2 carp", "name=p2 carp carp-key=hots") + "selector carp\n")
        with self.assertRaises(ConfigError) as caught:
            bad.selector()
        self.assertTrue(str(caught.exception).startswith("t.conf:2: cache_peer p2: "))

    def test_options(self) -> None:
        """
        Bad C{hash=}, C{list-ttl=}, C{array-name=} and C{table-url=} values
        are config errors.
        """
        for options in ("hash=md5", "list-ttl=0", "table-url=ftp://x/", "list-ttl=soon"):
            node = Node(self.MESH + f"selector carp {options}\n")
            self.assertRaises(ConfigError, node.selector)

    def test_directConstruction(self) -> None:
        """
        Built directly, the selector takes the members from the neighbours
        it is given (those with the C{carp} flag) and routes the same.
        """
        node, configured = self.node()
        direct = CARPSelector(reactor=node.reactor)
        for url in syntheticURLs(50):
            self.assertEqual(first(self, direct, node, request(url)), first(self, configured, node, request(url)))

    def test_connect(self) -> None:
        """
        A CONNECT that may not go direct is routed by its authority
        (Squid's effective URI of a CONNECT is C{host:port}).
        """
        node, selector = self.node(mesh=self.MESH + "inside_firewall none.example\n")
        req = AccessRequest(
            client="10.0.0.1", method="CONNECT", url="secure.example:443", scheme="https",
            host="secure.example", port=443, path="/",
        )
        routes = route(self, selector, node, req)
        self.assertEqual(routes[0][0], referenceSelect([("p1", 1), ("p2", 2), ("p3", 1)], "secure.example:443"))
        self.assertEqual(routes[0][1], "CARP")

    def test_allDown(self) -> None:
        """
        With every member down, no CARP route: the origin only.
        """
        node, selector = self.node()
        for n in node.neighbours:
            down(n)
        self.assertEqual(route(self, selector, node), [(None, "HIER_DIRECT")])


class CARPTableTests(SynchronousTestCase):
    """
    The array membership table: served, fetched, followed.
    """

    MESH = CARPTests.MESH + "visible_hostname array1\n"

    def setUp(self) -> None:
        self.node = Node(self.MESH + "selector carp list-ttl=2min\n")
        self.selector = self.node.selector()

    def test_table(self) -> None:
        """
        The table lists every member with its address, port, load factor
        and state, and how long it has been in that state.
        """
        down(self.node["p3"])
        table = self.selector.membershipTable(self.node.neighbours, tableURL="http://x/carp")
        self.assertEqual((table.arrayName, table.listTTL), ("array1", 120))
        self.assertEqual(
            [(m.name, m.address, m.port, m.loadFactor, m.up) for m in table.members],
            [("p1", "127.0.0.11", 3128, 1, True), ("p2", "127.0.0.12", 3128, 2, True),
             ("p3", "127.0.0.13", 3128, 1, False)],
        )
        self.node.reactor.advance(30)
        later = self.selector.membershipTable(self.node.neighbours)
        self.assertEqual([m.stateTime for m in later.members], [30, 30, 30])
        self.assertEqual(later.configID, table.configID)
        revive(self.node["p3"])
        self.node.reactor.advance(5)
        changed = self.selector.membershipTable(self.node.neighbours)
        self.assertEqual([m.stateTime for m in changed.members], [35, 35, 0])
        self.assertNotEqual(changed.configID, table.configID)

    def test_resourceAndFetch(self) -> None:
        """
        L{CARPTableResource} serves the table as text with a max-age of
        ListTTL, member lines carrying the URL it was fetched from, and
        L{fetchTable} reads it back.
        """
        from treq.testing import StubTreq

        resource = CARPTableResource(self.selector, self.node.neighbours)
        client = StubTreq(resource)
        response = self.successResultOf(client.get("http://array1.example:3128/carp"))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"cache-control"), [b"max-age=120"])
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"), [b"text/plain; charset=us-ascii"]
        )
        body = self.successResultOf(client.content(response))
        table = parseTable(body)
        self.assertEqual([m.tableURL for m in table.members], ["http://array1.example:3128/carp"] * 3)
        fetched = self.successResultOf(fetchTable("http://array1.example:3128/carp", client))
        self.assertEqual([m.name for m in fetched.members], ["p1", "p2", "p3"])
        for url, (pick, _) in VECTORS.items():
            self.assertEqual(fetched.toArray().select(url).name, pick)

    def test_fetchErrors(self) -> None:
        """
        A status other than 200, or a body that is not a table, fails with
        L{TableError}.
        """
        from treq.testing import StubTreq
        from twisted.web.pages import errorPage
        from twisted.web.resource import Resource

        failure = self.failureResultOf(fetchTable("http://x/carp", StubTreq(errorPage(404, "No", "no"))))
        failure.trap(TableError)
        self.assertIn("404", failure.getErrorMessage())

        class Junk(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                return b"<html>hello</html>"

        self.failureResultOf(fetchTable("http://x/carp", StubTreq(Junk()))).trap(TableError)

    def test_applyTable(self) -> None:
        """
        A table applied from another member replaces the array (its load
        factors) and its DOWN members are skipped.
        """
        rows = tuple(
            TableMember(name, "127.0.0.1", 3128, "u", "g", 0, up, load)
            for name, up, load in (("p1", True, 1), ("p2", False, 2), ("p3", True, 1))
        )
        self.selector.applyTable(MembershipTable(rows))
        for url in syntheticURLs(100):
            self.assertNotEqual(first(self, self.selector, self.node, request(url)), "p2")
        equal = tuple(TableMember(m.name, m.address, m.port, "u", "g", 0, True, 1) for m in rows)
        self.selector.applyTable(MembershipTable(equal))
        table = MembershipTable(equal).toArray()
        for url in syntheticURLs(100):
            self.assertEqual(first(self, self.selector, self.node, request(url)), table.select(url).name)

    def test_follower(self) -> None:
        """
        With C{table-url=}, the selector (a service) fetches the table when
        started and again after each ListTTL; after a failure it keeps the
        array and retries in a minute; stopping cancels the next fetch.
        """
        from treq.testing import StubTreq
        from twisted.web.resource import Resource

        publisher = Node(self.MESH.replace("weight=2", "weight=5") + "selector carp list-ttl=30\n")
        served = CARPTableResource(publisher.selector(), publisher.neighbours, tableURL="u")
        state = {"fail": False, "hits": 0}

        class Flaky(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                state["hits"] += 1
                if state["fail"]:
                    request.setResponseCode(503)
                    return b"busy"
                return served.render_GET(request)

        client = StubTreq(Flaky())
        selector = CARPSelector(
            members=self.selector.array.members,
            reactor=self.node.reactor,
            tableURL="http://publisher/carp",
            httpClient=client,
        )
        selector.startService()
        self.assertEqual(state["hits"], 1)
        self.assertEqual([m.weight for m in selector.array.members], [1, 5, 1])
        state["fail"] = True
        self.node.reactor.advance(30)
        self.assertEqual(state["hits"], 2)
        self.assertEqual([m.weight for m in selector.array.members], [1, 5, 1])
        self.node.reactor.advance(59)
        self.assertEqual(state["hits"], 2)
        self.node.reactor.advance(1)
        self.assertEqual(state["hits"], 3)
        selector.stopService()
        self.assertEqual(self.node.reactor.getDelayedCalls(), [])


class RoundsTests(SynchronousTestCase):
    """
    C{rounds}: the iPlanet polling rounds, with a scripted ICP client.
    """

    MESH = (
        "cache_peer 10.0.0.2 sibling 3128 3130 name=s1\n"
        "cache_peer 10.0.0.3 sibling 3128 3130 name=s2\n"
        "cache_peer 10.0.0.4 parent 3128 3130 name=p1 round=2\n"
        "cache_peer 10.0.0.5 parent 3128 3130 name=p2 round=2 weight=9\n"
    )

    def node(self, options: str = "", mesh: Optional[str] = None) -> tuple[Node, RoundsSelector]:
        node = Node((mesh or self.MESH) + f"selector rounds {options}\n")
        return node, node.selector()

    def test_round1HitSkipsRound2(self) -> None:
        """
        A HIT in round 1 is fetched (a sibling with only-if-cached) and
        round 2 is never asked.
        """
        node, selector = self.node()
        client = ScriptedICP({"s1": (icp.Opcode.MISS, 0.01), "s2": (icp.Opcode.HIT, 0.02),
                              "p1": (icp.Opcode.HIT, 0.001)})
        routes = self.successResultOf(maybeDeferred(selector.selectRoutes, request(), node.neighbours, client))
        self.assertEqual(routes[0], Route(node["s2"], "SIBLING_HIT", onlyIfCached=True))
        self.assertEqual([a[0] for a in client.asked], [["s1", "s2"]])

    def test_round2AskedWithoutHit(self) -> None:
        """
        Without a HIT in round 1, round 2 is asked; its HIT is fetched.
        """
        node, selector = self.node()
        client = ScriptedICP({"s1": (icp.Opcode.MISS, 0.01), "s2": (icp.Opcode.MISS, 0.02),
                              "p1": (icp.Opcode.MISS, 0.001), "p2": (icp.Opcode.HIT, 0.03)})
        routes = route(self, selector, node, icpClient=client)
        self.assertEqual(routes[0], ("p2", "PARENT_HIT"))
        self.assertEqual([a[0] for a in client.asked], [["s1", "s2"], ["p1", "p2"]])
        self.assertEqual(routes[1], ("p1", "FIRST_PARENT_MISS"))

    def test_firstParentIsFirstToAnswer(self) -> None:
        """
        C{no-hit=first-parent}: the parent whose MISS came first, whatever
        its weight; then the origin, then the other parents.
        """
        node, selector = self.node("no-hit=first-parent")
        client = ScriptedICP({"p1": (icp.Opcode.MISS, 0.05), "p2": (icp.Opcode.MISS, 0.01)})
        self.assertEqual(
            route(self, selector, node, icpClient=client),
            [("p2", "FIRST_PARENT_MISS"), (None, "HIER_DIRECT"), ("p1", "ANY_OLD_PARENT")],
        )

    def test_firstParentSkipsNoFetch(self) -> None:
        """
        MISS_NOFETCH is never chosen; with no parent answering MISS, the
        origin.
        """
        node, selector = self.node()
        client = ScriptedICP({"p1": (icp.Opcode.MISS_NOFETCH, 0.01)})
        self.assertEqual(route(self, selector, node, icpClient=client)[0], (None, "HIER_DIRECT"))

    def test_noHitOrigin(self) -> None:
        """
        C{no-hit=origin}: without a HIT, the origin, even though parents
        answered.
        """
        node, selector = self.node("no-hit=origin")
        client = ScriptedICP({"p1": (icp.Opcode.MISS, 0.01)})
        routes = route(self, selector, node, icpClient=client)
        self.assertEqual(routes[0], (None, "HIER_DIRECT"))

    def test_noHitProxy(self) -> None:
        """
        C{no-hit=proxy:HOST:PORT}: a synthetic parent for the named proxy,
        never ICP-queried, logged C{DEFAULT_PARENT}; it is also the route
        after a HIT fails.
        """
        node, selector = self.node("no-hit=proxy:192.0.2.80:8080")
        client = ScriptedICP({"p1": (icp.Opcode.MISS, 0.01)})
        routes = self.successResultOf(maybeDeferred(selector.selectRoutes, request(), node.neighbours, client))
        proxy = routes[0].neighbour
        self.assertEqual((proxy.host, proxy.httpPort, proxy.icpPort, proxy.noQuery), ("192.0.2.80", 8080, 0, True))
        self.assertEqual(routes[0].code, "DEFAULT_PARENT")
        self.assertNotIn(proxy.name, [n for names, _ in client.asked for n in names])
        self.assertEqual(routes[1], Route(None, "HIER_DIRECT"))
        hit = ScriptedICP({"s1": (icp.Opcode.HIT, 0.01)})
        routes = self.successResultOf(maybeDeferred(selector.selectRoutes, request(), node.neighbours, hit))
        self.assertEqual([r.code for r in routes[:2]], ["SIBLING_HIT", "DEFAULT_PARENT"])
        six = self.node("no-hit=proxy:[::1]:3128")[1]
        self.assertEqual((six.proxy.host, six.proxy.httpPort), ("::1", 3128))

    def test_noHitErrors(self) -> None:
        """
        A C{no-hit} that is none of the three forms is a config error.
        """
        for value in ("parent", "proxy:", "proxy:host", "proxy:host:0", "proxy:h:99999"):
            node = Node(self.MESH + f"selector rounds no-hit={value}\n")
            self.assertRaises(ConfigError, node.selector)

    def test_timeouts(self) -> None:
        """
        Each round is asked with its own timeout.
        """
        node, selector = self.node("round1-timeout=300ms round2-timeout=2s")
        client = ScriptedICP({}, timedOut=True)
        routes = self.successResultOf(maybeDeferred(selector.selectRoutes, request(), node.neighbours, client))
        self.assertEqual([a[1] for a in client.asked], [0.3, 2.0])
        self.assertTrue(routes[0].timedOut)
        self.assertRaises(ConfigError, self.node, "round1-timeout=0")

    def test_onlyRound2(self) -> None:
        """
        When no neighbour is in round 1, round 2 is asked at once.
        """
        node, selector = self.node(mesh="cache_peer 10.0.0.4 parent 3128 3130 name=p1 round=2\n")
        client = ScriptedICP({"p1": (icp.Opcode.MISS, 0.01)})
        self.assertEqual(route(self, selector, node, icpClient=client)[0], ("p1", "FIRST_PARENT_MISS"))
        self.assertEqual([a[0] for a in client.asked], [["p1"]])

    def test_roundValues(self) -> None:
        """
        Only rounds 1 and 2 exist; a multicast group may be queried in one
        round only.
        """
        node = Node(self.MESH.replace("round=2 weight", "round=3 weight") + "selector rounds\n")
        with self.assertRaises(ConfigError) as caught:
            node.selector()
        self.assertTrue(str(caught.exception).startswith("t.conf:4: cache_peer p2: round=3"))
        shared = (
            "cache_peer 239.0.0.1 multicast 3128 3130 name=g1 ttl=1\n"
            "cache_peer 239.0.0.1 multicast 3128 3130 name=g2 ttl=1 round=2\n"
            "selector rounds\n"
        )
        with self.assertRaises(ConfigError) as caught:
            Node(shared).selector()
        self.assertIn("must not share a multicast address", str(caught.exception))

    def test_multicastResponders(self) -> None:
        """
        The members of a multicast group are accepted in the round that
        queries the group, not in the other.
        """
        mesh = (
            "cache_peer 10.0.0.2 sibling 3128 3130 name=s1\n"
            "cache_peer 239.0.0.1 multicast 3128 3130 name=group ttl=2 round=2\n"
            "cache_peer 10.0.0.7 parent 3128 3130 name=m1 multicast-responder\n"
            "cache_peer 10.0.0.8 parent 3128 3130 name=m2 multicast-responder\n"
        )
        node, selector = self.node(mesh=mesh)
        client = ScriptedICP({"m2": (icp.Opcode.HIT, 0.01)})
        routes = route(self, selector, node, icpClient=client)
        self.assertEqual([a[0] for a in client.asked], [["s1"], ["group", "m1", "m2"]])
        self.assertEqual(routes[0], ("m2", "PARENT_HIT"))

    def test_notHierarchical(self) -> None:
        """
        A POST, or a URL on the stop list, is not queried: the origin first.
        """
        node, selector = self.node()
        for req in (request(method="POST"), request("http://example.com/a?b")):
            client = ScriptedICP({})
            routes = route(self, selector, node, req, icpClient=client)
            self.assertEqual(client.asked, [])
            self.assertEqual(routes[0], (None, "HIER_DIRECT"))

    def test_noCacheSkipsSiblings(self) -> None:
        """
        With C{Pragma: no-cache} the siblings are not asked.
        """
        node, selector = self.node()
        client = ScriptedICP({})
        route(self, selector, node, request(pragma="no-cache"), icpClient=client)
        self.assertEqual([a[0] for a in client.asked], [["p1", "p2"]])

    def test_proxyNeighbour(self) -> None:
        """
        L{proxyNeighbour} is an up parent that is never queried; failed
        connections put it down.
        """
        proxy = proxyNeighbour("192.0.2.1", 3128, reactor=Clock())
        self.assertEqual((proxy.type, proxy.noQuery, proxy.isUp(10)), ("parent", True, True))
        for _ in range(proxy.connectFailLimit):
            proxy.noteFetchFailed()
        self.assertFalse(proxy.isUp(10))


# ---------------------------------------------------------------------------
# Scale: 64 (the iPlanet limit) and 256 neighbours


class ScaleTests(SynchronousTestCase):
    """
    Every selector with 64 and 256 neighbours.
    """

    SIZES = (64, 256)

    def test_roundRobin(self) -> None:
        """
        Round-robin uses each of N parents exactly once per N requests.
        """
        for size in self.SIZES:
            node = Node(parents(size) + "selector round-robin\n")
            selector = node.selector()
            picks = [first(self, selector, node) for _ in range(3 * size)]
            self.assertEqual({p: picks.count(p) for p in set(picks)}, {f"p{i}": 3 for i in range(size)})
            self.assertEqual(picks[0], f"p{size - 1}")

    def test_weightedRoundRobin(self) -> None:
        """
        Weighted round-robin with equal RTTs spreads evenly; a parent with
        twice the RTT gets half as many.
        """
        for size in self.SIZES:
            node = Node(parents(size) + "selector weighted-round-robin\n")
            for i, n in enumerate(node.neighbours):
                n.rtt = 0.020 if i else 0.040
            selector = node.selector()
            picks = [first(self, selector, node) for _ in range(4 * size - 2)]
            self.assertEqual(picks.count("p0"), 2)
            self.assertEqual({picks.count(f"p{i}") for i in range(1, size)}, {4})

    def test_sourcehash(self) -> None:
        """
        Sourcehash over N parents agrees with the reference model of Squid
        for 150 clients.
        """
        for size in self.SIZES:
            node = Node(parents(size) + "selector sourcehash\n")
            selector = node.selector()
            weights = [(f"p{i}", 1) for i in range(size)]
            for i in range(150):
                client = f"10.{i % 7}.{i}.{i % 13}"
                self.assertEqual(
                    first(self, selector, node, request(client=client)), referenceSelect(weights, client, quirk=False)
                )

    def test_firstUp(self) -> None:
        """
        First-up finds the last parent when every other is down.
        """
        for size in self.SIZES:
            node = Node(parents(size) + "selector first-up-parent\n")
            for n in node.neighbours[:-1]:
                down(n)
            self.assertEqual(route(self, node.selector(), node), [(f"p{size - 1}", "FIRSTUP_PARENT"), (None, "HIER_DIRECT")])

    def test_carp(self) -> None:
        """
        CARP over N members of mixed weights agrees with the reference
        model of Squid (quirk and all), and a down member moves only its
        own URLs.
        """
        for size in self.SIZES:
            mesh = "".join(
                f"cache_peer 10.2.{i // 250}.{i % 250 + 1} parent 3128 0 name=m{i} carp weight={i % 4 + 1}\n"
                for i in range(size)
            )
            node = Node(mesh + "selector carp\n")
            selector = node.selector()
            weights = [(f"m{i}", i % 4 + 1) for i in range(size)]
            urls = syntheticURLs(40, seed=size)
            before = {}
            for url in urls:
                before[url] = first(self, selector, node, request(url))
                self.assertEqual(before[url], referenceSelect(weights, url))
            victim = node[before[urls[0]]]
            down(victim)
            for url in urls:
                after = first(self, selector, node, request(url))
                if before[url] == victim.name:
                    self.assertEqual(after, referenceSelect(weights, url, {n for n, _ in weights} - {victim.name}))
                else:
                    self.assertEqual(after, before[url])

    def _fanOut(self, size: int, plugin: Any, mesh: str, addresses: list[str]) -> tuple[Any, Any, list[FakeICPNeighbour]]:
        reactor = FakeUDPReactor(latency=0.001)
        protocol = ICPProtocol(None, reactor=reactor)
        reactor.listenUDP(3130, protocol, interface="127.0.0.1")
        client = ICPClient(protocol, reactor=reactor, timeout=1.0)
        node = Node(mesh + f"selector {plugin.name}\n", reactor=reactor)
        fakes = [FakeICPNeighbour(reactor, (a, 3130), icp.Opcode.MISS) for a in addresses]
        return node, client, fakes

    def runUntilFired(self, reactor: Any, d: Any) -> Any:
        results: list[Any] = []
        d.addBoth(results.append)
        for _ in range(2000):
            if results:
                break
            reactor.advance(0.001)
        self.assertTrue(results)
        return results[0]

    def test_roundsOverUDP(self) -> None:
        """
        The rounds selector over the fake UDP network with N neighbours:
        half siblings in round 1, half parents in round 2.  Without a HIT
        both rounds are asked and the parent that answered first is used;
        with a sibling HIT no parent is asked at all.
        """
        for size in self.SIZES:
            half = size // 2
            addresses = [f"127.1.{i // 200}.{i % 200 + 1}" for i in range(size)]
            mesh = "".join(
                f"cache_peer {a} {'sibling' if i < half else 'parent'} 3128 3130 name=n{i}"
                f"{'' if i < half else ' round=2'}\n"
                for i, a in enumerate(addresses)
            )
            node, client, fakes = self._fanOut(size, roundsSelectorPlugin, mesh, addresses)
            for i, fake in enumerate(fakes[half:]):
                fake.delay = 0.002 + 0.0001 * ((i * 37) % half)
            fastest = f"n{half + min(range(half), key=lambda i: (i * 37) % half)}"
            selector = node.selector()
            routes = self.runUntilFired(node.reactor, maybeDeferred(selector.selectRoutes, request(), node.neighbours, client))
            self.assertEqual((routes[0].neighbour.name, routes[0].code), (fastest, "FIRST_PARENT_MISS"))
            self.assertFalse(routes[0].timedOut)
            self.assertEqual([len(f.queries) for f in fakes], [1] * size)
            fakes[5].answer = icp.Opcode.HIT
            node.reactor.advance(2)
            routes = self.runUntilFired(node.reactor, maybeDeferred(selector.selectRoutes, request(URL + "2"), node.neighbours, client))
            self.assertEqual((routes[0].neighbour.name, routes[0].code), ("n5", "SIBLING_HIT"))
            self.assertEqual([len(f.queries) for f in fakes], [2] * half + [1] * half)

    def test_roundsMulticastOverUDP(self) -> None:
        """
        Round 2 as a multicast group with a TTL: one query to the group,
        the members' unicast replies accepted, a member's HIT fetched.
        """
        members = [f"127.2.0.{i + 1}" for i in range(64)]
        mesh = (
            "cache_peer 127.3.0.1 sibling 3128 3130 name=s1\n"
            "cache_peer 239.1.2.3 multicast 3128 3130 name=group ttl=4 round=2\n"
            + "".join(f"cache_peer {a} parent 3128 3130 name=m{i} multicast-responder\n" for i, a in enumerate(members))
        )
        node, client, fakes = self._fanOut(64, roundsSelectorPlugin, mesh, members)
        for fake in fakes:
            fake.port.joinGroup("239.1.2.3")
        fakes[40].answer = icp.Opcode.HIT
        sibling = FakeICPNeighbour(node.reactor, ("127.3.0.1", 3130), icp.Opcode.MISS)
        node["group"].expectedReplies = 64.0
        selector = node.selector()
        routes = self.runUntilFired(node.reactor, maybeDeferred(selector.selectRoutes, request(), node.neighbours, client))
        self.assertEqual((routes[0].neighbour.name, routes[0].code), ("m40", "PARENT_HIT"))
        self.assertEqual(len(sibling.queries), 1)
        self.assertEqual([len(f.queries) for f in fakes], [1] * 64)
        group = [p for p in node.reactor.ports.values() if p.address == ("127.0.0.1", 3130)][0]
        sent = [dst for _, dst in group.written]
        self.assertEqual(sent.count(("239.1.2.3", 3130)), 1)
        self.assertEqual(group.ttl, 4)

    def test_icpFanOut(self) -> None:
        """
        The C{icp} selector asks all N parents in one round over the fake
        UDP network and picks the first to miss.
        """
        for size in self.SIZES:
            addresses = [f"127.4.{i // 200}.{i % 200 + 1}" for i in range(size)]
            mesh = "".join(f"cache_peer {a} parent 3128 3130 name=n{i}\n" for i, a in enumerate(addresses))
            node, client, fakes = self._fanOut(size, icpSelectorPlugin, mesh, addresses)
            for i, fake in enumerate(fakes):
                fake.delay = 0.001 if i == size - 3 else 0.004
            selector = icpSelectorPlugin.selectorFromConfig(node.config.plugins["selector"], node.reactor)
            routes = self.runUntilFired(node.reactor, maybeDeferred(selector.selectRoutes, request(), node.neighbours, client))
            self.assertEqual((routes[0].neighbour.name, routes[0].code), (f"n{size - 3}", "FIRST_PARENT_MISS"))
            self.assertEqual([len(f.queries) for f in fakes], [1] * size)
            self.assertEqual(len(routes), size + 1)
