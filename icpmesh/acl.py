# -*- test-case-name: tests.test_acl -*-
"""
Squid-style access control: the built-in C{acl} plugin (C{access acl}).

Operators name sets of requests with C{acl} lines and write ordered
C{allow}/C{deny} lists that use them::

    acl customers src 192.0.2.0/24 2001:db8:1::/48
    acl safe_ports port 80 443 1025-65535
    http_access deny !safe_ports
    http_access allow localnet
    http_access allow customers
    http_access deny all
    miss_access deny customers

A rule matches when every ACL on it matches (C{!name} negates one); the first
matching rule decides; when no rule matches, the answer is the opposite of the
last rule's action; a list with no lines at all has a built-in default that
keeps a fresh node closed to everyone but loopback and private addresses.

Everything is parsed and compiled when the node starts.  Deciding does no DNS
and no I/O: a client address is parsed once per decision (not per rule), and a
list that looks only at client addresses (as C{icp_access} nearly always
does) remembers its answer per client in a bounded dict, so a repeat ICP
query costs one dict lookup.

The language, its defaults and its differences from Squid are described in
C{docs/access-control.md}.
"""

from __future__ import annotations

import ipaddress
import os
import re
from bisect import bisect_right
from socket import AF_INET, AF_INET6, inet_pton
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from zope.interface import implementer

from icpmesh.config import Directive, PluginSection, readDirectives
from icpmesh.interfaces import AccessRequest, IAccessControl, IAccessControlPlugin

#: How many client addresses a client-only rule list remembers its answer for.
MAX_CACHED_CLIENTS = 16384

#: The rule lists, by directive name.  C{cache_peer_access} is per neighbour.
RULE_LISTS = (
    "http_access",
    "icp_access",
    "miss_access",
    "always_direct",
    "never_direct",
    "cache",
)
PEER_LIST = "cache_peer_access"

#: Every directive the C{acl} plugin claims.
DIRECTIVES = ("acl",) + RULE_LISTS[:3] + (PEER_LIST,) + RULE_LISTS[3:]

#: Predefined ACLs: name -> (type, values).  A config's first C{acl} line for
#: one of these names (other than C{all}) replaces the built-in values.
PREDEFINED: dict[str, tuple[str, tuple[str, ...]]] = {
    "all": ("src", ("0.0.0.0/0", "::/0")),
    "localhost": ("src", ("127.0.0.0/8", "::1")),
    "localnet": (
        "src",
        (
            "127.0.0.0/8",
            "::1",
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "fc00::/7",
        ),
    ),
    "to_localhost": ("dst", ("127.0.0.0/8", "0.0.0.0/32", "::1")),
    "to_linklocal": ("dst", ("169.254.0.0/16", "fe80::/10")),
}

#: The rules a list has when the config gives it none: C{(allow, acl)}
#: pairs; an empty tuple means "no rules" and the fallback below applies.
DEFAULT_RULES: dict[str, tuple[tuple[bool, str], ...]] = {
    "http_access": ((True, "localnet"), (False, "all")),
    "icp_access": ((True, "localnet"), (False, "all")),
    "miss_access": (),
    "cache": (),
    "always_direct": (),
    "never_direct": (),
    PEER_LIST: (),
}

#: The answer of a list that has no rules at all.
EMPTY_ANSWER: dict[str, bool] = {
    "http_access": False,
    "icp_access": False,
    "miss_access": True,
    "cache": True,
    "always_direct": False,
    "never_direct": False,
    PEER_LIST: True,
}

_ACL_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_METHOD = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~\-]+$")
_PROTO = re.compile(r"^[A-Za-z][A-Za-z0-9+._\-]*$")
_DOMAIN = re.compile(r"^\.?[a-z0-9_:\-]+(\.[a-z0-9_:\-]+)*$")
_IPV4_MAPPED = 0xFFFF << 32
_ALL_VALUES = frozenset({"all", "0.0.0.0/0", "::/0"})
_UNSET: Any = object()

#: An address as C{(version, integer)}; IPv4-mapped IPv6 addresses are IPv4.
Address = tuple[int, int]


def parseAddress(text: str) -> Optional[Address]:
    """
    Parse an IP address for matching.

    @param text: an IPv4 or IPv6 address (IPv6 without brackets; a C{%zone}
        is ignored).
    @return: C{(4, n)} or C{(6, n)}; an IPv4-mapped IPv6 address
        (C{::ffff:10.1.2.3}) is returned as the IPv4 address it carries.
        C{None} when C{text} is not an address.
    """
    # inet_pton is strict (dotted quads only) and many times faster than
    # the ipaddress module, and this runs once per decision.
    try:
        if ":" not in text:
            return (4, int.from_bytes(inet_pton(AF_INET, text), "big"))
        number = int.from_bytes(inet_pton(AF_INET6, text.partition("%")[0]), "big")
    except (OSError, ValueError):
        return None
    if number >> 32 == 0xFFFF:
        return (4, number & 0xFFFFFFFF)
    return (6, number)


def parseAddressRange(text: str) -> list[tuple[int, int, int]]:
    """
    Parse one C{src}/C{dst} value into address ranges.

    Accepted: an address (C{10.1.2.3}, C{2001:db8::1}), a CIDR
    (C{10.0.0.0/8}, C{2001:db8::/32}), an IPv4 netmask
    (C{10.0.0.0/255.0.0.0}), a range (C{10.0.0.1-10.0.0.20}) and the word
    C{all}.  Host bits set under the mask are cleared, as Squid does.  An
    IPv6 range that covers part of C{::ffff:0:0/96} also yields the IPv4
    addresses it maps, so it matches IPv4 clients as it does in Squid.

    @return: C{(version, first, last)} triples.
    @raise ValueError: with a reason, for anything else (host names
        included: nothing is resolved).
    """
    if text == "all":
        return [(4, 0, 2**32 - 1), (6, 0, 2**128 - 1)]
    ranges: list[tuple[int, int, int]]
    if "-" in text:
        first, _, last = text.partition("-")
        try:
            lo = ipaddress.ip_address(first)
            hi = ipaddress.ip_address(last)
        except ValueError:
            raise ValueError(f"bad address range {text!r}") from None
        if lo.version != hi.version:
            raise ValueError(f"address range {text!r} mixes IPv4 and IPv6")
        if int(hi) < int(lo):
            raise ValueError(f"address range {text!r} ends before it starts")
        ranges = [(lo.version, int(lo), int(hi))]
    else:
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(
                f"bad address or CIDR {text!r} (use e.g. 10.0.0.0/8, "
                "2001:db8::/32, 10.0.0.1-10.0.0.9; host names are not resolved)"
            ) from None
        ranges = [
            (network.version, int(network.network_address), int(network.broadcast_address))
        ]
    version, lo_, hi_ = ranges[0]
    if version == 6:
        mappedLo = max(lo_, _IPV4_MAPPED)
        mappedHi = min(hi_, _IPV4_MAPPED + 2**32 - 1)
        if mappedLo <= mappedHi:
            ranges.append((4, mappedLo - _IPV4_MAPPED, mappedHi - _IPV4_MAPPED))
    return ranges


class AddressSet:
    """
    A set of IPv4 and IPv6 addresses made of ranges, tested with one binary
    search.

    @ivar everything: C{True} when the set holds every IPv4 and IPv6 address.
    """

    def __init__(self, ranges: Iterable[tuple[int, int, int]]) -> None:
        """
        @param ranges: C{(version, first, last)} triples, in any order,
            overlapping or not.
        """
        byVersion: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for version, lo, hi in ranges:
            byVersion[version].append((lo, hi))
        self._starts: dict[int, list[int]] = {}
        self._ends: dict[int, list[int]] = {}
        for version, spans in byVersion.items():
            merged: list[list[int]] = []
            for lo, hi in sorted(spans):
                if merged and lo <= merged[-1][1] + 1:
                    merged[-1][1] = max(merged[-1][1], hi)
                else:
                    merged.append([lo, hi])
            self._starts[version] = [span[0] for span in merged]
            self._ends[version] = [span[1] for span in merged]
        self.everything = self._ends[4] == [2**32 - 1] and self._starts[4] == [0] and (
            self._ends[6] == [2**128 - 1] and self._starts[6] == [0]
        )

    def __contains__(self, address: Optional[Address]) -> bool:
        """
        Is C{address} (from L{parseAddress}) in the set?  C{None} (not an
        address) is only in a set of everything.
        """
        if address is None:
            return self.everything
        version, number = address
        starts = self._starts[version]
        index = bisect_right(starts, number) - 1
        return index >= 0 and number <= self._ends[version][index]


class _Check:
    """
    What one decision looks at: a client address and, except on the
    client-only fast path, the request.  Each address is parsed at most once
    per decision, however many rules look at it.
    """

    __slots__ = ("client", "request", "_clientAddress", "_dstAddress")

    def __init__(self, client: str, request: Optional[AccessRequest]) -> None:
        self.client = client
        self.request: AccessRequest = request  # type: ignore[assignment]
        self._clientAddress: Any = _UNSET
        self._dstAddress: Any = _UNSET

    def clientAddress(self) -> Optional[Address]:
        """
        The client address, parsed.
        """
        if self._clientAddress is _UNSET:
            self._clientAddress = parseAddress(self.client)
        return self._clientAddress  # type: ignore[no-any-return]

    def dstAddress(self) -> Optional[Address]:
        """
        The URL host, parsed, when it is an IP literal; else C{None}.
        """
        if self._dstAddress is _UNSET:
            self._dstAddress = parseAddress(self.request.host)
        return self._dstAddress  # type: ignore[no-any-return]


Matcher = Callable[[_Check], bool]


# ---------------------------------------------------------------------------
# ACL types.  Each parses its values at start-up and compiles them into one
# matcher function.


class _ACLType:
    """
    One ACL type: how its values are parsed and matched.

    @cvar name: the type's word in C{acl} lines.
    @cvar flags: the C{-x} words it accepts before its values.
    @cvar clientOnly: C{True} when it looks at the client address only.
    """

    name = ""
    flags: frozenset[str] = frozenset()
    clientOnly = False

    def parse(self, value: str, ignoreCase: bool) -> Any:
        """
        Parse one value.

        @raise ValueError: with a reason.
        """
        raise NotImplementedError()

    def compile(self, values: Sequence[Any]) -> Matcher:
        """
        Build the matcher for parsed values.
        """
        raise NotImplementedError()


class _Src(_ACLType):
    name = "src"
    flags = frozenset({"-n"})
    clientOnly = True

    def parse(self, value: str, ignoreCase: bool) -> Any:
        return parseAddressRange(value)

    def compile(self, values: Sequence[Any]) -> Matcher:
        addresses = AddressSet(r for ranges in values for r in ranges)
        if addresses.everything:
            return lambda check: True
        return lambda check: check.clientAddress() in addresses


class _Dst(_Src):
    name = "dst"
    clientOnly = False

    def compile(self, values: Sequence[Any]) -> Matcher:
        addresses = AddressSet(r for ranges in values for r in ranges)
        return lambda check: check.dstAddress() in addresses


class _DstDomain(_ACLType):
    name = "dstdomain"
    flags = frozenset({"-n", "-i"})

    def parse(self, value: str, ignoreCase: bool) -> Any:
        domain = value.lower().rstrip(".") if value != "." else value
        if domain.startswith("[") and domain.endswith("]"):
            domain = domain[1:-1]
        if not _DOMAIN.match(domain):
            raise ValueError(f"bad domain {value!r}")
        return domain

    def compile(self, values: Sequence[Any]) -> Matcher:
        exact = frozenset(v for v in values if not v.startswith("."))
        suffixes = frozenset(v[1:] for v in values if v.startswith("."))

        def match(check: _Check) -> bool:
            host = check.request.host
            if host.endswith("."):
                host = host.rstrip(".")
            if host in exact:
                return True
            while suffixes:
                if host in suffixes:
                    return True
                dot = host.find(".")
                if dot < 0:
                    return False
                host = host[dot + 1 :]
            return False

        return match


class _Port(_ACLType):
    name = "port"

    def parse(self, value: str, ignoreCase: bool) -> Any:
        first, sep, last = value.partition("-")
        try:
            if not first.isdigit() or (sep and not last.isdigit()):
                raise ValueError()
            lo = int(first)
            hi = int(last) if sep else lo
        except ValueError:
            raise ValueError(f"bad port or port range {value!r}") from None
        if hi > 65535 or lo > hi:
            raise ValueError(f"bad port or port range {value!r}")
        return (lo, hi)

    def compile(self, values: Sequence[Any]) -> Matcher:
        if sum(hi - lo + 1 for lo, hi in values) <= 1024:
            ports = frozenset(p for lo, hi in values for p in range(lo, hi + 1))
            return lambda check: check.request.port in ports
        spans = tuple(sorted(values))
        return lambda check: any(lo <= check.request.port <= hi for lo, hi in spans)


class _Method(_ACLType):
    name = "method"

    def parse(self, value: str, ignoreCase: bool) -> Any:
        if not _METHOD.match(value):
            raise ValueError(f"bad method {value!r}")
        return value.upper()

    def compile(self, values: Sequence[Any]) -> Matcher:
        methods = frozenset(values)
        return lambda check: check.request.method.upper() in methods


class _Proto(_ACLType):
    name = "proto"

    def parse(self, value: str, ignoreCase: bool) -> Any:
        if not _PROTO.match(value):
            raise ValueError(f"bad protocol {value!r}")
        return value.lower()

    def compile(self, values: Sequence[Any]) -> Matcher:
        schemes = frozenset(values)
        return lambda check: check.request.scheme in schemes


class _Regex(_ACLType):
    flags = frozenset({"-i", "+i"})

    def parse(self, value: str, ignoreCase: bool) -> Any:
        try:
            return re.compile(value, re.IGNORECASE if ignoreCase else 0)
        except re.error as e:
            raise ValueError(f"bad regular expression {value!r}: {e}") from None

    def subject(self, request: AccessRequest) -> str:
        raise NotImplementedError()

    def compile(self, values: Sequence[Any]) -> Matcher:
        searches = tuple(pattern.search for pattern in values)
        subject = self.subject
        return lambda check: any(s(subject(check.request)) for s in searches)


class _URLRegex(_Regex):
    name = "url_regex"

    def subject(self, request: AccessRequest) -> str:
        return request.url


class _URLPathRegex(_Regex):
    name = "urlpath_regex"

    def subject(self, request: AccessRequest) -> str:
        return request.path


class _DstDomRegex(_Regex):
    name = "dstdom_regex"

    def subject(self, request: AccessRequest) -> str:
        return request.host


#: Every ACL type, by name.
ACL_TYPES: dict[str, _ACLType] = {
    t.name: t
    for t in (
        _Src(),
        _Dst(),
        _DstDomain(),
        _Port(),
        _Method(),
        _Proto(),
        _URLRegex(),
        _URLPathRegex(),
        _DstDomRegex(),
    )
}


# ---------------------------------------------------------------------------
# ACLs and rule lists


class ACL:
    """
    A named ACL: a type and its values, compiled into L{match}.

    @ivar name: its name.
    @ivar type: its type word (C{src}, C{dstdomain}, ...).
    @ivar values: the values as written, in order.
    @ivar filename: where it was first defined (C{None}: predefined).
    @ivar lineno: the line it was first defined on (C{None}: predefined).
    @ivar clientOnly: C{True} when it looks at the client address only.
    """

    def __init__(
        self,
        name: str,
        type: str,
        filename: Optional[str] = None,
        lineno: Optional[int] = None,
    ) -> None:
        self.name = name
        self.type = type
        self.values: list[str] = []
        self.filename = filename
        self.lineno = lineno
        self.clientOnly = ACL_TYPES[type].clientOnly
        self._parsed: list[Any] = []
        self._match: Optional[Matcher] = None

    def add(self, value: str, parsed: Any) -> None:
        """
        Add a value (before the first match).
        """
        self.values.append(value)
        self._parsed.append(parsed)
        self._match = None

    def reset(self, filename: Optional[str], lineno: Optional[int]) -> None:
        """
        Forget every value: a config's first line for a predefined ACL
        replaces the built-in values (rules already naming it see the new
        ones).
        """
        self.values = []
        self._parsed = []
        self._match = None
        self.filename = filename
        self.lineno = lineno

    def compiled(self) -> Matcher:
        """
        The matcher function: called with a decision's L{_Check}, it says
        whether the request matches.
        """
        if self._match is None:
            self._match = ACL_TYPES[self.type].compile(self._parsed)
        return self._match

    def match(self, check: _Check) -> bool:
        """
        Does the request being decided match?
        """
        return self.compiled()(check)

    def __repr__(self) -> str:
        return f"<ACL {self.name} {self.type} {' '.join(self.values)}>"


def predefinedACLs() -> dict[str, ACL]:
    """
    Fresh copies of the predefined ACLs (L{PREDEFINED}), by name.
    """
    acls = {}
    for name, (kind, values) in PREDEFINED.items():
        acl = acls[name] = ACL(name, kind)
        for value in values:
            acl.add(value, ACL_TYPES[kind].parse(value, False))
    return acls


class Rule:
    """
    One C{allow}/C{deny} line.

    @ivar allow: its action.
    @ivar acls: C{(acl, negated)} pairs, all of which must match.
    @ivar filename: where it was written (C{None}: a built-in default).
    @ivar lineno: its line (C{None}: a built-in default).
    """

    def __init__(
        self,
        allow: bool,
        acls: Sequence[tuple[ACL, bool]],
        filename: Optional[str] = None,
        lineno: Optional[int] = None,
    ) -> None:
        self.allow = allow
        self.acls = tuple(acls)
        self.filename = filename
        self.lineno = lineno

    def __repr__(self) -> str:
        words = ["allow" if self.allow else "deny"]
        words += [("!" if negated else "") + acl.name for acl, negated in self.acls]
        return f"<Rule {' '.join(words)}>"


class RuleList:
    """
    An ordered list of L{Rule}s deciding one question, Squid's way: the first
    rule whose ACLs all match gives the answer; when none matches, the answer
    is the opposite of the last rule's action; with no rules at all it is
    C{empty}.

    A list whose rules look only at client addresses remembers its answer
    for up to C{cacheSize} clients (oldest forgotten first).

    @ivar name: the directive it came from, for messages.
    @ivar rules: the rules.
    @ivar clientOnly: C{True} when its answer depends on the client only.
    """

    def __init__(
        self,
        name: str,
        rules: Sequence[Rule],
        empty: bool,
        cacheSize: int = MAX_CACHED_CLIENTS,
    ) -> None:
        self.name = name
        self.rules = tuple(rules)
        self._compiled = tuple(
            (rule.allow, tuple((acl.compiled(), negated) for acl, negated in rule.acls))
            for rule in self.rules
        )
        self._fallback = (not self.rules[-1].allow) if self.rules else empty
        self.clientOnly = all(acl.clientOnly for rule in self.rules for acl, _ in rule.acls)
        self._cache: dict[str, bool] = {}
        self._cacheSize = cacheSize

    def check(self, check: _Check) -> bool:
        """
        Decide for one request.
        """
        for allow, tests in self._compiled:
            for match, negated in tests:
                if match(check) == negated:
                    break
            else:
                return allow
        return self._fallback

    def checkClient(self, client: str) -> bool:
        """
        Decide for a client address alone; only for a L{clientOnly} list.
        The answer is remembered.
        """
        cache = self._cache
        answer = cache.get(client)
        if answer is None:
            answer = self.check(_Check(client, None))
            if len(cache) >= self._cacheSize:
                # Answers are cheap to recompute: start again rather than
                # evict one by one (deleting a plain dict's first key after
                # churn is slow).
                cache.clear()
            cache[client] = answer
        return answer

    def decide(self, request: AccessRequest) -> bool:
        """
        Decide for C{request}, through the client cache when the list looks
        at client addresses only.
        """
        if self.clientOnly:
            return self.checkClient(request.client)
        return self.check(_Check(request.client, request))

    def __repr__(self) -> str:
        return f"<RuleList {self.name} {list(self.rules)!r}>"


def defaultRuleList(name: str, acls: Mapping[str, ACL]) -> RuleList:
    """
    The list C{name} (a L{RULE_LISTS} name or C{cache_peer_access}) has when
    the config gives it no rules, using C{acls} for the predefined names it
    refers to (so a config that redefines C{localnet} changes the default
    C{http_access} and C{icp_access} too).
    """
    rules = [Rule(allow, [(acls[aclName], False)]) for allow, aclName in DEFAULT_RULES[name]]
    return RuleList(name, rules, EMPTY_ANSWER[name])


# ---------------------------------------------------------------------------
# The runtime component


@implementer(IAccessControl)
class AccessControl:
    """
    Squid-style access control (L{IAccessControl}).

    Build it from config with L{fromDirectives} or L{fromText}; with no
    arguments it has the defaults: HTTP and ICP for loopback and private
    addresses only, misses and storing allowed, every neighbour usable, no
    C{always_direct}/C{never_direct}.

    @ivar acls: the ACLs by name, predefined ones included.
    @ivar lists: the rule lists by directive name.
    @ivar peerLists: the C{cache_peer_access} lists by lower-cased
        neighbour name.
    """

    def __init__(
        self,
        lists: Optional[Mapping[str, RuleList]] = None,
        peerLists: Optional[Mapping[str, RuleList]] = None,
        acls: Optional[Mapping[str, ACL]] = None,
    ) -> None:
        """
        @param lists: rule lists by directive name (L{RULE_LISTS}); a list
            not given gets its default.
        @param peerLists: C{cache_peer_access} lists by neighbour name.
        @param acls: the ACLs the lists use, for the defaults and for
            inspection (default: the predefined ones).
        """
        self.acls: dict[str, ACL] = dict(acls) if acls is not None else predefinedACLs()
        self.lists: dict[str, RuleList] = {}
        for name in RULE_LISTS:
            given = (lists or {}).get(name)
            self.lists[name] = given if given is not None else defaultRuleList(name, self.acls)
        self.peerLists: dict[str, RuleList] = {
            name.lower(): ruleList for name, ruleList in (peerLists or {}).items()
        }
        self._http = self.lists["http_access"]
        self._icp = self.lists["icp_access"]
        self._miss = self.lists["miss_access"]
        self._store = self.lists["cache"]
        self._always = self.lists["always_direct"]
        self._never = self.lists["never_direct"]
        icp = self._icp
        #: Whether L{allowICP}'s answer depends on the client address alone
        #: (every C{icp_access} ACL is a C{src} ACL).  The ICP responder then
        #: asks once per client (see L{IAccessControl.allowICP}).
        self.icpByClient = icp.clientOnly
        if icp.clientOnly:
            self.allowICP = self._allowICPByClient  # type: ignore[method-assign]

    @classmethod
    def fromDirectives(
        cls,
        directives: Iterable[Directive],
        neighbours: Optional[Iterable[str]] = None,
    ) -> "AccessControl":
        """
        Build from C{acl} and rule directives, in file order.

        @param directives: the directives (each named in L{DIRECTIVES}).
        @param neighbours: the configured neighbour names, which
            C{cache_peer_access} lines must name; C{None} to not check.
        @raise ConfigError: at the offending directive.
        """
        return _Builder(neighbours).build(directives)

    @classmethod
    def fromText(
        cls,
        text: str,
        filename: str = "<acl>",
        neighbours: Optional[Iterable[str]] = None,
    ) -> "AccessControl":
        """
        Build from config text holding only access-control directives.

        @raise ConfigError: at the offending line.
        """
        return cls.fromDirectives(readDirectives(text, filename), neighbours)

    def allowHTTP(self, request: AccessRequest) -> bool:
        """
        C{http_access}: may this client use the proxy for this request?
        """
        return self._http.decide(request)

    def allowMiss(self, request: AccessRequest) -> bool:
        """
        C{miss_access}: may this client make us fetch what we do not hold?
        """
        return self._miss.decide(request)

    def allowICP(self, client: str, url: str) -> bool:
        """
        C{icp_access}: may this client's ICP query be answered?  The URL is
        parsed only when a rule needs more than the client address; its
        method is C{ICP_QUERY}.  A URL that cannot be parsed matches no
        URL-based ACL.
        """
        try:
            request = AccessRequest.fromURL(client, "ICP_QUERY", url)
        except ValueError:
            request = AccessRequest(client, "ICP_QUERY", url, "", "", 0, url)
        return self._icp.check(_Check(client, request))

    def _allowICPByClient(self, client: str, url: str) -> bool:
        """
        L{allowICP} for an C{icp_access} list that looks only at client
        addresses: one dict lookup for a client seen before.
        """
        return self._icp.checkClient(client)

    def allowNeighbour(self, neighbour: str, request: AccessRequest) -> bool:
        """
        C{cache_peer_access}: may the neighbour called C{neighbour} (any
        case) be used for this request?  Yes when it has no rules.
        """
        peerLists = self.peerLists
        if not peerLists:
            return True
        ruleList = peerLists.get(neighbour) or peerLists.get(neighbour.lower())
        return ruleList is None or ruleList.decide(request)

    def directPolicy(self, request: AccessRequest) -> Optional[str]:
        """
        C{"always"} when C{always_direct} allows the request, else
        C{"never"} when C{never_direct} allows it, else C{None}.
        """
        if self._always.rules and self._always.decide(request):
            return "always"
        if self._never.rules and self._never.decide(request):
            return "never"
        return None

    def allowStore(self, request: AccessRequest) -> bool:
        """
        C{cache}: may a response to this request be stored?
        """
        return self._store.decide(request)


# ---------------------------------------------------------------------------
# Parsing


class _Builder:
    """
    Reads access-control directives in order into ACLs and rule lists.
    """

    def __init__(self, neighbours: Optional[Iterable[str]]) -> None:
        self.neighbours = (
            None if neighbours is None else {name.lower(): name for name in neighbours}
        )
        self.acls = predefinedACLs()
        self.builtin = set(self.acls)
        self.rules: dict[str, list[Rule]] = {name: [] for name in RULE_LISTS}
        self.peerRules: dict[str, list[Rule]] = {}

    def build(self, directives: Iterable[Directive]) -> AccessControl:
        for d in directives:
            if d.name == "acl":
                self.parseACL(d)
            elif d.name in RULE_LISTS:
                self.rules[d.name].append(self.parseRule(d, d.args))
            elif d.name == PEER_LIST:
                self.parsePeerRule(d)
            else:
                raise d.error(f"{d.name!r} is not an access-control directive")
        lists = {
            name: RuleList(name, rules, EMPTY_ANSWER[name])
            for name, rules in self.rules.items()
            if rules
        }
        peerLists = {
            name: RuleList(f"{PEER_LIST} {name}", rules, EMPTY_ANSWER[PEER_LIST])
            for name, rules in self.peerRules.items()
        }
        return AccessControl(lists, peerLists, self.acls)

    def parseACL(self, d: Directive) -> None:
        if len(d.args) < 2:
            raise d.error("usage: acl NAME TYPE [-i] VALUE...")
        name, typeName = d.args[0], d.args[1].lower()
        if not _ACL_NAME.match(name):
            raise d.error(f"bad ACL name {name!r} (use letters, digits, '-', '_', '.')")
        aclType = ACL_TYPES.get(typeName)
        if aclType is None:
            raise d.error(
                f"unknown ACL type {d.args[1]!r}; known types: " + ", ".join(sorted(ACL_TYPES))
            )
        acl = self.acls.get(name)
        if acl is not None and acl.type != typeName:
            where = (
                "predefined" if acl.lineno is None else f"defined at line {acl.lineno}"
            )
            raise d.error(
                f"ACL {name!r} is {where} as type {acl.type}; "
                f"it cannot be redefined as {typeName}"
            )
        values = self.values(d, aclType)
        if not values:
            raise d.error(f"acl {name}: no values given (usage: acl NAME TYPE [-i] VALUE...)")
        parsed = []
        for value, ignoreCase in values:
            try:
                parsed.append((value, aclType.parse(value, ignoreCase)))
            except ValueError as e:
                raise d.error(f"acl {name}: {e}") from None
        if name == "all":
            if any(value not in _ALL_VALUES for value, _ in parsed):
                raise d.error("ACL 'all' is predefined (every address) and cannot be changed")
            return
        if acl is None:
            acl = self.acls[name] = ACL(name, typeName, d.filename, d.lineno)
        elif name in self.builtin:
            # The first user line for a predefined ACL replaces its values.
            self.builtin.discard(name)
            acl.reset(d.filename, d.lineno)
        for value, item in parsed:
            acl.add(value, item)

    def values(self, d: Directive, aclType: _ACLType) -> list[tuple[str, bool]]:
        """
        The values of an C{acl} line with the case flag each is parsed with;
        C{"file"} values are read from that file.
        """
        values: list[tuple[str, bool]] = []
        ignoreCase = False
        flagsAllowed = True
        for word in d.args[2:]:
            if word == "--" and flagsAllowed:
                flagsAllowed = False
                continue
            if word in ("-i", "+i") and word in aclType.flags:
                ignoreCase = word == "-i"
                continue
            if flagsAllowed and not values and word[:1] == "-" and len(word) == 2:
                if word not in aclType.flags:
                    raise d.error(
                        f"acl {d.args[0]}: option {word} does not apply to type {aclType.name}"
                    )
                continue
            if len(word) > 2 and word[0] == '"' and word[-1] == '"':
                values.extend((line, ignoreCase) for line in self.readValues(d, word[1:-1]))
            else:
                values.append((word, ignoreCase))
        return values

    def readValues(self, d: Directive, path: str) -> list[str]:
        """
        Values from a file, one per line; C{#} comments and blank lines are
        skipped.  A relative path is taken from the config file's directory.
        This runs once at start-up, before the reactor runs.
        """
        if not os.path.isabs(path):
            path = os.path.join(os.path.dirname(d.filename), path)
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise d.error(f"acl {d.args[0]}: cannot read values from {path!r}: {e}") from None
        values = []
        for line in lines:
            line = line.split("#", 1)[0].strip()
            if line:
                values.extend(line.split())
        return values

    def parseRule(self, d: Directive, words: Sequence[str]) -> Rule:
        usage = f"usage: {d.name} {'NEIGHBOUR ' if d.name == PEER_LIST else ''}allow|deny [!]ACL..."
        if not words:
            raise d.error(usage)
        action = words[0].lower()
        if action not in ("allow", "deny"):
            raise d.error(f"{d.name}: expected allow or deny, not {words[0]!r}")
        if len(words) < 2:
            raise d.error(f"{d.name}: no ACL given ({usage})")
        acls = []
        for word in words[1:]:
            negated = word.startswith("!")
            name = word[1:] if negated else word
            acl = self.acls.get(name)
            if acl is None:
                raise d.error(
                    f"{d.name}: ACL {name!r} is not defined "
                    "(define it with an 'acl' line before this one)"
                )
            acls.append((acl, negated))
        return Rule(action == "allow", acls, d.filename, d.lineno)

    def parsePeerRule(self, d: Directive) -> None:
        if not d.args:
            raise d.error(f"usage: {PEER_LIST} NEIGHBOUR allow|deny [!]ACL...")
        name = d.args[0].lower()
        if self.neighbours is not None and name not in self.neighbours:
            known = ", ".join(sorted(self.neighbours.values())) or "none configured"
            raise d.error(
                f"{PEER_LIST}: no cache_peer named {d.args[0]!r} (neighbours: {known})"
            )
        self.peerRules.setdefault(name, []).append(self.parseRule(d, d.args[1:]))


# ---------------------------------------------------------------------------
# The plugin


@implementer(IAccessControlPlugin)
class AccessControlPlugin:
    """
    Builds L{AccessControl} from the C{acl}, C{http_access}, ... lines of a
    config file.  The C{access acl} line itself takes no options.
    """

    name = "acl"
    description = (
        "Squid-style ACLs and http_access/icp_access/miss_access rules "
        "(default: loopback and private addresses only)"
    )
    directives = DIRECTIVES

    def accessControlFromConfig(self, section: PluginSection, reactor: Any) -> AccessControl:
        """
        Build the access control from C{section.directives}; C{reactor} is
        not needed (deciding reads neither time nor the network).

        @raise ConfigError: for an option on the C{access} line or a bad
            directive, at its file and line.
        """
        section.checkOptions(())
        config = section.config
        neighbours = None if config is None else [n.name for n in config.neighbours]
        return AccessControl.fromDirectives(section.directives, neighbours)


#: The plugin object found by L{twisted.plugin.getPlugins}.
aclPlugin = AccessControlPlugin()

__all__ = [
    "ACL",
    "ACL_TYPES",
    "AccessControl",
    "AccessControlPlugin",
    "AddressSet",
    "DIRECTIVES",
    "PREDEFINED",
    "Rule",
    "RuleList",
    "aclPlugin",
    "defaultRuleList",
    "parseAddress",
    "parseAddressRange",
    "predefinedACLs",
]
