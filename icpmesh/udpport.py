# -*- test-case-name: tests.test_udpport -*-
"""
The node's ICP UDP port: Twisted's own port with a leaner read loop.

An ICP datagram costs a few microseconds of Python in all, so the per
datagram overhead of C{twisted.internet.udp.Port.doRead} (attribute look-ups
of the socket, the protocol and the address family for every datagram)
shows.  L{ICPPort} and L{ICPMulticastPort} are the reactor's UDP port
classes with only C{doRead} replaced: the same reads in the same order, the
same error handling (temporary errors end the read, C{ECONNREFUSED} goes to
C{connectionRefused} on a connected port, anything else is raised to the
reactor, an exception from the protocol is logged and the loop goes on), the
same C{maxThroughput} budget per call, and IPv6 addresses cut to
C{(host, port)}.  They are still registered with and driven by the reactor,
and the protocol is still a plain C{DatagramProtocol}.

L{listenICP} uses them on a reactor whose own UDP ports are
C{twisted.internet.udp.Port} (every POSIX reactor), and the reactor's
C{listenUDP}/C{listenMulticast} otherwise (test reactors, IOCP).
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import udp
from twisted.internet.protocol import DatagramProtocol
from twisted.python import log

from icpmesh.icp import MAX_MESSAGE_LENGTH

#: Errors that end a read quietly (nothing more to read now), and errors that
#: report an earlier send refused (ICMP port unreachable): Twisted's own
#: lists for C{udp.Port.doRead}, on every platform, as sets.
_READ_IGNORE = frozenset(udp._sockErrReadIgnore)
_READ_REFUSE = frozenset(udp._sockErrReadRefuse)


class _LeanRead:
    """
    The C{doRead} of L{ICPPort} and L{ICPMulticastPort}.
    """

    socket: Any
    protocol: Any
    maxPacketSize: int
    maxThroughput: int
    addressFamily: Any
    _connectedAddr: Any

    def doRead(self) -> None:
        """
        Read datagrams until the socket has no more or C{maxThroughput}
        bytes were read, handing each to the protocol.
        """
        recvfrom = self.socket.recvfrom
        received = self.protocol.datagramReceived
        size = self.maxPacketSize
        budget = self.maxThroughput
        ipv6 = self.addressFamily == socket.AF_INET6
        read = 0
        while read < budget:
            try:
                data, address = recvfrom(size)
            except OSError as e:
                number = e.args[0]
                if number in _READ_IGNORE:
                    return
                if number in _READ_REFUSE:
                    if self._connectedAddr:
                        self.protocol.connectionRefused()
                    return
                raise
            read += len(data)
            if ipv6:
                # Drop the flow and scope IDs, as Twisted's port does.
                address = address[:2]
            try:
                received(data, address)
            except BaseException:
                log.err()


class ICPPort(_LeanRead, udp.Port):
    """
    C{twisted.internet.udp.Port} with L{_LeanRead.doRead}.
    """


class ICPMulticastPort(_LeanRead, udp.MulticastPort):
    """
    C{twisted.internet.udp.MulticastPort} with L{_LeanRead.doRead}.
    """


def _usesTwistedUDPPort(reactor: Any) -> bool:
    """
    Whether C{reactor}'s UDP ports are C{twisted.internet.udp.Port}: it is
    a POSIX reactor and has not replaced C{listenUDP}.
    """
    from twisted.internet.posixbase import PosixReactorBase

    return (
        isinstance(reactor, PosixReactorBase)
        and type(reactor).listenUDP is PosixReactorBase.listenUDP
        and type(reactor).listenMulticast is PosixReactorBase.listenMulticast
    )


def listenICP(
    reactor: Any,
    port: int,
    protocol: DatagramProtocol,
    interface: str = "",
    multicast: bool = False,
    maxPacketSize: int = MAX_MESSAGE_LENGTH + 1,
) -> Any:
    """
    Listen for ICP on UDP C{port}, as C{reactor.listenUDP} (or
    C{listenMulticast} with C{multicast}, with C{listenMultiple} off) would,
    with an L{ICPPort} or L{ICPMulticastPort} when the reactor's own ports
    are Twisted's UDP ports.

    The default C{maxPacketSize} reads a datagram one byte longer than the
    longest ICP message, so that a longer one is seen as too long (and
    answered or counted as such) instead of being cut to a shorter length.

    @return: the listening port.
    """
    if not _usesTwistedUDPPort(reactor):
        if multicast:
            return reactor.listenMulticast(port, protocol, interface=interface, maxPacketSize=maxPacketSize)
        return reactor.listenUDP(port, protocol, interface=interface, maxPacketSize=maxPacketSize)
    listening: udp.Port
    if multicast:
        listening = ICPMulticastPort(port, protocol, interface, maxPacketSize, reactor)
    else:
        listening = ICPPort(port, protocol, interface, maxPacketSize, reactor)
    listening.startListening()
    return listening
