"""
Tests for L{icpmesh.acl}: the Squid-style access-control plugin.

Most tests are tables: each row is a config, a request and the expected
answer, checked through the public L{IAccessControl} methods.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Optional

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from icpmesh.acl import (
    DIRECTIVES,
    MAX_CACHED_CLIENTS,
    AccessControl,
    AddressSet,
    RuleList,
    aclPlugin,
    parseAddress,
    parseAddressRange,
)
from icpmesh.config import ConfigError, PluginSection, loadConfig, parseConfig
from icpmesh.interfaces import AccessRequest, IAccessControl, IAccessControlPlugin

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(os.path.dirname(HERE), "etc", "examples", "rfc2187-customer.conf")


def build(text: str, neighbours: Optional[list[str]] = None) -> AccessControl:
    """
    An L{AccessControl} from config text read as C{test.conf}.
    """
    return AccessControl.fromText(text, "test.conf", neighbours)


def request(
    client: str = "10.0.0.1", url: str = "http://www.example.com/a/b?c=d", method: str = "GET"
) -> AccessRequest:
    """
    An L{AccessRequest}.
    """
    return AccessRequest.fromURL(client, method, url)


def sectionFor(text: str, filename: str = "test.conf") -> PluginSection:
    """
    The C{access} section of a parsed config, with the directives the plugin
    claims, as the plugin resolver hands it over.
    """
    config = parseConfig(text, filename)
    section = config.plugins["access"]
    section.directives = [d for d in config.extra if d.name in aclPlugin.directives]
    return section


class DefaultsTests(SynchronousTestCase):
    """
    With no rules a node is closed to everyone but loopback and private
    addresses, and everything else is permissive.
    """

    CLIENTS = [
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("::1", True),
        ("10.1.2.3", True),
        ("172.16.0.1", True),
        ("172.31.255.255", True),
        ("172.32.0.1", False),
        ("192.168.1.1", True),
        ("192.169.1.1", False),
        ("fc00::1", True),
        ("fd12:3456::1", True),
        ("fe00::1", False),
        ("8.8.8.8", False),
        ("2001:db8::1", False),
        ("::ffff:192.168.1.1", True),
        ("::ffff:10.0.0.1", True),
        ("::ffff:8.8.8.8", False),
        ("::2", False),
        ("not-an-address", False),
    ]

    def test_httpAndICP(self) -> None:
        """
        C{http_access} and C{icp_access} default to allowing only loopback
        and private (RFC 1918 and ULA) addresses, IPv4-mapped IPv6 addresses
        counting as the IPv4 address they carry.
        """
        access = AccessControl()
        for client, expected in self.CLIENTS:
            self.assertEqual(
                access.allowHTTP(request(client)), expected, f"HTTP from {client}"
            )
            self.assertEqual(
                access.allowICP(client, "http://www.example.com/"), expected, f"ICP from {client}"
            )

    def test_emptyConfigSameAsDefaults(self) -> None:
        """
        A config with no access-control lines gives the same answers as the
        built-in defaults, through the plugin.
        """
        access = aclPlugin.accessControlFromConfig(sectionFor(""), Clock())
        for client, expected in self.CLIENTS:
            self.assertEqual(access.allowHTTP(request(client)), expected, client)
            self.assertEqual(access.allowICP(client, "http://x/"), expected, client)

    def test_embeddedDefaultConfig(self) -> None:
        """
        The config a node runs with when given no file builds the same
        closed access control.
        """
        config = loadConfig(None)
        section = config.plugins["access"]
        section.directives = [d for d in config.extra if d.name in aclPlugin.directives]
        access = aclPlugin.accessControlFromConfig(section, Clock())
        self.assertTrue(access.allowICP("192.168.0.5", "http://x/"))
        self.assertFalse(access.allowICP("203.0.113.5", "http://x/"))

    def test_otherLists(self) -> None:
        """
        Misses and storing are allowed, every neighbour may be used, and
        neither C{always_direct} nor C{never_direct} applies.
        """
        access = AccessControl()
        for client in ("10.0.0.1", "8.8.8.8"):
            r = request(client)
            self.assertTrue(access.allowMiss(r))
            self.assertTrue(access.allowStore(r))
            self.assertTrue(access.allowNeighbour("parent1", r))
            self.assertIsNone(access.directPolicy(r))

    def test_openedExplicitly(self) -> None:
        """
        An operator who wants an open proxy must say so.
        """
        access = build("http_access allow all\n")
        self.assertTrue(access.allowHTTP(request("8.8.8.8")))
        self.assertFalse(access.allowICP("8.8.8.8", "http://x/"))

    def test_localnetRedefined(self) -> None:
        """
        A config's own C{localnet} replaces the predefined one (it does not
        add to it), and the default lists use it.
        """
        access = build("acl localnet src 192.168.7.0/24\n")
        self.assertTrue(access.allowHTTP(request("192.168.7.9")))
        self.assertFalse(access.allowHTTP(request("192.168.8.9")))
        self.assertFalse(access.allowICP("10.0.0.1", "http://x/"))
        self.assertFalse(access.allowICP("127.0.0.1", "http://x/"))

    def test_redefinitionAppends(self) -> None:
        """
        Further lines for a redefined predefined ACL add to the config's
        values, like any other ACL.
        """
        access = build("acl localnet src 192.168.7.0/24\nacl localnet src 10.9.0.0/16\n")
        self.assertTrue(access.allowHTTP(request("192.168.7.9")))
        self.assertTrue(access.allowHTTP(request("10.9.1.1")))
        self.assertFalse(access.allowHTTP(request("10.8.1.1")))


class AddressTests(SynchronousTestCase):
    """
    Address and range parsing, and L{AddressSet}.
    """

    def test_parseAddress(self) -> None:
        """
        Addresses parse to C{(version, integer)}; IPv4-mapped IPv6 addresses
        become IPv4; anything else is C{None}.
        """
        table = [
            ("10.0.0.1", (4, 0x0A000001)),
            ("::1", (6, 1)),
            ("::ffff:10.0.0.1", (4, 0x0A000001)),
            ("::FFFF:0a00:0001", (4, 0x0A000001)),
            ("fe80::1%eth0", (6, (0xFE80 << 112) | 1)),
            ("www.example.com", None),
            ("10.1", None),
            ("10.0.0.1 ", None),
            ("::ffff:10.0.0.1:1", None),
            ("10.0.0.256", None),
            ("", None),
        ]
        for text, expected in table:
            self.assertEqual(parseAddress(text), expected, text)

    def test_parseAddressRange(self) -> None:
        """
        CIDRs, netmasks, plain addresses, C{lo-hi} ranges and C{all} are
        accepted; host bits are masked off.
        """
        table = [
            ("10.0.0.0/8", [(4, 0x0A000000, 0x0AFFFFFF)]),
            ("10.1.2.3/8", [(4, 0x0A000000, 0x0AFFFFFF)]),
            ("10.0.0.0/255.255.0.0", [(4, 0x0A000000, 0x0A00FFFF)]),
            ("192.0.2.7", [(4, 0xC0000207, 0xC0000207)]),
            ("10.0.0.1-10.0.0.9", [(4, 0x0A000001, 0x0A000009)]),
            ("2001:db8::/32", [(6, 0x20010DB8 << 96, (0x20010DB8 << 96) + 2**96 - 1)]),
            ("::ffff:10.0.0.0/104", [
                (6, (0xFFFF << 32) + 0x0A000000, (0xFFFF << 32) + 0x0AFFFFFF),
                (4, 0x0A000000, 0x0AFFFFFF),
            ]),
            ("all", [(4, 0, 2**32 - 1), (6, 0, 2**128 - 1)]),
        ]
        for text, expected in table:
            self.assertEqual(parseAddressRange(text), expected, text)

    def test_parseAddressRangeErrors(self) -> None:
        """
        Bad prefixes, host names, reversed and mixed ranges are refused
        with a reason.
        """
        table = [
            ("10.0.0.0/33", "bad address or CIDR"),
            ("10.0.0", "bad address or CIDR"),
            ("proxy.customer.org", "host names are not resolved"),
            ("2001:db8::/129", "bad address or CIDR"),
            ("10.0.0.9-10.0.0.1", "ends before it starts"),
            ("10.0.0.1-::1", "mixes IPv4 and IPv6"),
            ("10.0.0.1-x", "bad address range"),
        ]
        for text, reason in table:
            e = self.assertRaises(ValueError, parseAddressRange, text)
            self.assertIn(reason, str(e), text)

    def test_addressSetEdges(self) -> None:
        """
        Range ends are inclusive, adjacent ranges merge, and versions are
        kept apart.
        """
        s = AddressSet([(4, 10, 20), (4, 21, 30), (4, 40, 40), (6, 10, 20)])
        table = [
            ((4, 9), False), ((4, 10), True), ((4, 25), True), ((4, 30), True),
            ((4, 31), False), ((4, 40), True), ((4, 41), False), ((6, 15), True),
            ((6, 25), False), (None, False),
        ]
        for address, expected in table:
            self.assertEqual(address in s, expected, address)
        self.assertFalse(s.everything)
        self.assertTrue(AddressSet(parseAddressRange("all")).everything)
        self.assertIn(None, AddressSet(parseAddressRange("all")))

    @given(
        st.lists(
            st.tuples(st.integers(0, 2000), st.integers(0, 300)), max_size=12
        ),
        st.lists(st.integers(0, 2400), min_size=1, max_size=30),
    )
    def test_addressSetMatchesBruteForce(
        self, spans: list[tuple[int, int]], probes: list[int]
    ) -> None:
        """
        Membership in an L{AddressSet} is exactly "inside one of the
        ranges it was built from", however they overlap.
        """
        ranges = [(4, lo, lo + width) for lo, width in spans]
        s = AddressSet(ranges)
        for probe in probes:
            expected = any(lo <= probe <= hi for _, lo, hi in ranges)
            self.assertEqual((4, probe) in s, expected)
            self.assertFalse((6, probe) in s)


class ACLTypeTests(SynchronousTestCase):
    """
    Each ACL type matches what it should and nothing else.  Every row is
    checked with C{http_access allow NAME} (so a non-matching request gets
    the opposite: deny), from a public address so the default does not
    interfere.
    """

    # (acl line values, request arguments, expected match)
    TABLE: list[tuple[str, dict[str, str], bool]] = [
        ("src 203.0.113.0/24", {"client": "203.0.113.9"}, True),
        ("src 203.0.113.0/24", {"client": "203.0.114.9"}, False),
        ("src 203.0.113.0/24", {"client": "::ffff:203.0.113.9"}, True),
        ("src 203.0.113.0/255.255.255.0", {"client": "203.0.113.200"}, True),
        ("src 203.0.113.5-203.0.113.7", {"client": "203.0.113.7"}, True),
        ("src 203.0.113.5-203.0.113.7", {"client": "203.0.113.8"}, False),
        ("src 2001:db8:1::/48", {"client": "2001:db8:1:ff::1"}, True),
        ("src 2001:db8:1::/48", {"client": "2001:db8:2::1"}, False),
        ("src -n 198.51.100.1", {"client": "198.51.100.1"}, True),
        ("src ::ffff:0:0/96", {"client": "198.51.100.1"}, True),
        ("dst 198.51.100.0/24", {"url": "http://198.51.100.7/"}, True),
        ("dst 198.51.100.0/24", {"url": "http://198.51.101.7/"}, False),
        ("dst 198.51.100.0/24", {"url": "http://www.example.com/"}, False),
        ("dst 2001:db8::/32", {"url": "http://[2001:db8::80]:8080/"}, True),
        ("dst 198.51.100.0/24", {"url": "http://[::ffff:198.51.100.7]/"}, True),
        ("dstdomain .example.com", {"url": "http://example.com/"}, True),
        ("dstdomain .example.com", {"url": "http://a.b.example.com/"}, True),
        ("dstdomain .example.com", {"url": "http://WWW.Example.COM/"}, True),
        ("dstdomain .example.com", {"url": "http://www.example.com./"}, True),
        ("dstdomain .example.com", {"url": "http://badexample.com/"}, False),
        ("dstdomain .example.com", {"url": "http://example.com.evil.org/"}, False),
        ("dstdomain example.com", {"url": "http://example.com/"}, True),
        ("dstdomain example.com", {"url": "http://www.example.com/"}, False),
        ("dstdomain Example.COM", {"url": "http://example.com/"}, True),
        ("dstdomain .org www.example.com", {"url": "http://www.example.com/"}, True),
        ("dstdomain .org www.example.com", {"url": "http://ietf.org/"}, True),
        ("dstdomain .org www.example.com", {"url": "http://ietf.net/"}, False),
        ("port 80", {"url": "http://www.example.com/"}, True),
        ("port 80", {"url": "http://www.example.com:8080/"}, False),
        ("port 443", {"url": "https://www.example.com/"}, True),
        ("port 1025-65535", {"url": "http://www.example.com:1025/"}, True),
        ("port 1025-65535", {"url": "http://www.example.com:65535/"}, True),
        ("port 1025-65535", {"url": "http://www.example.com:1024/"}, False),
        ("port 21 70 210 280 488", {"url": "ftp://ftp.example.com/"}, True),
        ("method GET HEAD", {"method": "HEAD"}, True),
        ("method GET HEAD", {"method": "POST"}, False),
        ("method post", {"method": "POST"}, True),
        ("proto http", {"url": "http://www.example.com/"}, True),
        ("proto HTTP FTP", {"url": "ftp://ftp.example.com/"}, True),
        ("proto http", {"url": "https://www.example.com/"}, False),
        ("url_regex ^http://www\\.example\\.com/a/", {}, True),
        ("url_regex ^http://WWW\\.example", {}, False),
        ("url_regex -i ^http://WWW\\.example", {}, True),
        ("url_regex -i ^http://WWW\\.nomatch +i ^http://WWW\\.example", {}, False),
        ("url_regex -i ^http://WWW\\.nomatch +i ^http://www\\.example", {}, True),
        ("url_regex \\.gif$ \\?c=d$", {}, True),
        ("url_regex -- -x", {"url": "http://www.example.com/-x"}, True),
        ("urlpath_regex ^/a/b", {}, True),
        ("urlpath_regex ^/A/B", {}, False),
        ("urlpath_regex -i ^/A/B", {}, True),
        ("urlpath_regex example", {}, False),
        ("urlpath_regex \\?c=", {}, True),
        ("urlpath_regex cgi-bin \\?", {"url": "http://www.example.com/x"}, False),
        ("dstdom_regex ^www\\.", {}, True),
        ("dstdom_regex ^ftp\\.", {}, False),
    ]

    def test_table(self) -> None:
        """
        Every row of L{TABLE} matches, or does not, as it says.
        """
        for values, arguments, expected in self.TABLE:
            access = build(f"acl x {values}\nhttp_access allow x\n")
            kwargs: dict[str, Any] = {"client": "203.0.113.250", **arguments}
            self.assertEqual(
                access.allowHTTP(request(**kwargs)), expected, f"acl x {values} / {arguments}"
            )

    def test_appendedValues(self) -> None:
        """
        Several lines for the same name and type add values.
        """
        access = build(
            "acl x dstdomain .example.com\nacl x dstdomain .example.org\nhttp_access allow x\n"
        )
        self.assertTrue(access.allowHTTP(request("8.8.8.8", "http://a.example.org/")))
        self.assertTrue(access.allowHTTP(request("8.8.8.8", "http://a.example.com/")))
        self.assertFalse(access.allowHTTP(request("8.8.8.8", "http://a.example.net/")))

    def test_valuesFromFile(self) -> None:
        """
        A quoted value names a file of values, one or more a line, with
        comments; a relative name is found beside the config file.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        with open(os.path.join(directory, "blocked.txt"), "w") as f:
            f.write("# blocked\n.example.com   # and subdomains\n\nexample.net .org\n")
        text = 'acl blocked dstdomain "blocked.txt"\nhttp_access deny blocked\n'
        access = AccessControl.fromText(text, os.path.join(directory, "icpmesh.conf"))
        for url, expected in [
            ("http://www.example.com/", False),
            ("http://example.net/", False),
            ("http://www.example.net/", True),
            ("http://x.org/", False),
            ("http://example.edu/", True),
        ]:
            self.assertEqual(access.allowHTTP(request("10.0.0.1", url)), expected, url)

    def test_predefinedDst(self) -> None:
        """
        C{to_localhost} and C{to_linklocal} are predefined C{dst} ACLs.
        """
        access = build("http_access deny to_localhost\nhttp_access deny to_linklocal\n"
                       "http_access allow all\n")
        for url, expected in [
            ("http://127.0.0.1/", False),
            ("http://[::1]/", False),
            ("http://0.0.0.0/", False),
            ("http://169.254.169.254/latest/", False),
            ("http://[fe80::1]/", False),
            ("http://192.0.2.1/", True),
            ("http://localhost/", True),
        ]:
            self.assertEqual(access.allowHTTP(request("8.8.8.8", url)), expected, url)


class RuleTests(SynchronousTestCase):
    """
    Rule lists: AND, negation, first match, the no-match answer, and each
    list's method.
    """

    ACLS = (
        "acl lan src 10.0.0.0/8\n"
        "acl ex dstdomain .example.com\n"
        "acl get method GET\n"
    )

    # (rules, client, url, expected allowHTTP)
    TABLE = [
        # AND: both must match
        ("http_access allow lan ex\n", "10.0.0.1", "http://www.example.com/", True),
        ("http_access allow lan ex\n", "10.0.0.1", "http://www.example.org/", False),
        ("http_access allow lan ex\n", "8.8.8.8", "http://www.example.com/", False),
        # negation
        ("http_access allow lan !ex\n", "10.0.0.1", "http://www.example.org/", True),
        ("http_access allow lan !ex\n", "10.0.0.1", "http://www.example.com/", False),
        ("http_access deny !lan\nhttp_access allow all\n", "8.8.8.8", "http://x/", False),
        ("http_access deny !lan\nhttp_access allow all\n", "10.1.1.1", "http://x/", True),
        # first match wins
        ("http_access deny ex\nhttp_access allow lan\n", "10.0.0.1", "http://www.example.com/", False),
        ("http_access allow lan\nhttp_access deny ex\n", "10.0.0.1", "http://www.example.com/", True),
        # no match: the opposite of the last rule
        ("http_access allow lan\n", "8.8.8.8", "http://x/", False),
        ("http_access deny ex\n", "8.8.8.8", "http://x/", True),
        ("http_access deny ex\n", "8.8.8.8", "http://www.example.com/", False),
        ("http_access allow ex\nhttp_access deny lan\n", "8.8.8.8", "http://x/", True),
        ("http_access deny lan\nhttp_access allow ex\n", "8.8.8.8", "http://x/", False),
        # case of the action word does not matter
        ("http_access ALLOW all\n", "8.8.8.8", "http://x/", True),
    ]

    def test_table(self) -> None:
        """
        Every row of L{TABLE} gives its answer.
        """
        for rules, client, url, expected in self.TABLE:
            access = build(self.ACLS + rules)
            self.assertEqual(
                access.allowHTTP(request(client, url)), expected, f"{rules!r} {client} {url}"
            )

    def test_icp(self) -> None:
        """
        C{icp_access} rules decide ICP queries; they may look at the URL,
        whose method is C{ICP_QUERY}.
        """
        access = build(
            self.ACLS
            + "acl icp method ICP_QUERY\n"
            + "icp_access deny ex\nicp_access allow lan icp\n"
        )
        self.assertTrue(access.allowICP("10.0.0.1", "http://www.example.org/"))
        self.assertFalse(access.allowICP("10.0.0.1", "http://www.example.com/"))
        self.assertFalse(access.allowICP("8.8.8.8", "http://www.example.org/"))

    def test_icpUnparseableURL(self) -> None:
        """
        An ICP URL that is not an absolute URL matches no URL-based ACL but
        is still decided by the client's address.
        """
        access = build(self.ACLS + "icp_access deny ex\nicp_access allow lan\n")
        self.assertTrue(access.allowICP("10.0.0.1", "/relative"))
        self.assertFalse(access.allowICP("8.8.8.8", "/relative"))

    def test_missAccess(self) -> None:
        """
        C{miss_access} decides L{AccessControl.allowMiss} only.
        """
        access = build(self.ACLS + "miss_access deny lan\nhttp_access allow lan\n")
        self.assertFalse(access.allowMiss(request("10.0.0.1")))
        self.assertTrue(access.allowMiss(request("8.8.8.8")))
        self.assertTrue(access.allowHTTP(request("10.0.0.1")))

    def test_cache(self) -> None:
        """
        C{cache deny} stops storing the responses it matches.
        """
        access = build("acl q urlpath_regex \\?\ncache deny q\n")
        self.assertFalse(access.allowStore(request(url="http://x/a?b")))
        self.assertTrue(access.allowStore(request(url="http://x/a")))

    def test_directPolicy(self) -> None:
        """
        C{always_direct} wins over C{never_direct}; C{None} when neither
        allows.
        """
        access = build(
            self.ACLS
            + "acl local dstdomain .corp.example\n"
            + "always_direct allow local\n"
            + "never_direct allow all\n"
        )
        self.assertEqual(access.directPolicy(request(url="http://a.corp.example/")), "always")
        self.assertEqual(access.directPolicy(request(url="http://www.example.org/")), "never")
        access = build(self.ACLS + "never_direct allow ex\n")
        self.assertEqual(access.directPolicy(request(url="http://www.example.com/")), "never")
        self.assertIsNone(access.directPolicy(request(url="http://www.example.org/")))
        access = build(self.ACLS + "always_direct deny ex\n")
        self.assertIsNone(access.directPolicy(request(url="http://www.example.com/")))
        self.assertEqual(access.directPolicy(request(url="http://www.example.org/")), "always")

    def test_cachePeerAccess(self) -> None:
        """
        C{cache_peer_access} lists are per neighbour, whose names are
        compared without case; a neighbour with no lines is always usable.
        """
        access = build(
            self.ACLS
            + "cache_peer_access Upstream allow ex\n"
            + "cache_peer_access other deny lan\n",
            neighbours=["upstream", "Other", "third"],
        )
        com = request("10.0.0.1", "http://www.example.com/")
        org = request("10.0.0.1", "http://www.example.org/")
        outside = request("8.8.8.8", "http://www.example.org/")
        self.assertTrue(access.allowNeighbour("upstream", com))
        self.assertTrue(access.allowNeighbour("UPSTREAM", com))
        self.assertFalse(access.allowNeighbour("upstream", org))
        self.assertFalse(access.allowNeighbour("Other", org))
        self.assertTrue(access.allowNeighbour("other", outside))
        self.assertTrue(access.allowNeighbour("third", org))

    def test_clientOnly(self) -> None:
        """
        A list is client-only exactly when all its ACLs are C{src} ACLs.
        """
        access = build(self.ACLS + "icp_access deny !lan\nmiss_access deny lan ex\n")
        self.assertTrue(access.lists["icp_access"].clientOnly)
        self.assertTrue(access.lists["http_access"].clientOnly)
        self.assertFalse(access.lists["miss_access"].clientOnly)


class FastPathTests(SynchronousTestCase):
    """
    Client-only lists remember their answer per client, in bounded memory.
    """

    def countChecks(self, ruleList: RuleList) -> list[int]:
        """
        Count calls of C{ruleList.check}.
        """
        calls = [0]
        original = ruleList.check

        def check(c: Any) -> bool:
            calls[0] += 1
            return original(c)

        ruleList.check = check  # type: ignore[method-assign]
        return calls

    def test_icpRepeatIsOneLookup(self) -> None:
        """
        A repeat ICP query from the same client is answered from the
        per-client dict without evaluating rules.
        """
        access = AccessControl()
        calls = self.countChecks(access.lists["icp_access"])
        for _ in range(5):
            self.assertTrue(access.allowICP("10.0.0.1", "http://a/"))
            self.assertFalse(access.allowICP("8.8.8.8", "http://b/"))
        self.assertEqual(calls[0], 2)

    def test_urlRulesNotCached(self) -> None:
        """
        When C{icp_access} looks at URLs, every query is decided afresh.
        """
        access = build("acl ex dstdomain .example.com\nicp_access deny ex\nicp_access allow all\n")
        calls = self.countChecks(access.lists["icp_access"])
        self.assertFalse(access.allowICP("10.0.0.1", "http://www.example.com/"))
        self.assertTrue(access.allowICP("10.0.0.1", "http://www.example.org/"))
        self.assertEqual(calls[0], 2)

    def test_bounded(self) -> None:
        """
        The per-client dict never holds more than its size (it starts
        again when full), and answers stay right.
        """
        access = AccessControl()
        icp = access.lists["icp_access"]
        for i in range(MAX_CACHED_CLIENTS + 100):
            client = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
            self.assertTrue(access.allowICP(client, "http://x/"))
            self.assertLessEqual(len(icp._cache), MAX_CACHED_CLIENTS)
        self.assertNotIn("10.0.0.0", icp._cache)
        self.assertFalse(access.allowICP("8.8.8.8", "http://x/"))
        self.assertIn("8.8.8.8", icp._cache)
        self.assertTrue(access.allowICP("10.0.0.0", "http://x/"))

    def test_icpByClient(self) -> None:
        """
        C{icpByClient} tells the ICP responder whether C{icp_access} looks
        at client addresses only: true for the default list and for C{src}
        ACLs, false once a rule looks at the URL.
        """
        self.assertIs(AccessControl().icpByClient, True)
        self.assertIs(build("acl n src 10.0.0.0/8\nicp_access allow n\n").icpByClient, True)
        access = build("acl ex dstdomain .example.com\nicp_access deny ex\nicp_access allow all\n")
        self.assertIs(access.icpByClient, False)

    def test_httpClientOnlyCached(self) -> None:
        """
        A client-only C{http_access} is cached per client too.
        """
        access = AccessControl()
        calls = self.countChecks(access.lists["http_access"])
        for url in ("http://a/", "http://b/", "http://c/"):
            self.assertTrue(access.allowHTTP(request("192.168.0.1", url)))
        self.assertEqual(calls[0], 1)


class ErrorTests(SynchronousTestCase):
    """
    Every mistake stops start-up with a L{ConfigError} naming file, line and
    reason.
    """

    # (config text, line of the error, part of the reason)
    TABLE = [
        ("acl x srcc 10.0.0.0/8\n", 1, "unknown ACL type 'srcc'; known types: dst, dstdom_regex"),
        ("\nacl x src 10.0.0.0/33\n", 2, "acl x: bad address or CIDR '10.0.0.0/33'"),
        ("acl x src 10.0.0.0/8 10.0.0\n", 1, "bad address or CIDR '10.0.0'"),
        ("acl x src proxy.customer.org\n", 1, "host names are not resolved"),
        ("acl x dst 10.0.0.9-10.0.0.1\n", 1, "ends before it starts"),
        ("acl x port 70000\n", 1, "bad port or port range '70000'"),
        ("acl x port 80-\n", 1, "bad port or port range '80-'"),
        ("acl x port 90-80\n", 1, "bad port or port range '90-80'"),
        ("acl x port http\n", 1, "bad port or port range 'http'"),
        ("acl x url_regex (unclosed\n", 1, "bad regular expression '(unclosed'"),
        ("acl x urlpath_regex -i [z-a]\n", 1, "bad regular expression '[z-a]'"),
        ("acl x dstdomain ..example.com\n", 1, "bad domain '..example.com'"),
        ("acl x dstdomain a/b\n", 1, "bad domain 'a/b'"),
        ("acl x method GE(T\n", 1, "bad method 'GE(T'"),
        ("acl x proto 1http\n", 1, "bad protocol '1http'"),
        ("acl x src -i 10.0.0.0/8\n", 1, "option -i does not apply to type src"),
        ("acl x src\n", 1, "usage: acl NAME TYPE"),
        ("acl x src -n\n", 1, "acl x: no values given"),
        ("acl\n", 1, "usage: acl NAME TYPE"),
        ("acl !x src 10.0.0.1\n", 1, "bad ACL name '!x'"),
        ("acl x src 10.0.0.1\n\nacl x dst 10.0.0.1\n", 3,
         "ACL 'x' is defined at line 1 as type src; it cannot be redefined as dst"),
        ("acl localnet dstdomain .lan\n", 1, "ACL 'localnet' is predefined as type src"),
        ("acl all src 10.0.0.0/8\n", 1, "ACL 'all' is predefined"),
        ('acl x dstdomain "no-such-file.txt"\n', 1, "acl x: cannot read values from"),
        ("http_access allow nosuch\n", 1, "http_access: ACL 'nosuch' is not defined"),
        ("http_access allow x\nacl x src 10.0.0.1\n", 1, "ACL 'x' is not defined"),
        ("icp_access deny all !nosuch\n", 1, "icp_access: ACL 'nosuch' is not defined"),
        ("http_access permit all\n", 1, "http_access: expected allow or deny, not 'permit'"),
        ("miss_access\n", 1, "usage: miss_access allow|deny [!]ACL..."),
        ("cache deny\n", 1, "cache: no ACL given"),
        ("never_direct allow !\n", 1, "ACL '' is not defined"),
        ("cache_peer_access\n", 1, "usage: cache_peer_access NEIGHBOUR allow|deny"),
        ("cache_peer_access p1 allow all\n", 1, "cache_peer_access: no cache_peer named 'p1'"),
        ("cache_peer_access up maybe all\n", 1, "expected allow or deny, not 'maybe'"),
    ]

    def test_table(self) -> None:
        """
        Each row's config fails at its line with its reason, and C{str()}
        of the error is C{file:line: reason}.
        """
        for text, line, reason in self.TABLE:
            e = self.assertRaises(ConfigError, build, text, ["up"])
            self.assertEqual((e.filename, e.lineno), ("test.conf", line), text)
            self.assertIn(reason, e.reason, text)
            self.assertTrue(str(e).startswith(f"test.conf:{line}: "), str(e))

    def test_throughConfigFile(self) -> None:
        """
        Through the plugin, an error in a config file names that file and
        the line the directive is on.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("http_port 3128\n# lan\nacl lan src 10.0.0.0/33\n")
        config = loadConfig(path)
        section = config.plugins["access"]
        section.directives = [d for d in config.extra if d.name in aclPlugin.directives]
        e = self.assertRaises(ConfigError, aclPlugin.accessControlFromConfig, section, Clock())
        self.assertTrue(str(e).startswith(f"{path}:3: acl lan: bad address or CIDR"), str(e))

    def test_optionsRefused(self) -> None:
        """
        The C{access acl} line takes no options; one is an error at that
        line.
        """
        section = sectionFor("http_port 3128\naccess acl strict=on\n")
        e = self.assertRaises(ConfigError, aclPlugin.accessControlFromConfig, section, Clock())
        self.assertEqual(e.lineno, 2)
        self.assertIn("unknown option 'strict'", str(e))

    def test_neighbourNamesFromConfig(self) -> None:
        """
        C{cache_peer_access} must name a C{cache_peer} of the same config
        (by its C{name=} or host, in any case).
        """
        good = sectionFor(
            "cache_peer 192.0.2.1 parent 3128 3130 name=Up\n"
            "cache_peer 192.0.2.2 sibling 3128 3130\n"
            "acl ex dstdomain .example.com\n"
            "cache_peer_access up allow ex\n"
            "cache_peer_access 192.0.2.2 deny ex\n"
        )
        access = aclPlugin.accessControlFromConfig(good, Clock())
        r = request(url="http://www.example.com/")
        self.assertTrue(access.allowNeighbour("Up", r))
        self.assertFalse(access.allowNeighbour("192.0.2.2", r))
        bad = sectionFor(
            "cache_peer 192.0.2.1 parent 3128 3130 name=Up\n"
            "cache_peer_access 192.0.2.1 allow all\n"
        )
        e = self.assertRaises(ConfigError, aclPlugin.accessControlFromConfig, bad, Clock())
        self.assertEqual(e.lineno, 2)
        self.assertIn("no cache_peer named '192.0.2.1' (neighbours: Up)", str(e))

    def test_unclaimedDirective(self) -> None:
        """
        A directive that is not an access-control one is refused rather
        than ignored.
        """
        from icpmesh.config import Directive

        e = self.assertRaises(
            ConfigError,
            AccessControl.fromDirectives,
            [Directive("http_port", ("3128",), "f.conf", 4)],
        )
        self.assertEqual(str(e), "f.conf:4: 'http_port' is not an access-control directive")


class PluginTests(SynchronousTestCase):
    """
    The C{acl} plugin object and what it builds.
    """

    def test_provides(self) -> None:
        """
        The plugin provides L{IAccessControlPlugin}, is called C{acl},
        claims every access-control directive, and builds an
        L{IAccessControl}.
        """
        verifyObject(IAccessControlPlugin, aclPlugin)
        self.assertEqual(aclPlugin.name, "acl")
        self.assertEqual(
            set(aclPlugin.directives),
            {"acl", "http_access", "icp_access", "miss_access", "cache_peer_access",
             "always_direct", "never_direct", "cache"},
        )
        self.assertEqual(aclPlugin.directives, DIRECTIVES)
        verifyObject(IAccessControl, aclPlugin.accessControlFromConfig(sectionFor(""), Clock()))
        verifyObject(IAccessControl, build("acl ex dstdomain .x\nicp_access deny ex\n"))

    def test_noReactorImport(self) -> None:
        """
        Importing the module (as every plugin scan does) does not import
        the global reactor.
        """
        code = (
            "import sys, icpmesh.acl\n"
            "sys.exit(1 if 'twisted.internet.reactor' in sys.modules else 0)\n"
        )
        result = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(HERE))
        self.assertEqual(result.returncode, 0)


class RFC2187ExampleTests(SynchronousTestCase):
    """
    RFC 2187 section 4.2: the ISP's cache lets its customer's cache use HTTP
    and ICP but denies it misses, enforcing a sibling relationship.  The
    example config in C{etc/examples} is loaded as an operator would.
    """

    CUSTOMER = "192.0.2.10"

    def setUp(self) -> None:
        config = loadConfig(EXAMPLE)
        section = config.plugins["access"]
        self.assertEqual(section.name, "acl")
        section.directives = [d for d in config.extra if d.name in aclPlugin.directives]
        self.assertEqual(
            [d.name for d in config.extra if d.name not in aclPlugin.directives], []
        )
        self.access = aclPlugin.accessControlFromConfig(section, Clock())

    def test_customer(self) -> None:
        """
        The customer's cache may use HTTP and ICP (so it gets our hits),
        but may not make us fetch a miss, over IPv4 or IPv4-mapped IPv6.
        """
        for client in (self.CUSTOMER, "::ffff:" + self.CUSTOMER):
            r = request(client, "http://www.example.com/")
            self.assertTrue(self.access.allowHTTP(r), client)
            self.assertTrue(self.access.allowICP(client, "http://www.example.com/"), client)
            self.assertFalse(self.access.allowMiss(r), client)

    def test_ispUsers(self) -> None:
        """
        The ISP's own (private-address) users keep full service, misses
        included: no rule matches them, so they get the opposite of the
        last C{miss_access} rule.
        """
        r = request("10.20.30.40", "http://www.example.com/")
        self.assertTrue(self.access.allowHTTP(r))
        self.assertTrue(self.access.allowICP("10.20.30.40", "http://www.example.com/"))
        self.assertTrue(self.access.allowMiss(r))

    def test_strangers(self) -> None:
        """
        Anyone else, even the customer's neighbour address, is refused HTTP
        and ICP.
        """
        for client in ("192.0.2.11", "198.51.100.1", "2001:db8::10"):
            self.assertFalse(self.access.allowHTTP(request(client)), client)
            self.assertFalse(self.access.allowICP(client, "http://www.example.com/"), client)
