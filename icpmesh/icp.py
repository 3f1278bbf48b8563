# -*- test-case-name: tests.test_icp -*-
"""
The ICPv2 wire format (RFC 2186): pure functions, no I/O.

Every ICP message starts with a 20-byte header in network byte order::

    0       1       2               4
    +-------+-------+---------------+
    | opcode|version| message length|
    +-------+-------+---------------+
    |        request number         |  4
    +-------------------------------+
    |            options            |  8
    +-------------------------------+
    |          option data          | 12
    +-------------------------------+
    |      sender host address      | 16
    +-------------------------------+
    |            payload            | 20 ...

The payload of a QUERY is a 4-byte requester host address followed by the
URL and a NUL.  Every other opcode carries the URL and a NUL at offset 20;
HIT_OBJ then adds a 16-bit object size and the object.

L{decode} is strict (it is how Squid 5.7 with the 2026 ICP fixes validates
datagrams) and is the only function that looks at untrusted bytes: it raises
L{DecodeError}, and nothing else, for any input.  L{encodeReply} is the fast
path for a responder that already holds the URL as bytes.

URLs are bytes on the wire.  In L{Message} they are C{str} decoded as
latin-1, which maps every byte to one code point, so decoding and
re-encoding is lossless.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple, Optional

import attr

__all__ = [
    "Opcode",
    "KNOWN_OPCODES",
    "OPCODES_BY_NUMBER",
    "REPLY_OPCODES",
    "FLAG_HIT_OBJ",
    "FLAG_SRC_RTT",
    "FLAG_NAMES",
    "VERSION_2",
    "VERSION_3",
    "HEADER_LENGTH",
    "MAX_MESSAGE_LENGTH",
    "REASON_SHORT",
    "REASON_LENGTH",
    "REASON_VERSION",
    "REASON_OPCODE",
    "REASON_TOO_LONG",
    "REASON_URL",
    "REASON_PAYLOAD",
    "REASONS",
    "DecodeError",
    "Header",
    "Message",
    "decodeHeader",
    "decode",
    "encode",
    "encodeReply",
    "encodeQuery",
    "query",
    "reply",
    "srcRttData",
    "parseSrcRtt",
    "opcodeName",
    "flagNames",
]


class Opcode(enum.IntEnum):
    """
    The ICP opcodes icpmesh knows (RFC 2186 section 2).

    Opcodes 5 to 9 (Harvest leftovers) and 12 to 20 are not listed: Squid
    drops them as unknown, and so does L{decode}.
    """

    INVALID = 0
    QUERY = 1
    HIT = 2
    MISS = 3
    ERR = 4
    SECHO = 10
    DECHO = 11
    MISS_NOFETCH = 21
    DENIED = 22
    HIT_OBJ = 23


KNOWN_OPCODES: frozenset[int] = frozenset(int(o) for o in Opcode)
"""Every opcode value L{decode} accepts."""

REPLY_OPCODES: frozenset[int] = frozenset(
    int(o)
    for o in (
        Opcode.HIT,
        Opcode.MISS,
        Opcode.ERR,
        Opcode.SECHO,
        Opcode.DECHO,
        Opcode.MISS_NOFETCH,
        Opcode.DENIED,
        Opcode.HIT_OBJ,
    )
)
"""
Opcodes that arrive in answer to something we sent.  SECHO is included: it
is sent to an origin's UDP echo port and comes back unchanged, so a SECHO we
receive is a reply (RFC 2187 section 5.1.1); Squid never sends it and drops
it on receipt.
"""

FLAG_HIT_OBJ = 0x80000000
FLAG_SRC_RTT = 0x40000000

FLAG_NAMES: tuple[tuple[int, str], ...] = (
    (FLAG_HIT_OBJ, "HIT_OBJ"),
    (FLAG_SRC_RTT, "SRC_RTT"),
)
"""The option flags with their display names, highest bit first."""

VERSION_2 = 2
VERSION_3 = 3
HEADER_LENGTH = 20
MAX_MESSAGE_LENGTH = 16384

REASON_SHORT = "short"
REASON_LENGTH = "length-mismatch"
REASON_VERSION = "bad-version"
REASON_OPCODE = "unknown-opcode"
REASON_TOO_LONG = "too-long"
REASON_URL = "bad-url-framing"
REASON_PAYLOAD = "bad-payload"

REASONS: frozenset[str] = frozenset(
    (
        REASON_SHORT,
        REASON_LENGTH,
        REASON_VERSION,
        REASON_OPCODE,
        REASON_TOO_LONG,
        REASON_URL,
        REASON_PAYLOAD,
    )
)
"""Every value L{DecodeError.reason} can take."""

_HEADER = struct.Struct("!BBHIIII")
_QUERY_HEADER = struct.Struct("!BBHIIIII")
_UINT16 = struct.Struct("!H")
_UINT32 = struct.Struct("!I")

# int -> Opcode member; one dict lookup both checks and converts.
#: Opcode number -> L{Opcode}, for decoders (a dict look-up is cheaper
#: than calling the enum).
OPCODES_BY_NUMBER: dict[int, Opcode] = {int(o): o for o in Opcode}
_QUERY = 1
_HIT_OBJ = 23
_VERSIONS = frozenset((VERSION_2, VERSION_3))
_UINT32_MAX = 0xFFFFFFFF
# Longest URL that fits in a non-QUERY message: header + URL + NUL.
_MAX_REPLY_URL = MAX_MESSAGE_LENGTH - HEADER_LENGTH - 1


class Header(NamedTuple):
    """
    The fixed 20-byte ICP header, as read from the wire (no checks).
    """

    opcode: int
    version: int
    length: int
    reqnum: int
    options: int
    optionData: int
    senderAddress: int


class DecodeError(ValueError):
    """
    A datagram is not a well-formed ICP message.

    @ivar reason: one of the C{REASON_*} constants, short enough to be used
        as a counter name.
    @ivar header: the parsed L{Header} when the first 20 bytes were there
        (every reason except L{REASON_SHORT}), else C{None}.
    """

    def __init__(self, reason: str, header: Optional[Header] = None, detail: str = "") -> None:
        ValueError.__init__(self, reason, header, detail)
        self.reason = reason
        self.header = header
        self.detail = detail

    def __str__(self) -> str:
        if self.detail:
            return f"{self.reason}: {self.detail}"
        return self.reason


@attr.s(slots=True, frozen=True, auto_attribs=True)
class Message:
    """
    One ICP message.

    @ivar opcode: an L{Opcode} value (decoded messages carry the L{Opcode}
        member itself).
    @ivar reqnum: the request number, echoed in replies.
    @ivar url: the URL, decoded from the wire as latin-1.
    @ivar version: 2, or 3 for a message that arrived as ICPv3.
    @ivar options: option flags (L{FLAG_HIT_OBJ}, L{FLAG_SRC_RTT}).
    @ivar optionData: the option data word (see L{srcRttData}).
    @ivar senderAddress: the Sender Host Address word (always 0 from Squid).
    @ivar requester: QUERY only: the Requester Host Address word.
    @ivar payload: HIT_OBJ only: the object bytes.
    """

    opcode: int
    reqnum: int
    url: str
    version: int = VERSION_2
    options: int = 0
    optionData: int = 0
    senderAddress: int = 0
    requester: int = 0
    payload: Optional[bytes] = None


def decodeHeader(data: bytes) -> Header:
    """
    Read the 20-byte header of a datagram without checking it.

    @param data: the datagram.
    @return: the header fields.
    @raise DecodeError: (L{REASON_SHORT}) if C{data} has fewer than 20 bytes.
    """
    if len(data) < HEADER_LENGTH:
        raise DecodeError(REASON_SHORT, None, f"{len(data)} bytes")
    return Header._make(_HEADER.unpack_from(data))


def decode(data: bytes) -> Message:
    """
    Parse and validate one ICP datagram.

    Checks, in this order: at least 20 bytes; at most L{MAX_MESSAGE_LENGTH}
    bytes; the length field equals the datagram size; version 2 or 3; a
    known opcode; then the payload framing: QUERY has a 4-byte requester
    address and a URL, other opcodes a URL at offset 20, and the URL ends
    with the datagram's last byte, a NUL, with no NUL inside it.  HIT_OBJ
    instead has URL, NUL, a 16-bit object size and exactly that many bytes.

    @param data: one datagram, as received.
    @return: the message; its C{opcode} is an L{Opcode} member.
    @raise DecodeError: for any input that is not a valid message, and
        never any other exception.
    """
    size = len(data)
    if size < HEADER_LENGTH:
        raise DecodeError(REASON_SHORT, None, f"{size} bytes")
    fields = _HEADER.unpack_from(data)
    opcode, version, length, reqnum, options, optionData, sender = fields
    if size > MAX_MESSAGE_LENGTH:
        raise DecodeError(REASON_TOO_LONG, Header._make(fields), f"{size} bytes")
    if length != size:
        raise DecodeError(
            REASON_LENGTH,
            Header._make(fields),
            f"length field {length}, datagram {size} bytes",
        )
    if version not in _VERSIONS:
        raise DecodeError(REASON_VERSION, Header._make(fields), f"version {version}")
    op = OPCODES_BY_NUMBER.get(opcode)
    if op is None:
        raise DecodeError(REASON_OPCODE, Header._make(fields), f"opcode {opcode}")

    if opcode == _QUERY:
        # Requester address (4 bytes), then at least the NUL.
        if size < 25:
            raise DecodeError(REASON_URL, Header._make(fields), "no room for requester and URL")
        end = data.find(b"\0", 24)
        if end != size - 1:
            raise DecodeError(REASON_URL, Header._make(fields), "URL not NUL-terminated at the end")
        (requester,) = _UINT32.unpack_from(data, 20)
        return Message(
            op,
            reqnum,
            data[24:end].decode("latin-1"),
            version,
            options,
            optionData,
            sender,
            requester,
            None,
        )

    end = data.find(b"\0", HEADER_LENGTH)
    if opcode == _HIT_OBJ:
        if end < 0:
            raise DecodeError(REASON_URL, Header._make(fields), "URL not NUL-terminated")
        if end + 3 > size:
            raise DecodeError(REASON_PAYLOAD, Header._make(fields), "no object size")
        (objectSize,) = _UINT16.unpack_from(data, end + 1)
        if end + 3 + objectSize != size:
            raise DecodeError(
                REASON_PAYLOAD,
                Header._make(fields),
                f"object size {objectSize}, {size - end - 3} bytes present",
            )
        return Message(
            op,
            reqnum,
            data[HEADER_LENGTH:end].decode("latin-1"),
            version,
            options,
            optionData,
            sender,
            0,
            bytes(data[end + 3 :]),
        )

    if end != size - 1:
        raise DecodeError(REASON_URL, Header._make(fields), "URL not NUL-terminated at the end")
    return Message(
        op,
        reqnum,
        data[HEADER_LENGTH:end].decode("latin-1"),
        version,
        options,
        optionData,
        sender,
        0,
        None,
    )


def _checkWord(name: str, value: int, maximum: int) -> None:
    if not isinstance(value, int) or not 0 <= value <= maximum:
        raise ValueError(f"{name} must be an integer from 0 to {maximum}, not {value!r}")


def encode(message: Message) -> bytes:
    """
    Serialise a message.

    Any opcode and version byte (0 to 255) can be encoded, so tests can
    build messages that L{decode} (and Squid) would reject; the messages
    L{decode} accepts are exactly those that round-trip.

    @param message: the message to encode.
    @return: the datagram.
    @raise ValueError: if a field is out of range, the URL contains a NUL or
        a character above U+00FF, C{requester} is set on a non-QUERY,
        C{payload} is missing on a HIT_OBJ or present on anything else, or
        the result would exceed L{MAX_MESSAGE_LENGTH} bytes.
    """
    opcode = int(message.opcode)
    _checkWord("opcode", opcode, 0xFF)
    _checkWord("version", message.version, 0xFF)
    _checkWord("reqnum", message.reqnum, _UINT32_MAX)
    _checkWord("options", message.options, _UINT32_MAX)
    _checkWord("optionData", message.optionData, _UINT32_MAX)
    _checkWord("senderAddress", message.senderAddress, _UINT32_MAX)
    _checkWord("requester", message.requester, _UINT32_MAX)
    try:
        url = message.url.encode("latin-1")
    except (UnicodeEncodeError, AttributeError):
        raise ValueError(f"URL must be a str of latin-1 characters: {message.url!r}")
    if b"\0" in url:
        raise ValueError("URL contains a NUL byte")
    if opcode == _QUERY:
        body = _UINT32.pack(message.requester) + url + b"\0"
    else:
        if message.requester:
            raise ValueError("requester is only carried by QUERY messages")
        body = url + b"\0"
    if opcode == _HIT_OBJ:
        payload = message.payload
        if payload is None:
            raise ValueError("a HIT_OBJ message needs a payload")
        if len(payload) > 0xFFFF:
            raise ValueError("HIT_OBJ payload longer than 65535 bytes")
        body += _UINT16.pack(len(payload)) + bytes(payload)
    elif message.payload is not None:
        raise ValueError("payload is only carried by HIT_OBJ messages")
    length = HEADER_LENGTH + len(body)
    if length > MAX_MESSAGE_LENGTH:
        raise ValueError(f"message of {length} bytes exceeds {MAX_MESSAGE_LENGTH}")
    return (
        _HEADER.pack(
            opcode,
            message.version,
            length,
            message.reqnum,
            message.options,
            message.optionData,
            message.senderAddress,
        )
        + body
    )


def encodeReply(
    opcode: int, reqnum: int, url: bytes, options: int = 0, optionData: int = 0
) -> bytes:
    """
    Fast path: encode a version-2 reply (URL at offset 20, sender 0).

    Nothing is validated except the total length: the caller passes a
    reply opcode, a 32-bit C{reqnum}, and C{url} exactly as it should be
    echoed (normally the bytes of the query's URL, which L{decode} has
    already checked for NULs).  Not for HIT_OBJ, which needs a payload.

    @param opcode: the reply opcode.
    @param reqnum: the query's request number.
    @param url: the URL bytes, without NUL.
    @param options: option flags.
    @param optionData: option data word.
    @return: the datagram.
    @raise ValueError: if the reply would exceed L{MAX_MESSAGE_LENGTH}.
    """
    n = len(url)
    if n > _MAX_REPLY_URL:
        raise ValueError(f"URL of {n} bytes does not fit in an ICP reply")
    return _HEADER.pack(opcode, VERSION_2, HEADER_LENGTH + 1 + n, reqnum, options, optionData, 0) + url + b"\0"


def encodeQuery(reqnum: int, url: bytes, options: int = 0) -> bytes:
    """
    Fast path: encode a version-2 QUERY (requester address, option data
    and sender address 0, as Squid sends), the same bytes as
    C{encode(query(reqnum, url.decode("latin-1"), options))}.

    @param reqnum: the request number, 0 to 2**32-1.
    @param url: the URL bytes, without NUL.
    @param options: option flags.
    @return: the datagram.
    @raise ValueError: if C{reqnum} or C{options} is out of range, the URL
        contains a NUL, or the query would exceed L{MAX_MESSAGE_LENGTH}.
    """
    length = HEADER_LENGTH + 5 + len(url)
    if length > MAX_MESSAGE_LENGTH:
        raise ValueError(f"message of {length} bytes exceeds {MAX_MESSAGE_LENGTH}")
    if b"\0" in url:
        raise ValueError("URL contains a NUL byte")
    try:
        header = _QUERY_HEADER.pack(_QUERY, VERSION_2, length, reqnum, options, 0, 0, 0)
    except struct.error:
        raise ValueError(f"reqnum {reqnum!r} or options {options!r} out of range") from None
    return header + url + b"\0"


def query(reqnum: int, url: str, options: int = 0, requester: int = 0) -> Message:
    """
    Build a version-2 QUERY.

    @param reqnum: the request number.
    @param url: the URL to ask about.
    @param options: option flags (L{FLAG_SRC_RTT}, L{FLAG_HIT_OBJ}).
    @param requester: the Requester Host Address word (Squid sends 0).
    @return: the message.
    """
    return Message(Opcode.QUERY, reqnum, url, options=options, requester=requester)


def reply(
    queryMessage: Message,
    opcode: int,
    options: int = 0,
    optionData: int = 0,
    payload: Optional[bytes] = None,
) -> Message:
    """
    Build the version-2 reply to a query, echoing its request number and URL.

    @param queryMessage: the query being answered.
    @param opcode: the reply opcode.
    @param options: option flags (a reply sets L{FLAG_SRC_RTT} only if the
        query asked for it).
    @param optionData: option data word (see L{srcRttData}).
    @param payload: the object, for HIT_OBJ only.
    @return: the message.
    """
    return Message(
        opcode,
        queryMessage.reqnum,
        queryMessage.url,
        VERSION_2,
        options,
        optionData,
        payload=payload,
    )


def srcRttData(rttMs: int, hops: int) -> int:
    """
    Pack an origin round-trip time and hop count into the option data word
    of a SRC_RTT reply, as Squid does: C{(hops & 0xFFFF) << 16 | (rttMs &
    0xFFFF)}.

    @param rttMs: round-trip time to the origin in milliseconds.
    @param hops: hop count to the origin.
    @return: the option data word.
    """
    return ((int(hops) & 0xFFFF) << 16) | (int(rttMs) & 0xFFFF)


def parseSrcRtt(optionData: int) -> tuple[int, int]:
    """
    Unpack the option data word of a SRC_RTT reply.

    @param optionData: the option data word.
    @return: C{(rttMs, hops)}.
    """
    return optionData & 0xFFFF, (optionData >> 16) & 0xFFFF


def opcodeName(opcode: int) -> str:
    """
    Display name of an opcode, including unknown ones (C{"UNKNOWN(5)"}).

    @param opcode: the opcode value.
    @return: the name.
    """
    op = OPCODES_BY_NUMBER.get(opcode)
    return op.name if op is not None else f"UNKNOWN({opcode})"


def flagNames(options: int) -> list[str]:
    """
    Names of the option flags set in C{options}; bits with no name are
    shown as hexadecimal (C{"0x00000001"}).

    @param options: the options word.
    @return: the names, highest bit first; empty when no flag is set.
    """
    names = []
    rest = options
    for bit, name in FLAG_NAMES:
        if options & bit:
            names.append(name)
            rest &= ~bit
    if rest:
        names.append(f"0x{rest:08x}")
    return names
