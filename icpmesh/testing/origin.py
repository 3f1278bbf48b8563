# -*- test-case-name: tests.test_proxy -*-
"""
A fake origin server for tests of the proxy and of plugins.

L{FakeOrigin} is a leaf C{twisted.web} resource that serves configured
responses per path, counts the requests it gets per path and records their
headers and bodies.  It answers conditional requests (C{If-None-Match},
C{If-Modified-Since}) with 304 when the configured response allows, so
revalidation can be tested, and dates its responses from its own reactor so
that tests on a L{twisted.internet.task.Clock} get consistent C{Date}
headers.

L{InMemoryUpstream} is an upstream for
L{icpmesh.proxy.CachingProxyResource} that sends its requests to resources
in memory (a L{FakeOrigin} for the origin, any resource per neighbour)
over C{twisted.test.iosim} connections, with the client stack of
L{icpmesh.proxy.Upstream}; nothing opens a socket::

    origin = FakeOrigin(reactor=clock)
    origin.setResponse("/a", b"hello", headers={"Cache-Control": "max-age=60"})
    upstream = InMemoryUpstream(origin)
    proxy = CachingProxyResource(store, access, selector, mesh, "proxy.test",
                                 reactor=clock, upstream=upstream)
    ...  # send a request to Site(proxy)
    upstream.flush()  # let the in-memory connections carry their bytes
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import attr
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.web.http import datetimeToString, stringToDatetime
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

HeaderSpec = Union[Mapping[str, Union[str, Sequence[str]]], Sequence[tuple[str, str]], None]


@attr.s(slots=True, frozen=True, auto_attribs=True)
class OriginResponse:
    """
    A response a L{FakeOrigin} serves.

    @ivar status: the status code.
    @ivar body: the body.
    @ivar headers: C{(name, value)} text pairs.
    @ivar conditional: answer matching C{If-None-Match} /
        C{If-Modified-Since} requests with 304.
    @ivar chunked: send the body without C{Content-Length} (chunked).
    @ivar interim: 1xx interim responses sent before this one, each as
        C{(status, headers)} with C{(name, value)} text pairs.
    """

    status: int = 200
    body: bytes = b""
    headers: Sequence[tuple[str, str]] = ()
    conditional: bool = True
    chunked: bool = False
    interim: Sequence[tuple[int, Sequence[tuple[str, str]]]] = ()

    def header(self, name: str) -> Optional[str]:
        """
        The last value of header C{name} (case-insensitive), or C{None}.
        """
        name = name.lower()
        found = None
        for key, value in self.headers:
            if key.lower() == name:
                found = value
        return found


@attr.s(slots=True, frozen=True, auto_attribs=True)
class ReceivedRequest:
    """
    A request a L{FakeOrigin} got.

    @ivar method: the method, as text.
    @ivar path: the path and query (origin-form), as text.
    @ivar headers: the request headers (a copy).
    @ivar body: the request body.
    """

    method: str
    path: str
    headers: Headers
    body: bytes

    def header(self, name: str) -> Optional[str]:
        """
        The last value of request header C{name}, as text, or C{None}.
        """
        values = self.headers.getRawHeaders(name.encode("latin-1"))
        return values[-1].decode("latin-1") if values else None


def _headerPairs(headers: HeaderSpec) -> tuple[tuple[str, str], ...]:
    if headers is None:
        return ()
    if isinstance(headers, Mapping):
        pairs: list[tuple[str, str]] = []
        for name, value in headers.items():
            if isinstance(value, str):
                pairs.append((name, value))
            else:
                pairs.extend((name, v) for v in value)
        return tuple(pairs)
    return tuple(headers)


class FakeOrigin(Resource):
    """
    An origin server in memory.

    Unknown paths get a 404 (not cacheable: no freshness information).

    @ivar counts: requests per path (a L{Counter} of text paths).
    @ivar requests: every L{ReceivedRequest}, oldest first.
    @ivar held: requests whose response is held back (see L{hold}), as
        C{(path, request)} pairs.
    """

    isLeaf = True

    def __init__(self, reactor: Any = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self._reactor = reactor
        self._responses: dict[str, Union[OriginResponse, Callable[[ReceivedRequest], OriginResponse]]] = {}
        self._held: set[str] = set()
        self.counts: Counter[str] = Counter()
        self.requests: list[ReceivedRequest] = []
        self.held: list[tuple[str, Any]] = []

    def setResponse(
        self,
        path: str,
        body: bytes = b"",
        status: int = 200,
        headers: HeaderSpec = None,
        conditional: bool = True,
        chunked: bool = False,
        interim: Sequence[tuple[int, HeaderSpec]] = (),
    ) -> OriginResponse:
        """
        Serve this response for C{path} (path and query, for example
        C{"/a?b=1"}) from now on.

        @param interim: 1xx responses to send first, as C{(status,
            headers)}.
        @return: the L{OriginResponse}.
        """
        response = OriginResponse(
            status, body, _headerPairs(headers), conditional, chunked,
            tuple((code, _headerPairs(fields)) for code, fields in interim),
        )
        self._responses[path] = response
        return response

    def setHandler(self, path: str, handler: Callable[[ReceivedRequest], OriginResponse]) -> None:
        """
        Compute the response for C{path} per request with C{handler}.
        """
        self._responses[path] = handler

    def hold(self, path: str) -> None:
        """
        Do not answer requests for C{path} until L{release} is called: they
        collect in L{held}.
        """
        self._held.add(path)

    def release(self, path: str) -> int:
        """
        Answer the held requests for C{path} and stop holding it.

        @return: how many requests were answered.
        """
        self._held.discard(path)
        waiting = [r for p, r in self.held if p == path]
        self.held = [(p, r) for p, r in self.held if p != path]
        for request in waiting:
            self._respond(request, path, self._received(request, path, count=False))
        return len(waiting)

    def _received(self, request: Any, path: str, count: bool = True) -> ReceivedRequest:
        request.content.seek(0)
        received = ReceivedRequest(
            method=request.method.decode("latin-1"),
            path=path,
            headers=request.requestHeaders.copy(),
            body=request.content.read(),
        )
        if count:
            self.counts[path] += 1
            self.requests.append(received)
        return received

    def render(self, request: Any) -> Any:
        path = request.uri.decode("latin-1")
        if "://" in path:
            # Sent as to a proxy: keep the path part.
            rest = path.split("://", 1)[1]
            slash = rest.find("/")
            path = rest[slash:] if slash >= 0 else "/"
        received = self._received(request, path)
        if path in self._held:
            self.held.append((path, request))
            return NOT_DONE_YET
        return self._respond(request, path, received)

    def _respond(self, request: Any, path: str, received: ReceivedRequest) -> Any:
        configured = self._responses.get(path)
        if configured is None:
            response = OriginResponse(404, b"not found\n", (("Content-Type", "text/plain"),))
        elif isinstance(configured, OriginResponse):
            response = configured
        else:
            response = configured(received)
        for code, fields in response.interim:
            # twisted.web has no API for 1xx responses: write them to the
            # connection, as it does for 100 Continue.
            lines = [b"HTTP/1.1 %d Interim" % (code,)]
            lines += [f"{name}: {value}".encode("latin-1") for name, value in fields]
            request.channel.transport.write(b"\r\n".join(lines) + b"\r\n\r\n")
        request.setHeader(b"date", datetimeToString(int(self._reactor.seconds())))
        status = response.status
        if response.conditional and status == 200 and _notModified(received, response):
            status = 304
        request.setResponseCode(status)
        for name, value in response.headers:
            key = name.encode("latin-1")
            if key.lower() == b"date":
                request.responseHeaders.setRawHeaders(key, [value.encode("latin-1")])
            else:
                request.responseHeaders.addRawHeader(key, value.encode("latin-1"))
        if status == 304 or received.method == "HEAD":
            if received.method == "HEAD" and not response.chunked:
                request.setHeader(b"content-length", str(len(response.body)).encode())
            request.finish()
            return NOT_DONE_YET
        if not response.chunked:
            request.setHeader(b"content-length", str(len(response.body)).encode())
        if response.body:
            request.write(response.body)
        request.finish()
        return NOT_DONE_YET


def _notModified(received: ReceivedRequest, response: OriginResponse) -> bool:
    """
    Whether a conditional request matches (RFC 9110 section 13.2.2:
    If-None-Match wins over If-Modified-Since).
    """
    inm = received.header("if-none-match")
    if inm is not None:
        etag = response.header("etag")
        if etag is None:
            return False
        tags = [t.strip() for t in inm.split(",")]
        weak = etag[2:] if etag.startswith("W/") else etag
        return "*" in tags or any((t[2:] if t.startswith("W/") else t) == weak for t in tags)
    ims = received.header("if-modified-since")
    lastModified = response.header("last-modified")
    if ims is not None and lastModified is not None:
        try:
            return stringToDatetime(lastModified.encode()) <= stringToDatetime(ims.encode())
        except ValueError:
            return False
    return False


@implementer(IAgentEndpointFactory)
class _LoopbackEndpoints:
    """
    Plain TCP endpoints on 127.0.0.1 for every URL (on a memory reactor:
    nothing connects, L{_MemoryAgent} wires the connection up itself).
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def endpointForURI(self, uri: Any) -> Any:
        from twisted.internet.endpoints import TCP4ClientEndpoint

        return TCP4ClientEndpoint(self._reactor, "127.0.0.1", uri.port)


class _MemoryAgent:
    """
    An agent that sends its requests to a resource in memory, through the
    same client stack as L{icpmesh.proxy.Upstream} (an L{Agent} over an
    L{UpstreamConnectionPool}), over L{iosim} transports.
    """

    def __init__(self, resource: Any) -> None:
        from twisted.internet.testing import MemoryReactorClock
        from twisted.web.client import Agent
        from twisted.web.server import Site

        from icpmesh.upstreamclient import UpstreamConnectionPool

        self._reactor = MemoryReactorClock()
        self._agent = Agent.usingEndpointFactory(
            self._reactor, _LoopbackEndpoints(self._reactor),
            pool=UpstreamConnectionPool(self._reactor, persistent=False),
        )
        self._site = Site(resource, reactor=self._reactor)
        self._pumps: list[Any] = []

    def request(self, method: bytes, url: bytes, headers: Headers, body: Any) -> Deferred[Any]:
        from twisted.internet.address import IPv4Address
        from twisted.test import iosim

        before = len(self._reactor.tcpClients)
        d = self._agent.request(method, url, headers, body)
        if len(self._reactor.tcpClients) == before:
            return d  # failed before connecting (a bad URL)
        port = self._reactor.tcpClients[-1][1]
        factory = self._reactor.tcpClients[-1][2]
        serverAddress = IPv4Address("TCP", "127.0.0.1", port)
        clientAddress = IPv4Address("TCP", "127.0.0.1", 31337)
        server = self._site.buildProtocol(clientAddress)
        client = factory.buildProtocol(serverAddress)
        pump = iosim.connect(
            server, iosim.FakeTransport(server, True, serverAddress, clientAddress),
            client, iosim.FakeTransport(client, False, clientAddress, serverAddress),
        )
        self._pumps.append(pump)
        return d

    def flush(self) -> None:
        """
        Carry the bytes of every open in-memory connection.
        """
        pumps = self._pumps
        self._pumps = []
        for pump in pumps:
            pump.flush()
            if not (pump.clientIO.disconnected and pump.serverIO.disconnected):
                self._pumps.append(pump)


class InMemoryUpstream:
    """
    An upstream for L{icpmesh.proxy.CachingProxyResource} that talks to
    resources in memory, with the client stack L{icpmesh.proxy.Upstream}
    uses (L{icpmesh.upstreamclient}).

    @ivar fetches: every fetch as C{(neighbour, method, url, headers)}.
    @ivar refused: neighbours (or C{None} for the origin) whose connections
        are refused.
    """

    def __init__(self, origin: Any, neighbours: Optional[Mapping[Any, Any]] = None) -> None:
        """
        @param origin: the resource that answers direct fetches.
        @param neighbours: a resource per neighbour object.
        """
        self._agents: dict[Any, Any] = {None: _MemoryAgent(origin)}
        for neighbour, resource in (neighbours or {}).items():
            self._agents[neighbour] = _MemoryAgent(resource)
        self.fetches: list[tuple[Any, bytes, bytes, Headers]] = []
        self.refused: set[Any] = set()

    def fetch(self, neighbour: Any, method: bytes, url: bytes, headers: Headers, body: Any) -> Deferred[Any]:
        """
        Send one request, as L{icpmesh.proxy.Upstream.fetch} does.
        """
        self.fetches.append((neighbour, method, url, headers.copy()))
        if neighbour in self.refused or neighbour not in self._agents:
            return fail(ConnectionRefusedError(f"refused: {neighbour!r}"))
        return self._agents[neighbour].request(method, url, headers, body)

    def flush(self) -> None:
        """
        Carry the bytes of every in-memory connection until nothing moves.
        """
        for _ in range(20):
            for agent in self._agents.values():
                agent.flush()
