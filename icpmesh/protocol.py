# -*- test-case-name: tests.test_protocol -*-
"""
The ICP datagram protocol: decode, dispatch, correlate, time out.

L{ICPProtocol} owns the node's one ICP socket.  It decodes every datagram
with L{icpmesh.icp}; hands QUERY messages to a responder (policy, see
L{icpmesh.server}); matches replies to the query rounds it sent, by request
number, source address and URL; and ends each round when it is complete or
its timeout, scheduled on the injected reactor, fires.  It holds no policy of
its own, in the style of C{twisted.names.dns.DNSDatagramProtocol}.

Malformed datagrams never raise: they are counted in L{ICPProtocol.counters}
and logged at a bounded rate.  A QUERY whose URL framing is broken (no NUL
terminator, trailing bytes) is answered with ICP_OP_ERR and an empty URL, as
Squid does; everything else that cannot be decoded is dropped (RFC 2186 gives
no way to answer a datagram whose header cannot be trusted).
"""

from __future__ import annotations

import struct
from collections import Counter
from typing import Any, Callable, Optional, Protocol, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.error import InvalidAddressError
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from icpmesh import icp

log = Logger()

Address = tuple[str, int]

#: Reply opcodes that take L{ICPProtocol}'s raw-bytes path: what neighbours
#: answer a query with.  Echoes, ERR, INVALID and HIT_OBJ are decoded.
_FAST_REPLY_OPCODES = frozenset(
    int(o) for o in (icp.Opcode.HIT, icp.Opcode.MISS, icp.Opcode.MISS_NOFETCH, icp.Opcode.DENIED)
)
_MAX_MESSAGE_LENGTH = icp.MAX_MESSAGE_LENGTH
_OPCODES = icp.OPCODES_BY_NUMBER
_REPLY_WORDS = struct.Struct("!IIII")
#: Distinct reply datagrams per query whose decoded L{icp.Message} is kept
#: for sharing with identical replies.
_SHARED_MESSAGES_MAX = 16
#: Cap on the set of neighbour addresses already checked by C{write}.
MAX_CHECKED_ADDRESSES = 4096


class IResponder(Protocol):
    """
    What L{ICPProtocol} needs from a responder (see L{icpmesh.server}).
    """

    def handleQuery(self, message: icp.Message, address: Address) -> Optional[bytes]:
        ...


class RateLimitedLog:
    """
    Log at most C{burst} messages per C{interval} seconds for each key, then
    one summary of how many were suppressed.

    @ivar suppressed: messages dropped, by key, in the current window.
    """

    def __init__(
        self, reactor: Any, interval: float = 60.0, burst: int = 5, logger: Logger = log
    ) -> None:
        self._reactor = reactor
        self.interval = interval
        self.burst = burst
        self._log = logger
        self._windows: dict[str, list[float]] = {}
        self.suppressed: Counter[str] = Counter()

    def warn(self, key: str, format: str, **kw: Any) -> bool:
        """
        Log C{format} at warn level unless C{key} is over its budget.

        @return: whether it was logged.
        """
        now = self._reactor.seconds()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.interval:
            if window is not None and self.suppressed[key]:
                self._log.warn(
                    "{count} more similar messages ({key}) were suppressed",
                    count=self.suppressed[key],
                    key=key,
                )
            self.suppressed[key] = 0
            window = self._windows[key] = [now, 0]
        if window[1] >= self.burst:
            self.suppressed[key] += 1
            return False
        window[1] += 1
        self._log.warn(format, **kw)
        return True


class PendingQuery:
    """
    One query round in flight: the same request number sent to several
    neighbours.

    @ivar reqnum: the request number.
    @ivar url: the URL asked about.
    @ivar urlBytes: the same URL as sent on the wire.
    @ivar options: the option flags the query carried.
    @ivar sentAt: reactor time the queries were sent.
    @ivar acceptFrom: addresses whose replies count, mapped to a caller's tag
        (typically the neighbour object).
    @ivar expected: how many replies complete the round.
    @ivar replies: C{(tag, message, rtt)} in arrival order.
    @ivar timedOut: whether the round ended by timeout.
    @ivar done: the Deferred that fires with this object when the round ends.
    """

    __slots__ = (
        "reqnum",
        "url",
        "urlBytes",
        "options",
        "sentAt",
        "acceptFrom",
        "expected",
        "replies",
        "replied",
        "timedOut",
        "done",
        "timeoutCall",
        "isComplete",
        "onReply",
        "echoes",
        "messages",
    )

    def __init__(
        self,
        reqnum: int,
        url: str,
        options: int,
        sentAt: float,
        acceptFrom: dict[Address, Any],
        expected: int,
        isComplete: Optional[Callable[["PendingQuery", icp.Message], bool]],
        onReply: Optional[Callable[[Any, icp.Message, float], None]],
    ) -> None:
        self.reqnum = reqnum
        self.url = url
        #: The URL as sent, for comparing with a reply's raw bytes.
        self.urlBytes = url.encode("latin-1")
        self.options = options
        self.sentAt = sentAt
        self.acceptFrom = acceptFrom
        self.expected = expected
        self.replies: list[tuple[Any, icp.Message, float]] = []
        self.replied: set[Address] = set()
        self.timedOut = False
        self.done: Deferred[PendingQuery] = Deferred()
        self.timeoutCall: Any = None
        self.isComplete = isComplete
        self.onReply = onReply
        self.echoes: dict[Address, int] = {}
        #: Reply datagram -> its (immutable) L{icp.Message}: the replies of
        #: one round are mostly byte-for-byte the same (MISS, same request
        #: number and URL), so one message object serves them all.
        self.messages: dict[bytes, icp.Message] = {}


class ICPProtocol(DatagramProtocol):
    """
    The node's ICP socket.

    @ivar responder: answers queries; C{None} for a node that only asks.
    @ivar counters: rare event counts by name (C{malformed},
        C{malformed.<reason>}, C{replies}, C{ignoredReplies},
        C{sendErrors}, ...); L{stats} adds the hot-path counts.
    """

    def __init__(
        self,
        responder: Optional[IResponder] = None,
        reactor: Any = None,
        groups: Sequence[str] = (),
    ) -> None:
        """
        @param responder: answers queries (C{None}: ignore them).
        @param reactor: supplies time and timeouts.
        @param groups: multicast groups to join once listening (the port
            must then come from C{listenMulticast}).
        """
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self._reactor = reactor
        self.responder = responder
        self._rawResponder = getattr(responder, "handleRawQuery", None)
        #: Rare events by name; see L{stats} for everything.
        self.counters: Counter[str] = Counter()
        # Hot counters are plain attributes: a Counter update costs more
        # than the rest of a fast-path query's bookkeeping.
        self.queriesReceived = 0
        self.otherReceived = 0
        self.repliesSent = 0
        self.repliesReceived = 0
        self.queriesSent = 0
        self.rateLog = RateLimitedLog(reactor)
        self._pending: dict[int, PendingQuery] = {}
        self._nextReqnum = 1
        self.groups = tuple(groups)
        self._ttl: Optional[int] = None
        self._sendto: Optional[Callable[[bytes, Any], Any]] = None
        # Neighbour addresses the transport's write has accepted once.
        self._checkedAddresses: set[Any] = set()

    def startProtocol(self) -> None:
        sock = getattr(self.transport, "socket", None)
        self._sendto = getattr(sock, "sendto", None)
        for group in self.groups:
            self.transport.joinGroup(group).addErrback(
                lambda f, group=group: log.error(
                    "cannot join multicast group {group}: {error}",
                    group=group,
                    error=f.getErrorMessage(),
                )
            )
        if self.groups and hasattr(self.transport, "setLoopbackMode"):
            # Like Squid: our own multicast queries are not for us.
            self.transport.setLoopbackMode(False)

    def setMulticastTTL(self, ttl: int) -> None:
        """
        Set the IP multicast TTL for following sends (no-op on a plain
        UDP port, or when unchanged).
        """
        if ttl != self._ttl and hasattr(self.transport, "setTTL"):
            self.transport.setTTL(ttl)
            self._ttl = ttl

    # -- receiving ---------------------------------------------------------

    def datagramReceived(self, data: bytes, address: Any) -> None:  # type: ignore[override]
        """
        Decode one datagram and dispatch it.  Never raises.

        Well-formed version 2 queries - nearly all traffic - take a fast
        path: the framing is checked here with a few byte comparisons and
        the responder reads the request number and URL from the raw bytes
        (L{icpmesh.server.ICPResponder.handleRawQuery}).  Well-formed
        version 2 HIT, MISS, MISS_NOFETCH and DENIED replies are matched to
        their round from the raw bytes too (L{_rawReply}).  Everything else
        goes through L{icp.decode}.
        """
        size = len(data)
        if (
            size > 24
            and data[0] == 1
            and data[1] == 2
            and (data[2] << 8 | data[3]) == size
            and size <= _MAX_MESSAGE_LENGTH
            and data.find(b"\0", 24) == size - 1
        ):
            raw = self._rawResponder
            if raw is not None:
                self.queriesReceived += 1
                try:
                    reply = raw(data, address)
                except Exception:
                    self._internalError(address)
                    return
                if reply is not None:
                    try:
                        # The socket's own sendto: Twisted's write re-checks
                        # the address on every call.
                        sendto = self._sendto
                        if sendto is not None:
                            sendto(reply, address)
                        else:
                            self.transport.write(reply, address)
                    except OSError as e:
                        self._sendFailed(address, e)
                    else:
                        self.repliesSent += 1
                return
        elif (
            size > 20
            and data[0] in _FAST_REPLY_OPCODES
            and data[1] == 2
            and (data[2] << 8 | data[3]) == size
            and size <= _MAX_MESSAGE_LENGTH
            and data.find(b"\0", 20) == size - 1
        ):
            self.otherReceived += 1
            try:
                self._rawReply(data, address)
            except Exception:
                self._internalError(address)
            return
        self.otherReceived += 1
        self._slowPath(data, (address[0], address[1]))

    def _slowPath(self, data: bytes, address: Address) -> None:
        counters = self.counters
        try:
            message = icp.decode(data)
        except icp.DecodeError as e:
            self._malformed(e, data, address)
            return
        except Exception:  # pragma: no cover - the codec promises DecodeError only
            counters["malformed"] += 1
            log.failure("ICP codec failed on a datagram from {address}", address=address)
            return
        try:
            if message.opcode == icp.Opcode.QUERY:
                if message.version != icp.VERSION_2:
                    counters["queriesV3"] += 1
                counters["queries"] += 1
                responder = self.responder
                if responder is None:
                    counters["ignoredQueries"] += 1
                    return
                reply = responder.handleQuery(message, address)
                if reply is not None:
                    self._send(reply, address)
            else:
                self._replyReceived(message, address)
        except Exception:
            self._internalError(address)

    def _internalError(self, address: Any) -> None:
        # Policy bugs must not take the socket down with them.
        self.counters["internalErrors"] += 1
        log.failure("error handling ICP message from {address}", address=address)

    def stats(self) -> dict[str, int]:
        """
        Every counter: C{received}, C{queries} (answered through either
        path), C{repliesSent}, C{malformed} and C{malformed.<reason>}, and
        the reply-matching counters.
        """
        result = dict(self.counters)
        result["queries"] = result.get("queries", 0) + self.queriesReceived
        result["received"] = self.queriesReceived + self.otherReceived
        result["sent"] = result.get("sent", 0) + self.repliesSent + self.queriesSent
        if self.repliesReceived:
            result["replies"] = result.get("replies", 0) + self.repliesReceived
        if self.queriesSent:
            result["queriesSent"] = self.queriesSent
        return result

    def _malformed(self, error: icp.DecodeError, data: bytes, address: Address) -> None:
        counters = self.counters
        counters["malformed"] += 1
        counters["malformed." + error.reason] += 1
        self.rateLog.warn(
            "malformed." + error.reason,
            "Dropped malformed ICP datagram from {address} ({reason}, {size} bytes)",
            address=address,
            reason=error.reason,
            size=len(data),
        )
        header = error.header
        if (
            error.reason == icp.REASON_URL
            and header is not None
            and header.opcode == icp.Opcode.QUERY
            and self.responder is not None
        ):
            # RFC 2187 5.2.1: an unparseable URL gets ICP_OP_ERR.  The URL
            # cannot be echoed (its framing is what is broken), so, like
            # Squid, echo an empty one.
            self._send(icp.encodeReply(icp.Opcode.ERR, header.reqnum, b""), address)
            counters["errSent"] += 1

    def _rawReply(self, data: bytes, address: Address) -> None:
        """
        L{_replyReceived} for a version 2 HIT, MISS, MISS_NOFETCH or DENIED
        whose framing L{datagramReceived} has checked: the same checks in
        the same order, on the raw bytes, and a L{icp.Message} is built only
        for a reply that counts.
        """
        self.repliesReceived += 1
        reqnum, options, optionData, sender = _REPLY_WORDS.unpack_from(data, 4)
        pending = self._pending.get(reqnum)
        counters = self.counters
        if pending is None:
            counters["lateOrUnknownReplies"] += 1
            return
        opcode = data[0]
        if pending.echoes:
            echoed = pending.echoes.get(address)
            if echoed is not None and echoed != opcode:
                counters["ignoredReplies." + icp.opcodeName(opcode)] += 1
                return
        tag = pending.acceptFrom.get(address)
        if tag is None and address not in pending.acceptFrom:
            self._stranger(address)
            return
        if data[20:-1] != pending.urlBytes:
            counters["repliesWrongURL"] += 1
            return
        if options & ~pending.options:
            counters["repliesBadOptions"] += 1
            return
        message = pending.messages.get(data)
        if message is None:
            message = icp.Message(
                _OPCODES[opcode], reqnum, pending.url, 2, options, optionData, sender, 0, None
            )
            # Identical replies (most of a round's) share one Message; a
            # flood of distinct ones must not grow the table.
            if len(pending.messages) < _SHARED_MESSAGES_MAX:
                pending.messages[data] = message
        self._accept(pending, tag, message, address)

    def _replyReceived(self, message: icp.Message, address: Address) -> None:
        counters = self.counters
        counters["replies"] += 1
        opcode = message.opcode
        if opcode in (icp.Opcode.INVALID, icp.Opcode.ERR):
            # RFC 2187 5.3.8 (ERR) and Squid: ignored, never reach selection.
            counters["ignoredReplies." + icp.Opcode(opcode).name] += 1
            return
        pending = self._pending.get(message.reqnum)
        if pending is None:
            counters["lateOrUnknownReplies"] += 1
            return
        echoed = pending.echoes.get(address)
        if echoed is not None and echoed != opcode:
            # An echo port returns exactly what we sent it.
            counters["ignoredReplies." + icp.opcodeName(opcode)] += 1
            return
        if echoed is None and opcode in (icp.Opcode.SECHO, icp.Opcode.DECHO):
            counters["ignoredReplies." + icp.Opcode(opcode).name] += 1
            return
        tag = pending.acceptFrom.get(address)
        if tag is None and address not in pending.acceptFrom:
            self._stranger(address)
            return
        if message.url != pending.url:
            counters["repliesWrongURL"] += 1
            return
        if message.options & ~pending.options:
            # A reply may only carry options the query asked for.
            counters["repliesBadOptions"] += 1
            return
        self._accept(pending, tag, message, address)

    def _stranger(self, address: Address) -> None:
        self.counters["repliesFromStrangers"] += 1
        self.rateLog.warn(
            "stranger",
            "Ignored ICP reply from {address}, which is not a neighbour asked",
            address=address,
        )

    def _accept(self, pending: PendingQuery, tag: Any, message: icp.Message, address: Address) -> None:
        """
        Count a checked reply toward its round, unless it is a duplicate.
        """
        if address in pending.replied:
            self.counters["duplicateReplies"] += 1
            return
        pending.replied.add(address)
        rtt = self._reactor.seconds() - pending.sentAt
        if pending.onReply is not None:
            pending.onReply(tag, message, rtt)
        if pending.done.called:
            # The round is over, but a late reply still tells us the
            # neighbour is alive and how far away it is.
            self.counters["lateReplies"] += 1
            return
        pending.replies.append((tag, message, rtt))
        if len(pending.replies) >= pending.expected or (
            pending.isComplete is not None and pending.isComplete(pending, message)
        ):
            self._complete(pending, timedOut=False)

    # -- sending -----------------------------------------------------------

    def _send(self, data: bytes, address: Address, counted: bool = True) -> bool:
        """
        Send with the transport's C{write}.  Errors are counted and logged,
        never raised: an C{OSError}, or an address C{write} refuses (a host
        name not resolved yet, or the wrong address family).

        @param counted: add one to the C{sent} counter on success.
        @return: whether it was sent.
        """
        try:
            self.transport.write(data, address)
        except (OSError, InvalidAddressError) as e:
            self._sendFailed(address, e)
            return False
        if counted:
            self.counters["sent"] += 1
        return True

    def _sendFailed(self, address: Any, error: Exception) -> None:
        # UDP send errors (ECONNREFUSED from an earlier ICMP, ENOBUFS) must
        # not escape.
        self.counters["sendErrors"] += 1
        self.rateLog.warn(
            "send", "ICP send to {address} failed: {error}", address=address, error=error
        )

    def allocateReqnum(self) -> int:
        """
        The next request number: 1 upwards, wrapping before 2**31, never 0
        (a reply with request number 0 makes Squid turn off private keys
        for good) and never one still in flight.
        """
        reqnum = self._nextReqnum
        while reqnum in self._pending:
            reqnum = reqnum + 1 if reqnum < 0x7FFFFFFF else 1
        self._nextReqnum = reqnum + 1 if reqnum < 0x7FFFFFFF else 1
        return reqnum

    def sendQuery(
        self,
        url: str,
        sendTo: Sequence[Address],
        acceptFrom: dict[Address, Any],
        timeout: float,
        expected: Optional[int] = None,
        options: int = 0,
        isComplete: Optional[Callable[[PendingQuery, icp.Message], bool]] = None,
        onReply: Optional[Callable[[Any, icp.Message, float], None]] = None,
        echoes: Optional[dict[Address, int]] = None,
    ) -> Deferred[PendingQuery]:
        """
        Send one query round and collect its replies.

        @param url: the URL to ask about.
        @param sendTo: where to send the QUERY (neighbours' ICP addresses, or
            a multicast group).
        @param acceptFrom: the only addresses whose replies count, each with a
            tag returned alongside its reply.
        @param timeout: seconds to wait at most.
        @param expected: replies that complete the round (default: the size
            of C{acceptFrom}).
        @param options: option flags for the query (C{icp.FLAG_SRC_RTT}).
        @param isComplete: called after each accepted reply; returning true
            ends the round at once (e.g. on a HIT).
        @param onReply: called with C{(tag, message, rtt)} for each accepted
            reply.
        @param echoes: addresses of UDP echo ports (port 7) to send, instead
            of a QUERY, an ICP_OP_SECHO (the origin server, RFC 2187's
            C{source_ping}) or an ICP_OP_DECHO (a "dumb" parent, 5.3.5);
            what comes back from them is the same message, echoed.  Include
            them in C{acceptFrom} too.
        @return: fires with the L{PendingQuery} when the round ends; never
            fails.
        """
        reqnum = self.allocateReqnum()
        pending = PendingQuery(
            reqnum,
            url,
            options,
            self._reactor.seconds(),
            dict(acceptFrom),
            len(acceptFrom) if expected is None else expected,
            isComplete,
            onReply,
        )
        data = icp.encodeQuery(reqnum, pending.urlBytes, options)
        pending.echoes = dict(echoes) if echoes else {}
        self._pending[reqnum] = pending
        sendto = self._sendto
        checked = self._checkedAddresses
        sent = 0
        for address in sendTo:
            if sendto is not None and address in checked:
                # Twisted's write checked this address before: skip its
                # per-call checks and go straight to the socket.
                try:
                    sendto(data, address)
                except OSError as e:
                    self._sendFailed(address, e)
                    continue
                sent += 1
            elif self._send(data, address, counted=False):
                sent += 1
                if sendto is not None:
                    if len(checked) >= MAX_CHECKED_ADDRESSES:
                        checked.clear()
                    checked.add(address)
        self.queriesSent += sent
        for address, opcode in pending.echoes.items():
            echo = icp.encode(icp.Message(opcode=opcode, reqnum=reqnum, url=url))
            if self._send(echo, address):
                self.counters["echoesSent"] += 1
        # The entry stays until the timeout even when the round completes
        # earlier, so that late replies still count for liveness and RTT.
        pending.timeoutCall = self._reactor.callLater(timeout, self._expire, pending)
        if pending.expected <= 0:
            self._complete(pending, timedOut=False)
        return pending.done

    def _complete(self, pending: PendingQuery, timedOut: bool) -> None:
        if not pending.done.called:
            pending.timedOut = timedOut
            pending.done.callback(pending)

    def _expire(self, pending: PendingQuery) -> None:
        if self._pending.get(pending.reqnum) is pending:
            del self._pending[pending.reqnum]
        self._complete(pending, timedOut=True)

    def stopProtocol(self) -> None:
        """
        End every round in flight as timed out, so nobody waits forever.
        """
        for pending in list(self._pending.values()):
            call = pending.timeoutCall
            if call is not None and call.active():
                call.cancel()
            self._expire(pending)
