# -*- test-case-name: tests.test_service -*-
"""
Wiring a node together.

L{makeMeshService} turns a config into an C{IService}: the ICP socket
(L{icpmesh.protocol.ICPProtocol} with its L{icpmesh.server.ICPResponder}),
the HTTP proxy (L{icpmesh.proxy.CachingProxyResource} in a C{Site}), the
neighbours and their L{icpmesh.querier.ICPClient}, and the store, access
control and peer selector plugins.  C{twistd icpmesh} calls it through
L{icpmesh.tap}; code that embeds a node in its own Twisted application calls it
directly::

    from twisted.application import service
    from icpmesh.config import loadConfig
    from icpmesh.service import makeMeshService

    application = service.Application("mesh")
    makeMeshService(loadConfig("/etc/icpmesh/icpmesh.conf")).setServiceParent(application)
"""

from __future__ import annotations

import gc
import ipaddress
from collections import Counter
from typing import Any, Optional, Union

from twisted.application import internet, service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString
from twisted.web.server import Request, Site

from icpmesh import __version__
from icpmesh.body import StreamingRequest, streamingChannelFactory
from icpmesh.config import ConfigError, MeshConfig, loadConfig
from icpmesh.monitor import MeshMonitor
from icpmesh.neighbours import Neighbour
from icpmesh.plugins import Components, resolvePlugins
from icpmesh.protocol import ICPProtocol
from icpmesh.querier import ICPClient, Mesh
from icpmesh.server import FailureRatio, ICPResponder

log = Logger()

#: twisted.web's own limit on a request's header section and on one line.
_TWISTED_HEADER_LIMIT = 16384

#: The youngest-generation threshold of CPython's cyclic garbage collector
#: in a C{twistd icpmesh} node (CPython's default is 700).
GC_THRESHOLD0 = 20000


def tuneGarbageCollector(threshold0: int = GC_THRESHOLD0) -> None:
    """
    Make CPython's cyclic garbage collector cheaper for a long-running node.

    Everything alive now (modules, plugins, config, the listening ports) moves
    to the permanent generation (C{gc.freeze}), so full collections never scan
    it again, and the youngest generation is collected every C{threshold0}
    net allocations instead of every 700.  Each proxied request allocates a
    few hundred container objects, so the default collected after almost
    every request: on the miss benchmark that was about 11% of the node's
    CPU time, and under 2% after this (docs/performance.md).  Reference
    cycles (Deferreds, Failures) are still collected, only in larger batches.

    Elsewhere than on CPython (PyPy) it does nothing.

    C{twistd icpmesh} calls this once the reactor runs.  It changes
    process-wide state, so L{makeMeshService} does not: an application that
    embeds a node decides for itself.
    """
    if not hasattr(gc, "freeze"):
        # Not CPython (PyPy's collector has no generations to tune).
        return
    gc.freeze()
    _, threshold1, threshold2 = gc.get_threshold()
    gc.set_threshold(threshold0, threshold1, threshold2)


#: Where a node using the C{carp} selector publishes its array membership
#: table (draft-vinod-carp-v1-03 section 2), as an origin-form request to the
#: proxy port: C{curl http://node:3128/carp}.
CARP_TABLE_PATH = b"/carp"


class ProxyRequest(StreamingRequest):
    """
    The requests of a L{ProxySite}.

    A request for an absolute C{http://} or C{https://} URL goes straight
    to the site's resource, the proxy, which is a leaf: no C{prepath} and
    C{postpath} to compute, no traversal, and no C{Server} header, which
    the proxy drops from every response anyway.  Its C{Date} is the site's
    (formatted once per second).  Any other request (the node's own pages,
    C{CONNECT}, C{OPTIONS *}) is processed by C{twisted.web} as usual.

    @ivar headerBytes: an upper bound of the request's header section size
        from the channel's own counts (request line included), for the
        proxy's 431 check; C{None} if the channel does not say.
    """

    headerBytes: Optional[int] = None

    def gotLength(self, length: Optional[int]) -> None:
        # The channel resets its counts once the body is in; read them now.
        # It counts the lines without their CRLF and maybe without the
        # space after the colon, so add 4 per line for an upper bound of
        # the size the proxy's limit is measured in.  (Private attributes
        # of HTTPChannel: without them the proxy sums the headers itself.)
        size = getattr(self.channel, "_receivedHeaderSize", None)
        count = getattr(self.channel, "_receivedHeaderCount", None)
        if isinstance(size, int) and isinstance(count, int):
            self.headerBytes = size + 4 * (count + 1)
        super().gotLength(length)

    def process(self) -> None:
        """
        Render an absolute-URL request with the proxy directly; anything
        else as L{Request.process} does.
        """
        site = self.channel.site
        if not site.leanProcessing or self.uri[:4].lower() != b"http":
            Request.process(self)
            return
        self.site = site
        self.responseHeaders.setRawHeaders(b"Date", [site.httpDate()])
        self.prepath = []
        self.postpath = []
        try:
            self.render(site.resource)
        except BaseException:
            self.processingFailed(Failure())


class ProxySite(Site):
    """
    The proxy's C{Site}.  Requests are logged by the proxy in Squid's
    format, so C{twisted.web}'s own per-request log line (written to the
    twistd log, on the hit path) is switched off.  Its requests are
    L{ProxyRequest}s, which stream request bodies upstream as they arrive
    (L{StreamingRequest}, on a L{icpmesh.body.StreamingChannel}).

    @ivar leanProcessing: L{ProxyRequest} takes its shortcut (C{False}:
        every request is processed as a plain C{Site} would).
    @ivar counters: rare event counts by name (C{malformedBodyAborted}:
        connections aborted for a malformed request body found after the
        response was started).
    """

    requestFactory = ProxyRequest
    protocol = streamingChannelFactory  # type: ignore[assignment]
    leanProcessing = True
    _dateSecond = -1
    _dateValue = b""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        Site.__init__(self, *args, **kwargs)
        self.counters: Counter[str] = Counter()

    def httpDate(self) -> bytes:
        """
        The current time as an HTTP date, from the site's reactor,
        formatted at most once per second.
        """
        second = int(self.reactor.seconds())
        if second != self._dateSecond:
            self._dateValue = datetimeToString(second)
            self._dateSecond = second
        return self._dateValue

    #: Largest request header section the HTTP channel reads; the proxy
    #: answers 431 above its own, smaller or equal, limit.
    maxHeaderBytes = 16384

    def log(self, request: Any) -> None:
        pass

    def buildProtocol(self, addr: Any) -> Any:
        channel = Site.buildProtocol(self, addr)
        if channel is not None:
            # Room for the proxy's own limit plus the request line, set on
            # the HTTPChannel itself (Site.buildProtocol returns a wrapper
            # that does not pass attributes on).
            inner = getattr(channel, "_channel", channel)
            inner.totalHeadersSize = max(self.maxHeaderBytes + 8192, _TWISTED_HEADER_LIMIT)
            # One header line may be as long (twisted.web's LineReceiver
            # drops the connection without an answer past MAX_LENGTH).
            inner.MAX_LENGTH = inner.totalHeadersSize
        return channel


def _isIPv6(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).version == 6
    except ValueError:
        return False


class MeshService(service.MultiService):
    """
    A running (or runnable) node.

    @ivar config: the L{MeshConfig}.
    @ivar components: the plugin components (store, access, selector).
    @ivar protocol: the L{ICPProtocol} (C{None} when ICP is off).
    @ivar responder: the L{ICPResponder}.
    @ivar mesh: the L{Mesh} of neighbours and the ICP client.
    @ivar proxy: the proxy resource.
    @ivar site: the HTTP C{Site}.
    @ivar accessLog: the access log, or C{None}.
    """

    config: MeshConfig
    components: Components
    protocol: Optional[ICPProtocol]
    responder: ICPResponder
    mesh: Mesh
    proxy: Any
    site: Optional[Site]
    accessLog: Any
    _udpService: Optional[internet.UDPServer] = None
    _httpService: Optional[internet.StreamServerEndpointService] = None

    def icpPort(self) -> Optional[int]:
        """
        The bound ICP port number, once started.
        """
        port = getattr(self._udpService, "_port", None)
        return None if port is None else port.getHost().port

    def httpPort(self) -> Deferred[Optional[int]]:
        """
        Fires with the bound HTTP port number, once listening.
        """
        svc = self._httpService
        if svc is None or svc._waitingForPort is None:
            return succeed(None)
        return _portNumber(svc)

    def stopService(self) -> Deferred[Any]:
        d = service.MultiService.stopService(self)
        return d if isinstance(d, Deferred) else succeed(None)


class ICPServer(internet.UDPServer):
    """
    The service of the node's ICP port: C{internet.UDPServer} (or, with
    C{multicast}, C{internet.MulticastServer}), listening through
    L{icpmesh.udpport.listenICP}, which uses the leaner
    L{icpmesh.udpport.ICPPort} on a POSIX reactor.
    """

    def __init__(
        self, port: int, protocol: Any, interface: str = "", reactor: Any = None,
        multicast: bool = False,
    ) -> None:
        internet.UDPServer.__init__(self, port, protocol, interface=interface, reactor=reactor)
        self.multicast = multicast

    def _getPort(self) -> Any:
        from icpmesh.udpport import listenICP

        reactor = self.reactor
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        return listenICP(reactor, *self.args, multicast=self.multicast, **self.kwargs)


def _portNumber(svc: internet.StreamServerEndpointService) -> Deferred[Optional[int]]:
    result: Deferred[Optional[int]] = Deferred()

    def got(port: Any) -> Any:
        result.callback(port.getHost().port)
        return port

    def failed(f: Any) -> Any:
        result.errback(f)
        return f

    assert svc._waitingForPort is not None
    svc._waitingForPort.addCallbacks(got, failed)
    return result


def makeMeshService(
    config: Union[MeshConfig, str, None] = None, reactor: Any = None
) -> MeshService:
    """
    Build a node from C{config} (a L{MeshConfig}, a config file path, or
    C{None} for the embedded defaults).

    Nothing listens until the service is started.  Every part uses
    C{reactor} (the global reactor by default), so tests can pass a
    C{MemoryReactorClock} or a fake UDP reactor.

    @raise icpmesh.config.ConfigError: the config (or a plugin's part of it)
        is wrong; the message names file and line.
    """
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    if not isinstance(config, MeshConfig):
        config = loadConfig(config)
    from icpmesh.proxy import CachingProxyResource

    components = resolvePlugins(config, reactor=reactor, build=True)
    top = MeshService()
    top.setName("icpmesh")
    top.config = config
    top.components = components
    store = components.store
    if service.IService.providedBy(store):
        store.setServiceParent(top)

    accessLog = None
    path = config.setting("access_log", "none")
    if path != "none":
        from icpmesh.accesslog import AccessLog

        accessLog = AccessLog(path, reactor=reactor)
        if service.IService.providedBy(accessLog):
            accessLog.setServiceParent(top)
    top.accessLog = accessLog

    logQuery = None
    if accessLog is not None and config.setting("log_icp_queries", True):
        logQuery = accessLog.logICP

    failureRatio = FailureRatio(reactor)
    top.responder = ICPResponder(
        components.store,
        components.access,
        reactor=reactor,
        minFresh=config.setting("icp_hit_min_fresh", 30.0),
        hitStale=config.setting("icp_hit_stale", False),
        hitOnly=config.setting("hit_only_mode", False),
        cutoffTime=config.setting("icp_denied_cutoff_time", 3600.0),
        failureRatio=failureRatio,
        logQuery=logQuery,
    )
    groups = [g for line in config.setting("mcast_groups", []) for g in line]
    multicast = bool(groups) or any(n.type == "multicast" for n in config.neighbours)
    protocol = ICPProtocol(top.responder, reactor=reactor, groups=groups)
    top.protocol = protocol if config.icpPort is not None else None
    icpClient = ICPClient(
        protocol,
        reactor=reactor,
        timeout=config.setting("icp_query_timeout", 2.0),
        minTimeout=config.setting("minimum_icp_query_timeout", 0.05),
        maxTimeout=config.setting("maximum_icp_query_timeout", 2.0),
        deadTimeout=config.setting("dead_peer_timeout", 10.0),
        srcRtt=config.setting("query_icmp", False),
        sourcePing=config.setting("source_ping", False),
    )
    neighbours = [Neighbour(n, reactor=reactor) for n in config.neighbours]
    top.mesh = Mesh(neighbours, icpClient, failureRatio=failureRatio)
    if neighbours:
        monitor = MeshMonitor(
            neighbours,
            protocol,
            reactor=reactor,
            mcastTimeout=config.setting("mcast_icp_query_timeout", 2.0),
        )
        monitor.setServiceParent(top)

    if config.icpPort is not None:
        # A multicast-capable port when we join groups or query one.
        udp = ICPServer(
            config.icpPort,
            protocol,
            interface=config.icpAddress,
            reactor=reactor,
            multicast=multicast,
        )
        udp.setName("icp")
        udp.setServiceParent(top)
        top._udpService = udp

    top.proxy = CachingProxyResource(
        components.store,
        components.access,
        components.selector,
        top.mesh,
        visibleHostname=config.visibleHostname,
        reactor=reactor,
        accessLog=accessLog,
        connectPorts=_connectPorts(config),
        maxRequestHeaderSize=int(config.setting("request_header_max_size", 64 * 1024)),
        maxRequestBodySize=config.setting("request_body_max_size"),
        cdnCacheControl=config.setting("cdn_cache_control", "restrictive"),
    )
    selector = components.selector
    if service.IService.providedBy(selector):
        selector.setServiceParent(top)
    tableResource = getattr(selector, "tableResource", None)
    if tableResource is None and config.plugins["selector"].name == "carp":
        from icpmesh.selectors import CARPTableResource

        tableResource = CARPTableResource(selector, top.mesh.neighbours)
    if tableResource is not None:
        top.proxy.localResources[CARP_TABLE_PATH] = tableResource
    top.site = None
    httpsPorts = [_parseHTTPSPort(d) for d in config.setting("https_port", [])]
    if config.httpPort is not None or httpsPorts:
        site = ProxySite(top.proxy, reactor=reactor)
        site.maxHeaderBytes = top.proxy.maxRequestHeaderSize
        site.displayTracebacks = False
        top.site = site
    for number, (address, port, tlsOptions) in enumerate(httpsPorts):
        from twisted.internet.endpoints import SSL4ServerEndpoint

        tlsEndpoint = SSL4ServerEndpoint(reactor, port, tlsOptions, interface=address)
        https = internet.StreamServerEndpointService(tlsEndpoint, site)
        https._raiseSynchronously = True
        https.setName(f"https-{number}")
        https.setServiceParent(top)
    if config.httpPort is not None:
        address = config.httpAddress
        if _isIPv6(address):
            endpoint: Any = TCP6ServerEndpoint(reactor, config.httpPort, interface=address)
        else:
            endpoint = TCP4ServerEndpoint(reactor, config.httpPort, interface=address)
        http = internet.StreamServerEndpointService(endpoint, site)
        http._raiseSynchronously = True
        http.setName("http")
        http.setServiceParent(top)
        top._httpService = http
    log.info(
        "icpmesh {version}: HTTP {http}, ICP {icp}, store={store}, "
        "access={access}, selector={selector}, {n} neighbour(s)",
        version=__version__,
        http=_where(config.httpAddress, config.httpPort),
        icp=_where(config.icpAddress, config.icpPort),
        store=config.plugins["store"].name,
        access=config.plugins["access"].name,
        selector=config.plugins["selector"].name,
        n=len(neighbours),
    )
    return top


def _parseHTTPSPort(d: Any) -> tuple[str, int, Any]:
    """
    C{https_port [ADDR:]PORT cert=FILE key=FILE}: a TLS listening port for
    clients that talk to the proxy over TLS (C{curl -x https://...}).

    @raise ConfigError: bad port, missing or unreadable certificate or key.
    """
    from twisted.internet.ssl import PrivateCertificate

    from icpmesh.config import parseListen, parseOptions

    words = d.args
    try:
        address, port = parseListen(words[0])
    except ValueError as e:
        raise d.error(f"https_port: {e}") from None
    options = parseOptions(words[1:])
    unknown = set(options) - {"cert", "key"}
    if unknown:
        raise d.error(f"https_port: unknown option {sorted(unknown)[0]!r}; known: cert, key")
    if "cert" not in options:
        raise d.error("https_port needs cert=FILE (and key=FILE unless the cert file holds it)")
    try:
        with open(options["cert"], "rb") as f:
            pem = f.read()
        if "key" in options:
            with open(options["key"], "rb") as f:
                pem += b"\n" + f.read()
        tls = PrivateCertificate.loadPEM(pem).options()
    except OSError as e:
        raise d.error(f"https_port: cannot read {e.filename}: {e.strerror}") from None
    except Exception as e:
        raise d.error(f"https_port: bad certificate or key: {e}") from None
    return address, port, tls


def _connectPorts(config: MeshConfig) -> frozenset[int]:
    """
    Ports CONNECT may reach: C{connect_ports} (numbers and ranges), or 443.
    """
    lines = config.setting("connect_ports")
    if not lines:
        return frozenset({443})
    ports: set[int] = set()
    for word in (w for line in lines for w in line):
        low, _, high = word.partition("-")
        try:
            ports.update(range(int(low), int(high or low) + 1))
        except ValueError:
            raise ConfigError(f"connect_ports: not a port or range: {word!r}", config.filename)
    return frozenset(ports)


def _where(address: str, port: Optional[int]) -> str:
    if port is None:
        return "off"
    return f"{address or '*'}:{port}"

