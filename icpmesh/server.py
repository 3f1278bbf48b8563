# -*- test-case-name: tests.test_server -*-
"""
The ICP responder: how this node answers its neighbours' queries.

L{ICPResponder} is policy only: it has no socket.  L{icpmesh.protocol.ICPProtocol}
hands it each decoded QUERY and sends back the bytes it returns.  The answer
follows RFC 2187 section 5.2, in Squid's order:

  1. B{ERR} for a URL that is not an absolute URL we could fetch (whitespace
     or control characters, no scheme or host, 8192 bytes or longer); the
     URL is echoed %-escaped (5.2.1);
  2. B{DENIED} when access control refuses the querier (5.2.2) - except
     that a querier with more than 95% of more than 100 replies denied gets
     no replies at all for C{icp_denied_cutoff_time} (default one hour,
     Squid's C{CUTOFF_SECONDS}), since it is plainly misconfigured and each
     DENIED costs both sides;
  3. B{HIT} when the stored object stays fresh for at least
     C{icp_hit_min_fresh} more seconds (default 30, 5.2.3 and Squid's
     C{refreshCheckICP}), or whenever one is stored with C{icp_hit_stale on};
  4. B{MISS_NOFETCH} when we do not want to fetch it (5.2.4): the store is
     still loading its index and has not seen this URL yet, or the node is in
     hit-only mode (configured, or entered for five minutes after a run of
     failed origin fetches, like Squid's C{checkFailureRatio});
  5. B{MISS} otherwise.

The reply echoes the request number and URL, is always version 2 (a version 3
query is answered too, as Squid does, but nothing else of ICPv3 is honoured),
and carries no option flags: we decline HIT_OBJ (allowed by 5.2.3.1, and what
Squid does) and have no round-trip measurement to put in SRC_RTT (allowed by
RFC 2186: the flag is set only when the data is known).
"""

from __future__ import annotations

import re
import struct
from collections import Counter, OrderedDict
from typing import Any, Callable, Optional, Union
from urllib.parse import quote

from twisted.logger import Logger

from icpmesh import icp
from icpmesh.caching import cacheKey
from icpmesh.interfaces import IAccessControl, IObjectStore

log = Logger()

#: Squid's MAX_URL: URLs this long or longer are answered with ERR.
MAX_URL = 8192
#: Cap on the per-client state kept for the DENIED cutoff.
MAX_TRACKED_CLIENTS = 65536
#: Cap on the table of URLs already validated and keyed.
MAX_KNOWN_URLS = 65536

_REPLY_START = struct.Struct("!BBH")
_REPLY_ZEROS = bytes(12)

_HIT = int(icp.Opcode.HIT)
_MISS = int(icp.Opcode.MISS)
_ERR = int(icp.Opcode.ERR)
_DENIED = int(icp.Opcode.DENIED)
_NOFETCH = int(icp.Opcode.MISS_NOFETCH)

_LOG_CODES = {
    _HIT: "UDP_HIT",
    _MISS: "UDP_MISS",
    _ERR: "UDP_INVALID",
    _DENIED: "UDP_DENIED",
    _NOFETCH: "UDP_MISS_NOFETCH",
}


#: The bytes an ICP URL may contain (printable ASCII, no space), for
#: C{bytes.translate}: what is left after deleting them is the problem.
_URL_BYTES = bytes(range(0x21, 0x7F))
_SCHEME = re.compile(rb"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#\s]")
#: A valid plain http URL that is its own cache key: a host[:port] already
#: in normal form (lower case, no user info, not the default port 80), a
#: path, only printable ASCII, no space and no fragment.  (Length is
#: checked apart.)  One C-level match replaces half a dozen byte scans.
_plainHTTP = re.compile(rb"http://[a-z0-9.:-]+(?<!:80)/[!-\"$-~]*").fullmatch


def urlProblem(url: Union[str, bytes]) -> Optional[str]:
    """
    Why C{url} is not an absolute URL an ICP responder can answer about, or
    C{None} if it is one.
    """
    if isinstance(url, str):
        try:
            url = url.encode("ascii")
        except UnicodeEncodeError:
            return "URL contains whitespace or control characters"
    if not url:
        return "empty URL"
    if len(url) >= MAX_URL:
        return "URL too long"
    if url.translate(None, _URL_BYTES):
        return "URL contains whitespace or control characters"
    if _SCHEME.match(url) is None:
        return "not an absolute URL"
    return None


def _escapeURL(urlBytes: bytes) -> bytes:
    """
    A bad URL as echoed in an ICP_OP_ERR reply: percent-escaped to
    printable ASCII, or empty when that would not fit in a datagram.
    """
    escaped = quote(urlBytes, safe="!#$&'()*+,-./:;=?@[]_~%").encode("ascii")
    if len(escaped) > icp.MAX_MESSAGE_LENGTH - 21:
        return b""
    return escaped


class FailureRatio:
    """
    Decides when the node enters hit-only mode after origin fetch failures:
    when, over recent fetches (the counts halve every C{halfLife} seconds),
    there were at least C{minFailures} failures and failures outnumber
    successes ten to one, the node stops accepting misses from neighbours
    for C{holdTime} seconds.
    """

    def __init__(
        self,
        reactor: Any,
        minFailures: int = 20,
        halfLife: float = 60.0,
        holdTime: float = 300.0,
    ) -> None:
        self._reactor = reactor
        self.minFailures = minFailures
        self.halfLife = halfLife
        self.holdTime = holdTime
        self._good = 0.0
        self._bad = 0.0
        self._stamp = reactor.seconds()
        self.hitOnlyUntil = 0.0

    def _decay(self) -> None:
        now = self._reactor.seconds()
        elapsed = now - self._stamp
        if elapsed > 0:
            factor = 0.5 ** (elapsed / self.halfLife)
            self._good *= factor
            self._bad *= factor
            self._stamp = now

    def noteFetch(self, ok: bool) -> None:
        """
        Record the outcome of one fetch from an origin or neighbour.
        """
        self._decay()
        if ok:
            self._good += 1
            return
        self._bad += 1
        if self._bad >= self.minFailures and self._bad >= 10 * self._good:
            if not self.active():
                log.warn(
                    "ICP going into hit-only mode for {hold:.0f} seconds "
                    "after {bad:.0f} recent fetch failures",
                    hold=self.holdTime,
                    bad=self._bad,
                )
            self.hitOnlyUntil = self._reactor.seconds() + self.holdTime
            self._good = self._bad = 0.0

    def active(self) -> bool:
        """
        Whether hit-only mode is on now.
        """
        return self._reactor.seconds() < self.hitOnlyUntil


class ICPResponder:
    """
    Answers ICP queries (RFC 2187 section 5.2).

    @ivar counts: replies sent, by opcode.
    @ivar counters: other events (C{cutoffDropped}).
    @ivar hitOnly: set to force MISS_NOFETCH for everything not a HIT.
    """

    def __init__(
        self,
        store: IObjectStore,
        access: IAccessControl,
        reactor: Any = None,
        minFresh: float = 30.0,
        hitStale: bool = False,
        hitOnly: bool = False,
        cutoffTime: float = 3600.0,
        failureRatio: Optional[FailureRatio] = None,
        logQuery: Optional[Callable[[str, str, int, str], None]] = None,
    ) -> None:
        """
        @param store: where HITs are looked up (L{IObjectStore.freshUntil}).
        @param access: who may ask (L{IAccessControl.allowICP}).
        @param minFresh: seconds an object must stay fresh to be a HIT.
        @param hitStale: answer HIT for stale objects too.
        @param hitOnly: answer MISS_NOFETCH instead of MISS, always.
        @param cutoffTime: seconds of silence for a querier denied too often.
        @param failureRatio: enters hit-only mode after fetch failures.
        @param logQuery: called as C{(client, code, size, url)} for every
            reply sent (Squid's C{log_icp_queries}).
        """
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self._reactor = reactor
        self._freshUntil = store.freshUntil
        self._store = store
        self._allowICP = access.allowICP
        # An access control may promise (C{icpByClient}) that allowICP
        # depends on the client address alone; then a client allowed once
        # goes into _allowed and its later queries skip the access check
        # and the DENIED cutoff bookkeeping (it is never denied).
        self._icpByClient = getattr(access, "icpByClient", False) is True
        self._allowed: set[str] = set()
        self.minFresh = minFresh
        self.hitStale = hitStale
        self.hitOnly = hitOnly
        self.cutoffTime = cutoffTime
        self.failureRatio = failureRatio
        self._logQuery = logQuery
        self.counters: Counter[str] = Counter()
        self.counts: dict[int, int] = {op: 0 for op in _LOG_CODES}
        # client address -> [replies, denied, cutoffUntil]
        self._clients: OrderedDict[str, list[float]] = OrderedDict()
        # URL bytes -> (url, cache key), or (escaped URL, None) when bad
        self._urls: dict[bytes, tuple[Any, Optional[str]]] = {}

    def handleQuery(self, message: icp.Message, address: tuple[str, int]) -> Optional[bytes]:
        """
        Decide the reply to one decoded query.

        @return: the encoded reply, or C{None} to send nothing.
        """
        return self.answer(
            message.reqnum.to_bytes(4, "big"), message.url.encode("latin-1"), address[0]
        )

    def handleRawQuery(self, data: bytes, address: tuple[str, int]) -> Optional[bytes]:
        """
        Decide the reply to a QUERY datagram whose framing the protocol has
        already checked (header, length, NUL-terminated URL at offset 24).

        The hot path: no message object is built, and for a good URL from a
        client already allowed by an address-only C{icp_access}, the whole
        decision is made here, with no further calls but the store lookup.
        Everything else goes through L{answer}.
        """
        urlBytes = data[24:-1]
        known = self._urls.get(urlBytes)
        if known is not None:
            url, key = known
        elif len(urlBytes) < MAX_URL and _plainHTTP(urlBytes) is not None:
            # A plain URL seen for the first time (most misses): its own
            # key.  It is remembered below only if the store holds it, so
            # a stream of never-seen URLs costs no table inserts.
            url = key = urlBytes.decode("ascii")
        else:
            url, key = known = self._learnURL(urlBytes)
        client = address[0]
        if key is None or client not in self._allowed:
            return self.answer(data[4:8], urlBytes, client, (url, key))
        fresh = self._freshUntil(key)
        if fresh is not None and known is None:
            self._remember(urlBytes, (url, key))
        if fresh is not None and (
            self.hitStale or fresh - self._reactor.seconds() >= self.minFresh
        ):
            opcode = _HIT
        elif self.hitOnly or (fresh is None and self._store.loading):
            opcode = _NOFETCH
        else:
            ratio = self.failureRatio
            if ratio is not None and ratio.hitOnlyUntil and ratio.active():
                opcode = _NOFETCH
            else:
                opcode = _MISS
        # The reply is the query less its requester address field, with a
        # new first byte, length and zeroed options: the URL and its NUL
        # are copied as they came.
        reply = _REPLY_START.pack(opcode, 2, len(data) - 4) + data[4:8] + _REPLY_ZEROS + data[24:]
        self.counts[opcode] += 1
        if self._logQuery is not None:
            self._logQuery(client, _LOG_CODES[opcode], len(reply), url)
        return reply

    def answer(
        self,
        reqnum: bytes,
        urlBytes: bytes,
        client: str,
        known: Optional[tuple[Any, Optional[str]]] = None,
    ) -> Optional[bytes]:
        """
        The decision itself.

        @param reqnum: the query's request number, 4 bytes big-endian.
        @param urlBytes: the query's URL, without its NUL.
        @param client: the querier's IP address.
        @param known: C{urlBytes}'s entry in the URL table, when the caller
            has already looked it up.
        @return: the reply datagram, or C{None}.
        """
        if known is None:
            known = self._urls.get(urlBytes)
            if known is None:
                known = self._learnURL(urlBytes)
        url, key = known
        if key is None:
            return self._reply(_ERR, reqnum, url, client)

        state = self._clients.get(client)
        if state is None:
            clients = self._clients
            if len(clients) >= MAX_TRACKED_CLIENTS:
                # Forget the oldest; a spoofing flood cannot grow this.
                # (popitem on an OrderedDict is O(1); deleting the first key
                # of a plain dict that has churned is not.)
                clients.popitem(last=False)
            state = clients[client] = [0, 0, 0.0]
        if state[2]:
            if self._reactor.seconds() < state[2]:
                self.counters["cutoffDropped"] += 1
                return None
            state[0] = state[1] = 0
            state[2] = 0.0

        if not self._allowICP(client, url):
            state[0] += 1
            state[1] += 1
            if state[0] > 100 and state[1] * 100 > 95 * state[0]:
                state[2] = self._reactor.seconds() + self.cutoffTime
                log.warn(
                    "Probable misconfigured neighbour at {client}: {denied:.0f} of "
                    "the last {replies:.0f} ICP replies were DENIED; no replies "
                    "will be sent to it for the next {cutoff:.0f} seconds",
                    client=client,
                    denied=state[1],
                    replies=state[0],
                    cutoff=self.cutoffTime,
                )
            return self._reply(_DENIED, reqnum, urlBytes, client)
        state[0] += 1
        if self._icpByClient:
            # Allowed by address alone: this client will never be denied,
            # so its queries can take handleRawQuery's short path.
            allowed = self._allowed
            if len(allowed) >= MAX_TRACKED_CLIENTS:
                allowed.clear()
            allowed.add(client)

        fresh = self._freshUntil(key)
        if fresh is not None and (
            self.hitStale or fresh - self._reactor.seconds() >= self.minFresh
        ):
            opcode = _HIT
        elif (
            self.hitOnly
            or (fresh is None and self._store.loading)
            or (self.failureRatio is not None and self.failureRatio.active())
        ):
            opcode = _NOFETCH
        else:
            opcode = _MISS
        return self._reply(opcode, reqnum, urlBytes, client)

    def _learnURL(self, urlBytes: bytes) -> tuple[Any, Optional[str]]:
        """
        Validate a URL seen for the first time and compute its cache key;
        remember both in a bounded table, since neighbours ask about the
        same popular URLs again and again.  (L{handleRawQuery} checks plain
        http URLs itself and remembers only those the store holds.)

        @return: C{(url, key)}; for a bad URL, C{(escapedBytes, None)}.
        """
        known: tuple[Any, Optional[str]]
        if len(urlBytes) < MAX_URL and _plainHTTP(urlBytes) is not None:
            # Most URLs: a valid plain http:// URL whose host part is
            # already normal (lower case, no user info, no default port) is
            # its own cache key, found without urlsplit.
            url = urlBytes.decode("ascii")
            known = (url, url)
        elif urlProblem(urlBytes) is None:
            url = urlBytes.decode("ascii")
            known = (url, cacheKey(url))
        else:
            known = (_escapeURL(urlBytes), None)
        self._remember(urlBytes, known)
        return known

    def _remember(self, urlBytes: bytes, known: tuple[Any, Optional[str]]) -> None:
        """
        Add to the bounded table of URLs already validated and keyed.
        """
        urls = self._urls
        if len(urls) >= MAX_KNOWN_URLS:
            # Start again: cheaper than evicting one by one, and the
            # popular URLs come straight back.
            urls.clear()
        urls[urlBytes] = known

    def _reply(self, opcode: int, reqnum: bytes, urlBytes: Any, client: str) -> bytes:
        if opcode == _ERR:
            url = urlBytes.decode("ascii")
        else:
            url = None
        data = (
            _REPLY_START.pack(opcode, 2, 21 + len(urlBytes))
            + reqnum
            + _REPLY_ZEROS
            + urlBytes
            + b"\0"
        )
        self.counts[opcode] += 1
        if self._logQuery is not None:
            if url is None:
                url = urlBytes.decode("latin-1")
            self._logQuery(client, _LOG_CODES[opcode], len(data), url)
        return data

    def stats(self) -> dict[str, int]:
        """
        Replies sent by Squid log code (C{UDP_HIT} ...) and C{cutoffDropped}.
        """
        result = {_LOG_CODES[op]: n for op, n in self.counts.items() if n}
        result.update(self.counters)
        return result
