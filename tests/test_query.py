"""
Tests for L{icpmesh.query}, the C{icpmesh-query} diagnostic client.
"""

from __future__ import annotations

import io
import json
import socket
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import FakeDatagramTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from icpmesh import icp
from icpmesh.icp import Opcode
from icpmesh.query import (
    ICPQueryProtocol,
    QueryResult,
    formatResult,
    main,
    makeParser,
    parseTarget,
    resultToJSON,
    runQueries,
)
from icpmesh.testing.udp import FakeICPNeighbour, FakeUDPReactor

CACHE = ("127.0.0.1", 3130)
URL = "http://example.com/"
URL2 = "http://example.com/2"


def makeProtocol(
    urls: list[str], target: tuple[str, int] = CACHE, **kw: Any
) -> tuple[ICPQueryProtocol, FakeDatagramTransport, Clock]:
    """
    Start an L{ICPQueryProtocol} on a fake transport and clock, with
    request numbers starting at 100.
    """
    clock = Clock()
    proto = ICPQueryProtocol(target, urls, firstReqnum=100, reactor=clock, **kw)
    transport = FakeDatagramTransport()
    proto.makeConnection(transport)
    return proto, transport, clock


def replyTo(data: bytes, opcode: int, **kw: Any) -> bytes:
    """
    Encode the reply to an encoded query.
    """
    return icp.encode(icp.reply(icp.decode(data), opcode, **kw))


class ParseTargetTests(SynchronousTestCase):
    """
    L{parseTarget} understands the address forms users type.
    """

    def test_valid(self) -> None:
        """
        IPv4, names, bracketed and bare IPv6, with and without a port.
        """
        cases = {
            "127.0.0.1:3130": ("127.0.0.1", 3130),
            "cache.example:4000": ("cache.example", 4000),
            "cache.example": ("cache.example", 3130),
            "[::1]:3131": ("::1", 3131),
            "[::1]": ("::1", 3130),
            "::1": ("::1", 3130),
            " 10.0.0.1:1 ": ("10.0.0.1", 1),
        }
        for text, expected in cases.items():
            self.assertEqual(parseTarget(text), expected, text)

    def test_invalid(self) -> None:
        """
        Empty input, bad or out-of-range ports, unbalanced brackets and
        non-addresses in brackets raise L{ValueError}.
        """
        for text in ("", ":3130", "h:", "h:0", "h:65536", "h:x", "[::1", "[::1]x", "[nope]:1", "1:2:3:zz"):
            self.assertRaises(ValueError, parseTarget, text)


class ProtocolTests(SynchronousTestCase):
    """
    L{ICPQueryProtocol} sends queries and matches replies strictly.
    """

    def test_sendsQueries(self) -> None:
        """
        One version-2 QUERY per URL goes to the target, with consecutive
        request numbers and the requested flags.
        """
        _, transport, _ = makeProtocol([URL, URL2], options=icp.FLAG_SRC_RTT)
        self.assertEqual(
            transport.written,
            [
                (icp.encode(icp.query(100, URL, options=icp.FLAG_SRC_RTT)), CACHE),
                (icp.encode(icp.query(101, URL2, options=icp.FLAG_SRC_RTT)), CACHE),
            ],
        )

    def test_version3(self) -> None:
        """
        C{version=3} puts 3 in the version byte.
        """
        _, transport, _ = makeProtocol([URL], version=3)
        self.assertEqual(icp.decode(transport.written[0][0]).version, 3)

    def test_repliesCollected(self) -> None:
        """
        Matching replies are recorded with their round-trip time on the
        clock, and L{ICPQueryProtocol.done} fires once all have arrived.
        """
        proto, transport, clock = makeProtocol([URL, URL2])
        fired: list[list[QueryResult]] = []
        proto.done.addCallback(fired.append)
        clock.advance(0.25)
        proto.datagramReceived(replyTo(transport.written[1][0], Opcode.HIT), CACHE)
        self.assertEqual(fired, [])
        clock.advance(0.25)
        proto.datagramReceived(replyTo(transport.written[0][0], Opcode.MISS), CACHE)
        [results] = fired
        self.assertEqual(
            [(r.url, r.reply.opcode if r.reply else None, r.rttMs) for r in results],
            [(URL, Opcode.MISS, 500.0), (URL2, Opcode.HIT, 250.0)],
        )
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_timeout(self) -> None:
        """
        With no reply, L{ICPQueryProtocol.done} fires after C{timeout}
        seconds, and not before, with the reply missing.
        """
        proto, _, clock = makeProtocol([URL], timeout=1.5)
        fired: list[list[QueryResult]] = []
        proto.done.addCallback(fired.append)
        clock.advance(1.49)
        self.assertEqual(fired, [])
        clock.advance(0.01)
        self.assertEqual(fired, [[QueryResult(URL, 100)]])

    def test_strictMatching(self) -> None:
        """
        Datagrams from another port or host, with an unknown request
        number, another URL, a non-reply opcode, or that do not decode are
        ignored and counted; the real reply is still accepted afterwards.
        """
        proto, transport, _ = makeProtocol([URL])
        query = transport.written[0][0]
        good = replyTo(query, Opcode.HIT)
        proto.datagramReceived(good, ("127.0.0.1", 3131))
        proto.datagramReceived(good, ("127.0.0.2", 3130))
        proto.datagramReceived(icp.encodeReply(Opcode.HIT, 99, URL.encode()), CACHE)
        proto.datagramReceived(icp.encodeReply(Opcode.HIT, 100, b"http://other/"), CACHE)
        proto.datagramReceived(query, CACHE)
        proto.datagramReceived(good[:-1], CACHE)
        self.assertEqual((proto.ignored, proto.results[0].reply), (6, None))
        proto.datagramReceived(good, CACHE)
        self.assertEqual(proto.results[0].reply, icp.decode(good))
        proto.datagramReceived(good, CACHE)
        self.assertEqual(proto.ignored, 7)

    def test_errWithOtherUrl(self) -> None:
        """
        An ERR needs only the request number: Squid echoes a bad URL
        %-escaped, or empty when the framing was broken.
        """
        proto, _, _ = makeProtocol(["http://x/a b"])
        proto.datagramReceived(icp.encodeReply(Opcode.ERR, 100, b"http://x/a%20b"), CACHE)
        self.assertEqual(proto.results[0].reply.url, "http://x/a%20b")

    def test_ipv6Normalised(self) -> None:
        """
        An IPv6 target written in a long form matches replies from the
        canonical form of the same address, including 4-tuple addresses.
        """
        proto, transport, _ = makeProtocol([URL], target=("0:0::1", 3130))
        self.assertEqual(transport.written[0][1], ("::1", 3130))
        proto.datagramReceived(replyTo(transport.written[0][0], Opcode.MISS), ("::1", 3130, 0, 0))
        self.assertEqual(proto.results[0].reply.opcode, Opcode.MISS)

    def test_sendFailure(self) -> None:
        """
        A query that cannot be sent is recorded as an error and does not
        hold up the round.
        """

        class Failing(FakeDatagramTransport):
            def write(self, packet: bytes, addr: Any = None) -> None:
                raise OSError("Network is unreachable")

        proto = ICPQueryProtocol(CACHE, [URL], firstReqnum=1, reactor=Clock())
        proto.makeConnection(Failing())
        self.assertTrue(proto.done.called)
        self.assertEqual(proto.results[0].error, "Network is unreachable")


class FormatTests(SynchronousTestCase):
    """
    Text and JSON renderings of results.
    """

    def test_textLines(self) -> None:
        """
        A reply line shows URL, opcode name, flags, SRC_RTT data when
        flagged, reqnum and RTT; a missing reply shows TIMEOUT.
        """
        hit = QueryResult(URL, 7, icp.Message(Opcode.HIT, 7, URL), 0.4321)
        srcRtt = QueryResult(
            URL, 8, icp.Message(Opcode.MISS, 8, URL, options=icp.FLAG_SRC_RTT, optionData=0x0003002A), 12.0
        )
        self.assertEqual(formatResult(hit), f"{URL} HIT flags=0 reqnum=7 rtt=0.43ms")
        self.assertEqual(formatResult(srcRtt), f"{URL} MISS flags=SRC_RTT src_rtt=42ms hops=3 reqnum=8 rtt=12.00ms")
        self.assertEqual(formatResult(QueryResult(URL, 9), 2.0), f"{URL} TIMEOUT reqnum=9 (no reply in 2s)")

    def test_textEchoAndVersion(self) -> None:
        """
        A reply whose URL differs from the query's (an escaped ERR) or that
        is not version 2 says so.
        """
        err = QueryResult("http://x/a b", 1, icp.Message(Opcode.ERR, 1, "http://x/a%20b", version=3), 1.0)
        self.assertEqual(
            formatResult(err),
            "http://x/a b ERR flags=0 reqnum=1 rtt=1.00ms version=3 echoed='http://x/a%20b'",
        )

    def test_json(self) -> None:
        """
        The JSON form has the status and every reply field, and only
        C{url}, C{reqnum} and C{status} for a timeout.
        """
        result = QueryResult(
            URL, 8, icp.Message(Opcode.MISS, 8, URL, options=icp.FLAG_SRC_RTT, optionData=0x0003002A), 12.0
        )
        self.assertEqual(
            resultToJSON(result),
            {
                "url": URL,
                "reqnum": 8,
                "status": "MISS",
                "opcode": 3,
                "version": 2,
                "flags": ["SRC_RTT"],
                "options": icp.FLAG_SRC_RTT,
                "optionData": 0x0003002A,
                "echoedUrl": URL,
                "rttMs": 12.0,
                "srcRtt": {"rttMs": 42, "hops": 3},
            },
        )
        self.assertEqual(resultToJSON(QueryResult(URL, 9)), {"url": URL, "reqnum": 9, "status": "TIMEOUT"})


class RunQueriesTests(SynchronousTestCase):
    """
    L{runQueries} on a fake UDP network.
    """

    def run_(self, argv: list[str], answer: Any, neighbour: tuple[str, int] = CACHE) -> tuple[Any, str, str, FakeICPNeighbour]:
        """
        Run the command on a L{FakeUDPReactor} against a fake neighbour and
        return C{(exit status, stdout, stderr, neighbour)}.
        """
        reactor = FakeUDPReactor()
        fake = FakeICPNeighbour(reactor, neighbour, answer, options=icp.FLAG_SRC_RTT, optionData=0x00010005)
        out, err = io.StringIO(), io.StringIO()
        d = defer.ensureDeferred(runQueries(reactor, makeParser().parse_args(argv), out, err))
        reactor.pump(3.0)
        return self.successResultOf(d), out.getvalue(), err.getvalue(), fake

    def test_allAnswered(self) -> None:
        """
        Every URL answered: one line each and exit status 0; the queries
        come from the C{--bind} address.
        """
        answers = {URL: Opcode.HIT, URL2: Opcode.MISS}
        status, out, _, fake = self.run_(
            ["--bind", "127.0.0.2", "127.0.0.1:3130", URL, URL2], answers.get
        )
        self.assertEqual(status, 0)
        lines = out.splitlines()
        self.assertEqual([line.split()[:3] for line in lines], [[URL, "HIT", "flags=0"], [URL2, "MISS", "flags=0"]])
        self.assertEqual({addr[0] for _, addr in fake.queries}, {"127.0.0.2"})

    def test_timeoutExitStatus(self) -> None:
        """
        One unanswered URL prints TIMEOUT and makes the exit status 1.
        """
        status, out, _, _ = self.run_(
            ["--timeout", "0.5", "127.0.0.1:3130", URL, URL2], {URL: Opcode.MISS}.get
        )
        self.assertEqual(status, 1)
        self.assertIn(f"{URL2} TIMEOUT", out)
        self.assertIn(f"{URL} MISS", out)

    def test_flagsAndJson(self) -> None:
        """
        C{--src-rtt --hit-obj} set both flags in the query; C{--json}
        prints one parseable document with the decoded SRC_RTT data.
        """
        status, out, _, fake = self.run_(
            ["--src-rtt", "--hit-obj", "--json", "127.0.0.1:3130", URL], lambda url: Opcode.HIT
        )
        self.assertEqual(status, 0)
        self.assertEqual(fake.queries[0][0].options, icp.FLAG_SRC_RTT | icp.FLAG_HIT_OBJ)
        document = json.loads(out)
        self.assertEqual(document["target"], "127.0.0.1:3130")
        [result] = document["results"]
        self.assertEqual((result["status"], result["srcRtt"]), ("HIT", {"rttMs": 5, "hops": 1}))

    def test_bindFamilyMismatch(self) -> None:
        """
        An IPv4 C{--bind} with an IPv6 target is a usage error (status 2).
        """
        status, _, err, fake = self.run_(["--bind", "127.0.0.2", "[::1]:3130", URL], lambda url: Opcode.HIT)
        self.assertEqual(status, 2)
        self.assertIn("address family", err)
        self.assertEqual(fake.queries, [])


class MainTests(SynchronousTestCase):
    """
    L{main}'s usage errors exit with status 2 before anything is sent.
    """

    def assertUsageError(self, argv: list[str]) -> None:
        """
        Assert that C{main(argv)} exits with status 2.
        """
        error = self.assertRaises(SystemExit, main, argv)
        self.assertEqual(error.code, 2)

    def test_usageErrors(self) -> None:
        """
        A bad HOST:PORT, a missing URL, a version other than 2 or 3, a
        non-positive timeout, or an unencodable URL is a usage error.
        """
        self.patch(makeParser().__class__, "_print_message", lambda *a, **k: None)
        self.assertUsageError(["127.0.0.1:notaport", URL])
        self.assertUsageError(["127.0.0.1:3130"])
        self.assertUsageError(["--version", "4", "127.0.0.1:3130", URL])
        self.assertUsageError(["--timeout", "0", "127.0.0.1:3130", URL])
        self.assertUsageError(["127.0.0.1:3130", "http://a/\u20ac"])

    def test_helpWarnsAboutV3(self) -> None:
        """
        The help text warns that Squid 5.7 crashes on ICPv3.
        """
        self.assertIn("crashes on ICPv3", " ".join(makeParser().format_help().split()))


class Responder(DatagramProtocol):
    """
    A tiny real-socket ICP responder: HIT for URLs containing C{"hit"},
    nothing for URLs containing C{"silent"}, MISS otherwise.
    """

    def __init__(self) -> None:
        self.sources: list[Any] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:  # type: ignore[override]
        message = icp.decode(data)
        self.sources.append(addr)
        if "silent" in message.url:
            return
        opcode = Opcode.HIT if "hit" in message.url else Opcode.MISS
        self.transport.write(icp.encode(icp.reply(message, opcode)), addr)


def _ipv6Loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


class RealSocketTests(TestCase):
    """
    L{runQueries} over real loopback UDP sockets.
    """

    def runAgainst(self, interface: str, argv: list[str]) -> defer.Deferred[tuple[int, str, Responder]]:
        from twisted.internet import reactor

        responder = Responder()
        port = reactor.listenUDP(0, responder, interface=interface)
        self.addCleanup(port.stopListening)
        host = port.getHost()
        target = f"[{host.host}]:{host.port}" if ":" in host.host else f"{host.host}:{host.port}"
        out = io.StringIO()
        argv = [a.replace("TARGET", target) for a in argv]
        d = defer.ensureDeferred(runQueries(reactor, makeParser().parse_args(argv), out, io.StringIO()))
        return d.addCallback(lambda status: (status, out.getvalue(), responder))

    @defer.inlineCallbacks
    def test_ipv4(self) -> Any:
        """
        Queries from 127.0.0.2 to a responder on 127.0.0.1 get HIT and MISS
        back; a silent URL times out and the status is 1.
        """
        status, out, responder = yield self.runAgainst(
            "127.0.0.1",
            ["--bind", "127.0.0.2", "--timeout", "0.3", "TARGET", "http://a/hit", "http://a/miss", "http://a/silent"],
        )
        lines = [line.split()[1] for line in out.splitlines()]
        self.assertEqual((status, lines), (1, ["HIT", "MISS", "TIMEOUT"]))
        self.assertEqual({a[0] for a in responder.sources}, {"127.0.0.2"})

    @defer.inlineCallbacks
    def test_ipv6(self) -> Any:
        """
        C{[::1]:PORT} works end to end over IPv6 loopback.
        """
        if not _ipv6Loopback():
            # Not a skip: this machine was checked to have ::1, and a
            # missing one should be noticed.
            self.fail("IPv6 loopback ::1 is not available")
        status, out, _ = yield self.runAgainst("::1", ["TARGET", "http://a/hit"])
        self.assertEqual(status, 0)
        self.assertEqual(out.split()[1], "HIT")
