"""
Tests for the fast path of cache hits in L{icpmesh.proxy}: a plain GET or
HEAD that hits a fresh stored response is answered with a prebuilt header
block written straight to the HTTP/1.x channel (L{icpmesh.proxy._writeRaw}).

The responses must be exactly those of the general path, and
C{twisted.web}'s request must end up as if it had written them itself:
finished, logged, persistent connections kept or closed as before.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from icpmesh.interfaces import StoredResponse
from icpmesh.proxy import NOT_PLAIN_HEADERS, _canWriteRaw, _isPlain, _writeRaw
from tests.test_proxy import NOW, URL, ProxyTestMixin, httpDate, parseResponse


class RecordingTransport(StringTransport):
    """
    A L{StringTransport} that counts the calls that write to it.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.writeCalls = 0

    def write(self, data: bytes) -> None:
        self.writeCalls += 1
        super().write(data)

    def writeSequence(self, seq: Any) -> None:
        self.writeCalls += 1
        for data in seq:
            super().write(data)


def connect(site: Site) -> tuple[Any, RecordingTransport]:
    """
    One client connection to C{site}.
    """
    address = IPv4Address("TCP", "127.0.0.1", 40000)
    channel = site.buildProtocol(address)
    transport = RecordingTransport(peerAddress=address)
    channel.makeConnection(transport)
    return channel, transport


def requestBytes(method: str = "GET", url: str = URL, version: str = "HTTP/1.1",
                 headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    lines = [f"{method} {url} {version}", "Host: origin.test"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class _Entry:
    """
    A stored object without its body in memory (as a disk store hands
    them out): C{writeTo} writes the chunks when the test fires it.
    """

    def __init__(self, meta: StoredResponse, chunks: list[bytes]) -> None:
        self.meta = meta
        self.size = sum(map(len, chunks))
        self.chunks = chunks
        self.consumer: Any = None
        self.result: Deferred[None] = Deferred()

    def writeTo(self, consumer: Any) -> Deferred[None]:
        self.consumer = consumer
        return self.result

    def deliver(self) -> None:
        for chunk in self.chunks:
            self.consumer.write(chunk)
        self.result.callback(None)


class _OneEntryStore:
    """
    A store that answers every lookup with one entry.
    """

    def __init__(self, entry: Any) -> None:
        self.entry = entry

    def get(self, key: str) -> Deferred[Any]:
        return succeed(self.entry)


class FastHitTests(ProxyTestMixin, SynchronousTestCase):
    """
    Plain hits through the proxy's C{Site}.
    """

    def storeObject(self, body: bytes = b"hello world", **headers: str) -> None:
        """
        Fetch C{URL} once so that it is stored.
        """
        headers = {"Cache-Control": "max-age=600", "Content-Type": "text/plain", **headers}
        self.origin.setResponse("/a", body, headers=headers)
        self.get()
        self.assertEqual(self.origin.counts["/a"], 1)

    def send(self, data: bytes) -> tuple[Any, RecordingTransport]:
        channel, transport = connect(self.site)
        channel.dataReceived(data)
        self.flush()
        return channel, transport

    def test_plainHitOneWrite(self) -> None:
        """
        A plain GET that hits goes out in one write: status line, headers
        and the stored body.
        """
        self.storeObject()
        _, transport = self.send(requestBytes())
        response = parseResponse(transport.value())
        self.assertEqual((response.status, response.body, response.complete), (200, b"hello world", True))
        self.assertEqual(response.header("x-cache"), "HIT from proxy.test")
        self.assertEqual(response.header("content-length"), "11")
        self.assertEqual(transport.writeCalls, 1)
        self.assertEqual(self.origin.counts["/a"], 1)

    def test_sameBytesAsGeneralPath(self) -> None:
        """
        The fast path sends byte for byte what the general path sends for
        the same hit (here taken by a request with an unknown C{Pragma},
        which changes nothing else): the stored headers in order with
        repeated ones, C{Content-Length}, C{Via} appended to the stored
        one, C{X-Cache}, the stored C{Date} once, C{Age}.
        """
        self.origin.setResponse("/a", b"body", headers=[
            ("Cache-Control", "max-age=600"), ("Age", "3"), ("Via", "1.1 upstream"),
            ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-Custom", "x"),
            ("Date", httpDate(NOW - 2)),
        ])
        self.get()
        self.clock.advance(7.5)
        _, fast = self.send(requestBytes())
        _, general = self.send(requestBytes(headers=(("Pragma", "x-nothing"),)))
        self.assertEqual(fast.writeCalls, 1)
        self.assertNotEqual(general.writeCalls, 1)
        self.assertEqual(fast.value(), general.value())
        response = parseResponse(fast.value())
        # Age: the stored corrected initial age, max(3, 2), plus 7.5 s here.
        self.assertEqual(response.header("age"), "10")
        self.assertEqual(response.headers.getRawHeaders(b"date"), [httpDate(NOW - 2).encode()])
        self.assertEqual(response.headers.getRawHeaders(b"set-cookie"), [b"a=1", b"b=2"])
        self.assertEqual(response.headers.getRawHeaders(b"via"),
                         [b"1.1 upstream", b"1.1 proxy.test (icpmesh/0.1.0)"])
        # The origin's Server (stored), not twisted.web's as well.
        self.assertEqual(response.count("server"), 1)

    def test_noStoredDate(self) -> None:
        """
        A stored response without C{Date} gets twisted.web's C{Date} once,
        after the stored headers and before C{Age}, as on the general path.
        """
        meta = StoredResponse(200, b"OK", [(b"cache-control", b"max-age=600")], NOW, NOW, NOW + 600)
        writer = self.store.begin(URL, meta)
        writer.write(b"xyz")
        writer.finish()
        _, fast = self.send(requestBytes())
        _, general = self.send(requestBytes(headers=(("Pragma", "x-nothing"),)))
        self.assertEqual(fast.writeCalls, 1)
        response = parseResponse(fast.value())
        self.assertEqual(response.body, b"xyz")
        self.assertEqual(len(response.headers.getRawHeaders(b"date")), 1)
        head = fast.value().split(b"\r\n\r\n")[0].split(b"\r\n")
        self.assertEqual([line.split(b":")[0] for line in head[1:]],
                         [b"Cache-Control", b"Content-Length", b"Via", b"X-Cache", b"Date", b"Age"])
        # The same but for the Date itself (twisted.web's clock, per request).
        strip = lambda data: b"\r\n".join(  # noqa: E731
            line for line in data.split(b"\r\n") if not line.startswith(b"Date:"))
        self.assertEqual(strip(fast.value()), strip(general.value()))

    def test_notPlainHeaders(self) -> None:
        """
        A request with any of the listed headers, in any letter case, is
        not plain; one with only other headers is.
        """
        from twisted.web.http_headers import Headers

        for name in NOT_PLAIN_HEADERS:
            for spelling in (name, name.upper(), name.title()):
                headers = Headers({b"Host": [b"h"], b"Accept": [b"*/*"]})
                headers.addRawHeader(spelling, b"x")
                self.assertFalse(_isPlain(headers), spelling)
        self.assertTrue(_isPlain(Headers({b"Host": [b"h"], b"Accept": [b"*/*"], b"Via": [b"1.1 a"]})))

    def test_directivesStillWeighed(self) -> None:
        """
        A fresh hit is not served from the fast path to a request whose
        header would change the answer: C{no-cache} in lower or upper case
        still revalidates, and a conditional still gets its 304.
        """
        self.storeObject(ETag='"v1"')
        for name in ("cache-control", "CACHE-CONTROL"):
            _, transport = self.send(requestBytes(headers=((name, "no-cache"),)))
            self.assertNotEqual(transport.writeCalls, 1)
        self.assertEqual(self.origin.counts["/a"], 3)
        _, transport = self.send(requestBytes(headers=(("if-none-match", '"v1"'),)))
        self.assertEqual(parseResponse(transport.value()).status, 304)

    def test_keepAlivePipelined(self) -> None:
        """
        Pipelined plain hits on one persistent HTTP/1.1 connection are each
        answered whole, in order, and the connection stays open.
        """
        self.storeObject(b"first")
        channel, transport = self.send(requestBytes() + requestBytes(method="HEAD") + requestBytes())
        data = transport.value()
        one, rest = data.split(b"\r\n\r\n", 1)
        self.assertTrue(rest.startswith(b"first" + b"HTTP/1.1 200 OK\r\n"))
        self.assertEqual(data.count(b"HTTP/1.1 200 OK\r\n"), 3)
        self.assertTrue(data.endswith(b"\r\n\r\nfirst"))
        self.assertEqual(data.count(b"first"), 2)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(transport.writeCalls, 3)
        channel.dataReceived(requestBytes())
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK\r\n"), 4)
        self.assertFalse(transport.disconnecting)

    def test_http10(self) -> None:
        """
        An HTTP/1.0 request gets an HTTP/1.0 status line and the whole body,
        and the connection is closed after it (twisted.web keeps no
        HTTP/1.0 connection open).
        """
        self.storeObject()
        _, transport = self.send(requestBytes(version="HTTP/1.0"))
        self.assertTrue(transport.value().startswith(b"HTTP/1.0 200 OK\r\n"))
        self.assertEqual(transport.writeCalls, 1)
        response = parseResponse(transport.value())
        self.assertEqual((response.body, response.complete), (b"hello world", True))
        self.assertTrue(transport.disconnecting)

    def test_connectionClose(self) -> None:
        """
        An HTTP/1.1 request with C{Connection: close} gets C{Connection:
        close} back, on both paths, and the connection is closed.
        """
        self.storeObject()
        for extra in ((), (("Pragma", "x-nothing"),)):
            _, transport = self.send(requestBytes(headers=(("Connection", "close"),) + extra))
            response = parseResponse(transport.value())
            self.assertEqual(response.header("connection"), "close")
            self.assertEqual((response.body, response.complete), (b"hello world", True))
            self.assertTrue(transport.disconnecting)

    def test_head(self) -> None:
        """
        A HEAD hit carries the stored response's headers and
        C{Content-Length}, no body, in one write; a GET after it on the
        same connection is answered whole, in one write too.
        """
        self.storeObject()
        channel, transport = self.send(requestBytes(method="HEAD"))
        self.assertEqual(transport.writeCalls, 1)
        self.assertTrue(transport.value().endswith(b"\r\n\r\n"))
        response = parseResponse(transport.value(), head=True)
        self.assertEqual(response.header("content-length"), "11")
        self.assertEqual(response.header("x-cache"), "HIT from proxy.test")
        self.assertFalse(transport.disconnecting)
        head = transport.value()
        channel.dataReceived(requestBytes())
        self.assertEqual(transport.writeCalls, 2)
        self.assertEqual(parseResponse(transport.value()[len(head):]).body, b"hello world")

    def test_requestFinishedAndLogged(self) -> None:
        """
        After a fast hit twisted.web's request is finished, its
        C{notifyFinish} has fired, the Site's log sees its status and body
        size, and the access log has a TCP_HIT line.
        """
        seen: list[tuple[int, int]] = []
        requests: list[Any] = []

        class LoggingSite(Site):
            def log(self, request: Any) -> None:
                seen.append((request.code, request.sentLength))

        self.storeObject()
        self.site = LoggingSite(self.proxy, reactor=self.clock)
        finished: list[Any] = []
        original = self.proxy.render

        def render(request: Any) -> Any:
            requests.append(request)
            request.notifyFinish().addBoth(finished.append)
            return original(request)

        self.proxy.render = render  # type: ignore[method-assign]
        _, transport = self.send(requestBytes())
        self.assertEqual(transport.writeCalls, 1)
        self.assertEqual(seen, [(200, 11)])
        self.assertEqual(finished, [None])
        self.assertTrue(requests[0].finished)
        self.assertIn("TCP_HIT/200 11 GET http://origin.test/a", self.logLines()[-1])

    def asyncEntry(self) -> _Entry:
        meta = StoredResponse(200, b"OK", [(b"cache-control", b"max-age=600"),
                                           (b"date", httpDate(NOW).encode())],
                              NOW, NOW, NOW + 600)
        entry = _Entry(meta, [b"abc", b"def"])
        self.store = _OneEntryStore(entry)  # type: ignore[assignment]
        self.build()
        return entry

    def test_bodyNotInMemory(self) -> None:
        """
        A stored body that is not in memory follows the prebuilt headers
        through C{request.write} as the store produces it; the response is
        finished only when the store is done.
        """
        entry = self.asyncEntry()
        _, transport = self.send(requestBytes())
        self.assertTrue(transport.value().endswith(b"Age: 0\r\n\r\n"))
        self.assertEqual(parseResponse(transport.value()).header("content-length"), "6")
        entry.deliver()
        response = parseResponse(transport.value())
        self.assertEqual((response.body, response.complete), (b"abcdef", True))
        self.assertIn("TCP_HIT/200 6", self.logLines()[-1])
        _, again = self.send(requestBytes())  # the connection is usable
        self.assertFalse(transport.disconnecting)

    def test_bodyNotInMemoryFails(self) -> None:
        """
        If such a body cannot be read whole, the connection is aborted, so
        that the client cannot take the part it got for the whole.
        """
        entry = self.asyncEntry()
        _, transport = self.send(requestBytes())
        self.assertTrue(transport.value().endswith(b"\r\n\r\n"))
        entry.consumer.write(b"abc")
        entry.result.errback(Failure(OSError("disk gone")))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertFalse(parseResponse(transport.value()).complete)
        self.assertTrue(transport.disconnecting)

    def test_clientGoneBeforeBody(self) -> None:
        """
        A client that goes away before such a body arrives costs nothing
        more: no error, nothing finished on a closed connection.
        """
        from twisted.internet.error import ConnectionLost

        entry = self.asyncEntry()
        channel, transport = self.send(requestBytes())
        self.assertTrue(transport.value().endswith(b"\r\n\r\n"))
        channel.connectionLost(Failure(ConnectionLost()))
        before = transport.value()
        entry.deliver()
        self.assertEqual(transport.value(), before)
        self.assertEqual(self.flushLoggedErrors(), [])


class _RawResource(Resource):
    """
    Answers every request with L{_writeRaw}, then writes C{more} through
    the request and finishes it.
    """

    isLeaf = True

    def __init__(self, head: bytes, body: Optional[bytes], more: bytes) -> None:
        super().__init__()
        self.head = head
        self.body = body
        self.more = more
        self.requests: list[Any] = []

    def render(self, request: Any) -> Any:
        self.requests.append(request)
        assert _canWriteRaw(request)
        _writeRaw(request, 203, b"Custom", self.head, self.body)
        if self.more:
            request.write(self.more)
        request.finish()
        return NOT_DONE_YET


class RawWriteTests(SynchronousTestCase):
    """
    L{_writeRaw} against the installed twisted.web: these fail if a Twisted
    upgrade changes what the fast path relies on (headers written by the
    first C{Request.write} only while C{startedWriting} is false, the
    status and length a request logs).
    """

    HEAD = b"HTTP/1.1 203 Custom\r\nContent-Length: 6\r\n\r\n"

    def serve(self, body: Optional[bytes], more: bytes, data: bytes) -> tuple[_RawResource, Any, Any]:
        clock = MemoryReactorClock()
        resource = _RawResource(self.HEAD, body, more)
        logged: list[tuple[int, bytes, int]] = []

        class LoggingSite(Site):
            def log(self, request: Any) -> None:
                logged.append((request.code, request.code_message, request.sentLength))

        channel, transport = connect(LoggingSite(resource, reactor=clock))
        channel.dataReceived(data)
        return resource, transport, logged

    def test_onlyOurHeaders(self) -> None:
        """
        After L{_writeRaw}, C{request.write} sends body bytes only, and
        C{finish} adds nothing: no second header block, no chunking, no
        C{Server} or C{Date} of twisted.web's.
        """
        _, transport, logged = self.serve(b"abc", b"def", b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(transport.value(), self.HEAD + b"abcdef")
        self.assertEqual(logged, [(203, b"Custom", 6)])

    def test_headOnly(self) -> None:
        """
        Without a body, only the head is written; the request is finished
        and the persistent connection serves the next request.
        """
        resource, transport, _ = self.serve(
            None, b"", b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n" * 2)
        self.assertEqual(transport.value(), self.HEAD * 2)
        self.assertEqual(len(resource.requests), 2)
        self.assertTrue(all(r.finished for r in resource.requests))
        self.assertFalse(transport.disconnecting)

    def test_oneWrite(self) -> None:
        """
        Head and body go to the transport in a single call.
        """
        _, transport, _ = self.serve(b"abcdef", b"", b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(transport.value(), self.HEAD + b"abcdef")
        self.assertEqual(transport.writeCalls, 1)

    def test_canWriteRaw(self) -> None:
        """
        L{_canWriteRaw} refuses a request that has started writing, an
        unknown protocol version, and a channel that is not HTTP/1.x.
        """
        channel = HTTPChannel()
        channel.site = Site(Resource(), reactor=MemoryReactorClock())
        channel.makeConnection(StringTransport())
        request = channel.site.requestFactory(channel)
        request.clientproto = b"HTTP/1.1"
        self.assertTrue(_canWriteRaw(request))
        request.clientproto = b"HTTP/2"
        self.assertFalse(_canWriteRaw(request))
        request.clientproto = b"HTTP/1.0"
        request.startedWriting = 1
        self.assertFalse(_canWriteRaw(request))
        request.startedWriting = 0
        request.channel = object()
        self.assertFalse(_canWriteRaw(request))



class ProxySiteTests(ProxyTestMixin, SynchronousTestCase):
    """
    L{icpmesh.service.ProxySite} and its L{icpmesh.service.ProxyRequest}:
    proxied requests skip C{twisted.web}'s traversal and take the site's
    once-a-second C{Date}.
    """

    def build(self, upstream: Any = None, **kwargs: Any) -> None:
        from icpmesh.service import ProxySite

        super().build(upstream, **kwargs)
        self.site = ProxySite(self.proxy, reactor=self.clock)

    def test_dateFromSiteReactor(self) -> None:
        """
        A proxied request's C{Date} comes from the site's reactor (here
        the test clock, not the wall clock).
        """
        self.access.http = False
        response = self.get()
        self.assertEqual(response.status, 403)
        self.assertEqual(response.headers.getRawHeaders(b"date"), [httpDate(NOW).encode()])

    def test_datePerSecond(self) -> None:
        """
        The date is formatted once per second of the reactor's clock.
        """
        first = self.site.httpDate()
        self.clock.advance(0.5)
        self.assertIs(self.site.httpDate(), first)
        self.clock.advance(0.5)
        self.assertEqual(self.site.httpDate(), httpDate(NOW + 1).encode())

    def test_hitThroughProxySite(self) -> None:
        """
        Plain hits on a L{ProxySite} take the fast path: one write, and
        twisted.web's C{Date} (the site's) when none is stored.
        """
        meta = StoredResponse(200, b"OK", [(b"cache-control", b"max-age=600")], NOW, NOW, NOW + 600)
        writer = self.store.begin(URL, meta)
        writer.write(b"xyz")
        writer.finish()
        self.clock.advance(2)
        channel, transport = connect(self.site)
        channel.dataReceived(requestBytes())
        self.assertEqual(transport.writeCalls, 1)
        response = parseResponse(transport.value())
        self.assertEqual(response.body, b"xyz")
        self.assertEqual(response.headers.getRawHeaders(b"date"), [httpDate(NOW + 2).encode()])
        self.assertEqual(response.header("age"), "2")

    def test_otherRequestsProcessedAsUsual(self) -> None:
        """
        An origin-form request (the node's own pages) goes through
        twisted.web's usual processing: traversal state, C{Server}.
        """
        seen: list[Any] = []

        class Page(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                seen.append((request.prepath, request.postpath))
                return b"page"

        self.proxy.localResources[b"/page"] = Page()
        channel, transport = connect(self.site)
        channel.dataReceived(b"GET /page HTTP/1.1\r\nHost: node\r\n\r\n")
        response = parseResponse(transport.value())
        self.assertEqual((response.status, response.body), (200, b"page"))
        self.assertEqual(seen, [([], [b"page"])])
        self.assertIsNotNone(response.header("server"))

    def test_renderFailureIs500(self) -> None:
        """
        An exception out of the proxy's C{render} on the shortcut is
        answered 500, as twisted.web does (with the site's C{Date}: it did
        take the shortcut), not left to escape.
        """
        def broken(request: Any) -> Any:
            raise RuntimeError("broken")

        self.proxy.render = broken  # type: ignore[method-assign]
        self.site.displayTracebacks = False
        response = self.get()
        self.assertEqual(response.status, 500)
        self.assertEqual(response.headers.getRawHeaders(b"date"), [httpDate(NOW).encode()])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
