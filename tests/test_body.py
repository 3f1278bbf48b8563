"""
Tests for L{icpmesh.body}: request bodies streamed upstream as they arrive,
through L{icpmesh.service.ProxySite} and L{icpmesh.proxy.CachingProxyResource}.

The client is an L{HTTPChannel} on a L{StringTransport}, fed byte by byte
where it matters; the upstream records the body producer it is given and
the test drives it with a recording consumer.  No sockets.
"""

from __future__ import annotations

import io
from typing import Any, Optional, Sequence

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from twisted.web.server import Site
from zope.interface.verify import verifyObject

from icpmesh.accesslog import AccessLog
from icpmesh.body import BUFFER_LIMIT, DRAIN_LIMIT, HIGH_WATER, BodyAborted, RequestBodyStream, RouteBody, StreamingRequest
from icpmesh.interfaces import DIRECT, Route
from icpmesh.proxy import CachingProxyResource
from icpmesh.service import ProxySite
from icpmesh.storage.memory import MemoryStore
from icpmesh.testing.origin import FakeOrigin, InMemoryUpstream
from tests.test_proxy import (
    NOW,
    URL,
    FakeAccess,
    FakeMesh,
    FakeNeighbour,
    FakeSelector,
    ScriptedResponse,
    parseResponse,
)


class RecordingConsumer:
    """
    The upstream connection a body producer writes to.

    @ivar refuse: raise on write, as a consumer that was told no more
        writes are expected does.
    """

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.refuse = False

    def write(self, data: bytes) -> None:
        if self.refuse:
            raise RuntimeError("no more writes")
        self.data.append(data)

    def value(self) -> bytes:
        return b"".join(self.data)


class Fetch:
    """
    One fetch an L{UploadUpstream} was asked for.
    """

    def __init__(self, neighbour: Any, method: bytes, url: bytes, headers: Headers, body: Any) -> None:
        self.neighbour = neighbour
        self.method = method
        self.url = url
        self.headers = headers
        self.body = body
        self.result: Deferred[Any] = Deferred()
        self.consumer = RecordingConsumer()
        self.produced: Optional[Deferred[None]] = None
        self.outcome: list[Any] = []

    def connect(self) -> RecordingConsumer:
        """
        The connection is up: the agent starts the body producer.
        """
        self.produced = self.body.startProducing(self.consumer)
        self.produced.addBoth(self.outcome.append)
        return self.consumer

    def respond(self, code: int = 200, length: Any = 2) -> ScriptedResponse:
        response = ScriptedResponse(code, {b"content-type": [b"text/plain"]}, length)
        self.result.callback(response)
        return response


class UploadUpstream:
    """
    An upstream whose fetches the test answers by hand.
    """

    def __init__(self) -> None:
        self.fetches: list[Fetch] = []

    def fetch(self, neighbour: Any, method: bytes, url: bytes, headers: Headers, body: Any) -> Deferred[Any]:
        fetch = Fetch(neighbour, method, url, headers, body)
        self.fetches.append(fetch)
        return fetch.result


class UploadTestMixin:
    """
    A proxy in a L{ProxySite} over an L{UploadUpstream}.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(NOW)
        self.access = FakeAccess()
        self.selector = FakeSelector()
        self.mesh = FakeMesh()
        self.store = MemoryStore(reactor=self.clock)
        self.logFile = io.StringIO()
        self.accessLog = AccessLog(self.logFile, reactor=self.clock)
        self.build()

    def build(self, upstream: Any = None, site: type = ProxySite, **kwargs: Any) -> None:
        self.upstream = upstream if upstream is not None else UploadUpstream()
        self.proxy = CachingProxyResource(
            self.store, self.access, self.selector, self.mesh, "proxy.test",
            reactor=self.clock, upstream=self.upstream, accessLog=self.accessLog, **kwargs,
        )
        self.site = site(self.proxy, reactor=self.clock)

    def connect(self) -> tuple[Any, StringTransport]:
        address = IPv4Address("TCP", "127.0.0.1", 40000)
        channel = self.site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        channel.makeConnection(transport)
        return channel, transport

    def head(self, method: str = "PUT", length: Optional[int] = None,
             headers: Sequence[tuple[str, str]] = (), url: str = URL) -> bytes:
        lines = [f"{method} {url} HTTP/1.1", "Host: origin.test"]
        if length is None:
            lines.append("Transfer-Encoding: chunked")
        else:
            lines.append(f"Content-Length: {length}")
        lines += [f"{k}: {v}" for k, v in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def logLines(self) -> list[str]:
        self.accessLog.flush()
        return self.logFile.getvalue().splitlines()


def pending(channel: Any) -> list[Any]:
    """
    The requests the HTTP/1.1 channel behind C{channel} has not finished.
    """
    return list(getattr(channel, "_channel", channel).requests)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class StreamingUploadTests(UploadTestMixin, SynchronousTestCase):
    """
    Bodies go upstream as they arrive.
    """

    def test_firstChunkBeforeRest(self) -> None:
        """
        Once the header section is complete the upstream request starts,
        with a body producer of the declared length; the first body bytes
        reach the upstream before the client has sent the rest, and the
        producer finishes when the last byte is in.
        """
        channel, transport = self.connect()
        for byte in self.head(length=10):
            channel.dataReceived(bytes([byte]))
        [fetch] = self.upstream.fetches
        self.assertEqual((fetch.method, fetch.url), (b"PUT", URL.encode()))
        verifyObject(IBodyProducer, fetch.body)
        self.assertEqual(fetch.body.length, 10)
        consumer = fetch.connect()
        for byte in b"hello":
            channel.dataReceived(bytes([byte]))
        self.assertEqual(consumer.value(), b"hello")
        self.assertEqual(fetch.outcome, [])
        channel.dataReceived(b"world")
        self.assertEqual(consumer.value(), b"helloworld")
        self.assertEqual(fetch.outcome, [None])
        response = fetch.respond()
        response.deliver(b"ok")
        response.finish()
        parsed = parseResponse(transport.value())
        self.assertEqual((parsed.status, parsed.body), (200, b"ok"))
        self.assertIn("TCP_MISS/200", self.logLines()[-1])

    def test_bufferedUntilConnected(self) -> None:
        """
        Body bytes that arrive before the upstream connection is up are
        kept and written when it starts.
        """
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=6) + b"abc")
        [fetch] = self.upstream.fetches
        consumer = fetch.connect()
        self.assertEqual(consumer.value(), b"abc")
        channel.dataReceived(b"def")
        self.assertEqual(consumer.value(), b"abcdef")
        self.assertEqual(fetch.outcome, [None])

    def test_chunkedGoesUnknownLength(self) -> None:
        """
        A chunked request body is forwarded with an unknown length (so the
        agent sends it chunked), chunk by chunk.
        """
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=None))
        [fetch] = self.upstream.fetches
        self.assertIs(fetch.body.length, UNKNOWN_LENGTH)
        consumer = fetch.connect()
        channel.dataReceived(chunk(b"abc"))
        self.assertEqual(consumer.value(), b"abc")
        channel.dataReceived(chunk(b"de") + b"0\r\n\r\n")
        self.assertEqual(consumer.value(), b"abcde")
        self.assertEqual(fetch.outcome, [None])

    def test_getStaysBuffered(self) -> None:
        """
        A GET is not rendered before its (odd) body is complete, and a
        body-less request is rendered at once, as twisted.web does.
        """
        channel, transport = self.connect()
        channel.dataReceived(self.head("GET", length=4) + b"ab")
        self.assertEqual(self.upstream.fetches, [])
        channel.dataReceived(b"cd")
        [fetch] = self.upstream.fetches
        self.assertIsNone(fetch.body)
        self.assertIsNone(pending(channel)[0].bodyStream)

    def test_plainSiteBuffers(self) -> None:
        """
        Embedded in a plain twisted.web Site the proxy gets the whole body
        first and forwards it from C{request.content}.
        """
        self.build(site=Site)
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=4) + b"ab")
        self.assertEqual(self.upstream.fetches, [])
        channel.dataReceived(b"cd")
        [fetch] = self.upstream.fetches
        self.assertNotIsInstance(fetch.body, (RequestBodyStream, RouteBody))
        self.assertEqual(fetch.body.length, 4)

    def test_plainSiteWithStreamingRequest(self) -> None:
        """
        A plain Site given C{StreamingRequest} as its request factory (as
        docs/embedding.md shows) streams too.
        """
        self.build(site=Site)
        self.site.requestFactory = StreamingRequest
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=4) + b"ab")
        [fetch] = self.upstream.fetches
        self.assertIsInstance(fetch.body, RouteBody)
        self.assertEqual(fetch.connect().value(), b"ab")

    def test_otherResourceBuffers(self) -> None:
        """
        Under a root resource that does not say C{streamsRequestBodies},
        C{StreamingRequest} reads the whole body first, as twisted.web does.
        """
        origin = FakeOrigin(reactor=self.clock)
        site = Site(origin, reactor=self.clock)
        site.requestFactory = StreamingRequest
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(self.head(length=4, url="/a") + b"ab")
        self.assertEqual(origin.requests, [])
        channel.dataReceived(b"cd")
        self.assertEqual(origin.requests[0].body, b"abcd")

    def test_inMemoryOrigin(self) -> None:
        """
        Through the in-memory HTTP client, a streamed body reaches the
        origin whole, sent before the client finished it.
        """
        origin = FakeOrigin(reactor=self.clock)
        origin.setResponse("/a", b"stored", status=201)
        upstream = InMemoryUpstream(origin)
        self.build(upstream=upstream)
        channel, transport = self.connect()
        channel.dataReceived(self.head("POST", length=8) + b"1234")
        self.clock.advance(0)
        upstream.flush()
        self.assertEqual(len(upstream.fetches), 1)
        self.assertEqual(origin.requests, [])
        channel.dataReceived(b"5678")
        for _ in range(3):
            self.clock.advance(0)
            upstream.flush()
        self.assertEqual(origin.requests[0].body, b"12345678")
        self.assertEqual(parseResponse(transport.value()).status, 201)


class FlowControlTests(UploadTestMixin, SynchronousTestCase):
    """
    A slow upstream slows the client down.
    """

    def test_slowUpstreamPausesClient(self) -> None:
        """
        While the upstream connection is paused, body bytes are held; past
        the high-water mark the client's transport is paused, and it is
        resumed when the upstream has taken them.
        """
        channel, transport = self.connect()
        size = 3 * HIGH_WATER
        channel.dataReceived(self.head(length=size))
        [fetch] = self.upstream.fetches
        consumer = fetch.connect()
        fetch.body.pauseProducing()
        channel.dataReceived(b"x" * (HIGH_WATER // 2))
        self.assertEqual(transport.producerState, "producing")
        channel.dataReceived(b"x" * HIGH_WATER)
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(consumer.value(), b"")
        fetch.body.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(len(consumer.value()), HIGH_WATER + HIGH_WATER // 2)
        channel.dataReceived(b"x" * (size - len(consumer.value())))
        self.assertEqual(fetch.outcome, [None])

    def test_unconnectedUpstreamPausesClient(self) -> None:
        """
        The same holds before the upstream connection is up.
        """
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=2 * HIGH_WATER) + b"x" * (HIGH_WATER + 1))
        self.assertEqual(transport.producerState, "paused")
        [fetch] = self.upstream.fetches
        fetch.connect()
        self.assertEqual(transport.producerState, "producing")


    def test_channelResumeKeepsBodyPause(self) -> None:
        """
        When the client's socket drains the response (the transport tells
        the channel to pause, then to resume), the channel does not resume
        reading the client while the body stream holds it paused: a slow
        upstream keeps the body held near the high-water mark however long
        the response streams.
        """
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=None))
        [fetch] = self.upstream.fetches
        fetch.connect()
        fetch.body.pauseProducing()
        response = fetch.respond(code=200, length=None)
        inner = channel._channel
        for i in range(8):
            response.deliver(b"event\n")
            inner.pauseProducing()
            inner.resumeProducing()
            if transport.producerState == "paused":
                break
            channel.dataReceived(chunk(b"x" * (HIGH_WATER // 2)))
        self.assertEqual(transport.producerState, "paused")
        stream = fetch.body.stream
        held = stream._buffered
        self.assertLessEqual(held, HIGH_WATER + HIGH_WATER // 2)
        inner.pauseProducing()
        inner.resumeProducing()
        self.assertEqual(transport.producerState, "paused")
        fetch.body.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(len(fetch.consumer.value()), held)

    def test_bodyResumeKeepsChannelPause(self) -> None:
        """
        When the upstream takes the held body while the client is not
        reading its responses (the channel paused the transport), the
        transport stays paused until the channel resumes it.
        """
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=None))
        [fetch] = self.upstream.fetches
        fetch.connect()
        fetch.body.pauseProducing()
        channel.dataReceived(chunk(b"x" * (HIGH_WATER + 1)))
        self.assertEqual(transport.producerState, "paused")
        channel._channel.pauseProducing()
        fetch.body.resumeProducing()
        self.assertEqual(transport.producerState, "paused")
        channel._channel.resumeProducing()
        self.assertEqual(transport.producerState, "producing")

    def test_bufferLimitClosesClient(self) -> None:
        """
        A client that goes on sending although its transport was paused is
        cut off past L{BUFFER_LIMIT} held bytes: the upstream request fails,
        the client's connection is aborted, and it is logged.
        """
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=None))
        [fetch] = self.upstream.fetches
        fetch.connect()
        fetch.body.pauseProducing()
        for i in range(BUFFER_LIMIT // HIGH_WATER + 1):
            self.assertEqual(fetch.outcome, [])
            channel.dataReceived(chunk(b"x" * HIGH_WATER))
        self.assertTrue(transport.disconnecting)
        self.assertIsInstance(fetch.outcome[0].value, BodyAborted)
        self.assertEqual(fetch.body.stream._buffered, 0)
        fetch.result.errback(fetch.outcome[0])
        self.assertEqual(transport.value(), b"")
        self.assertIn("TCP_MISS_ABORTED/000", self.logLines()[-1])


class LimitTests(UploadTestMixin, SynchronousTestCase):
    """
    maxRequestBodySize for streamed bodies.
    """

    def test_declaredTooLarge(self) -> None:
        """
        A Content-Length over the limit gets 413 at once, with Connection:
        close, and nothing goes upstream.
        """
        self.build(maxRequestBodySize=10)
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=11))
        response = parseResponse(transport.value())
        self.assertEqual(response.status, 413)
        self.assertEqual(response.header("connection"), "close")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.upstream.fetches, [])

    def test_chunkedOverLimitBeforeSending(self) -> None:
        """
        A chunked body that grows past the limit before any of it went
        upstream gets 413 and the connection is closed; the upstream request
        fails when it would start.
        """
        self.build(maxRequestBodySize=10)
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=None) + chunk(b"x" * 6))
        self.assertEqual(transport.value(), b"")
        channel.dataReceived(chunk(b"y" * 6))
        response = parseResponse(transport.value())
        self.assertEqual(response.status, 413)
        self.assertEqual(response.header("connection"), "close")
        self.assertTrue(transport.disconnecting)
        [fetch] = self.upstream.fetches
        consumer = fetch.connect()
        self.assertEqual(consumer.value(), b"")
        self.assertEqual(len(fetch.outcome), 1)
        self.assertIsInstance(fetch.outcome[0], Failure)
        self.assertIn("NONE/413", self.logLines()[-1])

    def test_chunkedOverLimitAfterSending(self) -> None:
        """
        When part of the body already went upstream, going over the limit
        aborts the upstream request and closes the client's connection.
        """
        self.build(maxRequestBodySize=10)
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=None))
        [fetch] = self.upstream.fetches
        consumer = fetch.connect()
        channel.dataReceived(chunk(b"x" * 6))
        self.assertEqual(consumer.value(), b"x" * 6)
        channel.dataReceived(chunk(b"y" * 6))
        self.assertTrue(transport.disconnected)
        self.assertIsInstance(fetch.outcome[0], Failure)
        self.assertNotIn(b"y", consumer.value())


    def test_chunkedOverLimitAfterConnectBeforeSending(self) -> None:
        """
        A chunked body that grows past the limit after the upstream
        connection is up but before a byte of it went out: the upstream
        request fails at once (it would otherwise wait for the rest of the
        body forever), and the client gets 413 and a closed connection.
        """
        self.build(maxRequestBodySize=10)
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=None, headers=[("Expect", "100-continue")]))
        [fetch] = self.upstream.fetches
        consumer = fetch.connect()
        channel.dataReceived(chunk(b"y" * 12))
        self.assertEqual(len(fetch.outcome), 1)
        self.assertIsInstance(fetch.outcome[0], Failure)
        self.assertEqual(consumer.value(), b"")
        response = parseResponse(transport.value().split(b"\r\n\r\n", 1)[1])
        self.assertEqual(response.status, 413)
        self.assertTrue(transport.disconnecting)

    def overLimitAfterConnect(self, routes: Optional[list[Any]] = None) -> tuple[Any, Any, Any]:
        """
        A chunked upload, limit 10 bytes, whose upstream connects before 12
        bytes arrive: C{(fetch, channel, transport)}.
        """
        self.build(maxRequestBodySize=10)
        if routes is not None:
            self.selector.routes = routes
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=None))
        [fetch] = self.upstream.fetches
        fetch.connect()
        channel.dataReceived(chunk(b"y" * 12))
        return fetch, channel, transport

    def test_upstreamAnswersAfter413(self) -> None:
        """
        An upstream that answers after the client was answered 413: the
        answer is dropped, nothing more is written to the client, and only
        the 413 is logged.
        """
        fetch, channel, transport = self.overLimitAfterConnect()
        written = transport.value()
        self.assertEqual(parseResponse(written).status, 413)
        channel.connectionLost(Failure(ConnectionLost()))
        response = fetch.respond(408, length=5)
        response.deliver(b"abcde")
        response.finish()
        self.assertEqual(transport.value(), written)
        self.assertEqual(self.flushLoggedErrors(), [])
        lines = self.logLines()
        self.assertEqual(len(lines), 1)
        self.assertIn("NONE/413", lines[0])

    def test_upstreamFailsAfter413(self) -> None:
        """
        The upstream request failing after the 413 (as the aborted body
        makes it) adds no 502 and tries no other route.
        """
        fetch, channel, transport = self.overLimitAfterConnect(routes=[DIRECT, DIRECT])
        written = transport.value()
        fetch.result.errback(fetch.outcome[0])
        self.assertEqual(transport.value(), written)
        self.assertEqual(len(self.upstream.fetches), 1)
        self.assertEqual(len(self.logLines()), 1)


class ExpectContinueTests(UploadTestMixin, SynchronousTestCase):
    """
    C{Expect: 100-continue}.
    """

    def test_continueWhenBodyWanted(self) -> None:
        """
        100 Continue is sent when the upstream wants the body, not when the
        headers arrive, and Expect is not forwarded.
        """
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=3, headers=[("Expect", "100-continue")]))
        self.assertEqual(transport.value(), b"")
        [fetch] = self.upstream.fetches
        self.assertFalse(fetch.headers.hasHeader(b"expect"))
        consumer = fetch.connect()
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        channel.dataReceived(b"abc")
        self.assertEqual(consumer.value(), b"abc")
        fetch.respond(length=0).finish()
        self.assertEqual(parseResponse(transport.value().split(b"\r\n\r\n", 1)[1]).status, 200)

    def test_deniedWithoutContinue(self) -> None:
        """
        A refused request that waits for 100 Continue gets 403 without it,
        with Connection: close, and the connection is closed.
        """
        self.access.http = False
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=3, headers=[("Expect", "100-continue")]))
        self.assertNotIn(b"100 Continue", transport.value())
        response = parseResponse(transport.value())
        self.assertEqual(response.status, 403)
        self.assertEqual(response.header("connection"), "close")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.upstream.fetches, [])


class EarlyAnswerTests(UploadTestMixin, SynchronousTestCase):
    """
    Answers given before the body is in, and persistent connections.
    """

    def test_deniedBeforeBodyThenDrained(self) -> None:
        """
        Access control answers 403 as soon as the headers are in; the body
        is then read and dropped, and the next request on the connection is
        served.
        """
        self.access.http = False
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=6))
        self.assertEqual(parseResponse(transport.value()).status, 403)
        channel.dataReceived(b"abc")
        self.assertEqual(len(pending(channel)), 1)
        self.assertFalse(transport.disconnecting)
        transport.clear()
        channel.dataReceived(b"def" + b"GET http://origin.test/b HTTP/1.1\r\nHost: origin.test\r\n\r\n")
        self.assertEqual(parseResponse(transport.value()).status, 403)
        self.assertFalse(transport.disconnecting)

    def test_largeRestClosed(self) -> None:
        """
        After an early answer, a body with more than DRAIN_LIMIT bytes
        still to come (by its Content-Length) is not read: the connection
        is closed at once.
        """
        self.access.http = False
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=DRAIN_LIMIT + 2000) + b"x" * 1000)
        self.assertEqual(parseResponse(transport.value()).status, 403)
        self.assertTrue(transport.disconnecting)

    def test_longChunkedRestClosed(self) -> None:
        """
        After an early answer, a chunked body is read and dropped up to
        DRAIN_LIMIT more bytes; then the connection is closed.
        """
        self.access.http = False
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=None) + chunk(b"x" * 1000))
        self.assertEqual(parseResponse(transport.value()).status, 403)
        channel.dataReceived(chunk(b"x" * (DRAIN_LIMIT - 1000)))
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(chunk(b"x"))
        self.assertTrue(transport.disconnecting)

    def test_pipelinedAfterBody(self) -> None:
        """
        A request pipelined behind an upload is parsed only after the
        upload's body and response are complete, and answered in order.
        """
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=4) + b"ab")
        [put] = self.upstream.fetches
        put.connect()
        channel.dataReceived(b"cd" + b"GET http://origin.test/b HTTP/1.1\r\nHost: origin.test\r\n\r\n")
        self.assertEqual(put.consumer.value(), b"abcd")
        self.assertEqual(len(self.upstream.fetches), 1)
        response = put.respond(length=3)
        response.deliver(b"put")
        response.finish()
        self.assertEqual(len(self.upstream.fetches), 2)
        get = self.upstream.fetches[1]
        self.assertEqual((get.method, get.url), (b"GET", b"http://origin.test/b"))
        second = get.respond(length=3)
        second.deliver(b"get")
        second.finish()
        data = transport.value()
        self.assertLess(data.index(b"put"), data.index(b"get"))


class FailureTests(UploadTestMixin, SynchronousTestCase):
    """
    Clients and upstreams that fail during an upload.
    """

    def test_clientAbortMidBody(self) -> None:
        """
        A client that goes away mid-body makes the upstream request fail
        (the connection is aborted by the agent) and is logged.
        """
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=10) + b"abc")
        [fetch] = self.upstream.fetches
        fetch.connect()
        channel.connectionLost(Failure(ConnectionLost()))
        self.assertIsInstance(fetch.outcome[0], Failure)
        fetch.result.errback(fetch.outcome[0])
        self.assertIn("TCP_MISS_ABORTED/000", self.logLines()[-1])

    def test_clientAbortBeforeConnected(self) -> None:
        """
        A client that goes away before the upstream connection is up: the
        body producer fails as soon as it is started.
        """
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=10) + b"abc")
        [fetch] = self.upstream.fetches
        channel.connectionLost(Failure(ConnectionLost()))
        consumer = fetch.connect()
        self.assertEqual(consumer.value(), b"")
        self.assertIsInstance(fetch.outcome[0], Failure)

    def test_upstreamFailsMidBodyIs502NoRetry(self) -> None:
        """
        When the upstream fails after part of the body went out, the next
        route is not tried (the body is gone): 502, saying so; the rest of
        the body is drained and the connection stays usable.
        """
        parent = FakeNeighbour("parent", type="parent")
        self.mesh.neighbours = [parent]
        self.selector.routes = [Route(parent, "FIRST_PARENT_MISS"), DIRECT]
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=6) + b"abc")
        [fetch] = self.upstream.fetches
        fetch.connect()
        # twisted.web's client order: the request fails, then the body
        # producer is stopped.
        fetch.result.errback(ResponseFailed([Failure(ConnectionLost())]))
        fetch.body.stopProducing()
        self.assertEqual(len(self.upstream.fetches), 1)
        response = parseResponse(transport.value())
        self.assertEqual(response.status, 502)
        self.assertIn(b"no other route was tried", response.body)
        channel.dataReceived(b"def")
        self.assertFalse(transport.disconnecting)
        self.assertEqual(len(pending(channel)), 0)

    def test_retryWhenNothingSent(self) -> None:
        """
        A route that fails before a byte of the body went out is followed
        by the next route, which gets the whole body.
        """
        parent = FakeNeighbour("parent", type="parent")
        self.mesh.neighbours = [parent]
        self.selector.routes = [Route(parent, "FIRST_PARENT_MISS"), DIRECT]
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=6) + b"abc")
        first = self.upstream.fetches[0]
        first.result.errback(ConnectionRefusedError())
        self.assertEqual(self.mesh.failed, [parent])
        second = self.upstream.fetches[1]
        self.assertIs(second.body.stream, first.body.stream)
        consumer = second.connect()
        channel.dataReceived(b"def")
        self.assertEqual(consumer.value(), b"abcdef")
        self.assertEqual(second.outcome, [None])

    def test_retryWhenNothingSentTwistedOrder(self) -> None:
        """
        A route whose connection was up but failed before a byte of the
        body went out is followed by the next route, in twisted.web's
        client order (the request fails first, then its body producer is
        stopped); that late stop does not take the body from the next
        route, even when that one has started already.
        """
        parent = FakeNeighbour("parent", type="parent")
        self.mesh.neighbours = [parent]
        self.selector.routes = [Route(parent, "FIRST_PARENT_MISS"), DIRECT]
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=6, headers=[("Expect", "100-continue")]))
        first = self.upstream.fetches[0]
        self.assertEqual(first.connect().value(), b"")
        first.result.errback(ResponseFailed([Failure(ConnectionLost())]))
        self.assertEqual(len(self.upstream.fetches), 2)
        second = self.upstream.fetches[1]
        consumer = second.connect()
        first.body.stopProducing()
        first.body.pauseProducing()
        channel.dataReceived(b"abcdef")
        self.assertEqual(consumer.value(), b"abcdef")
        self.assertEqual(second.outcome, [None])
        self.assertEqual(first.outcome, [])
        second.respond(code=201, length=0).finish()
        self.assertEqual(parseResponse(transport.value().split(b"\r\n\r\n", 1)[1]).status, 201)

    def test_clientGoneBeforeRoutes(self) -> None:
        """
        A client that leaves while the routes are being chosen: nothing is
        fetched, and the abort is logged.
        """
        routes: Deferred[Any] = Deferred()
        self.selector.selectRoutes = lambda request, neighbours, icp: routes  # type: ignore[method-assign]
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=10) + b"abc")
        channel.connectionLost(Failure(ConnectionLost()))
        routes.callback([DIRECT])
        self.assertEqual(self.upstream.fetches, [])
        self.assertIn("TCP_MISS_ABORTED/000", self.logLines()[-1])

    def test_consumerRefusesWrite(self) -> None:
        """
        A consumer that raises on write makes the upstream request fail; the
        error does not reach the client's channel, which answers 502.
        """
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=6))
        [fetch] = self.upstream.fetches
        fetch.connect().refuse = True
        channel.dataReceived(b"abc")
        self.assertIsInstance(fetch.outcome[0], Failure)
        fetch.result.errback(fetch.outcome[0])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(parseResponse(transport.value()).status, 502)
        channel.dataReceived(b"def")
        self.assertFalse(transport.disconnecting)

    def test_malformedChunkDuringResponse(self) -> None:
        """
        A malformed chunk that arrives after the response was started gets
        the connection aborted, and counted: no C{400} status line is
        written into the response body, where the client could read it as
        the rest of the body.
        """
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=None) + chunk(b"abc"))
        [fetch] = self.upstream.fetches
        fetch.connect()
        response = fetch.respond(code=200, length=10)
        response.deliver(b"12345")
        written = transport.value()
        channel.dataReceived(b"zz\r\n")
        self.assertEqual(transport.value(), written)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.site.counters["malformedBodyAborted"], 1)

    def test_malformedChunkBeforeResponse(self) -> None:
        """
        A malformed chunk before any response was started is still answered
        C{400 Bad Request}, as twisted.web does.
        """
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=None) + chunk(b"abc"))
        channel.dataReceived(b"zz\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 Bad Request"))
        self.assertEqual(self.site.counters["malformedBodyAborted"], 0)

    def test_upstreamAnswersEarly(self) -> None:
        """
        An upstream that answers before it has the whole body: the answer
        reaches the client, the rest of the body is read and dropped, and
        the connection serves the next request.
        """
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=6) + b"abc")
        [fetch] = self.upstream.fetches
        fetch.connect()
        response = fetch.respond(code=401, length=2)
        response.deliver(b"no")
        response.finish()
        self.assertEqual(parseResponse(transport.value()).status, 401)
        self.assertEqual(len(pending(channel)), 1)
        channel.dataReceived(b"def")
        self.assertEqual(fetch.consumer.value(), b"abc")
        self.assertEqual(len(pending(channel)), 0)
        self.assertFalse(transport.disconnecting)

    def test_clientGoneAfterAnswer(self) -> None:
        """
        A client that goes away mid-body after the upstream answered: the
        upstream response is stopped (nothing stores it), and the body
        producer is dropped quietly rather than failed (the client protocol
        would log a failure it can do nothing with).
        """
        channel, transport = self.connect()
        channel.dataReceived(self.head(length=6) + b"abc")
        [fetch] = self.upstream.fetches
        fetch.connect()
        response = fetch.respond(length=10)
        response.deliver(b"part")
        channel.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(response.transport.producerState, "stopped")
        self.assertEqual(fetch.outcome, [])


class RealAgentTests(SynchronousTestCase):
    """
    The proxy's own upstream client (twisted.web's C{Agent}) on a memory
    reactor: the order in which it fails requests and stops body producers
    is its own, not a test double's.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(NOW)
        self.selector = FakeSelector()
        self.logFile = io.StringIO()
        self.accessLog = AccessLog(self.logFile, reactor=self.clock)

    def connect(self, **kwargs: Any) -> tuple[Any, StringTransport]:
        proxy = CachingProxyResource(
            MemoryStore(reactor=self.clock), FakeAccess(), self.selector, FakeMesh(), "proxy.test",
            reactor=self.clock, accessLog=self.accessLog, **kwargs,
        )
        site = ProxySite(proxy, reactor=self.clock)
        address = IPv4Address("TCP", "127.0.0.1", 40000)
        channel = site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        channel.makeConnection(transport)
        return channel, transport

    def upstreamConnected(self, index: int) -> tuple[Any, StringTransport]:
        """
        Let the C{index}th upstream connection attempt succeed.
        """
        host, port, factory, _, _ = self.clock.tcpClients[index]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_retryAfterConnectionLostBeforeBody(self) -> None:
        """
        An upstream connection lost after the request head went out but
        before any body byte: the next route gets the whole body and its
        answer reaches the client.
        """
        self.selector.routes = [DIRECT, DIRECT]
        channel, transport = self.connect()
        channel.dataReceived(
            f"PUT {URL} HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 6\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        first, firstTransport = self.upstreamConnected(0)
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        first.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(len(self.clock.tcpClients), 2)
        second, secondTransport = self.upstreamConnected(1)
        channel.dataReceived(b"abcdef")
        self.assertTrue(secondTransport.value().endswith(b"\r\n\r\nabcdef"))
        second.dataReceived(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        response = parseResponse(transport.value().split(b"\r\n\r\n", 1)[1])
        self.assertEqual(response.status, 201)

    def test_overLimitAfterConnect(self) -> None:
        """
        A chunked body over the limit once the upstream connection is up:
        the upstream connection is dropped, the client gets only the 413,
        and nothing fails.
        """
        self.selector.routes = [DIRECT]
        channel, transport = self.connect(maxRequestBodySize=10)
        channel.dataReceived(
            f"PUT {URL} HTTP/1.1\r\nHost: origin.test\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        upstream, upstreamTransport = self.upstreamConnected(0)
        channel.dataReceived(chunk(b"y" * 12))
        self.assertTrue(upstreamTransport.disconnecting)
        written = transport.value()
        self.assertEqual(parseResponse(written).status, 413)
        upstream.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(transport.value(), written)
        self.accessLog.flush()
        lines = self.logFile.getvalue().splitlines()
        self.assertEqual(len(lines), 1)
        self.assertIn("NONE/413", lines[0])
