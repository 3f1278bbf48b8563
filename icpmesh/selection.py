# -*- test-case-name: tests.test_selection -*-
"""
Built-in peer selectors.

C{icp} (the default) is RFC 2187's algorithm (sections 5.1.1 and 5.3.9):

  1. Requests that are not hierarchical go direct: methods other than GET
     (HEAD too with C{selector icp query-head=on}), URLs on the stop list
     (C{hierarchy_stoplist}; default: URLs containing C{?} or C{cgi-bin}, so
     private query strings never leave the node, section 9.3), and requests
     to local servers (C{local_domain}, C{local_ip}).
  2. Otherwise the neighbours that may serve the URL are asked
     (siblings are skipped when the client sent C{Pragma: no-cache} or
     C{Cache-Control: no-cache}); with C{single_parent_bypass on} and only
     one parent and no siblings, the parent is used without asking.
  3. A HIT is fetched from the neighbour that sent it (with
     C{Cache-Control: only-if-cached} for a sibling); then the parent with
     the lowest SRC_RTT to the origin (C{CLOSEST_PARENT_MISS}); then the
     first parent to miss, its RTT less C{basetime} divided by C{weight}
     (C{FIRST_PARENT_MISS}); then the origin (C{HIER_DIRECT}) - unless the
     origin is outside the firewall (C{inside_firewall} lists the domains we
     may reach directly), in which case the C{default} parent
     (C{DEFAULT_PARENT}) and then any parent that is up.
  4. Every later route is a fallback tried when an earlier one fails.

The proxy applies C{always_direct} and C{never_direct} from access control
around whatever a selector returns.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Optional, Sequence

from twisted.internet.defer import Deferred, maybeDeferred
from zope.interface import implementer

from icpmesh import icp
from icpmesh.interfaces import (
    DIRECT,
    AccessRequest,
    IPeerSelector,
    IPeerSelectorPlugin,
    Route,
)

DEFAULT_STOPLIST = ("?", "cgi-bin")


def _domainMatch(host: str, domain: str) -> bool:
    domain = domain.lower()
    if domain.startswith("."):
        return host == domain[1:] or host.endswith(domain)
    return host == domain


class SelectorPolicy:
    """
    The request classification every built-in selector shares: what is
    hierarchical, what is local, what is inside the firewall.
    """

    def __init__(
        self,
        stoplist: Sequence[str] = DEFAULT_STOPLIST,
        localDomains: Sequence[str] = (),
        localNetworks: Sequence[str] = (),
        insideFirewall: Optional[Sequence[str]] = None,
        queryHead: bool = False,
    ) -> None:
        self.stoplist = tuple(stoplist)
        self.localDomains = tuple(d.lower() for d in localDomains)
        self.localNetworks = tuple(
            ipaddress.ip_network(n, strict=False) for n in localNetworks
        )
        self.insideFirewall = (
            None if insideFirewall is None else tuple(d.lower() for d in insideFirewall)
        )
        self.methods = ("GET", "HEAD") if queryHead else ("GET",)

    @classmethod
    def fromConfig(cls, config: Any, queryHead: bool = False) -> "SelectorPolicy":
        """
        Read C{hierarchy_stoplist}, C{local_domain}, C{local_ip} and
        C{inside_firewall} from a L{icpmesh.config.MeshConfig}.
        """

        def joined(name: str) -> Optional[list[str]]:
            values = config.setting(name)
            if values is None:
                return None
            return [word for line in values for word in line]

        stop = joined("hierarchy_stoplist")
        if stop == ["none"]:
            stop = []
        return cls(
            stoplist=DEFAULT_STOPLIST if stop is None else stop,
            localDomains=joined("local_domain") or (),
            localNetworks=joined("local_ip") or (),
            insideFirewall=joined("inside_firewall"),
            queryHead=queryHead,
        )

    def isLocal(self, request: AccessRequest) -> bool:
        host = request.host
        for domain in self.localDomains:
            if _domainMatch(host, domain):
                return True
        if self.localNetworks:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                return False
            return any(address in net for net in self.localNetworks)
        return False

    def isHierarchical(self, request: AccessRequest) -> bool:
        if request.method not in self.methods:
            return False
        url = request.url
        for word in self.stoplist:
            if word in url:
                return False
        return not self.isLocal(request)

    def directAllowed(self, request: AccessRequest) -> bool:
        """
        Whether the origin may be reached directly (firewall mode).
        """
        if self.insideFirewall is None or self.isLocal(request):
            return True
        return any(_domainMatch(request.host, d) for d in self.insideFirewall)

    @staticmethod
    def noCache(request: AccessRequest) -> bool:
        headers = request.headers
        pragma = headers.get("pragma", "")
        cc = headers.get("cache-control", "")
        return "no-cache" in pragma.lower() or "no-cache" in cc.lower()


def parentFallbacks(
    request: AccessRequest, neighbours: Sequence[Any], deadTimeout: float, used: set[Any]
) -> list[Route]:
    """
    The C{default} parent, then every other parent that is up, in config
    order, as fallbacks (Squid's C{DEFAULT_PARENT} and C{ANY_OLD_PARENT}).
    """
    routes = []
    parents = [n for n in neighbours if n.typeFor(request.host) == "parent"]
    for n in parents:
        if n.isDefault and n not in used and n.isUp(deadTimeout):
            routes.append(Route(n, "DEFAULT_PARENT"))
            used.add(n)
    for n in parents:
        if n not in used and n.isUp(deadTimeout):
            routes.append(Route(n, "ANY_OLD_PARENT"))
            used.add(n)
    return routes


def hitRoute(hit: Any, host: str, timedOut: bool) -> Route:
    """
    The route for an ICP HIT: C{PARENT_HIT}, or C{SIBLING_HIT} with
    C{only-if-cached} (unless the sibling has C{allow-miss}), so a sibling
    cannot turn our request into a miss it fetches for us.
    """
    n = hit.neighbour
    kind = n.typeFor(host)
    code = "PARENT_HIT" if kind == "parent" else "SIBLING_HIT"
    return Route(n, code, timedOut, onlyIfCached=kind == "sibling" and not n.allowMiss)


@implementer(IPeerSelector)
class ICPSelector:
    """
    RFC 2187's selection; see the module docstring.
    """

    def __init__(
        self,
        policy: Optional[SelectorPolicy] = None,
        singleParentBypass: bool = False,
        deadTimeout: float = 10.0,
    ) -> None:
        self.policy = policy or SelectorPolicy()
        self.singleParentBypass = singleParentBypass
        self.deadTimeout = deadTimeout

    def selectRoutes(
        self, request: AccessRequest, neighbours: Sequence[Any], icpClient: Any
    ) -> Any:
        policy = self.policy
        if not neighbours:
            # Nobody to ask (a node without neighbours): the origin, if allowed.
            return [DIRECT] if policy.directAllowed(request) else []
        host = request.host
        candidates = [n for n in neighbours if n.allowsHost(host)]
        direct = policy.directAllowed(request)
        if not candidates:
            return [DIRECT] if direct else []
        if not policy.isHierarchical(request):
            used: set[Any] = set()
            return ([DIRECT] if direct else []) + parentFallbacks(
                request, candidates, self.deadTimeout, used
            )
        if policy.noCache(request):
            candidates = [n for n in candidates if n.typeFor(host) == "parent"]
        parents = [n for n in candidates if n.typeFor(host) == "parent"]
        if self.singleParentBypass and len(parents) == 1 and len(candidates) == 1:
            return [Route(parents[0], "SINGLE_PARENT")] + ([DIRECT] if direct else [])
        d: Deferred[Any] = maybeDeferred(icpClient.query, request.url, candidates)
        return d.addCallback(self._rank, request, candidates, direct)

    def _rank(
        self, round: Any, request: AccessRequest, candidates: Sequence[Any], direct: bool
    ) -> list[Route]:
        host = request.host
        timedOut = round.timedOut
        routes: list[Route] = []
        used: set[Any] = set()
        hit = round.hit
        if hit is None and direct and getattr(round, "sourceFastest", False):
            # The origin answered our SECHO before any neighbour had a HIT.
            routes.append(Route(None, "SOURCE_FASTEST", timedOut))
            routes.extend(parentFallbacks(request, candidates, self.deadTimeout, used))
            return routes
        if hit is not None:
            routes.append(hitRoute(hit, host, timedOut))
            used.add(hit.neighbour)
        closest = None
        first = None
        firstScore = 0.0
        for reply in round.replies:
            n = reply.neighbour
            if n.typeFor(host) != "parent" or n in used:
                continue
            if reply.opcode not in (icp.Opcode.MISS, icp.Opcode.DECHO):
                continue
            if reply.srcRtt is not None and 0 < reply.srcRtt[0] < 0xFFFF:
                if closest is None or reply.srcRtt[0] < closest[0]:
                    closest = (reply.srcRtt[0], n)
                continue
            if n.closestOnly:
                continue
            score = max(1.0, (reply.rtt * 1000.0 - n.basetime * 1000.0) / n.weight)
            if first is None or score < firstScore:
                first, firstScore = n, score
        if closest is not None:
            routes.append(Route(closest[1], "CLOSEST_PARENT_MISS", timedOut))
            used.add(closest[1])
        elif first is not None:
            routes.append(Route(first, "FIRST_PARENT_MISS", timedOut))
            used.add(first)
        if direct:
            routes.append(Route(None, "HIER_DIRECT", timedOut))
        routes.extend(parentFallbacks(request, candidates, self.deadTimeout, used))
        return routes


@implementer(IPeerSelectorPlugin)
class _ICPSelectorPlugin:
    name = "icp"
    description = "RFC 2187 selection: ask neighbours over ICP, then hit, closest/first parent miss, direct"
    directives = ()

    def selectorFromConfig(self, section: Any, reactor: Any) -> ICPSelector:
        section.checkOptions({"query-head"})
        config = section.config
        return ICPSelector(
            SelectorPolicy.fromConfig(config, queryHead=section.getBool("query-head", False)),
            singleParentBypass=bool(config.setting("single_parent_bypass", False)),
            deadTimeout=float(config.setting("dead_peer_timeout", 10.0)),
        )


icpSelectorPlugin = _ICPSelectorPlugin()
