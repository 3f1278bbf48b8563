"""
Tests for L{icpmesh.caching}: the RFC 9111 rules as pure functions.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import datetimeToString

from icpmesh.caching import (
    HEURISTIC_MAX,
    cacheKey,
    correctedInitialAge,
    currentAge,
    deltaSeconds,
    freshnessLifetime,
    httpDate,
    ifNoneMatchMatches,
    invalidationTarget,
    mayStore,
    notModified,
    parseCacheControl,
    parseSurrogateControl,
    parseTargetedCacheControl,
    responseDirectives,
    targetedFreshness,
    updatedHeaders,
    varyKey,
    varyNames,
    weakMatch,
)

T = 1_700_000_000.0


def date(when: float) -> bytes:
    return datetimeToString(int(when))


class CacheKeyTests(SynchronousTestCase):
    """
    L{cacheKey}.
    """

    def test_normalises(self) -> None:
        """
        Scheme and host are lower-cased, default ports dropped, an empty
        path made C{/}, the fragment dropped; path and query kept as sent.
        """
        self.assertEqual(cacheKey("HTTP://Example.COM:80"), "http://example.com/")
        self.assertEqual(cacheKey("https://a.test:443/P?Q=1#frag"), "https://a.test/P?Q=1")
        self.assertEqual(cacheKey("http://a.test:8080/x"), "http://a.test:8080/x")

    def test_ipv6(self) -> None:
        """
        IPv6 hosts keep their brackets.
        """
        self.assertEqual(cacheKey("http://[::1]:80/x"), "http://[::1]/x")
        self.assertEqual(cacheKey("http://[::1]:81/x"), "http://[::1]:81/x")

    def test_unparseable(self) -> None:
        """
        A URL with a bad port is its own key rather than an error.
        """
        self.assertEqual(cacheKey("http://a.test:bad/x"), "http://a.test:bad/x")

    @given(st.text(max_size=60))
    def test_idempotent(self, text: str) -> None:
        """
        Any string gives a key without raising, and normalising a key again
        changes nothing.
        """
        url = "http://" + text
        key = cacheKey(url)
        self.assertEqual(cacheKey(key), key)


class CacheControlTests(SynchronousTestCase):
    """
    L{parseCacheControl} and L{deltaSeconds}.
    """

    def test_parse(self) -> None:
        """
        Directives are lower-cased, arguments unquoted, quoted commas kept,
        the first occurrence of a directive wins, values across header
        lines are combined.
        """
        self.assertEqual(
            parseCacheControl([b'Max-Age=60, no-cache="Set-Cookie, X", public', b"max-age=5, s-maxage=10"]),
            {"max-age": "60", "no-cache": "Set-Cookie, X", "public": None, "s-maxage": "10"},
        )

    def test_empty(self) -> None:
        """
        No header, or empty members, give no directives.
        """
        self.assertEqual(parseCacheControl(None), {})
        self.assertEqual(parseCacheControl([b" , ,"]), {})

    def test_deltaSeconds(self) -> None:
        """
        Only non-negative integers count; huge ones are capped at 2**31.
        """
        self.assertEqual(deltaSeconds("60"), 60)
        self.assertIsNone(deltaSeconds("-1"))
        self.assertIsNone(deltaSeconds("1.5"))
        self.assertIsNone(deltaSeconds(None))
        self.assertEqual(deltaSeconds("9" * 30), 2**31)

    @given(st.lists(st.binary(max_size=40), max_size=4))
    def test_neverRaises(self, values: list[bytes]) -> None:
        """
        Arbitrary header bytes parse without raising.
        """
        result = parseCacheControl(values)
        self.assertIsInstance(result, dict)

    def test_httpDate(self) -> None:
        """
        HTTP dates parse to timestamps; garbage gives C{None}.
        """
        self.assertEqual(httpDate(b"Sun, 06 Nov 1994 08:49:37 GMT"), 784111777.0)
        self.assertIsNone(httpDate(b"0"))
        self.assertIsNone(httpDate(None))


class MayStoreTests(SynchronousTestCase):
    """
    L{mayStore}: RFC 9111 section 3 for a shared cache.
    """

    def check(self, status: int = 200, req: str = "", resp: str = "", auth: bool = False,
              expires: bool = False, method: str = "GET") -> bool:
        return mayStore(method, status, parseCacheControl([req.encode()]), parseCacheControl([resp.encode()]),
                        auth, expires)

    def test_explicitFreshness(self) -> None:
        """
        max-age, s-maxage, Expires or public make any final status storable.
        """
        self.assertTrue(self.check(302, resp="max-age=60"))
        self.assertTrue(self.check(302, resp="s-maxage=60"))
        self.assertTrue(self.check(302, expires=True))
        self.assertTrue(self.check(302, resp="public"))
        self.assertFalse(self.check(302))

    def test_heuristicStatuses(self) -> None:
        """
        Heuristically cacheable statuses may be stored without explicit
        freshness; others may not.
        """
        for status in (200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501):
            self.assertTrue(self.check(status), status)
        for status in (201, 302, 303, 307, 400, 403, 500, 502, 503):
            self.assertFalse(self.check(status), status)

    def test_forbidden(self) -> None:
        """
        no-store on either side, private, 206, 304 and methods other than
        GET prevent storing.
        """
        self.assertFalse(self.check(resp="no-store, max-age=60"))
        self.assertFalse(self.check(req="no-store", resp="max-age=60"))
        self.assertFalse(self.check(resp="private, max-age=60"))
        self.assertFalse(self.check(206, resp="max-age=60"))
        self.assertFalse(self.check(304, resp="max-age=60"))
        self.assertFalse(self.check(resp="max-age=60", method="POST"))
        self.assertFalse(self.check(resp="max-age=60", method="HEAD"))

    def test_authorization(self) -> None:
        """
        With Authorization, only public, s-maxage or must-revalidate allow
        storing.
        """
        self.assertFalse(self.check(resp="max-age=60", auth=True))
        for cc in ("public", "s-maxage=5", "must-revalidate, max-age=5"):
            self.assertTrue(self.check(resp=cc, auth=True), cc)


class MustUnderstandTests(SynchronousTestCase):
    """
    C{must-understand} (RFC 9111 section 5.2.2.3) in L{mayStore}.
    """

    def check(self, status: int, resp: str) -> bool:
        return mayStore("GET", status, {}, parseCacheControl([resp.encode()]), False, False)

    def test_unknownStatusNotStored(self) -> None:
        """
        A status whose caching rules the cache does not implement is not
        stored with C{must-understand}, even with explicit freshness.
        """
        self.assertTrue(self.check(599, "max-age=3600"))
        self.assertFalse(self.check(599, "max-age=3600, must-understand"))

    def test_knownStatusIgnoresNoStore(self) -> None:
        """
        With a status the cache implements, C{must-understand} overrides a
        C{no-store} meant for older caches; without it C{no-store} holds.
        """
        self.assertFalse(self.check(200, "max-age=3600, no-store"))
        self.assertTrue(self.check(200, "max-age=3600, no-store, must-understand"))
        self.assertFalse(self.check(206, "max-age=3600, no-store, must-understand"))

    def test_privateStillWins(self) -> None:
        """
        C{must-understand} lifts C{no-store} only, never C{private}.
        """
        self.assertFalse(self.check(200, "max-age=3600, private, must-understand"))


class TargetedCacheControlTests(SynchronousTestCase):
    """
    L{parseTargetedCacheControl} and L{targetedFreshness}: RFC 9213's
    C{CDN-Cache-Control}.
    """

    def test_dictionary(self) -> None:
        """
        Valid Structured Field dictionaries give their members; strings keep
        their quotes; parameters are dropped; C{?0} members are left out.
        """
        parse = parseTargetedCacheControl
        self.assertEqual(parse([b"max-age=3600"]), {"max-age": "3600"})
        self.assertEqual(parse([b"foobar, max-age=3600"]), {"foobar": None, "max-age": "3600"})
        self.assertEqual(parse([b"no-store", b"private"]), {"no-store": None, "private": None})
        self.assertEqual(parse([b'max-age="10", a;x=1, b=?0, c=?1']), {"max-age": '"10"', "a": None, "c": None})
        self.assertEqual(parse([b'x="a,b", y=:YQ==:']), {"x": '"a,b"', "y": ":YQ==:"})

    def test_invalid(self) -> None:
        """
        Anything that is not a valid dictionary is ignored whole.
        """
        for value in (b"max-age=10000, &&&&&", b"MaX-aGe=3600", b"max-age =100", b"max-age= 100",
                      b"a,", b",a", b"a,,b", b'x="unterminated', b"(a b)", b""):
            self.assertIsNone(parseTargetedCacheControl([value]), value)
        self.assertIsNone(parseTargetedCacheControl([]))
        self.assertIsNone(parseTargetedCacheControl(None))

    def test_modes(self) -> None:
        """
        C{ignore} keeps C{Cache-Control}; C{restrictive} adds only what
        restricts and caps the lifetime; C{on} replaces it and C{Expires}.
        """
        cc = {"max-age": "3600"}
        cdn = {"no-store": None, "max-age": "5", "public": None}
        self.assertEqual(targetedFreshness(cc, cdn, "ignore"), (cc, None, False))
        self.assertEqual(targetedFreshness(cc, cdn, "restrictive"),
                         ({"max-age": "3600", "no-store": None}, 5, False))
        self.assertEqual(targetedFreshness(cc, cdn, "on"), (cdn, None, True))
        self.assertEqual(targetedFreshness(cc, None, "on"), (cc, None, False))
        self.assertEqual(targetedFreshness(cc, {"max-age": '"5"'}, "restrictive"), (cc, None, False))
        self.assertEqual(targetedFreshness(cc, {"s-maxage": "7", "max-age": "5"}, "restrictive")[1], 7)


class SurrogateControlTests(SynchronousTestCase):
    """
    L{parseSurrogateControl} and L{responseDirectives}.
    """

    def test_targetsLeftOut(self) -> None:
        """
        Directives aimed at a named device (C{;target}) are left out; the
        others are kept.
        """
        self.assertEqual(parseSurrogateControl([b"max-age=3600;other, no-store"]), {"no-store": None})
        self.assertIsNone(parseSurrogateControl([b"no-store;other"]))
        self.assertIsNone(parseSurrogateControl(None))

    def test_combined(self) -> None:
        """
        In C{restrictive} mode both fields restrict and the shorter cap
        wins; in C{on} mode a valid C{CDN-Cache-Control} comes first, else
        C{Surrogate-Control}; C{ignore} parses only C{Cache-Control}.
        """
        cc, cap, ignoreExpires = responseDirectives(
            [b"max-age=600"], [b"max-age=60"], [b"max-age=30, no-store"], "restrictive")
        self.assertEqual((cc, cap, ignoreExpires), ({"max-age": "600", "no-store": None}, 30, False))
        self.assertEqual(responseDirectives([b"no-store"], [b"max-age=60"], [b"max-age=30"], "on"),
                         ({"max-age": "60"}, None, True))
        self.assertEqual(responseDirectives([b"no-store"], [b"&&"], [b"max-age=30"], "on"),
                         ({"max-age": "30"}, None, True))
        self.assertEqual(responseDirectives([b"max-age=1"], [b"no-store"], [b"no-store"], "ignore"),
                         ({"max-age": "1"}, None, False))


class FreshnessTests(SynchronousTestCase):
    """
    L{freshnessLifetime}, L{correctedInitialAge}, L{currentAge}.
    """

    def test_precedence(self) -> None:
        """
        s-maxage, then max-age, then Expires minus Date.
        """
        cc = parseCacheControl([b"max-age=20, s-maxage=30"])
        self.assertEqual(freshnessLifetime(200, cc, T, date(T + 100), None, T), 30)
        cc = parseCacheControl([b"max-age=20"])
        self.assertEqual(freshnessLifetime(200, cc, T, date(T + 100), None, T), 20)
        self.assertEqual(freshnessLifetime(200, {}, T - 50, date(T + 100), None, T), 150)

    def test_expiresWithoutDate(self) -> None:
        """
        Without Date, Expires counts from the response time; a past or
        invalid Expires gives 0.
        """
        self.assertEqual(freshnessLifetime(200, {}, None, date(T + 60), None, T), 60)
        self.assertEqual(freshnessLifetime(200, {}, T, date(T - 60), None, T), 0)
        self.assertEqual(freshnessLifetime(200, {}, T, b"0", None, T), 0)

    def test_heuristic(self) -> None:
        """
        10% of the time since Last-Modified, capped, only for heuristically
        cacheable statuses (or public).
        """
        self.assertEqual(freshnessLifetime(200, {}, T, None, T - 1000, T), 100)
        self.assertEqual(freshnessLifetime(200, {}, T, None, T - 10**9, T), HEURISTIC_MAX)
        self.assertEqual(freshnessLifetime(302, {}, T, None, T - 1000, T), 0)
        self.assertEqual(freshnessLifetime(302, {"public": None}, T, None, T - 1000, T), 100)
        self.assertEqual(freshnessLifetime(200, {}, T, None, None, T), 0)

    def test_correctedInitialAge(self) -> None:
        """
        The larger of the apparent age and Age plus the response delay.
        """
        self.assertEqual(correctedInitialAge(None, T - 30, T, T + 2), 32)
        self.assertEqual(correctedInitialAge(b"100", T - 30, T, T + 2), 102)
        self.assertEqual(correctedInitialAge(b"junk", None, T, T + 2), 2)
        self.assertEqual(correctedInitialAge(None, T + 50, T, T), 0)

    def test_currentAge(self) -> None:
        """
        The corrected initial age plus the time since the response arrived.
        """
        self.assertEqual(currentAge(b"10", T, T, T, T + 5), 15)


class VaryTests(SynchronousTestCase):
    """
    L{varyNames} and L{varyKey}.
    """

    def test_names(self) -> None:
        """
        Names are lower-cased, sorted, deduplicated across lines; C{*}
        gives C{None}; no Vary gives an empty tuple.
        """
        self.assertEqual(varyNames([b"Accept-Encoding, accept", b"Accept"]), ("accept", "accept-encoding"))
        self.assertIsNone(varyNames([b"Accept, *"]))
        self.assertEqual(varyNames(None), ())

    def test_key(self) -> None:
        """
        Equivalent selecting headers give one key, different values or an
        absent header give others.
        """
        names = ("accept", "accept-language")
        a = varyKey("http://x/", names, {"accept": [b"a,  b"], "accept-language": [b"en"]})
        b = varyKey("http://x/", names, {"accept": [b"a, b"], "accept-language": [b"en"]})
        c = varyKey("http://x/", names, {"accept": [b"a, b"], "accept-language": [b"fr"]})
        d = varyKey("http://x/", names, {"accept": [b"a, b"]})
        e = varyKey("http://x/", names, {"accept": [b"a, b"], "accept-language": [b""]})
        self.assertEqual(a, b)
        self.assertEqual(len({a, c, d, e}), 4)
        self.assertTrue(a.startswith("http://x/"))


class ConditionalTests(SynchronousTestCase):
    """
    Entity-tag comparison and conditional requests answered from the cache.
    """

    def test_weakMatch(self) -> None:
        """
        Weak comparison ignores the W/ prefix.
        """
        self.assertTrue(weakMatch(b'W/"a"', b'"a"'))
        self.assertFalse(weakMatch(b'"a"', b'"b"'))

    def test_ifNoneMatch(self) -> None:
        """
        Any listed tag, or C{*}, matches.
        """
        self.assertTrue(ifNoneMatchMatches([b'"x", "a"'], b'"a"'))
        self.assertTrue(ifNoneMatchMatches([b"*"], None))
        self.assertFalse(ifNoneMatchMatches([b'"x"'], b'"a"'))
        self.assertFalse(ifNoneMatchMatches([b'"x"'], None))

    def test_notModified(self) -> None:
        """
        If-None-Match decides when present; otherwise If-Modified-Since is
        compared with Last-Modified, or with Date without it.
        """
        lm = date(T - 100)
        self.assertTrue(notModified([b'"a"'], date(T - 1000), b'"a"', lm, None))
        self.assertFalse(notModified([b'"b"'], date(T), b'"a"', lm, None))
        self.assertTrue(notModified(None, date(T - 100), None, lm, None))
        self.assertFalse(notModified(None, date(T - 101), None, lm, None))
        self.assertTrue(notModified(None, date(T), None, None, date(T - 5)))
        self.assertFalse(notModified(None, b"garbage", None, lm, None))
        self.assertFalse(notModified(None, None, None, lm, None))


class UpdateTests(SynchronousTestCase):
    """
    L{updatedHeaders} and L{invalidationTarget}.
    """

    def test_replaceByName(self) -> None:
        """
        Fields in the 304 replace every stored field of their name, in the
        stored position; new names are added; framing fields are kept.
        """
        stored = ((b"cache-control", b"max-age=1"), (b"x-a", b"1"), (b"x-a", b"2"),
                  (b"content-length", b"10"), (b"etag", b'"e"'))
        fresh = ((b"x-a", b"3"), (b"cache-control", b"max-age=9"), (b"content-length", b"0"),
                 (b"x-new", b"n"))
        self.assertEqual(
            updatedHeaders(stored, fresh),
            ((b"cache-control", b"max-age=9"), (b"x-a", b"3"), (b"content-length", b"10"),
             (b"etag", b'"e"'), (b"x-new", b"n")),
        )

    def test_contentMD5Kept(self) -> None:
        """
        C{Content-MD5} describes the stored bytes, so a 304 does not replace
        it; other fields are replaced.
        """
        stored = ((b"content-md5", b"old"), (b"x-a", b"1"))
        fresh = ((b"content-md5", b"new"), (b"x-a", b"2"))
        self.assertEqual(updatedHeaders(stored, fresh), ((b"content-md5", b"old"), (b"x-a", b"2")))

    def test_invalidationTarget(self) -> None:
        """
        Relative and absolute same-origin locations resolve; other origins,
        schemes or ports give C{None}.
        """
        base = "http://a.test/x/y"
        self.assertEqual(invalidationTarget(base, b"../z"), "http://a.test/z")
        self.assertEqual(invalidationTarget(base, b"http://A.test:80/q"), "http://A.test:80/q")
        self.assertIsNone(invalidationTarget(base, b"http://b.test/q"))
        self.assertIsNone(invalidationTarget(base, b"https://a.test/q"))
        self.assertIsNone(invalidationTarget(base, b"http://a.test:81/q"))


class StrictDateTests(SynchronousTestCase):
    """
    httpDate accepts exactly the three HTTP-date forms.
    """

    def test_forms(self) -> None:
        """
        IMF-fixdate, RFC 850 and asctime give the same instant; names are
        case-insensitive; anything else is None.
        """
        from icpmesh.caching import httpDate

        same = 784111777.0
        for good in (b"Sun, 06 Nov 1994 08:49:37 GMT", b"Sunday, 06-Nov-94 08:49:37 GMT",
                     b"Sun Nov  6 08:49:37 1994", b"sun, 06 NOV 1994 08:49:37 gmt"):
            self.assertEqual(httpDate(good), same, good)
        for bad in (b"Sun, 06 Nov 1994 08:49:37 AEST", b"06 Nov 1994", b"Sun, 6 Nov 1994 08:49:37 GMT",
                    b"Sun, 06 Nov 1994 25:49:37 GMT", b"Sun, 06 Foo 1994 08:49:37 GMT", b"", b"0", b"-1"):
            self.assertIsNone(httpDate(bad), bad)

    def test_ageFirstMember(self) -> None:
        """
        Only the first member of an Age list counts; an invalid one is
        ignored.
        """
        from icpmesh.caching import correctedInitialAge

        self.assertEqual(correctedInitialAge(b"30, 60", None, 0.0, 0.0), 30.0)
        self.assertEqual(correctedInitialAge(b"abc", None, 0.0, 0.0), 0.0)
