# -*- test-case-name: tests.test_monitor -*-
"""
Background work on neighbours: resolving their names, probing the HTTP port
of those marked down after failed connections, and counting the members of
multicast groups.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Sequence

from twisted.application.service import Service
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from icpmesh.neighbours import Neighbour
from icpmesh.protocol import ICPProtocol

log = Logger()

#: Seconds between HTTP probes of neighbours that are down after failed
#: connections (Squid probes at most once a second while traffic flows).
PROBE_INTERVAL = 5.0
#: First multicast member count after start, then the period (Squid's
#: MCAST_COUNT_RATE is 900 s).
MCAST_FIRST_COUNT = 10.0
MCAST_COUNT_INTERVAL = 900.0


def _isIP(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class MeshMonitor(Service):
    """
    Keeps neighbours' addresses and liveness current.

    @ivar probes: probe connections attempted (for tests and counters).
    """

    name = "neighbour-monitor"

    def __init__(
        self,
        neighbours: Sequence[Neighbour],
        protocol: ICPProtocol,
        reactor: Any = None,
        mcastTimeout: float = 2.0,
        probeInterval: float = PROBE_INTERVAL,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self._reactor = reactor
        self.neighbours = list(neighbours)
        self.protocol = protocol
        self.mcastTimeout = mcastTimeout
        self.probeInterval = probeInterval
        self.probes = 0
        self._calls: list[Any] = []
        self._loops: list[LoopingCall] = []

    def startService(self) -> None:
        Service.startService(self)
        for n in self.neighbours:
            if not _isIP(n.host):
                self._resolve(n)
        probe = LoopingCall(self.probeDown)
        probe.clock = self._reactor
        probe.start(self.probeInterval, now=False)
        self._loops.append(probe)
        if any(n.type == "multicast" for n in self.neighbours):
            self._calls.append(self._reactor.callLater(MCAST_FIRST_COUNT, self._startCounting))

    def stopService(self) -> None:
        Service.stopService(self)
        for loop in self._loops:
            if loop.running:
                loop.stop()
        for call in self._calls:
            if call.active():
                call.cancel()
        self._loops = []
        self._calls = []

    # -- names --------------------------------------------------------------

    def _resolve(self, n: Neighbour) -> None:
        def resolved(ip: str) -> None:
            n.icpAddress = (ip, n.icpPort)
            log.info("Neighbour {name}: {host} is {ip}", name=n.name, host=n.host, ip=ip)

        def failed(f: Any) -> None:
            log.warn("Neighbour {name}: cannot resolve {host}: {error}",
                     name=n.name, host=n.host, error=f.getErrorMessage())

        self._reactor.resolve(n.host).addCallbacks(resolved, failed)

    # -- TCP probes ----------------------------------------------------------

    def probeDown(self) -> None:
        """
        Try a TCP connection to the HTTP port of each neighbour marked down
        by failed connections; success revives it.
        """
        for n in self.neighbours:
            if n.type != "multicast" and n.tcpFailures >= n.connectFailLimit:
                self.probe(n)

    def probe(self, n: Neighbour) -> Any:
        self.probes += 1
        host = n.icpAddress[0]
        cls = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
        endpoint = cls(self._reactor, host, n.httpPort, timeout=n.connectTimeout)

        def connected(proto: Protocol) -> None:
            assert proto.transport is not None
            proto.transport.loseConnection()
            n.noteFetchSucceeded()

        return endpoint.connect(Factory.forProtocol(Protocol)).addCallbacks(
            connected, lambda f: None
        )

    # -- multicast member counts ---------------------------------------------

    def _startCounting(self) -> None:
        loop = LoopingCall(self.countMembers)
        loop.clock = self._reactor
        loop.start(MCAST_COUNT_INTERVAL, now=True)
        self._loops.append(loop)

    def countMembers(self) -> None:
        """
        Send a probe query to each multicast group and fold the number of
        members that answer into its expected-replies average.
        """
        responders = {n.icpAddress: n for n in self.neighbours if n.multicastResponder}
        for group in self.neighbours:
            if group.type != "multicast":
                continue
            url = f"http://{group.host}:{group.icpPort}/"
            self.protocol.setMulticastTTL(group.ttl)
            d = self.protocol.sendQuery(
                url,
                [group.icpAddress],
                responders,
                self.mcastTimeout,
                expected=len(responders) or 1,
            )

            def counted(pending: Any, group: Neighbour = group) -> None:
                group.noteGroupCount(len(pending.replies))
                log.info("Multicast group {name}: {n} replies", name=group.name,
                         n=len(pending.replies))

            d.addCallback(counted)
