"""
Tests for L{icpmesh.proxy}: the caching forward proxy resource.

Requests go in as raw bytes through C{Site(resource)} on a
L{StringTransport}; the upstream is L{icpmesh.testing.origin.InMemoryUpstream}
over a L{FakeOrigin}, or a scripted upstream whose bodies the test feeds by
hand.  No sockets; time is a L{MemoryReactorClock}.
"""

from __future__ import annotations

import io
from typing import Any, Optional, Sequence

import attr
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.error import TimeoutError as TwistedTimeoutError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ResponseFailed
from twisted.web.client import ResponseDone
from twisted.web.http import datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.server import Site
from zope.interface import implementer
from zope.interface.verify import verifyObject

from icpmesh.accesslog import AccessLog
from icpmesh.interfaces import DIRECT, IAccessControl, IPeerSelector, Route
from icpmesh.proxy import MAX_INTERIM_BYTES, CachingProxyResource, Upstream, endToEndHeaders
from icpmesh.storage.memory import MemoryStore
from icpmesh.testing.origin import FakeOrigin, InMemoryUpstream

NOW = 1_700_000_000.0
URL_BASE = "http://origin.test"
URL = URL_BASE + "/a"


def httpDate(when: float) -> str:
    return datetimeToString(int(when)).decode()


@implementer(IAccessControl)
class FakeAccess:
    """
    An L{IAccessControl} whose answers are attributes.
    """

    def __init__(self, http: bool = True, miss: bool = True, store: bool = True,
                 neighbours: bool = True, direct: Optional[str] = None) -> None:
        self.http = http
        self.miss = miss
        self.store = store
        self.neighbours = neighbours
        self.direct = direct

    def allowHTTP(self, request: Any) -> bool:
        return self.http

    def allowMiss(self, request: Any) -> bool:
        return self.miss

    def allowICP(self, client: str, url: str) -> bool:
        return True

    def allowNeighbour(self, neighbour: str, request: Any) -> bool:
        return self.neighbours

    def directPolicy(self, request: Any) -> Optional[str]:
        return self.direct

    def allowStore(self, request: Any) -> bool:
        return self.store


@implementer(IPeerSelector)
class FakeSelector:
    """
    An L{IPeerSelector} that returns fixed routes and records its calls.
    """

    def __init__(self, routes: Sequence[Any] = (DIRECT,)) -> None:
        self.routes = list(routes)
        self.calls: list[tuple[Any, list[Any]]] = []

    def selectRoutes(self, request: Any, neighbours: Any, icp: Any) -> Any:
        self.calls.append((request, list(neighbours)))
        return list(self.routes)


@attr.s(auto_attribs=True, eq=False)
class FakeNeighbour:
    name: str
    host: str = "10.0.0.2"
    httpPort: int = 3128
    type: str = "sibling"
    proxyOnly: bool = False
    allowMiss: bool = False
    tls: bool = False
    connectTimeout: float = 5.0


class FakeMesh:
    def __init__(self, neighbours: Sequence[Any] = ()) -> None:
        self.neighbours = list(neighbours)
        self.icp = object()
        self.failed: list[Any] = []
        self.succeeded: list[Any] = []

    def noteFetchFailed(self, neighbour: Any) -> None:
        self.failed.append(neighbour)

    def noteFetchSucceeded(self, neighbour: Any) -> None:
        self.succeeded.append(neighbour)


@attr.s(auto_attribs=True)
class Parsed:
    status: int
    headers: Headers
    body: bytes
    complete: bool

    def header(self, name: str) -> Optional[str]:
        values = self.headers.getRawHeaders(name)
        return None if values is None else ", ".join(v if isinstance(v, str) else v.decode() for v in values)

    def count(self, name: str) -> int:
        return len(self.headers.getRawHeaders(name, []))


def parseResponse(data: bytes, head: bool = False) -> Parsed:
    """
    Parse one HTTP/1.1 response; C{complete} tells whether its body was
    delimited completely.
    """
    top, _, rest = data.partition(b"\r\n\r\n")
    lines = top.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = Headers()
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.addRawHeader(name.strip(), value.strip())
    if head or status in (204, 304):
        return Parsed(status, headers, b"", True)
    if headers.getRawHeaders(b"transfer-encoding") == [b"chunked"]:
        body = b""
        while True:
            size, sep, rest = rest.partition(b"\r\n")
            if not sep:
                return Parsed(status, headers, body, False)
            n = int(size, 16)
            if n == 0:
                return Parsed(status, headers, body, True)
            if len(rest) < n + 2:
                return Parsed(status, headers, body + rest[:n], False)
            body += rest[:n]
            rest = rest[n + 2:]
    length = headers.getRawHeaders(b"content-length")
    if length is not None:
        n = int(length[0])
        return Parsed(status, headers, rest[:n], len(rest) >= n)
    return Parsed(status, headers, rest, False)


class Client:
    """
    One client connection to the proxy's C{Site}.
    """

    def __init__(self, site: Site) -> None:
        address = IPv4Address("TCP", "127.0.0.1", 40000)
        self.channel = site.buildProtocol(address)
        self.transport = StringTransport(peerAddress=address)
        self.channel.makeConnection(self.transport)

    def send(self, method: str, url: str, headers: Sequence[tuple[str, str]] = (), body: bytes = b"") -> None:
        lines = [f"{method} {url} HTTP/1.1", "Host: origin.test"]
        lines += [f"{k}: {v}" for k, v in headers]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        self.channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    def response(self, head: bool = False) -> Parsed:
        return parseResponse(self.transport.value(), head)

    def disconnect(self) -> None:
        from twisted.internet.error import ConnectionLost

        self.channel.connectionLost(Failure(ConnectionLost()))


class ProxyTestMixin:
    """
    Builds a proxy over a fake origin for each test.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(NOW)
        self.origin = FakeOrigin(reactor=self.clock)
        self.access = FakeAccess()
        self.selector = FakeSelector()
        self.mesh = FakeMesh()
        self.store = MemoryStore(reactor=self.clock, maxSize=1 << 20, maxObjectSize=64 * 1024)
        self.logFile = io.StringIO()
        self.accessLog = AccessLog(self.logFile, reactor=self.clock)
        self.neighbourResources: dict[Any, Any] = {}
        self.build()

    def build(self, upstream: Any = None, **kwargs: Any) -> None:
        self.upstream = upstream if upstream is not None else InMemoryUpstream(
            self.origin, self.neighbourResources
        )
        self.proxy = CachingProxyResource(
            self.store, self.access, self.selector, self.mesh, "proxy.test",
            reactor=self.clock, upstream=self.upstream, accessLog=self.accessLog, **kwargs,
        )
        self.site = Site(self.proxy, reactor=self.clock)

    def request(
        self, method: str = "GET", url: str = URL, headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"", flush: bool = True,
    ) -> Client:
        client = Client(self.site)
        client.send(method, url, headers, body)
        if flush:
            self.flush()
        return client

    def flush(self) -> None:
        """
        Run what is due now (request bodies are produced from the clock) and
        carry the in-memory connections' bytes, until nothing moves.
        """
        flush = getattr(self.upstream, "flush", None)
        for _ in range(5):
            self.clock.advance(0)
            if flush is not None:
                flush()

    def get(self, url: str = URL, headers: Sequence[tuple[str, str]] = (), method: str = "GET") -> Parsed:
        return self.request(method, url, headers).response(head=method == "HEAD")

    def logLines(self) -> list[str]:
        self.accessLog.flush()
        return self.logFile.getvalue().splitlines()


class BasicCachingTests(ProxyTestMixin, SynchronousTestCase):
    """
    The caching slice: hits, misses, what is stored, headers.
    """

    def test_secondGetIsHit(self) -> None:
        """
        A cacheable response is stored on the first GET; the second GET is
        served from the store with the same body, C{X-Cache: HIT}, and does
        not reach the origin.
        """
        self.origin.setResponse("/a", b"hello", headers={"Cache-Control": "max-age=60"})
        first = self.get()
        second = self.get()
        self.assertEqual((first.status, first.body), (200, b"hello"))
        self.assertEqual(first.header("x-cache"), "MISS from proxy.test")
        self.assertEqual((second.status, second.body), (200, b"hello"))
        self.assertEqual(second.header("x-cache"), "HIT from proxy.test")
        self.assertEqual(self.origin.counts["/a"], 1)

    def test_hitKeepsOneDate(self) -> None:
        """
        A hit carries the stored C{Date} once, not Twisted's own as well.
        """
        self.origin.setResponse("/a", b"x", headers={"Cache-Control": "max-age=60"})
        self.get()
        self.clock.advance(7)
        hit = self.get()
        self.assertEqual(hit.headers.getRawHeaders(b"date"), [httpDate(NOW).encode()])

    def test_cacheKeyNormalised(self) -> None:
        """
        Scheme and host case and an explicit default port do not make a
        different object.
        """
        self.origin.setResponse("/a", b"x", headers={"Cache-Control": "max-age=60"})
        self.get("http://origin.test/a")
        hit = self.get("HTTP://ORIGIN.test:80/a")
        self.assertEqual(hit.header("x-cache"), "HIT from proxy.test")
        self.assertEqual(self.origin.counts["/a"], 1)

    def test_headFromStoredGet(self) -> None:
        """
        A HEAD after a stored GET is answered from the store: the GET's
        headers and Content-Length, no body.
        """
        self.origin.setResponse("/a", b"12345", headers={"Cache-Control": "max-age=60"})
        self.get()
        client = self.request("HEAD")
        head = client.response(head=True)
        self.assertEqual(head.status, 200)
        self.assertEqual(head.header("content-length"), "5")
        self.assertEqual(head.header("x-cache"), "HIT from proxy.test")
        self.assertTrue(client.transport.value().endswith(b"\r\n\r\n"))
        self.assertEqual(self.origin.counts["/a"], 1)

    def test_headMissNotStored(self) -> None:
        """
        A HEAD miss is forwarded as HEAD and stores nothing.
        """
        self.origin.setResponse("/a", b"12345", headers={"Cache-Control": "max-age=60"})
        head = self.get(method="HEAD")
        self.assertEqual(head.status, 200)
        self.assertEqual(self.origin.requests[-1].method, "HEAD")
        self.get()
        self.assertEqual(self.origin.counts["/a"], 2)

    def test_noStoreNotStored(self) -> None:
        """
        A response with C{no-store} is passed on but not stored.
        """
        self.origin.setResponse("/a", b"x", headers={"Cache-Control": "no-store, max-age=60"})
        self.assertEqual(self.get().body, b"x")
        self.assertEqual(self.get().header("x-cache"), "MISS from proxy.test")
        self.assertEqual(self.origin.counts["/a"], 2)

    def test_privateNotStored(self) -> None:
        """
        A shared cache does not store C{private} responses.
        """
        self.origin.setResponse("/a", b"x", headers={"Cache-Control": "private, max-age=60"})
        self.get()
        self.get()
        self.assertEqual(self.origin.counts["/a"], 2)

    def test_cdnCacheControlRestrictive(self) -> None:
        """
        By default, C{CDN-Cache-Control} and C{Surrogate-Control} are
        obeyed where they restrict:
        C{no-store} and C{private} stop storing, C{no-cache} forces
        revalidation, and a shorter C{max-age} shortens the lifetime; its
        longer C{max-age} does not lengthen it.
        """
        cases = [
            ("/ns", {"Cache-Control": "max-age=600", "CDN-Cache-Control": "no-store"}, 0, 2),
            ("/pr", {"Cache-Control": "max-age=600", "CDN-Cache-Control": "private"}, 0, 2),
            ("/nc", {"Cache-Control": "max-age=600", "CDN-Cache-Control": "no-cache",
                     "ETag": '"v"'}, 0, 2),
            ("/short", {"Cache-Control": "max-age=600", "CDN-Cache-Control": "max-age=5"}, 10, 2),
            ("/shortFresh", {"Cache-Control": "max-age=600", "CDN-Cache-Control": "max-age=5"}, 2, 1),
            ("/long", {"Cache-Control": "max-age=5", "CDN-Cache-Control": "max-age=600"}, 10, 2),
            ("/invalid", {"Cache-Control": "max-age=600", "CDN-Cache-Control": "no-store, &&"}, 0, 1),
            ("/sns", {"Cache-Control": "max-age=600", "Surrogate-Control": "no-store"}, 0, 2),
            ("/sshort", {"Cache-Control": "max-age=600", "Surrogate-Control": "max-age=5"}, 10, 2),
            ("/sother", {"Cache-Control": "max-age=600", "Surrogate-Control": "no-store;other"}, 0, 1),
        ]
        for path, headers, wait, expected in cases:
            self.origin.setResponse(path, b"x", headers=headers)
            self.get(URL_BASE + path)
            self.clock.advance(wait)
            self.get(URL_BASE + path)
            self.assertEqual(self.origin.counts[path], expected, path)

    def test_cdnCacheControlOn(self) -> None:
        """
        With C{cdn_cache_control on}, C{CDN-Cache-Control} replaces
        C{Cache-Control}: its C{max-age} wins over C{no-store} there and
        over a shorter C{max-age}.
        """
        self.build(cdnCacheControl="on")
        self.origin.setResponse("/a", b"x", headers={"Cache-Control": "no-store",
                                                       "CDN-Cache-Control": "max-age=600"})
        self.origin.setResponse("/b", b"x", headers={"Cache-Control": "max-age=5",
                                                       "CDN-Cache-Control": "max-age=600"})
        for path in ("/a", "/b"):
            self.get(URL_BASE + path)
            self.clock.advance(10)
            self.assertEqual(self.get(URL_BASE + path).header("x-cache"), "HIT from proxy.test")
            self.assertEqual(self.origin.counts[path], 1)

    def test_cdnCacheControlIgnore(self) -> None:
        """
        With C{cdn_cache_control ignore}, only C{Cache-Control} counts.
        """
        self.build(cdnCacheControl="ignore")
        self.origin.setResponse("/a", b"x", headers={"Cache-Control": "max-age=600",
                                                       "CDN-Cache-Control": "no-store"})
        self.get(URL_BASE + "/a")
        self.assertEqual(self.get(URL_BASE + "/a").header("x-cache"), "HIT from proxy.test")
        self.assertRaises(ValueError, self.build, cdnCacheControl="maybe")

    def test_storedDirectivesParsedOncePerLookup(self) -> None:
        """
        The checks of one lookup (credentials, C{max-stale},
        C{stale-while-revalidate}) read a stored response's directives
        parsed once: asking again for the same stored response parses
        nothing; another stored response is parsed.
        """
        from icpmesh import proxy as proxyModule
        from icpmesh.interfaces import StoredResponse

        calls: list[Any] = []
        original = proxyModule.responseDirectives
        self.patch(proxyModule, "responseDirectives", lambda *a: calls.append(a) or original(*a))
        first = StoredResponse(200, b"OK", ((b"cache-control", b"public, max-age=1"),), NOW, NOW, NOW + 1, 1)
        second = StoredResponse(200, b"OK", ((b"cache-control", b"private"),), NOW, NOW, NOW, 1)
        directives = self.proxy._storedCC(first)
        self.assertEqual(directives, {"public": None, "max-age": "1"})
        self.assertIs(self.proxy._storedCC(first), directives)
        self.assertIs(self.proxy._storedCC(first), directives)
        self.assertEqual(len(calls), 1)
        self.assertEqual(self.proxy._storedCC(second), {"private": None})
        self.assertEqual(len(calls), 2)

    def test_mustUnderstand(self) -> None:
        """
        C{must-understand}: a 200 is stored despite C{no-store}; a status
        the cache does not implement is not stored despite C{max-age}.
        """
        self.origin.setResponse("/a", b"x", headers={"Cache-Control": "max-age=600, no-store, must-understand"})
        self.origin.setResponse("/b", b"x", status=599,
                                headers={"Cache-Control": "max-age=600, must-understand"})
        for path in ("/a", "/b"):
            self.get(URL_BASE + path)
            self.get(URL_BASE + path)
        self.assertEqual(self.origin.counts["/a"], 1)
        self.assertEqual(self.origin.counts["/b"], 2)

    def test_requestNoStoreNotStored(self) -> None:
        """
        A request with C{Cache-Control: no-store} does not get its response
        stored.
        """
        self.origin.setResponse("/a", b"x", headers={"Cache-Control": "max-age=60"})
        self.get(headers=[("Cache-Control", "no-store")])
        self.get()
        self.assertEqual(self.origin.counts["/a"], 2)

    def test_expiresInPastNotReused(self) -> None:
        """
        An C{Expires} before C{Date} makes the response stale at once; with
        no validator it is fetched again.
        """
        self.origin.setResponse("/a", b"x", headers={"Expires": httpDate(NOW - 60)})
        self.get()
        self.get()
        self.assertEqual(self.origin.counts["/a"], 2)

    def test_invalidExpiresIsPast(self) -> None:
        """
        An C{Expires} that is not a date (such as C{0}) means already
        expired.
        """
        self.origin.setResponse("/a", b"x", headers={"Expires": "0"})
        self.get()
        self.get()
        self.assertEqual(self.origin.counts["/a"], 2)

    def test_expiresRelativeToDate(self) -> None:
        """
        Freshness from C{Expires} counts from the origin's C{Date}, not our
        clock: an origin clock 1000 s fast with C{Expires} 60 s after its
        Date gives 60 s of freshness.
        """
        self.origin.setHandler("/a", lambda r: _response(
            b"x", Date=httpDate(NOW + 1000), Expires=httpDate(NOW + 1060)))
        self.get()
        self.clock.advance(50)
        self.assertEqual(self.get().header("x-cache"), "HIT from proxy.test")
        self.clock.advance(20)
        self.assertEqual(self.get().header("x-cache"), "MISS from proxy.test")

    def test_freshUntilForICP(self) -> None:
        """
        The stored C{freshUntil}, which the ICP responder reads, is the
        response time plus the freshness lifetime minus the corrected
        initial age.
        """
        self.origin.setResponse("/a", b"x", headers={"Cache-Control": "max-age=100", "Age": "30"})
        self.get()
        self.assertEqual(self.store.freshUntil(URL), NOW + 70)

    def test_maxAgeExpires(self) -> None:
        """
        A response is served from the store while younger than max-age and
        fetched again after.
        """
        self.origin.setResponse("/a", b"x", headers={"Cache-Control": "max-age=60"})
        self.get()
        self.clock.advance(59)
        self.assertEqual(self.get().header("x-cache"), "HIT from proxy.test")
        self.clock.advance(2)
        self.assertEqual(self.get().header("x-cache"), "MISS from proxy.test")
        self.assertEqual(self.origin.counts["/a"], 2)

    def test_sMaxAgeWinsOverMaxAge(self) -> None:
        """
        For a shared cache C{s-maxage} overrides C{max-age} and C{Expires}.
        """
        self.origin.setResponse("/long", b"x", headers={
            "Cache-Control": "max-age=0, s-maxage=100", "Expires": httpDate(NOW - 5)})
        self.origin.setResponse("/short", b"x", headers={"Cache-Control": "max-age=100, s-maxage=0"})
        self.get("http://origin.test/long")
        self.get("http://origin.test/short")
        self.clock.advance(50)
        self.assertEqual(self.get("http://origin.test/long").header("x-cache"), "HIT from proxy.test")
        self.assertEqual(self.get("http://origin.test/short").header("x-cache"), "MISS from proxy.test")

    def test_maxAgeWinsOverExpires(self) -> None:
        """
        C{max-age} overrides an C{Expires} in the past.
        """
        self.origin.setResponse("/a", b"x", headers={
            "Cache-Control": "max-age=60", "Expires": httpDate(NOW - 100)})
        self.get()
        self.assertEqual(self.get().header("x-cache"), "HIT from proxy.test")

    def test_ageHeader(self) -> None:
        """
        A hit's Age is the upstream's Age plus the time it spent here.
        """
        self.origin.setResponse("/a", b"x", headers={"Cache-Control": "max-age=60", "Age": "10"})
        self.get()
        self.clock.advance(5)
        self.assertEqual(self.get().header("age"), "15")

    def test_ageFromDate(self) -> None:
        """
        Without an Age header, the apparent age (our receive time minus the
        origin's Date) counts, and it shortens the time the response stays
        fresh.
        """
        self.origin.setHandler("/a", lambda r: _response(
            b"x", Date=httpDate(NOW - 20), **{"Cache-Control": "max-age=60"}))
        self.get()
        self.assertEqual(self.get().header("age"), "20")
        self.clock.advance(41)
        self.assertEqual(self.get().header("x-cache"), "MISS from proxy.test")

    def test_authorizationNotStored(self) -> None:
        """
        A response to a request with Authorization is not stored unless the
        response says public (or s-maxage / must-revalidate).
        """
        self.origin.setResponse("/a", b"x", headers={"Cache-Control": "max-age=60"})
        self.origin.setResponse("/b", b"y", headers={"Cache-Control": "public, max-age=60"})
        auth = [("Authorization", "Basic dTpw")]
        self.get(headers=auth)
        self.get(headers=auth)
        self.get("http://origin.test/b", headers=auth)
        self.get("http://origin.test/b", headers=auth)
        self.assertEqual(self.origin.counts["/a"], 2)
        self.assertEqual(self.origin.counts["/b"], 1)

    def test_storedNotServedToAuthorization(self) -> None:
        """
        A response stored from an anonymous request is not served to a
        request with Authorization when it lacks public, s-maxage and
        must-revalidate.
        """
        self.origin.setResponse("/a", b"x", headers={"Cache-Control": "max-age=60"})
        self.get()
        self.get(headers=[("Authorization", "Basic dTpw")])
        self.assertEqual(self.origin.counts["/a"], 2)

    def test_allowStoreFalse(self) -> None:
        """
        Access control's C{allowStore} refusal keeps the response out of
        the store.
        """
        self.access.store = False
        self.origin.setResponse("/a", b"x", headers={"Cache-Control": "max-age=60"})
        self.get()
        self.get()
        self.assertEqual(self.origin.counts["/a"], 2)

    def test_uncacheableStatus(self) -> None:
        """
        A 302 without explicit freshness is not heuristically cacheable,
        even with Last-Modified; with max-age it is stored.
        """
        self.origin.setResponse("/a", b"", status=302, headers={
            "Location": "http://origin.test/b", "Last-Modified": httpDate(NOW - 86400)})
        self.origin.setResponse("/b", b"", status=302, headers={
            "Location": "http://origin.test/c", "Cache-Control": "max-age=60"})
        for _ in range(2):
            self.get()
            self.get("http://origin.test/b")
        self.assertEqual(self.origin.counts["/a"], 2)
        self.assertEqual(self.origin.counts["/b"], 1)

    def test_notFoundWithMaxAgeStored(self) -> None:
        """
        A 404 with max-age is stored and served with its status.
        """
        self.origin.setResponse("/a", b"gone", status=404, headers={"Cache-Control": "max-age=60"})
        self.get()
        hit = self.get()
        self.assertEqual((hit.status, hit.body, hit.header("x-cache")), (404, b"gone", "HIT from proxy.test"))

    def test_partialContentNotStored(self) -> None:
        """
        A 206 is never stored.
        """
        self.origin.setResponse("/a", b"part", status=206, headers={
            "Cache-Control": "max-age=60", "Content-Range": "bytes 0-3/10"})
        self.get(headers=[("Range", "bytes=0-3")])
        self.get(headers=[("Range", "bytes=0-3")])
        self.assertEqual(self.origin.counts["/a"], 2)

    def test_viaAndXCache(self) -> None:
        """
        C{Via} with our name is added to the request sent upstream and
        appended to the response's own C{Via}.
        """
        self.origin.setResponse("/a", b"x", headers={"Cache-Control": "max-age=60", "Via": "1.1 upstream"})
        response = self.get(headers=[("Via", "1.0 client-proxy")])
        self.assertEqual(
            self.origin.requests[0].headers.getRawHeaders(b"via"),
            [b"1.0 client-proxy", b"1.1 proxy.test (icpmesh/0.1.0)"],
        )
        self.assertEqual(response.headers.getRawHeaders(b"via"),
                         [b"1.1 upstream", b"1.1 proxy.test (icpmesh/0.1.0)"])
        hit = self.get()
        self.assertEqual(hit.headers.getRawHeaders(b"via"),
                         [b"1.1 upstream", b"1.1 proxy.test (icpmesh/0.1.0)"])

    def test_hopByHopRemovedBothWays(self) -> None:
        """
        Hop-by-hop headers are not passed on in either direction, nor are
        the request headers named in Connection.  (Twisted's HTTP client
        consumes a response's Connection header before the proxy sees it,
        so headers it names in a response cannot be recognised.)
        """
        self.origin.setResponse("/a", b"x", headers=[
            ("Cache-Control", "max-age=60"), ("Keep-Alive", "timeout=5"),
            ("Proxy-Authenticate", "Basic"), ("Upgrade", "h2c"), ("X-End", "1")])
        response = self.get(headers=[
            ("Connection", "X-Hop-Up"), ("X-Hop-Up", "1"), ("Proxy-Authorization", "Basic x"),
            ("TE", "trailers"), ("Proxy-Connection", "keep-alive"), ("X-Keep", "1")])
        sent = self.origin.requests[0].headers
        for name in (b"x-hop-up", b"proxy-authorization", b"te", b"proxy-connection"):
            self.assertFalse(sent.hasHeader(name), name)
        self.assertTrue(sent.hasHeader(b"x-keep"))
        for name in (b"keep-alive", b"proxy-authenticate", b"upgrade"):
            self.assertFalse(response.headers.hasHeader(name), name)
        self.assertEqual(response.header("x-end"), "1")

    def test_endToEndHeaders(self) -> None:
        """
        L{endToEndHeaders} drops the fixed hop-by-hop set and the names in
        every Connection value, case-insensitively.
        """
        headers = Headers({b"Connection": [b"close, X-A", b"x-b"], b"X-A": [b"1"], b"X-B": [b"2"],
                           b"Upgrade": [b"h2c"], b"X-C": [b"3"]})
        self.assertEqual(endToEndHeaders(headers), [(b"x-c", [b"3"])])


class AccessTests(ProxyTestMixin, SynchronousTestCase):
    """
    Access control, malformed requests and limits.
    """

    def test_deniedHTTP(self) -> None:
        """
        A client that may not use the proxy gets 403 with an html page, and
        the origin sees nothing.
        """
        self.access.http = False
        response = self.get()
        self.assertEqual(response.status, 403)
        self.assertIn("text/html", response.header("content-type"))
        self.assertIn(b"403", response.body)
        self.assertEqual(self.origin.requests, [])
        self.assertIn("TCP_DENIED/403", self.logLines()[-1])

    def test_deniedMissButHitServed(self) -> None:
        """
        A client that may not cause misses gets 403 for a miss, but is
        served hits.
        """
        self.origin.setResponse("/a", b"x", headers={"Cache-Control": "max-age=60"})
        self.get()
        self.access.miss = False
        self.assertEqual(self.get().status, 200)
        self.assertEqual(self.get("http://origin.test/other").status, 403)
        self.assertEqual(self.origin.counts["/other"], 0)

    def test_originFormIs400(self) -> None:
        """
        A request with an origin-form target is not for a proxy: 400.
        """
        response = self.get(url="/a")
        self.assertEqual(response.status, 400)
        self.assertIn("text/html", response.header("content-type"))
        self.assertEqual(self.origin.requests, [])

    def test_badPortIs400(self) -> None:
        """
        An absolute URL whose port is not a number gets 400.
        """
        self.assertEqual(self.get(url="http://origin.test:xx/a").status, 400)

    def test_headerTooLarge(self) -> None:
        """
        A request whose header section exceeds the limit gets 431.
        """
        self.build(maxRequestHeaderSize=200)
        response = self.get(headers=[("X-Big", "x" * 300)])
        self.assertEqual(response.status, 431)
        self.assertEqual(self.origin.requests, [])

    def test_bodyTooLarge(self) -> None:
        """
        A request body over the limit gets 413; one within passes.
        """
        self.build(maxRequestBodySize=10)
        self.assertEqual(self.request("POST", body=b"x" * 11).response().status, 413)
        self.assertEqual(self.origin.requests, [])
        self.assertEqual(self.request("POST", body=b"x" * 10).response().status, 404)
        self.assertEqual(self.origin.requests[0].body, b"x" * 10)


class MethodTests(ProxyTestMixin, SynchronousTestCase):
    """
    Methods other than GET and HEAD, invalidation and Max-Forwards.
    """

    def setUp(self) -> None:
        super().setUp()
        self.origin.setResponse("/a", b"x", headers={"Cache-Control": "max-age=600"})
        self.origin.setResponse("/b", b"y", headers={"Cache-Control": "max-age=600"})

    def test_postPassesThroughAndInvalidates(self) -> None:
        """
        A POST is forwarded with its body, its response is not stored, and
        a successful POST invalidates the stored GET response for the URL.
        """
        self.get()
        self.origin.setResponse("/a", b"posted", headers={"Cache-Control": "max-age=600"})
        response = self.request("POST", body=b"form=1").response()
        self.assertEqual(response.body, b"posted")
        self.assertEqual(self.origin.requests[-1].method, "POST")
        self.assertEqual(self.origin.requests[-1].body, b"form=1")
        after = self.get()
        self.assertEqual(after.header("x-cache"), "MISS from proxy.test")
        self.assertEqual(after.body, b"posted")

    def test_failedPostDoesNotInvalidate(self) -> None:
        """
        An unsafe request answered with an error status leaves the store
        alone.
        """
        self.get()
        self.origin.setResponse("/a", b"no", status=500)
        self.request("PUT", body=b"z")
        self.origin.setResponse("/a", b"x", headers={"Cache-Control": "max-age=600"})
        self.assertEqual(self.get().header("x-cache"), "HIT from proxy.test")

    def test_invalidatesLocationSameOriginOnly(self) -> None:
        """
        A successful unsafe request also invalidates the same-origin URLs in
        Location and Content-Location, but not another origin's.
        """
        self.get()
        self.get("http://origin.test/b")
        self.get("http://other.test/b")
        self.origin.setResponse("/post", b"", status=201, headers=[
            ("Location", "/a"), ("Content-Location", "http://other.test/b")])
        self.request("POST", "http://origin.test/post", body=b"1")
        self.assertEqual(self.get().header("x-cache"), "MISS from proxy.test")
        self.assertEqual(self.get("http://other.test/b").header("x-cache"), "HIT from proxy.test")
        self.assertEqual(self.get("http://origin.test/b").header("x-cache"), "HIT from proxy.test")

    def test_deleteInvalidatesVariants(self) -> None:
        """
        Invalidation removes every stored variant of a URL.
        """
        self.origin.setResponse("/a", b"x", headers={"Cache-Control": "max-age=600", "Vary": "Accept"})
        self.get(headers=[("Accept", "a")])
        self.get(headers=[("Accept", "b")])
        self.request("DELETE")
        self.assertEqual(self.get(headers=[("Accept", "a")]).header("x-cache"), "MISS from proxy.test")
        self.assertEqual(self.get(headers=[("Accept", "b")]).header("x-cache"), "MISS from proxy.test")

    def test_varyChangeForgetsOldVariants(self) -> None:
        """
        When a URL's Vary changes, variants stored under the old names are
        not served any more, nor is a response stored before it varied.
        """
        self.origin.setResponse("/a", b"plain", headers={"Cache-Control": "max-age=600"})
        self.get()
        self.origin.setResponse("/a", b"x", headers={"Cache-Control": "max-age=600", "Vary": "Accept"})
        self.get(headers=[("Accept", "a"), ("Cache-Control", "no-cache")])
        self.assertIsNone(self.store.freshUntil(URL))
        self.get(headers=[("Accept", "b")])
        self.origin.setResponse("/a", b"y", headers={"Cache-Control": "max-age=600", "Vary": "X-Other"})
        self.get(headers=[("Accept", "a"), ("Cache-Control", "no-cache")])
        self.origin.setResponse("/a", b"x", headers={"Cache-Control": "max-age=600", "Vary": "Accept"})
        self.get(headers=[("Accept", "c"), ("Cache-Control", "no-cache")])
        self.assertEqual(self.get(headers=[("Accept", "b")]).header("x-cache"), "MISS from proxy.test")

    def test_maxForwardsZeroTrace(self) -> None:
        """
        TRACE with Max-Forwards: 0 is answered by the proxy with the request
        it received, as message/http.
        """
        response = self.request("TRACE", headers=[("Max-Forwards", "0"), ("X-Probe", "1")]).response()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("content-type"), "message/http")
        self.assertTrue(response.body.startswith(b"TRACE http://origin.test/a HTTP/1.1\r\n"))
        self.assertIn(b"X-Probe: 1", response.body)
        self.assertEqual(self.origin.requests, [])

    def test_maxForwardsZeroOptions(self) -> None:
        """
        OPTIONS with Max-Forwards: 0 is answered by the proxy with Allow.
        """
        response = self.request("OPTIONS", headers=[("Max-Forwards", "0")]).response()
        self.assertEqual(response.status, 200)
        self.assertIn("GET", response.header("allow"))
        self.assertEqual(self.origin.requests, [])

    def test_maxForwardsCountedDown(self) -> None:
        """
        A positive Max-Forwards is decremented on the forwarded request.
        """
        self.request("OPTIONS", headers=[("Max-Forwards", "3")])
        self.assertEqual(self.origin.requests[0].header("max-forwards"), "2")


class UpstreamFailureTests(ProxyTestMixin, SynchronousTestCase):
    """
    Routes, neighbours and failures on the way upstream.
    """

    def test_refusedIs502(self) -> None:
        """
        When the origin refuses the connection the client gets 502 with an
        html page, and the mesh hears of the failure.
        """
        self.upstream.refused.add(None)
        response = self.get()
        self.assertEqual(response.status, 502)
        self.assertIn(b"502", response.body)
        self.assertEqual(self.mesh.failed, [None])
        self.assertIn("TCP_MISS/502", self.logLines()[-1])

    def test_timeoutIs504(self) -> None:
        """
        A connection timeout gives 504.
        """
        self.build(upstream=ScriptedUpstream(fail(TwistedTimeoutError())))
        self.assertEqual(self.get().status, 504)

    def test_noRoutesIs503(self) -> None:
        """
        A selector that finds no route gives 503.
        """
        self.selector.routes = []
        self.assertEqual(self.get().status, 503)

    def test_neverDirectDropsDirectRoute(self) -> None:
        """
        With never_direct in force, a DIRECT route is not used.
        """
        self.access.direct = "never"
        self.assertEqual(self.get().status, 503)
        self.assertEqual(self.origin.requests, [])

    def test_alwaysDirectSkipsSelector(self) -> None:
        """
        With always_direct in force, the selector is not asked.
        """
        self.access.direct = "always"
        self.selector.routes = []
        self.origin.setResponse("/a", b"x")
        self.assertEqual(self.get().status, 200)
        self.assertEqual(self.selector.calls, [])

    def test_siblingOnlyIfCachedThenNext(self) -> None:
        """
        A route marked only-if-cached sends that directive to the neighbour
        as an absolute-URI proxy request; its 504 moves on to the next route.
        """
        sibling = FakeNeighbour("sib")
        self.mesh.neighbours = [sibling]
        sibOrigin = FakeOrigin(reactor=self.clock)
        sibOrigin.setResponse("/a", b"", status=504)
        self.neighbourResources[sibling] = sibOrigin
        self.selector.routes = [Route(sibling, "SIBLING_HIT", onlyIfCached=True), DIRECT]
        self.build()
        self.origin.setResponse("/a", b"direct", headers={"Cache-Control": "max-age=60"})
        response = self.get()
        self.assertEqual(response.body, b"direct")
        neighbour, method, url, headers = self.upstream.fetches[0]
        self.assertIs(neighbour, sibling)
        self.assertEqual(url, URL.encode())
        self.assertIn(b"only-if-cached", headers.getRawHeaders(b"cache-control")[0])
        self.assertEqual(self.upstream.fetches[1][0], None)
        self.assertEqual(self.selector.calls[0][1], [sibling])

    def test_neighbourNotAllowedNotOffered(self) -> None:
        """
        Neighbours access control refuses are not handed to the selector.
        """
        self.mesh.neighbours = [FakeNeighbour("sib")]
        self.access.neighbours = False
        self.get()
        self.assertEqual(self.selector.calls[0][1], [])

    def test_refusedNeighbourTriesNextRoute(self) -> None:
        """
        A neighbour that refuses the connection is reported to the mesh and
        the next route is tried.
        """
        parent = FakeNeighbour("parent", type="parent")
        self.mesh.neighbours = [parent]
        self.selector.routes = [Route(parent, "FIRST_PARENT_MISS"), DIRECT]
        self.upstream.refused.add(parent)
        self.origin.setResponse("/a", b"ok")
        self.assertEqual(self.get().body, b"ok")
        self.assertEqual(self.mesh.failed, [parent])

    def test_proxyOnlyNotStored(self) -> None:
        """
        A response fetched from a proxy-only neighbour is not stored.
        """
        parent = FakeNeighbour("parent", type="parent", proxyOnly=True)
        parentOrigin = FakeOrigin(reactor=self.clock)
        parentOrigin.setResponse("/a", b"p", headers={"Cache-Control": "max-age=60"})
        self.neighbourResources[parent] = parentOrigin
        self.mesh.neighbours = [parent]
        self.selector.routes = [Route(parent, "FIRST_PARENT_MISS")]
        self.build()
        self.get()
        self.get()
        self.assertEqual(parentOrigin.counts["/a"], 2)
        self.assertEqual(self.mesh.succeeded, [parent, parent])

    def test_parentResponseStored(self) -> None:
        """
        A response from an ordinary parent is stored, and the access log
        names the hierarchy code and the parent (with TIMEOUT_ when the ICP
        wait timed out).
        """
        parent = FakeNeighbour("parent", host="10.0.0.9", type="parent")
        parentOrigin = FakeOrigin(reactor=self.clock)
        parentOrigin.setResponse("/a", b"p", headers={"Cache-Control": "max-age=60"})
        self.neighbourResources[parent] = parentOrigin
        self.selector.routes = [Route(parent, "FIRST_PARENT_MISS", timedOut=True)]
        self.build()
        self.get()
        self.assertEqual(self.get().header("x-cache"), "HIT from proxy.test")
        self.assertIn("TIMEOUT_FIRST_PARENT_MISS/10.0.0.9", self.logLines()[0])

    def test_forwardingLoopGoesDirect(self) -> None:
        """
        A request that already passed through us (our name in Via) goes
        direct, without asking the selector.
        """
        self.origin.setResponse("/a", b"x")
        self.get(headers=[("Via", "1.1 proxy.test (icpmesh/0.1.0), 1.1 other")])
        self.assertEqual(self.selector.calls, [])
        self.assertEqual(self.origin.counts["/a"], 1)


class StreamingTests(ProxyTestMixin, SynchronousTestCase):
    """
    Streaming bodies: truncation, size limits, flow control.
    """

    def scripted(self, headers: Any = None, length: Any = None, code: int = 200) -> "ScriptedResponse":
        response = ScriptedResponse(code, headers or {b"cache-control": [b"max-age=60"]}, length)
        self.build(upstream=ScriptedUpstream(succeed(response)))
        return response

    def test_streamsBeforeBodyEnds(self) -> None:
        """
        Body bytes reach the client as they arrive, before the upstream
        body is complete.
        """
        response = self.scripted(length=10)
        client = self.request()
        response.deliver(b"hello")
        self.assertTrue(client.transport.value().endswith(b"hello"))
        self.assertFalse(client.response().complete)
        response.deliver(b"world")
        response.finish()
        self.assertEqual(client.response().body, b"helloworld")
        self.assertTrue(client.response().complete)

    def test_truncatedBodyNotStoredAndAborted(self) -> None:
        """
        When the upstream body breaks off, the object is not stored and the
        client's connection is aborted instead of the response being
        finished.
        """
        response = self.scripted(length=10)
        client = self.request()
        response.deliver(b"hello")
        response.fail()
        self.assertTrue(client.transport.disconnecting)
        self.assertFalse(client.response().complete)
        self.assertIsNone(self.store.freshUntil(URL))
        self.assertIn("TCP_MISS_ABORTED/200", self.logLines()[-1])

    def test_truncatedChunkedNotCompleted(self) -> None:
        """
        A body of unknown length that breaks off never gets the terminating
        chunk.
        """
        response = self.scripted(length=None)
        client = self.request()
        response.deliver(b"abc")
        response.fail()
        self.assertNotIn(b"0\r\n\r\n", client.transport.value())
        self.assertTrue(client.transport.disconnecting)

    def test_unknownLengthStoredWhenComplete(self) -> None:
        """
        A chunked body that ends properly is stored.
        """
        response = self.scripted(length=None)
        client = self.request()
        response.deliver(b"abc")
        response.finish()
        self.assertTrue(client.response().complete)
        self.assertIsNotNone(self.store.freshUntil(URL))

    def test_tooLargeStreamsUncached(self) -> None:
        """
        An object larger than the store's maximum object size is streamed
        to the client whole but not stored.
        """
        self.store = MemoryStore(reactor=self.clock, maxSize=1 << 20, maxObjectSize=8)
        response = self.scripted(length=12)
        client = self.request()
        response.deliver(b"123456")
        response.deliver(b"789012")
        response.finish()
        self.assertEqual(client.response().body, b"123456789012")
        self.assertIsNone(self.store.freshUntil(URL))

    def test_flowControl(self) -> None:
        """
        A client whose connection is full pauses the upstream body; it
        resumes when the client drains.
        """
        response = self.scripted(length=100)
        client = self.request()
        self.assertEqual(response.transport.producerState, "producing")
        client.transport.producer.pauseProducing()
        self.assertEqual(response.transport.producerState, "paused")
        client.transport.producer.resumeProducing()
        self.assertEqual(response.transport.producerState, "producing")

    def test_clientGoneStillStores(self) -> None:
        """
        If the client goes away mid-body, a storable object is still read
        to the end and stored.
        """
        response = self.scripted(length=6)
        client = self.request()
        response.deliver(b"abc")
        client.disconnect()
        self.assertEqual(response.transport.producerState, "producing")
        response.deliver(b"def")
        response.finish()
        self.assertIsNotNone(self.store.freshUntil(URL))

    def test_clientGoneUncacheableStops(self) -> None:
        """
        If the client goes away and nothing is being stored, the upstream
        body is stopped.
        """
        response = self.scripted(headers={b"cache-control": [b"no-store"]}, length=6)
        client = self.request()
        response.deliver(b"abc")
        client.disconnect()
        self.assertEqual(response.transport.producerState, "stopped")


class RevalidationTests(ProxyTestMixin, SynchronousTestCase):
    """
    RFC 9111 freshness details, revalidation and stale responses.
    """

    def test_heuristicFreshness(self) -> None:
        """
        Without explicit freshness, a 200 with Last-Modified is fresh for
        10% of its age.
        """
        self.origin.setResponse("/a", b"x", headers={"Last-Modified": httpDate(NOW - 1000)},
                                conditional=False)
        self.get()
        self.clock.advance(99)
        self.assertEqual(self.get().header("x-cache"), "HIT from proxy.test")
        self.clock.advance(2)
        self.assertEqual(self.get().header("x-cache"), "MISS from proxy.test")

    def test_heuristicCapped(self) -> None:
        """
        Heuristic freshness is capped at a day, however old the object.
        """
        self.origin.setResponse("/a", b"x", headers={"Last-Modified": httpDate(NOW - 400 * 86400)},
                                conditional=False)
        self.get()
        self.clock.advance(86400 + 1)
        self.assertEqual(self.get().header("x-cache"), "MISS from proxy.test")

    def test_revalidateWithETag(self) -> None:
        """
        A stale response with an ETag is revalidated with If-None-Match; a
        304 updates the stored headers and freshness and the stored body is
        served.
        """
        self.origin.setResponse("/a", b"body", headers={"Cache-Control": "max-age=10", "ETag": '"v1"'})
        self.get()
        self.clock.advance(20)
        self.origin.setResponse("/a", b"body", headers={
            "Cache-Control": "max-age=100", "ETag": '"v1"', "X-New": "yes"})
        response = self.get()
        self.assertEqual(self.origin.requests[-1].header("if-none-match"), '"v1"')
        self.assertEqual((response.status, response.body), (200, b"body"))
        self.assertEqual(response.header("x-new"), "yes")
        self.assertEqual(response.header("cache-control"), "max-age=100")
        self.assertIn("TCP_REFRESH_UNMODIFIED/200", self.logLines()[-1])
        self.clock.advance(50)
        self.assertEqual(self.get().header("x-cache"), "HIT from proxy.test")
        self.assertEqual(self.origin.counts["/a"], 2)

    def test_revalidateWithLastModified(self) -> None:
        """
        A stale response with only Last-Modified is revalidated with
        If-Modified-Since.
        """
        modified = httpDate(NOW - 5000)
        self.origin.setResponse("/a", b"body", headers={"Cache-Control": "max-age=10", "Last-Modified": modified})
        self.get()
        self.clock.advance(20)
        response = self.get()
        self.assertEqual(self.origin.requests[-1].header("if-modified-since"), modified)
        self.assertEqual(response.body, b"body")
        self.assertEqual(self.origin.counts["/a"], 2)

    def test_revalidationReplacedByNew(self) -> None:
        """
        A 200 to the conditional request replaces the stored response.
        """
        self.origin.setResponse("/a", b"old", headers={"Cache-Control": "max-age=10", "ETag": '"v1"'})
        self.get()
        self.clock.advance(20)
        self.origin.setResponse("/a", b"new", headers={"Cache-Control": "max-age=100", "ETag": '"v2"'})
        self.assertEqual(self.get().body, b"new")
        hit = self.get()
        self.assertEqual((hit.body, hit.header("x-cache")), (b"new", "HIT from proxy.test"))

    def test_responseNoCacheRevalidatedEveryTime(self) -> None:
        """
        A response with no-cache is stored but revalidated before every use.
        """
        self.origin.setResponse("/a", b"x", headers={"Cache-Control": "no-cache, max-age=600", "ETag": '"e"'})
        self.get()
        second = self.get()
        self.assertEqual(second.body, b"x")
        self.assertEqual(self.origin.counts["/a"], 2)
        self.assertEqual(self.origin.requests[-1].header("if-none-match"), '"e"')
        self.assertLessEqual(self.store.freshUntil(URL), self.clock.seconds())

    def test_requestNoCacheRevalidates(self) -> None:
        """
        A request with Cache-Control: no-cache (or Pragma: no-cache) does
        not get a stored response without revalidation.
        """
        self.origin.setResponse("/a", b"x", headers={"Cache-Control": "max-age=600", "ETag": '"e"'})
        self.get()
        self.get(headers=[("Cache-Control", "no-cache")])
        self.get(headers=[("Pragma", "no-cache")])
        self.assertEqual(self.origin.counts["/a"], 3)
        self.assertEqual(self.origin.requests[-1].header("if-none-match"), '"e"')

    def test_requestMaxAge(self) -> None:
        """
        A request's max-age refuses stored responses older than it.
        """
        self.origin.setResponse("/a", b"x", headers={"Cache-Control": "max-age=600"})
        self.get()
        self.clock.advance(30)
        self.assertEqual(self.get(headers=[("Cache-Control", "max-age=60")]).header("x-cache"),
                         "HIT from proxy.test")
        self.assertEqual(self.get(headers=[("Cache-Control", "max-age=10")]).header("x-cache"),
                         "MISS from proxy.test")

    def test_requestMinFresh(self) -> None:
        """
        A request's min-fresh refuses responses that will not stay fresh
        that long.
        """
        self.origin.setResponse("/a", b"x", headers={"Cache-Control": "max-age=100"})
        self.get()
        self.clock.advance(50)
        self.assertEqual(self.get(headers=[("Cache-Control", "min-fresh=40")]).header("x-cache"),
                         "HIT from proxy.test")
        self.assertEqual(self.get(headers=[("Cache-Control", "min-fresh=60")]).header("x-cache"),
                         "MISS from proxy.test")

    def test_requestMaxStale(self) -> None:
        """
        max-stale lets a client accept a stale response, within its limit.
        """
        self.origin.setResponse("/a", b"x", headers={"Cache-Control": "max-age=10"})
        self.get()
        self.clock.advance(30)
        self.assertEqual(self.get(headers=[("Cache-Control", "max-stale=30")]).header("x-cache"),
                         "HIT from proxy.test")
        self.assertEqual(self.get(headers=[("Cache-Control", "max-stale")]).header("x-cache"),
                         "HIT from proxy.test")
        self.assertEqual(self.get(headers=[("Cache-Control", "max-stale=5")]).header("x-cache"),
                         "MISS from proxy.test")

    def test_mustRevalidateIgnoresMaxStale(self) -> None:
        """
        must-revalidate, proxy-revalidate and s-maxage forbid serving a
        stale response even to a client that accepts stale ones.
        """
        for path, cc in (("/m", "max-age=10, must-revalidate"), ("/p", "max-age=10, proxy-revalidate"),
                         ("/s", "s-maxage=10")):
            self.origin.setResponse(path, b"x", headers={"Cache-Control": cc})
            self.get("http://origin.test" + path)
        self.clock.advance(30)
        for path in ("/m", "/p", "/s"):
            response = self.get("http://origin.test" + path, headers=[("Cache-Control", "max-stale")])
            self.assertEqual(response.header("x-cache"), "MISS from proxy.test", path)

    def test_onlyIfCached(self) -> None:
        """
        only-if-cached gets 504 when nothing usable is stored, and the
        stored response when there is one; the origin is never asked.
        """
        self.origin.setResponse("/a", b"x", headers={"Cache-Control": "max-age=60"})
        self.assertEqual(self.get(headers=[("Cache-Control", "only-if-cached")]).status, 504)
        self.assertEqual(self.origin.counts["/a"], 0)
        self.get()
        self.assertEqual(self.get(headers=[("Cache-Control", "only-if-cached")]).status, 200)
        self.clock.advance(100)
        self.assertEqual(self.get(headers=[("Cache-Control", "only-if-cached")]).status, 504)
        self.assertEqual(self.origin.counts["/a"], 1)

    def test_clientConditionalOnHit(self) -> None:
        """
        A conditional request that matches a fresh stored response is
        answered 304 from the store.
        """
        modified = httpDate(NOW - 100)
        self.origin.setResponse("/a", b"x", headers={
            "Cache-Control": "max-age=60", "ETag": 'W/"e"', "Last-Modified": modified})
        self.get()
        self.assertEqual(self.get(headers=[("If-None-Match", '"e"')]).status, 304)
        self.assertEqual(self.get(headers=[("If-None-Match", '"f"')]).status, 200)
        self.assertEqual(self.get(headers=[("If-Modified-Since", modified)]).status, 304)
        self.assertEqual(self.get(headers=[("If-Modified-Since", httpDate(NOW - 200))]).status, 200)
        self.assertEqual(self.origin.counts["/a"], 1)
        self.assertIn("TCP_IMS_HIT/304", self.logLines()[-2])

    def test_staleIfError(self) -> None:
        """
        When revalidation meets a server error, a stale response with
        stale-if-error is served within its window; after it the error is.
        """
        self.origin.setResponse("/a", b"old", headers={
            "Cache-Control": "max-age=10, stale-if-error=100", "ETag": '"e"'})
        self.get()
        self.clock.advance(50)
        self.origin.setResponse("/a", b"broken", status=500)
        response = self.get()
        self.assertEqual((response.status, response.body), (200, b"old"))
        self.assertIn("TCP_REFRESH_FAIL_OLD", self.logLines()[-1])
        self.clock.advance(100)
        self.assertEqual(self.get().status, 500)

    def test_serverErrorKeepsStaleObject(self) -> None:
        """
        A server error while revalidating is passed on, but does not remove
        the stale stored response.
        """
        self.origin.setResponse("/a", b"old", headers={"Cache-Control": "max-age=10", "ETag": '"e"'})
        self.get()
        self.clock.advance(50)
        self.origin.setResponse("/a", b"broken", status=503)
        self.assertEqual(self.get().status, 503)
        self.assertIsNotNone(self.store.freshUntil(URL))
        self.assertEqual(self.get(headers=[("Cache-Control", "max-stale")]).body, b"old")

    def test_staleIfErrorOnConnectFailure(self) -> None:
        """
        stale-if-error also covers an origin that cannot be reached.
        """
        self.origin.setResponse("/a", b"old", headers={"Cache-Control": "max-age=10, stale-if-error=100"})
        self.get()
        self.clock.advance(50)
        self.upstream.refused.add(None)
        self.assertEqual(self.get().body, b"old")

    def test_mustRevalidateFailureIs504(self) -> None:
        """
        A stale must-revalidate response whose origin cannot be reached is
        not served: the client gets 504.
        """
        self.origin.setResponse("/a", b"old", headers={"Cache-Control": "max-age=10, must-revalidate",
                                                        "ETag": '"e"'})
        self.get()
        self.clock.advance(50)
        self.upstream.refused.add(None)
        self.assertEqual(self.get().status, 504)

    def test_staleWhileRevalidate(self) -> None:
        """
        Within stale-while-revalidate the stale response is served at once
        and refreshed in the background.
        """
        self.origin.setResponse("/a", b"old", headers={
            "Cache-Control": "max-age=10, stale-while-revalidate=60"})
        self.get()
        self.clock.advance(20)
        self.origin.setResponse("/a", b"new", headers={"Cache-Control": "max-age=10"})
        stale = self.get()
        self.assertEqual(stale.body, b"old")
        self.assertEqual(self.origin.counts["/a"], 2)
        self.assertEqual(self.get().body, b"new")


class VaryTests(ProxyTestMixin, SynchronousTestCase):
    """
    Responses with Vary are stored per variant.
    """

    def test_varySecondaryKeys(self) -> None:
        """
        Each value of the header a response varies on gets its own stored
        response.
        """
        self.origin.setHandler("/a", lambda r: _response(
            (r.header("accept-language") or "none").encode(),
            **{"Cache-Control": "max-age=60", "Vary": "Accept-Language"}))
        en = [("Accept-Language", "en")]
        fr = [("Accept-Language", "fr")]
        self.assertEqual(self.get(headers=en).body, b"en")
        self.assertEqual(self.get(headers=fr).body, b"fr")
        hitEn = self.get(headers=en)
        hitFr = self.get(headers=fr)
        self.assertEqual((hitEn.body, hitEn.header("x-cache")), (b"en", "HIT from proxy.test"))
        self.assertEqual((hitFr.body, hitFr.header("x-cache")), (b"fr", "HIT from proxy.test"))
        self.assertEqual(self.get().body, b"none")
        self.assertEqual(self.origin.counts["/a"], 3)

    def test_varyWhitespaceNormalised(self) -> None:
        """
        Selecting header values that differ only in white space select the
        same stored response.
        """
        self.origin.setResponse("/a", b"x", headers={"Cache-Control": "max-age=60", "Vary": "Accept"})
        self.get(headers=[("Accept", "a,  b")])
        self.assertEqual(self.get(headers=[("Accept", "a, b")]).header("x-cache"), "HIT from proxy.test")

    def test_varyStarNotStored(self) -> None:
        """
        Vary: * can never match, so it is not stored.
        """
        self.origin.setResponse("/a", b"x", headers={"Cache-Control": "max-age=60", "Vary": "*"})
        self.get()
        self.get()
        self.assertEqual(self.origin.counts["/a"], 2)


class CollapsedForwardingTests(ProxyTestMixin, SynchronousTestCase):
    """
    Concurrent misses for one URL share one upstream fetch.
    """

    def test_concurrentMissesCollapse(self) -> None:
        """
        Three clients asking for the same URL while its fetch is under way
        cause one upstream request and all get the body.
        """
        self.origin.setResponse("/a", b"shared", headers={"Cache-Control": "max-age=60"})
        self.origin.hold("/a")
        clients = [self.request() for _ in range(3)]
        self.assertEqual(self.origin.counts["/a"], 1)
        self.origin.release("/a")
        self.flush()
        for client in clients:
            self.assertEqual(client.response().body, b"shared")
        self.assertEqual(self.origin.counts["/a"], 1)
        self.assertEqual(sum("TCP_CF_MISS/200" in line for line in self.logLines()), 2)

    def test_uncacheableNotShared(self) -> None:
        """
        If the shared fetch's response may not be stored (private), the
        waiting clients do not get it: each fetches for itself.
        """
        self.origin.setHandler("/a", lambda r: _response(
            r.header("x-user").encode(), **{"Cache-Control": "private"}))
        self.origin.hold("/a")
        first = self.request(headers=[("X-User", "alice")])
        second = self.request(headers=[("X-User", "bob")])
        self.origin.release("/a")
        self.flush()
        self.assertEqual(first.response().body, b"alice")
        self.assertEqual(second.response().body, b"bob")
        self.assertEqual(self.origin.counts["/a"], 2)
        self.assertFalse(any("TCP_CF_MISS" in line for line in self.logLines()))

    def test_otherVariantNotShared(self) -> None:
        """
        A waiting client that selects another variant of a Vary response
        fetches its own.
        """
        self.origin.setHandler("/a", lambda r: _response(
            r.header("accept").encode(), **{"Cache-Control": "max-age=60", "Vary": "Accept"}))
        self.origin.hold("/a")
        first = self.request(headers=[("Accept", "x")])
        same = self.request(headers=[("Accept", "x")])
        other = self.request(headers=[("Accept", "y")])
        self.origin.release("/a")
        self.flush()
        self.origin.release("/a")
        self.flush()
        self.assertEqual(first.response().body, b"x")
        self.assertEqual(same.response().body, b"x")
        self.assertEqual(other.response().body, b"y")
        self.assertEqual(self.origin.counts["/a"], 2)


class HopByHopResponseTests(ProxyTestMixin, SynchronousTestCase):
    """
    Response headers the origin lists in C{Connection} are for one hop.
    """

    HEADERS = [("Cache-Control", "max-age=60"), ("Connection", "a, B"), ("a", "1"), ("b", "2"), ("c", "3")]

    def test_connectionListedNotForwardedNorStored(self) -> None:
        """
        C{Connection: a, B} keeps C{a} and C{b} from the client and from
        the store (so from a later hit); C{c} goes through both times.
        """
        self.origin.setResponse("/a", b"hello", headers=self.HEADERS)
        for expected in ("MISS", "HIT"):
            response = self.get()
            self.assertTrue(response.header("x-cache").startswith(expected))
            self.assertEqual(response.body, b"hello")
            self.assertIsNone(response.header("a"))
            self.assertIsNone(response.header("b"))
            self.assertEqual(response.header("c"), "3")
        entry = self.successResultOf(self.store.get("http://origin.test/a"))
        self.assertEqual([v for k, v in entry.meta.headers if k in (b"a", b"b")], [])

    def test_throughNeighbour(self) -> None:
        """
        The same for a response fetched through a neighbour.
        """
        parent = FakeNeighbour("parent", type="parent")
        parentOrigin = FakeOrigin(reactor=self.clock)
        parentOrigin.setResponse("/a", b"p", headers=self.HEADERS)
        self.neighbourResources[parent] = parentOrigin
        self.mesh.neighbours = [parent]
        self.selector.routes = [Route(parent, "FIRST_PARENT_MISS")]
        self.build()
        response = self.get()
        self.assertEqual(response.body, b"p")
        self.assertIsNone(response.header("a"))
        self.assertEqual(response.header("c"), "3")


def splitInterim(data: bytes) -> tuple[list[tuple[int, list[bytes]]], bytes]:
    """
    The 1xx responses at the start of C{data}, each as C{(status, header
    lines)}, and the bytes after them.
    """
    interim = []
    while data.startswith(b"HTTP/1.1 1"):
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        interim.append((int(lines[0].split()[1]), lines[1:]))
    return interim, data


class InterimResponseTests(ProxyTestMixin, SynchronousTestCase):
    """
    1xx responses from upstream reach the client before the final one
    (RFC 9110 section 15.2), and are never stored.
    """

    LINK = "</s.css>; rel=preload; as=style"

    def setResponse(self, interim: Any) -> None:
        self.origin.setResponse("/a", b"final", headers={"Cache-Control": "max-age=60"}, interim=interim)

    def test_forwardedThenFinal(self) -> None:
        """
        A 102 and a 103 are forwarded in order, with their headers and our
        C{Via}, before the final response; the final response and a later
        hit carry no header of theirs and no interim response.
        """
        self.setResponse([(102, {}), (103, {"Link": self.LINK, "X-My-Header": "test"})])
        client = self.request()
        interim, rest = splitInterim(client.transport.value())
        self.assertEqual([code for code, _ in interim], [102, 103])
        self.assertIn(b"link: " + self.LINK.encode(), interim[1][1])
        self.assertIn(b"x-my-header: test", interim[1][1])
        self.assertTrue(all(any(line.startswith(b"via: 1.1 proxy.test") for line in lines)
                            for _, lines in interim))
        final = parseResponse(rest)
        self.assertEqual((final.status, final.body), (200, b"final"))
        self.assertIsNone(final.header("link"))
        self.assertIsNone(final.header("x-my-header"))
        hit = self.request()
        self.assertTrue(hit.transport.value().startswith(b"HTTP/1.1 200 "))
        self.assertIsNone(hit.response().header("x-my-header"))
        self.assertEqual(hit.response().header("x-cache"), "HIT from proxy.test")

    def test_sameConnectionAfterInterim(self) -> None:
        """
        The client's connection stays usable: a second request on it, after
        a response that had a 103, gets its own answer (a hit) after the
        first one.
        """
        self.setResponse([(103, {"Link": self.LINK})])
        client = self.request()
        client.send("GET", URL)
        self.flush()
        interim, rest = splitInterim(client.transport.value())
        self.assertEqual([c for c, _ in interim], [103])
        first = parseResponse(rest)
        self.assertEqual(first.body, b"final")
        second = parseResponse(rest[rest.index(b"final") + len(b"final"):])
        self.assertEqual((second.status, second.body, second.header("x-cache")),
                         (200, b"final", "HIT from proxy.test"))

    def test_interimBytesBounded(self) -> None:
        """
        An upstream sending 1xx after 1xx gets at most C{MAX_INTERIM_BYTES}
        of them passed on; the final response still arrives whole.
        """
        big = "x" * 1000
        self.setResponse([(103, {"Link": big})] * 100)
        client = self.request()
        interim, rest = splitInterim(client.transport.value())
        self.assertTrue(0 < len(interim) < 100)
        self.assertLessEqual(len(client.transport.value()) - len(rest), MAX_INTERIM_BYTES)
        self.assertEqual(parseResponse(rest).body, b"final")

    def test_notToHTTP10Client(self) -> None:
        """
        An HTTP/1.0 client gets only the final response (an HTTP/1.1
        client asking for the same, not stored, gets the 103 too).
        """
        self.origin.setResponse("/a", b"final", headers={"Cache-Control": "no-store"},
                                interim=[(103, {"Link": self.LINK})])
        client = Client(self.site)
        client.channel.dataReceived(b"GET " + URL.encode() + b" HTTP/1.0\r\nHost: origin.test\r\n\r\n")
        self.flush()
        self.assertTrue(client.transport.value().startswith(b"HTTP/1.0 200 "))
        self.assertEqual([c for c, _ in splitInterim(self.request().transport.value())[0]], [103])

    def test_continueNotForwarded(self) -> None:
        """
        An upstream C{100 Continue} is not passed on; a 103 after it is.
        """
        self.setResponse([(100, {}), (103, {"Link": self.LINK})])
        interim, rest = splitInterim(self.request().transport.value())
        self.assertEqual([c for c, _ in interim], [103])
        self.assertTrue(rest.startswith(b"HTTP/1.1 200 "))

    def test_onlyToLeader(self) -> None:
        """
        Of clients sharing one fetch, the one that started it gets the
        interim response; the ones that joined get only the final one.
        """
        self.setResponse([(103, {"Link": self.LINK})])
        self.origin.hold("/a")
        leader = self.request()
        follower = self.request()
        self.origin.release("/a")
        self.flush()
        self.assertEqual(self.origin.counts["/a"], 1)
        self.assertEqual([c for c, _ in splitInterim(leader.transport.value())[0]], [103])
        self.assertTrue(follower.transport.value().startswith(b"HTTP/1.1 200 "))
        self.assertEqual(follower.response().body, b"final")

    def test_controlCharactersCleaned(self) -> None:
        """
        Control characters inside an interim header value (a bare CR, a
        C{^A}) become spaces.
        """
        self.setResponse([(103, [("X-A", "1\r2\x01x")])])
        interim, _ = splitInterim(self.request().transport.value())
        self.assertIn(b"x-a: 1 2 x", interim[0][1])


class AccessLogIntegrationTests(ProxyTestMixin, SynchronousTestCase):
    """
    What the proxy writes to the access log.
    """

    def test_missAndHitLines(self) -> None:
        """
        A miss and a hit each give one Squid-format line with code, status,
        size, method, URL, hierarchy and content type.
        """
        self.origin.setResponse("/a", b"hello", headers={"Cache-Control": "max-age=60",
                                                          "Content-Type": "text/plain"})
        self.get()
        self.get()
        miss, hit = self.logLines()
        self.assertEqual(miss.split()[2:], ["127.0.0.1", "TCP_MISS/200", "5", "GET", URL, "-",
                                            "HIER_DIRECT/origin.test", "text/plain"])
        self.assertEqual(hit.split()[2:], ["127.0.0.1", "TCP_HIT/200", "5", "GET", URL, "-",
                                           "HIER_NONE/-", "text/plain"])


class UpstreamClassTests(SynchronousTestCase):
    """
    The default L{Upstream} connects where it should.
    """

    def test_directConnectsToOrigin(self) -> None:
        """
        A direct fetch connects to the URL's host and port.
        """
        reactor = MemoryReactorClock()
        upstream = Upstream(reactor)
        upstream.fetch(None, b"GET", b"http://127.0.0.1:8080/x", Headers(), None)
        self.assertEqual(reactor.tcpClients[0][1], 8080)

    def test_neighbourConnectsToProxyPort(self) -> None:
        """
        A fetch through a neighbour connects to the neighbour's HTTP port,
        with one agent per neighbour.
        """
        reactor = MemoryReactorClock()
        upstream = Upstream(reactor)
        neighbour = FakeNeighbour("n", host="127.0.0.2", httpPort=3129)
        upstream.fetch(neighbour, b"GET", b"http://origin.test/x", Headers(), None)
        self.assertIs(upstream.agentFor(neighbour), upstream.agentFor(neighbour))
        reactor.advance(0)
        self.assertEqual([c[1] for c in reactor.tcpClients], [3129])


class InterfaceTests(SynchronousTestCase):
    """
    The fakes used here provide the interfaces they stand in for.
    """

    def test_fakesProvideInterfaces(self) -> None:
        """
        L{FakeAccess} and L{FakeSelector} provide their interfaces.
        """
        self.assertTrue(verifyObject(IAccessControl, FakeAccess()))
        self.assertTrue(verifyObject(IPeerSelector, FakeSelector()))


# ---------------------------------------------------------------------------
# helpers


def _response(body: bytes, **headers: str) -> Any:
    from icpmesh.testing.origin import OriginResponse

    return OriginResponse(200, body, tuple(headers.items()))


class ScriptedTransport:
    """
    The upstream transport a body protocol sees; records producer calls.
    """

    def __init__(self) -> None:
        self.producerState = "producing"

    def pauseProducing(self) -> None:
        self.producerState = "paused"

    def resumeProducing(self) -> None:
        self.producerState = "producing"

    def stopProducing(self) -> None:
        self.producerState = "stopped"


class ScriptedResponse:
    """
    An L{IResponse} whose body the test delivers by hand.
    """

    version = (b"HTTP", 1, 1)
    phrase = b"OK"

    def __init__(self, code: int, headers: dict[bytes, list[bytes]], length: Any) -> None:
        from twisted.web.iweb import UNKNOWN_LENGTH

        self.code = code
        self.headers = Headers(headers)
        self.length = UNKNOWN_LENGTH if length is None else length
        self.transport = ScriptedTransport()
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def deliver(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def finish(self) -> None:
        self.protocol.connectionLost(Failure(ResponseDone()))

    def fail(self) -> None:
        self.protocol.connectionLost(Failure(ResponseFailed([Failure(ConnectionRefusedError())])))


class ScriptedUpstream:
    """
    An upstream whose every fetch gets the same Deferred result.
    """

    def __init__(self, result: Deferred[Any]) -> None:
        self.result = result
        self.fetches: list[tuple[Any, bytes, bytes]] = []

    def fetch(self, neighbour: Any, method: bytes, url: bytes, headers: Headers, body: Any) -> Deferred[Any]:
        self.fetches.append((neighbour, method, url))
        return self.result
