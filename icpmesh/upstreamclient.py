# -*- test-case-name: tests.test_upstreamclient -*-
"""
The HTTP/1.1 client the proxy fetches with: Twisted's own, with two things
a proxy needs and C{twisted.web.client} does not offer.

 1. B{Connection-listed response headers are removed.}  RFC 9110 section
    7.6.1: a proxy must remove the fields a response names in its
    C{Connection} header (C{Connection: a, b} then C{a: 1} is for this hop
    only).  Twisted files C{Connection} under the parser's C{connHeaders},
    so the response's C{headers} never show the list; here the listed
    fields are taken out of the response's headers before anyone sees them.
 2. B{1xx interim responses are passed up.}  Twisted's parser drops every
    1xx response.  Here each one (its code, phrase and headers, the
    Connection-listed ones removed) goes to the C{interimReceived} callable
    of the request's headers when they are L{InterimHeaders}; the final
    response then arrives as usual.

Control characters in a response's reason phrase become spaces too: the
proxy passes the phrase on to its clients.

Everything Twisted-private this depends on is in this module, and
C{tests/test_upstreamclient.py} fails if a Twisted upgrade breaks it:

 - the classes come from C{twisted.web._newclient} (C{HTTP11ClientProtocol},
   C{HTTPClientParser}) and C{twisted.web.client._HTTP11ClientFactory};
 - L{UpstreamConnectionPool} is an C{HTTPConnectionPool} whose C{_factory}
   (private; C{HTTPConnectionPool._newConnection} calls it with a
   quiescent callback and a description) builds L{UpstreamClientProtocol}s;
 - L{UpstreamClientProtocol.request} lets C{HTTP11ClientProtocol.request}
   make its C{HTTPClientParser} as usual, then puts a L{_UpstreamParser}
   (a subclass) in its place (the protocol's C{_parser}), made with the
   same request, finisher and transport, and handed the C{Deferred} the
   protocol already waits on (the parser's C{_responseDeferred}).  No
   response byte can have reached the first parser: they arrive from the
   reactor, after C{request} returns.  (Assigning C{__class__} to the
   parser instead would be shorter, but on CPython it makes every attribute
   access on the parser slower, about 5 us per response.)  If Twisted ever
   stops storing the parser as C{_parser}, makes it of another class or
   drops C{_responseDeferred}, the request goes on with Twisted's plain
   behaviour and an error is logged.

The request's headers carry the callable because they are the one thing
C{Agent} and C{ProxyAgent} pass through to the protocol unchanged (or
copied with C{copy()}, which L{InterimHeaders} carries the callable over).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Optional

from twisted.logger import Logger
from twisted.web._newclient import HTTP11ClientProtocol, HTTPClientParser
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http_headers import Headers

log = Logger()

#: Receives one interim response: C{(code, phrase, headers)}.
InterimCallback = Callable[[int, bytes, Headers], None]


#: Translation table: control characters (but tab) become spaces.
CONTROLS_TO_SPACES = bytes(b if (b >= 0x20 and b != 0x7F) or b == 0x09 else 0x20 for b in range(256))


def connectionTokens(values: Iterable[bytes]) -> set[bytes]:
    """
    The lower-case field names listed in C{Connection} header values.
    Members that are not valid tokens (C{keep-alive timeout=5},
    C{"close"}) cannot name a field and are left out.
    """
    return {
        token.lower()
        for value in values
        for token in (t.strip() for t in value.split(b","))
        if token and _TOKEN.fullmatch(token)
    }


#: RFC 9110 section 5.6.2 token.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class InterimHeaders(Headers):
    """
    Request headers that also carry the callable the 1xx interim responses
    to the request go to.

    @ivar interimReceived: called with C{(code, phrase, headers)} for each
        1xx response received before the final one, or C{None}.
    """

    __slots__ = ("interimReceived",)

    def __init__(self, rawHeaders: Any = None, interimReceived: Optional[InterimCallback] = None) -> None:
        super().__init__(rawHeaders)
        self.interimReceived = interimReceived

    def copy(self) -> "InterimHeaders":
        """
        A copy, with the same callable.
        """
        copy = InterimHeaders(None, self.interimReceived)
        copy._rawHeaders = {name: list(values) for name, values in self._rawHeaders.items()}
        return copy


#: Fields Twisted's parser always files under C{connHeaders}, never in the
#: response's headers (C{Content-Length} is in the headers of a HEAD
#: response, so it is not one of them).
_NEVER_IN_HEADERS = frozenset(HTTPClientParser.CONNECTION_CONTROL_HEADERS) - {b"content-length"}


#: C{Connection} values (lower case) that name only fields in
#: L{_NEVER_IN_HEADERS}: nothing to remove, no need to parse them.
#: (Not C{close}: a C{Close} field is not one of them, and must go.)
_ONLY_CONTROLS = frozenset({b"keep-alive"})


class _UpstreamParser(HTTPClientParser):
    """
    Twisted's response parser, removing Connection-listed fields and
    passing 1xx responses to C{interimReceived}.
    """

    interimReceived: Optional[InterimCallback] = None

    def allHeadersReceived(self) -> None:
        listed = self.connHeaders.getRawHeaders(b"connection")
        if listed and not (len(listed) == 1 and listed[0].lower() in _ONLY_CONTROLS):
            for name in connectionTokens(listed):
                if name not in _NEVER_IN_HEADERS:
                    self.headers.removeHeader(name)
        response = self.response
        # The reason phrase is passed on to clients as it is: no control
        # characters (a bare CR) in it.
        response.phrase = response.phrase.translate(CONTROLS_TO_SPACES)
        if 100 <= response.code < 200:
            callback = self.interimReceived
            if callback is not None:
                try:
                    callback(response.code, response.phrase, self.headers)
                except Exception:
                    log.failure("passing on a {code} interim response failed", code=response.code)
            # As Twisted does: forget this response and parse the next one.
            self.connectionMade()
            del self.response
            return
        super().allHeadersReceived()


class UpstreamClientProtocol(HTTP11ClientProtocol):
    """
    C{HTTP11ClientProtocol} whose responses are parsed by L{_UpstreamParser}.
    """

    _warned = False

    def request(self, request: Any) -> Any:
        busy = self.state != "QUIESCENT"
        d = super().request(request)
        parser = getattr(self, "_parser", None)
        if busy or parser is None:
            # Refused (RequestNotSent), or already over: no parser to hook.
            return d
        if (
            type(parser) is HTTPClientParser
            and getattr(parser, "request", None) is request
            and hasattr(parser, "_responseDeferred")
            and not parser._everReceivedData
        ):
            hooked = _UpstreamParser(request, parser.finisher)
            # The Deferred the protocol already waits on for the response.
            hooked._responseDeferred = parser._responseDeferred
            hooked.interimReceived = getattr(request.headers, "interimReceived", None)
            hooked.makeConnection(parser.transport)
            self._parser = hooked
            return d
        if not UpstreamClientProtocol._warned:
            UpstreamClientProtocol._warned = True
            log.error(
                "icpmesh.upstreamclient cannot hook this Twisted's HTTP client parser "
                "({parser!r}): Connection-listed response headers are kept and 1xx "
                "responses are dropped",
                parser=parser,
            )
        return d


class _UpstreamClientFactory(_HTTP11ClientFactory):
    """
    Builds L{UpstreamClientProtocol}s for L{UpstreamConnectionPool}.
    """

    def buildProtocol(self, addr: Any) -> UpstreamClientProtocol:
        return UpstreamClientProtocol(self._quiescentCallback)


class UpstreamConnectionPool(HTTPConnectionPool):
    """
    An C{HTTPConnectionPool} whose connections use L{UpstreamClientProtocol}.
    """

    _factory = _UpstreamClientFactory
