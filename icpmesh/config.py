# -*- test-case-name: tests.test_config -*-
"""
The operator's config file.

One file, in the directive-per-line style Squid operators already know::

    # comments start with '#'
    http_port 127.0.0.1:3128
    icp_port 3130
    store memory max-size=256MB
    cache_peer 192.168.0.2 parent 3128 3130 weight=2

Every line is a directive name followed by words.  A line ending in a
backslash continues on the next line.  Core directives are parsed here;
plugins claim the directives they read (their C{directives} attribute) and get
them, with file and line, in a L{PluginSection}.  Any error names the file and
line: C{icpmesh.conf:12: unknown directive 'htp_port'}.

With no file at all, L{DEFAULT_CONFIG} applies: HTTP on 3128 and ICP on 3130
on every address, the C{memory} store, the C{acl} access control (loopback and
private addresses only) and the C{icp} peer selector.

Run C{icpmesh-check FILE} (or C{python -m icpmesh.config FILE}) to check a
file without starting a node.
"""

from __future__ import annotations

import re
import socket
import sys
from typing import Any, Callable, Iterable, Optional, Sequence

import attr

from icpmesh.caching import CDN_MODES

DEFAULT_HTTP_PORT = 3128
DEFAULT_ICP_PORT = 3130

#: What C{twistd icpmesh} runs with when no config file is given.
DEFAULT_CONFIG = """\
http_port 3128
icp_port 3130
store memory
access acl
selector icp
"""


class ConfigError(Exception):
    """
    A config file is wrong.  C{str()} gives C{file:line: reason}.

    @ivar reason: what is wrong.
    @ivar filename: the file, if known.
    @ivar lineno: the 1-based line number, if known.
    """

    def __init__(
        self, reason: str, filename: Optional[str] = None, lineno: Optional[int] = None
    ) -> None:
        self.reason = reason
        self.filename = filename
        self.lineno = lineno
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.filename or "<config>"
        if self.lineno is not None:
            where += f":{self.lineno}"
        return f"{where}: {self.reason}"


@attr.s(slots=True, frozen=True, auto_attribs=True)
class Directive:
    """
    One logical line of a config file.

    @ivar name: the directive name, lower case.
    @ivar args: the words after it.
    @ivar filename: where it was read.
    @ivar lineno: the line it starts on.
    """

    name: str
    args: tuple[str, ...]
    filename: str
    lineno: int

    def error(self, reason: str) -> ConfigError:
        """
        A L{ConfigError} located at this directive.
        """
        return ConfigError(reason, self.filename, self.lineno)


# ---------------------------------------------------------------------------
# Value parsers, shared with plugins

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "bytes": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
}
_DURATION_UNITS = {
    "": 1.0,
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "ms": 0.001,
    "msec": 0.001,
    "milliseconds": 0.001,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
}
_NUMBER_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parseSize(text: str) -> int:
    """
    Parse C{"256MB"}, C{"8 KB"}, C{"1024"} into bytes (binary units).

    @raise ValueError: for anything else.
    """
    match = _NUMBER_UNIT.match(text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 512KB, 256MB, 2GB)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def parseDuration(text: str) -> float:
    """
    Parse C{"2 seconds"}, C{"500ms"}, C{"10s"}, C{"1 hour"} into seconds.
    A bare number is seconds.

    @raise ValueError: for anything else.
    """
    match = _NUMBER_UNIT.match(text)
    if not match or match.group(2).lower() not in _DURATION_UNITS:
        raise ValueError(f"not a duration: {text!r} (use e.g. 2s, 500ms, 10 minutes)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]


def parseBool(text: str) -> bool:
    """
    Parse C{on}/C{off} (and C{yes}/C{no}, C{true}/C{false}, C{1}/C{0}).

    @raise ValueError: for anything else.
    """
    value = text.strip().lower()
    if value in ("on", "yes", "true", "1"):
        return True
    if value in ("off", "no", "false", "0"):
        return False
    raise ValueError(f"not on/off: {text!r}")


def parsePortInt(text: str, allowZero: bool = True) -> int:
    """
    Parse a port number (0-65535; 0 only when C{allowZero}).
    """
    if not text.isdigit():
        raise ValueError(f"not a port number: {text!r}")
    port = int(text)
    if port > 65535 or (port == 0 and not allowZero):
        raise ValueError(f"port out of range: {text!r}")
    return port


def parseListen(text: str, defaultAddress: str = "") -> tuple[str, int]:
    """
    Parse C{PORT}, C{ADDRESS:PORT} or C{[IPV6]:PORT}.

    @return: C{(address, port)}; C{address} is C{defaultAddress} when absent.
    """
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ValueError(f"not [address]:port: {text!r}")
        return text[1:close], parsePortInt(text[close + 2 :])
    if ":" in text:
        address, _, port = text.rpartition(":")
        if ":" in address:
            raise ValueError(f"write IPv6 addresses as [address]:port: {text!r}")
        return address, parsePortInt(port)
    return defaultAddress, parsePortInt(text)


def parseOptions(words: Iterable[str]) -> dict[str, str]:
    """
    Turn C{key=value} and bare C{flag} words into a dict (flags map to
    C{""}).
    """
    options: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        options[key.lower()] = value if sep else ""
    return options


# ---------------------------------------------------------------------------
# Plugin sections


@attr.s(slots=True, auto_attribs=True)
class PluginSection:
    """
    The config a plugin is built from.

    @ivar kind: C{"store"}, C{"access"} or C{"selector"}.
    @ivar name: the chosen plugin's name.
    @ivar options: the C{key=value} words of its line (flags map to C{""}).
    @ivar filename: file of that line.
    @ivar lineno: line number of that line (C{None} for a default).
    @ivar directives: every directive the plugin claimed, in file order.
    @ivar config: the whole L{MeshConfig}, for global settings.
    """

    kind: str
    name: str
    options: dict[str, str]
    filename: str
    lineno: Optional[int]
    directives: list[Directive] = attr.ib(factory=list)
    config: Any = None

    def error(self, reason: str, directive: Optional[Directive] = None) -> ConfigError:
        """
        A L{ConfigError} at C{directive}, or at this plugin's own line.
        """
        if directive is not None:
            return directive.error(reason)
        return ConfigError(f"{self.kind} {self.name}: {reason}", self.filename, self.lineno)

    def checkOptions(self, allowed: Iterable[str]) -> None:
        """
        Refuse options not in C{allowed}.

        @raise ConfigError: naming the first unknown option and the known ones.
        """
        known = set(allowed)
        for key in self.options:
            if key not in known:
                raise self.error(
                    f"unknown option {key!r}; known options: "
                    + (", ".join(sorted(known)) or "(none)")
                )

    def _get(self, key: str, default: Any, parser: Callable[[str], Any]) -> Any:
        if key not in self.options:
            return default
        try:
            return parser(self.options[key])
        except ValueError as e:
            raise self.error(f"option {key}: {e}") from None

    def getSize(self, key: str, default: int) -> int:
        """
        An option parsed with L{parseSize}.
        """
        return int(self._get(key, default, parseSize))

    def getDuration(self, key: str, default: float) -> float:
        """
        An option parsed with L{parseDuration}.
        """
        return float(self._get(key, default, parseDuration))

    def getInt(self, key: str, default: int) -> int:
        """
        An option parsed as a decimal integer.
        """
        return int(self._get(key, default, int))

    def getBool(self, key: str, default: bool) -> bool:
        """
        An option parsed with L{parseBool}; a bare flag is C{True}.
        """
        if self.options.get(key) == "":
            return True
        return bool(self._get(key, default, parseBool))

    def getString(self, key: str, default: Optional[str] = None) -> Optional[str]:
        """
        An option as text.
        """
        return self.options.get(key, default)


# ---------------------------------------------------------------------------
# Neighbours

NEIGHBOUR_TYPES = ("parent", "sibling", "multicast")

#: cache_peer options that take no value.
NEIGHBOUR_FLAGS = frozenset(
    {
        "no-query",
        "default",
        "proxy-only",
        "closest-only",
        "multicast-responder",
        "multicast-siblings",
        "no-digest",
        "no-netdb-exchange",
        "round-robin",
        "weighted-round-robin",
        "carp",
        "sourcehash",
        "background-ping",
        "allow-miss",
        "tls",
        "ssl",
        "no-delay",
        "originserver",
        "first-up",
    }
)
#: cache_peer options that take a value, with their parsers.
NEIGHBOUR_VALUES: dict[str, Callable[[str], Any]] = {
    "name": str,
    "weight": int,
    "basetime": lambda v: parseDuration(v + "ms" if v.isdigit() else v),
    "ttl": int,
    "connect-timeout": lambda v: parseDuration(v if not v.isdigit() else v + "s"),
    "connect-fail-limit": int,
    "max-conn": int,
    "round": int,
    "carp-key": str,
    "tls-cafile": str,
    "tls-domain": str,
    "tls-cert": str,
    "tls-key": str,
    "login": str,
}


@attr.s(slots=True, frozen=True, auto_attribs=True)
class NeighbourConfig:
    """
    One C{cache_peer} line.

    @ivar host: address or name of the neighbour.
    @ivar type: C{parent}, C{sibling} or C{multicast}.
    @ivar httpPort: its HTTP port.
    @ivar icpPort: its ICP port (0: never queried).
    @ivar name: unique name (defaults to the host as written).
    @ivar flags: the option flags given.
    @ivar values: the C{key=value} options given, parsed.
    @ivar domains: C{(domain, allow)} pairs from C{neighbour_domain} lines.
    @ivar typeDomains: C{(type, domains)} from C{neighbour_type_domain}.
    @ivar filename: where it was defined.
    @ivar lineno: the line.
    """

    host: str
    type: str
    httpPort: int
    icpPort: int
    name: str
    flags: frozenset[str]
    values: dict[str, Any] = attr.ib(eq=False)
    filename: str = "<config>"
    lineno: int = 0
    domains: tuple[tuple[str, bool], ...] = ()
    typeDomains: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def weight(self) -> int:
        return max(1, int(self.values.get("weight", 1)))


def _parseNeighbour(d: Directive) -> NeighbourConfig:
    if len(d.args) < 4:
        raise d.error("usage: cache_peer HOST TYPE HTTP-PORT ICP-PORT [OPTIONS]")
    host, kind, http, icp = d.args[:4]
    kind = kind.lower()
    if kind in ("neighbor", "neighbour"):
        kind = "sibling"
    if kind not in NEIGHBOUR_TYPES:
        raise d.error(f"unknown neighbour type {kind!r}; use parent, sibling or multicast")
    try:
        httpPort = parsePortInt(http)
        icpPort = parsePortInt(icp)
    except ValueError as e:
        raise d.error(str(e)) from None
    flags = set()
    values: dict[str, Any] = {}
    for word in d.args[4:]:
        key, sep, value = word.partition("=")
        key = key.lower()
        if not sep:
            if key not in NEIGHBOUR_FLAGS:
                if key in NEIGHBOUR_VALUES:
                    raise d.error(f"option {key} needs a value ({key}=...)")
                raise d.error(f"unknown cache_peer option {word!r}")
            flags.add("tls" if key == "ssl" else key)
        else:
            parser = NEIGHBOUR_VALUES.get(key)
            if parser is None:
                raise d.error(f"unknown cache_peer option {word!r}")
            try:
                values[key] = parser(value)
            except ValueError as e:
                raise d.error(f"cache_peer option {key}: {e}") from None
    return NeighbourConfig(
        host=host,
        type=kind,
        httpPort=httpPort,
        icpPort=icpPort,
        name=values.get("name", host),
        flags=frozenset(flags),
        values=values,
        filename=d.filename,
        lineno=d.lineno,
    )


# ---------------------------------------------------------------------------
# The whole config


@attr.s(slots=True, auto_attribs=True)
class MeshConfig:
    """
    A parsed config file.

    @ivar filename: where it came from (C{"<defaults>"} for the embedded one).
    @ivar httpAddress: address the HTTP proxy listens on (C{""}: all).
    @ivar httpPort: HTTP port (0: let the kernel choose; C{None}: no HTTP).
    @ivar icpAddress: address the ICP port is bound to (C{""}: all).
    @ivar icpPort: ICP port (0: let the kernel choose; C{None}: no ICP).
    @ivar visibleHostname: this node's name in C{Via}, C{X-Cache}, logs.
    @ivar plugins: the L{PluginSection} of each kind.
    @ivar neighbours: the C{cache_peer} lines.
    @ivar settings: other core settings, parsed, by directive name.
    @ivar extra: directives the core does not know, to be claimed by plugins.
    """

    filename: str = "<defaults>"
    httpAddress: str = ""
    httpPort: Optional[int] = DEFAULT_HTTP_PORT
    icpAddress: str = ""
    icpPort: Optional[int] = DEFAULT_ICP_PORT
    visibleHostname: str = attr.ib(factory=socket.gethostname)
    plugins: dict[str, PluginSection] = attr.ib(factory=dict)
    neighbours: list[NeighbourConfig] = attr.ib(factory=list)
    settings: dict[str, Any] = attr.ib(factory=dict)
    extra: list[Directive] = attr.ib(factory=list)

    def setting(self, name: str, default: Any = None) -> Any:
        """
        A core setting by directive name, or C{default}.
        """
        return self.settings.get(name, default)


def _single(d: Directive, parser: Callable[[str], Any]) -> Any:
    if len(d.args) != 1:
        raise d.error(f"{d.name} takes exactly one value")
    try:
        return parser(d.args[0])
    except ValueError as e:
        raise d.error(f"{d.name}: {e}") from None


def _joined(parser: Callable[[str], Any]) -> Callable[[Directive], Any]:
    def parse(d: Directive) -> Any:
        if not d.args:
            raise d.error(f"{d.name} needs a value")
        try:
            return parser(" ".join(d.args))
        except ValueError as e:
            raise d.error(f"{d.name}: {e}") from None

    return parse


def _text(d: Directive) -> str:
    return str(_single(d, str))


def _words(d: Directive) -> tuple[str, ...]:
    if not d.args:
        raise d.error(f"{d.name} needs at least one value")
    return d.args


def _cdnMode(text: str) -> str:
    if text not in CDN_MODES:
        raise ValueError(f"expected one of {', '.join(CDN_MODES)}, not {text!r}")
    return text


#: Core settings: directive name -> parser of the whole directive.  The
#: parsed value lands in L{MeshConfig.settings}.
SETTINGS: dict[str, Callable[[Directive], Any]] = {
    "access_log": _text,
    "cache_log": _text,
    "log_icp_queries": lambda d: _single(d, parseBool),
    "icp_hit_stale": lambda d: _single(d, parseBool),
    "icp_hit_min_fresh": _joined(parseDuration),
    "icp_query_timeout": _joined(parseDuration),
    "maximum_icp_query_timeout": _joined(parseDuration),
    "minimum_icp_query_timeout": _joined(parseDuration),
    "dead_peer_timeout": _joined(parseDuration),
    "icp_denied_cutoff_time": _joined(parseDuration),
    "hit_only_mode": lambda d: _single(d, parseBool),
    "client_request_timeout": _joined(parseDuration),
    "request_header_max_size": _joined(parseSize),
    "request_body_max_size": _joined(parseSize),
    "forwarded_for": lambda d: _single(d, parseBool),
    "via": lambda d: _single(d, parseBool),
    "cdn_cache_control": lambda d: _single(d, _cdnMode),
    "local_domain": _words,
    "local_ip": _words,
    "hierarchy_stoplist": _words,
    "inside_firewall": _words,
    "single_parent_bypass": lambda d: _single(d, parseBool),
    "source_ping": lambda d: _single(d, parseBool),
    "query_icmp": lambda d: _single(d, parseBool),
    "mcast_icp_query_timeout": _joined(parseDuration),
    "mcast_groups": _words,
    "connect_ports": _words,
    "https_port": lambda d: (_words(d), d)[1],
    "tls_verify_origin": lambda d: _single(d, parseBool),
    "neighbour_domain": lambda d: (_words(d), d)[1],
    "neighbour_type_domain": lambda d: (_words(d), d)[1],
}
#: Settings that may appear more than once; their values accumulate in a list.
REPEATABLE = frozenset(
    {"local_domain", "local_ip", "hierarchy_stoplist", "inside_firewall",
     "mcast_groups", "neighbour_domain", "neighbour_type_domain", "https_port",
     "connect_ports"}
)

PLUGIN_KINDS = ("store", "access", "selector")
PLUGIN_DEFAULTS = {"store": "memory", "access": "acl", "selector": "icp"}
_PLUGIN_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")


def readDirectives(text: str, filename: str) -> list[Directive]:
    """
    Split config text into L{Directive}s: comments and blank lines dropped,
    backslash continuations joined, names lower-cased.
    """
    directives = []
    pending: list[str] = []
    start = 0
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if not pending:
            start = lineno
        if line.endswith("\\"):
            pending.append(line[:-1])
            continue
        pending.append(line)
        words = " ".join(pending).split()
        pending = []
        if words:
            directives.append(Directive(words[0].lower(), tuple(words[1:]), filename, start))
    if pending:
        words = " ".join(pending).split()
        if words:
            directives.append(Directive(words[0].lower(), tuple(words[1:]), filename, start))
    return directives


def parseConfig(text: str, filename: str = "<config>") -> MeshConfig:
    """
    Parse config text.

    Plugin-claimed directives are kept in L{MeshConfig.extra}; whether each
    is claimed is checked when plugins are resolved
    (L{icpmesh.plugins.resolvePlugins}).

    @raise ConfigError: naming file and line.
    """
    config = MeshConfig(filename=filename)
    seen: dict[str, Directive] = {}
    peerNames: dict[str, NeighbourConfig] = {}
    for d in readDirectives(text, filename):
        if d.name == "http_port":
            if d.args == ("none",):
                config.httpPort = None
            else:
                config.httpAddress, config.httpPort = _single(d, parseListen)
        elif d.name == "icp_port":
            if d.args == ("none",):
                config.icpPort = None
            else:
                config.icpAddress, config.icpPort = _single(d, parseListen)
        elif d.name == "visible_hostname":
            config.visibleHostname = _text(d)
        elif d.name in PLUGIN_KINDS:
            if not d.args:
                raise d.error(f"usage: {d.name} NAME [key=value ...]")
            name = d.args[0].lower()
            if not _PLUGIN_NAME.match(name):
                raise d.error(f"bad plugin name {d.args[0]!r}")
            config.plugins[d.name] = PluginSection(
                kind=d.name,
                name=name,
                options=parseOptions(d.args[1:]),
                filename=d.filename,
                lineno=d.lineno,
                config=config,
            )
        elif d.name == "cache_peer":
            peer = _parseNeighbour(d)
            other = peerNames.get(peer.name.lower())
            if other is not None:
                raise d.error(
                    f"duplicate neighbour name {peer.name!r} "
                    f"(first defined at line {other.lineno}); use name=..."
                )
            peerNames[peer.name.lower()] = peer
            config.neighbours.append(peer)
        elif d.name in SETTINGS:
            value = SETTINGS[d.name](d)
            if d.name in REPEATABLE:
                config.settings.setdefault(d.name, []).append(value)
            else:
                if d.name in seen:
                    raise d.error(
                        f"{d.name} given twice (first at line {seen[d.name].lineno})"
                    )
                config.settings[d.name] = value
            seen[d.name] = d
        else:
            config.extra.append(d)
    for kind in PLUGIN_KINDS:
        if kind not in config.plugins:
            config.plugins[kind] = PluginSection(
                kind=kind,
                name=PLUGIN_DEFAULTS[kind],
                options={},
                filename=filename,
                lineno=None,
                config=config,
            )
    _applyNeighbourDomains(config)
    return config


def _applyNeighbourDomains(config: MeshConfig) -> None:
    """
    Fold C{neighbour_domain NAME [!]domain ...} (RFC 2187's
    C{cache_host_domain}) and C{neighbour_type_domain NAME TYPE domain ...}
    into the neighbours they name.
    """
    byName = {n.name.lower(): i for i, n in enumerate(config.neighbours)}
    for setting in ("neighbour_domain", "neighbour_type_domain"):
        for d in config.settings.get(setting, []):
            words = d.args
            name = words[0].lower()
            if name not in byName:
                raise d.error(f"{setting}: no cache_peer named {words[0]!r}")
            index = byName[name]
            peer = config.neighbours[index]
            if setting == "neighbour_domain":
                domains = tuple(
                    (w[1:].lower(), False) if w.startswith("!") else (w.lower(), True)
                    for w in words[1:]
                )
                peer = attr.evolve(peer, domains=peer.domains + domains)
            else:
                if len(words) < 3 or words[1].lower() not in ("parent", "sibling"):
                    raise d.error(
                        "usage: neighbour_type_domain NAME parent|sibling DOMAIN ..."
                    )
                peer = attr.evolve(
                    peer,
                    typeDomains=peer.typeDomains
                    + ((words[1].lower(), tuple(w.lower() for w in words[2:])),),
                )
            config.neighbours[index] = peer


def loadConfig(path: Optional[str]) -> MeshConfig:
    """
    Read and parse a config file, or the embedded defaults when C{path} is
    C{None}.

    @raise ConfigError: the file cannot be read or is wrong.
    """
    if path is None:
        return parseConfig(DEFAULT_CONFIG, "<defaults>")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file: {e.strerror}", path) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file is not UTF-8: {e}", path) from None
    return parseConfig(text, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """
    C{icpmesh-check FILE}: parse a config file and build (but do not start)
    every plugin it names, like C{squid -k parse}.  Prints C{OK} or the error
    with file and line; exits 0 or 1.
    """
    from icpmesh.plugins import resolvePlugins

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: icpmesh-check CONFIG-FILE", file=sys.stderr)
        return 2
    try:
        config = loadConfig(args[0])
        from twisted.internet.task import Clock

        resolvePlugins(config, reactor=Clock(), build=True)
    except ConfigError as e:
        print(f"icpmesh-check: {e}", file=sys.stderr)
        return 1
    print(f"{args[0]}: OK")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
