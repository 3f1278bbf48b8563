"""
Tests for L{icpmesh.server}: the ICP responder's decisions.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from icpmesh import icp
from icpmesh.caching import cacheKey
from icpmesh.server import FailureRatio, ICPResponder, urlProblem

CLIENT = ("10.0.0.2", 3130)
URL = "http://example.com/page"


class FakeStore:
    loading = False

    def __init__(self) -> None:
        self.fresh: dict[str, float] = {}

    def freshUntil(self, key: str) -> Optional[float]:
        return self.fresh.get(key)


class FakeAccess:
    def __init__(self, allowed: set[str] = {"10.0.0.2"}) -> None:
        self.allowed = allowed

    def allowICP(self, client: str, url: str) -> bool:
        return client in self.allowed


def decoded(data: Optional[bytes]) -> icp.Message:
    assert data is not None
    return icp.decode(data)


class ResponderTests(SynchronousTestCase):
    """
    The RFC 2187 5.2 decision order.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = FakeStore()
        self.logged: list[tuple[str, str, int, str]] = []
        self.responder = ICPResponder(
            self.store, FakeAccess(), reactor=self.clock,
            logQuery=lambda *a: self.logged.append(a),
        )

    def ask(self, url: str = URL, client: Any = CLIENT, reqnum: int = 42,
            options: int = 0, version: int = 2) -> Optional[bytes]:
        message = icp.Message(opcode=icp.Opcode.QUERY, reqnum=reqnum, url=url,
                              options=options, version=version)
        return self.responder.handleQuery(message, client)

    def test_miss(self) -> None:
        """
        An unknown URL is a MISS echoing request number and URL, version 2,
        no flags.
        """
        reply = decoded(self.ask())
        self.assertEqual((reply.opcode, reply.reqnum, reply.url, reply.version, reply.options),
                         (icp.Opcode.MISS, 42, URL, 2, 0))
        self.assertEqual(self.logged, [("10.0.0.2", "UDP_MISS", 20 + len(URL) + 1, URL)])

    def test_hitNeedsThirtySeconds(self) -> None:
        """
        HIT only when the object stays fresh for 30 more seconds.
        """
        self.store.fresh[cacheKey(URL)] = self.clock.seconds() + 31
        self.assertEqual(decoded(self.ask()).opcode, icp.Opcode.HIT)
        self.store.fresh[cacheKey(URL)] = self.clock.seconds() + 29
        self.assertEqual(decoded(self.ask()).opcode, icp.Opcode.MISS)

    def test_hitStale(self) -> None:
        """
        With hitStale, any stored object is a HIT.
        """
        self.responder.hitStale = True
        self.store.fresh[cacheKey(URL)] = self.clock.seconds() - 100
        self.assertEqual(decoded(self.ask()).opcode, icp.Opcode.HIT)

    def test_hitObjDeclinedAndSrcRttUnset(self) -> None:
        """
        A query asking for HIT_OBJ and SRC_RTT gets a plain HIT, flags 0.
        """
        self.store.fresh[cacheKey(URL)] = self.clock.seconds() + 3600
        reply = decoded(self.ask(options=icp.FLAG_HIT_OBJ | icp.FLAG_SRC_RTT))
        self.assertEqual((reply.opcode, reply.options, reply.optionData), (icp.Opcode.HIT, 0, 0))

    def test_v3AnsweredWithV2(self) -> None:
        """
        An ICPv3 query is answered with a version 2 message.
        """
        self.assertEqual(decoded(self.ask(version=3)).version, 2)

    def test_errForBadURLs(self) -> None:
        """
        Unparseable URLs get ERR, with whitespace %-escaped in the echo.
        """
        for url, echoed in [
            ("http://x/a b", "http://x/a%20b"),
            ("/relative", "/relative"),
            ("", ""),
            ("foo", "foo"),
            ("http://", "http://"),
            ("http://x/\x01", "http://x/%01"),
        ]:
            reply = decoded(self.ask(url))
            self.assertEqual((reply.opcode, reply.url), (icp.Opcode.ERR, echoed), url)
        long = "http://x/" + "a" * 8200
        self.assertEqual(decoded(self.ask(long)).opcode, icp.Opcode.ERR)
        spaces = "http://x/" + " " * 16000
        reply = decoded(self.ask(spaces))
        self.assertEqual((reply.opcode, reply.url), (icp.Opcode.ERR, ""))

    def test_errBeforeDenied(self) -> None:
        """
        A bad URL from a client that is not allowed still gets ERR.
        """
        self.assertEqual(decoded(self.ask("bad url", client=("8.8.8.8", 1))).opcode, icp.Opcode.ERR)

    def test_denied(self) -> None:
        """
        A client refused by access control gets DENIED.
        """
        reply = decoded(self.ask(client=("8.8.8.8", 3130)))
        self.assertEqual((reply.opcode, reply.reqnum), (icp.Opcode.DENIED, 42))

    def test_deniedCutoff(self) -> None:
        """
        After more than 100 replies of which more than 95% were DENIED, the
        client gets silence for the cutoff time, then answers again; other
        clients are unaffected.
        """
        bad = ("8.8.8.8", 3130)
        answers = [self.ask(client=bad) for _ in range(101)]
        self.assertTrue(all(a is not None for a in answers))
        self.assertIsNone(self.ask(client=bad))
        self.assertEqual(decoded(self.ask()).opcode, icp.Opcode.MISS)
        self.clock.advance(3599)
        self.assertIsNone(self.ask(client=bad))
        self.clock.advance(2)
        self.assertEqual(decoded(self.ask(client=bad)).opcode, icp.Opcode.DENIED)
        self.assertEqual(self.responder.counters["cutoffDropped"], 2)

    def test_mostlyAllowedNotCutOff(self) -> None:
        """
        A client with only 90% denied keeps getting answers.
        """
        access = FakeAccess()
        self.responder._allowICP = lambda c, u: access.allowICP(c, u)
        for i in range(300):
            access.allowed = {"10.0.0.2"} if i % 10 == 0 else set()
            self.assertIsNotNone(self.ask())

    def test_missNoFetchWhileLoading(self) -> None:
        """
        While the store loads, unknown URLs get MISS_NOFETCH; known fresh
        ones are still HITs.
        """
        self.store.loading = True
        self.assertEqual(decoded(self.ask()).opcode, icp.Opcode.MISS_NOFETCH)
        self.store.fresh[cacheKey(URL)] = self.clock.seconds() + 3600
        self.assertEqual(decoded(self.ask()).opcode, icp.Opcode.HIT)

    def test_hitOnlyMode(self) -> None:
        """
        In hit-only mode misses become MISS_NOFETCH.
        """
        self.responder.hitOnly = True
        self.assertEqual(decoded(self.ask()).opcode, icp.Opcode.MISS_NOFETCH)

    def test_failureRatio(self) -> None:
        """
        A run of failed fetches enters hit-only mode for five minutes.
        """
        ratio = FailureRatio(self.clock)
        self.responder.failureRatio = ratio
        for _ in range(19):
            ratio.noteFetch(False)
        self.assertEqual(decoded(self.ask()).opcode, icp.Opcode.MISS)
        ratio.noteFetch(False)
        self.assertEqual(decoded(self.ask()).opcode, icp.Opcode.MISS_NOFETCH)
        self.clock.advance(301)
        self.assertEqual(decoded(self.ask()).opcode, icp.Opcode.MISS)

    def test_failuresAmongSuccessesIgnored(self) -> None:
        """
        Failures mixed with many successes do not enter hit-only mode.
        """
        ratio = FailureRatio(self.clock)
        for _ in range(100):
            ratio.noteFetch(True)
            ratio.noteFetch(False)
        self.assertFalse(ratio.active())

    def test_clientTableBounded(self) -> None:
        """
        The per-client table for the cutoff never grows past its cap.
        """
        import icpmesh.server as server

        self.patch(server, "MAX_TRACKED_CLIENTS", 10)
        for i in range(50):
            self.ask(client=(f"10.1.0.{i}", 1))
        self.assertLessEqual(len(self.responder._clients), 10)


class ClientOnlyAccess(FakeAccess):
    """
    An access control that promises its ICP answer depends on the client
    address alone, and counts how often it is asked.
    """

    icpByClient = True

    def __init__(self, allowed: set[str] = {"10.0.0.2"}) -> None:
        FakeAccess.__init__(self, allowed)
        self.asked: list[str] = []

    def allowICP(self, client: str, url: str) -> bool:
        self.asked.append(client)
        return FakeAccess.allowICP(self, client, url)


class RawQueryTests(SynchronousTestCase):
    """
    L{ICPResponder.handleRawQuery}, the hot path, answers exactly as the
    decoded-message path does, while asking an address-only access control
    once per client and remembering only URLs worth remembering.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = FakeStore()
        self.access = ClientOnlyAccess()
        self.logged: list[tuple[str, str, int, str]] = []
        self.responder = ICPResponder(
            self.store, self.access, reactor=self.clock,
            logQuery=lambda *a: self.logged.append(a),
        )

    def raw(self, url: str = URL, client: Any = CLIENT, reqnum: int = 42,
            options: int = 0, version: int = 2) -> Optional[bytes]:
        message = icp.Message(opcode=icp.Opcode.QUERY, reqnum=reqnum, url=url,
                              options=options, version=version)
        return self.responder.handleRawQuery(icp.encode(message), client)

    def decodedAnswer(self, url: str = URL, client: Any = CLIENT, reqnum: int = 42,
                      options: int = 0, version: int = 2) -> Optional[bytes]:
        message = icp.Message(opcode=icp.Opcode.QUERY, reqnum=reqnum, url=url,
                              options=options, version=version)
        return self.responder.handleQuery(message, client)

    def test_sameBytesAsDecodedPath(self) -> None:
        """
        For every kind of answer, the raw path's reply and log line (on its
        short path: the decoded query before it has allowed the client) are
        those of the decoded path.
        """
        ratio = FailureRatio(self.clock)
        self.responder.failureRatio = ratio
        cases: list[tuple[str, Any]] = [
            ("miss", lambda: None),
            ("hit", lambda: self.store.fresh.__setitem__(URL, self.clock.seconds() + 60)),
            ("too little freshness", lambda: self.store.fresh.__setitem__(URL, self.clock.seconds() + 5)),
            ("loading", lambda: setattr(self.store, "loading", True)),
            ("hit only", lambda: setattr(self.responder, "hitOnly", True)),
            ("failure ratio", lambda: [ratio.noteFetch(False) for _ in range(20)]),
        ]
        for name, setup in cases:
            self.store.fresh.clear()
            self.store.loading = False
            self.responder.hitOnly = False
            ratio.hitOnlyUntil = 0.0
            setup()
            for reqnum, options, version in [(1, 0, 2), (0xFFFFFFFF, icp.FLAG_SRC_RTT, 3)]:
                del self.logged[:]
                expected = self.decodedAnswer(reqnum=reqnum, options=options, version=version)
                got = self.raw(reqnum=reqnum, options=options, version=version)
                self.assertEqual(got, expected, name)
                self.assertEqual(self.logged[0], self.logged[1], name)
        # Every raw query took the short path: access was asked only by
        # the decoded queries (answer always asks).
        self.assertEqual(len(self.access.asked), 2 * len(cases))
        ratio.hitOnlyUntil = 0.0
        self.assertEqual(
            [decoded(self.raw(u)).opcode for u in ("http://x/a b", "http://Example.com:80/a")],
            [icp.Opcode.ERR, icp.Opcode.MISS],
        )
        self.assertEqual(decoded(self.raw(client=("8.8.8.8", 1))).opcode, icp.Opcode.DENIED)

    def test_accessAskedOncePerAllowedClient(self) -> None:
        """
        With C{icpByClient}, an allowed client is checked once; a denied
        one on every query, so its DENIED cutoff still works.
        """
        for i in range(5):
            self.assertEqual(decoded(self.raw(f"http://a/{i}")).opcode, icp.Opcode.MISS)
            self.assertEqual(decoded(self.raw(client=("8.8.8.8", 1))).opcode, icp.Opcode.DENIED)
        self.assertEqual(self.access.asked.count("10.0.0.2"), 1)
        self.assertEqual(self.access.asked.count("8.8.8.8"), 5)
        for _ in range(97):
            self.raw(client=("8.8.8.8", 1))
        self.assertIsNone(self.raw(client=("8.8.8.8", 1)))

    def test_accessAskedEveryTimeWithoutPromise(self) -> None:
        """
        Without C{icpByClient}, access control is asked for every query.
        """
        self.access.icpByClient = False  # type: ignore[misc]
        self.responder = ICPResponder(self.store, self.access, reactor=self.clock)
        for i in range(3):
            self.raw(f"http://a/{i}")
        self.assertEqual(self.access.asked, ["10.0.0.2"] * 3)

    def test_allowedTableBounded(self) -> None:
        """
        The table of allowed clients never grows past its cap.
        """
        import icpmesh.server as server

        self.patch(server, "MAX_TRACKED_CLIENTS", 10)
        self.access.allowed = {f"10.1.0.{i}" for i in range(50)}
        for i in range(50):
            self.raw(client=(f"10.1.0.{i}", 1))
            self.raw(client=(f"10.1.0.{i}", 1))
        self.assertLessEqual(len(self.responder._allowed), 10)

    def test_plainMissesNotRemembered(self) -> None:
        """
        Never-seen plain URLs that the store does not hold are not added
        to the URL table; stored ones and URLs that needed the general
        rules are.
        """
        self.raw()  # the first query from the client: the general path
        self.store.fresh["http://a/stored"] = self.clock.seconds() + 60
        for url in ["http://a/new1", "http://a/new2", "http://a/stored", "http://A/x", "bad url"]:
            self.raw(url)
        self.assertEqual(
            sorted(self.responder._urls),
            [b"bad url", b"http://A/x", b"http://a/stored"],
        )
        self.assertEqual(decoded(self.raw("http://a/stored")).opcode, icp.Opcode.HIT)


class URLProblemTests(SynchronousTestCase):
    """
    L{urlProblem}.
    """

    def test_good(self) -> None:
        """
        Absolute URLs of any scheme with a host are fine.
        """
        for url in ["http://a/", "https://a.b:8443/x?y", "ftp://h/f", "http://[::1]:80/", "http://u@h/"]:
            self.assertIsNone(urlProblem(url), url)


class LearnURLTests(SynchronousTestCase):
    """
    The responder's table of URLs seen: its shortcut for plain http URLs
    must give the same validity and the same cache key as the general
    rules (L{urlProblem}, L{cacheKey}).
    """

    def setUp(self) -> None:
        self.responder = ICPResponder(FakeStore(), FakeAccess(), reactor=Clock())

    def check(self, url: bytes) -> None:
        learned, key = self.responder._learnURL(url)
        if urlProblem(url) is None:
            text = url.decode("ascii")
            self.assertEqual((learned, key), (text, cacheKey(text)), url)
        else:
            self.assertIsNone(key, url)

    def test_examples(self) -> None:
        """
        Hand-picked URLs on both sides of the shortcut: normal ones, and
        ones whose host part needs normalising (case, default port, user
        info, IPv6, no path), fragments and other schemes.
        """
        for url in [
            b"http://www.example.com/a", b"http://127.0.0.1:8080/x?y=1", b"http://Example.com/a",
            b"http://example.com:80/a", b"http://u@example.com/a", b"http://[::1]:80/a",
            b"http://example.com", b"http://example.com/a#frag", b"https://example.com:443/a",
            b"ftp://example.com/f", b"http:///a", b"http://", b"http://x/a b", b"",
            b"http://example.com:8080:80/a", b"http://a-b.example/?q#",
        ]:
            self.check(url)

    def test_property(self) -> None:
        """
        For generated URLs over an alphabet that reaches every branch, the
        table agrees with L{urlProblem} and L{cacheKey}.
        """
        from hypothesis import given, settings, strategies as st

        @settings(max_examples=1000, deadline=None)
        @given(
            st.sampled_from([b"http://", b"https://", b"HTTP://", b"ftp://", b"http:/", b""]),
            st.lists(st.sampled_from(["a", "Z", ":80", ":8080", "-", "@", "[::1]", "%", "#", " "]),
                     max_size=4).map(lambda parts: "".join(parts).encode("latin-1")),
            st.sampled_from([b"/", b""]),
            st.lists(st.sampled_from(["/", "a", "?", "#", ":", "@", " ", "\x7f"]),
                     max_size=4).map(lambda parts: "".join(parts).encode("latin-1")),
        )
        def agree(scheme: bytes, authority: bytes, slash: bytes, rest: bytes) -> None:
            self.responder._urls.clear()
            self.check(scheme + authority + slash + rest)

        agree()
