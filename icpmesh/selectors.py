# -*- test-case-name: tests.test_selectors -*-
"""
Built-in peer selectors beyond C{icp}: the parent-choosing methods Squid
has, CARP, and the iPlanet polling rounds.

  - C{round-robin}: the parent with the fewest requests per unit of weight
    (Squid's C{getRoundRobinParent}).
  - C{weighted-round-robin}: requests charged by each parent's ICP
    round-trip time, so faster parents get more (Squid's
    C{getWeightedRoundRobinParent}).
  - C{sourcehash}: the parent chosen by a hash of the client's address, so
    each client keeps using the same parent (Squid's C{sourcehash}).
  - C{first-up-parent}: the first parent in config order that is up.
  - C{carp}: the Cache Array Routing Protocol, routing every URL to the
    parent Squid 5.7 would choose (L{icpmesh.carp}); its membership table
    is served by L{CARPTableResource} and can be read from another member
    with L{fetchTable} or followed with C{table-url=}.
  - C{rounds}: ICP queries in two polling rounds (the iPlanet Web Proxy
    neighbourhood): round 2 is asked only when round 1 has no HIT, and a
    configurable "no hit" route.

The first five never send ICP.  Each considers only the neighbours that are
a parent for the request's host (C{neighbour_type_domain}) and that the
domain rules allow (C{neighbour_domain}); access control has already
removed the ones C{cache_peer_access} denies.  The parents that take part
are those with the selector's C{cache_peer} flag (C{round-robin},
C{weighted-round-robin}, C{sourcehash}, C{carp}, C{first-up}) if any parent
has it, else every parent.  After the chosen parent come fallbacks, tried
when a fetch fails: the C{default} parent and every other parent that is up
(C{ANY_OLD_PARENT}), then the origin when it may be reached directly.

Requests that Squid does not route through its parents go direct first
(then to the parents): methods other than GET and requests to
C{local_domain}/C{local_ip} servers.  Unlike C{icp}, these selectors do not
apply C{hierarchy_stoplist}: that list keeps URLs out of ICP queries, which
they do not send, and Squid (which dropped the list) sends such URLs to its
CARP parents too.  Use C{always_direct} to send URLs direct.

See C{docs/selectors.md}.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Iterable, Optional, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from zope.interface import implementer

import icpmesh
from icpmesh import icp
from icpmesh.carp import (
    DRAFT,
    SQUID,
    VARIANTS,
    ArrayMember,
    CARPArray,
    MembershipTable,
    TableError,
    TableMember,
    parseKeyParts,
    parseTable,
    renderTable,
    tableConfigID,
)
from icpmesh.config import ConfigError, NeighbourConfig, parseListen
from icpmesh.interfaces import DIRECT, AccessRequest, IPeerSelector, IPeerSelectorPlugin, Route
from icpmesh.neighbours import Neighbour
from icpmesh.selection import SelectorPolicy, hitRoute, parentFallbacks

log = Logger()

#: Squid's C{peerClearRR} period: round-robin counts start again every 5 min.
RR_RESET_INTERVAL = 300.0
#: Squid resets weighted-round-robin counts once the chosen one passes this.
WRR_COUNT_LIMIT = 1000000
#: The agent string in membership tables we publish.
AGENT = f"icpmesh/{icpmesh.__version__}"


def _flags(neighbour: Any) -> frozenset[str]:
    config = getattr(neighbour, "config", None)
    return frozenset(getattr(config, "flags", ()))


def memberNames(configs: Iterable[NeighbourConfig], flag: str) -> frozenset[str]:
    """
    The names of the configured parents that carry C{flag}; empty when none
    does (then every parent takes part).
    """
    return frozenset(c.name for c in configs if c.type == "parent" and flag in c.flags)


def clientKey(client: str) -> str:
    """
    The text C{sourcehash} hashes for a client address, as Squid prints it:
    IPv4 dotted (also for IPv4-mapped IPv6 addresses), IPv6 compressed
    without brackets.
    """
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return client
    if address.version == 6:
        mapped = address.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        return address.compressed
    return str(address)


class ParentSelector:
    """
    Shared machinery of the selectors that choose one parent without
    asking anyone: which requests go through parents, which parents take
    part, and the fallbacks after the choice.  Subclasses implement
    L{choose}.

    @cvar flag: the C{cache_peer} flag that marks participating parents.
    @cvar code: the hierarchy code of the chosen route.
    @ivar policy: the shared L{SelectorPolicy}.
    @ivar deadTimeout: C{dead_peer_timeout}, for L{Neighbour.isUp}.
    @ivar members: names of the participating parents; empty for every
        parent; C{None} to decide per request from the neighbours' flags
        (those with L{flag} if any, else all).
    """

    flag = ""
    code = ""

    def __init__(
        self,
        policy: Optional[SelectorPolicy] = None,
        deadTimeout: float = 10.0,
        members: Optional[Iterable[str]] = None,
    ) -> None:
        self.policy = policy or SelectorPolicy()
        self.deadTimeout = deadTimeout
        self.members = None if members is None else frozenset(members)

    def participants(self, parents: Sequence[Any]) -> list[Any]:
        """
        The parents (already a parent for this host and allowed) that take
        part, in config order.
        """
        members = self.members
        if members is not None:
            if not members:
                return list(parents)
            return [n for n in parents if n.name in members]
        flag = self.flag
        flagged = [n for n in parents if flag in _flags(n)]
        return flagged or list(parents)

    def parentsFirst(self, request: AccessRequest) -> bool:
        """
        Whether C{request} goes through the parents before the origin:
        a GET (HEAD too with C{query-head}) to a server that is not local.
        """
        return request.method in self.policy.methods and not self.policy.isLocal(request)

    def selectRoutes(
        self, request: AccessRequest, neighbours: Sequence[Any], icpClient: Any
    ) -> list[Route]:
        """
        The chosen parent, then the fallbacks; see the module docstring.
        """
        host = request.host
        direct = self.policy.directAllowed(request)
        allowed = [n for n in neighbours if n.allowsHost(host)]
        if direct and not self.parentsFirst(request):
            return [DIRECT] + parentFallbacks(request, allowed, self.deadTimeout, set())
        parents = [n for n in allowed if n.typeFor(host) == "parent"]
        routes = self.choose(request, self.participants(parents)) if parents else []
        used = {r.neighbour for r in routes}
        routes.extend(parentFallbacks(request, parents, self.deadTimeout, used))
        if direct:
            routes.append(DIRECT)
        return routes

    def choose(self, request: AccessRequest, members: list[Any]) -> list[Route]:
        """
        The first route(s) for C{request} among the participating
        C{members}; only neighbours that are up.
        """
        raise NotImplementedError()


class _CountingSelector(ParentSelector):
    """
    Round-robin counts, cleared like Squid's C{peerClearRR}: every
    L{resetInterval} seconds of reactor time (checked when a request is
    routed, so no timer runs), and whenever a participating parent that was
    seen down comes back up.
    """

    def __init__(
        self,
        policy: Optional[SelectorPolicy] = None,
        deadTimeout: float = 10.0,
        members: Optional[Iterable[str]] = None,
        reactor: Any = None,
        resetInterval: float = RR_RESET_INTERVAL,
    ) -> None:
        super().__init__(policy, deadTimeout, members)
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self._reactor = reactor
        self.resetInterval = resetInterval
        #: Requests charged to each parent, by name (1 when absent).
        self.counts: dict[str, int] = {}
        self._down: set[str] = set()
        self._nextReset = reactor.seconds() + resetInterval if resetInterval > 0 else None

    def clearCounts(self) -> None:
        """
        Start every parent's count again at 1 (Squid's C{peerClearRR}).
        """
        self.counts.clear()

    def upMembers(self, members: Sequence[Any]) -> list[Any]:
        """
        The members that are up, after clearing the counts when it is time
        or when one of them has come back.
        """
        if self._nextReset is not None:
            now = self._reactor.seconds()
            if now >= self._nextReset:
                self.clearCounts()
                periods = int((now - self._nextReset) // self.resetInterval) + 1
                self._nextReset += periods * self.resetInterval
        up = []
        down = self._down
        revived = False
        dead = self.deadTimeout
        for n in members:
            if n.isUp(dead):
                up.append(n)
                if down and n.name in down:
                    down.discard(n.name)
                    revived = True
            else:
                down.add(n.name)
        if revived:
            self.clearCounts()
        return up


@implementer(IPeerSelector)
class RoundRobinSelector(_CountingSelector):
    """
    C{round-robin}: the up parent with the lowest count per unit of
    C{weight}; among equal weights the lowest count; ties go to the later
    parent in config order (Squid compares with C{>=}).  The chosen
    parent's count then goes up by one.  Logged C{ROUNDROBIN_PARENT}.
    """

    flag = "round-robin"
    code = "ROUNDROBIN_PARENT"

    def choose(self, request: AccessRequest, members: list[Any]) -> list[Route]:
        counts = self.counts
        best = None
        bestCount = 0
        bestWeight = 1
        for n in self.upMembers(members):
            weight = n.weight
            if weight <= 0:
                continue
            count = counts.get(n.name, 1)
            if best is not None:
                if weight == bestWeight:
                    if bestCount < count:
                        continue
                elif bestCount / bestWeight < count / weight:
                    continue
            best, bestCount, bestWeight = n, count, weight
        if best is None:
            return []
        counts[best.name] = bestCount + 1
        return [Route(best, self.code)]


@implementer(IPeerSelector)
class WeightedRoundRobinSelector(_CountingSelector):
    """
    C{weighted-round-robin}: the up parent with the lowest count (ties to
    the later one); its count then grows by C{max(1, (rtt - basetime) /
    weight)} in milliseconds, so a parent twice as far away is chosen half
    as often.  RTTs come from ICP replies; use C{background-ping}-style
    monitoring or C{selector icp} traffic to keep them current.  When the
    chosen count passes 1,000,000 every count restarts at 0 (Squid).
    Logged C{ROUNDROBIN_PARENT}, as Squid logs it.
    """

    flag = "weighted-round-robin"
    code = "ROUNDROBIN_PARENT"

    def choose(self, request: AccessRequest, members: list[Any]) -> list[Route]:
        counts = self.counts
        best = None
        bestCount = 0
        for n in self.upMembers(members):
            count = counts.get(n.name, 1)
            if best is not None and bestCount < count:
                continue
            best, bestCount = n, count
        if best is None:
            return []
        if bestCount > WRR_COUNT_LIMIT:
            for n in members:
                counts[n.name] = 0
            bestCount = 0
        rttMs = int(best.rtt * 1000)
        baseMs = int(best.basetime * 1000)
        charge = int((rttMs - baseMs) / max(1, best.weight))
        counts[best.name] = bestCount + max(1, charge)
        return [Route(best, self.code)]


@implementer(IPeerSelector)
class FirstUpSelector(ParentSelector):
    """
    C{first-up-parent}: the first participating parent in config order
    that is up (Squid's C{FIRSTUP_PARENT}).
    """

    flag = "first-up"
    code = "FIRSTUP_PARENT"

    def choose(self, request: AccessRequest, members: list[Any]) -> list[Route]:
        dead = self.deadTimeout
        for n in members:
            if n.isUp(dead):
                return [Route(n, self.code)]
        return []


class _HashingSelector(ParentSelector):
    """
    Selection by a L{CARPArray}: the best-scoring member that is up, then
    the other members that are up in score order (the draft's "next
    highest score", so a retry goes where the request would go once the
    failed member is marked down).

    @ivar array: the array, when membership is known from config;
        otherwise one is built (and kept) per distinct member list.
    """

    variant = SQUID
    repeatKey = True

    def __init__(
        self,
        policy: Optional[SelectorPolicy] = None,
        deadTimeout: float = 10.0,
        members: Optional[Sequence[ArrayMember]] = None,
    ) -> None:
        names = None if members is None else [m.name for m in members]
        super().__init__(policy, deadTimeout, names)
        self.array: Optional[CARPArray] = None
        if members is not None:
            self.array = self.makeArray(members)
        self._arrays: dict[tuple[tuple[str, int], ...], CARPArray] = {}
        #: Members marked DOWN by an applied membership table.
        self.tableDown: frozenset[str] = frozenset()

    def makeArray(self, members: Sequence[ArrayMember]) -> CARPArray:
        return CARPArray(members, self.variant, repeatKey=self.repeatKey)

    def memberFor(self, neighbour: Any) -> ArrayMember:
        """
        The array member for a neighbour when membership is decided per
        request: its name and weight (and C{carp-key=} parts).
        """
        config = getattr(neighbour, "config", None)
        values = getattr(config, "values", None) or {}
        keyText = values.get("carp-key")
        keyParts: tuple[str, ...] = ()
        if keyText and self.flag == "carp":
            try:
                keyParts = parseKeyParts(keyText)
            except ValueError:
                log.warn("cache_peer {name}: ignoring bad carp-key={key}", name=neighbour.name, key=keyText)
        return ArrayMember(neighbour.name, int(neighbour.weight), keyParts)

    def arrayFor(self, members: Sequence[Any]) -> CARPArray:
        """
        The array for the participating C{members}.
        """
        if self.array is not None:
            return self.array
        signature = tuple((n.name, int(n.weight)) for n in members)
        array = self._arrays.get(signature)
        if array is None:
            if len(self._arrays) >= 64:
                self._arrays.clear()
            array = self._arrays[signature] = self.makeArray([self.memberFor(n) for n in members])
        return array

    def ranking(self, request: AccessRequest, array: CARPArray) -> Sequence[tuple[ArrayMember, float]]:
        """
        The array members and their scores for C{request}, best first.
        """
        raise NotImplementedError()

    def choose(self, request: AccessRequest, members: list[Any]) -> list[Route]:
        if not members:
            return []
        array = self.arrayFor(members)
        try:
            ranking = self.ranking(request, array)
        except ValueError:
            return []
        byName = {n.name: n for n in members}
        down = self.tableDown
        dead = self.deadTimeout
        routes: list[Route] = []
        chosen = False
        for member, score in ranking:
            n = byName.get(member.name)
            if n is None or (down and member.name in down) or not n.isUp(dead):
                continue
            if not chosen and score > 0:
                routes.insert(0, Route(n, self.code))
                chosen = True
            else:
                routes.append(Route(n, "ANY_OLD_PARENT"))
        if not chosen:
            return []
        return routes


@implementer(IPeerSelector)
class SourceHashSelector(_HashingSelector):
    """
    C{sourcehash}: the parent chosen by a hash of the client's address
    (L{clientKey}) with the CARP member hashes and multipliers, hashed once
    as Squid does (no CARP quirk).  Logged C{SOURCEHASH_PARENT}.
    """

    flag = "sourcehash"
    code = "SOURCEHASH_PARENT"
    repeatKey = False

    def ranking(self, request: AccessRequest, array: CARPArray) -> Sequence[tuple[ArrayMember, float]]:
        key = clientKey(request.client)
        return array.rankHashes(key, lambda: array.hashesForKey(key))


@implementer(IPeerSelector)
class CARPSelector(_HashingSelector, Service):
    """
    C{carp}: every URL goes to the array member with the highest CARP score
    (L{icpmesh.carp}), as Squid 5.7 routes it (or as the draft does, with
    C{variant=DRAFT}).  A member that is down or not allowed for the
    request hands its URLs to the next-best member; other members' URLs do
    not move.  Logged C{CARP}.

    It is also a C{Service}: with a C{tableURL} it follows the array
    membership table published there (see L{CARPTableFollower}); started
    and stopped with the node.

    @ivar arrayName: the C{ArrayName} of the table we publish.
    @ivar listTTL: the C{ListTTL} (seconds) of the table we publish.
    @ivar follower: the L{CARPTableFollower}, when a C{tableURL} is set.
    """

    flag = "carp"
    code = "CARP"

    def __init__(
        self,
        policy: Optional[SelectorPolicy] = None,
        deadTimeout: float = 10.0,
        members: Optional[Sequence[ArrayMember]] = None,
        variant: str = SQUID,
        arrayName: str = "icpmesh",
        listTTL: int = 600,
        reactor: Any = None,
        tableURL: Optional[str] = None,
        httpClient: Any = None,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown CARP variant {variant!r}; use squid or draft")
        self.variant = variant
        self.repeatKey = variant == SQUID
        super().__init__(policy, deadTimeout, members)
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self._reactor = reactor
        self.arrayName = arrayName
        self.listTTL = listTTL
        self._configured = {m.name: m for m in members or ()}
        self._seen: dict[str, Any] = {}
        self._states: dict[str, tuple[bool, float]] = {}
        self.follower: Optional[CARPTableFollower] = None
        if tableURL:
            self.follower = CARPTableFollower(self, tableURL, reactor=reactor, client=httpClient)

    def ranking(self, request: AccessRequest, array: CARPArray) -> Sequence[tuple[ArrayMember, float]]:
        if request.method == "CONNECT":
            # Squid's effective URI of a CONNECT is its authority, host:port.
            host = f"[{request.host}]" if ":" in request.host else request.host
            key = f"{host}:{request.port}"
            return array.rankHashes("CONNECT " + key, lambda: array.hashesForKey(key))
        return array.ranking(request.url)

    def choose(self, request: AccessRequest, members: list[Any]) -> list[Route]:
        if len(self._seen) < len(members):
            for n in members:
                self._seen.setdefault(n.name, n)
        return super().choose(request, members)

    # -- the membership table ----------------------------------------------

    def applyTable(self, table: MembershipTable) -> None:
        """
        Route by a membership table read from another member: its members
        and load factors replace the array (keeping each configured
        member's C{carp-key=}); its DOWN members are skipped.  Members the
        table names that are not configured neighbours cannot be used, but
        stay in the array so that every reader of the table agrees.
        """
        members = []
        for row in table.members:
            configured = self._configured.get(row.name)
            keyParts = configured.keyParts if configured is not None else ()
            members.append(ArrayMember(row.name, row.loadFactor, keyParts))
        unknown = [m.name for m in members if self._configured and m.name not in self._configured]
        if unknown:
            log.warn(
                "CARP table {name!r} lists members that are not configured "
                "neighbours (they cannot be used): {unknown}",
                name=table.arrayName,
                unknown=", ".join(unknown),
            )
        self.array = self.makeArray(members)
        self.members = frozenset(m.name for m in members)
        self.tableDown = frozenset(row.name for row in table.members if not row.up)

    def membershipTable(
        self, neighbours: Optional[Sequence[Any]] = None, tableURL: str = "-", agent: str = AGENT
    ) -> MembershipTable:
        """
        The array membership table of this selector's array.

        @param neighbours: the node's neighbours, for addresses, ports and
            states; by default the ones seen routing requests (a member not
            seen yet is listed UP at its name).
        @param tableURL: the URL the table is served at.
        """
        array = self.array
        known = dict(self._seen)
        if neighbours is not None:
            known.update((n.name, n) for n in neighbours)
        if array is None:
            participants = self.participants([n for n in known.values() if n.type == "parent"])
            array = self.arrayFor(participants) if participants else CARPArray([])
        now = self._reactor.seconds()
        rows = []
        for member in array.members:
            n = known.get(member.name)
            up = member.name not in self.tableDown and (n is None or n.isUp(self.deadTimeout))
            state = self._states.get(member.name)
            if state is None or state[0] != up:
                state = self._states[member.name] = (up, now)
            address = member.name
            port = 3128
            if n is not None:
                address = getattr(n, "icpAddress", (n.host,))[0] or n.host
                port = n.httpPort
            rows.append(
                TableMember(
                    name=member.name,
                    address=address,
                    port=port,
                    tableURL=tableURL,
                    agent=agent,
                    stateTime=int(now - state[1]),
                    up=up,
                    loadFactor=member.weight,
                    cacheSize=0,
                )
            )
        return MembershipTable(
            members=tuple(rows),
            arrayName=self.arrayName,
            configID=tableConfigID(rows),
            listTTL=int(self.listTTL),
        )

    def startService(self) -> None:
        Service.startService(self)
        if self.follower is not None:
            self.follower.startService()

    def stopService(self) -> Any:
        Service.stopService(self)
        if self.follower is not None:
            return self.follower.stopService()
        return None


class CARPTableResource(Resource):
    """
    Serves a L{CARPSelector}'s array membership table as C{text/plain}
    (draft section 2), with C{Cache-Control: max-age=ListTTL}.  Mount it
    wherever clients expect the array configuration URL, for example
    C{/carp}.
    """

    isLeaf = True

    def __init__(
        self,
        selector: CARPSelector,
        neighbours: Optional[Sequence[Any]] = None,
        tableURL: Optional[str] = None,
        agent: str = AGENT,
    ) -> None:
        """
        @param selector: the C{carp} selector whose array is published.
        @param neighbours: the node's neighbours (for states and addresses).
        @param tableURL: the URL to print in member lines; by default the
            URL this request was made to.
        @param agent: the agent string.
        """
        super().__init__()
        self.selector = selector
        self.neighbours = neighbours
        self.tableURL = tableURL
        self.agent = agent

    def render_GET(self, request: Any) -> bytes:
        url = self.tableURL
        if url is None:
            url = request.prePathURL().decode("ascii", "replace")
            if request.postpath:
                if not url.endswith("/"):
                    url += "/"
                url += "/".join(p.decode("ascii", "replace") for p in request.postpath)
        table = self.selector.membershipTable(self.neighbours, tableURL=url, agent=self.agent)
        request.setHeader(b"content-type", b"text/plain; charset=us-ascii")
        request.setHeader(b"cache-control", b"max-age=%d" % (table.listTTL,))
        return renderTable(table)


def fetchTable(url: str, client: Any = None, reactor: Any = None) -> "Deferred[MembershipTable]":
    """
    Fetch and parse the array membership table published at C{url}.

    @param client: a C{treq} client (C{treq.client.HTTPClient} or
        C{treq.testing.StubTreq}); by default one on C{reactor}.
    @return: a Deferred that fires with the L{MembershipTable}, or fails
        with L{TableError} (also for a status other than 200).
    """
    if client is None:
        from treq.client import HTTPClient
        from twisted.web.client import Agent

        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        client = HTTPClient(Agent(reactor))
    d: Deferred[Any] = maybeDeferred(client.get, url)

    def got(response: Any) -> Any:
        body = client.content(response)
        if response.code != 200:

            def refuse(_: bytes) -> None:
                raise TableError(f"HTTP status {response.code} from {url}")

            return body.addCallback(refuse)
        return body

    return d.addCallback(got).addCallback(parseTable)


class CARPTableFollower(Service):
    """
    Keeps a L{CARPSelector} routing by the membership table another member
    publishes: fetches it when started, then again after each table's
    C{ListTTL} (at least 10 s, at most a day); after a failure, the current
    array stays and the fetch is retried after a minute.

    @ivar url: where the table is published.
    @ivar table: the last table applied, or C{None}.
    """

    MIN_INTERVAL = 10.0
    MAX_INTERVAL = 86400.0
    RETRY_INTERVAL = 60.0

    def __init__(self, selector: CARPSelector, url: str, reactor: Any = None, client: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self._reactor = reactor
        self.selector = selector
        self.url = url
        self.client = client
        self.table: Optional[MembershipTable] = None
        self._call: Any = None
        self._pending: Optional[Deferred[Any]] = None

    def startService(self) -> None:
        Service.startService(self)
        self.refresh()

    def stopService(self) -> None:
        Service.stopService(self)
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._pending is not None:
            self._pending.cancel()

    def refresh(self) -> "Deferred[Any]":
        """
        Fetch the table now and apply it; schedules the next fetch.
        """
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        d = self._pending = fetchTable(self.url, self.client, self._reactor)

        def applied(table: MembershipTable) -> None:
            self.table = table
            self.selector.applyTable(table)
            self._schedule(min(self.MAX_INTERVAL, max(self.MIN_INTERVAL, float(table.listTTL))))

        def failed(f: Any) -> None:
            from twisted.internet.defer import CancelledError

            if f.check(CancelledError):
                return
            log.warn(
                "Cannot read the CARP table at {url}: {why}; keeping the current array",
                url=self.url,
                why=f.getErrorMessage(),
            )
            self._schedule(self.RETRY_INTERVAL)

        def done(result: Any) -> Any:
            self._pending = None
            return result

        d.addCallbacks(applied, failed).addBoth(done)
        return d

    def _schedule(self, delay: float) -> None:
        if self.running:
            self._call = self._reactor.callLater(delay, self.refresh)


# ---------------------------------------------------------------------------
# Polling rounds (iPlanet)

NO_HIT_FIRST_PARENT = "first-parent"
NO_HIT_ORIGIN = "origin"
NO_HIT_PROXY = "proxy"


def proxyNeighbour(
    host: str, port: int, reactor: Any = None, name: str = "no-hit-proxy",
    filename: str = "<config>", lineno: int = 0,
) -> Neighbour:
    """
    A synthetic neighbour for a named proxy that is not a C{cache_peer}
    (the C{rounds} selector's C{no-hit=proxy:HOST:PORT}): a parent that is
    never ICP-queried (ICP port 0, C{no-query}), so it counts as up until
    C{connect-fail-limit} connections to it fail, and the proxy fetches
    through it like through any parent.
    """
    config = NeighbourConfig(
        host=host,
        type="parent",
        httpPort=port,
        icpPort=0,
        name=name,
        flags=frozenset({"no-query"}),
        values={},
        filename=filename,
        lineno=lineno,
    )
    return Neighbour(config, reactor=reactor)


@implementer(IPeerSelector)
class RoundsSelector:
    """
    C{rounds}: the iPlanet Web Proxy "ICP neighborhood".  Every neighbour is
    in polling round 1 or 2 (C{round=N} on its C{cache_peer}, default 1).
    Round 1 is asked first; round 2 only when round 1 has no HIT.  Each
    round has its own timeout.  A HIT is fetched from the neighbour that
    sent it; without one, the "no hit" route is used:

      - C{first-parent}: the parent whose MISS arrived first (round 1's
        replies before round 2's), C{FIRST_PARENT_MISS}; the origin when no
        parent answered;
      - C{origin}: the origin (C{HIER_DIRECT});
      - C{proxy}: a named proxy (L{proxyNeighbour}), C{DEFAULT_PARENT}.

    Then, as fallbacks: the origin (when it may be reached directly), the
    C{default} parent and every other parent that is up.

    Neighbours of one round may share a multicast group: a C{multicast}
    neighbour with C{round=N}; the group's C{multicast-responder} members
    are accepted in every round that queries a group.  Requests that are
    not hierarchical (see L{SelectorPolicy}) are not queried.

    @ivar timeouts: the wait of round 1 and of round 2 (C{None}: the ICP
        client's timeout).
    @ivar noHit: C{first-parent}, C{origin} or C{proxy}.
    @ivar proxy: the neighbour for C{noHit="proxy"}.
    """

    def __init__(
        self,
        policy: Optional[SelectorPolicy] = None,
        deadTimeout: float = 10.0,
        timeouts: tuple[Optional[float], Optional[float]] = (None, None),
        noHit: str = NO_HIT_FIRST_PARENT,
        proxy: Any = None,
    ) -> None:
        if noHit not in (NO_HIT_FIRST_PARENT, NO_HIT_ORIGIN, NO_HIT_PROXY):
            raise ValueError(f"unknown no-hit route {noHit!r}")
        if noHit == NO_HIT_PROXY and proxy is None:
            raise ValueError("no-hit=proxy needs a proxy neighbour")
        self.policy = policy or SelectorPolicy()
        self.deadTimeout = deadTimeout
        self.timeouts = timeouts
        self.noHit = noHit
        self.proxy = proxy

    @staticmethod
    def roundOf(neighbour: Any) -> int:
        """
        A neighbour's polling round: 2 for C{round=2} or more, else 1.
        """
        return 2 if getattr(neighbour, "round", 1) >= 2 else 1

    def rounds(self, candidates: Sequence[Any]) -> tuple[list[Any], list[Any]]:
        """
        The neighbours asked in round 1 and in round 2.
        """
        lists: tuple[list[Any], list[Any]] = ([], [])
        responders = []
        for n in candidates:
            if getattr(n, "multicastResponder", False):
                responders.append(n)
            else:
                lists[self.roundOf(n) - 1].append(n)
        if responders:
            for members in lists:
                if any(n.type == "multicast" for n in members):
                    members.extend(responders)
        return lists

    def selectRoutes(
        self, request: AccessRequest, neighbours: Sequence[Any], icpClient: Any
    ) -> Any:
        """
        Ask round 1, maybe round 2, then rank; see the class docstring.
        """
        policy = self.policy
        host = request.host
        direct = policy.directAllowed(request)
        candidates = [n for n in neighbours if n.allowsHost(host)]
        if not policy.isHierarchical(request):
            routes = [DIRECT] if direct else []
            if self.proxy is not None and self.noHit == NO_HIT_PROXY:
                routes.append(Route(self.proxy, "DEFAULT_PARENT"))
            return routes + parentFallbacks(request, candidates, self.deadTimeout, set())
        if policy.noCache(request):
            candidates = [n for n in candidates if n.typeFor(host) == "parent"]
        first, second = self.rounds(candidates)
        done: list[Any] = []

        def ask(members: list[Any], timeout: Optional[float]) -> "Deferred[Any]":
            return maybeDeferred(icpClient.query, request.url, members, timeout=timeout)

        def afterFirst(result: Any) -> Any:
            if result is not None:
                done.append(result)
                if result.hit is not None or (direct and result.sourceFastest):
                    return None
            if second:
                return ask(second, self.timeouts[1]).addCallback(done.append)
            return None

        if first:
            d = ask(first, self.timeouts[0]).addCallback(afterFirst)
        else:
            d = afterFirst(None)
            if d is None:
                return self.rank(request, candidates, done, direct)
        return d.addCallback(lambda _: self.rank(request, candidates, done, direct))

    def rank(
        self, request: AccessRequest, candidates: Sequence[Any], rounds: Sequence[Any], direct: bool
    ) -> list[Route]:
        """
        Routes from the rounds that were asked.
        """
        host = request.host
        timedOut = any(r.timedOut for r in rounds)
        routes: list[Route] = []
        used: set[Any] = set()
        hit = None
        for r in rounds:
            hit = r.hit
            if hit is not None:
                break
        if hit is None and direct and any(r.sourceFastest for r in rounds):
            routes.append(Route(None, "SOURCE_FASTEST", timedOut))
            routes.extend(parentFallbacks(request, candidates, self.deadTimeout, used))
            return routes
        if hit is not None:
            routes.append(hitRoute(hit, host, timedOut))
            used.add(hit.neighbour)
        if self.noHit == NO_HIT_FIRST_PARENT:
            for r in rounds:
                first = self.firstParent(r, host, used)
                if first is not None:
                    routes.append(Route(first, "FIRST_PARENT_MISS", timedOut))
                    used.add(first)
                    break
        elif self.noHit == NO_HIT_PROXY:
            if self.proxy not in used:
                routes.append(Route(self.proxy, "DEFAULT_PARENT", timedOut))
                used.add(self.proxy)
        if direct:
            routes.append(Route(None, "HIER_DIRECT", timedOut))
        routes.extend(parentFallbacks(request, candidates, self.deadTimeout, used))
        return routes

    @staticmethod
    def firstParent(round: Any, host: str, used: set[Any]) -> Any:
        """
        The first parent whose MISS (or DECHO) arrived in C{round}.
        """
        for reply in round.replies:
            n = reply.neighbour
            if reply.opcode not in (icp.Opcode.MISS, icp.Opcode.DECHO):
                continue
            if n in used or getattr(n, "closestOnly", False):
                continue
            if n.typeFor(host) == "parent":
                return n
        return None


# ---------------------------------------------------------------------------
# Plugins


def _policy(section: Any, queryHead: bool = False) -> SelectorPolicy:
    config = section.config
    if config is None:
        return SelectorPolicy(queryHead=queryHead)
    return SelectorPolicy.fromConfig(config, queryHead=queryHead)


def _deadTimeout(section: Any) -> float:
    config = section.config
    if config is None:
        return 10.0
    return float(config.setting("dead_peer_timeout", 10.0))


def _neighbourConfigs(section: Any) -> list[NeighbourConfig]:
    config = section.config
    return list(config.neighbours) if config is not None else []


class _CountingPlugin:
    selectorClass: Any = None
    directives = ()

    def selectorFromConfig(self, section: Any, reactor: Any) -> Any:
        section.checkOptions({"reset-interval", "query-head"})
        interval = section.getDuration("reset-interval", RR_RESET_INTERVAL)
        if interval < 0:
            raise section.error("option reset-interval: must not be negative")
        cls = self.selectorClass
        return cls(
            policy=_policy(section, section.getBool("query-head", False)),
            deadTimeout=_deadTimeout(section),
            members=memberNames(_neighbourConfigs(section), cls.flag),
            reactor=reactor,
            resetInterval=interval,
        )


@implementer(IPeerSelectorPlugin)
class _RoundRobinSelectorPlugin(_CountingPlugin):
    name = "round-robin"
    description = "Squid's round-robin: parents in turn, biased by weight="
    selectorClass = RoundRobinSelector


@implementer(IPeerSelectorPlugin)
class _WeightedRoundRobinSelectorPlugin(_CountingPlugin):
    name = "weighted-round-robin"
    description = "Squid's weighted-round-robin: parents in turn, nearer (lower ICP RTT) ones more often"
    selectorClass = WeightedRoundRobinSelector


@implementer(IPeerSelectorPlugin)
class _FirstUpSelectorPlugin:
    name = "first-up-parent"
    description = "the first parent in config order that is up"
    directives = ()

    def selectorFromConfig(self, section: Any, reactor: Any) -> FirstUpSelector:
        section.checkOptions({"query-head"})
        return FirstUpSelector(
            policy=_policy(section, section.getBool("query-head", False)),
            deadTimeout=_deadTimeout(section),
            members=memberNames(_neighbourConfigs(section), FirstUpSelector.flag),
        )


def _arrayMembers(section: Any, flag: str, keys: bool) -> Optional[list[ArrayMember]]:
    configs = [c for c in _neighbourConfigs(section) if c.type == "parent"]
    if not configs and section.config is None:
        return None
    flagged = [c for c in configs if flag in c.flags]
    members = []
    for c in flagged or configs:
        keyParts: tuple[str, ...] = ()
        keyText = c.values.get("carp-key")
        if keyText and keys:
            try:
                keyParts = parseKeyParts(keyText)
            except ValueError as e:
                raise ConfigError(f"cache_peer {c.name}: {e}", c.filename, c.lineno) from None
        members.append(ArrayMember(c.name, c.weight, keyParts))
    return members


@implementer(IPeerSelectorPlugin)
class _SourceHashSelectorPlugin:
    name = "sourcehash"
    description = "Squid's sourcehash: each client address sticks to one parent (CARP maths)"
    directives = ()

    def selectorFromConfig(self, section: Any, reactor: Any) -> SourceHashSelector:
        section.checkOptions({"query-head"})
        return SourceHashSelector(
            policy=_policy(section, section.getBool("query-head", False)),
            deadTimeout=_deadTimeout(section),
            members=_arrayMembers(section, SourceHashSelector.flag, keys=False),
        )


@implementer(IPeerSelectorPlugin)
class _CARPSelectorPlugin:
    name = "carp"
    description = "Cache Array Routing Protocol: each URL to the parent Squid 5.7 would choose"
    directives = ()

    def selectorFromConfig(self, section: Any, reactor: Any) -> CARPSelector:
        section.checkOptions({"hash", "array-name", "list-ttl", "table-url", "query-head"})
        variant = section.getString("hash", SQUID)
        if variant not in VARIANTS:
            raise section.error(f"option hash: use squid or draft, not {variant!r}")
        listTTL = section.getDuration("list-ttl", 600.0)
        if listTTL < 1:
            raise section.error("option list-ttl: must be at least 1 second")
        config = section.config
        arrayName = section.getString("array-name") or (
            config.visibleHostname if config is not None else "icpmesh"
        )
        if any(ch.isspace() for ch in arrayName):
            raise section.error("option array-name: must be one word")
        tableURL = section.getString("table-url")
        if tableURL is not None and not tableURL.startswith(("http://", "https://")):
            raise section.error(f"option table-url: not an http(s) URL: {tableURL!r}")
        return CARPSelector(
            policy=_policy(section, section.getBool("query-head", False)),
            deadTimeout=_deadTimeout(section),
            members=_arrayMembers(section, CARPSelector.flag, keys=True),
            variant=variant,
            arrayName=arrayName,
            listTTL=int(listTTL),
            reactor=reactor,
            tableURL=tableURL,
        )


@implementer(IPeerSelectorPlugin)
class _RoundsSelectorPlugin:
    name = "rounds"
    description = "iPlanet ICP polling rounds: round 2 asked only without a round-1 HIT"
    directives = ()

    def selectorFromConfig(self, section: Any, reactor: Any) -> RoundsSelector:
        section.checkOptions({"round1-timeout", "round2-timeout", "no-hit", "query-head"})
        timeouts = []
        for key in ("round1-timeout", "round2-timeout"):
            value = section.getDuration(key, -1.0)
            if key in section.options and value <= 0:
                raise section.error(f"option {key}: must be more than 0")
            timeouts.append(value if value > 0 else None)
        configs = _neighbourConfigs(section)
        groups: dict[str, int] = {}
        for c in configs:
            round = int(c.values.get("round", 1))
            if round not in (1, 2):
                raise ConfigError(
                    f"cache_peer {c.name}: round={round}; the rounds selector has "
                    "polling rounds 1 and 2",
                    c.filename,
                    c.lineno,
                )
            if c.type == "multicast":
                other = groups.setdefault(c.host, round)
                if other != round:
                    raise ConfigError(
                        f"cache_peer {c.name}: multicast group {c.host} is already "
                        f"queried in round {other}; neighbours in different polling "
                        "rounds must not share a multicast address",
                        c.filename,
                        c.lineno,
                    )
        noHitText = section.getString("no-hit", NO_HIT_FIRST_PARENT) or ""
        proxy = None
        if noHitText.startswith("proxy:"):
            try:
                host, port = parseListen(noHitText[len("proxy:") :])
            except ValueError as e:
                raise section.error(f"option no-hit: {e}") from None
            if not host or port == 0:
                raise section.error("option no-hit: use proxy:HOST:PORT")
            proxy = proxyNeighbour(
                host, port, reactor=reactor, filename=section.filename, lineno=section.lineno or 0
            )
            noHit = NO_HIT_PROXY
        elif noHitText in (NO_HIT_FIRST_PARENT, NO_HIT_ORIGIN):
            noHit = noHitText
        else:
            raise section.error(
                f"option no-hit: use first-parent, origin or proxy:HOST:PORT, not {noHitText!r}"
            )
        return RoundsSelector(
            policy=_policy(section, section.getBool("query-head", False)),
            deadTimeout=_deadTimeout(section),
            timeouts=(timeouts[0], timeouts[1]),
            noHit=noHit,
            proxy=proxy,
        )


rrSelectorPlugin = _RoundRobinSelectorPlugin()
wrrSelectorPlugin = _WeightedRoundRobinSelectorPlugin()
sourcehashSelectorPlugin = _SourceHashSelectorPlugin()
firstUpSelectorPlugin = _FirstUpSelectorPlugin()
carpSelectorPlugin = _CARPSelectorPlugin()
roundsSelectorPlugin = _RoundsSelectorPlugin()

__all__ = [
    "AGENT",
    "CARPSelector",
    "CARPTableFollower",
    "CARPTableResource",
    "FirstUpSelector",
    "ParentSelector",
    "RoundRobinSelector",
    "RoundsSelector",
    "SourceHashSelector",
    "WeightedRoundRobinSelector",
    "carpSelectorPlugin",
    "clientKey",
    "fetchTable",
    "firstUpSelectorPlugin",
    "memberNames",
    "proxyNeighbour",
    "roundsSelectorPlugin",
    "rrSelectorPlugin",
    "sourcehashSelectorPlugin",
    "wrrSelectorPlugin",
    "DRAFT",
    "SQUID",
]
