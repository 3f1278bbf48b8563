# -*- test-case-name: tests.test_plugins -*-
"""
The plugin seams of an icpmesh node.

Three parts of a node are swappable, each behind a runtime interface and a
plugin (factory) interface found with L{twisted.plugin.getPlugins}:

  - B{object storage}: L{IObjectStore}, built by an L{IObjectStorePlugin};
  - B{access control}: L{IAccessControl}, built by an L{IAccessControlPlugin};
  - B{peer selection}: L{IPeerSelector}, built by an L{IPeerSelectorPlugin}.

A plugin object is cheap, stateless and created when its C{twisted/plugins}
drop-in is imported.  It carries a unique C{name} (the word an operator writes
in the config file, C{[a-z0-9-]+}) and builds the runtime component from its
L{icpmesh.config.PluginSection} when the node's service is built.  The built-in
plugins are found exactly the same way as third-party ones.

Value types that callers of these interfaces need (L{AccessRequest},
L{StoredResponse}, L{Route}) and the exceptions plugins raise live here too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence, Union
from urllib.parse import urlsplit

import attr
from twisted.internet.defer import Deferred
from twisted.plugin import IPlugin
from zope.interface import Attribute, Interface

if TYPE_CHECKING:  # pragma: no cover
    from icpmesh.config import PluginSection


# ---------------------------------------------------------------------------
# Exceptions


class PluginError(Exception):
    """
    A plugin could not be found or built.
    """


class UnknownPlugin(PluginError):
    """
    No installed plugin of the wanted kind has the configured name.

    @ivar kind: what was looked for, for example C{"store"}.
    @ivar name: the name that was asked for.
    @ivar installed: the names that are installed.
    """

    def __init__(self, kind: str, name: str, installed: Sequence[str]) -> None:
        self.kind = kind
        self.name = name
        self.installed = sorted(installed)
        super().__init__(
            f"unknown {kind} plugin {name!r}; installed: "
            + (", ".join(self.installed) or "(none)")
        )


class ObjectTooLarge(Exception):
    """
    Raised by L{IObjectWriter.write} once an object grows past the store's
    maximum object size.  The writer has then already discarded what it had;
    the caller goes on serving its client uncached.
    """


# ---------------------------------------------------------------------------
# Value types


@attr.s(slots=True, frozen=True, auto_attribs=True)
class AccessRequest:
    """
    What access control and peer selection know about one request.

    @ivar client: the client's IP address as text (C{"127.0.0.1"}, C{"::1"}).
    @ivar method: the HTTP method, upper case (C{"ICP_QUERY"} for ICP).
    @ivar url: the absolute request URL as text.
    @ivar scheme: URL scheme, lower case.
    @ivar host: URL host, lower case, without brackets for IPv6.
    @ivar port: URL port, defaulted from the scheme.
    @ivar path: path and query of the URL (C{"/"} when empty).
    @ivar headers: request headers as a lower-cased-name mapping (may be empty).
    @ivar neighbour: for requests that arrive from a configured neighbour, its
        name; otherwise C{None}.
    """

    client: str
    method: str
    url: str
    scheme: str
    host: str
    port: int
    path: str
    headers: Any = attr.ib(factory=dict, eq=False)
    neighbour: Optional[str] = None

    @classmethod
    def fromURL(
        cls,
        client: str,
        method: str,
        url: str,
        headers: Any = None,
        neighbour: Optional[str] = None,
    ) -> "AccessRequest":
        """
        Build an L{AccessRequest} from an absolute URL.

        @raise ValueError: if C{url} is not an absolute URL with a host.
        """
        parts = urlsplit(url)
        host = parts.hostname
        if not parts.scheme or not host:
            raise ValueError(f"not an absolute URL: {url!r}")
        scheme = parts.scheme.lower()
        port = parts.port  # may raise ValueError for a bad port
        if port is None:
            port = DEFAULT_PORTS.get(scheme, 0)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return cls(
            client=client,
            method=method,
            url=url,
            scheme=scheme,
            host=host.lower(),
            port=port,
            path=path,
            headers=headers if headers is not None else {},
            neighbour=neighbour,
        )


DEFAULT_PORTS = {"http": 80, "https": 443, "ftp": 21, "gopher": 70, "wais": 210}


@attr.s(slots=True, frozen=True, auto_attribs=True)
class StoredResponse:
    """
    The stored part of a cached HTTP response, apart from its body.

    @ivar status: the status code.
    @ivar reason: the reason phrase.
    @ivar headers: response headers as a sequence of C{(name, value)} byte
        pairs, in the order they arrived, hop-by-hop headers already removed.
    @ivar requestTime: reactor time when the request that fetched it was sent.
    @ivar responseTime: reactor time when its response headers arrived.
    @ivar freshUntil: reactor time until which the response is fresh as
        computed by the proxy when it stored it (RFC 9111 section 4.2); this is
        what the ICP responder reads.
    @ivar size: body length in bytes, when known.
    """

    status: int
    reason: bytes
    headers: Sequence[tuple[bytes, bytes]]
    requestTime: float
    responseTime: float
    freshUntil: float
    size: Optional[int] = None

    def header(self, name: bytes) -> Optional[bytes]:
        """
        Return the last value of header C{name} (case-insensitive), or C{None}.
        """
        name = name.lower()
        found = None
        for key, value in self.headers:
            if key.lower() == name:
                found = value
        return found


@attr.s(slots=True, frozen=True, auto_attribs=True)
class Route:
    """
    One place to fetch a request from, as chosen by an L{IPeerSelector}.

    @ivar neighbour: the neighbour to use, or C{None} to go direct to the
        origin server.
    @ivar code: the Squid hierarchy code that explains the choice and goes in
        the access log (C{"HIER_DIRECT"}, C{"SIBLING_HIT"}, C{"PARENT_HIT"},
        C{"FIRST_PARENT_MISS"}, C{"CLOSEST_PARENT_MISS"}, C{"DEFAULT_PARENT"},
        C{"FIRSTUP_PARENT"}, C{"CARP"}, C{"ROUNDROBIN_PARENT"}, ...).
    @ivar timedOut: C{True} when the ICP wait ended by timeout; the access log
        then prints C{TIMEOUT_} in front of the code, as Squid does.
    @ivar onlyIfCached: send C{Cache-Control: only-if-cached} (a sibling HIT).
    """

    neighbour: Any
    code: str
    timedOut: bool = False
    onlyIfCached: bool = False


DIRECT = Route(neighbour=None, code="HIER_DIRECT")


# ---------------------------------------------------------------------------
# Storage


class IObjectWriter(Interface):
    """
    Writes one object into an L{IObjectStore}.  Nothing written is visible
    to readers, or to the ICP responder, until L{finish} has succeeded.
    """

    def write(data: bytes) -> None:
        """
        Append body bytes.

        @raise ObjectTooLarge: the object has grown past the store's maximum
            object size; the writer has discarded it.
        """

    def finish() -> "Deferred[None]":
        """
        Commit the object.  The Deferred fires once it is visible to readers;
        it fails if the object could not be stored (the store is then left as
        it was before L{IObjectStore.begin}).
        """

    def abort() -> None:
        """
        Throw away what was written.  Safe to call more than once and after a
        failure.
        """


class ICachedObject(Interface):
    """
    A complete object read from an L{IObjectStore}.
    """

    meta = Attribute("The L{StoredResponse} stored with the object.")
    size = Attribute("The body length in bytes.")

    def writeTo(consumer: Any) -> "Deferred[None]":
        """
        Write the whole body to C{consumer} (an L{IConsumer} such as a
        C{twisted.web} request), honouring its flow control.  Fires when the
        body has been written; fails if it could not be read whole, in which
        case the caller must not finish the response as if it were complete.
        """


class IRangedCachedObject(ICachedObject):
    """
    An L{ICachedObject} that can write part of its body without reading the
    rest, for byte-range requests (C{Range: bytes=...}).  Optional: the
    proxy serves ranges from any L{ICachedObject}, but for one that does
    not provide this it reads the whole body through L{writeTo} and drops
    the bytes outside the range.
    """

    def writeRangeTo(consumer: Any, offset: int, length: int) -> "Deferred[None]":
        """
        Write bytes C{[offset, offset + length)} of the body to C{consumer},
        honouring its flow control like L{ICachedObject.writeTo}.  The
        proxy only asks for ranges inside the body (C{length >= 1},
        C{offset + length <= size}).  Fires when those bytes have been
        written; fails if they could not be read, in which case the caller
        must not finish the response as if it were complete.
        """


class IObjectStore(Interface):
    """
    A cache of HTTP responses keyed by text keys.

    Keys are chosen by the proxy: the absolute URL for the primary GET
    response, with other key spaces (Vary variants) built from it.  The store
    treats keys as opaque.

    A store that also provides C{IService} is started and stopped with the
    node (for example to load its index).
    """

    maxObjectSize = Attribute("Largest body in bytes this store accepts.")
    loading = Attribute(
        "C{True} while the store is still building its index: objects it "
        "has not indexed yet are unknown, so the ICP responder answers "
        "MISS_NOFETCH rather than MISS (RFC 2187 section 5.2.4)."
    )

    def freshUntil(key: str) -> Optional[float]:
        """
        Synchronous, in-memory freshness lookup for the ICP reply path.

        @return: the reactor time until which the complete object stored under
            C{key} stays fresh, or C{None} if no complete object is stored.
            Must do no I/O and be cheap: it runs for every ICP query.
        """

    def get(key: str) -> "Deferred[Optional[ICachedObject]]":
        """
        Look up a complete object.  Fires with C{None} when there is none.
        """

    def begin(key: str, meta: StoredResponse) -> IObjectWriter:
        """
        Start writing an object.  When the writer finishes, the new object
        replaces any older one under C{key}.

        @raise ObjectTooLarge: C{meta.size} is known and larger than
            L{maxObjectSize}.
        """

    def updateMeta(key: str, meta: StoredResponse) -> "Deferred[bool]":
        """
        Replace the stored metadata of an existing object (after a 304
        revalidation), keeping its body.  Fires with C{False} when no object
        is stored under C{key}.
        """

    def delete(key: str) -> "Deferred[bool]":
        """
        Remove an object.  Fires with C{True} when something was removed.
        """

    def stats() -> dict[str, Union[int, float]]:
        """
        Counters for operators: at least C{objects} and C{bytes}.
        """


class IObjectStorePlugin(IPlugin):
    """
    Builds an L{IObjectStore} from config; chosen with C{store NAME} in the
    config file.
    """

    name = Attribute("Unique name used in the config file, C{[a-z0-9-]+}.")
    description = Attribute("One line for C{twistd icpmesh --help-plugins}.")
    directives = Attribute(
        "Config directive names (besides the options on its C{store} line) "
        "that this plugin reads from L{PluginSection.directives}; may be empty."
    )

    def storeFromConfig(section: "PluginSection", reactor: Any) -> IObjectStore:
        """
        Build the store.

        @raise icpmesh.config.ConfigError: for bad options, naming file and
            line (use C{section.error(...)}).
        """


# ---------------------------------------------------------------------------
# Access control


class IAccessControl(Interface):
    """
    Decides who may use the node and how.  Every method is synchronous and
    must be cheap: L{allowICP} runs for every ICP query.
    """

    def allowHTTP(request: AccessRequest) -> bool:
        """
        May this client use the HTTP proxy for this request at all
        (Squid's C{http_access})?  A refusal is answered with 403.
        """

    def allowMiss(request: AccessRequest) -> bool:
        """
        May this client cause a fetch for something not in the cache
        (Squid's C{miss_access})?  A refusal of a miss is answered with 403;
        hits are still served.
        """

    def allowICP(client: str, url: str) -> bool:
        """
        May this client's ICP query be answered (Squid's C{icp_access})?
        A refusal is answered with ICP_OP_DENIED.

        An access control whose answer here depends on the client address
        alone, and never changes for an address, may say so with an
        attribute C{icpByClient = True} (optional; the built-in C{acl}
        plugin sets it when every C{icp_access} ACL is a C{src} ACL).  The
        ICP responder then calls this once per allowed client instead of
        once per query.
        """

    def allowNeighbour(neighbour: str, request: AccessRequest) -> bool:
        """
        May the neighbour named C{neighbour} be used (queried, fetched from)
        for this request (Squid's C{cache_peer_access})?
        """

    def directPolicy(request: AccessRequest) -> Optional[str]:
        """
        C{"always"} (Squid's C{always_direct}), C{"never"}
        (C{never_direct}), or C{None} when neither applies.
        """

    def allowStore(request: AccessRequest) -> bool:
        """
        May a response to this request be stored (Squid's C{cache})?
        """


class IAccessControlPlugin(IPlugin):
    """
    Builds an L{IAccessControl} from config; chosen with C{access NAME}.
    """

    name = Attribute("Unique name used in the config file, C{[a-z0-9-]+}.")
    description = Attribute("One line for C{twistd icpmesh --help-plugins}.")
    directives = Attribute(
        "Config directive names this plugin reads, for example C{acl} and "
        "C{http_access}."
    )

    def accessControlFromConfig(
        section: "PluginSection", reactor: Any
    ) -> IAccessControl:
        """
        Build the access control.

        @raise icpmesh.config.ConfigError: for bad rules, naming file and line.
        """


# ---------------------------------------------------------------------------
# Peer selection


class IICPClient(Interface):
    """
    The node's ICP client, handed to peer selectors so they can ask
    neighbours without opening sockets of their own.
    """

    def query(
        url: str,
        neighbours: Sequence[Any],
        timeout: Optional[float] = None,
        stopOnHit: bool = True,
    ) -> "Deferred[Any]":
        """
        Send one ICP query round for C{url} to C{neighbours} and wait for
        their replies (or the timeout).  Fires with an
        L{icpmesh.querier.QueryRound}.
        """


class IPeerSelector(Interface):
    """
    Decides where a request is fetched from.

    A selector returns an ordered list of L{Route}s: each names a neighbour
    (or C{None} for the origin) and the Squid hierarchy code that explains
    the choice; the proxy tries them in order until one answers.  It may
    ask neighbours over ICP through the client it is handed, and never
    opens sockets of its own.  For example, "the first parent that says
    HIT, else the first parent":

        @implementer(IPeerSelector)
        class FirstParentHit:
            def selectRoutes(self, request, neighbours, icp):
                parents = [n for n in neighbours
                           if n.typeFor(request.host) == "parent"]
                if not parents:
                    return [DIRECT]

                def ranked(round):
                    hit = round.hit
                    routes = [Route(hit.neighbour, "PARENT_HIT")] if hit else []
                    return routes + [Route(p, "FIRSTUP_PARENT")
                                     for p in parents if not hit or p is not hit.neighbour]

                return icp.query(request.url, parents).addCallback(ranked)

    See C{docs/tutorial-selector-plugin.md} for a complete plugin,
    packaged and tested.
    """

    def selectRoutes(
        request: AccessRequest, neighbours: Sequence[Any], icp: IICPClient
    ) -> "Union[Sequence[Route], Deferred[Sequence[Route]]]":
        """
        Return, possibly through a Deferred, the ordered list of places to
        try for C{request}.  C{neighbours} are the configured neighbours that
        access control allows for this request, with their live state; C{icp}
        sends ICP queries.  An empty list means the request cannot be
        forwarded (the client gets 503).  L{DIRECT} means the origin.
        """


class IPeerSelectorPlugin(IPlugin):
    """
    Builds an L{IPeerSelector} from config; chosen with C{selector NAME}.
    """

    name = Attribute("Unique name used in the config file, C{[a-z0-9-]+}.")
    description = Attribute("One line for C{twistd icpmesh --help-plugins}.")
    directives = Attribute("Config directive names this plugin reads.")

    def selectorFromConfig(section: "PluginSection", reactor: Any) -> IPeerSelector:
        """
        Build the selector.

        @raise icpmesh.config.ConfigError: for bad options, naming file and line.
        """
