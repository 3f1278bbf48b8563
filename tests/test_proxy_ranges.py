"""
Tests for byte ranges in L{icpmesh.proxy}: C{Range} requests answered from
stored complete responses (206, 416, or the whole 200), C{If-Range}, and
C{Range} requests that miss or revalidate.  The same in-memory setup as
C{tests.test_proxy}; the disk-store tests run on the real reactor because
that store reads in threads.
"""

from __future__ import annotations

import os
from typing import Any, Generator, Sequence

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site

from icpmesh.proxy import CachingProxyResource
from icpmesh.storage.disk import SMALL_OBJECT, DiskStore
from icpmesh.testing.origin import OriginResponse
from icpmesh.testing.store import makeBody, makeMeta
from tests.test_proxy import (
    NOW,
    URL,
    Client,
    FakeAccess,
    FakeMesh,
    FakeSelector,
    Parsed,
    ProxyTestMixin,
    httpDate,
)

BODY = b"0123456789A"


class RangeHitTests(ProxyTestMixin, SynchronousTestCase):
    """
    A GET with C{Range} on a fresh stored complete 200.
    """

    def setUp(self) -> None:
        super().setUp()
        self.origin.setResponse("/a", BODY, headers={
            "Cache-Control": "max-age=3600", "ETag": '"v1"', "A": "1",
            "Content-Type": "text/plain", "Last-Modified": httpDate(NOW - 100),
        })
        self.get()

    def ranged(self, value: str, extra: Sequence[tuple[str, str]] = (), method: str = "GET") -> Parsed:
        return self.get(headers=[("Range", value), *extra], method=method)

    def test_firstTwoBytes(self) -> None:
        """
        C{bytes=0-1} is answered from the store with 206, C{Content-Range},
        the range's C{Content-Length} and exactly those bytes, without asking
        the origin; the stored headers, C{Age}, C{Via} and C{X-Cache} are
        on it; the access log says C{TCP_HIT/206} and the bytes sent.
        """
        self.clock.advance(7)
        response = self.ranged("bytes=0-1")
        self.assertEqual((response.status, response.body, response.complete), (206, b"01", True))
        self.assertEqual(response.header("content-range"), "bytes 0-1/11")
        self.assertEqual(response.header("content-length"), "2")
        self.assertEqual(response.header("etag"), '"v1"')
        self.assertEqual(response.header("a"), "1")
        self.assertEqual(response.header("cache-control"), "max-age=3600")
        self.assertEqual(response.header("content-type"), "text/plain")
        self.assertEqual(response.header("age"), "7")
        self.assertEqual(response.header("x-cache"), "HIT from proxy.test")
        self.assertIn("proxy.test", response.header("via") or "")
        self.assertEqual(self.origin.counts["/a"], 1)
        self.assertEqual(self.logLines()[-1].split()[3:5], ["TCP_HIT/206", "2"])

    def test_openEnded(self) -> None:
        """
        C{bytes=1-} runs to the end.
        """
        response = self.ranged("bytes=1-")
        self.assertEqual((response.status, response.body), (206, BODY[1:]))
        self.assertEqual(response.header("content-range"), "bytes 1-10/11")

    def test_suffix(self) -> None:
        """
        C{bytes=-1} is the last byte.
        """
        response = self.ranged("bytes=-1")
        self.assertEqual((response.status, response.body), (206, b"A"))
        self.assertEqual(response.header("content-range"), "bytes 10-10/11")

    def test_lastClamped(self) -> None:
        """
        A last position past the end is clamped.
        """
        response = self.ranged("bytes=9-1000")
        self.assertEqual((response.status, response.body), (206, b"9A"))
        self.assertEqual(response.header("content-range"), "bytes 9-10/11")

    def test_unsatisfiable(self) -> None:
        """
        A range starting past the end gets 416 with C{Content-Range: bytes
        */11} and no body; C{bytes=-0} too.
        """
        for value in ("bytes=11-", "bytes=-0"):
            response = self.ranged(value)
            self.assertEqual((response.status, response.body, response.complete), (416, b"", True))
            self.assertEqual(response.header("content-range"), "bytes */11")
            self.assertEqual(response.header("content-length"), "0")
            self.assertIsNone(response.header("content-type"))
            self.assertEqual(response.header("x-cache"), "HIT from proxy.test")
            self.assertEqual(self.logLines()[-1].split()[3:5], ["TCP_HIT/416", "0"])
        self.assertEqual(self.origin.counts["/a"], 1)

    def test_ignoredRangesGetWholeBody(self) -> None:
        """
        Several ranges, another unit, a malformed or an inverted range: the
        whole stored 200.
        """
        for value in ("bytes=0-1,3-4", "items=0-1", "bytes=a-b", "bytes=5-2"):
            response = self.ranged(value)
            self.assertEqual((response.status, response.body), (200, BODY), value)
            self.assertEqual(response.header("content-length"), "11")
            self.assertIsNone(response.header("content-range"))
        self.assertEqual(self.origin.counts["/a"], 1)

    def test_headIgnoresRange(self) -> None:
        """
        HEAD has no range semantics (RFC 9110 section 14.2): the whole
        response's headers, 200.
        """
        response = self.ranged("bytes=0-1", method="HEAD")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("content-length"), "11")
        self.assertIsNone(response.header("content-range"))

    def test_ifRangeETag(self) -> None:
        """
        C{If-Range} with the stored strong ETag gets the range; another
        ETag, or a weak one, gets the whole 200, even for a range that
        could not be satisfied.
        """
        self.assertEqual(self.ranged("bytes=0-1", [("If-Range", '"v1"')]).status, 206)
        for value in ('"v2"', 'W/"v1"'):
            response = self.ranged("bytes=0-1", [("If-Range", value)])
            self.assertEqual((response.status, response.body), (200, BODY), value)
        response = self.ranged("bytes=20-", [("If-Range", '"v2"')])
        self.assertEqual((response.status, response.body), (200, BODY))

    def test_ifRangeDate(self) -> None:
        """
        C{If-Range} with the stored C{Last-Modified}, which is 100 s before
        the stored C{Date} (a strong validator), gets the range; another
        date gets the whole 200.
        """
        matching = self.ranged("bytes=0-1", [("If-Range", httpDate(NOW - 100))])
        self.assertEqual(matching.status, 206)
        other = self.ranged("bytes=0-1", [("If-Range", httpDate(NOW - 200))])
        self.assertEqual(other.status, 200)

    def test_conditionalFirst(self) -> None:
        """
        A matching C{If-None-Match} wins over C{Range}: 304.
        """
        response = self.ranged("bytes=0-1", [("If-None-Match", '"v1"')])
        self.assertEqual(response.status, 304)
        self.assertIsNone(response.header("content-range"))

    def test_notModifiedIfNoneMatchThenRange(self) -> None:
        """
        A non-matching C{If-None-Match} with C{Range}: the range.
        """
        response = self.ranged("bytes=2-3", [("If-None-Match", '"v0"')])
        self.assertEqual((response.status, response.body), (206, b"23"))


class RangeOtherTests(ProxyTestMixin, SynchronousTestCase):
    """
    C{Range} on other stored statuses, misses and revalidations.
    """

    def test_storedNon200IgnoresRange(self) -> None:
        """
        A stored 404 is sent whole: ranges apply to 200s only.
        """
        self.origin.setResponse("/a", b"gone", status=404, headers={"Cache-Control": "max-age=60"})
        self.get()
        response = self.get(headers=[("Range", "bytes=0-1")])
        self.assertEqual((response.status, response.body), (404, b"gone"))
        self.assertEqual(self.origin.counts["/a"], 1)

    def test_emptyBody(self) -> None:
        """
        Nothing of a stored empty body can be selected: 416 C{bytes */0}.
        """
        self.origin.setResponse("/a", b"", headers={"Cache-Control": "max-age=60"})
        self.get()
        response = self.get(headers=[("Range", "bytes=0-0")])
        self.assertEqual(response.status, 416)
        self.assertEqual(response.header("content-range"), "bytes */0")

    def test_emptyBodySuffix(self) -> None:
        """
        A non-zero suffix range of a stored empty body is satisfiable but
        cannot be written as a 206: the whole (empty) 200 answers it.
        """
        self.origin.setResponse("/a", b"", headers={"Cache-Control": "max-age=60"})
        self.get()
        response = self.get(headers=[("Range", "bytes=-5")])
        self.assertEqual((response.status, response.body), (200, b""))

    def test_wholeContentDigestsDropped(self) -> None:
        """
        C{Content-MD5} and C{Content-Digest} describe the whole body, so the
        206 and the 416 built from the store leave them out; the whole 200
        keeps them.
        """
        self.origin.setResponse("/a", b"0123456789", headers={
            "Cache-Control": "max-age=60", "Content-MD5": "whole==", "Content-Digest": "sha-256=:x=:"})
        self.get()
        for header, status in (("bytes=0-1", 206), ("bytes=50-", 416)):
            response = self.get(headers=[("Range", header)])
            self.assertEqual(response.status, status)
            self.assertIsNone(response.header("content-md5"))
            self.assertIsNone(response.header("content-digest"))
        self.assertEqual(self.get().header("content-md5"), "whole==")

    def test_acceptRangesNone(self) -> None:
        """
        A stored response whose origin said C{Accept-Ranges: none} is sent
        whole.
        """
        self.origin.setResponse("/a", b"0123456789", headers={
            "Cache-Control": "max-age=60", "Accept-Ranges": "none"})
        self.get()
        response = self.get(headers=[("Range", "bytes=0-1")])
        self.assertEqual((response.status, response.body), (200, b"0123456789"))

    def test_missForwardedPartialNotStored(self) -> None:
        """
        A C{Range} request that misses is forwarded with its C{Range}; the
        origin's 206 reaches the client as it is (logged C{TCP_MISS/206})
        and is not stored: a later plain GET goes to the origin and gets a
        complete 200.
        """
        def handler(received: Any) -> OriginResponse:
            if received.header("range") == "bytes=0-1":
                return OriginResponse(206, b"01", (("Cache-Control", "max-age=60"),
                                                   ("Content-Range", "bytes 0-1/11")))
            return OriginResponse(200, BODY, (("Cache-Control", "max-age=60"),))

        self.origin.setHandler("/a", handler)
        partial = self.get(headers=[("Range", "bytes=0-1")])
        self.assertEqual((partial.status, partial.body), (206, b"01"))
        self.assertEqual(partial.header("content-range"), "bytes 0-1/11")
        self.assertEqual(partial.header("x-cache"), "MISS from proxy.test")
        self.assertEqual(self.origin.requests[-1].header("range"), "bytes=0-1")
        self.assertEqual(self.logLines()[-1].split()[3:5], ["TCP_MISS/206", "2"])
        full = self.get()
        self.assertEqual((full.status, full.body), (200, BODY))
        self.assertEqual(self.origin.counts["/a"], 2)
        # Now it is stored whole, and ranges come from the store.
        self.assertEqual(self.get(headers=[("Range", "bytes=0-1")]).header("x-cache"),
                         "HIT from proxy.test")
        self.assertEqual(self.origin.counts["/a"], 2)

    def test_revalidationKeepsIfRange(self) -> None:
        """
        A stale stored response revalidated for a C{Range} request: the
        origin gets our C{If-None-Match} with the client's C{Range} and
        C{If-Range}; its 304 refreshes the stored response and the range is
        served from it (C{TCP_REFRESH_UNMODIFIED/206}).
        """
        self.origin.setResponse("/a", BODY, headers={"Cache-Control": "max-age=10", "ETag": '"v1"'})
        self.get()
        self.clock.advance(20)
        response = self.get(headers=[("Range", "bytes=3-4"), ("If-Range", '"v1"')])
        sent = self.origin.requests[-1]
        self.assertEqual(
            (sent.header("if-none-match"), sent.header("range"), sent.header("if-range")),
            ('"v1"', "bytes=3-4", '"v1"'),
        )
        self.assertEqual((response.status, response.body), (206, b"34"))
        self.assertEqual(response.header("content-range"), "bytes 3-4/11")
        self.assertEqual(self.logLines()[-1].split()[3:5], ["TCP_REFRESH_UNMODIFIED/206", "2"])

    def test_backgroundRevalidationFetchesWhole(self) -> None:
        """
        A C{Range} hit within C{stale-while-revalidate} is served from the
        stale response, and the background revalidation asks for the whole
        response (no C{Range}), so a changed one replaces the stored one.
        """
        self.origin.setResponse("/a", b"old-body", headers={
            "Cache-Control": "max-age=10, stale-while-revalidate=60"})
        self.get()
        self.clock.advance(20)
        self.origin.setResponse("/a", b"new-body", headers={"Cache-Control": "max-age=10"})
        stale = self.get(headers=[("Range", "bytes=0-2")])
        self.assertEqual((stale.status, stale.body), (206, b"old"))
        self.assertIsNone(self.origin.requests[-1].header("range"))
        fresh = self.get(headers=[("Range", "bytes=4-")])
        self.assertEqual((fresh.status, fresh.body), (206, b"body"))
        self.assertEqual(self.get().body, b"new-body")
        self.assertEqual(self.origin.counts["/a"], 2)


class DiskRangeTests(TestCase):
    """
    Ranges of objects in a L{DiskStore}: a small body (read whole by
    C{get}) and a large one (streamed from the file), through the proxy's
    hit path.
    """

    @inlineCallbacks
    def setUp(self) -> Generator[Deferred[Any], Any, None]:
        self.store = DiskStore(self.mktemp(), fsync=False)
        self.store.startService()
        self.addCleanup(self.store.stopService)
        yield self.store.whenLoaded()
        self.clock = MemoryReactorClock()
        self.clock.advance(NOW)
        proxy = CachingProxyResource(
            self.store, FakeAccess(), FakeSelector(), FakeMesh(), "proxy.test",
            reactor=self.clock, upstream=object(),
        )
        self.site = Site(proxy, reactor=self.clock)

    @inlineCallbacks
    def stored(self, key: str, body: bytes) -> Generator[Deferred[Any], Any, None]:
        meta = makeMeta(freshUntil=NOW + 3600, size=len(body), headers=(
            (b"cache-control", b"max-age=3600"), (b"etag", b'"d"')))
        writer = self.store.begin(key, meta)
        writer.write(body)
        yield writer.finish()

    @inlineCallbacks
    def fetch(self, url: str, value: str) -> Generator[Deferred[Any], Any, Parsed]:
        client = Client(self.site)
        client.send("GET", url, [("Range", value)])
        for _ in range(3000):  # a bound on the wait, not a timing check
            if b"\r\n\r\n" in client.transport.value():
                response = client.response()
                if response.complete:
                    return response
            yield deferLater(reactor, 0.01, lambda: None)
        self.fail("no complete response")

    @inlineCallbacks
    def test_smallAndLargeBodies(self) -> Generator[Deferred[Any], Any, None]:
        """
        Ranges of a body below and above L{SMALL_OBJECT} come back exact,
        across the 256 KiB read chunks, with their C{Content-Range}.
        """
        small = makeBody(1000, seed=11)
        large = makeBody(4 * SMALL_OBJECT + 12345, seed=12)
        yield self.stored("http://origin.test/small", small)
        yield self.stored("http://origin.test/large", large)
        response = yield self.fetch("http://origin.test/small", "bytes=10-19")
        self.assertEqual((response.status, response.body), (206, small[10:20]))
        self.assertEqual(response.header("content-range"), "bytes 10-19/1000")
        first, last = 70_000, 262_144 + 5
        response = yield self.fetch("http://origin.test/large", f"bytes={first}-{last}")
        self.assertEqual(response.status, 206)
        self.assertEqual(response.header("content-range"), f"bytes {first}-{last}/{len(large)}")
        self.assertTrue(response.body == large[first : last + 1], "body differs")
        response = yield self.fetch("http://origin.test/large", "bytes=-7")
        self.assertEqual((response.status, response.body), (206, large[-7:]))
        self.assertTrue(os.path.isdir(self.store.path))
