# -*- test-case-name: tests.test_proxy -*-
"""
The caching forward proxy: a leaf C{twisted.web} resource.

A forward proxy receives absolute-form request targets (C{GET
http://origin/path HTTP/1.1}); L{CachingProxyResource} is therefore the root
of its C{Site} and never traverses children.

For GET and HEAD it answers from the store while the stored response is
fresh (C{X-Cache: HIT}); otherwise it asks the peer selector where to fetch
from (a neighbour's hit, a parent, or the origin), streams the response to
the client while writing it to the store, and marks it C{X-Cache: MISS}.
Other methods are forwarded uncached and invalidate what is stored for the
URL.  A body that breaks off is never stored, and the client's response is
aborted rather than finished, so nobody is served a truncated object as if
it were complete.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    ProxyAgent,
    ResponseDone,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from icpmesh import __version__
from icpmesh.caching import (
    cacheKey,
    correctedInitialAge,
    deltaSeconds,
    freshnessLifetime,
    httpDate,
    mayStore,
    parseCacheControl,
)
from icpmesh.interfaces import AccessRequest, ObjectTooLarge, StoredResponse

log = Logger()

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

_ERROR_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>{code} {reason}</title></head>"
    "<body><h1>{code} {reason}</h1><p>{detail}</p><hr>"
    "<address>icpmesh/{version} on {host}</address></body></html>\n"
)


def endToEndHeaders(headers: Headers) -> list[tuple[bytes, list[bytes]]]:
    """
    The headers of C{headers} that are not hop-by-hop, including those
    named in C{Connection}.
    """
    drop = set(HOP_BY_HOP)
    for value in headers.getRawHeaders(b"connection", []):
        for token in value.split(b","):
            drop.add(token.strip().lower())
    return [
        (name.lower(), values)
        for name, values in headers.getAllRawHeaders()
        if name.lower() not in drop
    ]


class Upstream:
    """
    Fetches from origins and neighbours with C{twisted.web.client} over one
    persistent connection pool.
    """

    def __init__(self, reactor: Any, connectTimeout: float = 30.0) -> None:
        self._reactor = reactor
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 16
        self.connectTimeout = connectTimeout
        self._direct = Agent(reactor, pool=self.pool, connectTimeout=connectTimeout)
        self._proxies: dict[Any, ProxyAgent] = {}

    def agentFor(self, neighbour: Any) -> Any:
        if neighbour is None:
            return self._direct
        agent = self._proxies.get(neighbour)
        if agent is None:
            from twisted.internet.endpoints import HostnameEndpoint

            host = neighbour.icpAddress[0] if hasattr(neighbour, "icpAddress") else neighbour.host
            endpoint = HostnameEndpoint(
                self._reactor,
                host,
                neighbour.httpPort,
                timeout=getattr(neighbour, "connectTimeout", self.connectTimeout),
            )
            if getattr(neighbour, "tls", False):
                from twisted.internet.endpoints import wrapClientTLS
                from twisted.internet.ssl import optionsForClientTLS

                domain = neighbour.config.values.get("tls-domain", neighbour.host)
                endpoint = wrapClientTLS(optionsForClientTLS(domain), endpoint)
            agent = self._proxies[neighbour] = ProxyAgent(endpoint, self._reactor, pool=self.pool)
        return agent

    def fetch(
        self, neighbour: Any, method: bytes, url: bytes, headers: Headers, body: Any
    ) -> "Deferred[IResponse]":
        return self.agentFor(neighbour).request(method, url, headers, body)

    def close(self) -> Deferred[None]:
        return self.pool.closeCachedConnections()


class _BodyRelay(Protocol):
    """
    Receives an upstream body and writes it to the client and the store.
    """

    def __init__(self, proxy: "CachingProxyResource", request: Any, writer: Any, done: Deferred[Any]) -> None:
        self.proxy = proxy
        self.request = request
        self.writer = writer
        self.done = done
        self.clientGone = False
        self.size = 0

    def connectionMade(self) -> None:
        if not self.clientGone and self.transport is not None:
            # Flow control: Twisted pauses the upstream when the client's
            # buffer is full.
            self.request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if not self.clientGone:
            self.request.write(data)
        writer = self.writer
        if writer is not None:
            try:
                writer.write(data)
            except ObjectTooLarge:
                self.writer = None

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        complete = reason.check(ResponseDone) is not None
        writer = self.writer
        self.writer = None
        if not self.clientGone:
            self.request.unregisterProducer()
        if complete:
            if writer is not None:
                writer.finish().addErrback(
                    lambda f: log.warn("not stored: {error}", error=f.getErrorMessage())
                )
            if not self.clientGone:
                self.request.finish()
        else:
            if writer is not None:
                writer.abort()
            if reason.check(PotentialDataLoss) and not self.clientGone:
                # A close-delimited body: complete as far as anyone can
                # tell, but not trusted enough to store.
                self.request.finish()
            elif not self.clientGone:
                log.warn(
                    "upstream body for {url} broke off after {size} bytes: {error}",
                    url=self.request.uri,
                    size=self.size,
                    error=reason.getErrorMessage(),
                )
                self.request.channel.transport.abortConnection()
        self.done.callback(self.size)


class CachingProxyResource(Resource):
    """
    The caching forward proxy.

    @ivar store: the L{IObjectStore}.
    @ivar access: the L{IAccessControl}.
    @ivar selector: the L{IPeerSelector}.
    @ivar mesh: neighbours and the ICP client (L{icpmesh.querier.Mesh}).
    @ivar visibleHostname: our name in C{Via} and C{X-Cache}.
    @ivar upstream: fetches from origins and neighbours.
    @ivar accessLog: the Squid-format access log, or C{None}.
    """

    isLeaf = True

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
    ) -> None:
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
        self.via = f"1.1 {visibleHostname} (icpmesh/{__version__})".encode()
        self.xCacheHit = f"HIT from {visibleHostname}".encode()
        self.xCacheMiss = f"MISS from {visibleHostname}".encode()

    # -- entry ------------------------------------------------------------

    def render(self, request: Any) -> Any:
        request.defaultContentType = None
        request.responseHeaders.removeHeader(b"server")
        started = self._reactor.seconds()
        method = request.method.decode("latin-1").upper()
        uri = request.uri
        client = _clientAddress(request)
        if method == "CONNECT":
            return self._connect(request, client, started)
        lowered = uri[:8].lower()
        if not (lowered.startswith(b"http://") or lowered.startswith(b"https://")):
            return self._error(request, 400, "Bad Request",
                               "This is a proxy: send an absolute URL (GET http://host/path).",
                               client, method, uri.decode("latin-1"), started)
        url = uri.decode("latin-1")
        headers = {
            name.decode("latin-1").lower(): values[-1].decode("latin-1")
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        try:
            access = AccessRequest.fromURL(client, method, url, headers=headers)
        except ValueError:
            return self._error(request, 400, "Bad Request", "The URL cannot be parsed.",
                               client, method, url, started)
        if not self.access.allowHTTP(access):
            return self._error(request, 403, "Forbidden", "Access denied.", client, method, url, started)
        if method in ("GET", "HEAD"):
            self._cachedOrFetch(request, access, started)
        else:
            self._forward(request, access, started, cacheable=False)
        return NOT_DONE_YET

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
            self._log(access, "TCP_TUNNEL", status, size, "HIER_DIRECT", host, started)

        startTunnel(request, host, port, self._reactor, onDone=done)
        return NOT_DONE_YET

    # -- hits ---------------------------------------------------------------

    def _cachedOrFetch(self, request: Any, access: AccessRequest, started: float) -> None:
        requestCC = parseCacheControl(request.requestHeaders.getRawHeaders(b"cache-control"))
        noCache = "no-cache" in requestCC or (
            b"no-cache" in b",".join(request.requestHeaders.getRawHeaders(b"pragma", []))
        )
        key = cacheKey(access.url)
        if noCache or "no-store" in requestCC:
            if "only-if-cached" in requestCC:
                self._error(request, 504, "Gateway Timeout", "Not in cache (only-if-cached).",
                            access.client, access.method, access.url, started, code="TCP_MISS")
                return
            self._forward(request, access, started, cacheable="no-store" not in requestCC)
            return

        def found(entry: Any) -> None:
            now = self._reactor.seconds()
            if entry is not None and self._fresh(entry.meta, requestCC, now):
                self._serveHit(request, access, entry, started, now)
            elif "only-if-cached" in requestCC:
                self._error(request, 504, "Gateway Timeout", "Not in cache (only-if-cached).",
                            access.client, access.method, access.url, started, code="TCP_MISS")
            elif not self.access.allowMiss(access):
                self._error(request, 403, "Forbidden", "This cache does not fetch misses for you.",
                            access.client, access.method, access.url, started, code="TCP_DENIED")
            else:
                self._forward(request, access, started, cacheable=True)

        self.store.get(key).addCallback(found).addErrback(
            lambda f: self._internalError(request, access, started, f)
        )

    def _fresh(self, meta: StoredResponse, requestCC: dict[str, Optional[str]], now: float) -> bool:
        """
        Whether a stored response may be served without revalidation for
        this request (RFC 9111 section 4.2 and 5.2.1).
        """
        remaining = meta.freshUntil - now
        maxAge = deltaSeconds(requestCC.get("max-age"))
        if maxAge is not None and self._age(meta, now) > maxAge:
            return False
        minFresh = deltaSeconds(requestCC.get("min-fresh"))
        if minFresh is not None and remaining < minFresh:
            return False
        if remaining > 0:
            return True
        if "max-stale" in requestCC:
            responseCC = parseCacheControl([v for k, v in meta.headers if k == b"cache-control"])
            if "must-revalidate" in responseCC or "proxy-revalidate" in responseCC or "no-cache" in responseCC:
                return False
            stale = requestCC["max-stale"]
            return stale is None or -remaining <= (deltaSeconds(stale) or 0)
        return False

    def _age(self, meta: StoredResponse, now: float) -> float:
        ageHeader = meta.header(b"age")
        date = httpDate(meta.header(b"date"))
        initial = correctedInitialAge(ageHeader, date, meta.requestTime, meta.responseTime)
        return initial + (now - meta.responseTime)

    def _serveHit(self, request: Any, access: AccessRequest, entry: Any, started: float, now: float) -> None:
        meta = entry.meta
        request.setResponseCode(meta.status, meta.reason)
        out = request.responseHeaders
        for name, value in meta.headers:
            out.addRawHeader(name, value)
        out.setRawHeaders(b"age", [str(int(self._age(meta, now))).encode()])
        out.setRawHeaders(b"content-length", [str(entry.size).encode()])
        out.addRawHeader(b"via", self.via)
        out.setRawHeaders(b"x-cache", [self.xCacheHit])
        size = entry.size if access.method == "GET" else 0

        def done(_: Any) -> None:
            request.finish()
            self._log(access, "TCP_HIT", meta.status, size, "HIER_NONE", "-", started, meta)

        def failed(f: Failure) -> None:
            log.failure("reading a cached object failed", f)
            request.channel.transport.abortConnection()

        if access.method == "HEAD":
            done(None)
        else:
            entry.writeTo(request).addCallbacks(done, failed)

    # -- misses and other methods -----------------------------------------

    def _forward(self, request: Any, access: AccessRequest, started: float, cacheable: bool) -> None:
        policy = self.access.directPolicy(access)
        if policy == "always":
            d: Deferred[Any] = maybeDeferred(lambda: [_DIRECT])
        else:
            neighbours = [
                n for n in self.mesh.neighbours if self.access.allowNeighbour(n.name, access)
            ]
            d = maybeDeferred(self.selector.selectRoutes, access, neighbours, self.mesh.icp)
            if policy == "never":
                d.addCallback(lambda routes: [r for r in routes if r.neighbour is not None])
        d.addCallback(lambda routes: self._tryRoutes(request, access, list(routes), started, cacheable))
        d.addErrback(lambda f: self._internalError(request, access, started, f))

    def _tryRoutes(
        self, request: Any, access: AccessRequest, routes: list[Any], started: float, cacheable: bool
    ) -> None:
        if not routes:
            self._error(request, 503, "Service Unavailable",
                        "No route to fetch this from (no parent is up and going direct is not allowed).",
                        access.client, access.method, access.url, started)
            return
        route = routes.pop(0)
        headers = Headers()
        for name, values in endToEndHeaders(request.requestHeaders):
            headers.setRawHeaders(name, values)
        headers.addRawHeader(b"via", self.via)
        if route.onlyIfCached:
            cc = headers.getRawHeaders(b"cache-control", [])
            headers.setRawHeaders(b"cache-control", [b", ".join(cc + [b"only-if-cached"])])
        if request.method in (b"GET", b"HEAD"):
            body = None
        else:
            request.content.seek(0)
            body = FileBodyProducer(request.content, cooperator=_cooperator(self._reactor))
        requestTime = self._reactor.seconds()
        d = self.upstream.fetch(route.neighbour, request.method, request.uri, headers, body)

        def gotResponse(response: IResponse) -> None:
            if route.neighbour is not None:
                self.mesh.noteFetchSucceeded(route.neighbour)
            else:
                self.mesh.noteFetchSucceeded(None)
            if route.onlyIfCached and response.code == 504 and routes:
                # The sibling no longer has it: try the next route.
                response.deliverBody(_Discard())
                self._tryRoutes(request, access, routes, started, cacheable)
                return
            self._relay(request, access, route, response, requestTime, started, cacheable)

        def failed(f: Failure) -> None:
            if f.check(ConnectError, DNSLookupError, TimeoutError) or _isConnectFailure(f):
                self.mesh.noteFetchFailed(route.neighbour)
            if routes:
                self._tryRoutes(request, access, routes, started, cacheable)
                return
            timedOut = f.check(TimeoutError) is not None
            self._error(
                request,
                504 if timedOut else 502,
                "Gateway Timeout" if timedOut else "Bad Gateway",
                f"Could not fetch the object: {f.getErrorMessage()}",
                access.client, access.method, access.url, started,
                code="TCP_MISS", route=route,
            )

        d.addCallbacks(gotResponse, failed)
        d.addErrback(lambda f: self._internalError(request, access, started, f))

    def _relay(
        self,
        request: Any,
        access: AccessRequest,
        route: Any,
        response: IResponse,
        requestTime: float,
        started: float,
        cacheable: bool,
    ) -> None:
        responseTime = self._reactor.seconds()
        headerPairs = endToEndHeaders(response.headers)
        request.setResponseCode(response.code, response.phrase)
        out = request.responseHeaders
        for name, values in headerPairs:
            out.setRawHeaders(name, values)
        out.addRawHeader(b"via", self.via)
        out.setRawHeaders(b"x-cache", [self.xCacheMiss])
        length = response.length if isinstance(response.length, int) else None
        if length is not None and access.method != "HEAD":
            out.setRawHeaders(b"content-length", [str(length).encode()])

        method = access.method
        key = cacheKey(access.url)
        if method not in ("GET", "HEAD"):
            # Unsafe methods invalidate the URL and its Location (RFC 9111 4.4).
            if 200 <= response.code < 400:
                self.store.delete(key)
                for name in (b"location", b"content-location"):
                    for value in response.headers.getRawHeaders(name, []):
                        target = value.decode("latin-1")
                        if target.startswith(("http://", "https://")):
                            self.store.delete(cacheKey(target))
        writer = None
        if cacheable and method == "GET" and not getattr(route.neighbour, "proxyOnly", False):
            writer = self._writerFor(request, access, response, key, headerPairs, requestTime,
                                     responseTime, length)

        hierarchy = ("TIMEOUT_" if route.timedOut else "") + route.code
        peer = route.neighbour.host if route.neighbour is not None else access.host
        done: Deferred[int] = Deferred()
        relay = _BodyRelay(self, request, writer, done)
        request.notifyFinish().addErrback(lambda _: _clientGone(relay))
        response.deliverBody(relay)
        done.addCallback(
            lambda size: self._log(access, "TCP_MISS", response.code, size, hierarchy, peer,
                                   started, None, _contentType(response.headers))
        )

    def _writerFor(
        self,
        request: Any,
        access: AccessRequest,
        response: IResponse,
        key: str,
        headerPairs: list[tuple[bytes, list[bytes]]],
        requestTime: float,
        responseTime: float,
        length: Optional[int],
    ) -> Any:
        h = response.headers
        responseCC = parseCacheControl(h.getRawHeaders(b"cache-control"))
        requestCC = parseCacheControl(request.requestHeaders.getRawHeaders(b"cache-control"))
        lastModified = httpDate((h.getRawHeaders(b"last-modified") or [None])[-1])
        expires = (h.getRawHeaders(b"expires") or [None])[-1]
        if b"*" in b",".join(h.getRawHeaders(b"vary", [])):
            return None
        if h.getRawHeaders(b"vary"):
            # Secondary keys are not implemented yet: do not store.
            return None
        if not mayStore(
            access.method,
            response.code,
            requestCC,
            responseCC,
            request.requestHeaders.hasHeader(b"authorization"),
            expires is not None,
            lastModified is not None,
        ):
            return None
        if "no-cache" in responseCC:
            return None
        if not self.access.allowStore(access):
            return None
        date = httpDate((h.getRawHeaders(b"date") or [None])[-1])
        lifetime = freshnessLifetime(response.code, responseCC, date, expires, lastModified, responseTime)
        if lifetime <= 0:
            return None
        age = correctedInitialAge((h.getRawHeaders(b"age") or [None])[-1], date, requestTime, responseTime)
        meta = StoredResponse(
            status=response.code,
            reason=response.phrase,
            headers=tuple((name, value) for name, values in headerPairs for value in values
                          if name not in (b"age", b"content-length")),
            requestTime=requestTime,
            responseTime=responseTime,
            freshUntil=responseTime + lifetime - age,
            size=length,
        )
        try:
            return self.store.begin(key, meta)
        except ObjectTooLarge:
            return None

    # -- errors and logs ------------------------------------------------------

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
        from html import escape

        body = _ERROR_PAGE.format(
            code=status, reason=reason, detail=escape(detail), version=__version__,
            host=escape(self.visibleHostname),
        ).encode()
        request.setResponseCode(status, reason.encode())
        request.responseHeaders.setRawHeaders(b"content-type", [b"text/html; charset=utf-8"])
        request.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
        request.responseHeaders.setRawHeaders(b"x-cache", [self.xCacheMiss])
        request.responseHeaders.addRawHeader(b"via", self.via)
        if status in (403, 400, 501):
            code = "TCP_DENIED" if status == 403 else "NONE"
        hierarchy = "HIER_NONE"
        if route is not None:
            hierarchy = ("TIMEOUT_" if route.timedOut else "") + route.code
        self._log(_Simple(client, method, url), code, status, len(body), hierarchy, "-", started)
        if request.method != b"HEAD":
            request.write(body)
        request.finish()
        return NOT_DONE_YET  # type: ignore[return-value]

    def _internalError(self, request: Any, access: AccessRequest, started: float, f: Failure) -> None:
        log.failure("proxy error for {url}", f, url=access.url)
        if request.finished or request._disconnected:
            return
        if request.startedWriting:
            request.channel.transport.abortConnection()
            return
        self._error(request, 500, "Internal Server Error", "The proxy failed.",
                    access.client, access.method, access.url, started, code="NONE")

    def _log(
        self,
        access: Any,
        code: str,
        status: int,
        size: int,
        hierarchy: str,
        peer: str,
        started: float,
        meta: Any = None,
        contentType: str = "-",
    ) -> None:
        if self.accessLog is None:
            return
        if meta is not None:
            contentType = (meta.header(b"content-type") or b"-").decode("latin-1")
        elapsed = int((self._reactor.seconds() - started) * 1000)
        self.accessLog.logRequest(access.client, code, status, size, access.method, access.url,
                                  hierarchy, peer, contentType, elapsed)


class _Simple:
    def __init__(self, client: str, method: str, url: str) -> None:
        self.client = client
        self.method = method
        self.url = url


class _Discard(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        pass


class _DirectRoute:
    neighbour = None
    code = "HIER_DIRECT"
    timedOut = False
    onlyIfCached = False


_DIRECT = _DirectRoute()


def _clientGone(relay: _BodyRelay) -> None:
    relay.clientGone = True
    try:
        relay.request.unregisterProducer()
    except Exception:
        pass
    transport = relay.transport
    if transport is not None and hasattr(transport, "resumeProducing"):
        # Keep reading so the object can still be stored.
        try:
            transport.resumeProducing()
        except Exception:
            pass


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
