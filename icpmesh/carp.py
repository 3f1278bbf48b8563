# -*- test-case-name: tests.test_carp -*-
"""
The Cache Array Routing Protocol (CARP) maths, and its membership table.

CARP (draft-vinod-carp-v1-03) splits URL space among the members of a
proxy array without any messages between them: every member gets a
I{score} for a URL from a hash of the URL, a hash of the member's name and a
I{load factor multiplier} computed from the members' relative load factors
(their C{weight=}), and the URL goes to the member with the highest score.
When that member is down, the URL goes to the member with the next highest
score, so only the URLs of the missing member move.

Two variants are implemented, because the one deployed caches use is not the
one the draft describes:

  - L{SQUID} (the default) routes every URL exactly as Squid 5.7 does
    (C{src/carp.cc}).  Squid hashes the request key I{again} for every
    member, in the members' sorted order, without resetting the running
    hash: member I{k} is scored with the hash of the key repeated I{k+1}
    times.  Its characters are C{char}, which is signed on x86, so bytes of
    0x80 and above are added as negative numbers.  Load factors below 0.001
    count as 0 and multipliers are doubles.
  - L{DRAFT} follows the draft to the letter: one hash of the key for all
    members, member names in lower case, unsigned characters, multipliers
    rounded to 32-bit floats as each is computed, no 0.001 cut-off.

Both take the I{key} from the request URL the way Squid does: its
L{effectiveRequestUri} (scheme and host in lower case, default port
dropped, empty path as C{/}), or the parts a member's C{carp-key=} selects
(L{carpKey}).

Squid's C{sourcehash} uses the same member hashes and multipliers over a
key (the client's address) that is hashed once: build a L{CARPArray} with
C{repeatKey=False}.

The array membership table (draft section 2) is a small text document a
member publishes over HTTP so that clients can build the same array:
L{renderTable} writes one and L{parseTable} reads one.

Everything here is pure computation: no I/O, no reactor.
"""

from __future__ import annotations

import ipaddress
import math
import re
import struct
import zlib
from collections import OrderedDict
from typing import Callable, Iterable, Optional, Sequence, Union

import attr

#: Squid 5.7's routing (the default).
SQUID = "squid"
#: draft-vinod-carp-v1-03 to the letter.
DRAFT = "draft"
VARIANTS = (SQUID, DRAFT)

#: The names a C{carp-key=} option may list, in the order they are joined.
KEY_PARTS = ("scheme", "host", "port", "path", "params")

MASK32 = 0xFFFFFFFF
#: The draft's spreading constant.
SPREAD = 0x62531965

#: Default ports Squid leaves out of an effective request URI.
SCHEME_PORTS = {
    "http": 80,
    "https": 443,
    "ftp": 21,
    "gopher": 70,
    "wais": 210,
    "whois": 43,
    "cache_object": 3128,
}


class TableError(ValueError):
    """
    An array membership table could not be parsed.

    @ivar lineno: the 1-based line the problem is on, when there is one.
    """

    def __init__(self, reason: str, lineno: Optional[int] = None) -> None:
        self.reason = reason
        self.lineno = lineno
        where = f"line {lineno}: " if lineno is not None else ""
        super().__init__(f"CARP membership table: {where}{reason}")


# ---------------------------------------------------------------------------
# Hashing


def rotateLeft(value: int, bits: int) -> int:
    """
    Rotate a 32-bit unsigned integer left by C{bits} (0 < bits < 32).
    """
    value &= MASK32
    return ((value << bits) | (value >> (32 - bits))) & MASK32


def _toBytes(text: Union[str, bytes]) -> bytes:
    """
    The bytes a C program would see: URLs in icpmesh are the request's bytes
    decoded as Latin-1, so encoding back gives the original bytes; text
    that is not Latin-1 (a config file name) is taken as UTF-8.
    """
    if isinstance(text, bytes):
        return text
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")


def hashKey(key: Union[str, bytes], start: int = 0, signedChars: bool = True) -> int:
    """
    The CARP string hash (draft section 3.1): for each character C{c},
    C{h += rotl(h, 19) + c}, in unsigned 32-bit arithmetic.

    @param key: the text (a URL, a client address); C{str} is taken as
        Latin-1 bytes (see L{_toBytes}).
    @param start: the running hash to continue from (Squid's quirk hashes
        the key again starting from the previous result).
    @param signedChars: add bytes of 0x80 and above as negative numbers, as
        C{char} on x86 does (Squid); C{False} for unsigned characters.
    @return: the hash, an unsigned 32-bit integer.
    """
    h = start & MASK32
    # h + rotl(h, 19) == h * (2**19 + 1) + (h >> 13)  (mod 2**32): the two
    # halves of the rotation do not overlap, so "|" is "+".
    if signedChars:
        for c in _toBytes(key):
            h = (h * 524289 + (h >> 13) + (c - 256 if c > 127 else c)) & MASK32
    else:
        for c in _toBytes(key):
            h = (h * 524289 + (h >> 13) + c) & MASK32
    return h


def _repeatedHashes(key: bytes, count: int) -> list[int]:
    """
    Squid's running hash after each of C{count} passes over C{key}.
    """
    out = []
    h = 0
    data = [c - 256 if c > 127 else c for c in key]
    for _ in range(count):
        for c in data:
            h = (h * 524289 + (h >> 13) + c) & MASK32
        out.append(h)
    return out


def memberHash(name: Union[str, bytes], draft: bool = False) -> int:
    """
    A member's hash (draft section 3.1): the string hash of its name, then
    C{h += h * 0x62531965; h = rotl(h, 21)}.

    @param name: the member name; for Squid the C{cache_peer} C{name=}
        (else the host as written), case-sensitive.
    @param draft: hash the name in lower case with unsigned characters, as
        the draft says.
    """
    if draft:
        h = hashKey(name.lower(), signedChars=False)
    else:
        h = hashKey(name, signedChars=True)
    h = (h + h * SPREAD) & MASK32
    return rotateLeft(h, 21)


def combineHashes(keyHash: int, member: int) -> int:
    """
    Combine a key hash with a member hash (draft section 3.2).
    """
    h = (keyHash ^ member) & MASK32
    h = (h + h * SPREAD) & MASK32
    return rotateLeft(h, 21)


def _float32(value: float) -> float:
    return float(struct.unpack("f", struct.pack("f", value))[0])


def _divide(numerator: float, denominator: float) -> float:
    """
    IEEE division as C does it: by zero gives an infinity (or NaN for
    0/0).  It happens when a load factor was cut to 0: the product of the
    multipliers so far is then 0, and the next member's multiplier is
    infinite, as in Squid.
    """
    if denominator == 0.0:
        if numerator == 0.0 or math.isnan(numerator):
            return math.nan
        return math.copysign(math.inf, numerator)
    return numerator / denominator


def _power(base: float, exponent: float) -> float:
    try:
        return math.pow(base, exponent)
    except ValueError:
        return math.nan


def loadFactors(weights: Sequence[int], draft: bool = False) -> list[float]:
    """
    Each member's share of the load, C{weight / sum(weights)}.  Squid sets
    a share below 0.001 to 0 (such a member never wins); the draft does not.
    """
    total = float(sum(weights))
    if total <= 0:
        return [0.0 for _ in weights]
    factors = []
    for w in weights:
        p = float(w) / total
        if not draft and math.floor(p * 1000.0) == 0.0:
            p = 0.0
        factors.append(p)
    return factors


def loadMultipliers(factors: Sequence[float], draft: bool = False) -> list[float]:
    """
    The load factor multipliers (draft section 3.3) for load factors given
    in ascending order::

        X_k = ((K-k+1) * (P_k - P_{k-1}) / (X_1 * ... * X_{k-1})
               + X_{k-1} ** (K-k+1)) ** (1 / (K-k+1))

    with C{P_0 = X_0 = 0}.  Doubles for Squid; with C{draft}, each X_k and
    the running product are rounded to 32-bit floats ("All X_n values are
    32 bit floating point numbers").
    """
    count = len(factors)
    previousFactor = 0.0
    previousX = 0.0
    product = 1.0
    result = []
    for k in range(1, count + 1):
        kk1 = float(count - k + 1)
        factor = factors[k - 1]
        x = _divide(kk1 * (factor - previousFactor), product)
        x += math.pow(previousX, kk1)
        x = _power(x, 1.0 / kk1)
        if draft:
            x = _float32(x)
        product *= x
        if draft:
            product = _float32(product)
        result.append(x)
        previousX = x
        previousFactor = factor
    return result


# ---------------------------------------------------------------------------
# Keys


@attr.s(slots=True, frozen=True, auto_attribs=True)
class URIParts:
    """
    A request URI split the way Squid splits it.

    @ivar scheme: lower case.
    @ivar host: lower case, trailing dots removed, IPv6 in brackets.
    @ivar port: the port, defaulted from the scheme.
    @ivar path: the path and query (C{/} at least), as received.
    @ivar userInfo: kept only for C{ftp} (Squid prints it only there).
    """

    scheme: str
    host: str
    port: int
    path: str
    userInfo: str = ""

    def effective(self) -> str:
        """
        The absolute URI Squid hashes (C{HttpRequest::effectiveRequestUri}).
        """
        out = self.scheme + "://"
        if self.userInfo:
            out += self.userInfo + "@"
        out += self.host
        if self.port != SCHEME_PORTS.get(self.scheme, 0):
            out += f":{self.port}"
        return out + self.path


def splitURI(url: str) -> URIParts:
    """
    Split an absolute URL as Squid's URL parser does.

    @raise ValueError: if C{url} is not C{scheme://host...}.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme:
        raise ValueError(f"not an absolute URL: {url!r}")
    scheme = scheme.lower()
    end = len(rest)
    for i, ch in enumerate(rest):
        if ch in "/?#" or ch.isspace():
            end = i
            break
    authority, path = rest[:end], rest[end:]
    if not path or path[0] in "?#":
        path = "/" + path
    for stop in "\r\n":
        cut = path.find(stop)
        if cut >= 0:
            path = path[:cut]
    userInfo, at, hostPort = authority.rpartition("@")
    if not at:
        userInfo, hostPort = "", authority
    port: Optional[int] = None
    if hostPort.startswith("["):
        close = hostPort.find("]")
        host = hostPort[1:close] if close > 0 else hostPort[1:]
        after = hostPort[close + 1 :] if close > 0 else ""
        if after.startswith(":") and after[1:].isdigit():
            port = int(after[1:])
    elif hostPort.count(":") == 1:
        host, _, portText = hostPort.partition(":")
        if portText.isdigit():
            port = int(portText)
    else:
        host = hostPort
    host = host.lower().rstrip(".")
    if not host:
        raise ValueError(f"no host in URL: {url!r}")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        host = f"[{address.compressed}]" if address.version == 6 else str(address)
    if port is None:
        port = SCHEME_PORTS.get(scheme, 0)
    return URIParts(scheme, host, port, path, userInfo if scheme == "ftp" else "")


def effectiveRequestUri(url: str) -> str:
    """
    The URI Squid's CARP hashes for a request to C{url}: scheme and host in
    lower case, user info dropped (except for C{ftp}), the port only when it
    is not the scheme's default, and C{/} for an empty path.  Path and query
    are kept exactly as received.

    >>> effectiveRequestUri("HTTP://Example.COM:80")
    'http://example.com/'

    @raise ValueError: if C{url} is not absolute.
    """
    return splitURI(url).effective()


def parseKeyParts(text: str) -> tuple[str, ...]:
    """
    Parse a C{carp-key=} value, a comma-separated list of
    C{scheme}, C{host}, C{port}, C{path}, C{params}.

    @return: the parts in the order they are joined (L{KEY_PARTS} order).
    @raise ValueError: for an unknown or empty part.
    """
    words = [w.strip().lower() for w in text.split(",")]
    for word in words:
        if word not in KEY_PARTS:
            raise ValueError(
                f"unknown carp-key part {word!r}; use a comma-separated list of "
                + ", ".join(KEY_PARTS)
            )
    return tuple(p for p in KEY_PARTS if p in words)


def carpKey(parts: URIParts, keyParts: Sequence[str]) -> str:
    """
    The key a member with C{carp-key=keyParts} hashes, joined in URI order:
    C{scheme://}, host, C{:port} (always written), the path without the
    query, C{?query}.  An empty key (no parts, or only an absent query)
    falls back to the whole effective URI, as in Squid.
    """
    if not keyParts:
        return parts.effective()
    key = ""
    if "scheme" in keyParts and parts.scheme:
        key += parts.scheme + "://"
    if "host" in keyParts:
        key += parts.host
    if "port" in keyParts:
        key += f":{parts.port}"
    path, question, query = parts.path.partition("?")
    if "path" in keyParts:
        key += path
    if "params" in keyParts and question:
        key += "?" + query
    return key or parts.effective()


# ---------------------------------------------------------------------------
# The array


@attr.s(slots=True, frozen=True, auto_attribs=True)
class ArrayMember:
    """
    One member of a CARP array.

    @ivar name: the name that is hashed (Squid: C{cache_peer name=}, else
        the host as written).
    @ivar weight: its relative load factor (C{weight=}); members with
        weight 0 are left out, as in Squid.
    @ivar keyParts: its C{carp-key=} parts (L{parseKeyParts}); empty for
        the whole effective URI.
    """

    name: str
    weight: int = 1
    keyParts: tuple[str, ...] = ()


class CARPArray:
    """
    A CARP array: member hashes and load factor multipliers computed once,
    then a score per member for any key.

    @ivar members: the members, in the order given (config order).
    @ivar sortedMembers: the members taking part, by weight ascending
        (stable: equal weights keep config order, as glibc's C{qsort}
        does for Squid); the order scores are computed in.
    @ivar hashes: member hash of each of L{sortedMembers}.
    @ivar factors: load factor of each of L{sortedMembers}.
    @ivar multipliers: load factor multiplier of each of L{sortedMembers}.
    @ivar variant: L{SQUID} or L{DRAFT}.
    @ivar repeatKey: whether Squid's quirk applies (member I{k} scored with
        the key hashed I{k+1} times).
    """

    def __init__(
        self,
        members: Iterable[ArrayMember],
        variant: str = SQUID,
        repeatKey: Optional[bool] = None,
        cacheSize: int = 4096,
    ) -> None:
        """
        @param members: the members in config order.
        @param variant: L{SQUID} or L{DRAFT}.
        @param repeatKey: override Squid's repeated-key quirk (default: on
            for L{SQUID}, off for L{DRAFT}); C{sourcehash} turns it off.
        @param cacheSize: how many keys' rankings to remember (0: none).
        @raise ValueError: for an unknown variant or duplicate member names.
        """
        if variant not in VARIANTS:
            raise ValueError(f"unknown CARP variant {variant!r}; use squid or draft")
        self.variant = variant
        draft = variant == DRAFT
        self.repeatKey = (not draft) if repeatKey is None else repeatKey
        self.members = tuple(members)
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError("CARP member names must be unique")
        taking = [m for m in self.members if m.weight > 0]
        factors = loadFactors([m.weight for m in taking], draft=draft)
        ranked = sorted(range(len(taking)), key=lambda i: taking[i].weight)
        self.sortedMembers = tuple(taking[i] for i in ranked)
        self.factors = tuple(factors[i] for i in ranked)
        self.multipliers = tuple(loadMultipliers(self.factors, draft=draft))
        self.hashes = tuple(memberHash(m.name, draft=draft) for m in self.sortedMembers)
        self._signed = not draft
        self._sameKey = len({m.keyParts for m in self.sortedMembers}) <= 1
        self._cacheSize = cacheSize
        self._cache: "OrderedDict[str, tuple[tuple[ArrayMember, float], ...]]" = OrderedDict()

    def __len__(self) -> int:
        return len(self.sortedMembers)

    def _keys(self, url: str) -> list[bytes]:
        if not self.sortedMembers:
            return []
        parts = splitURI(url)
        if self._sameKey:
            return [_toBytes(carpKey(parts, self.sortedMembers[0].keyParts))]
        return [_toBytes(carpKey(parts, m.keyParts)) for m in self.sortedMembers]

    def keyHashes(self, url: str) -> list[int]:
        """
        The key hash each of L{sortedMembers} is scored with for C{url}.

        @raise ValueError: if C{url} is not absolute.
        """
        keys = self._keys(url)
        if not keys:
            return []
        if self._sameKey:
            return self.hashesForKey(keys[0])
        if not self.repeatKey:
            return [hashKey(k, signedChars=self._signed) for k in keys]
        out = []
        h = 0
        for key in keys:
            h = hashKey(key, start=h, signedChars=True)
            out.append(h)
        return out

    def hashesForKey(self, key: Union[str, bytes]) -> list[int]:
        """
        The key hash each of L{sortedMembers} is scored with when every
        member hashes the same C{key} (a client address for C{sourcehash},
        a CONNECT authority): repeated for Squid's quirk, else one hash.
        """
        if not self.sortedMembers:
            return []
        data = _toBytes(key)
        if self.repeatKey:
            return _repeatedHashes(data, len(self.sortedMembers))
        return [hashKey(data, signedChars=self._signed)] * len(self.sortedMembers)

    def scoresForHashes(self, keyHashes: Sequence[int]) -> list[tuple[ArrayMember, float]]:
        """
        Each member's score, in L{sortedMembers} order, from its key hash.
        """
        return [
            (m, combineHashes(h, mh) * x)
            for m, h, mh, x in zip(self.sortedMembers, keyHashes, self.hashes, self.multipliers)
        ]

    def scores(self, url: str) -> list[tuple[ArrayMember, float]]:
        """
        Each member's score for C{url}, in L{sortedMembers} order.

        @raise ValueError: if C{url} is not absolute.
        """
        return self.scoresForHashes(self.keyHashes(url))

    def rankHashes(self, cacheKey: str, keyHashes: Callable[[], Sequence[int]]) -> tuple[tuple[ArrayMember, float], ...]:
        """
        Members by score, best first, remembered under C{cacheKey}; ties go
        to the member earlier in L{sortedMembers} (Squid keeps the first of
        equal scores).
        """
        cache = self._cache
        ranking = cache.get(cacheKey)
        if ranking is not None:
            cache.move_to_end(cacheKey)
            return ranking
        scored = self.scoresForHashes(keyHashes())
        # NaN (0 times an infinite multiplier) never wins, as in C.
        order = sorted(
            range(len(scored)),
            key=lambda i: (math.inf if math.isnan(scored[i][1]) else -scored[i][1], i),
        )
        ranking = tuple(scored[i] for i in order)
        if self._cacheSize:
            cache[cacheKey] = ranking
            if len(cache) > self._cacheSize:
                cache.popitem(last=False)
        return ranking

    def ranking(self, url: str) -> tuple[tuple[ArrayMember, float], ...]:
        """
        The members and their scores for C{url}, best first.  Scores do not
        depend on which members are up, so the ranking is remembered for
        the last few thousand URLs.

        @raise ValueError: if C{url} is not absolute.
        """
        return self.rankHashes(url, lambda: self.keyHashes(url))

    def select(
        self, url: str, usable: Callable[[ArrayMember], bool] = lambda m: True
    ) -> Optional[ArrayMember]:
        """
        The member C{url} goes to: the highest score among members for which
        C{usable} is true.  A member whose score is 0 never wins (Squid
        starts from a high score of 0 and wants a greater one).

        @raise ValueError: if C{url} is not absolute.
        """
        for member, score in self.ranking(url):
            if score > 0 and usable(member):
                return member
        return None


# ---------------------------------------------------------------------------
# The array membership table (draft section 2)

TABLE_VERSION = "1.0"
_TABLE_HEAD = re.compile(r"^Proxy\s+Array\s+Information\s*/\s*(\d+)(?:\.(\d+))?\s*$", re.I)


@attr.s(slots=True, frozen=True, auto_attribs=True)
class TableMember:
    """
    One member line of an array membership table.

    @ivar name: the proxy's name, the one that is hashed.
    @ivar address: the IP address to connect to.
    @ivar port: its HTTP (proxy) port.
    @ivar tableURL: where a copy of the table can be fetched.
    @ivar agent: the vendor/version string (no spaces).
    @ivar stateTime: seconds it has been in its current state.
    @ivar up: C{UP} (C{True}) or C{DOWN} (C{False}).
    @ivar loadFactor: its relative load factor, an integer.
    @ivar cacheSize: its cache size in megabytes (informational).
    """

    name: str
    address: str
    port: int
    tableURL: str
    agent: str
    stateTime: int
    up: bool
    loadFactor: int
    cacheSize: int = 0


@attr.s(slots=True, frozen=True, auto_attribs=True)
class MembershipTable:
    """
    A Proxy Array Membership Table.

    @ivar members: the member lines, in order.
    @ivar arrayName: the array's administrative name.
    @ivar configID: a 32-bit number that changes when the table does
        (L{tableConfigID}).
    @ivar listTTL: seconds a client may use this copy before fetching again.
    @ivar enabled: C{ArrayEnabled}.
    @ivar version: the table version (C{1.0}).
    """

    members: tuple[TableMember, ...]
    arrayName: str = "icpmesh"
    configID: int = 0
    listTTL: int = 600
    enabled: bool = True
    version: str = TABLE_VERSION

    def toArray(self, variant: str = SQUID) -> CARPArray:
        """
        The L{CARPArray} this table describes: every member (up or down)
        with its load factor as weight, in table order.  A reader skips the
        DOWN ones when routing, so their URLs go to the next best member.
        """
        return CARPArray([ArrayMember(m.name, m.loadFactor) for m in self.members], variant)


def tableConfigID(members: Iterable[TableMember]) -> int:
    """
    A C{ConfigID} for a member list: the CRC-32 of each member's name,
    address, port, load factor and state.  It changes when membership,
    weights or states change, not as state times tick.
    """
    crc = 0
    for m in members:
        line = f"{m.name} {m.address} {m.port} {m.loadFactor} {'UP' if m.up else 'DOWN'}\n"
        crc = zlib.crc32(line.encode("utf-8"), crc)
    return crc & MASK32


def _field(value: str, what: str) -> str:
    if not value or any(ch.isspace() for ch in value):
        raise ValueError(f"table field {what} must be one word, not {value!r}")
    return value


def renderTable(table: MembershipTable) -> bytes:
    """
    Write a membership table in the draft's format: the global lines, a
    blank line (the global part ends with CR LF CR LF), then one line per
    member with its nine fields separated by single spaces; every line ends
    with CR LF::

        Proxy Array Information/1.0
        ArrayEnabled: 1
        ConfigID: 3735928559
        ArrayName: campus
        ListTTL: 600

        p1 192.0.2.1 3128 http://192.0.2.1:3128/carp icpmesh/1.0 120 UP 1 0

    C{ListTTL} is written in seconds (draft section 2.1.5; its section 2
    template says minutes).

    @raise ValueError: a field that must be one word is empty or has spaces.
    """
    lines = [
        f"Proxy Array Information/{table.version}",
        f"ArrayEnabled: {1 if table.enabled else 0}",
        f"ConfigID: {table.configID & MASK32}",
        f"ArrayName: {_field(table.arrayName, 'ArrayName')}",
        f"ListTTL: {int(table.listTTL)}",
        "",
    ]
    for m in table.members:
        lines.append(
            " ".join(
                (
                    _field(m.name, "name"),
                    _field(m.address, "IP address"),
                    str(int(m.port)),
                    _field(m.tableURL, "table URL"),
                    _field(m.agent, "agent"),
                    str(max(0, int(m.stateTime)) & MASK32),
                    "UP" if m.up else "DOWN",
                    str(int(m.loadFactor)),
                    str(int(m.cacheSize)),
                )
            )
        )
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def _int(text: str, what: str, lineno: int) -> int:
    if not text.isdigit():
        raise TableError(f"{what} is not a non-negative integer: {text!r}", lineno)
    return int(text)


def parseTable(data: Union[bytes, str]) -> MembershipTable:
    """
    Read a membership table (draft section 2).  Lines may end in CR LF or
    LF; header names are case-insensitive; unknown header lines are
    ignored; member lines need at least the nine fields (more are
    ignored).  A table of a later major version than 1 is refused, since
    its member lines may mean something else (draft section 5).

    @raise TableError: with the line number, for anything malformed.
    """
    if isinstance(data, bytes):
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise TableError("not ASCII text") from None
    else:
        text = data
    lines = text.replace("\r\n", "\n").split("\n")
    index = 0
    while index < len(lines) and not lines[index].strip():
        index += 1
    if index == len(lines):
        raise TableError("empty table")
    head = _TABLE_HEAD.match(lines[index].strip())
    if head is None:
        raise TableError(
            f"expected 'Proxy Array Information/<version>', got {lines[index].strip()!r}",
            index + 1,
        )
    major = int(head.group(1))
    version = head.group(1) + ("." + head.group(2) if head.group(2) is not None else "")
    if major != 1:
        raise TableError(f"unsupported table version {version}", index + 1)
    index += 1
    headers: dict[str, tuple[str, int]] = {}
    while index < len(lines) and lines[index].strip():
        name, colon, value = lines[index].partition(":")
        if not colon:
            raise TableError(f"expected 'Name: value', got {lines[index].strip()!r}", index + 1)
        headers[name.strip().lower()] = (value.strip(), index + 1)
        index += 1
    enabled = True
    configID = 0
    listTTL = 600
    arrayName = ""
    if "arrayenabled" in headers:
        value, lineno = headers["arrayenabled"]
        if value not in ("0", "1"):
            raise TableError(f"ArrayEnabled must be 0 or 1, not {value!r}", lineno)
        enabled = value == "1"
    if "configid" in headers:
        value, lineno = headers["configid"]
        configID = _int(value, "ConfigID", lineno) & MASK32
    if "listttl" in headers:
        value, lineno = headers["listttl"]
        listTTL = _int(value, "ListTTL", lineno)
    if "arrayname" in headers:
        arrayName = headers["arrayname"][0]
    members = []
    seen: set[str] = set()
    for lineno in range(index + 1, len(lines) + 1):
        words = lines[lineno - 1].split()
        if not words:
            continue
        if len(words) < 9:
            raise TableError(
                f"a member line needs 9 fields (name, IP address, port, table URL, "
                f"agent, state time, UP|DOWN, load factor, cache size), got {len(words)}",
                lineno,
            )
        name, address, port, url, agent, stateTime, status, load, size = words[:9]
        status = status.upper()
        if status not in ("UP", "DOWN"):
            raise TableError(f"status must be UP or DOWN, not {words[6]!r}", lineno)
        if name in seen:
            raise TableError(f"member {name!r} listed twice", lineno)
        seen.add(name)
        portNumber = _int(port, "port", lineno)
        if not 0 < portNumber < 65536:
            raise TableError(f"port out of range: {port}", lineno)
        members.append(
            TableMember(
                name=name,
                address=address,
                port=portNumber,
                tableURL=url,
                agent=agent,
                stateTime=_int(stateTime, "state time", lineno),
                up=status == "UP",
                loadFactor=_int(load, "load factor", lineno),
                cacheSize=_int(size, "cache size", lineno),
            )
        )
    return MembershipTable(
        members=tuple(members),
        arrayName=arrayName,
        configID=configID,
        listTTL=listTTL,
        enabled=enabled,
        version=version,
    )
