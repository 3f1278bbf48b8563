"""
Tests for L{icpmesh.icp}: the RFC 2186 wire format.
"""

from __future__ import annotations

import struct

from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from icpmesh import icp
from icpmesh.icp import DecodeError, Header, Message, Opcode

URL = "http://example.com/"

# Opcodes whose payload is URL + NUL at offset 20.
URL_ONLY_OPCODES = sorted(icp.KNOWN_OPCODES - {Opcode.QUERY, Opcode.HIT_OBJ})

words = st.integers(min_value=0, max_value=0xFFFFFFFF)
# Any latin-1 text without NUL: every byte value 1..255 can be in a URL.
urls = st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=255), max_size=300)


@st.composite
def messages(draw: st.DrawFn) -> Message:
    """
    Any message that L{icp.decode} accepts.
    """
    opcode = draw(st.sampled_from(sorted(icp.KNOWN_OPCODES)))
    return Message(
        opcode=opcode,
        reqnum=draw(words),
        url=draw(urls),
        version=draw(st.sampled_from([icp.VERSION_2, icp.VERSION_3])),
        options=draw(words),
        optionData=draw(words),
        senderAddress=draw(words),
        requester=draw(words) if opcode == Opcode.QUERY else 0,
        payload=draw(st.binary(max_size=300)) if opcode == Opcode.HIT_OBJ else None,
    )


def header(opcode: int, length: int, version: int = 2, reqnum: int = 7) -> bytes:
    """
    Build a raw 20-byte header with zero options, option data and sender.
    """
    return struct.pack("!BBHIIII", opcode, version, length, reqnum, 0, 0, 0)


def raw(opcode: int, body: bytes, version: int = 2, reqnum: int = 7) -> bytes:
    """
    Build a datagram with a correct length field around C{body}.
    """
    return header(opcode, 20 + len(body), version, reqnum) + body


class ConstantsTests(SynchronousTestCase):
    """
    The opcode and flag values are RFC 2186's.
    """

    def test_opcodeValues(self) -> None:
        """
        Every opcode has its RFC 2186 number.
        """
        self.assertEqual(
            {o.name: int(o) for o in Opcode},
            {
                "INVALID": 0,
                "QUERY": 1,
                "HIT": 2,
                "MISS": 3,
                "ERR": 4,
                "SECHO": 10,
                "DECHO": 11,
                "MISS_NOFETCH": 21,
                "DENIED": 22,
                "HIT_OBJ": 23,
            },
        )

    def test_knownAndReplyOpcodes(self) -> None:
        """
        C{KNOWN_OPCODES} holds every opcode; C{REPLY_OPCODES} holds every
        opcode that answers something we sent, which excludes QUERY and
        INVALID.
        """
        self.assertEqual(icp.KNOWN_OPCODES, frozenset({0, 1, 2, 3, 4, 10, 11, 21, 22, 23}))
        self.assertEqual(icp.REPLY_OPCODES, frozenset({2, 3, 4, 10, 11, 21, 22, 23}))

    def test_flags(self) -> None:
        """
        HIT_OBJ is the top bit of the options word, SRC_RTT the next one.
        """
        self.assertEqual((icp.FLAG_HIT_OBJ, icp.FLAG_SRC_RTT), (0x80000000, 0x40000000))
        self.assertEqual((icp.HEADER_LENGTH, icp.MAX_MESSAGE_LENGTH), (20, 16384))


class ExactBytesTests(SynchronousTestCase):
    """
    Encoded messages match hand-written hex dumps.
    """

    def test_query(self) -> None:
        """
        A QUERY for http://example.com/ with reqnum 1 is 20 + 4 + 19 + 1 =
        44 bytes: header, a zero requester address, the URL and a NUL.
        """
        expected = bytes.fromhex(
            "01 02 002c"  # QUERY, version 2, length 44
            "00000001"  # reqnum
            "00000000"  # options
            "00000000"  # option data
            "00000000"  # sender address
            "00000000"  # requester
            "687474703a2f2f6578616d706c652e636f6d2f00"  # URL + NUL
        )
        self.assertEqual(icp.encode(icp.query(1, URL)), expected)
        self.assertEqual(len(expected), 44)

    def test_querySrcRttRequester(self) -> None:
        """
        Flags and the requester address are written big-endian in their
        places.
        """
        expected = bytes.fromhex(
            "01 02 001b" "0000abcd" "40000000" "00000000" "00000000" "7f000002" "782f00"
        )
        message = icp.query(0xABCD, "x/", options=icp.FLAG_SRC_RTT, requester=0x7F000002)
        self.assertEqual(icp.encode(message), expected)

    def test_hitReply(self) -> None:
        """
        A HIT echoing reqnum 0x01020304 has no requester field: the URL
        starts at offset 20.
        """
        expected = bytes.fromhex(
            "02 02 0028" "01020304" "00000000" "00000000" "00000000"
            "687474703a2f2f6578616d706c652e636f6d2f00"
        )
        q = icp.query(0x01020304, URL)
        self.assertEqual(icp.encode(icp.reply(q, Opcode.HIT)), expected)
        self.assertEqual(icp.encodeReply(Opcode.HIT, 0x01020304, URL.encode()), expected)

    def test_srcRttReply(self) -> None:
        """
        A SRC_RTT MISS carries C{hops << 16 | rtt} in the option data word,
        as Squid sends it (1 hop, 1 ms is 0x00010001).
        """
        expected = bytes.fromhex("03 02 0017" "00000009" "40000000" "00010001" "00000000" "752f00")
        data = icp.encodeReply(Opcode.MISS, 9, b"u/", icp.FLAG_SRC_RTT, icp.srcRttData(1, 1))
        self.assertEqual(data, expected)

    def test_errEmptyUrl(self) -> None:
        """
        The ERR Squid sends for a badly framed query has an empty URL: a
        21-byte message ending in one NUL, and it decodes.
        """
        data = icp.encodeReply(Opcode.ERR, 3, b"")
        self.assertEqual(data, bytes.fromhex("04 02 0015 00000003 00000000 00000000 00000000 00"))
        self.assertEqual(icp.decode(data), Message(Opcode.ERR, 3, ""))

    def test_hitObj(self) -> None:
        """
        HIT_OBJ is URL, NUL, a 16-bit object size (not aligned) and the
        object.
        """
        message = Message(Opcode.HIT_OBJ, 2, "u", payload=b"abc")
        expected = bytes.fromhex("17 02 001b 00000002 00000000 00000000 00000000 7500 0003 616263")
        self.assertEqual(icp.encode(message), expected)
        self.assertEqual(icp.decode(expected), message)

    def test_latin1Url(self) -> None:
        """
        URL bytes above 0x7F survive decoding and re-encoding unchanged.
        """
        data = raw(Opcode.MISS, b"http://h/\xe9\xff\x80\x00")
        message = icp.decode(data)
        self.assertEqual(message.url, "http://h/\xe9\xff\x80")
        self.assertEqual(icp.encode(message), data)


class DecodeTableTests(SynchronousTestCase):
    """
    Each opcode decodes with its layout; each malformation has its reason.
    """

    def test_eachUrlOnlyOpcode(self) -> None:
        """
        Every opcode except QUERY and HIT_OBJ has the URL at offset 20, and
        decodes to the matching L{Opcode} member.
        """
        for opcode in URL_ONLY_OPCODES:
            message = icp.decode(raw(opcode, b"http://a/\x00", reqnum=opcode))
            self.assertEqual(
                (message.opcode, message.reqnum, message.url, message.requester, message.payload),
                (opcode, opcode, "http://a/", 0, None),
            )
            self.assertIs(type(message.opcode), Opcode)

    def test_queryLayout(self) -> None:
        """
        A QUERY's first four payload bytes are the requester address, not
        part of the URL.
        """
        message = icp.decode(raw(Opcode.QUERY, b"\x0a\x00\x00\x01http://a/\x00"))
        self.assertEqual((message.requester, message.url), (0x0A000001, "http://a/"))

    def test_headerFields(self) -> None:
        """
        All seven header fields land in the message.
        """
        data = struct.pack("!BBHIIII", 3, 3, 23, 1, 2, 3, 4) + b"ab\x00"
        message = icp.decode(data)
        self.assertEqual(
            (message.opcode, message.version, message.reqnum, message.options, message.optionData, message.senderAddress),
            (Opcode.MISS, 3, 1, 2, 3, 4),
        )

    def test_emptyUrlQuery(self) -> None:
        """
        A QUERY whose URL is just the NUL is well framed (deciding that an
        empty URL is bad is the responder's job).
        """
        self.assertEqual(icp.decode(raw(Opcode.QUERY, b"\0\0\0\0\0")).url, "")

    def assertReason(self, data: bytes, reason: str, withHeader: bool = True) -> DecodeError:
        """
        Assert that C{data} is rejected with C{reason}, and that the header
        is attached exactly when C{withHeader}.
        """
        error = self.assertRaises(DecodeError, icp.decode, data)
        self.assertEqual(error.reason, reason)
        self.assertIn(error.reason, icp.REASONS)
        if withHeader:
            self.assertEqual(error.header, icp.decodeHeader(data))
        else:
            self.assertIsNone(error.header)
        return error

    def test_short(self) -> None:
        """
        Anything under 20 bytes, including nothing, is C{short} and has no
        header.
        """
        for n in range(20):
            self.assertReason(header(1, n)[:n], icp.REASON_SHORT, withHeader=False)

    def test_lengthMismatch(self) -> None:
        """
        A length field one more or one less than the datagram, or zero, is
        C{length-mismatch}.
        """
        good = icp.encode(icp.query(1, URL))
        for length in (len(good) - 1, len(good) + 1, 0, 0xFFFF):
            data = struct.pack("!BBH", 1, 2, length) + good[4:]
            error = self.assertReason(data, icp.REASON_LENGTH)
            self.assertEqual(error.header.length, length)

    def test_tooLong(self) -> None:
        """
        A datagram over 16384 bytes is C{too-long} even when its length
        field matches; exactly 16384 bytes is accepted.
        """
        body = b"u" * (16384 - 20 - 1) + b"\0"
        self.assertEqual(len(icp.decode(raw(Opcode.MISS, body)).url), 16363)
        self.assertReason(raw(Opcode.MISS, b"u" + body), icp.REASON_TOO_LONG)

    def test_badVersion(self) -> None:
        """
        Versions other than 2 and 3 are C{bad-version}; 3 decodes like 2
        and keeps its version number.
        """
        for version in (0, 1, 4, 255):
            self.assertReason(raw(Opcode.QUERY, b"\0\0\0\0u\0", version=version), icp.REASON_VERSION)
        self.assertEqual(icp.decode(raw(Opcode.QUERY, b"\0\0\0\0u\0", version=3)).version, 3)

    def test_unknownOpcode(self) -> None:
        """
        Opcodes RFC 2186 lists as unused or Harvest-only (5-9, 12-20) and
        anything over 23 are C{unknown-opcode}, with the header attached so
        that the caller can log the opcode.
        """
        for opcode in [*range(5, 10), *range(12, 21), 24, 200, 255]:
            error = self.assertReason(raw(opcode, b"u\0"), icp.REASON_OPCODE)
            self.assertEqual(error.header.opcode, opcode)

    def test_badUrlFramingQuery(self) -> None:
        """
        A QUERY without room for the requester and a NUL, without a final
        NUL, with bytes after the NUL, or with an embedded NUL is
        C{bad-url-framing}, and the header's reqnum is there to answer with
        ERR.
        """
        for body in (b"", b"\0\0\0", b"\0\0\0\0", b"\0\0\0\0u", b"\0\0\0\0u\0x", b"\0\0\0\0u\0v\0"):
            error = self.assertReason(raw(Opcode.QUERY, body, reqnum=42), icp.REASON_URL)
            self.assertEqual(error.header.reqnum, 42)

    def test_badUrlFramingReply(self) -> None:
        """
        A reply with no payload, no NUL, trailing bytes or an embedded NUL
        is C{bad-url-framing}.
        """
        for opcode in URL_ONLY_OPCODES:
            for body in (b"", b"u", b"u\0x", b"u\0\0", b"\0u\0"):
                self.assertReason(raw(opcode, body), icp.REASON_URL)

    def test_hitObjFraming(self) -> None:
        """
        A HIT_OBJ with no NUL is C{bad-url-framing}; one with a missing or
        short size field, or an object shorter or longer than the size says,
        is C{bad-payload}.
        """
        self.assertReason(raw(Opcode.HIT_OBJ, b"u"), icp.REASON_URL)
        for body in (b"u\0", b"u\0\0", b"u\0\0\x02a", b"u\0\0\x02abc", b"u\0\0\0x"):
            self.assertReason(raw(Opcode.HIT_OBJ, body), icp.REASON_PAYLOAD)
        self.assertEqual(icp.decode(raw(Opcode.HIT_OBJ, b"u\0\0\0")).payload, b"")

    def test_errorStr(self) -> None:
        """
        The string form of a L{DecodeError} names the reason and the detail.
        """
        error = self.assertRaises(DecodeError, icp.decode, header(1, 99))
        self.assertEqual(str(error), "length-mismatch: length field 99, datagram 20 bytes")
        self.assertIsInstance(error, ValueError)

    def test_bytearray(self) -> None:
        """
        A C{bytearray} decodes like C{bytes}.
        """
        data = icp.encode(Message(Opcode.HIT_OBJ, 1, URL, payload=b"xy"))
        self.assertEqual(icp.decode(bytearray(data)), icp.decode(data))
        self.assertIs(type(icp.decode(bytearray(data)).payload), bytes)


class DecodeHeaderTests(SynchronousTestCase):
    """
    L{icp.decodeHeader} reads the header without validating it.
    """

    def test_fields(self) -> None:
        """
        The seven fields are read in order, even for nonsense values.
        """
        data = struct.pack("!BBHIIII", 99, 7, 1, 2, 3, 4, 5) + b"junk"
        self.assertEqual(icp.decodeHeader(data), Header(99, 7, 1, 2, 3, 4, 5))

    def test_short(self) -> None:
        """
        Fewer than 20 bytes raise C{short}.
        """
        error = self.assertRaises(DecodeError, icp.decodeHeader, b"\x01" * 19)
        self.assertEqual((error.reason, error.header), (icp.REASON_SHORT, None))


class EncodeTests(SynchronousTestCase):
    """
    L{icp.encode} refuses messages it cannot represent.
    """

    def assertRejected(self, message: Message) -> None:
        """
        Assert that encoding C{message} raises L{ValueError}.
        """
        self.assertRaises(ValueError, icp.encode, message)

    def test_fieldRanges(self) -> None:
        """
        Words must fit in 32 bits, opcode and version in 8, and none may be
        negative.
        """
        self.assertRejected(Message(1, -1, URL))
        self.assertRejected(Message(1, 2**32, URL))
        self.assertRejected(Message(2, 1, URL, options=2**32))
        self.assertRejected(Message(2, 1, URL, optionData=-1))
        self.assertRejected(Message(2, 1, URL, senderAddress=2**32))
        self.assertRejected(Message(1, 1, URL, requester=2**32))
        self.assertRejected(Message(256, 1, URL))
        self.assertRejected(Message(2, 1, URL, version=256))

    def test_badUrl(self) -> None:
        """
        A URL with a NUL, or with a character outside latin-1, is refused.
        """
        self.assertRejected(icp.query(1, "http://a/\0b"))
        self.assertRejected(icp.query(1, "http://a/\u20ac"))

    def test_misplacedFields(self) -> None:
        """
        C{requester} only goes with QUERY, C{payload} only with HIT_OBJ, and
        HIT_OBJ must have one.
        """
        self.assertRejected(Message(Opcode.HIT, 1, URL, requester=1))
        self.assertRejected(Message(Opcode.MISS, 1, URL, payload=b"x"))
        self.assertRejected(Message(Opcode.HIT_OBJ, 1, URL))
        self.assertRejected(Message(Opcode.HIT_OBJ, 1, URL, payload=b"x" * 65536))

    def test_tooLong(self) -> None:
        """
        A message of 16384 bytes encodes; one byte more is refused.
        """
        self.assertEqual(len(icp.encode(icp.query(1, "u" * 16359))), 16384)
        self.assertRejected(icp.query(1, "u" * 16360))
        self.assertEqual(len(icp.encodeReply(Opcode.MISS, 1, b"u" * 16363)), 16384)
        self.assertRaises(ValueError, icp.encodeReply, Opcode.MISS, 1, b"u" * 16364)

    def test_unknownOpcodeAndVersionEncodable(self) -> None:
        """
        Opcodes and versions that L{icp.decode} rejects can still be encoded,
        so that tests can send them; they are then rejected on decode.
        """
        data = icp.encode(Message(5, 1, URL, version=4))
        self.assertEqual(data[:2], b"\x05\x04")
        self.assertEqual(self.assertRaises(DecodeError, icp.decode, data).reason, icp.REASON_VERSION)


class HelperTests(SynchronousTestCase):
    """
    L{icp.query}, L{icp.reply}, SRC_RTT packing and display helpers.
    """

    def test_query(self) -> None:
        """
        L{icp.query} builds a version-2 QUERY with the given fields.
        """
        self.assertEqual(
            icp.query(5, URL, options=icp.FLAG_SRC_RTT, requester=9),
            Message(Opcode.QUERY, 5, URL, 2, icp.FLAG_SRC_RTT, 0, 0, 9, None),
        )

    def test_encodeQuery(self) -> None:
        """
        L{icp.encodeQuery} gives the bytes of L{icp.encode} of L{icp.query}
        (the querier's fast path), and refuses what L{icp.encode} refuses.
        """
        for reqnum, url, options in [
            (1, URL, 0),
            (0xFFFFFFFF, "http://h/\xe9?x", icp.FLAG_SRC_RTT),
            (7, "", 0),
            (8, "h" * (icp.MAX_MESSAGE_LENGTH - 25), 0),
        ]:
            self.assertEqual(
                icp.encodeQuery(reqnum, url.encode("latin-1"), options),
                icp.encode(icp.query(reqnum, url, options=options)),
                (reqnum, url, options),
            )
        for reqnum, url, options in [
            (1, b"http://h/\0x", 0),
            (1, b"h" * (icp.MAX_MESSAGE_LENGTH - 24), 0),
            (-1, b"http://h/", 0),
            (2**32, b"http://h/", 0),
            (1, b"http://h/", 2**32),
        ]:
            self.assertRaises(ValueError, icp.encodeQuery, reqnum, url, options)

    def test_replyEchoes(self) -> None:
        """
        L{icp.reply} echoes reqnum and URL, answers version 2 even to a
        version-3 query, and drops the query's flags and requester.
        """
        q = Message(Opcode.QUERY, 77, URL, version=3, options=icp.FLAG_HIT_OBJ, requester=5)
        r = icp.reply(q, Opcode.MISS_NOFETCH, options=icp.FLAG_SRC_RTT, optionData=12)
        self.assertEqual(r, Message(Opcode.MISS_NOFETCH, 77, URL, 2, icp.FLAG_SRC_RTT, 12))
        self.assertEqual(icp.decode(icp.encode(r)), r)

    def test_srcRtt(self) -> None:
        """
        SRC_RTT data is hops in the high half and milliseconds in the low
        half, each masked to 16 bits as Squid does.
        """
        self.assertEqual(icp.srcRttData(1, 1), 0x00010001)
        self.assertEqual(icp.srcRttData(300, 7), 0x0007012C)
        self.assertEqual(icp.srcRttData(0x10005, 0x20003), 0x00030005)
        self.assertEqual(icp.parseSrcRtt(0x0007012C), (300, 7))

    @given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
    def test_srcRttRoundTrip(self, rtt: int, hops: int) -> None:
        """
        Any 16-bit RTT and hop count survive packing and unpacking.
        """
        self.assertEqual(icp.parseSrcRtt(icp.srcRttData(rtt, hops)), (rtt, hops))

    def test_names(self) -> None:
        """
        Opcode and flag names are readable, including unknown values.
        """
        self.assertEqual(icp.opcodeName(21), "MISS_NOFETCH")
        self.assertEqual(icp.opcodeName(5), "UNKNOWN(5)")
        self.assertEqual(icp.flagNames(0), [])
        self.assertEqual(icp.flagNames(icp.FLAG_SRC_RTT | icp.FLAG_HIT_OBJ | 1), ["HIT_OBJ", "SRC_RTT", "0x00000001"])


class PropertyTests(SynchronousTestCase):
    """
    Hypothesis properties of the codec.
    """

    @given(messages())
    def test_roundTrip(self, message: Message) -> None:
        """
        Every valid message survives encode then decode unchanged, and its
        length field is its size.
        """
        data = icp.encode(message)
        self.assertEqual(icp.decode(data), message)
        self.assertEqual(icp.decodeHeader(data).length, len(data))

    @given(st.sampled_from(URL_ONLY_OPCODES), words, st.binary(max_size=200).filter(lambda b: b"\0" not in b))
    def test_encodeReplyMatchesEncode(self, opcode: int, reqnum: int, url: bytes) -> None:
        """
        The fast L{icp.encodeReply} produces exactly the bytes of L{icp.encode}
        for the equivalent reply message.
        """
        self.assertEqual(
            icp.encodeReply(opcode, reqnum, url),
            icp.encode(Message(opcode, reqnum, url.decode("latin-1"))),
        )

    @given(st.binary(max_size=400))
    @example(b"")
    @example(b"\x01\x02\x00\x15" + b"\0" * 17)
    @example(b"\x17\x02\x00\x16" + b"\0" * 18)
    @settings(max_examples=500)
    def test_arbitraryBytes(self, data: bytes) -> None:
        """
        Decoding arbitrary bytes either succeeds or raises L{DecodeError}
        with a known reason; nothing else escapes.
        """
        try:
            icp.decode(data)
        except DecodeError as e:
            self.assertIn(e.reason, icp.REASONS)
            self.assertEqual(e.header is None, len(data) < 20)

    @given(st.binary(min_size=20, max_size=400), st.sampled_from(sorted(icp.KNOWN_OPCODES)), st.sampled_from([2, 3]))
    @settings(max_examples=500)
    def test_arbitraryPayloads(self, data: bytes, opcode: int, version: int) -> None:
        """
        With a plausible header (known opcode, good version, correct length)
        and random payload bytes, decoding either succeeds with a message
        that re-encodes to the same bytes, or fails with a framing reason.
        """
        data = struct.pack("!BBH", opcode, version, len(data)) + data[4:]
        try:
            message = icp.decode(data)
        except DecodeError as e:
            self.assertIn(e.reason, (icp.REASON_URL, icp.REASON_PAYLOAD))
        else:
            self.assertEqual(icp.encode(message), data)

    @given(messages(), st.data())
    def test_truncationRejected(self, message: Message, data: st.DataObject) -> None:
        """
        Cutting any number of bytes off the end of a valid message makes it
        undecodable.
        """
        encoded = icp.encode(message)
        cut = data.draw(st.integers(1, len(encoded)))
        self.assertRaises(DecodeError, icp.decode, encoded[:-cut])

    @given(messages(), st.binary(min_size=1, max_size=50))
    def test_extensionRejected(self, message: Message, extra: bytes) -> None:
        """
        Appending any bytes to a valid message makes it undecodable.
        """
        self.assertRaises(DecodeError, icp.decode, icp.encode(message) + extra)

    @given(messages(), st.binary(min_size=1, max_size=50))
    def test_extensionWithFixedLengthRejected(self, message: Message, extra: bytes) -> None:
        """
        Appending bytes and patching the length field to match is still
        rejected: the payload framing pins the end of the message.
        """
        encoded = icp.encode(message) + extra
        assume(len(encoded) <= icp.MAX_MESSAGE_LENGTH)
        patched = encoded[:2] + struct.pack("!H", len(encoded)) + encoded[4:]
        error = self.assertRaises(DecodeError, icp.decode, patched)
        self.assertIn(error.reason, (icp.REASON_URL, icp.REASON_PAYLOAD))
