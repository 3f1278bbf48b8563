# -*- test-case-name: tests.test_testing_udp -*-
"""
A fake UDP network driven by a clock, for deterministic ICP tests.

C{twisted.internet.testing.MemoryReactor} has no C{listenUDP}.
L{FakeUDPReactor} adds one: every port bound on it joins one in-memory
network, a datagram written to an address is delivered to the protocol bound
there after the link's latency (on the reactor's clock), and tests can make
links slow, silent or lossy.  Multicast groups are supported with
C{joinGroup}.

Typical use::

    reactor = FakeUDPReactor()
    node = makeMeshService(config, reactor=reactor)   # binds 127.0.0.1:3130
    peer = FakeICPNeighbour(reactor, ("127.0.0.2", 3130), answer=Opcode.HIT)
    ...
    reactor.advance(0.01)           # deliver what is in flight
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IListeningPort, IReactorUDP
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from icpmesh import icp

Address = tuple[str, int]


@implementer(IListeningPort)
class FakeUDPPort:
    """
    One bound UDP port on a L{FakeUDPReactor}.

    @ivar written: every C{(data, address)} this port sent.
    @ivar groups: multicast groups joined.
    @ivar ttl: the multicast TTL last set.
    """

    def __init__(
        self, reactor: "FakeUDPReactor", protocol: DatagramProtocol, address: Address
    ) -> None:
        self.reactor = reactor
        self.protocol = protocol
        self.address = address
        self.written: list[tuple[bytes, Address]] = []
        self.groups: set[str] = set()
        self.ttl = 1
        self.connected = True

    # DatagramProtocol's transport
    def write(self, data: bytes, addr: Optional[Address] = None) -> None:
        if addr is None:
            raise ValueError("FakeUDPPort needs an address for each write")
        if not self.connected:
            raise OSError("port is closed")
        addr = (addr[0], addr[1])
        self.written.append((data, addr))
        self.reactor._route(self, data, addr)

    def getHost(self) -> Any:
        host, port = self.address
        if ":" in host:
            return IPv6Address("UDP", host, port)
        return IPv4Address("UDP", host, port)

    def stopListening(self) -> None:
        if self.connected:
            self.connected = False
            self.reactor._unbind(self)
            self.protocol.doStop()

    loseConnection = stopListening

    def startListening(self) -> None:
        pass

    # multicast
    def joinGroup(self, addr: str, interface: str = "") -> Any:
        from twisted.internet.defer import succeed

        self.groups.add(addr)
        return succeed(None)

    def leaveGroup(self, addr: str, interface: str = "") -> Any:
        from twisted.internet.defer import succeed

        self.groups.discard(addr)
        return succeed(None)

    def setTTL(self, ttl: int) -> None:
        self.ttl = ttl

    def getTTL(self) -> int:
        return self.ttl

    def setLoopbackMode(self, mode: int) -> None:
        pass

    def setBroadcastAllowed(self, enabled: bool) -> None:
        pass


@implementer(IReactorUDP)
class FakeUDPReactor(MemoryReactorClock):
    """
    A C{MemoryReactorClock} with an in-memory UDP network.

    @ivar latency: default one-way delay in seconds.
    @ivar ports: bound ports by address.
    @ivar lost: datagrams that found nobody listening, or were dropped.
    """

    def __init__(self, latency: float = 0.001) -> None:
        super().__init__()
        self.latency = latency
        self.ports: dict[Address, FakeUDPPort] = {}
        self._links: dict[tuple[str, str], float] = {}
        self._silent: set[Address] = set()
        self._filters: list[Callable[[Address, bytes, Address], bool]] = []
        self.lost: list[tuple[Address, bytes, Address]] = []
        self._nextPort = 40000

    def listenUDP(  # type: ignore[override]
        self,
        port: int,
        protocol: DatagramProtocol,
        interface: str = "",
        maxPacketSize: int = 8192,
    ) -> FakeUDPPort:
        host = interface or "127.0.0.1"
        if host == "0.0.0.0":
            host = "127.0.0.1"
        if port == 0:
            while (host, self._nextPort) in self.ports:
                self._nextPort += 1
            port = self._nextPort
            self._nextPort += 1
        address = (host, port)
        if address in self.ports:
            from twisted.internet.error import CannotListenError

            raise CannotListenError(host, port, OSError("address in use"))
        transport = FakeUDPPort(self, protocol, address)
        self.ports[address] = transport
        protocol.makeConnection(transport)
        return transport

    def listenMulticast(  # type: ignore[override]
        self,
        port: int,
        protocol: DatagramProtocol,
        interface: str = "",
        maxPacketSize: int = 8192,
        listenMultiple: bool = False,
    ) -> FakeUDPPort:
        return self.listenUDP(port, protocol, interface, maxPacketSize)

    def _unbind(self, port: FakeUDPPort) -> None:
        if self.ports.get(port.address) is port:
            del self.ports[port.address]

    def pump(self, seconds: float, step: Optional[float] = None) -> None:
        """
        Advance the clock by C{seconds} in small steps (default: the
        latency), so that exchanges of several hops complete: a call
        scheduled while C{advance} runs is due relative to the new time.
        """
        step = step or self.latency or 0.001
        end = self.seconds() + seconds
        while self.seconds() + step < end:
            self.advance(step)
        self.advance(max(0.0, end - self.seconds()))

    # -- controlling the network ------------------------------------------

    def setLatency(self, src: str, dst: str, seconds: float) -> None:
        """
        One-way delay from host C{src} to host C{dst} (both directions are
        set separately).
        """
        self._links[(src, dst)] = seconds

    def silence(self, address: Address, silent: bool = True) -> None:
        """
        Drop every datagram sent to C{address} (a dead host) or, with
        C{silent=False}, stop doing so.
        """
        if silent:
            self._silent.add(address)
        else:
            self._silent.discard(address)

    def addFilter(self, drop: Callable[[Address, bytes, Address], bool]) -> None:
        """
        C{drop(src, data, dst)} returning true drops the datagram.
        """
        self._filters.append(drop)

    def _route(self, port: FakeUDPPort, data: bytes, dst: Address) -> None:
        src = port.address
        if dst in self._silent or any(f(src, data, dst) for f in self._filters):
            self.lost.append((src, data, dst))
            return
        receivers = [
            p
            for p in self.ports.values()
            if dst[0] in p.groups and p.address[1] == dst[1]
        ]
        target = self.ports.get(dst)
        if target is not None:
            receivers.append(target)
        if not receivers:
            self.lost.append((src, data, dst))
            return
        for receiver in receivers:
            delay = self._links.get((src[0], receiver.address[0]), self.latency)
            self.callLater(delay, self._deliver, receiver, data, src)

    @staticmethod
    def _deliver(receiver: FakeUDPPort, data: bytes, src: Address) -> None:
        if receiver.connected:
            receiver.protocol.datagramReceived(data, src)


class FakeICPNeighbour(DatagramProtocol):
    """
    A scriptable ICP neighbour on a L{FakeUDPReactor}.

    @ivar answer: the reply opcode, or a callable C{(url) -> opcode or None}
        (C{None}: stay silent).
    @ivar delay: extra seconds before answering.
    @ivar queries: every decoded query received, with its source.
    @ivar options: option flags to put in replies (only those the query
        set are sent, unless C{misbehave} is set).
    @ivar optionData: option data for replies.
    """

    def __init__(
        self,
        reactor: FakeUDPReactor,
        address: Address,
        answer: Any = icp.Opcode.MISS,
        delay: float = 0.0,
        options: int = 0,
        optionData: int = 0,
        misbehave: bool = False,
    ) -> None:
        self.reactor = reactor
        self.answer = answer
        self.delay = delay
        self.options = options
        self.optionData = optionData
        self.misbehave = misbehave
        self.queries: list[tuple[icp.Message, Address]] = []
        self.port = reactor.listenUDP(address[1], self, interface=address[0])

    def datagramReceived(self, data: bytes, addr: Any) -> None:  # type: ignore[override]
        try:
            message = icp.decode(data)
        except icp.DecodeError:
            return
        if message.opcode != icp.Opcode.QUERY:
            return
        self.queries.append((message, (addr[0], addr[1])))
        opcode = self.answer(message.url) if callable(self.answer) else self.answer
        if opcode is None:
            return
        options = self.options if self.misbehave else self.options & message.options
        reply = icp.encode(
            icp.reply(message, opcode, options=options, optionData=self.optionData if options else 0)
        )
        if self.delay:
            self.reactor.callLater(self.delay, self._send, reply, addr)
        else:
            self._send(reply, addr)

    def _send(self, data: bytes, addr: Any) -> None:
        if self.port.connected:
            self.port.write(data, (addr[0], addr[1]))
