"""
Tests for L{icpmesh.protocol}: decoding, dispatch, correlation, timeouts.
"""

from __future__ import annotations

import struct
from typing import Any, Optional

from twisted.internet.task import Clock
from twisted.internet.testing import FakeDatagramTransport
from twisted.trial.unittest import SynchronousTestCase

from icpmesh import icp
from icpmesh.protocol import _SHARED_MESSAGES_MAX, ICPProtocol, RateLimitedLog

PEER = ("127.0.0.2", 3130)
OTHER = ("127.0.0.3", 3130)
URL = "http://example.com/"


class RecordingResponder:
    def __init__(self, reply: Optional[bytes] = b"reply", fail: bool = False) -> None:
        self.queries: list[tuple[icp.Message, Any]] = []
        self.reply = reply
        self.fail = fail

    def handleQuery(self, message: icp.Message, address: Any) -> Optional[bytes]:
        self.queries.append((message, address))
        if self.fail:
            raise RuntimeError("policy bug")
        return self.reply


def makeProtocol(responder: Any = None) -> tuple[ICPProtocol, FakeDatagramTransport, Clock]:
    clock = Clock()
    proto = ICPProtocol(responder, reactor=clock)
    transport = FakeDatagramTransport()
    proto.makeConnection(transport)
    return proto, transport, clock


def header(opcode: int, length: int, version: int = 2, reqnum: int = 7) -> bytes:
    return struct.pack("!BBHIIII", opcode, version, length, reqnum, 0, 0, 0)


class QueryDispatchTests(SynchronousTestCase):
    """
    Queries go to the responder; what it returns is sent back.
    """

    def test_queryAnswered(self) -> None:
        """
        A well-formed QUERY reaches the responder with the sender's address
        and the responder's bytes go back to that address.
        """
        responder = RecordingResponder()
        proto, transport, _ = makeProtocol(responder)
        proto.datagramReceived(icp.encode(icp.query(5, URL)), PEER)
        [(message, address)] = responder.queries
        self.assertEqual((message.reqnum, message.url, address), (5, URL, PEER))
        self.assertEqual(transport.written, [(b"reply", PEER)])
        self.assertEqual(proto.stats()["queries"], 1)

    def test_responderSilence(self) -> None:
        """
        A responder returning None sends nothing.
        """
        proto, transport, _ = makeProtocol(RecordingResponder(reply=None))
        proto.datagramReceived(icp.encode(icp.query(5, URL)), PEER)
        self.assertEqual(transport.written, [])

    def test_responderBugContained(self) -> None:
        """
        An exception in the responder is counted and logged, never raised.
        """
        proto, transport, _ = makeProtocol(RecordingResponder(fail=True))
        proto.datagramReceived(icp.encode(icp.query(5, URL)), PEER)
        self.assertEqual(proto.counters["internalErrors"], 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_noResponder(self) -> None:
        """
        A node that only asks ignores queries.
        """
        proto, transport, _ = makeProtocol(None)
        proto.datagramReceived(icp.encode(icp.query(5, URL)), PEER)
        self.assertEqual(transport.written, [])
        self.assertEqual(proto.counters["ignoredQueries"], 1)


class MalformedTests(SynchronousTestCase):
    """
    Malformed datagrams are dropped or answered with ERR, counted, and
    never raise.
    """

    def test_dropped(self) -> None:
        """
        Short, length-mismatched, wrong-version, unknown-opcode and
        oversized datagrams are dropped silently and counted by reason.
        """
        responder = RecordingResponder()
        proto, transport, _ = makeProtocol(responder)
        good = icp.encode(icp.query(5, URL))
        bad = [
            b"",
            good[:19],
            good + b"x",
            good[:-1],
            header(1, 25, version=1) + b"\0\0\0\0x",
            header(1, 25, version=4) + b"\0\0\0\0x",
            header(5, 21) + b"\0",
            header(24, 21) + b"\0",
            header(200, 21) + b"\0",
            header(1, 16385 % 65536) + b"a" * (16385 - 20),
        ]
        for data in bad:
            proto.datagramReceived(data, PEER)
        self.assertEqual(transport.written, [])
        self.assertEqual(responder.queries, [])
        self.assertEqual(proto.counters["malformed"], len(bad))

    def test_badURLFramingAnsweredWithErr(self) -> None:
        """
        A QUERY whose URL is not NUL-terminated, or has bytes after the
        NUL, gets ERR with the same request number and an empty URL.
        """
        proto, transport, _ = makeProtocol(RecordingResponder())
        body = b"\0\0\0\0" + URL.encode()
        proto.datagramReceived(header(1, 20 + len(body), reqnum=99) + body, PEER)
        body2 = b"\0\0\0\0" + URL.encode() + b"\0junk"
        proto.datagramReceived(header(1, 20 + len(body2), reqnum=100) + body2, PEER)
        replies = [icp.decode(data) for data, _ in transport.written]
        self.assertEqual([(m.opcode, m.reqnum, m.url) for m in replies],
                         [(icp.Opcode.ERR, 99, ""), (icp.Opcode.ERR, 100, "")])

    def test_garbageNeverRaises(self) -> None:
        """
        A sweep of every truncation of a valid query and of random-looking
        bytes raises nothing.
        """
        proto, _, _ = makeProtocol(RecordingResponder())
        good = icp.encode(icp.query(5, URL))
        for i in range(len(good) + 1):
            proto.datagramReceived(good[:i], PEER)
        for seed in range(300):
            data = bytes((seed * 31 + i * 17) % 256 for i in range(seed % 60))
            proto.datagramReceived(data, PEER)
        self.assertGreater(proto.counters["malformed"], 0)

    def test_icpV3QueryAnsweredAsV2(self) -> None:
        """
        A version 3 query is handed to the responder like a v2 one (whose
        replies are always v2); it does not harm the node.
        """
        responder = RecordingResponder()
        proto, transport, _ = makeProtocol(responder)
        data = bytearray(icp.encode(icp.query(5, URL)))
        data[1] = 3
        proto.datagramReceived(bytes(data), PEER)
        self.assertEqual(len(responder.queries), 1)

    def test_loggingBounded(self) -> None:
        """
        A flood of malformed datagrams logs a bounded number of lines.
        """
        proto, _, clock = makeProtocol(RecordingResponder())
        for _ in range(1000):
            proto.datagramReceived(b"short", PEER)
        self.assertEqual(proto.counters["malformed.short"], 1000)
        self.assertEqual(proto.rateLog.suppressed["malformed.short"], 1000 - proto.rateLog.burst)


class RateLimitedLogTests(SynchronousTestCase):
    """
    L{RateLimitedLog} windows.
    """

    def test_windowResets(self) -> None:
        """
        After the interval, messages are logged again.
        """
        clock = Clock()
        rl = RateLimitedLog(clock, interval=10, burst=2)
        self.assertEqual([rl.warn("k", "x") for _ in range(3)], [True, True, False])
        clock.advance(10)
        self.assertTrue(rl.warn("k", "x"))
        self.assertTrue(rl.warn("other", "x"))


class CorrelationTests(SynchronousTestCase):
    """
    Query rounds: replies matched by request number, source and URL.
    """

    def setUp(self) -> None:
        self.proto, self.transport, self.clock = makeProtocol(None)

    def sendRound(self, **kw: Any) -> Any:
        results: list[Any] = []
        kw.setdefault("timeout", 2.0)
        self.proto.sendQuery(URL, [PEER, OTHER], {PEER: "p", OTHER: "o"}, **kw).addCallback(results.append)
        return results

    def reply(self, opcode: int, source: Any, reqnum: Optional[int] = None, url: str = URL,
              options: int = 0) -> None:
        if reqnum is None:
            reqnum = icp.decode(self.transport.written[0][0]).reqnum
        msg = icp.Message(opcode=opcode, reqnum=reqnum, url=url, options=options)
        self.proto.datagramReceived(icp.encode(msg), source)

    def test_queriesSent(self) -> None:
        """
        One QUERY with one request number goes to every address.
        """
        self.sendRound()
        sent = [(icp.decode(d), a) for d, a in self.transport.written]
        self.assertEqual([a for _, a in sent], [PEER, OTHER])
        self.assertEqual(len({m.reqnum for m, _ in sent}), 1)
        self.assertNotEqual(sent[0][0].reqnum, 0)
        self.assertEqual(sent[0][0].opcode, icp.Opcode.QUERY)

    def test_completeWhenAllReplied(self) -> None:
        """
        The round ends when every expected reply arrived, before the
        timeout, and fires only once.
        """
        results = self.sendRound()
        self.clock.advance(0.01)
        self.reply(icp.Opcode.MISS, PEER)
        self.assertEqual(results, [])
        self.reply(icp.Opcode.MISS, OTHER)
        [pending] = results
        self.assertFalse(pending.timedOut)
        self.assertEqual([(t, m.opcode) for t, m, _ in pending.replies], [("p", 3), ("o", 3)])
        self.assertAlmostEqual(pending.replies[0][2], 0.01)
        self.clock.advance(2)
        self.assertEqual(len(results), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lateRepliesStillReported(self) -> None:
        """
        After a HIT ended the round, a later reply is not added to it but
        is still passed to C{onReply} (liveness, RTT) until the timeout.
        """
        seen: list[Any] = []
        results = self.sendRound(isComplete=lambda p, m: m.opcode == icp.Opcode.HIT,
                                 onReply=lambda t, m, r: seen.append(t))
        self.reply(icp.Opcode.HIT, PEER)
        self.reply(icp.Opcode.MISS, OTHER)
        self.assertEqual(seen, ["p", "o"])
        self.assertEqual(len(results[0].replies), 1)
        self.assertEqual(self.proto.counters["lateReplies"], 1)

    def test_timeout(self) -> None:
        """
        Without all replies the round ends at the timeout, marked so.
        """
        results = self.sendRound(timeout=1.5)
        self.reply(icp.Opcode.MISS, PEER)
        self.clock.advance(1.49)
        self.assertEqual(results, [])
        self.clock.advance(0.02)
        self.assertTrue(results[0].timedOut)
        self.assertEqual(len(results[0].replies), 1)

    def test_isCompleteEndsEarly(self) -> None:
        """
        C{isComplete} returning true (a HIT) ends the round at once.
        """
        results = self.sendRound(isComplete=lambda p, m: m.opcode == icp.Opcode.HIT)
        self.reply(icp.Opcode.HIT, OTHER)
        self.assertEqual(len(results), 1)
        self.assertFalse(results[0].timedOut)

    def test_rejectedReplies(self) -> None:
        """
        Replies from a stranger, from the right host but another port, with
        another URL, another request number, unrequested options, or a
        second reply from the same neighbour do not count.
        """
        results = self.sendRound()
        reqnum = icp.decode(self.transport.written[0][0]).reqnum
        self.reply(icp.Opcode.HIT, ("127.0.0.9", 3130))
        self.reply(icp.Opcode.HIT, ("127.0.0.2", 3131))
        self.reply(icp.Opcode.HIT, PEER, url="http://other/")
        self.reply(icp.Opcode.HIT, PEER, reqnum=reqnum + 1)
        self.reply(icp.Opcode.HIT, PEER, options=icp.FLAG_HIT_OBJ)
        self.reply(icp.Opcode.MISS, PEER)
        self.reply(icp.Opcode.HIT, PEER)
        self.clock.advance(2)
        self.assertEqual([(t, m.opcode) for t, m, _ in results[0].replies], [("p", icp.Opcode.MISS)])
        c = self.proto.counters
        self.assertEqual(
            (c["repliesFromStrangers"], c["repliesWrongURL"], c["lateOrUnknownReplies"],
             c["repliesBadOptions"], c["duplicateReplies"]),
            (2, 1, 1, 1, 1),
        )

    def test_errAndInvalidIgnored(self) -> None:
        """
        ERR and INVALID replies never count toward a round.
        """
        results = self.sendRound(timeout=1)
        self.reply(icp.Opcode.ERR, PEER)
        self.reply(icp.Opcode.INVALID, OTHER)
        self.clock.advance(1)
        self.assertEqual(results[0].replies, [])

    def test_reqnumsUniqueAndNonZero(self) -> None:
        """
        Request numbers skip 0 when wrapping and skip those in flight.
        """
        self.proto._nextReqnum = 0x7FFFFFFF
        self.sendRound()
        self.sendRound()
        nums = [icp.decode(d).reqnum for d, a in self.transport.written if a == PEER]
        self.assertEqual(nums, [0x7FFFFFFF, 1])

    def test_stopProtocolEndsRounds(self) -> None:
        """
        Stopping the protocol ends rounds in flight as timed out.
        """
        results = self.sendRound()
        self.proto.doStop()
        self.assertTrue(results[0].timedOut)

    def test_sendErrorContained(self) -> None:
        """
        An OSError from the socket is counted, not raised.
        """
        def boom(data: bytes, addr: Any) -> None:
            raise OSError(111, "refused")

        self.transport.write = boom  # type: ignore[method-assign]
        results = self.sendRound(timeout=1)
        self.assertEqual(self.proto.counters["sendErrors"], 2)
        self.clock.advance(1)
        self.assertTrue(results[0].timedOut)


class SocketTransport(FakeDatagramTransport):
    """
    A datagram transport with a C{socket} whose C{sendto} records apart
    from C{write}, like a real UDP port's.
    """

    def __init__(self) -> None:
        FakeDatagramTransport.__init__(self)
        self.sentRaw: list[tuple[bytes, Any]] = []
        self.refused: set[str] = set()
        transport = self

        class Socket:
            def sendto(self, data: bytes, address: Any) -> int:
                if address[0] in transport.refused:
                    raise ConnectionRefusedError(111, "refused")
                transport.sentRaw.append((data, address))
                return len(data)

        self.socket = Socket()

    def write(self, packet: bytes, addr: Any = None) -> None:
        from twisted.internet.abstract import isIPAddress
        from twisted.internet.error import InvalidAddressError

        if not isIPAddress(addr[0]):
            raise InvalidAddressError(addr[0], "not an IP address")
        FakeDatagramTransport.write(self, packet, addr)


class FastPathTests(SynchronousTestCase):
    """
    The raw-bytes paths: replies matched without decoding, queries sent
    straight to the socket once the transport has accepted an address.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.proto = ICPProtocol(None, reactor=self.clock)
        self.transport = SocketTransport()
        self.proto.makeConnection(self.transport)

    def sendRound(self, to: Any = (PEER, OTHER), **kw: Any) -> list[Any]:
        results: list[Any] = []
        kw.setdefault("timeout", 2.0)
        self.proto.sendQuery(URL, list(to), {a: a[0] for a in to}, **kw).addCallback(results.append)
        return results

    def test_queriesToSocketOnceChecked(self) -> None:
        """
        The first query to an address goes through the transport's C{write}
        (which checks the address); later ones go to the socket's
        C{sendto}.  The bytes are the same, and are counted as sent.
        """
        self.sendRound()
        self.sendRound()
        self.assertEqual([a for _, a in self.transport.written], [PEER, OTHER])
        self.assertEqual([a for _, a in self.transport.sentRaw], [PEER, OTHER])
        first, second = self.transport.written[0][0], self.transport.sentRaw[0][0]
        self.assertEqual(first[:4] + first[8:], second[:4] + second[8:])
        stats = self.proto.stats()
        self.assertEqual((stats["queriesSent"], stats["sent"]), (4, 4))

    def test_socketErrorsCounted(self) -> None:
        """
        An error from the socket's C{sendto} is counted, not raised, and the
        round still ends at its timeout.
        """
        self.sendRound()
        self.transport.refused.add(PEER[0])
        results = self.sendRound(timeout=1)
        self.assertEqual(self.proto.counters["sendErrors"], 1)
        self.assertEqual(self.proto.stats()["queriesSent"], 3)
        self.clock.advance(1)
        self.assertTrue(results[0].timedOut)

    def test_unresolvedHostCounted(self) -> None:
        """
        An address the transport refuses (a neighbour's host name not
        resolved yet) is a send error, not an exception; the other
        neighbours are still asked.
        """
        results = self.sendRound(to=(("cache.example", 3130), OTHER), timeout=1)
        self.assertEqual(self.proto.counters["sendErrors"], 1)
        self.assertEqual([a for _, a in self.transport.written], [OTHER])
        self.clock.advance(1)
        self.assertTrue(results[0].timedOut)

    def reply(self, opcode: int, source: Any, version: int = 2, url: str = URL,
              options: int = 0, optionData: int = 0) -> bytes:
        reqnum = icp.decode(self.transport.written[-1][0]).reqnum
        data = icp.encode(icp.Message(opcode=opcode, reqnum=reqnum, url=url, version=version,
                                      options=options, optionData=optionData))
        self.proto.datagramReceived(data, source)
        return data

    def test_identicalRepliesShareOneMessage(self) -> None:
        """
        Replies that are byte for byte the same share one (immutable)
        message object; a different reply gets its own.
        """
        peers = [("127.0.0.%d" % i, 3130) for i in range(2, 6)]
        results = self.sendRound(to=peers)
        for peer in peers[:3]:
            self.reply(icp.Opcode.MISS, peer)
        self.reply(icp.Opcode.HIT, peers[3])
        messages = [m for _, m, _ in results[0].replies]
        self.assertIs(messages[0], messages[1])
        self.assertIs(messages[0], messages[2])
        self.assertIsNot(messages[0], messages[3])
        self.assertEqual([m.opcode for m in messages], [icp.Opcode.MISS] * 3 + [icp.Opcode.HIT])
        self.assertIsInstance(messages[3].opcode, icp.Opcode)

    def test_sharedMessagesBounded(self) -> None:
        """
        A neighbour (or someone using its address) sending many distinct
        replies to one query does not grow the table of shared messages.
        """
        peer = ("127.0.0.2", 3130)
        self.sendRound(to=[peer])
        for n in range(200):
            self.reply(icp.Opcode.MISS, peer, optionData=n)
        (pending,) = self.proto._pending.values()
        self.assertLessEqual(len(pending.messages), _SHARED_MESSAGES_MAX)

    def test_fastAndDecodedRepliesAgree(self) -> None:
        """
        A version 2 reply (raw path) and the same reply as version 3
        (decoded path) give the same message fields and the same counters,
        for good replies and for every kind of rejected one.
        """
        outcomes = []
        for version in (2, 3):
            self.setUp()
            results = self.sendRound(options=icp.FLAG_SRC_RTT)
            self.reply(icp.Opcode.MISS, ("127.0.0.9", 3130), version)
            self.reply(icp.Opcode.MISS, PEER, version, url="http://other/")
            self.reply(icp.Opcode.MISS, PEER, version, options=icp.FLAG_HIT_OBJ)
            self.reply(icp.Opcode.MISS_NOFETCH, PEER, version, options=icp.FLAG_SRC_RTT,
                       optionData=icp.srcRttData(12, 3))
            self.reply(icp.Opcode.MISS, PEER, version)
            self.reply(icp.Opcode.DENIED, OTHER, version)
            self.assertEqual(len(results), 1)
            # Version 2 took the raw path, version 3 was decoded.
            self.assertEqual(self.proto.repliesReceived, 6 if version == 2 else 0)
            fields = [(t, m.opcode, m.reqnum, m.url, m.options, m.optionData, m.senderAddress)
                      for t, m, _ in results[0].replies]
            counters = {k: v for k, v in self.proto.stats().items() if k not in ("queriesV3",)}
            outcomes.append((fields, counters))
        self.assertEqual(outcomes[0], outcomes[1])
        self.assertEqual(outcomes[0][1]["replies"], 6)

    def test_unknownReplyCounted(self) -> None:
        """
        A reply on the raw path to no round in flight is counted as late
        or unknown.
        """
        self.sendRound()
        data = icp.encodeReply(icp.Opcode.MISS, 999, URL.encode())
        self.proto.datagramReceived(data, PEER)
        self.assertEqual(self.proto.counters["lateOrUnknownReplies"], 1)
        self.assertEqual(self.proto.repliesReceived, 1)
