"""
Tests for L{icpmesh.upstreamclient}: the hooks into Twisted's HTTP client.

These tests go through the public client API (an C{Agent} or C{ProxyAgent}
over an L{UpstreamConnectionPool}) on a memory reactor, and feed the
response bytes by hand.  If a Twisted upgrade moves what the module relies
on (the pool's C{_factory}, the protocol's C{_parser}, the parser's
C{allHeadersReceived}), they fail.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent, ProxyAgent
from twisted.web.http_headers import Headers

from icpmesh.proxy import Upstream
from icpmesh.upstreamclient import (
    InterimHeaders,
    UpstreamClientProtocol,
    UpstreamConnectionPool,
    connectionTokens,
)
from tests.test_proxy import FakeNeighbour


def innermost(protocol: Any) -> Any:
    """
    The protocol under any wrappers (endpoint wrappers, TLS).
    """
    while True:
        inner = getattr(protocol, "wrappedProtocol", None) or getattr(protocol, "_wrappedProtocol", None)
        if inner is None:
            return protocol
        protocol = inner


class _Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.data)


def readBody(response: Any) -> "Deferred[bytes]":
    """
    The response's body (Twisted's own C{readBody} warns about the
    in-memory transport).
    """
    collect = _Collect()
    response.deliverBody(collect)
    return collect.done


class Connected:
    """
    The client side of the one connection a request opened on a memory
    reactor.
    """

    def __init__(self, reactor: MemoryReactorClock, index: int = -1) -> None:
        factory = reactor.tcpClients[index][2]
        self.outer = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 80))
        self.transport = StringTransport()
        self.outer.makeConnection(self.transport)
        self.protocol = innermost(self.outer)

    def receive(self, data: bytes) -> None:
        self.outer.dataReceived(data)


def result(d: Any, test: SynchronousTestCase) -> Any:
    return test.successResultOf(d)


class PoolTests(SynchronousTestCase):
    """
    L{UpstreamConnectionPool} builds L{UpstreamClientProtocol}s, for
    origins and for neighbours, TLS ones too.
    """

    def test_agentUsesHookedProtocol(self) -> None:
        """
        An C{Agent} over the pool connects with an L{UpstreamClientProtocol}.
        """
        reactor = MemoryReactorClock()
        agent = Agent(reactor, pool=UpstreamConnectionPool(reactor))
        agent.request(b"GET", b"http://127.0.0.1:8080/x")
        self.assertIsInstance(Connected(reactor).protocol, UpstreamClientProtocol)

    def test_upstreamNeighbours(self) -> None:
        """
        L{Upstream} uses the pool toward origins, plain neighbours and TLS
        neighbours alike.
        """
        reactor = MemoryReactorClock()
        upstream = Upstream(reactor)
        self.assertIsInstance(upstream.pool, UpstreamConnectionPool)
        upstream.fetch(None, b"GET", b"http://127.0.0.1:8080/x", Headers(), None)
        upstream.fetch(FakeNeighbour("p", host="127.0.0.2"), b"GET", b"http://o.test/x", Headers(), None)
        upstream.fetch(FakeNeighbour("t", host="127.0.0.3", tls=True), b"GET", b"http://o.test/x",
                       Headers(), None)
        reactor.advance(0)
        self.assertEqual(len(reactor.tcpClients), 3)
        for host, port, factory, _, _ in reactor.tcpClients:
            built = innermost(factory.buildProtocol(IPv4Address("TCP", host, port)))
            self.assertIsInstance(built, UpstreamClientProtocol)


class ConnectionHeaderTests(SynchronousTestCase):
    """
    Response fields listed in C{Connection} are removed.
    """

    def request(self, agent: Any = None, method: bytes = b"GET") -> tuple[Any, Connected]:
        reactor = MemoryReactorClock()
        if agent is None:
            agent = Agent(reactor, pool=UpstreamConnectionPool(reactor))
        else:
            agent = agent(reactor)
        d = agent.request(method, b"http://127.0.0.1:8080/x", Headers())
        return d, Connected(reactor)

    def test_listedHeadersRemoved(self) -> None:
        """
        C{Connection: a, B} removes C{a} and C{b} (any case, any spacing),
        keeps the others and the body.
        """
        d, connection = self.request()
        connection.receive(
            b"HTTP/1.1 200 OK\r\nConnection: a,  B\r\nA: 1\r\nb: 2\r\nc: 3\r\n"
            b"Content-Length: 2\r\n\r\nok"
        )
        response = result(d, self)
        self.assertIsNone(response.headers.getRawHeaders(b"a"))
        self.assertIsNone(response.headers.getRawHeaders(b"b"))
        self.assertEqual(response.headers.getRawHeaders(b"c"), [b"3"])
        self.assertEqual(result(readBody(response), self), b"ok")

    def test_severalConnectionLines(self) -> None:
        """
        Names listed on several C{Connection} lines are all removed.
        """
        d, connection = self.request()
        connection.receive(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nConnection: x-hop\r\nx-hop: 1\r\n"
            b"x-end: 2\r\nContent-Length: 0\r\n\r\n"
        )
        response = result(d, self)
        self.assertIsNone(response.headers.getRawHeaders(b"x-hop"))
        self.assertEqual(response.headers.getRawHeaders(b"x-end"), [b"2"])

    def test_proxyAgent(self) -> None:
        """
        Through a C{ProxyAgent} (a neighbour) as well.
        """
        from twisted.internet.endpoints import TCP4ClientEndpoint

        def agent(reactor: Any) -> Any:
            return ProxyAgent(TCP4ClientEndpoint(reactor, "127.0.0.2", 3128), reactor,
                              pool=UpstreamConnectionPool(reactor))

        d, connection = self.request(agent)
        connection.receive(b"HTTP/1.1 200 OK\r\nConnection: a\r\na: 1\r\nContent-Length: 0\r\n\r\n")
        self.assertIsNone(result(d, self).headers.getRawHeaders(b"a"))

    def test_phraseControlCharacters(self) -> None:
        """
        Control characters in the reason phrase (a bare CR) become spaces;
        tabs and other bytes stay.
        """
        d, connection = self.request()
        connection.receive(b"HTTP/1.1 200 O\rK\x01\tfine\xe9\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(result(d, self).phrase, b"O K \tfine\xe9")

    def test_connectionTokens(self) -> None:
        """
        L{connectionTokens} lower-cases, strips and skips empty members and
        members that are not tokens.
        """
        self.assertEqual(connectionTokens([b"A, ,b ", b"Close"]), {b"a", b"b", b"close"})
        self.assertEqual(connectionTokens([b'keep-alive timeout=5, "close", close;, X-y']), {b"x-y"})

    def test_sloppyConnectionHeader(self) -> None:
        """
        A C{Connection} member that is not a token (seen from real servers:
        C{keep-alive timeout=5}) does not fail the response, as it does not
        with Twisted's own client; the valid members still work.
        """
        d, connection = self.request()
        connection.receive(b"HTTP/1.1 200 OK\r\nConnection: keep-alive timeout=5, x-hop\r\n"
                           b"X-Hop: 1\r\nX-End: 2\r\nContent-Length: 0\r\n\r\n")
        response = result(d, self)
        self.assertEqual((response.code, response.headers.hasHeader(b"x-hop"),
                          response.headers.getRawHeaders(b"x-end")), (200, False, [b"2"]))


class InterimTests(SynchronousTestCase):
    """
    1xx responses go to the request headers' C{interimReceived}.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.agent = Agent(self.reactor, pool=UpstreamConnectionPool(self.reactor))
        self.interim: list[tuple[int, bytes, list[tuple[bytes, list[bytes]]]]] = []

    def received(self, code: int, phrase: bytes, headers: Headers) -> None:
        self.interim.append((code, phrase, sorted((k.lower(), v) for k, v in headers.getAllRawHeaders())))

    def test_interimThenFinal(self) -> None:
        """
        Each 1xx arrives with its code, phrase and headers (without the
        Connection-listed ones), in order, before the final response, whose
        headers are only its own.
        """
        d = self.agent.request(b"GET", b"http://127.0.0.1:8080/x",
                               InterimHeaders(interimReceived=self.received))
        connection = Connected(self.reactor)
        connection.receive(b"HTTP/1.1 102 Processing\r\n\r\n")
        self.assertEqual(self.interim, [(102, b"Processing", [])])
        self.assertNoResult(d)
        connection.receive(
            b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\nConnection: x-hop\r\n"
            b"x-hop: 1\r\n\r\n"
        )
        self.assertEqual(self.interim[1], (103, b"Early Hints", [(b"link", [b"</s.css>; rel=preload"])]))
        connection.receive(b"HTTP/1.1 200 OK\r\nx-final: 1\r\nContent-Length: 2\r\n\r\nok")
        response = result(d, self)
        self.assertEqual(response.code, 200)
        self.assertIsNone(response.headers.getRawHeaders(b"link"))
        self.assertEqual(response.headers.getRawHeaders(b"x-final"), [b"1"])
        self.assertEqual(result(readBody(response), self), b"ok")
        self.assertEqual(len(self.interim), 2)

    def test_copiedHeadersKeepCallback(self) -> None:
        """
        C{Agent} copies headers without C{Host}; the copy carries the
        callable, so the 1xx still arrives.
        """
        headers = InterimHeaders(interimReceived=self.received)
        self.assertEqual(headers.copy().interimReceived, self.received)
        self.agent.request(b"GET", b"http://127.0.0.1:8080/x", headers)
        connection = Connected(self.reactor)
        self.assertIn(b"Host: 127.0.0.1:8080", connection.transport.value())
        connection.receive(b"HTTP/1.1 103 Early Hints\r\n\r\n")
        self.assertEqual([i[0] for i in self.interim], [103])

    def test_plainHeaders(self) -> None:
        """
        Without L{InterimHeaders}, 1xx responses are dropped as Twisted
        does and the final response comes through.
        """
        d = self.agent.request(b"GET", b"http://127.0.0.1:8080/x", Headers())
        connection = Connected(self.reactor)
        connection.receive(b"HTTP/1.1 103 Early Hints\r\nLink: <x>\r\n\r\n"
                           b"HTTP/1.1 204 No Content\r\n\r\n")
        response = result(d, self)
        self.assertEqual(response.code, 204)
        self.assertIsNone(response.headers.getRawHeaders(b"link"))

    def test_callbackFailure(self) -> None:
        """
        A callable that raises is logged; the final response still arrives.
        """

        def broken(code: int, phrase: bytes, headers: Headers) -> None:
            raise RuntimeError("boom")

        d = self.agent.request(b"GET", b"http://127.0.0.1:8080/x", InterimHeaders(interimReceived=broken))
        connection = Connected(self.reactor)
        connection.receive(b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(result(d, self).code, 204)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_persistentConnectionReused(self) -> None:
        """
        After a response with interim responses, the connection goes back
        to the pool and the next request on it is hooked too.
        """
        d = self.agent.request(b"GET", b"http://127.0.0.1:8080/x", InterimHeaders(interimReceived=self.received))
        connection = Connected(self.reactor)
        connection.receive(b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        result(d, self)
        d = self.agent.request(b"GET", b"http://127.0.0.1:8080/y", InterimHeaders(interimReceived=self.received))
        self.assertEqual(len(self.reactor.tcpClients), 1)
        connection.receive(b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 200 OK\r\nConnection: z\r\nz: 1\r\n"
                           b"Content-Length: 0\r\n\r\n")
        self.assertIsNone(result(d, self).headers.getRawHeaders(b"z"))
        self.assertEqual([i[0] for i in self.interim], [103, 102])


class HookBrokenTests(SynchronousTestCase):
    """
    When the parser cannot be hooked, the request still works and an error
    is logged (once).
    """

    def test_unknownParserLogged(self) -> None:
        """
        If Twisted's protocol makes a parser of another class, it is left
        alone and the error says so.
        """
        from twisted.logger import LogLevel, globalLogPublisher
        from twisted.web import _newclient

        class OtherParser(_newclient.HTTPClientParser):
            pass

        self.patch(_newclient, "HTTPClientParser", OtherParser)
        self.patch(UpstreamClientProtocol, "_warned", False)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        reactor = MemoryReactorClock()
        agent = Agent(reactor, pool=UpstreamConnectionPool(reactor))
        for port in (b"8080", b"8081"):
            d = agent.request(b"GET", b"http://127.0.0.1:" + port + b"/x")
            Connected(reactor).receive(b"HTTP/1.1 204 No Content\r\nConnection: a\r\na: 1\r\n\r\n")
            self.assertEqual(result(d, self).headers.getRawHeaders(b"a"), [b"1"])
        errors = [e for e in events if e.get("log_level") == LogLevel.error
                  and "cannot hook" in e.get("log_format", "")]
        self.assertEqual(len(errors), 1)
