"""
Tests for the shortcuts of the HTTP miss path (docs/performance.md, "Miss
path"): each one must give exactly what the general path gives.
"""

from __future__ import annotations

from typing import Any, Optional

from hypothesis import example, given
from hypothesis import strategies as st
from twisted.internet.defer import succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI

from icpmesh import caching, proxy
from icpmesh.interfaces import DIRECT, AccessRequest, Route
from icpmesh.proxy import _OriginEndpoints, _urlParts

from .test_proxy import URL, FakeNeighbour, FakeSelector, ProxyTestMixin


def generalParts(url: str) -> Optional[tuple[str, str, int, str]]:
    """
    What L{_urlParts} computes the general way.
    """
    try:
        request = AccessRequest.fromURL("", "", url)
    except ValueError:
        return None
    return (request.scheme, request.host, request.port, request.path)


_URL_CHARS = st.sampled_from(list("abzAZ09.-:/?#@[]% \t\"\\~_!$&'()*+,;=") + ["\x7f", "\x00", "\xe9"])
_HOSTS = st.one_of(
    st.sampled_from(["origin.test", "127.0.0.1", "a", "0", "a-b.c", "A.test", "[::1]", "", "-x", "h_s"]),
    st.text(_URL_CHARS, max_size=12),
)
_PORTS = st.one_of(st.just(""), st.sampled_from([":80", ":8081", ":0", ":65535", ":65536", ":99999",
                                                 ":", ":080", ":x"]))
_PATHS = st.one_of(
    st.sampled_from(["/", "/a", "/a?", "/a?b", "/a?b?", "/a#f", "/a b", "/%41", "", "?q", "/a?\x7f"]),
    st.text(_URL_CHARS, max_size=16).map(lambda t: "/" + t),
)


class URLPartsTests(SynchronousTestCase):
    """
    L{_urlParts} reads the common form of URL without C{urlsplit}.
    """

    def setUp(self) -> None:
        proxy._urlCache.clear()

    @given(
        st.sampled_from(["http://", "HTTP://", "https://", "http:/", "ftp://"]), _HOSTS, _PORTS, _PATHS
    )
    @example("http://", "h", "", "/a?")
    @example("http://", "h", ":65536", "/")
    @example("http://", "origin.test", ":080", "/x?y=1&z")
    def test_sameAsGeneral(self, scheme: str, host: str, port: str, path: str) -> None:
        """
        For any URL, the parts are those L{AccessRequest.fromURL} gives, or
        C{None} where it refuses the URL.
        """
        proxy._urlCache.clear()
        url = scheme + host + port + path
        self.assertEqual(_urlParts(url), generalParts(url))

    def test_plainWithoutUrlsplit(self) -> None:
        """
        A plain URL (lower-case host or address, port, printable path) is
        read without L{AccessRequest.fromURL}.
        """
        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("fromURL called")

        self.patch(proxy.AccessRequest, "fromURL", refuse)
        self.assertEqual(_urlParts("http://127.0.0.1:8081/miss/1?a=b"),
                         ("http", "127.0.0.1", 8081, "/miss/1?a=b"))
        self.assertEqual(_urlParts("http://origin.test/"), ("http", "origin.test", 80, "/"))


class OriginEndpointsTests(SynchronousTestCase):
    """
    L{_OriginEndpoints} makes an address literal's endpoint once.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.endpoints = _OriginEndpoints(self.reactor, 7.0)

    def endpoint(self, url: bytes) -> Any:
        return self.endpoints.endpointForURI(URI.fromBytes(url))

    def test_literalReused(self) -> None:
        """
        The same address and port give the same endpoint object, with the
        address, port and connect timeout of the URL.
        """
        first = self.endpoint(b"http://127.0.0.1:8081/a")
        self.assertIsInstance(first, TCP4ClientEndpoint)
        self.assertIs(self.endpoint(b"http://127.0.0.1:8081/b?c"), first)
        self.assertEqual((first._host, first._port, first._timeout), ("127.0.0.1", 8081, 7.0))

    def test_otherPortOtherEndpoint(self) -> None:
        """
        Another port, or another address, is another endpoint.
        """
        first = self.endpoint(b"http://127.0.0.1:8081/a")
        other = self.endpoint(b"http://127.0.0.1:8082/a")
        self.assertIsNot(other, first)
        self.assertEqual(other._port, 8082)
        self.assertEqual(self.endpoint(b"http://127.0.0.2:8081/a")._host, "127.0.0.2")

    def test_ipv6(self) -> None:
        """
        An IPv6 literal gets a reused IPv6 endpoint.
        """
        first = self.endpoint(b"http://[::1]:8081/a")
        self.assertIsInstance(first, TCP6ClientEndpoint)
        self.assertIs(self.endpoint(b"http://[::1]:8081/a"), first)

    def test_namesNotKept(self) -> None:
        """
        A host name (looked up per connection) and https are not kept.
        """
        self.assertNotIsInstance(self.endpoint(b"http://origin.test/a"), TCP4ClientEndpoint)
        self.endpoint(b"https://127.0.0.1/a")
        self.assertEqual(list(self.endpoints._literals), [])

    def test_bounded(self) -> None:
        """
        At most L{proxy._LITERAL_ENDPOINTS_MAX} endpoints are kept.
        """
        for port in range(1, proxy._LITERAL_ENDPOINTS_MAX + 2):
            self.endpoint(b"http://127.0.0.1:%d/" % (port,))
        self.assertLessEqual(len(self.endpoints._literals), proxy._LITERAL_ENDPOINTS_MAX)


class _DeferredSelector(FakeSelector):
    """
    The same routes, as a Deferred (as a selector that asked neighbours).
    """

    def selectRoutes(self, request: Any, neighbours: Any, icp: Any) -> Any:
        return succeed(super().selectRoutes(request, neighbours, icp))


class _RaisingSelector(FakeSelector):
    def selectRoutes(self, request: Any, neighbours: Any, icp: Any) -> Any:
        raise RuntimeError("selector broke")


class _DeferredRaisingSelector(FakeSelector):
    def selectRoutes(self, request: Any, neighbours: Any, icp: Any) -> Any:
        return succeed(None).addCallback(lambda _: 1 / 0)


class SynchronousRoutesTests(ProxyTestMixin, SynchronousTestCase):
    """
    Routes a selector returns at once are used without a Deferred, with the
    outcome of routes that come in a Deferred.
    """

    def outcome(self, selector: Any, direct: Optional[str] = None, neighbours: Any = ()) -> tuple[Any, ...]:
        """
        The status, body and log line (less its time fields) of one GET
        through a fresh proxy using C{selector}.
        """
        self.setUp()
        self.selector = selector
        self.access.direct = direct
        for neighbour in neighbours:
            self.neighbourResources[neighbour] = self.origin
        self.build()
        self.origin.setResponse("/a", b"body", headers={"Cache-Control": "max-age=60"})
        response = self.get()
        lines = [line.split(None, 2)[2] for line in self.logLines()]
        return response.status, response.body, lines, len(self.flushLoggedErrors())

    def assertSame(self, routes: list[Any], direct: Optional[str] = None) -> tuple[Any, ...]:
        neighbours = [route.neighbour for route in routes if route.neighbour is not None]
        now = self.outcome(FakeSelector(routes), direct, neighbours)
        later = self.outcome(_DeferredSelector(routes), direct, neighbours)
        self.assertEqual(now, later)
        return now

    def test_direct(self) -> None:
        """
        A direct route: the object is fetched, as with deferred routes.
        """
        status, body, lines, errors = self.assertSame([DIRECT])
        self.assertEqual((status, body, errors), (200, b"body", 0))

    def test_noRoutes(self) -> None:
        """
        No route: 503, as with deferred routes.
        """
        self.assertEqual(self.assertSame([])[0], 503)

    def test_neverDirect(self) -> None:
        """
        C{never_direct} takes the direct route out of routes given at once too.
        """
        self.assertEqual(self.assertSame([DIRECT], direct="never")[0], 503)
        neighbour = FakeNeighbour("sib")
        status = self.assertSame([Route(neighbour, "PARENT_HIT"), DIRECT], direct="never")[0]
        self.assertEqual(status, 200)

    def test_loopUnderNeverDirect(self) -> None:
        """
        A forwarding loop goes direct even under C{never_direct}: the
        policy filters the selector's routes only.
        """
        self.access.direct = "never"
        self.origin.setResponse("/a", b"x")
        response = self.get(headers=[("Via", "1.1 proxy.test (icpmesh/0.1.0)")])
        self.assertEqual((response.status, response.body), (200, b"x"))
        self.assertEqual(self.selector.calls, [])

    def test_selectorRaises(self) -> None:
        """
        A selector that raises gets the client a 500 and is logged, as one
        whose Deferred fails.
        """
        now = self.outcome(_RaisingSelector())
        later = self.outcome(_DeferredRaisingSelector())
        self.assertEqual(now[:3], later[:3])
        self.assertEqual((now[0], now[3], later[3]), (500, 1, 1))

    def test_badRoutes(self) -> None:
        """
        Routes that cannot be used (here: not routes at all) crash the
        fetch into a 500, as they do when they come in a Deferred.
        """
        now = self.outcome(FakeSelector([object()]), direct="never")
        later = self.outcome(_DeferredSelector([object()]), direct="never")
        self.assertEqual(now[:3], later[:3])
        self.assertEqual((now[0], now[3]), (500, 1))

    def test_noDeferred(self) -> None:
        """
        Routes given at once do not go through C{maybeDeferred}.
        """
        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("maybeDeferred called")

        self.patch(proxy, "maybeDeferred", refuse)
        self.origin.setResponse("/a", b"body", headers={"Cache-Control": "max-age=60"})
        self.assertEqual(self.get().body, b"body")


class RelayClientTests(ProxyTestMixin, SynchronousTestCase):
    """
    A client's one C{notifyFinish} errback marks it gone and drops it from
    the relay that writes its response.
    """

    def test_relayForgottenWhenDone(self) -> None:
        """
        Once the response is complete, the exchange no longer refers to the
        relay (no reference cycle is left for the garbage collector).
        """
        exchanges: list[Any] = []
        original = proxy._Relay.__init__

        def record(relay: Any, owner: Any, clients: Any, writer: Any, onDone: Any) -> None:
            exchanges.extend(clients)
            original(relay, owner, clients, writer, onDone)

        self.patch(proxy._Relay, "__init__", record)
        self.origin.setResponse("/a", b"body", headers={"Cache-Control": "max-age=60"})
        self.assertEqual(self.get().body, b"body")
        self.assertEqual(len(exchanges), 1)
        self.assertIsNone(exchanges[0].relay)

    def test_followerGoneMidBody(self) -> None:
        """
        A client that joined a fetch and goes away during the body is
        dropped by the relay; the others get the whole body.
        """
        self.origin.setResponse("/a", b"shared", headers={"Cache-Control": "max-age=60"})
        self.origin.hold("/a")
        first = self.request()
        second = self.request()
        relays: list[Any] = []
        original = proxy._Relay.dataReceived

        def once(relay: Any, data: bytes) -> None:
            if not relays:
                relays.append(relay)
                second.disconnect()
            original(relay, data)

        self.patch(proxy._Relay, "dataReceived", once)
        self.origin.release("/a")
        self.flush()
        self.assertEqual(first.response().body, b"shared")
        self.assertEqual(len(relays[0].clients), 1)
        self.assertFalse(relays[0].clients[0].collapsed)


class RelayCycleTests(SynchronousTestCase):
    """
    L{proxy._Relay.clientLost} itself forgets the client's relay.
    """

    def test_clientLostForgetsRelay(self) -> None:
        """
        A client dropped only through the relay (its producer stopped, no
        C{notifyFinish} errback yet) no longer refers to the relay.
        """
        exchange = proxy._Exchange(None, AccessRequest.fromURL("127.0.0.1", "GET", URL), 0.0)
        relay = proxy._Relay(None, [exchange], None, lambda reason, size: None)
        exchange.relay = relay
        relay.clientLost(exchange)
        self.assertEqual((exchange.gone, exchange.relay, relay.clients), (True, None, []))


class FetchCrashedTests(ProxyTestMixin, SynchronousTestCase):
    """
    With routes given at once, even a failure while handling a failed
    fetch is logged, not raised into C{render}.
    """

    def test_crashInCrashHandlerLogged(self) -> None:
        """
        C{_tryRoutes} and then C{_fetchCrashed} raise: one error is logged,
        and twisted.web does not turn it into a 500 on the request.
        """

        def boom(*args: Any) -> None:
            raise RuntimeError("boom")

        self.patch(self.proxy, "_tryRoutes", boom)
        self.patch(self.proxy, "_fetchCrashed", boom)
        client = self.request()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertNotIn(b"500", client.transport.value())


def _loopSplit(text: str) -> list[str]:
    """
    L{caching._splitList} as it reads a quoted list, for every text.
    """
    parts = []
    current: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


class CachingShortcutTests(SynchronousTestCase):
    """
    The shortcuts in L{icpmesh.caching} on the miss path.
    """

    @given(st.lists(st.sampled_from(list('ab=", \t\x0b\x1c\xa0') + ["max-age", "no-cache"]),
                    max_size=20).map("".join))
    @example("a, ,b,")
    @example('a="x,y", b')
    def test_splitList(self, text: str) -> None:
        """
        Lists without quotes, split at C speed, split as the loop splits
        them.
        """
        self.assertEqual(caching._splitList(text), _loopSplit(text))

    @given(st.one_of(
        st.sampled_from([b"Tue, 24 Nov 2026 05:00:00 GMT", b"Tuesday, 24-Nov-26 05:00:00 GMT",
                         b"Tue Nov 24 05:00:00 2026", b"tue, 24 nov 2026 05:00:00 gmt", b"0", b"",
                         b"Tue, 31 Feb 2026 05:00:00 GMT", b"Tue, 24 Nov 2026 05:00:00 GMT" + b" " * 60]),
        st.binary(max_size=40),
    ))
    def test_httpDateCached(self, value: bytes) -> None:
        """
        A date parses the same the first time and from the cache.
        """
        caching._dateCache.clear()
        first = caching.httpDate(value)
        self.assertEqual(first, caching._parseHTTPDate(value) if value else None)
        self.assertEqual(caching.httpDate(value), first)

    def test_httpDateRemembered(self) -> None:
        """
        A date is parsed once; long values are not kept.
        """
        caching._dateCache.clear()
        date = b"Tue, 24 Nov 2026 05:00:00 GMT"
        caching.httpDate(date)
        self.assertIn(date, caching._dateCache)
        caching.httpDate(date + b" " * 64)
        self.assertNotIn(date + b" " * 64, caching._dateCache)
        self.patch(caching, "_parseHTTPDate", lambda value: self.fail("parsed again"))
        self.assertEqual(caching.httpDate(date), 1795496400.0)


class StoreCostTests(SynchronousTestCase):
    """
    L{icpmesh.storage.metaCost} sums at C speed what the loop summed.
    """

    @given(
        st.binary(max_size=10),
        st.lists(st.tuples(st.binary(max_size=12), st.binary(max_size=30)), max_size=12),
    )
    def test_metaCost(self, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        """
        The reason's length plus each name's and value's length and
        L{HEADER_OVERHEAD} per header.
        """
        from icpmesh.interfaces import StoredResponse
        from icpmesh.storage import HEADER_OVERHEAD, metaCost

        meta = StoredResponse(200, reason, tuple(headers), 0.0, 0.0, 0.0, 0)
        expected = len(reason) + sum(len(n) + len(v) + HEADER_OVERHEAD for n, v in headers)
        self.assertEqual(metaCost(meta), expected)


class SetHeadersTests(SynchronousTestCase):
    """
    L{proxy._setHeaders} files headers as C{setRawHeaders} does.
    """

    @given(st.lists(st.tuples(
        st.sampled_from([b"content-type", b"etag", b"x-a", b"www-authenticate", b"te", b"dnt",
                         b"content-md5", b"X-Mixed", b"date"]),
        st.lists(st.binary(max_size=8), min_size=1, max_size=3),
    ), max_size=8))
    def test_sameAsSetRawHeaders(self, pairs: list[tuple[bytes, list[bytes]]]) -> None:
        """
        The same keys, values and order as C{setRawHeaders}, over headers
        that are there already, and the lists are the target's own.
        """
        from twisted.web.http_headers import Headers

        source = Headers()
        for name, values in pairs:
            source.setRawHeaders(name, values)
        clean = proxy.endToEndHeaders(source)
        expected = Headers({b"Date": [b"d"], b"Server": [b"s"]})
        for name, values in clean:
            expected.setRawHeaders(name, values)
        out = Headers({b"Date": [b"d"], b"Server": [b"s"]})
        proxy._setHeaders(out, clean)
        self.assertEqual(list(out.getAllRawHeaders()), list(expected.getAllRawHeaders()))
        for name, values in out.getAllRawHeaders():
            self.assertIsNot(values, source.getRawHeaders(name))

    def test_longNamesNotKept(self) -> None:
        """
        Names longer than 64 bytes are filed correctly but not remembered.
        """
        from twisted.web.http_headers import Headers

        out = Headers()
        long = b"x-" + b"a" * 70
        proxy._setHeaders(out, [(long, [b"1"]), (b"x-short", [b"2"])])
        self.assertEqual(out.getRawHeaders(long), [b"1"])
        self.assertNotIn(long, proxy._canonicalNames)
        self.assertIn(b"x-short", proxy._canonicalNames)

    def test_invalidName(self) -> None:
        """
        An invalid name raises as C{setRawHeaders} does.
        """
        from twisted.web.http_headers import Headers, InvalidHeaderName

        self.assertRaises(InvalidHeaderName, proxy._setHeaders, Headers(), [(b"bad name", [b"1"])])
        self.assertRaises(InvalidHeaderName, Headers().setRawHeaders, b"bad name", [b"1"])


class OnlyControlsTests(SynchronousTestCase):
    """
    A response's C{Connection: keep-alive} or C{close} needs no parsing.
    """

    def test_notParsed(self) -> None:
        """
        C{keep-alive} (any case) is not split into tokens; other values,
        C{close} included, still are, and their fields are removed (a
        C{Close} field named by C{Connection: close} too).
        """
        from icpmesh import upstreamclient

        from .test_upstreamclient import ConnectionHeaderTests, result

        calls: list[Any] = []
        original = upstreamclient.connectionTokens
        self.patch(upstreamclient, "connectionTokens", lambda values: calls.append(values) or original(values))
        case = ConnectionHeaderTests("test_listedHeadersRemoved")
        for value in (b"keep-alive", b"Keep-Alive"):
            d, connection = case.request()
            connection.receive(b"HTTP/1.1 200 OK\r\nConnection: " + value
                               + b"\r\nx: 1\r\nContent-Length: 0\r\n\r\n")
            self.assertEqual(result(d, self).headers.getRawHeaders(b"x"), [b"1"])
        self.assertEqual(calls, [])
        d, connection = case.request()
        connection.receive(b"HTTP/1.1 200 OK\r\nConnection: close\r\nClose: secret\r\nx: 1\r\n"
                           b"Content-Length: 0\r\n\r\n")
        response = result(d, self)
        self.assertEqual((response.headers.getRawHeaders(b"close"), response.headers.getRawHeaders(b"x")),
                         (None, [b"1"]))
        calls.clear()
        d, connection = case.request()
        connection.receive(b"HTTP/1.1 200 OK\r\nConnection: keep-alive, x\r\nx: 1\r\nContent-Length: 0\r\n\r\n")
        self.assertIsNone(result(d, self).headers.getRawHeaders(b"x"))
        self.assertEqual(len(calls), 1)


class DirectivesOnceTests(ProxyTestMixin, SynchronousTestCase):
    """
    A stored response's directives are read once, for deciding to store it
    and for its freshness, unless its own C{Connection} header took some of
    them out of what is stored.
    """

    def test_parsedOnce(self) -> None:
        """
        One miss that is stored reads its directives once.
        """
        calls: list[Any] = []
        original = proxy.responseDirectives

        def counted(*args: Any) -> Any:
            calls.append(args)
            return original(*args)

        self.patch(proxy, "responseDirectives", counted)
        self.origin.setResponse("/a", b"x", headers={"Cache-Control": "max-age=60"})
        self.get()
        self.assertEqual(len(calls), 1)
        self.assertEqual(self.get().header("x-cache"), "HIT from proxy.test")

    def test_connectionListedDirectives(self) -> None:
        """
        A C{Cache-Control} the response's C{Connection} names is for one hop:
        the stored response's freshness comes from what is stored (here: the
        heuristic from C{Last-Modified}, 10% of 1000 s), not from it.
        """
        from .test_proxy import NOW, ScriptedResponse, ScriptedUpstream, httpDate

        headers = {
            b"connection": [b"cache-control"],
            b"cache-control": [b"max-age=5000"],
            b"last-modified": [httpDate(NOW - 1000).encode()],
            b"date": [httpDate(NOW).encode()],
        }
        response = ScriptedResponse(200, headers, 1)
        self.build(upstream=ScriptedUpstream(succeed(response)))
        self.request()
        response.deliver(b"x")
        response.finish()
        self.assertEqual(self.store.freshUntil(URL), NOW + 100)


class PlainCollapsibleTests(ProxyTestMixin, SynchronousTestCase):
    """
    A plain GET is collapsible and sends no credentials without looking
    its headers up again; the answer is the one the full checks give.
    """

    @given(st.lists(st.sampled_from([
        ("Authorization", "Basic eA=="), ("Range", "bytes=0-1"), ("If-None-Match", '"a"'),
        ("If-Modified-Since", "Tue, 24 Nov 2026 05:00:00 GMT"), ("Cache-Control", "no-store"),
        ("Cache-Control", "max-age=0"), ("Pragma", "no-cache"), ("Accept", "*/*"), ("Via", "1.1 x"),
    ]), max_size=3), st.sampled_from(["GET", "HEAD"]), st.booleans())
    def test_sameAsFullChecks(self, headers: list[tuple[str, str]], method: str, stored: bool) -> None:
        """
        L{CachingProxyResource._collapsible} says the same for a request
        marked plain as for the same request checked in full.
        """
        from twisted.web.http_headers import Headers

        from icpmesh.caching import parseCacheControl

        class FakeRequest:
            requestHeaders = Headers()

        request = FakeRequest()
        request.requestHeaders = Headers()
        for name, value in headers:
            request.requestHeaders.addRawHeader(name, value)
        exchange = proxy._Exchange(request, AccessRequest.fromURL("127.0.0.1", method, URL), 0.0)
        exchange.entry = object() if stored else None
        exchange.plain = proxy._isPlain(request.requestHeaders)
        if not exchange.plain:
            exchange.requestCC = parseCacheControl(request.requestHeaders.getRawHeaders(b"cache-control"))
        fast = self.proxy._collapsible(exchange)
        exchange.plain = False
        self.assertEqual(fast, self.proxy._collapsible(exchange))

    def test_plainSkipsLookups(self) -> None:
        """
        For a plain GET the request headers are not looked up again.
        """
        from twisted.web.http_headers import Headers

        class Refusing(Headers):
            def hasHeader(self, name: Any) -> bool:
                raise AssertionError("looked up")

        class FakeRequest:
            requestHeaders = Refusing()

        exchange = proxy._Exchange(FakeRequest(), AccessRequest.fromURL("127.0.0.1", "GET", URL), 0.0)
        exchange.plain = True
        self.assertTrue(self.proxy._collapsible(exchange))
