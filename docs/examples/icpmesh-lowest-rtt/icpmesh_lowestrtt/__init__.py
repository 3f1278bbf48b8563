# -*- test-case-name: test_lowestrtt -*-
"""
An icpmesh peer selector: send each request to the parent with the lowest
measured ICP round-trip time.

Chosen in the node's config file with::

    selector lowest-rtt [max-age=DURATION]

Every neighbour keeps a moving average of its ICP round-trip time
(L{icpmesh.neighbours.Neighbour.rtt}), updated whenever it answers a query.
While every parent that is up has answered within C{max-age} (default 60
seconds), the selector picks the parent with the lowest average and sends no
query at all.  When a parent's RTT is unknown or older than that, it asks all
the parents about the request's URL through the node's ICP client (it never
opens a socket of its own) and picks the one whose reply came back first.
A parent whose last reply was MISS_NOFETCH, DENIED or ERR is not chosen
until it answers HIT or MISS again.

The chosen parent gets the hierarchy code C{CLOSEST_PARENT}.  After it come
the same fallbacks the built-in selectors use, tried when a fetch fails: the
C{default} parent and every other parent that is up (L{parentFallbacks}),
then the origin server when it may be reached directly.  Requests that are
not hierarchical (not a GET, a URL on C{hierarchy_stoplist}, a
C{local_domain} server) go to the origin first and ask nobody, as with the
built-in C{icp} selector.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from twisted.internet.defer import Deferred
from zope.interface import implementer

from icpmesh import icp
from icpmesh.interfaces import (
    DIRECT,
    AccessRequest,
    IICPClient,
    IPeerSelector,
    IPeerSelectorPlugin,
    Route,
)
from icpmesh.selection import SelectorPolicy, parentFallbacks

__version__ = "1.0"

#: Seconds a measured RTT is trusted before the parents are asked again.
DEFAULT_MAX_AGE = 60.0

#: Replies that say "you may fetch this from me"; MISS_NOFETCH, DENIED and
#: ERR replies still measure the RTT but rule the parent out this time.
FETCHABLE = frozenset({icp.Opcode.HIT, icp.Opcode.MISS, icp.Opcode.DECHO})


@implementer(IPeerSelector)
class LowestRTTSelector:
    """
    Route to the parent with the lowest ICP round-trip time.

    @ivar policy: which requests are hierarchical and whether the origin may
        be reached directly (shared with the built-in selectors).
    @ivar maxAge: seconds a neighbour's measured RTT stays good enough to
        choose without asking.
    @ivar deadTimeout: C{dead_peer_timeout}, for
        L{icpmesh.neighbours.Neighbour.isUp}.
    """

    def __init__(
        self,
        policy: Optional[SelectorPolicy] = None,
        maxAge: float = DEFAULT_MAX_AGE,
        deadTimeout: float = 10.0,
        reactor: Any = None,
    ) -> None:
        """
        @param reactor: supplies the time (C{reactor.seconds()}); the global
            reactor when not given.
        """
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self._reactor = reactor
        self.policy = policy or SelectorPolicy()
        self.maxAge = maxAge
        self.deadTimeout = deadTimeout
        #: Parents whose last reply was MISS_NOFETCH, DENIED or ERR: not
        #: chosen until they answer a later query with HIT or MISS.
        self.refusing: set[Any] = set()

    def selectRoutes(
        self, request: AccessRequest, neighbours: Sequence[Any], icpClient: IICPClient
    ) -> list[Route] | Deferred[list[Route]]:
        """
        The routes for C{request}; see the module docstring.

        @param request: what is being fetched.
        @param neighbours: the neighbours access control allows for it.
        @param icpClient: the node's ICP client.
        @return: the routes, or a Deferred firing with them when the parents
            had to be asked first.
        """
        host = request.host
        direct = self.policy.directAllowed(request)
        parents = [
            n for n in neighbours if n.allowsHost(host) and n.typeFor(host) == "parent"
        ]
        if not self.policy.isHierarchical(request):
            routes = [DIRECT] if direct else []
            return routes + parentFallbacks(request, parents, self.deadTimeout, set())
        known = self.knownRTTs(parents)
        if known is not None:
            return self.routesFor(request, parents, known, direct)
        d: Deferred[Any] = icpClient.query(
            request.url, self.asked(parents), stopOnHit=False
        )

        def measured(round: Any) -> list[Route]:
            rtts = {}
            for reply in round.replies:
                if reply.neighbour not in parents:
                    continue
                if reply.opcode in FETCHABLE:
                    rtts[reply.neighbour] = reply.rtt
                    self.refusing.discard(reply.neighbour)
                else:
                    self.refusing.add(reply.neighbour)
            return self.routesFor(request, parents, rtts, direct, round.timedOut)

        return d.addCallback(measured)

    def asked(self, parents: Sequence[Any]) -> list[Any]:
        """
        The parents an ICP query can measure: not C{no-query}, ICP port not 0.
        """
        return [n for n in parents if not n.noQuery and n.icpPort != 0]

    def knownRTTs(self, parents: Sequence[Any]) -> Optional[dict[Any, float]]:
        """
        The RTT of every parent that can be measured, is up and did not
        refuse, when all of them answered within L{maxAge}; C{None} when they
        have to be asked.

        A parent that is down is left out, except once per C{deadTimeout}:
        then it is asked again (with the others) so that it can come back,
        which is when the ICP client would send it a query anyway.
        """
        now = self._reactor.seconds()
        known = {}
        for n in self.asked(parents):
            if not n.isUp(self.deadTimeout):
                if now - n.lastQuery > self.deadTimeout:
                    return None
                continue
            if n.rtt <= 0 or now - n.lastReply > self.maxAge:
                return None
            if n not in self.refusing:
                known[n] = n.rtt
        return known

    def routesFor(
        self,
        request: AccessRequest,
        parents: Sequence[Any],
        rtts: dict[Any, float],
        direct: bool,
        timedOut: bool = False,
    ) -> list[Route]:
        """
        The parent with the lowest RTT in C{rtts} (the first in config order
        on a tie), then the fallbacks, then the origin if allowed.
        """
        routes = []
        used = set()
        ranked = [(rtts[n], i) for i, n in enumerate(parents) if n in rtts]
        if ranked:
            best = parents[min(ranked)[1]]
            routes.append(Route(best, "CLOSEST_PARENT", timedOut))
            used.add(best)
        routes.extend(parentFallbacks(request, parents, self.deadTimeout, used))
        if direct:
            routes.append(Route(None, "HIER_DIRECT", timedOut))
        return routes


@implementer(IPeerSelectorPlugin)
class LowestRTTPlugin:
    """
    The plugin object: found by C{twisted.plugin.getPlugins} through the
    drop-in C{twisted/plugins/icpmesh_lowestrtt_plugin.py}, chosen with
    C{selector lowest-rtt}.
    """

    name = "lowest-rtt"
    description = "the parent with the lowest measured ICP round-trip time"
    directives = ()

    def selectorFromConfig(self, section: Any, reactor: Any) -> LowestRTTSelector:
        """
        Build the selector from its config line and the node's settings.

        @raise icpmesh.config.ConfigError: for an unknown option or a bad
            C{max-age}, naming the file and line.
        """
        section.checkOptions({"max-age"})
        maxAge = section.getDuration("max-age", DEFAULT_MAX_AGE)
        if maxAge < 0:
            raise section.error("max-age must not be negative")
        config = section.config
        return LowestRTTSelector(
            SelectorPolicy.fromConfig(config),
            maxAge=maxAge,
            deadTimeout=float(config.setting("dead_peer_timeout", 10.0)),
            reactor=reactor,
        )


#: The one plugin object the drop-in imports.
lowestRTT = LowestRTTPlugin()

__all__ = ["LowestRTTPlugin", "LowestRTTSelector", "lowestRTT"]
