# -*- test-case-name: tests.test_querier -*-
"""
The ICP querier: asking neighbours (RFC 2187 section 5.1).

L{ICPClient} decides which of the neighbours it is given to ask and how long
to wait, sends one query round through L{icpmesh.protocol.ICPProtocol} (it has
no socket of its own), keeps each neighbour's liveness and round-trip time,
and returns a L{QueryRound} for a peer selector to rank.

L{Mesh} bundles the neighbours with the client: it is what the proxy and the
selectors are handed.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Optional, Sequence
from urllib.parse import urlsplit

import attr
from zope.interface import implementer

from icpmesh import icp
from icpmesh.interfaces import IICPClient
from icpmesh.neighbours import Neighbour
from icpmesh.protocol import ICPProtocol, PendingQuery

_OPCODE_NAMES = {int(o): o.name for o in icp.Opcode}
# Plain ints: comparing with them is cheaper than looking up Opcode members.
_HIT = int(icp.Opcode.HIT)
_SECHO = int(icp.Opcode.SECHO)

#: The UDP echo port: neighbours on it get DECHO, origins get SECHO.
ECHO_PORT = 7


class _Origin:
    """
    The tag of a SECHO reply: the origin server itself.
    """

    name = "origin"
    type = "origin"

    def __repr__(self) -> str:
        return "ORIGIN"

    def typeFor(self, host: str) -> str:
        return "origin"


ORIGIN = _Origin()


@attr.s(slots=True, frozen=True, auto_attribs=True)
class Reply:
    """
    One neighbour's answer in a round.

    @ivar neighbour: who answered.
    @ivar opcode: the reply opcode.
    @ivar rtt: seconds from query to reply.
    @ivar srcRtt: C{(rttMs, hops)} from SRC_RTT, when the reply carried it.
    """

    neighbour: Any
    opcode: int
    rtt: float
    srcRtt: Optional[tuple[int, int]] = None

    @property
    def name(self) -> str:
        return _OPCODE_NAMES.get(self.opcode, str(self.opcode))


@attr.s(slots=True, auto_attribs=True)
class QueryRound:
    """
    The outcome of one query round.

    @ivar url: what was asked.
    @ivar queried: neighbours a query was sent to.
    @ivar expected: how many replies were waited for.
    @ivar replies: L{Reply}s in arrival order.
    @ivar timedOut: whether the wait ended by timeout.
    @ivar timeout: the timeout used, in seconds.
    """

    url: str
    queried: list[Neighbour]
    expected: int
    replies: list[Reply]
    timedOut: bool
    timeout: float

    @property
    def sourceFastest(self) -> bool:
        """
        Whether the origin's SECHO came back before any HIT.
        """
        for reply in self.replies:
            opcode = reply.opcode
            if opcode == _HIT:
                return False
            if opcode == _SECHO:
                return True
        return False

    @property
    def hit(self) -> Optional[Reply]:
        """
        The first HIT, if any.
        """
        for reply in self.replies:
            if reply.opcode == _HIT:
                return reply
        return None


@implementer(IICPClient)
class ICPClient:
    """
    Sends query rounds to neighbours.

    @ivar timeout: fixed timeout in seconds, or C{None} for dynamic: twice
        the average RTT of the parents expected to answer (else of the
        siblings), clamped to [C{minTimeout}, C{maxTimeout}] - Squid's rule,
        but with a floor of 50 ms rather than Squid's 5 ms, which times out
        neighbours on a busy LAN (and every new one, whose RTT is still 0).
    @ivar deadTimeout: seconds without a reply after which a neighbour is down.
    @ivar srcRtt: ask for SRC_RTT in queries (C{query_icmp}).
    @ivar sourcePing: also send ICP_OP_SECHO to the origin's echo port
        (C{source_ping}, RFC 2187 section 5.1).
    """

    def __init__(
        self,
        protocol: ICPProtocol,
        reactor: Any = None,
        timeout: Optional[float] = 2.0,
        minTimeout: float = 0.05,
        maxTimeout: float = 2.0,
        deadTimeout: float = 10.0,
        srcRtt: bool = False,
        sourcePing: bool = False,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self._reactor = reactor
        self.protocol = protocol
        self.timeout = timeout
        self.minTimeout = minTimeout
        self.maxTimeout = maxTimeout
        self.deadTimeout = deadTimeout
        self.srcRtt = srcRtt
        self.sourcePing = sourcePing
        self._addresses: dict[str, str] = {}

    def originAddress(self, url: str) -> Optional[str]:
        """
        The origin server's IP address for C{source_ping}: the URL's host
        when it is an address literal, else one learned by an earlier
        lookup.  A host seen for the first time starts a lookup in the
        background and is not pinged this time, so no request waits for DNS.
        """
        host = urlsplit(url).hostname
        if not host:
            return None
        try:
            ipaddress.ip_address(host)
            return host
        except ValueError:
            pass
        known = self._addresses.get(host)
        if known is None and host not in self._addresses:
            if len(self._addresses) >= 4096:
                self._addresses.clear()
            self._addresses[host] = ""

            def learned(ip: str) -> None:
                self._addresses[host] = ip

            self._reactor.resolve(host).addCallbacks(learned, lambda f: None)
        return known or None

    def wouldQuery(self, neighbour: Neighbour) -> bool:
        """
        Whether a query goes to C{neighbour} at all (Squid's
        C{peerWouldBePinged}): not no-query, not ICP port 0, not a
        multicast responder, not disabled.
        """
        return not (
            neighbour.noQuery
            or neighbour.icpPort == 0
            or neighbour.multicastResponder
            or neighbour.disabled
        )

    def computeTimeout(self, expected: Sequence[Neighbour]) -> float:
        """
        The wait for a round expecting replies from C{expected}.
        """
        if self.timeout is not None:
            return self.timeout
        parents = [n.rtt for n in expected if n.type == "parent" and n.rtt]
        others = [n.rtt for n in expected if n.type != "parent" and n.rtt]
        samples = parents or others
        if not samples:
            return self.maxTimeout
        value = 2 * sum(samples) / len(samples)
        return min(self.maxTimeout, max(self.minTimeout, value))

    def query(
        self,
        url: str,
        neighbours: Sequence[Neighbour],
        timeout: Optional[float] = None,
        stopOnHit: bool = True,
    ) -> Any:
        """
        Ask C{neighbours} about C{url}; see L{IICPClient.query}.

        Down neighbours are still sent a query once per C{deadTimeout} so
        they can come back, but are not waited for.  Multicast groups get
        one query; their members' replies are accepted (members are the
        C{multicast-responder} neighbours) and their expected count is the
        group's moving average.
        """
        sendTo = []
        echoes: dict[tuple[str, int], int] = {}
        acceptFrom: dict[tuple[str, int], Any] = {}
        queried = []
        expectedFrom = []
        expected = 0
        ttl = 0
        now = self._reactor.seconds()
        responders = [n for n in neighbours if n.multicastResponder]
        for n in neighbours:
            if not self.wouldQuery(n):
                continue
            up = n.isUp(self.deadTimeout)
            if not up and now - n.lastQuery <= self.deadTimeout:
                continue
            queried.append(n)
            n.noteQuerySent()
            if n.icpPort == ECHO_PORT and n.type != "multicast":
                # A "dumb cache" on the echo port gets ICP_OP_DECHO; the
                # echo counts as a MISS from a parent (RFC 2187 5.3.5).
                echoes[n.icpAddress] = icp.Opcode.DECHO
                acceptFrom[n.icpAddress] = n
                if up:
                    expected += 1
                    expectedFrom.append(n)
                continue
            sendTo.append(n.icpAddress)
            if n.type == "multicast":
                # One datagram per group, one TTL per round: the largest.
                ttl = max(ttl, n.ttl)
                if n.groupCounted:
                    expected += int(n.expectedReplies)
                else:
                    # Before the first member count (10 s after start),
                    # Squid expects no reply and so never waits for the
                    # group.  We wait for up to every configured member
                    # instead; the round ends at the timeout or on a HIT.
                    expected += len(responders)
                if up:
                    expectedFrom.append(n)
                continue
            acceptFrom[n.icpAddress] = n
            if up:
                expected += 1
                expectedFrom.append(n)
        for n in responders:
            acceptFrom.setdefault(n.icpAddress, n)
        if self.sourcePing and (sendTo or echoes):
            origin = self.originAddress(url)
            if origin is not None:
                # RFC 2187 source_ping: an ICP_OP_SECHO to the origin's echo
                # port; if it comes back before any HIT, the origin is the
                # fastest source.
                echoes[(origin, ECHO_PORT)] = icp.Opcode.SECHO
                acceptFrom[(origin, ECHO_PORT)] = ORIGIN
        wait = timeout if timeout is not None else self.computeTimeout(expectedFrom)
        if ttl:
            self.protocol.setMulticastTTL(ttl)
        if not sendTo and not echoes:
            return _succeed(QueryRound(url, [], 0, [], False, wait))

        def onReply(n: Any, message: icp.Message, rtt: float) -> None:
            if n is not ORIGIN:
                n.noteReply(_OPCODE_NAMES.get(message.opcode, "?"), rtt)

        def isComplete(pending: PendingQuery, message: icp.Message) -> bool:
            # HIT and SECHO are forwarded at once (RFC 2187 5.3).
            opcode = message.opcode
            return stopOnHit and (opcode == _HIT or opcode == _SECHO)

        d = self.protocol.sendQuery(
            url,
            sendTo,
            acceptFrom,
            wait,
            expected=expected,
            options=icp.FLAG_SRC_RTT if self.srcRtt else 0,
            isComplete=isComplete,
            onReply=onReply,
            echoes=echoes,
        )

        def done(pending: PendingQuery) -> QueryRound:
            replies = []
            for n, message, rtt in pending.replies:
                srcRtt = None
                if message.options & icp.FLAG_SRC_RTT:
                    srcRtt = icp.parseSrcRtt(message.optionData)
                replies.append(Reply(n, message.opcode, rtt, srcRtt))
            return QueryRound(url, queried, expected, replies, pending.timedOut, wait)

        return d.addCallback(done)


def _succeed(value: Any) -> Any:
    from twisted.internet.defer import succeed

    return succeed(value)


class Mesh:
    """
    The neighbours and the ICP client, as handed to the proxy and the peer
    selector.

    @ivar neighbours: every configured L{Neighbour}.
    @ivar icp: the L{ICPClient} (or any L{IICPClient}).
    @ivar failureRatio: told about every fetch, so that a run of failures
        puts the ICP responder in hit-only mode; may be C{None}.
    """

    def __init__(
        self, neighbours: Sequence[Neighbour], icp: Any, failureRatio: Any = None
    ) -> None:
        self.neighbours = list(neighbours)
        self.icp = icp
        self.failureRatio = failureRatio

    def noteFetchFailed(self, neighbour: Optional[Neighbour]) -> None:
        """
        A fetch from C{neighbour} (C{None}: the origin) failed to connect
        or broke.
        """
        if neighbour is not None:
            neighbour.noteFetchFailed()
        if self.failureRatio is not None:
            self.failureRatio.noteFetch(False)

    def noteFetchSucceeded(self, neighbour: Optional[Neighbour]) -> None:
        """
        A fetch from C{neighbour} (C{None}: the origin) succeeded.
        """
        if neighbour is not None:
            neighbour.noteFetchSucceeded()
        if self.failureRatio is not None:
            self.failureRatio.noteFetch(True)
