# -*- test-case-name: tests.test_proxy -*-
"""
The caching forward proxy: a leaf C{twisted.web} resource.

A forward proxy receives absolute-form request targets (C{GET
http://origin/path HTTP/1.1}); L{CachingProxyResource} is therefore the root
of its C{Site} and never traverses children.

For GET and HEAD it answers from the store while the stored response may
be used (RFC 9111 section 4: fresh, or stale but allowed by the request's
C{max-stale}); a stale response with a validator is revalidated with a
conditional request, and a 304 refreshes the stored headers.  Otherwise it
asks the peer selector where to fetch from (a neighbour's hit, a parent,
or the origin), streams the response to the client while writing it to the
store, and marks it C{X-Cache: MISS}.  Concurrent misses for one URL share
one upstream fetch (collapsed forwarding).  Responses that vary are stored
under secondary keys built from the request headers they vary on.  A GET
with C{Range} on a stored complete 200 is answered from the store with 206
or 416 (L{icpmesh.ranges}); a C{Range} request that misses is forwarded and
its 206 is not stored.

Other methods are forwarded uncached and, when they succeed, invalidate
what is stored for the URL and for the C{Location} and C{Content-Location}
they name on the same origin.  Their bodies go upstream as they arrive when
the request is an L{icpmesh.body.StreamingRequest} (the node's own site),
from C{request.content} once twisted.web has read them whole otherwise.

A body that breaks off is never stored, and the client's response is
aborted rather than finished, so nobody is served a truncated object as if
it were complete.

See C{docs/proxy.md} for the rules in full and the access-log codes.
"""

from __future__ import annotations

import ipaddress
import re

from html import escape
from inspect import iscoroutine
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    ProxyAgent,
    ResponseDone,
)
from twisted.web.http import HTTPChannel, PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from icpmesh import __version__
from icpmesh.caching import (
    cacheKey,
    correctedInitialAge,
    deltaSeconds,
    freshnessLifetime,
    httpDate,
    invalidationTarget,
    mayStore,
    notModified,
    CDN_MODES,
    parseCacheControl,
    responseDirectives,
    updatedHeaders,
    varyKey,
    varyNames,
)
from icpmesh.body import BodyAborted, RequestBodyStream
from icpmesh.interfaces import AccessRequest, ObjectTooLarge, StoredResponse
from icpmesh.ranges import UNSATISFIABLE, contentRange, ifRangeAllows, parseRange, unsatisfiedRange, writeRange
from icpmesh.upstreamclient import CONTROLS_TO_SPACES, InterimHeaders, UpstreamConnectionPool

log = Logger()

#: Most bytes of 1xx interim responses passed on to a client per fetch; the
#: rest are dropped.
MAX_INTERIM_BYTES = 16 * 1024

#: Hop-by-hop headers (RFC 9110 section 7.6.1), never forwarded.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)

#: Largest request header section (names, values and line overhead)
#: accepted; larger ones get 431.  Squid's C{request_header_max_size} is
#: 64 KB too.
MAX_REQUEST_HEADER_SIZE = 64 * 1024

#: Statuses whose responses have no body.
_NO_BODY = frozenset({204, 304})

#: Statuses of hits sent without a body: a 416 answers a range that cannot
#: be satisfied with headers only.
_NO_HIT_BODY = frozenset({204, 304, 416})

#: Reason phrases of the statuses a hit may get instead of the stored one.
_REASONS = {304: b"Not Modified", 206: b"Partial Content", 416: b"Range Not Satisfiable"}

#: Request headers that make a conditional request (ours replace the
#: client's when we revalidate a stored response).
_CONDITIONALS = (b"if-none-match", b"if-modified-since", b"if-match", b"if-unmodified-since", b"if-range")

#: Request headers the upstream client sets itself: the body's length,
#: and Host, which must name the target URL's authority (RFC 9112 3.2.2).
_FRAMING = frozenset({b"content-length", b"host"})

#: Upstream statuses after which stale-if-error may serve a stale response.
_ERROR_STATUSES = frozenset({500, 502, 503, 504})

#: Methods a proxy answers itself when Max-Forwards is 0 (RFC 9110 7.6.2).
_MAX_FORWARDS_METHODS = frozenset({"TRACE", "OPTIONS"})

#: What OPTIONS with Max-Forwards: 0 announces.
_ALLOW = b"GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE, CONNECT"

#: Bound on the prebuilt header sets of hits.
_TEMPLATES_MAX = 10_000

#: Bound on the origin endpoints for address literals kept for reuse.
_LITERAL_ENDPOINTS_MAX = 1024

#: Bound on the URLs whose Vary header names are remembered.
_VARY_INDEX_MAX = 100_000

_ERROR_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>{code} {reason}</title></head>"
    "<body><h1>{code} {reason}</h1><p>{detail}</p><hr>"
    "<address>icpmesh/{version} on {host}</address></body></html>\n"
)


def endToEndHeaders(headers: Headers) -> list[tuple[bytes, Sequence[bytes]]]:
    """
    The headers of C{headers} that are not hop-by-hop, including those
    named in C{Connection}, with lower-case names.
    """
    connection = headers.getRawHeaders(b"connection")
    drop: Any = HOP_BY_HOP
    if connection:
        drop = set(HOP_BY_HOP)
        for value in connection:
            for token in value.split(b","):
                drop.add(token.strip().lower())
    return [
        (name.lower(), values)
        for name, values in headers.getAllRawHeaders()
        if name.lower() not in drop
    ]


def neighbourTLSOptions(neighbour: Any) -> Any:
    """
    Verified TLS options toward a neighbour's HTTP port: its certificate
    must match C{tls-domain=} (default: its host) and chain to
    C{tls-cafile=} (default: the system's trust roots); C{tls-cert=} and
    C{tls-key=} give a client certificate.
    """
    from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS

    config = getattr(neighbour, "config", None)
    values = getattr(config, "values", None) or {}
    domain = values.get("tls-domain", neighbour.host)
    trustRoot = None
    if values.get("tls-cafile"):
        with open(values["tls-cafile"], "rb") as f:
            trustRoot = Certificate.loadPEM(f.read())
    clientCertificate = None
    if values.get("tls-cert"):
        with open(values["tls-cert"], "rb") as f:
            pem = f.read()
        if values.get("tls-key"):
            with open(values["tls-key"], "rb") as f:
                pem += b"\n" + f.read()
        clientCertificate = PrivateCertificate.loadPEM(pem)
    return optionsForClientTLS(domain, trustRoot=trustRoot, clientCertificate=clientCertificate)


@implementer(IAgentEndpointFactory)
class _OriginEndpoints:
    """
    Endpoints for origin servers: a plain TCP endpoint for an address
    literal over http (no name lookup in a thread for C{127.0.0.1}), the
    standard endpoint (host name lookup, verified TLS) otherwise.
    """

    def __init__(self, reactor: Any, connectTimeout: float) -> None:
        from twisted.web.client import BrowserLikePolicyForHTTPS, _StandardEndpointFactory

        self._reactor = reactor
        self._connectTimeout = connectTimeout
        self._literals: dict[tuple[bytes, int], Any] = {}
        self._standard = _StandardEndpointFactory(
            reactor, BrowserLikePolicyForHTTPS(), connectTimeout, None
        )

    def endpointForURI(self, uri: Any) -> Any:
        if uri.scheme == b"http":
            # Agent asks for an endpoint on every request, even one that
            # reuses a pooled connection: an address literal's endpoint
            # (which holds no state of its own) is made once.
            literal = (uri.host, uri.port)
            endpoint = self._literals.get(literal)
            if endpoint is not None:
                return endpoint
            host = uri.host.decode("ascii", "replace")
            try:
                version = ipaddress.ip_address(host).version
            except ValueError:
                version = 0
            if version == 4:
                endpoint = TCP4ClientEndpoint(self._reactor, host, uri.port, timeout=self._connectTimeout)
            elif version == 6:
                endpoint = TCP6ClientEndpoint(self._reactor, host, uri.port, timeout=self._connectTimeout)
            if endpoint is not None:
                if len(self._literals) >= _LITERAL_ENDPOINTS_MAX:
                    self._literals.clear()
                self._literals[literal] = endpoint
                return endpoint
        return self._standard.endpointForURI(uri)


class Upstream:
    """
    Fetches from origins and neighbours with C{twisted.web.client} over one
    persistent connection pool: an L{Agent} for the origins, a
    L{ProxyAgent} per neighbour (over TLS when the neighbour says C{tls}).

    The pool is an L{UpstreamConnectionPool}: response headers named in
    C{Connection} are removed, and 1xx interim responses go to the
    C{interimReceived} of request headers that are L{InterimHeaders}.
    """

    def __init__(self, reactor: Any, connectTimeout: float = 30.0) -> None:
        """
        @param reactor: the reactor to connect with.
        @param connectTimeout: seconds to wait for a connection to an origin.
        """
        self._reactor = reactor
        self.pool = UpstreamConnectionPool(reactor, persistent=True)
        # Enough idle connections per origin that a burst of misses does not
        # keep opening new ones (each costs a connect, and a lookup).
        self.pool.maxPersistentPerHost = 128
        self.connectTimeout = connectTimeout
        self._direct = Agent.usingEndpointFactory(
            reactor, _OriginEndpoints(reactor, connectTimeout), pool=self.pool
        )
        self._proxies: dict[Any, ProxyAgent] = {}

    def agentFor(self, neighbour: Any) -> Any:
        """
        The agent that fetches from C{neighbour} (C{None}: the origins).
        """
        if neighbour is None:
            return self._direct
        agent = self._proxies.get(neighbour)
        if agent is None:
            from twisted.internet.endpoints import HostnameEndpoint

            # The address the monitor resolved, when it has (no lookup per
            # connection); the name otherwise.
            address = getattr(neighbour, "icpAddress", None)
            host = address[0] if address else neighbour.host
            endpoint: Any = HostnameEndpoint(
                self._reactor,
                host,
                neighbour.httpPort,
                timeout=getattr(neighbour, "connectTimeout", self.connectTimeout),
            )
            if getattr(neighbour, "tls", False):
                from twisted.internet.endpoints import wrapClientTLS

                endpoint = wrapClientTLS(neighbourTLSOptions(neighbour), endpoint)
            agent = self._proxies[neighbour] = ProxyAgent(endpoint, self._reactor, pool=self.pool)
        return agent

    def fetch(
        self, neighbour: Any, method: bytes, url: bytes, headers: Headers, body: Any
    ) -> "Deferred[IResponse]":
        """
        Send one request: to the origin named in C{url} when C{neighbour}
        is C{None}, else to the neighbour as to a proxy.
        """
        return self.agentFor(neighbour).request(method, url, headers, body)

    def close(self) -> "Deferred[None]":
        """
        Close the pooled connections.
        """
        return self.pool.closeCachedConnections()


class _Exchange:
    """
    One client request and what the proxy has learned about it.

    @ivar request: the C{twisted.web} request, or C{None} for a background
        revalidation.
    @ivar access: the L{AccessRequest}.
    @ivar started: reactor time when it arrived.
    @ivar key: the primary cache key.
    @ivar requestCC: the parsed request C{Cache-Control}.
    @ivar storageKey: the key its response is (or would be) stored under.
    @ivar entry: the stored object found for it, if any.
    @ivar code: the access-log code so far.
    @ivar gone: the client has disconnected.
    @ivar plain: a GET or HEAD without any of the request headers in
        L{NOT_PLAIN_HEADERS}: a fresh hit for it takes the fast path.
    @ivar relay: the L{_Relay} writing a fetched response to it, while it
        does.
    """

    __slots__ = (
        "request", "access", "started", "key", "requestCC", "storageKey", "entry",
        "code", "gone", "collapsed", "plain", "relay", "_headerMap",
    )

    def __init__(self, request: Any, access: AccessRequest, started: float) -> None:
        self.request = request
        self.access = access
        self.started = started
        self.key = ""
        self.requestCC: dict[str, Optional[str]] = {}
        self.storageKey = ""
        self.entry: Any = None
        self.code = "TCP_MISS"
        self.gone = False
        self.collapsed = False
        self.plain = False
        self.relay: Optional[_Relay] = None
        self._headerMap: Optional[dict[str, list[bytes]]] = None

    def headerMap(self) -> dict[str, list[bytes]]:
        """
        Request header values by lower-case text name (for Vary).
        """
        if self._headerMap is None:
            if self.request is None:
                self._headerMap = {}
            else:
                self._headerMap = {
                    name.decode("latin-1").lower(): list(values)
                    for name, values in self.request.requestHeaders.getAllRawHeaders()
                }
        return self._headerMap

    def header(self, name: bytes) -> Optional[list[bytes]]:
        """
        The values of request header C{name}, or C{None}.
        """
        if self.request is None:
            return None
        return self.request.requestHeaders.getRawHeaders(name)


@implementer(IPushProducer)
class _ClientProducer:
    """
    Registered with one client's request: a client whose connection is
    full pauses the shared upstream body until every client can take more.
    """

    def __init__(self, relay: "_Relay", exchange: _Exchange) -> None:
        self.relay = relay
        self.exchange = exchange

    def pauseProducing(self) -> None:
        self.relay.pauseFor(self.exchange)

    def resumeProducing(self) -> None:
        self.relay.resumeFor(self.exchange)

    def stopProducing(self) -> None:
        self.relay.clientLost(self.exchange)


class _Relay(Protocol):
    """
    Receives one upstream body and writes it to every client that shares
    the response and to the store writer.

    Flow control: the upstream transport is paused while any client's
    connection is full.  A client that goes away is dropped; when no
    client is left and nothing is being stored, the upstream is stopped.
    """

    def __init__(
        self,
        proxy: "CachingProxyResource",
        clients: list[_Exchange],
        writer: Any,
        onDone: Callable[[Optional[Failure], int], None],
    ) -> None:
        self.proxy = proxy
        self.clients = [c for c in clients if not c.gone and c.request is not None]
        self.writer = writer
        self.onDone = onDone
        self.size = 0
        self.paused: set[int] = set()
        self.finished = False

    def connectionMade(self) -> None:
        for client in self.clients:
            client.request.registerProducer(_ClientProducer(self, client), True)
        self._maybeStop()

    def pauseFor(self, client: _Exchange) -> None:
        first = not self.paused
        self.paused.add(id(client))
        if first and self.transport is not None and not self.finished:
            self.transport.pauseProducing()

    def resumeFor(self, client: _Exchange) -> None:
        if id(client) in self.paused:
            self.paused.discard(id(client))
            if not self.paused and self.transport is not None and not self.finished:
                self.transport.resumeProducing()

    def clientLost(self, client: _Exchange) -> None:
        client.gone = True
        if getattr(client, "relay", None) is self:
            client.relay = None  # no exchange -> relay -> clients -> exchange cycle
        if client in self.clients:
            self.clients.remove(client)
        self.resumeFor(client)
        self._maybeStop()

    def _maybeStop(self) -> None:
        if not self.clients and self.writer is None and not self.finished and self.transport is not None:
            # Nobody wants the rest of the body.
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        for client in self.clients:
            client.request.write(data)
        writer = self.writer
        if writer is not None:
            try:
                writer.write(data)
            except ObjectTooLarge:
                self.writer = None
                self._maybeStop()

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        self.finished = True
        writer = self.writer
        self.writer = None
        complete = isinstance(reason.value, ResponseDone)
        for client in self.clients:
            client.relay = None
            client.request.unregisterProducer()
        if complete:
            self.onDone(None, self.size)
            if writer is not None:
                stored = writer.finish()
                if not _hasValue(stored):
                    # (A memory store has stored it already.)
                    stored.addErrback(_notStored)
            for client in self.clients:
                client.request.finish()
            return
        if writer is not None:
            writer.abort()
        if isinstance(reason.value, PotentialDataLoss):
            # A body delimited by closing the connection: complete as far
            # as anyone can tell, but not trusted enough to store.
            self.onDone(None, self.size)
            for client in self.clients:
                client.request.finish()
            return
        self.onDone(reason, self.size)
        for client in self.clients:
            _abort(client.request)


def _notStored(f: Failure) -> None:
    log.warn("not stored: {error}", error=f.getErrorMessage())


class _Discard(Protocol):
    """
    Reads and drops a body.
    """

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        pass


class _Fetch:
    """
    One upstream fetch, possibly shared by several clients.

    @ivar leader: the exchange that started it, or C{None} for a background
        revalidation.
    @ivar followers: exchanges that arrived for the same URL before its
        response headers did.
    @ivar revalidating: the stale stored object this fetch replaces or
        revalidates, if any (served again if C{stale-if-error} allows).
    @ivar conditional: the request carries the stored object's validators,
        so a 304 refreshes it.
    @ivar joinable: more followers may join.
    @ivar interimBytes: bytes of 1xx interim responses passed on so far.
    """

    def __init__(
        self,
        proxy: "CachingProxyResource",
        leader: _Exchange,
        revalidating: Any,
        conditional: bool = False,
        background: bool = False,
    ) -> None:
        self.proxy = proxy
        self.leader = leader
        self.background = background
        self.followers: list[_Exchange] = []
        self.revalidating = revalidating
        self.conditional = conditional
        self.joinable = True
        self.routes: list[Any] = []
        self.interimBytes = 0

    def clients(self) -> list[_Exchange]:
        """
        The exchanges waiting for this fetch's response.
        """
        waiting = [] if self.background else [self.leader]
        return waiting + self.followers


class CachingProxyResource(Resource):
    """
    The caching forward proxy.

    @ivar store: the L{IObjectStore}.
    @ivar access: the L{IAccessControl}.
    @ivar selector: the L{IPeerSelector}.
    @ivar mesh: neighbours and the ICP client (L{icpmesh.querier.Mesh}).
    @ivar visibleHostname: our name in C{Via} and C{X-Cache}.
    @ivar upstream: fetches from origins and neighbours (L{Upstream}).
    @ivar accessLog: the Squid-format access log, or C{None}.
    @ivar connectPorts: ports CONNECT may reach.
    @ivar maxRequestHeaderSize: largest request header section accepted
        (431 beyond).
    @ivar maxRequestBodySize: largest request body accepted (413 beyond),
        or C{None} for no limit.
    @ivar cdnCacheControl: how C{CDN-Cache-Control} is treated, one of
        L{icpmesh.caching.CDN_MODES}.
    """

    isLeaf = True

    #: Requests with bodies may be rendered before their body has arrived,
    #: with the body in C{request.bodyStream} (see L{icpmesh.body}).
    streamsRequestBodies = True

    def __init__(
        self,
        store: Any,
        access: Any,
        selector: Any,
        mesh: Any,
        visibleHostname: str,
        reactor: Any = None,
        upstream: Any = None,
        accessLog: Any = None,
        connectPorts: Any = None,
        maxRequestHeaderSize: int = MAX_REQUEST_HEADER_SIZE,
        maxRequestBodySize: Optional[int] = None,
        cdnCacheControl: str = "restrictive",
    ) -> None:
        """
        @param store: the L{IObjectStore}.
        @param access: the L{IAccessControl}.
        @param selector: the L{IPeerSelector}.
        @param mesh: has C{neighbours}, C{icp}, C{noteFetchFailed(n)} and
            C{noteFetchSucceeded(n)}.
        @param visibleHostname: our name in C{Via} and C{X-Cache}.
        @param reactor: the reactor (time, connections); the global one by
            default.
        @param upstream: has C{fetch(neighbour, method, url, headers,
            bodyProducer)} returning a Deferred L{IResponse}; an L{Upstream}
            by default.  C{headers} are L{InterimHeaders}: an upstream that
            can calls their C{interimReceived} for each 1xx response.
        @param accessLog: an L{icpmesh.accesslog.AccessLog}, or C{None}.
        @param connectPorts: ports CONNECT may reach (443 by default).
        @param maxRequestHeaderSize: see the instance variable.
        @param maxRequestBodySize: see the instance variable.
        @param cdnCacheControl: see the instance variable.
        """
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self._reactor = reactor
        self.store = store
        self.access = access
        self.selector = selector
        self.mesh = mesh
        self.visibleHostname = visibleHostname
        self.upstream = upstream if upstream is not None else Upstream(reactor)
        self.accessLog = accessLog
        self.connectPorts = frozenset(connectPorts) if connectPorts is not None else frozenset({443})
        self.maxRequestHeaderSize = maxRequestHeaderSize
        self.maxRequestBodySize = maxRequestBodySize
        if cdnCacheControl not in CDN_MODES:
            raise ValueError(f"cdnCacheControl must be one of {', '.join(CDN_MODES)}")
        self.cdnCacheControl = cdnCacheControl
        self.via = f"1.1 {visibleHostname} (icpmesh/{__version__})".encode()
        self._viaName = visibleHostname.lower().encode()
        self.xCacheHit = f"HIT from {visibleHostname}".encode()
        self.xCacheMiss = f"MISS from {visibleHostname}".encode()
        # id(meta) -> what every hit on it shares
        self._templates: dict[int, _HitTemplate] = {}
        # (meta, its directives) of the last _storedCC call
        self._lastDirectives: Optional[tuple[StoredResponse, dict[str, Optional[str]]]] = None
        # primary key -> the request header names its stored response varies on
        # primary key -> (the request header names its stored responses vary
        # on, the secondary keys stored under it), oldest first
        self._vary: dict[str, tuple[tuple[str, ...], set[str]]] = {}
        # primary key -> the fetch in flight for it
        self._inflight: dict[str, _Fetch] = {}
        #: Origin-form paths the node answers itself, path -> resource.
        self.localResources: dict[bytes, Resource] = {}

    # -- entry ------------------------------------------------------------

    def render(self, request: Any) -> Any:
        request.defaultContentType = None
        started = self._reactor.seconds()
        method = request.method.decode("latin-1").upper()
        uri = request.uri
        client = _clientAddress(request)
        if method == "CONNECT":
            return self._connect(request, client, started)
        lowered = uri[:8].lower()
        if not (lowered.startswith(b"http://") or lowered.startswith(b"https://")):
            local = self.localResources.get(uri.split(b"?", 1)[0])
            if local is not None and self.access.allowHTTP(
                AccessRequest(client=client, method=method, url=uri.decode("latin-1"),
                              scheme="http", host="", port=0, path=uri.decode("latin-1"))
            ):
                # The node's own pages (e.g. the CARP membership table).
                return local.render(request)
            return self._error(request, 400, "Bad Request",
                               "This is a proxy: send an absolute URL (GET http://host/path).",
                               client, method, uri.decode("latin-1"), started)
        url = uri.decode("latin-1")
        headerBytes = getattr(request, "headerBytes", None)
        if headerBytes is None:
            headerBytes = getattr(request.channel, "totalHeadersSize", 0)
        limit = self.maxRequestHeaderSize
        if limit < headerBytes and _headerSize(request.requestHeaders) > limit:
            # (A larger header section never gets here: twisted.web's
            # channel refuses it with 400 first.)
            return self._error(request, 431, "Request Header Fields Too Large",
                               "The request headers are too large.", client, method, url, started,
                               code="NONE")
        if self.maxRequestBodySize is not None and self._bodyTooLarge(request):
            return self._error(request, 413, "Content Too Large",
                               "The request body is too large.", client, method, url, started,
                               code="NONE")
        stream = getattr(request, "bodyStream", None)
        if stream is not None and self.maxRequestBodySize is not None:
            # A chunked body is checked as it arrives.
            request.bodyLimit = self.maxRequestBodySize
            request.onBodyTooLarge = lambda: self._streamTooLarge(request, client, method, url, started)
        parts = _urlParts(url)
        if parts is None:
            return self._error(request, 400, "Bad Request", "The URL cannot be parsed.",
                               client, method, url, started)
        access = AccessRequest(client, method, url, parts[0], parts[1], parts[2], parts[3],
                               _RequestHeaders(request.requestHeaders))
        if not self.access.allowHTTP(access):
            return self._error(request, 403, "Forbidden", "Access denied.", client, method, url, started)
        exchange = _Exchange(request, access, started)
        exchange.key = cacheKey(url)
        if method in ("GET", "HEAD"):
            # One look at the header names tells a plain request (the
            # common case, see _Exchange.plain) from one that needs more.
            plain = exchange.plain = _isPlain(request.requestHeaders)
            if not plain:
                values = request.requestHeaders.getRawHeaders(b"cache-control")
                if values:
                    exchange.requestCC = parseCacheControl(values)
                elif b"no-cache" in b",".join(request.requestHeaders.getRawHeaders(b"pragma", ())).lower():
                    exchange.requestCC = {"no-cache": None}
            exchange.storageKey = self._storageKey(exchange)
            d = self.store.get(exchange.storageKey)
            if _hasValue(d):
                # An in-memory store answered at once: skip the callback
                # machinery on the hit path.
                self._found(d.result, exchange, True)
            else:
                d.addCallbacks(self._found, self._lookupFailed, (exchange, True), None, (exchange,))
        else:
            if method in _MAX_FORWARDS_METHODS and self._maxForwards(exchange):
                return NOT_DONE_YET
            self._fetch(exchange, None, collapse=False)
        return NOT_DONE_YET

    def _bodyTooLarge(self, request: Any) -> bool:
        limit = self.maxRequestBodySize
        assert limit is not None
        for value in request.requestHeaders.getRawHeaders(b"content-length", ()):
            if value.strip().isdigit() and int(value) > limit:
                return True
        content = request.content
        if content is None:
            return False
        position = content.tell()
        content.seek(0, 2)
        size = content.tell()
        content.seek(position)
        return size > limit

    def _streamTooLarge(self, request: Any, client: str, method: str, url: str, started: float) -> None:
        """
        A streamed body of unknown length grew past C{maxRequestBodySize}:
        answer 413 when nothing of it went upstream yet and no response was
        started, else close the client's connection; the upstream request
        is aborted either way.
        """
        stream = request.bodyStream
        answer = stream.sent == 0 and not request.startedWriting and not request.finished
        request.bodyRefused = answer
        # The upstream request is failed first: finishing the response
        # detaches the stream, after which nothing could fail it.
        stream.abort(Failure(BodyAborted(f"request body over {self.maxRequestBodySize} bytes")))
        if answer:
            self._error(request, 413, "Content Too Large", "The request body is too large.",
                        client, method, url, started, code="NONE")
        else:
            log.info("request body for {url} over {limit} bytes after {sent} were sent upstream: "
                     "closing the client's connection", url=url, limit=self.maxRequestBodySize,
                     sent=stream.sent)
            if not request.finished and not request._disconnected:
                _abort(request)

    def _maxForwards(self, exchange: _Exchange) -> bool:
        """
        RFC 9110 section 7.6.2: answer TRACE and OPTIONS ourselves when
        C{Max-Forwards} is 0, else count it down.

        @return: C{True} when answered here.
        """
        request = exchange.request
        values = request.requestHeaders.getRawHeaders(b"max-forwards")
        if not values or not values[-1].strip().isdigit():
            return False
        remaining = int(values[-1].strip())
        if remaining > 0:
            request.requestHeaders.setRawHeaders(b"max-forwards", [str(remaining - 1).encode()])
            return False
        if exchange.access.method == "TRACE":
            lines = [request.method + b" " + request.uri + b" " + request.clientproto]
            for name, vals in request.requestHeaders.getAllRawHeaders():
                for value in vals:
                    lines.append(name + b": " + value)
            body = b"\r\n".join(lines) + b"\r\n\r\n"
            request.setResponseCode(200)
            request.responseHeaders.setRawHeaders(b"content-type", [b"message/http"])
        else:
            body = b""
            request.setResponseCode(200)
            request.responseHeaders.setRawHeaders(b"allow", [_ALLOW])
        request.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
        request.responseHeaders.removeHeader(b"server")
        request.responseHeaders.addRawHeader(b"via", self.via)
        request.write(body)
        request.finish()
        self._log(exchange, "TCP_MISS", 200, len(body), "HIER_NONE", "-")
        return True

    # -- CONNECT ------------------------------------------------------------

    def _connect(self, request: Any, client: str, started: float) -> Any:
        from icpmesh.tunnel import parseAuthority, startTunnel

        target = parseAuthority(request.uri)
        text = request.uri.decode("latin-1")
        if target is None:
            return self._error(request, 400, "Bad Request", "CONNECT needs host:port.",
                               client, "CONNECT", text, started)
        host, port = target
        access = AccessRequest(client=client, method="CONNECT", url=text, scheme="https",
                               host=host.lower(), port=port, path="")
        if not self.access.allowHTTP(access):
            return self._error(request, 403, "Forbidden", "Access denied.", client, "CONNECT", text, started)
        if port not in self.connectPorts:
            return self._error(request, 403, "Forbidden",
                               f"Tunnels are allowed only to ports {sorted(self.connectPorts)}.",
                               client, "CONNECT", text, started)

        def done(status: int, size: int) -> None:
            self._logLine(access, "TCP_TUNNEL", status, size, "HIER_DIRECT", host, started)

        startTunnel(request, host, port, self._reactor, onDone=done)
        return NOT_DONE_YET

    # -- lookups --------------------------------------------------------------

    def _storageKey(self, exchange: _Exchange) -> str:
        known = self._vary.get(exchange.key)
        if known is None:
            return exchange.key
        return varyKey(exchange.key, known[0], exchange.headerMap())

    def _lookupFailed(self, f: Failure, exchange: _Exchange) -> None:
        log.failure("store lookup failed for {url}", f, url=exchange.access.url)
        exchange.code = "TCP_SWAPFAIL_MISS"
        self._miss(exchange, collapse=False)

    def _found(self, entry: Any, exchange: _Exchange, collapse: bool) -> None:
        """
        A store lookup finished: serve a hit, revalidate, or fetch.
        """
        if exchange.gone:
            return
        exchange.entry = entry
        if entry is None:
            self._miss(exchange, collapse)
            return
        meta = entry.meta
        requestCC = exchange.requestCC
        now = self._reactor.seconds()
        # (A plain request has neither directives nor credentials.)
        credentials = None if exchange.plain else exchange.header(b"authorization")
        if meta.freshUntil > now and not requestCC and not credentials:
            # The hot path: a fresh hit for a request without directives
            # or credentials.
            self._serveHit(exchange, entry, meta, now, "TCP_HIT")
            return
        if credentials:
            storedCC = self._storedCC(meta)
            if not ("public" in storedCC or "s-maxage" in storedCC or "must-revalidate" in storedCC):
                # RFC 9111 3.5: not for requests with credentials.
                exchange.entry = None
                self._miss(exchange, collapse)
                return
        onlyIfCached = "only-if-cached" in requestCC
        if "no-cache" in requestCC and not onlyIfCached:
            exchange.code = "TCP_CLIENT_REFRESH_MISS"
            self._revalidate(exchange, entry, collapse)
            return
        if self._usable(meta, requestCC, now):
            self._serveHit(exchange, entry, meta, now, "TCP_HIT")
            return
        if onlyIfCached:
            self._gatewayTimeout(exchange, "The object is not in the cache or is stale (only-if-cached).")
            return
        storedCC = self._storedCC(meta)
        window = deltaSeconds(storedCC.get("stale-while-revalidate"))
        if (
            window is not None
            and now - meta.freshUntil <= window
            and not _mustRevalidate(storedCC)
            and "no-cache" not in requestCC
            and "max-age" not in requestCC
            and "min-fresh" not in requestCC
        ):
            # RFC 5861: serve it stale and revalidate in the background.
            self._serveHit(exchange, entry, meta, now, "TCP_HIT")
            self._backgroundRevalidate(exchange, entry)
            return
        exchange.code = "TCP_REFRESH_MODIFIED"
        self._revalidate(exchange, entry, collapse)

    def _usable(self, meta: StoredResponse, requestCC: dict[str, Optional[str]], now: float) -> bool:
        """
        Whether a stored response may be served without revalidation for
        this request (RFC 9111 sections 4.2 and 5.2.1).
        """
        remaining = meta.freshUntil - now
        maxAge = deltaSeconds(requestCC.get("max-age"))
        if maxAge is not None and _age(meta, now) > maxAge:
            return False
        minFresh = deltaSeconds(requestCC.get("min-fresh"))
        if minFresh is not None and remaining < minFresh:
            return False
        if remaining > 0:
            return True
        if "max-stale" in requestCC:
            storedCC = self._storedCC(meta)
            if _mustRevalidate(storedCC) or "no-cache" in storedCC:
                return False
            stale = requestCC["max-stale"]
            if stale is None:
                return True
            limit = deltaSeconds(stale)
            return limit is not None and -remaining <= limit
        return False

    # -- hits ---------------------------------------------------------------

    def _hitTemplate(self, meta: StoredResponse, size: int) -> "_HitTemplate":
        """
        What every hit on C{meta} shares, computed once per stored response
        (bounded by L{_TEMPLATES_MAX}).
        """
        cached = self._templates.get(id(meta))
        if cached is not None and cached.meta is meta:
            return cached
        template = Headers()
        for name, value in meta.headers:
            if name != b"age":
                template.addRawHeader(name, value)
        if meta.status not in _NO_BODY:
            template.setRawHeaders(b"content-length", [str(size).encode()])
        template.addRawHeader(b"via", self.via)
        template.setRawHeaders(b"x-cache", [self.xCacheHit])
        stored = meta.header(b"age")
        initialAge = int(stored) if stored is not None and stored.isdigit() else 0
        contentType = (meta.header(b"content-type") or b"-").decode("latin-1")
        if len(self._templates) >= _TEMPLATES_MAX:
            self._templates.clear()
        cached = self._templates[id(meta)] = _HitTemplate(meta, template, initialAge, contentType)
        return cached

    def _serveHit(self, exchange: _Exchange, entry: Any, meta: StoredResponse, now: float, code: str) -> None:
        """
        Answer from the store.  A plain request (no conditional, range,
        credentials or cache directives: L{_Exchange.plain}) on an HTTP/1.x
        connection takes L{_serveFastHit}; anything else builds its headers
        through C{twisted.web} below.
        """
        request = exchange.request
        if request is None or exchange.gone or request._disconnected:
            return
        template = self._hitTemplate(meta, entry.size)
        if exchange.plain and _canWriteRaw(request):
            self._serveFastHit(exchange, entry, meta, now, code, template)
            return
        status = meta.status
        out = _copyHeaders(template.headers)
        if not template.hasDate:
            out.setRawHeaders(b"date", request.responseHeaders.getRawHeaders(b"date", []))
        inm = exchange.header(b"if-none-match")
        ims = exchange.header(b"if-modified-since")
        if (inm or ims) and status == 200 and notModified(
            inm, ims[-1] if ims else None, meta.header(b"etag"), meta.header(b"last-modified"),
            meta.header(b"date"),
        ):
            status = 304
            code = "TCP_INM_HIT" if inm else "TCP_IMS_HIT"
            for name in (b"content-type", b"content-encoding", b"content-language", b"content-length"):
                out.removeHeader(name)
        span = None
        ranges = exchange.header(b"range") if status == 200 else None
        if ranges is not None and exchange.access.method == "GET":
            status, span = _rangeHit(exchange, ranges, meta, entry.size, out)
        connection = request.responseHeaders.getRawHeaders(b"connection")
        request.responseHeaders = out
        request.setResponseCode(status, meta.reason if status == meta.status else _REASONS[status])
        _setAge(out, b"%d" % (template.initialAge + max(0.0, now - meta.responseTime),))
        if connection:
            # twisted.web's "Connection: close" (HTTP/1.1 request that asked
            # for it): the connection closes after this response.
            out.setRawHeaders(b"connection", connection)
        if exchange.access.method == "HEAD" or status in _NO_HIT_BODY:
            request.finish()
            self._log(exchange, code, status, 0, "HIER_NONE", "-", contentType=template.contentType)
            return
        self._sendBody(exchange, entry, code, status, template.contentType, span)

    def _serveFastHit(
        self, exchange: _Exchange, entry: Any, meta: StoredResponse, now: float, code: str,
        template: "_HitTemplate",
    ) -> None:
        """
        Serve a plain hit: the status line and header block prebuilt in
        C{template}, with this hit's C{Date} (when none is stored), C{Age}
        and C{Connection}, go out in one write together with a body held in
        memory (L{_writeRaw}).  The headers are exactly those the slower
        path builds.
        """
        request = exchange.request
        status = meta.status
        parts = [request.clientproto, template.head]
        if not template.hasDate:
            for value in request.responseHeaders.getRawHeaders(b"date", ()):
                parts += (_DATE_KEY, b": ", value, b"\r\n")
        initialAge = template.initialAge
        age = now - meta.responseTime
        parts += (_AGE_KEY, b": ", b"%d" % (initialAge + age if age > 0 else initialAge,), b"\r\n")
        connection = request.responseHeaders.getRawHeaders(b"connection")
        if connection:
            for value in connection:
                parts += (_CONNECTION_KEY, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        head = b"".join(parts)
        if exchange.access.method == "HEAD" or status in _NO_BODY:
            _writeRaw(request, status, meta.reason, head, None)
            request.finish()
            self._log(exchange, code, status, 0, "HIER_NONE", "-", contentType=template.contentType)
            return
        body = getattr(entry, "body", None)
        if type(body) is bytes and len(body) == entry.size:
            # The memory store's bytes, sent as they are (no copy here).
            _writeRaw(request, status, meta.reason, head, body)
            request.finish()
            self._log(exchange, code, status, entry.size, "HIER_NONE", "-",
                      contentType=template.contentType)
            return
        # A body read from elsewhere (disk) streams through request.write,
        # with the consumer's flow control.
        _writeRaw(request, status, meta.reason, head, None)
        self._sendBody(exchange, entry, code, status, template.contentType)

    def _sendBody(
        self, exchange: _Exchange, entry: Any, code: str, status: int, contentType: str,
        span: Optional[tuple[int, int]] = None,
    ) -> None:
        """
        Write a stored body (or the C{(offset, length)} C{span} of it) to a
        request whose headers are out, then finish it; abort the connection
        if the body cannot be read whole.
        """
        request = exchange.request
        size = entry.size if span is None else span[1]

        def done(_: Any) -> None:
            if not request._disconnected:
                request.finish()
            self._log(exchange, code, status, size, "HIER_NONE", "-", contentType=contentType)

        def failed(f: Failure) -> None:
            log.failure("reading a cached object failed", f)
            _abort(request)

        d = entry.writeTo(request) if span is None else writeRange(entry, request, span[0], span[1])
        if _hasValue(d):
            done(None)
        else:
            d.addCallbacks(done, failed)

    # -- misses -----------------------------------------------------------

    def _miss(self, exchange: _Exchange, collapse: bool) -> None:
        if "only-if-cached" in exchange.requestCC:
            self._gatewayTimeout(exchange, "The object is not in the cache (only-if-cached).")
            return
        if not self.access.allowMiss(exchange.access):
            self._error(exchange.request, 403, "Forbidden", "This cache does not fetch misses for you.",
                        exchange.access.client, exchange.access.method, exchange.access.url,
                        exchange.started, code="TCP_DENIED")
            return
        self._fetch(exchange, None, collapse)

    def _revalidate(self, exchange: _Exchange, entry: Any, collapse: bool) -> None:
        if not self.access.allowMiss(exchange.access):
            self._error(exchange.request, 403, "Forbidden", "This cache does not fetch misses for you.",
                        exchange.access.client, exchange.access.method, exchange.access.url,
                        exchange.started, code="TCP_DENIED")
            return
        meta = entry.meta
        if exchange.access.method == "HEAD":
            # A HEAD's answer cannot refresh or replace a stored GET.
            self._fetch(exchange, None, collapse)
            return
        conditional = meta.header(b"etag") is not None or meta.header(b"last-modified") is not None
        self._fetch(exchange, entry, collapse, conditional)

    def _backgroundRevalidate(self, exchange: _Exchange, entry: Any) -> None:
        if exchange.key in self._inflight:
            return
        background = _Exchange(None, exchange.access, exchange.started)
        background.key = exchange.key
        background.storageKey = exchange.storageKey
        background.code = "TCP_REFRESH_MODIFIED"
        background._headerMap = exchange.headerMap()
        headers = Headers()
        if exchange.request is not None:
            for name, values in endToEndHeaders(exchange.request.requestHeaders):
                # No Range: the whole response is fetched, to replace the
                # stored one if it changed.
                if (
                    name not in _CONDITIONALS
                    and name not in _FRAMING
                    and name != b"cache-control"
                    and name != b"range"
                ):
                    headers.setRawHeaders(name, values)
        _addValidators(headers, entry.meta)
        fetch = _Fetch(self, background, entry, conditional=True, background=True)
        self._inflight[exchange.key] = fetch
        self._startFetch(fetch, headers)

    def _collapsible(self, exchange: _Exchange) -> bool:
        """
        Whether C{exchange} may share a fetch with others: a GET whose
        response could be stored and shared (no credentials, no range, no
        no-store, and no conditional of the client's own that would be
        forwarded as it is).
        """
        request = exchange.request
        if request is not None and exchange.plain and exchange.access.method == "GET":
            # None of the headers looked at below (see NOT_PLAIN_HEADERS),
            # so no directives either.
            return True
        return (
            request is not None
            and exchange.access.method == "GET"
            and "no-store" not in exchange.requestCC
            and not request.requestHeaders.hasHeader(b"authorization")
            and not request.requestHeaders.hasHeader(b"range")
            and (
                exchange.entry is not None
                or not (
                    request.requestHeaders.hasHeader(b"if-none-match")
                    or request.requestHeaders.hasHeader(b"if-modified-since")
                )
            )
        )

    def _fetch(self, exchange: _Exchange, revalidating: Any, collapse: bool, conditional: bool = False) -> None:
        """
        Fetch for C{exchange}: join a fetch in flight for the same URL, or
        start one (with the validators of C{revalidating}, a stale stored
        object, when C{conditional}).
        """
        collapsible = collapse and self._collapsible(exchange)
        if collapsible:
            inflight = self._inflight.get(exchange.key)
            if inflight is not None and inflight.joinable:
                exchange.collapsed = True
                inflight.followers.append(exchange)
                exchange.request.notifyFinish().addErrback(_clientLost, exchange)
                return
        fetch = _Fetch(self, exchange, revalidating, conditional)
        if collapsible and exchange.key not in self._inflight:
            self._inflight[exchange.key] = fetch
        request = exchange.request
        headers = InterimHeaders(
            interimReceived=lambda code, phrase, interim: self._interim(fetch, code, phrase, interim)
        )
        _setHeaders(headers, [
            pair for pair in endToEndHeaders(request.requestHeaders) if pair[0] not in _FRAMING
        ])
        if conditional:
            # The client's If-Range stays: with its Range it decides
            # between a 206 and a 200 when the origin's answer is not 304.
            for name in _CONDITIONALS:
                if name != b"if-range":
                    headers.removeHeader(name)
            _addValidators(headers, revalidating.meta)
        request.notifyFinish().addErrback(_clientLost, exchange)
        self._startFetch(fetch, headers)

    def _startFetch(self, fetch: _Fetch, headers: Headers) -> None:
        exchange = fetch.leader
        access = exchange.access
        headers.addRawHeader(b"via", self.via)
        policy = self.access.directPolicy(access)
        # never_direct applies to the selector's routes, not to a loop
        # broken by going direct.
        never = False
        if policy == "always" or self._looped(exchange):
            routes: Any = [_DIRECT]
        else:
            never = policy == "never"
            neighbours = [
                n for n in self.mesh.neighbours if self.access.allowNeighbour(n.name, access)
            ]
            try:
                routes = self.selector.selectRoutes(access, neighbours, self.mesh.icp)
            except BaseException:
                routes = Failure()

        def routed(routes: Any) -> None:
            if never:
                routes = [r for r in routes if r.neighbour is not None]
            fetch.routes = list(routes)
            self._tryRoutes(fetch, headers)

        if not isinstance(routes, (Deferred, Failure)) and not iscoroutine(routes):
            # The selector decided at once (no neighbour to ask): go on
            # without a Deferred, with the same outcome as below.
            try:
                routed(routes)
            except BaseException:
                try:
                    self._fetchCrashed(Failure(), fetch)
                except BaseException:
                    # As an errback's failure would be: logged, not raised
                    # into render() or a store callback.
                    log.failure("handling a failed fetch failed")
            return
        d: Deferred[Any] = maybeDeferred(lambda: routes)
        d.addCallback(routed)
        d.addErrback(self._fetchCrashed, fetch)

    def _looped(self, exchange: _Exchange) -> bool:
        """
        Whether our name is in the request's C{Via}: a forwarding loop
        among caches, broken by going direct (as Squid does).
        """
        values = exchange.header(b"via")
        if not values:
            return False
        for value in values:
            for hop in value.split(b","):
                words = hop.split()
                if len(words) >= 2 and words[1].lower() == self._viaName:
                    return True
        return False

    def _tryRoutes(self, fetch: _Fetch, headers: Headers) -> None:
        exchange = fetch.leader
        if not fetch.routes:
            self._fetchFailed(fetch, None, 503, "Service Unavailable",
                              "No route to fetch this from (no parent is up and going direct "
                              "is not allowed).")
            return
        route = fetch.routes.pop(0)
        request = exchange.request
        withBody = request is not None and exchange.access.method not in ("GET", "HEAD")
        stream: Optional[RequestBodyStream] = getattr(request, "bodyStream", None) if withBody else None
        if stream is not None and _uploadGiveUp(request, stream):
            # While routes were chosen the client left during its upload, or
            # its body broke the size limit.
            self._uploadGivenUp(fetch, route, stream)
            return
        sent = headers
        if route.onlyIfCached:
            sent = headers.copy()
            cc = list(sent.getRawHeaders(b"cache-control", []))
            sent.setRawHeaders(b"cache-control", [b", ".join(cc + [b"only-if-cached"])])
        body: Any = None
        if stream is not None:
            # Streamed as it arrives (icpmesh.body.StreamingRequest).
            body = stream.producer()
        elif withBody and _hasBody(request):
            # Read whole by twisted.web first (a plain Site).
            request.content.seek(0)
            body = FileBodyProducer(_BodyReader(request.content), cooperator=_cooperator(self._reactor))
        method = exchange.access.method.encode("latin-1") if request is None else request.method
        url = exchange.access.url.encode("latin-1")
        requestTime = self._reactor.seconds()
        d = self.upstream.fetch(route.neighbour, method, url, sent, body)

        def gotResponse(response: Any) -> None:
            self.mesh.noteFetchSucceeded(route.neighbour)
            if stream is not None and _uploadGiveUp(request, stream):
                # The upload was given up (client gone, body over the
                # limit, answered already): nobody takes this response.
                exchange.gone = True
                response.deliverBody(_Discard())
                self._uploadGivenUp(fetch, route, stream)
                return
            if stream is not None:
                stream.answered = True
            if route.onlyIfCached and response.code == 504 and fetch.routes and (
                stream is None or stream.replayable()
            ):
                # The sibling no longer has it: try the next route.
                response.deliverBody(_Discard())
                self._tryRoutes(fetch, headers)
                return
            self._gotResponse(fetch, route, response, requestTime)

        def failed(f: Failure) -> None:
            if stream is not None and _uploadGiveUp(request, stream):
                # The client went away during its upload (or the body broke
                # the size limit): the upstream request was aborted for it.
                exchange.gone = True
                self._uploadGivenUp(fetch, route, stream)
                return
            if f.check(ConnectError, DNSLookupError, TimeoutError) or _isConnectFailure(f):
                self.mesh.noteFetchFailed(route.neighbour)
            detail = f"Could not fetch the object: {f.getErrorMessage()}"
            if fetch.routes:
                if stream is None or stream.replayable():
                    self._tryRoutes(fetch, headers)
                    return
                # Part of the body went out and is not kept: it cannot be
                # sent again to another route.
                detail += " (the request body was partly sent, so no other route was tried)"
            timedOut = f.check(TimeoutError) is not None
            self._fetchFailed(
                fetch, route,
                504 if timedOut else 502,
                "Gateway Timeout" if timedOut else "Bad Gateway",
                detail,
            )

        d.addCallbacks(gotResponse, failed)
        d.addErrback(self._fetchCrashed, fetch)

    def _uploadGivenUp(self, fetch: _Fetch, route: Any, stream: RequestBodyStream) -> None:
        """
        The upstream request for C{fetch}'s streamed upload was given up
        (L{_uploadGiveUp}): release the fetch, and when L{_uploadLeftLog}
        says so log a client that went away before its request body was
        complete (the upstream request, if any, was aborted).
        """
        self._release(fetch)
        exchange = fetch.leader
        if not _uploadLeftLog(exchange.request, stream):
            return
        log.info("client went away after {received} request body bytes for {url}; "
                 "upstream request aborted", received=stream.received, url=exchange.access.url)
        self._log(exchange, "TCP_MISS_ABORTED", 0, 0,
                  ("TIMEOUT_" if route.timedOut else "") + route.code, _peerName(route, exchange.access))

    def _fetchCrashed(self, f: Failure, fetch: _Fetch) -> None:
        log.failure("proxy error for {url}", f, url=fetch.leader.access.url)
        self._release(fetch)
        for exchange in fetch.clients():
            request = exchange.request
            if exchange.gone or request is None or request.finished:
                continue
            if request.startedWriting:
                _abort(request)
            else:
                self._error(request, 500, "Internal Server Error", "The proxy failed.",
                            exchange.access.client, exchange.access.method, exchange.access.url,
                            exchange.started, code="NONE")

    def _release(self, fetch: _Fetch) -> list[_Exchange]:
        """
        Stop followers joining C{fetch}.

        @return: the followers.
        """
        fetch.joinable = False
        key = fetch.leader.key
        if self._inflight.get(key) is fetch:
            del self._inflight[key]
        return fetch.followers

    def _retry(self, followers: list[_Exchange]) -> None:
        """
        Let followers of a fetch whose response they cannot share look up
        again, without joining another fetch.
        """
        for exchange in followers:
            if exchange.gone:
                continue
            exchange.collapsed = False
            exchange.storageKey = self._storageKey(exchange)
            self.store.get(exchange.storageKey).addCallbacks(
                self._found, self._lookupFailed, (exchange, False), None, (exchange,)
            )

    def _fetchFailed(self, fetch: _Fetch, route: Any, status: int, reason: str, detail: str) -> None:
        followers = self._release(fetch)
        exchange = fetch.leader
        if fetch.background:
            log.warn("background revalidation of {url} failed: {detail}", url=exchange.access.url, detail=detail)
        elif not exchange.gone:
            if fetch.revalidating is not None and self._staleIfError(exchange, fetch.revalidating):
                pass
            else:
                if fetch.revalidating is not None and _mustRevalidate(self._storedCC(fetch.revalidating.meta)):
                    status, reason = 504, "Gateway Timeout"
                self._error(exchange.request, status, reason, detail, exchange.access.client,
                            exchange.access.method, exchange.access.url, exchange.started,
                            code="TCP_MISS", route=route)
        self._retry(followers)

    def _staleIfError(self, exchange: _Exchange, entry: Any) -> bool:
        """
        RFC 5861 section 4: serve the stale response when revalidation
        failed and C{stale-if-error} (in the response or the request) still
        allows it.

        @return: C{True} when the stale response was served.
        """
        meta = entry.meta
        storedCC = self._storedCC(meta)
        if _mustRevalidate(storedCC):
            return False
        now = self._reactor.seconds()
        staleness = now - meta.freshUntil
        for cc in (exchange.requestCC, storedCC):
            window = deltaSeconds(cc.get("stale-if-error"))
            if window is not None and staleness <= window:
                self._serveHit(exchange, entry, meta, now, "TCP_REFRESH_FAIL_OLD")
                return True
        return False

    # -- responses ----------------------------------------------------------

    def _interim(self, fetch: _Fetch, code: int, phrase: bytes, headers: Headers) -> None:
        """
        Pass a 1xx interim response on (RFC 9110 section 15.2), before the
        final response, to the client whose request started C{fetch}.

        Not to clients that joined the fetch (they get only the final
        response), nor to HTTP/1.0 clients, nor once the final response has
        begun.  C{100 Continue} is not passed on: twisted.web answers the
        client's C{Expect: 100-continue} itself.  C{101} is not supported
        (requests upstream never carry C{Upgrade}).  Interim responses are
        never stored, and their headers do not go into the final response.
        At most L{MAX_INTERIM_BYTES} of them per fetch are passed on.
        Like twisted.web's own C{100 Continue}, it is written to the
        client's connection directly, so only for HTTP/1.1 channels.
        """
        if code in (100, 101) or fetch.background:
            return
        exchange = fetch.leader
        request = exchange.request
        if (
            exchange.gone
            or request is None
            or request.clientproto != b"HTTP/1.1"
            or request.startedWriting
            or request.finished
            or request._disconnected
        ):
            return
        channel = request.channel
        if not isinstance(channel, HTTPChannel) or channel.transport is None:
            return
        lines = [b"HTTP/1.1 %d %s" % (code, phrase)]
        # (Twisted's Headers have already refused invalid field names and
        # turned CR and LF in values into spaces; the phrase is clean.)
        for name, values in endToEndHeaders(headers):
            for value in values:
                lines.append(name + b": " + value.translate(CONTROLS_TO_SPACES))
        lines.append(b"via: " + self.via)
        data = b"\r\n".join(lines) + b"\r\n\r\n"
        # They are written past the relay's flow control: an upstream that
        # sends 1xx after 1xx must not fill memory with them.
        fetch.interimBytes += len(data)
        if fetch.interimBytes > MAX_INTERIM_BYTES:
            if fetch.interimBytes - len(data) <= MAX_INTERIM_BYTES:
                log.warn("{url}: more than {limit} bytes of 1xx responses from upstream; "
                         "dropping the rest", url=exchange.access.url, limit=MAX_INTERIM_BYTES)
            return
        channel.transport.write(data)

    def _gotResponse(self, fetch: _Fetch, route: Any, response: Any, requestTime: float) -> None:
        exchange = fetch.leader
        responseTime = self._reactor.seconds()
        code = response.code
        access = exchange.access
        method = access.method
        headerPairs = endToEndHeaders(response.headers)
        entry = fetch.revalidating

        if entry is not None and fetch.conditional and code == 304:
            response.deliverBody(_Discard())
            self._refreshed(fetch, route, entry, headerPairs, requestTime, responseTime)
            return
        if (
            entry is not None
            and code in _ERROR_STATUSES
            and not fetch.background
            and not exchange.gone
            and self._staleIfError(exchange, entry)
        ):
            response.deliverBody(_Discard())
            self._retry(self._release(fetch))
            return

        if method not in ("GET", "HEAD") and 200 <= code < 400:
            # Unsafe methods invalidate the URL and the same-origin URLs in
            # Location and Content-Location (RFC 9111 section 4.4).
            self._invalidate(exchange.key)
            for name in (b"location", b"content-location"):
                for value in response.headers.getRawHeaders(name, []):
                    target = invalidationTarget(access.url, value)
                    if target is not None:
                        self._invalidate(cacheKey(target))

        writer = None
        storageKey = exchange.storageKey
        if method == "GET" and not getattr(route.neighbour, "proxyOnly", False):
            storageKey, writer = self._writerFor(exchange, response, headerPairs, requestTime, responseTime)
        if entry is not None and writer is None and method == "GET" and code < 500:
            # The old object was replaced by something not storable.
            self._invalidate(exchange.key)

        followers = self._release(fetch)
        sharing: list[_Exchange] = []
        if writer is not None and followers:
            known = self._vary.get(exchange.key)
            names = known[0] if known is not None else ()
            retry = []
            for follower in followers:
                if follower.gone:
                    continue
                if names and varyKey(exchange.key, names, follower.headerMap()) != storageKey:
                    retry.append(follower)
                else:
                    sharing.append(follower)
            self._retry(retry)
        else:
            self._retry(followers)

        clients = ([] if fetch.background or exchange.gone else [exchange]) + sharing
        length = response.length if isinstance(response.length, int) else None
        for client in clients:
            request = client.request
            request.setResponseCode(code, response.phrase)
            out = request.responseHeaders
            out.removeHeader(b"server")
            _setHeaders(out, headerPairs)
            out.addRawHeader(b"via", self.via)
            out.setRawHeaders(b"x-cache", [self.xCacheMiss])
            if length is not None and method != "HEAD" and code not in _NO_BODY and code >= 200:
                out.setRawHeaders(b"content-length", [str(length).encode()])

        hierarchy = ("TIMEOUT_" if route.timedOut else "") + route.code
        peer = _peerName(route, access)
        contentType = _contentType(response.headers)

        def done(reason: Optional[Failure], size: int) -> None:
            if reason is not None:
                log.warn(
                    "upstream body for {url} broke off after {size} bytes: {error}",
                    url=access.url, size=size, error=reason.getErrorMessage(),
                )
            logged = clients if not fetch.background else [exchange]
            for client in logged:
                logCode = "TCP_CF_MISS" if client.collapsed else client.code
                if reason is not None:
                    logCode += "_ABORTED"
                self._log(client, logCode, code, size, hierarchy, peer, contentType=contentType)

        relay = _Relay(self, clients, writer, done)
        for client in clients:
            # Every client registered _clientLost when it started or joined
            # the fetch: it now tells the relay too.
            client.relay = relay
        response.deliverBody(relay)

    def _refreshed(
        self,
        fetch: _Fetch,
        route: Any,
        entry: Any,
        headerPairs: list[tuple[bytes, Sequence[bytes]]],
        requestTime: float,
        responseTime: float,
    ) -> None:
        """
        A 304 answered our conditional request: update the stored headers
        and freshness (RFC 9111 section 4.3.4) and serve the stored body.
        """
        exchange = fetch.leader
        old = entry.meta
        fresh = [(name, value) for name, values in headerPairs for value in values]
        # The old corrected age does not apply to the new response.
        headers = updatedHeaders([(n, v) for n, v in old.headers if n != b"age"], fresh)
        meta = self._meta(old.status, old.reason, headers, requestTime, responseTime, old.size)
        if meta is None:
            meta = StoredResponse(old.status, old.reason, headers, requestTime, responseTime,
                                  responseTime, old.size)
        d = self.store.updateMeta(exchange.storageKey, meta)

        def updated(_: Any) -> None:
            followers = self._release(fetch)
            if fetch.background:
                self._logLine(exchange.access, "TCP_REFRESH_UNMODIFIED", 304, 0,
                              route.code, _peerName(route, exchange.access), exchange.started)
            elif not exchange.gone:
                self._serveHit(exchange, entry, meta, self._reactor.seconds(), "TCP_REFRESH_UNMODIFIED")
            self._retry(followers)

        def failed(f: Failure) -> None:
            log.failure("updating stored headers failed", f)
            updated(None)

        d.addCallbacks(updated, failed)

    def _storedCC(self, meta: StoredResponse) -> dict[str, Optional[str]]:
        """
        The cache directives of a stored response, C{CDN-Cache-Control}
        and C{Surrogate-Control} applied as L{cdnCacheControl} says.

        One lookup may ask up to three times (credentials, C{max-stale},
        C{stale-while-revalidate}); the last answer is kept for the same
        C{meta}.  Callers only read it.
        """
        last = self._lastDirectives
        if last is not None and last[0] is meta:
            return last[1]
        headers = meta.headers
        ccValues = [v for k, v in headers if k == b"cache-control"]
        if self.cdnCacheControl == "ignore":
            directives = parseCacheControl(ccValues)
        else:
            directives = responseDirectives(
                ccValues,
                [v for k, v in headers if k == b"cdn-cache-control"],
                [v for k, v in headers if k == b"surrogate-control"],
                self.cdnCacheControl,
            )[0]
        self._lastDirectives = (meta, directives)
        return directives

    def _meta(
        self,
        status: int,
        reason: bytes,
        headers: tuple[tuple[bytes, bytes], ...],
        requestTime: float,
        responseTime: float,
        size: Optional[int],
        directives: Optional[tuple[dict[str, Optional[str]], Optional[int], bool]] = None,
    ) -> Optional[StoredResponse]:
        """
        The L{StoredResponse} for a response with these headers, with its
        C{Age} header replaced by the corrected initial age and
        C{freshUntil} computed (RFC 9111 sections 4.2.1 and 4.2.3).

        @param directives: what L{responseDirectives} gives for the
            C{Cache-Control}, C{CDN-Cache-Control} and C{Surrogate-Control}
            values among C{headers}, when the caller has it already.
        @return: C{None} when the response is stale at once and has no
            validator, so storing it would be useless.
        """
        date = expires = lastModified = ageHeader = None
        hasValidator = False
        ccValues = []
        cdnValues = []
        surrogateValues = []
        for name, value in headers:
            if name == b"cache-control":
                ccValues.append(value)
            elif name == b"cdn-cache-control":
                cdnValues.append(value)
            elif name == b"surrogate-control":
                surrogateValues.append(value)
            elif name == b"date":
                date = value
            elif name == b"expires":
                # Two Expires lines make it invalid: treat as expired.
                expires = value if expires is None else b"invalid"
            elif name == b"last-modified":
                lastModified = value
                hasValidator = True
            elif name == b"age":
                if ageHeader is None:
                    ageHeader = value
            elif name == b"etag":
                hasValidator = True
        if directives is None:
            directives = responseDirectives(ccValues, cdnValues, surrogateValues, self.cdnCacheControl)
        cc, cap, ignoreExpires = directives
        dateTime = httpDate(date)
        lifetime = freshnessLifetime(
            status, cc, dateTime, None if ignoreExpires else expires, httpDate(lastModified), responseTime
        )
        if cap is not None:
            lifetime = min(lifetime, float(cap))
        age = correctedInitialAge(ageHeader, dateTime, requestTime, responseTime)
        freshUntil = responseTime + lifetime - age
        if "no-cache" in cc:
            freshUntil = min(freshUntil, responseTime)
        if freshUntil <= responseTime and not hasValidator:
            return None
        kept = tuple([
            (name, value) for name, value in headers if name != b"age" and name != b"content-length"
        ] + [(b"age", str(int(age)).encode())])
        return StoredResponse(
            status=status,
            reason=reason,
            headers=kept,
            requestTime=requestTime,
            responseTime=responseTime,
            freshUntil=freshUntil,
            size=size,
        )

    def _writerFor(
        self,
        exchange: _Exchange,
        response: Any,
        headerPairs: list[tuple[bytes, Sequence[bytes]]],
        requestTime: float,
        responseTime: float,
    ) -> tuple[str, Any]:
        """
        Decide whether to store C{response} and start writing it.

        @return: the storage key and the writer, or C{None} as the writer.
        """
        h = response.headers
        key = exchange.storageKey
        names = varyNames(h.getRawHeaders(b"vary"))
        if names is None:
            return key, None
        directives = responseDirectives(
            h.getRawHeaders(b"cache-control"),
            h.getRawHeaders(b"cdn-cache-control"),
            h.getRawHeaders(b"surrogate-control"),
            self.cdnCacheControl,
        )
        responseCC, _, ignoreExpires = directives
        if not mayStore(
            exchange.access.method,
            response.code,
            exchange.requestCC,
            responseCC,
            exchange.request is not None
            and not exchange.plain
            and exchange.request.requestHeaders.hasHeader(b"authorization"),
            h.hasHeader(b"expires") and not ignoreExpires,
        ):
            return key, None
        if not self.access.allowStore(exchange.access):
            return key, None
        length = response.length if isinstance(response.length, int) else None
        meta = self._meta(
            response.code,
            response.phrase,
            tuple([(name, value) for name, values in headerPairs for value in values]),
            requestTime,
            responseTime,
            length,
            # The same directives, unless the response's own Connection
            # header took some of their fields out of headerPairs.
            None if h.hasHeader(b"connection") else directives,
        )
        if meta is None:
            return key, None
        primary = exchange.key
        if names:
            known = self._vary.get(primary)
            if known is None or known[0] != names:
                # New or changed Vary: older variants (and a response
                # stored without Vary) must not be selected any more.
                self._forgetVariants(primary)
                self.store.delete(primary)
                if len(self._vary) >= _VARY_INDEX_MAX:
                    self._forgetVariants(next(iter(self._vary)))
                known = self._vary[primary] = (names, set())
            key = varyKey(primary, names, exchange.headerMap())
            known[1].add(key)
        else:
            self._forgetVariants(primary)
            key = primary
        exchange.storageKey = key
        try:
            return key, self.store.begin(key, meta)
        except ObjectTooLarge:
            return key, None

    def _invalidate(self, key: str) -> None:
        """
        Remove what is stored for the primary key C{key}, variants included.
        """
        self.store.delete(key)
        self._forgetVariants(key)

    def _forgetVariants(self, key: str) -> None:
        """
        Remove the variants stored under the primary key C{key} and forget
        its Vary names.
        """
        known = self._vary.pop(key, None)
        if known is not None:
            for variant in known[1]:
                self.store.delete(variant)

    # -- errors and logs ------------------------------------------------------

    def _gatewayTimeout(self, exchange: _Exchange, detail: str) -> None:
        self._error(exchange.request, 504, "Gateway Timeout", detail, exchange.access.client,
                    exchange.access.method, exchange.access.url, exchange.started, code="TCP_MISS")

    def _error(
        self,
        request: Any,
        status: int,
        reason: str,
        detail: str,
        client: str,
        method: str,
        url: str,
        started: float,
        code: str = "TCP_DENIED",
        route: Any = None,
    ) -> bytes:
        """
        Answer with a short html error page and log it.
        """
        if request is None or request.finished or request._disconnected:
            return NOT_DONE_YET  # type: ignore[return-value]
        body = _ERROR_PAGE.format(
            code=status, reason=reason, detail=escape(detail), version=__version__,
            host=escape(self.visibleHostname),
        ).encode()
        request.setResponseCode(status, reason.encode())
        request.responseHeaders.removeHeader(b"server")
        request.responseHeaders.setRawHeaders(b"content-type", [b"text/html; charset=utf-8"])
        request.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
        request.responseHeaders.setRawHeaders(b"x-cache", [self.xCacheMiss])
        request.responseHeaders.addRawHeader(b"via", self.via)
        if status == 403:
            code = "TCP_DENIED"
        elif status in (400, 413, 431, 501):
            code = "NONE"
        hierarchy = "HIER_NONE"
        if route is not None:
            hierarchy = ("TIMEOUT_" if route.timedOut else "") + route.code
        self._logLine(_Simple(client, method, url), code, status, len(body), hierarchy, "-", started,
                      "text/html")
        if request.method != b"HEAD":
            request.write(body)
        request.finish()
        return NOT_DONE_YET  # type: ignore[return-value]

    def _log(
        self,
        exchange: _Exchange,
        code: str,
        status: int,
        size: int,
        hierarchy: str,
        peer: str,
        meta: Any = None,
        contentType: str = "-",
    ) -> None:
        if self.accessLog is None:
            return
        if meta is not None:
            contentType = (meta.header(b"content-type") or b"-").decode("latin-1")
        self._logLine(exchange.access, code, status, size, hierarchy, peer, exchange.started, contentType)

    def _logLine(
        self,
        access: Any,
        code: str,
        status: int,
        size: int,
        hierarchy: str,
        peer: str,
        started: float,
        contentType: str = "-",
    ) -> None:
        if self.accessLog is None:
            return
        elapsed = int((self._reactor.seconds() - started) * 1000)
        self.accessLog.logRequest(access.client, code, status, size, access.method, access.url,
                                  hierarchy, peer, contentType, elapsed)


class _Simple:
    def __init__(self, client: str, method: str, url: str) -> None:
        self.client = client
        self.method = method
        self.url = url


class _DirectRoute:
    neighbour = None
    code = "HIER_DIRECT"
    timedOut = False
    onlyIfCached = False


_DIRECT = _DirectRoute()


def _hasValue(d: Deferred[Any]) -> bool:
    """
    Whether C{d} has already fired with a value (not a failure, not
    another Deferred) that can be read from C{d.result} at once.  Reading
    it so is a shortcut for stores that answer from memory; C{d} is left
    holding its result, which is harmless for a value.
    """
    return (
        d.called
        and not d.paused
        and not isinstance(d.result, (Failure, Deferred))
    )


def _canonicalName(name: bytes) -> bytes:
    """
    The key under which this Twisted's L{Headers} stores C{name}.
    """
    probe = Headers()
    probe.setRawHeaders(name, [b""])
    raw = getattr(probe, "_rawHeaders", {})
    return next(iter(raw), name)


#: Lower-case header name -> the key L{Headers} files it under (bounded).
_canonicalNames: dict[bytes, bytes] = {}


def _setHeaders(out: Headers, pairs: list[tuple[bytes, Sequence[bytes]]]) -> None:
    """
    C{out.setRawHeaders(name, values)} for each of C{pairs} (from
    L{endToEndHeaders} of a L{Headers}, so their values are clean already),
    straight into this Twisted's header dict.
    """
    raw = getattr(out, "_rawHeaders", None)
    if not isinstance(raw, dict):  # pragma: no cover - other Twisted versions
        for name, values in pairs:
            out.setRawHeaders(name, values)
        return
    names = _canonicalNames
    for name, values in pairs:
        key = names.get(name)
        if key is None:
            # (An invalid name raises here, as setRawHeaders would.)
            key = _canonicalName(name)
            if len(name) <= 64:
                # (Longer names are rare and not worth the memory.)
                if len(names) >= 10_000:
                    names.clear()
                names[name] = key
        raw[key] = list(values)


_AGE_KEY = _canonicalName(b"age")
_DATE_KEY = _canonicalName(b"date")
_CONNECTION_KEY = _canonicalName(b"connection")

#: Request headers that keep a GET or HEAD off the fast hit path:
#: directives and credentials that L{CachingProxyResource._found} must
#: weigh, and conditionals and ranges that change the answer.
NOT_PLAIN_HEADERS = (
    b"cache-control", b"pragma", b"authorization", b"if-none-match", b"if-modified-since",
    b"if-match", b"if-unmodified-since", b"if-range", b"range",
)


def _listedName(name: bytes) -> bytes:
    """
    The form in which this Twisted's C{Headers.getAllRawHeaders} lists
    header C{name}.
    """
    probe = Headers()
    probe.setRawHeaders(name, [b""])
    return next(iter(probe.getAllRawHeaders()))[0]


#: L{NOT_PLAIN_HEADERS} as L{_isPlain} sees them.
_NOT_PLAIN = frozenset(_listedName(name) for name in NOT_PLAIN_HEADERS)


def _isPlain(headers: Headers) -> bool:
    """
    Whether request C{headers} have none of L{NOT_PLAIN_HEADERS}: one look
    at each name.
    """
    for name, _ in headers.getAllRawHeaders():
        if name in _NOT_PLAIN:
            return False
    return True

#: Request versions whose responses L{_writeRaw} may write.
_RAW_VERSIONS = frozenset({b"HTTP/1.1", b"HTTP/1.0"})


class _HitTemplate:
    """
    What every hit on one stored response shares.

    @ivar meta: the L{StoredResponse}.
    @ivar headers: the response headers apart from C{Age} (and C{Date} when
        none is stored), to be copied with L{_copyHeaders}.
    @ivar initialAge: the stored (corrected initial) age.
    @ivar contentType: for the access log.
    @ivar hasDate: a C{Date} is stored.
    @ivar head: the status line after the version, and the header lines
        of C{headers}, as C{HTTPChannel.writeHeaders} writes them:
        C{b" 200 OK\\r\\nName: value\\r\\n..."}.
    """

    __slots__ = ("meta", "headers", "initialAge", "contentType", "hasDate", "head")

    def __init__(self, meta: StoredResponse, headers: Headers, initialAge: int, contentType: str) -> None:
        self.meta = meta
        self.headers = headers
        self.initialAge = initialAge
        self.contentType = contentType
        self.hasDate = headers.hasHeader(b"date")
        lines = [b" %d " % (meta.status,), meta.reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                lines += (name, b": ", value, b"\r\n")
        self.head = b"".join(lines)


def _canWriteRaw(request: Any) -> bool:
    """
    Whether L{_writeRaw} may answer C{request}: nothing written yet, over an
    HTTP/1.x channel, with no content encoder in the way.
    """
    return (
        not request.startedWriting
        and request.clientproto in _RAW_VERSIONS
        and isinstance(request.channel, HTTPChannel)
        and getattr(request, "_encoder", None) is None
    )


def _writeRaw(request: Any, status: int, reason: bytes, head: bytes, body: Optional[bytes]) -> None:
    """
    Write a response's status line and headers, already serialised, and
    its whole body if given, straight to the HTTP/1.x channel of a
    C{twisted.web} request, in one write; then the request is in the state
    its own first C{write} leaves it in, so that C{request.write} sends
    only body bytes and C{request.finish} only ends the response.

    This is the proxy's one step past C{twisted.web}'s public API: it
    relies on C{Request.write} writing headers only while
    C{startedWriting} is false, and on C{sentLength}, C{code} and
    C{code_message} being what the request's log line and C{finish} read.
    C{tests.test_fasthit.RawWriteTests} checks these against the installed
    Twisted.  Callers check L{_canWriteRaw} first, and send the headers
    C{Request.write} would add itself (C{Transfer-Encoding}: never here,
    the caller always knows the length; C{Connection}).

    @param head: C{b"HTTP/1.1 200 OK\\r\\n...\\r\\n\\r\\n"}.
    @param body: the body, or C{None} when there is none (C{HEAD}, 304) or
        it is written later with C{request.write}.
    """
    request.setResponseCode(status, reason)
    request.startedWriting = 1
    if body:
        request.sentLength = len(body)
        request.channel.writeSequence((head, body))
    else:
        request.channel.write(head)


def _setAge(headers: Headers, value: bytes) -> None:
    """
    Set C{Age} on headers made by L{_copyHeaders}.
    """
    raw = getattr(headers, "_rawHeaders", None)
    if isinstance(raw, dict):
        raw[_AGE_KEY] = [value]
    else:  # pragma: no cover - other Twisted versions
        headers.setRawHeaders(b"age", [value])


def _copyHeaders(template: Headers) -> Headers:
    """
    A copy of C{template} that shares its value lists: callers only replace
    whole headers (C{setRawHeaders}, C{removeHeader}) on the copy, never
    append to them.
    """
    raw = getattr(template, "_rawHeaders", None)
    if not isinstance(raw, dict):  # pragma: no cover - other Twisted versions
        return template.copy()
    copy = Headers.__new__(Headers)
    copy._rawHeaders = dict(raw)
    return copy


class _RequestHeaders(Mapping[str, str]):
    """
    The request headers for L{AccessRequest.headers}: the last value of
    each, by lower-case text name, decoded only when asked for.
    """

    __slots__ = ("_headers",)

    def __init__(self, headers: Headers) -> None:
        self._headers = headers

    def __getitem__(self, name: str) -> str:
        values = self._headers.getRawHeaders(name.encode("latin-1"))
        if not values:
            raise KeyError(name)
        return values[-1].decode("latin-1")

    def __iter__(self) -> Iterator[str]:
        return (name.decode("latin-1").lower() for name, _ in self._headers.getAllRawHeaders())

    def __len__(self) -> int:
        return sum(1 for _ in self._headers.getAllRawHeaders())


_urlCache: dict[str, Optional[tuple[str, str, int, str]]] = {}

#: An absolute C{http} URL in its common form, which L{_urlParts} reads
#: without C{urlsplit}: a lower-case host name or IPv4 address, a port of
#: digits, and a path (with query) of printable ASCII without space or
#: C{#}.  (A URL ending in a lone C{?} is left to C{urlsplit}, which drops
#: the empty query.)
_PLAIN_URL = re.compile(r"http://([a-z0-9][a-z0-9.-]*)(?::([0-9]{1,5}))?(/[!\x22\x24-\x7e]*)")


def _urlParts(url: str) -> Optional[tuple[str, str, int, str]]:
    """
    The scheme, host, port and path (with query) of an absolute URL, as
    L{AccessRequest.fromURL} computes them, remembered per URL (bounded);
    C{None} when it cannot be parsed.
    """
    parts = _urlCache.get(url, False)
    if parts is not False:
        return parts  # type: ignore[return-value]
    plain = _PLAIN_URL.fullmatch(url)
    if plain is not None and not url.endswith("?") and (
        plain.group(2) is None or int(plain.group(2)) <= 65535
    ):
        # The common form, read without urlsplit: what fromURL gives.
        port = plain.group(2)
        parts = ("http", plain.group(1), 80 if port is None else int(port), plain.group(3))
    else:
        try:
            request = AccessRequest.fromURL("", "", url)
        except ValueError:
            parts = None
        else:
            parts = (request.scheme, request.host, request.port, request.path)
    if len(_urlCache) >= 65536:
        _urlCache.clear()
    _urlCache[url] = parts
    return parts


def _headerSize(headers: Headers) -> int:
    """
    The size of a header section as sent (names, values, ": " and CRLF).
    """
    return sum(len(name) + len(value) + 4 for name, values in headers.getAllRawHeaders() for value in values)


def _mustRevalidate(cc: dict[str, Optional[str]]) -> bool:
    """
    Whether a stale response must not be served without revalidation by a
    shared cache (C{s-maxage} implies C{proxy-revalidate}).
    """
    return "must-revalidate" in cc or "proxy-revalidate" in cc or "s-maxage" in cc


def _age(meta: StoredResponse, now: float) -> float:
    """
    The current age of a stored response whose C{Age} header holds its
    corrected initial age (as L{CachingProxyResource._meta} stores it).
    """
    stored = meta.header(b"age")
    initial = int(stored) if stored is not None and stored.isdigit() else 0
    return initial + max(0.0, now - meta.responseTime)


def _addValidators(headers: Headers, meta: StoredResponse) -> None:
    """
    Make C{headers} a conditional request for the stored response C{meta}.
    """
    etag = meta.header(b"etag")
    lastModified = meta.header(b"last-modified")
    if etag is not None:
        headers.setRawHeaders(b"if-none-match", [etag])
    if lastModified is not None:
        headers.setRawHeaders(b"if-modified-since", [lastModified])


#: Fields that are digests of the whole content (RFC 1864, RFC 9530
#: section 2), removed from the 206 and 416 answers built from a stored 200.
_WHOLE_CONTENT_DIGESTS = (b"content-md5", b"content-digest")


def _rangeHit(
    exchange: _Exchange, ranges: list[bytes], meta: StoredResponse, size: int, out: Headers
) -> tuple[int, Optional[tuple[int, int]]]:
    """
    Apply a GET's C{Range} values C{ranges} (and its C{If-Range}) to a hit
    on a stored complete 200 whose body is C{size} bytes (RFC 9110 section
    14), editing the response headers C{out} in place.

    @return: C{(200, None)} to send the whole body (the header is ignored),
        C{(206, (offset, length))} to send one range, or C{(416, None)}.
    """
    acceptRanges = meta.header(b"accept-ranges")
    if acceptRanges is not None and acceptRanges.strip().lower() == b"none":
        # The origin said it does not do ranges for this resource.
        return 200, None
    ifRange = exchange.header(b"if-range")
    if ifRange is not None and not ifRangeAllows(
        ifRange, meta.header(b"etag"), meta.header(b"last-modified"), meta.header(b"date")
    ):
        return 200, None
    selected = parseRange(ranges, size)
    if selected is None:
        return 200, None
    # Digests of the whole content do not describe a part of it.
    for name in _WHOLE_CONTENT_DIGESTS:
        out.removeHeader(name)
    if selected is UNSATISFIABLE:
        for name in (b"content-type", b"content-encoding", b"content-language"):
            out.removeHeader(name)
        out.setRawHeaders(b"content-length", [b"0"])
        out.setRawHeaders(b"content-range", [unsatisfiedRange(size)])
        return 416, None
    first, last = selected  # type: ignore[misc]
    out.setRawHeaders(b"content-length", [b"%d" % (last - first + 1,)])
    out.setRawHeaders(b"content-range", [contentRange(first, last, size)])
    return 206, (first, last - first + 1)


def _uploadGiveUp(request: Any, stream: RequestBodyStream) -> bool:
    """
    Whether the upstream request for a streamed upload was given up: the
    client left during its body, the body broke C{maxRequestBodySize}, or
    the response is finished already.  Its outcome must then touch neither
    the response nor the routes.
    """
    return stream.clientGone or request.finished or getattr(request, "_overLimit", False)


def _uploadLeftLog(request: Any, stream: RequestBodyStream) -> bool:
    """
    Whether a given-up upload is logged as C{TCP_MISS_ABORTED}: the client
    left, or its connection was closed for a body over the limit (not when
    it was answered 413, which is logged already).
    """
    if getattr(request, "_overLimit", False):
        return not getattr(request, "bodyRefused", False)
    return stream.clientGone


def _clientLost(_: Any, exchange: _Exchange) -> None:
    """
    The client of C{exchange} went away before its response was finished
    (an errback of its request's C{notifyFinish}): mark it gone, and drop
    it from the relay sending it a response, if any.
    """
    exchange.gone = True
    relay = exchange.relay
    if relay is not None:
        # (It drops the exchange's back-reference to it too.)
        relay.clientLost(exchange)


def _abort(request: Any) -> None:
    """
    Drop a client's connection without finishing its response, so that it
    cannot take a truncated body for a complete one.
    """
    channel = request.channel
    if channel is not None and channel.transport is not None:
        channel.transport.abortConnection()


def _hasBody(request: Any) -> bool:
    """
    Whether a request came with a non-empty body.
    """
    content = request.content
    if content is None:
        return False
    content.seek(0, 2)
    size = content.tell()
    content.seek(0)
    return size > 0


class _BodyReader:
    """
    A request body as a file for L{FileBodyProducer}: reads end when
    C{twisted.web} has already closed the body (the response came first),
    and closing is left to C{twisted.web}.
    """

    def __init__(self, content: Any) -> None:
        self._content = content

    def read(self, size: int = -1) -> bytes:
        if self._content.closed:
            return b""
        return self._content.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._content.seek(offset, whence)

    def tell(self) -> int:
        return self._content.tell()

    def close(self) -> None:
        pass


def _peerName(route: Any, access: Any) -> str:
    """
    The host for the access log's hierarchy field.
    """
    return route.neighbour.host if route.neighbour is not None else access.host


def _clientAddress(request: Any) -> str:
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    return host if isinstance(host, str) else "0.0.0.0"


def _contentType(headers: Headers) -> str:
    values = headers.getRawHeaders(b"content-type")
    return values[-1].decode("latin-1") if values else "-"


def _isConnectFailure(f: Failure) -> bool:
    from twisted.web._newclient import RequestNotSent, RequestTransmissionFailed

    return f.check(RequestNotSent, RequestTransmissionFailed) is not None


def _cooperator(reactor: Any) -> Any:
    from twisted.internet.task import Cooperator

    return Cooperator(scheduler=lambda x: reactor.callLater(0, x))
