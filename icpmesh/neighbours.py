# -*- test-case-name: tests.test_querier -*-
"""
Neighbour caches and their live state.

A L{Neighbour} is built from a C{cache_peer} line (L{NeighbourConfig}) and
carries what the node learns about it while running: its ICP round-trip time
(a moving average as Squid keeps it), when it last answered, reply counts by
opcode, and whether it is up.

Liveness is time-based, as in Squid (C{dead_peer_timeout}, default 10 s):
a neighbour is B{down} once a query has gone unanswered for longer than that.
RFC 2187 5.1.3's "20 unanswered queries" would mark a neighbour dead after a
burst of 20 requests in one second, or keep a dead one for minutes on a quiet
node; a time limit behaves the same at any request rate.  A down neighbour is
still sent a query once per C{dead_peer_timeout} so it can come back, but
nobody waits for its reply.  Failed TCP connections to its HTTP port
(C{connect-fail-limit}, default 10) also mark it down until a fetch or a
probe connection succeeds.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Optional

from twisted.logger import Logger

from icpmesh.config import NeighbourConfig

log = Logger()


class Neighbour:
    """
    A configured neighbour and its live state.

    @ivar config: the C{cache_peer} line.
    @ivar name: unique name.
    @ivar host: address as configured.
    @ivar httpPort: HTTP port.
    @ivar icpPort: ICP port (0: never queried).
    @ivar type: C{parent}, C{sibling} or C{multicast}.
    @ivar icpAddress: C{(ip, port)} replies must come from.
    @ivar rtt: average ICP round-trip time in seconds (0 until measured).
    @ivar pingsSent: queries sent.
    @ivar pingsAcked: replies received.
    @ivar lastQuery: reactor time of the last query sent.
    @ivar lastReply: reactor time of the last reply.
    @ivar probeStart: time of the first unanswered query, or 0.
    @ivar replyCounts: replies by opcode name.
    @ivar tcpFailures: consecutive failed connections to the HTTP port.
    @ivar disabled: set when it answers DENIED too often (RFC 2187 5.3.1).
    @ivar expectedReplies: for multicast groups, the moving average of
        members that answer.
    """

    def __init__(self, config: NeighbourConfig, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self._reactor = reactor
        self.config = config
        self.name = config.name
        self.host = config.host
        self.httpPort = config.httpPort
        self.icpPort = config.icpPort
        self.type = config.type
        flags = config.flags
        self.noQuery = "no-query" in flags
        self.proxyOnly = "proxy-only" in flags
        self.allowMiss = "allow-miss" in flags
        self.closestOnly = "closest-only" in flags
        self.isDefault = "default" in flags
        self.multicastResponder = "multicast-responder" in flags
        self.multicastSiblings = "multicast-siblings" in flags
        self.tls = "tls" in flags
        self.weight = config.weight
        self.basetime = float(config.values.get("basetime", 0.0))
        self.ttl = int(config.values.get("ttl", 1))
        self.connectTimeout = float(config.values.get("connect-timeout", 30.0))
        self.connectFailLimit = max(1, int(config.values.get("connect-fail-limit", 10)))
        self.round = int(config.values.get("round", 1))
        self.icpAddress = (config.host, config.icpPort)
        self.rtt = 0.0
        self.pingsSent = 0
        self.pingsAcked = 0
        self.lastQuery = 0.0
        self.lastReply = 0.0
        self.probeStart = 0.0
        self.replyCounts: Counter[str] = Counter()
        self.tcpFailures = 0
        self.disabled = False
        self.expectedReplies = 0.0
        self._timesCounted = 0
        self.loggedDown = False

    def __repr__(self) -> str:
        return f"<Neighbour {self.name} {self.type} {self.host}:{self.httpPort}/{self.icpPort}>"

    # -- per-request type and domain rules ---------------------------------

    def typeFor(self, host: str) -> str:
        """
        C{parent} or C{sibling} for a request to C{host}
        (C{neighbour_type_domain}); multicast groups with
        C{multicast-siblings} count as siblings.
        """
        for kind, domains in self.config.typeDomains:
            for domain in domains:
                if _domainMatch(host, domain):
                    return kind
        if self.type == "multicast":
            return "sibling" if self.multicastSiblings else "parent"
        return self.type

    def allowsHost(self, host: str) -> bool:
        """
        Whether C{neighbour_domain} rules let this neighbour be used for a
        request to C{host} (RFC 2187's C{cache_host_domain}): the first
        matching rule decides; with no match, the answer is the opposite of
        the last rule (so a list of exclusions allows the rest); with no
        rules, allowed.
        """
        rules = self.config.domains
        if not rules:
            return True
        for domain, allow in rules:
            if _domainMatch(host, domain):
                return allow
        return not rules[-1][1]

    # -- liveness -----------------------------------------------------------

    def isUp(self, deadTimeout: float) -> bool:
        """
        Whether the neighbour counts as up: not disabled, its HTTP port not
        failing, and no query unanswered for longer than C{deadTimeout}.
        """
        if self.disabled or self.tcpFailures >= self.connectFailLimit:
            return False
        if self.noQuery or self.icpPort == 0:
            return True
        if self.probeStart and self._reactor.seconds() - self.probeStart > deadTimeout:
            if not self.loggedDown:
                self.loggedDown = True
                log.warn("Detected DEAD {type}: {name}", type=self.type, name=self.name)
            return False
        return True

    def noteQuerySent(self) -> None:
        now = self._reactor.seconds()
        self.pingsSent += 1
        self.lastQuery = now
        if not self.probeStart and self.type != "multicast":
            self.probeStart = now

    def noteReply(self, opcodeName: str, rtt: Optional[float]) -> None:
        """
        Record a reply: the neighbour is alive; update the RTT average like
        Squid (samples from 1 ms to 10 s; N capped at 50).
        """
        self.pingsAcked += 1
        self.lastReply = self._reactor.seconds()
        self.probeStart = 0.0
        if self.loggedDown:
            self.loggedDown = False
            log.info("Detected REVIVED {type}: {name}", type=self.type, name=self.name)
        self.replyCounts[opcodeName] += 1
        if rtt is not None and 0.0 <= rtt <= 10.0:
            n = min(self.pingsAcked, 50)
            self.rtt = (self.rtt * (n - 1) + max(rtt, 0.001)) / n
        if opcodeName == "DENIED":
            denied = self.replyCounts["DENIED"]
            if self.pingsAcked > 100 and denied * 100 > 95 * self.pingsAcked:
                if not self.disabled:
                    log.error(
                        "95% of replies from neighbour {name} are DENIED; "
                        "no longer querying it (fix its icp_access, then restart)",
                        name=self.name,
                    )
                self.disabled = True

    def noteFetchFailed(self) -> None:
        self.tcpFailures += 1
        if self.tcpFailures == self.connectFailLimit:
            log.warn(
                "Detected DEAD {type}: {name} ({n} connection failures)",
                type=self.type,
                name=self.name,
                n=self.tcpFailures,
            )

    def noteFetchSucceeded(self) -> None:
        if self.tcpFailures >= self.connectFailLimit:
            log.info("Detected REVIVED {type}: {name}", type=self.type, name=self.name)
        self.tcpFailures = 0

    @property
    def groupCounted(self) -> bool:
        """
        Multicast groups: whether at least one member count has finished.
        """
        return self._timesCounted > 0

    def noteGroupCount(self, replies: int) -> None:
        """
        Multicast groups: fold one probe's reply count into the moving
        average (N capped at 10, as Squid).
        """
        self._timesCounted += 1
        n = min(self._timesCounted, 10)
        self.expectedReplies = (self.expectedReplies * (n - 1) + replies) / n


def _domainMatch(host: str, domain: str) -> bool:
    if domain.startswith("."):
        return host == domain[1:] or host.endswith(domain)
    return host == domain
