"""
Tests for L{icpmesh.carp}: Squid's CARP hash with its quirk, the draft
variant, keys, and the array membership table.

The vectors come from the Squid peering notes (section 7.4), which were
checked against a live Squid 5.7.  Every routing test is also checked
against L{referenceSelect}, a second implementation written here
straight from the description of Squid's C{carpInit}/C{carpSelectParent},
with no code shared with L{icpmesh.carp}.
"""

from __future__ import annotations

import math
import random
from typing import Optional, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from icpmesh.carp import (
    DRAFT,
    ArrayMember,
    CARPArray,
    MembershipTable,
    TableError,
    TableMember,
    carpKey,
    combineHashes,
    effectiveRequestUri,
    hashKey,
    loadFactors,
    loadMultipliers,
    memberHash,
    parseKeyParts,
    parseTable,
    renderTable,
    rotateLeft,
    splitURI,
    tableConfigID,
)

PEERS = [ArrayMember("p1", 1), ArrayMember("p2", 2), ArrayMember("p3", 1)]

#: Squid peering notes section 7.4: URL -> (Squid's pick, the draft's pick).
VECTORS = {
    "http://example.com/": ("p2", "p2"),
    "http://www.squid-cache.org/Doc/": ("p3", "p3"),
    "http://127.0.0.1:51080/carp/1795464069/0": ("p3", "p1"),
    "http://127.0.0.1:51080/carp/1795464069/1": ("p2", "p3"),
}


# ---------------------------------------------------------------------------
# An independent, deliberately plain model of Squid 5.7's carp.cc


def _u32(value: int) -> int:
    return value % 4294967296


def _rotl(value: int, bits: int) -> int:
    value = _u32(value)
    return _u32(value << bits) | (value >> (32 - bits))


def _charValue(byte: int, signed: bool) -> int:
    # A C "char" on x86 is signed.
    if signed and byte >= 128:
        return byte - 256
    return byte


def referenceStringHash(data: bytes, start: int, signed: bool = True) -> int:
    h = start
    for byte in data:
        h = _u32(h + _rotl(h, 19) + _charValue(byte, signed))
    return h


def referencePeerHash(name: str) -> int:
    h = referenceStringHash(name.encode("utf-8"), 0)
    h = _u32(h + _u32(h * 0x62531965))
    return _rotl(h, 21)


def referenceSelect(
    peers: Sequence[tuple[str, int]],
    key: str,
    alive: Optional[set[str]] = None,
    quirk: bool = True,
) -> Optional[str]:
    """
    Squid's carpInit + carpSelectParent, step by step: load factors with
    the 0.001 cut-off, a stable sort on weight, the multiplier recurrence,
    then the per-peer loop that keeps hashing the key into the same
    running hash (when C{quirk}), highest score strictly greater than the
    best so far.
    """
    total = sum(w for _, w in peers)
    table = []
    for name, weight in peers:
        factor = weight / total
        if math.floor(factor * 1000.0) == 0.0:
            factor = 0.0
        table.append([name, weight, referencePeerHash(name), factor, 0.0])
    table.sort(key=lambda row: row[1])
    count = len(table)
    lastFactor, lastX, product = 0.0, 0.0, 1.0
    for k in range(1, count + 1):
        row = table[k - 1]
        kk1 = float(count - k + 1)
        x = (kk1 * (row[3] - lastFactor)) / product
        x += lastX**kk1
        x = x ** (1.0 / kk1)
        product *= x
        lastX, lastFactor = x, row[3]
        row[4] = x
    data = key.encode("latin-1")
    userHash = 0
    best, bestScore = None, 0.0
    for name, _, peerHash, _, multiplier in table:
        if quirk:
            userHash = referenceStringHash(data, userHash)
        else:
            userHash = referenceStringHash(data, 0)
        combined = userHash ^ peerHash
        combined = _u32(combined + _u32(combined * 0x62531965))
        combined = _rotl(combined, 21)
        score = combined * multiplier
        if score > bestScore and (alive is None or name in alive):
            best, bestScore = name, score
    return best


def syntheticURLs(count: int, seed: int = 1795464069) -> list[str]:
    """
    URLs in the style of the live check: one origin, numbered paths.
    """
    rng = random.Random(seed)
    hosts = ["127.0.0.1:51080", "www.example.com", "origin.test:8080", "[::1]:8000"]
    urls = []
    for i in range(count):
        host = hosts[i % len(hosts)]
        urls.append(f"http://{host}/carp/{rng.randrange(10**10)}/{i}")
    return urls


# ---------------------------------------------------------------------------


class HashTests(SynchronousTestCase):
    """
    The hash functions and load factor maths.
    """

    def test_rotateLeft(self) -> None:
        """
        Rotation wraps the high bits round to the low ones, in 32 bits.
        """
        self.assertEqual(rotateLeft(0x80000001, 1), 0x00000003)
        self.assertEqual(rotateLeft(0x12345678, 8), 0x34567812)
        self.assertEqual(rotateLeft(0xFFFFFFFF, 21), 0xFFFFFFFF)

    def test_memberHashVectors(self) -> None:
        """
        The member hashes of the notes' section 7.4 (as Squid's mgr:carp
        prints them), and those of two peers named C{a} and C{b}.
        """
        self.assertEqual(
            [memberHash(n) for n in ("p1", "p2", "p3", "a", "b")],
            [0x24D7685F, 0x5183B2C2, 0x7E4FFD25, 0xF4C82F93, 0x219479F7],
        )

    def test_urlHashVector(self) -> None:
        """
        The single-pass hash of C{http://example.com/} is 1e6fa10b.
        """
        self.assertEqual(hashKey("http://example.com/"), 0x1E6FA10B)

    def test_signedCharacters(self) -> None:
        """
        Bytes of 0x80 and above are added as negative numbers (C{char} is
        signed on x86), unless unsigned characters are asked for.
        """
        self.assertEqual(hashKey(b"\x80"), 0xFFFFFF80)
        self.assertEqual(hashKey(b"\x80", signedChars=False), 0x80)
        self.assertEqual(hashKey("\xe9t\xe9"), referenceStringHash(b"\xe9t\xe9", 0))

    def test_hashContinues(self) -> None:
        """
        Hashing C{b} from the hash of C{a} equals hashing C{a + b}: the
        running hash Squid's quirk relies on.
        """
        self.assertEqual(hashKey("/path", start=hashKey("http://h")), hashKey("http://h/path"))

    def test_multipliersVector(self) -> None:
        """
        Weights 1, 2, 1 give multipliers 0.908560, 1.211414, 0.908560
        (mgr:carp on a live Squid), sorted order p1, p3, p2.
        """
        array = CARPArray(PEERS)
        self.assertEqual([m.name for m in array.sortedMembers], ["p1", "p3", "p2"])
        byName = {m.name: x for m, x in zip(array.sortedMembers, array.multipliers)}
        self.assertEqual(
            [f"{byName[n]:.6f}" for n in ("p1", "p2", "p3")], ["0.908560", "1.211414", "0.908560"]
        )
        self.assertEqual(list(CARPArray([ArrayMember("a"), ArrayMember("b")]).multipliers), [1.0, 1.0])

    def test_loadFactorCutOff(self) -> None:
        """
        Squid counts a load factor below 0.001 as 0, so such a member's
        score is 0 and it never wins; the draft keeps it.
        """
        self.assertEqual(loadFactors([1, 2000]), [0.0, 2000 / 2001])
        self.assertEqual(loadFactors([1, 2000], draft=True), [1 / 2001, 2000 / 2001])
        array = CARPArray([ArrayMember("tiny", 1), ArrayMember("big", 2000)])
        urls = syntheticURLs(300)
        self.assertEqual({array.select(u).name for u in urls}, {"big"})
        self.assertIsNone(array.select(urls[0], lambda m: m.name == "tiny"))

    def test_draftMultipliersAreFloat32(self) -> None:
        """
        The draft's multipliers are 32-bit floats: each is exactly
        representable as one, and close to the double value.
        """
        import struct

        factors = [0.25, 0.25, 0.5]
        exact = loadMultipliers(factors)
        draft = loadMultipliers(factors, draft=True)
        for x, d in zip(exact, draft):
            self.assertEqual(struct.unpack("f", struct.pack("f", d))[0], d)
            self.assertAlmostEqual(x, d, places=6)

    def test_combine(self) -> None:
        """
        Combining is XOR, multiply-add by the spreading constant, rotate 21.
        """
        u, m = 0x1E6FA10B, 0x24D7685F
        c = (u ^ m) & 0xFFFFFFFF
        c = (c + c * 0x62531965) & 0xFFFFFFFF
        self.assertEqual(combineHashes(u, m), rotateLeft(c, 21))


class SquidRoutingTests(SynchronousTestCase):
    """
    URLs go where Squid 5.7 sends them.
    """

    def test_vectors(self) -> None:
        """
        The notes' section 7.4 URLs: Squid's picks (two checked live) with
        the quirk, the draft's picks with L{DRAFT}.
        """
        squid = CARPArray(PEERS)
        draft = CARPArray(PEERS, DRAFT)
        for url, (squidPick, draftPick) in VECTORS.items():
            self.assertEqual(squid.select(url).name, squidPick, url)
            self.assertEqual(draft.select(url).name, draftPick, url)

    def test_referenceAgrees373(self) -> None:
        """
        373 synthetic URLs (the size of the live check) route exactly as
        the independent reference model predicts, with the quirk; the
        draft's single hash disagrees on a good share of them, so the
        quirk matters.
        """
        squid = CARPArray(PEERS)
        weights = [(m.name, m.weight) for m in PEERS]
        urls = syntheticURLs(373)
        picks = [squid.select(u).name for u in urls]
        self.assertEqual(picks, [referenceSelect(weights, u) for u in urls])
        singleHash = [referenceSelect(weights, u, quirk=False) for u in urls]
        differ = sum(a != b for a, b in zip(picks, singleHash))
        self.assertGreater(differ, 373 // 4)
        self.assertEqual(set(picks), {"p1", "p2", "p3"})

    def test_shares(self) -> None:
        """
        Over many URLs each member gets roughly its weight's share
        (p2, weight 2, about half).
        """
        squid = CARPArray(PEERS)
        urls = syntheticURLs(4000, seed=7)
        counts = {"p1": 0, "p2": 0, "p3": 0}
        for u in urls:
            counts[squid.select(u).name] += 1
        self.assertTrue(0.40 < counts["p2"] / 4000 < 0.60, counts)
        self.assertTrue(0.15 < counts["p1"] / 4000 < 0.35, counts)

    @settings(max_examples=60, deadline=None)
    @given(
        weights=st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=12),
        paths=st.lists(st.text(min_size=0, max_size=30), min_size=1, max_size=8),
    )
    def test_referenceAgreesProperty(self, weights: list[int], paths: list[str]) -> None:
        """
        For any member count and weights, and paths with any characters
        (non-ASCII bytes hashed as signed chars), the array and the
        reference model pick the same member, with and without the quirk.
        """
        peers = [(f"peer{i}.example", w) for i, w in enumerate(weights)]
        squid = CARPArray([ArrayMember(n, w) for n, w in peers])
        single = CARPArray([ArrayMember(n, w) for n, w in peers], repeatKey=False)
        for path in paths:
            url = "http://o.example/" + path.encode("utf-8").decode("latin-1").replace("\r", "").replace("\n", "")
            effective = effectiveRequestUri(url)
            picked = squid.select(url)
            self.assertEqual(picked.name if picked else None, referenceSelect(peers, effective))
            picked = single.select(url)
            self.assertEqual(
                picked.name if picked else None, referenceSelect(peers, effective, quirk=False)
            )

    def test_downMemberMovesOnlyItsURLs(self) -> None:
        """
        When a member cannot be used, its URLs go to their next-best member
        (the reference model with that member dead agrees), and no URL of
        a live member moves.
        """
        members = [ArrayMember(f"m{i}", w) for i, w in enumerate([1, 3, 2, 1, 5, 2])]
        array = CARPArray(members)
        peers = [(m.name, m.weight) for m in members]
        urls = syntheticURLs(1500, seed=3)
        before = {u: array.select(u).name for u in urls}
        alive = {m.name for m in members} - {"m4"}
        moved = 0
        for u in urls:
            after = array.select(u, lambda m: m.name in alive).name
            self.assertEqual(after, referenceSelect(peers, u, alive))
            if before[u] == "m4":
                moved += 1
                ranking = [m.name for m, _ in array.ranking(u)]
                self.assertEqual(after, ranking[1])
            else:
                self.assertEqual(after, before[u])
        self.assertGreater(moved, 100)

    def test_nameIsCaseSensitive(self) -> None:
        """
        Squid hashes the peer name as written; the draft hashes it in lower
        case.
        """
        self.assertNotEqual(memberHash("P1"), memberHash("p1"))
        self.assertEqual(memberHash("P1", draft=True), memberHash("p1", draft=True))

    def test_rankingRemembered(self) -> None:
        """
        Rankings are remembered per URL (same object back) and the memory
        is bounded.
        """
        array = CARPArray(PEERS, cacheSize=2)
        first = array.ranking("http://a/")
        self.assertIs(array.ranking("http://a/"), first)
        array.ranking("http://b/")
        array.ranking("http://c/")
        self.assertIsNot(array.ranking("http://a/"), first)
        self.assertEqual(array.ranking("http://a/"), first)

    def test_emptyArray(self) -> None:
        """
        An array without members selects nothing.
        """
        self.assertIsNone(CARPArray([]).select("http://a/"))

    def test_badArrays(self) -> None:
        """
        Duplicate member names and unknown variants are refused.
        """
        self.assertRaises(ValueError, CARPArray, [ArrayMember("a"), ArrayMember("a")])
        self.assertRaises(ValueError, CARPArray, PEERS, "ms")


class KeyTests(SynchronousTestCase):
    """
    What is hashed: the effective request URI, or carp-key parts.
    """

    def test_effectiveRequestUri(self) -> None:
        """
        Scheme and host in lower case, default port dropped, other ports
        kept, empty path as C{/}, user info dropped except for ftp, IPv6
        in brackets, trailing dots of the host removed; path and query as
        received.
        """
        cases = {
            "HTTP://Example.COM:80": "http://example.com/",
            "http://example.com:8080/A?B=C": "http://example.com:8080/A?B=C",
            "http://user:pw@example.com/x": "http://example.com/x",
            "ftp://user:pw@Example.com:21/x": "ftp://user:pw@example.com/x",
            "http://[::0001]:3128?q": "http://[::1]:3128/?q",
            "https://example.com.:443/": "https://example.com/",
            "http://127.0.0.1:51080/carp/1/0": "http://127.0.0.1:51080/carp/1/0",
        }
        for url, expected in cases.items():
            self.assertEqual(effectiveRequestUri(url), expected, url)
        self.assertRaises(ValueError, effectiveRequestUri, "/relative")
        self.assertRaises(ValueError, effectiveRequestUri, "http:///nohost")

    def test_carpKeyParts(self) -> None:
        """
        carp-key parts are joined in URI order whatever order they are
        listed in; the port is always written; the query goes with
        C{params}; an empty key falls back to the whole URI.
        """
        parts = splitURI("http://Example.com/a/b?x=1")
        self.assertEqual(carpKey(parts, parseKeyParts("path,host")), "example.com/a/b")
        self.assertEqual(carpKey(parts, parseKeyParts("host,port")), "example.com:80")
        self.assertEqual(
            carpKey(parts, parseKeyParts("params,path,port,host,scheme")),
            "http://example.com:80/a/b?x=1",
        )
        self.assertEqual(carpKey(parts, parseKeyParts("params")), "?x=1")
        bare = splitURI("http://example.com/a")
        self.assertEqual(carpKey(bare, parseKeyParts("params")), "http://example.com/a")
        self.assertRaises(ValueError, parseKeyParts, "host,fragment")
        self.assertRaises(ValueError, parseKeyParts, "")

    def test_carpKeyHostKeepsHostTogether(self) -> None:
        """
        With C{carp-key=host} every path on one host goes to one member.
        """
        members = [ArrayMember(n, 1, ("host",)) for n in ("a", "b", "c", "d")]
        array = CARPArray(members)
        for host in ("one.example", "two.example", "three.example"):
            picks = {array.select(f"http://{host}/{i}").name for i in range(50)}
            self.assertEqual(len(picks), 1)

    def test_perMemberKeysQuirk(self) -> None:
        """
        When members have different carp-keys, each member's key is hashed
        into the same running hash in sorted order (Squid's loop).
        """
        members = [ArrayMember("a", 1, ("host",)), ArrayMember("b", 1, ())]
        array = CARPArray(members)
        url = "http://h.example/p?q"
        h1 = hashKey("h.example")
        h2 = hashKey("http://h.example/p?q", start=h1)
        self.assertEqual(array.keyHashes(url), [h1, h2])


class TableTests(SynchronousTestCase):
    """
    The array membership table text format (draft section 2).
    """

    def table(self) -> MembershipTable:
        members = (
            TableMember("p1", "192.0.2.1", 3128, "http://192.0.2.1:3128/carp", "icpmesh/1", 60, True, 1, 100),
            TableMember("p2", "192.0.2.2", 3128, "http://192.0.2.1:3128/carp", "icpmesh/1", 5, False, 2, 0),
        )
        return MembershipTable(members, arrayName="campus", configID=tableConfigID(members), listTTL=300)

    def test_render(self) -> None:
        """
        The global lines, a blank line, member lines of nine fields; CR LF
        line ends throughout.
        """
        text = renderTable(self.table())
        self.assertTrue(text.startswith(b"Proxy Array Information/1.0\r\nArrayEnabled: 1\r\n"))
        head, sep, body = text.partition(b"\r\n\r\n")
        self.assertTrue(sep)
        self.assertIn(b"ArrayName: campus\r\n", head + b"\r\n")
        self.assertIn(b"ListTTL: 300", head)
        self.assertEqual(
            body,
            b"p1 192.0.2.1 3128 http://192.0.2.1:3128/carp icpmesh/1 60 UP 1 100\r\n"
            b"p2 192.0.2.2 3128 http://192.0.2.1:3128/carp icpmesh/1 5 DOWN 2 0\r\n",
        )

    def test_roundTrip(self) -> None:
        """
        Parsing a rendered table gives the table back.
        """
        table = self.table()
        self.assertEqual(parseTable(renderTable(table)), table)

    def test_parseTolerant(self) -> None:
        """
        LF line ends, other spacing and letter case in the headers, unknown
        headers, blank lines and extra fields are accepted.
        """
        text = (
            "\nproxy array information/1.0\n"
            "ARRAYENABLED:1\nconfigid:   42\nArrayName:  x\nListTTL: 5\nVendor: y\n\n"
            "a 10.0.0.1 8080 http://t/ agent 0 up 3 0 extra\n\n"
        )
        table = parseTable(text)
        self.assertEqual((table.configID, table.arrayName, table.listTTL), (42, "x", 5))
        self.assertEqual(
            table.members,
            (TableMember("a", "10.0.0.1", 8080, "http://t/", "agent", 0, True, 3, 0),),
        )

    def test_parseErrors(self) -> None:
        """
        Malformed tables are refused with the line at fault.
        """
        good = renderTable(self.table()).decode()
        cases = [
            ("", None),
            ("Some Other Thing/1.0\r\n", 1),
            ("Proxy Array Information/2.0\r\n\r\n", 1),
            (good.replace("ListTTL: 300", "ListTTL: soon"), 5),
            (good.replace(" UP ", " MAYBE "), 7),
            (good.replace(" 3128 http://192.0.2.1:3128/carp icpmesh/1 60 UP", " 3128 x y 60"), 7),
            (good.replace("p2 192.0.2.2 3128", "p2 192.0.2.2 99999"), 8),
            (good.replace("p2 192", "p1 192"), 8),
            (good.replace("ArrayEnabled: 1", "ArrayEnabled: yes"), 2),
        ]
        for text, lineno in cases:
            with self.assertRaises(TableError) as caught:
                parseTable(text)
            self.assertEqual(caught.exception.lineno, lineno, text)
        self.assertRaises(TableError, parseTable, b"\xff")

    def test_renderRefusesSpaces(self) -> None:
        """
        Fields are separated by single spaces, so a field with a space in
        it cannot be written.
        """
        bad = MembershipTable(
            (TableMember("a b", "10.0.0.1", 1, "u", "g", 0, True, 1),), arrayName="x"
        )
        self.assertRaises(ValueError, renderTable, bad)

    def test_configIDTracksChanges(self) -> None:
        """
        The ConfigID changes with membership, weight or state, not with
        state time.
        """
        table = self.table()
        base = tableConfigID(table.members)
        import attr

        older = [attr.evolve(m, stateTime=m.stateTime + 100) for m in table.members]
        self.assertEqual(tableConfigID(older), base)
        heavier = [attr.evolve(table.members[0], loadFactor=5), table.members[1]]
        self.assertNotEqual(tableConfigID(heavier), base)
        upped = [table.members[0], attr.evolve(table.members[1], up=True)]
        self.assertNotEqual(tableConfigID(upped), base)

    def test_toArray(self) -> None:
        """
        A table gives the array its publisher routes with: same members and
        load factors, same picks.
        """
        members = tuple(
            TableMember(m.name, "10.0.0.1", 3128, "u", "g", 0, True, m.weight) for m in PEERS
        )
        array = MembershipTable(members).toArray()
        for url, (pick, _) in VECTORS.items():
            self.assertEqual(array.select(url).name, pick)

    @settings(max_examples=50, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.from_regex(r"[a-z][a-z0-9.-]{0,20}", fullmatch=True),
                st.integers(1, 65535),
                st.integers(0, 2**32 - 1),
                st.booleans(),
                st.integers(0, 1000),
                st.integers(0, 10**6),
            ),
            max_size=10,
            unique_by=lambda t: t[0],
        )
    )
    def test_roundTripProperty(self, rows: list[tuple[str, int, int, bool, int, int]]) -> None:
        """
        Any table of well-formed members survives rendering and parsing.
        """
        members = tuple(
            TableMember(name, "192.0.2.9", port, "http://t/carp", "icpmesh/1", stateTime, up, load, size)
            for name, port, stateTime, up, load, size in rows
        )
        table = MembershipTable(members, "a", tableConfigID(members), 60)
        self.assertEqual(parseTable(renderTable(table)), table)
