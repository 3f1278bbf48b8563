"""
Tests for L{icpmesh.udpport}: the ICP port's read loop, on a scripted
socket (no real sockets).
"""

from __future__ import annotations

import errno
from typing import Any, Union

from twisted.internet import udp
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from icpmesh.testing.udp import FakeUDPReactor
from icpmesh.udpport import ICPMulticastPort, ICPPort, _usesTwistedUDPPort, listenICP

Step = Union[tuple[bytes, Any], OSError]


class ScriptedSocket:
    """
    A socket whose C{recvfrom} plays a script: datagrams, then errors;
    C{EAGAIN} once the script is exhausted.
    """

    def __init__(self, script: list[Step]) -> None:
        self.script = list(script)
        self.sizes: list[int] = []

    def recvfrom(self, size: int) -> tuple[bytes, Any]:
        self.sizes.append(size)
        if not self.script:
            raise BlockingIOError(errno.EAGAIN, "try again")
        step = self.script.pop(0)
        if isinstance(step, OSError):
            raise step
        return step


class Recorder(DatagramProtocol):
    def __init__(self, failOn: bytes = b"") -> None:
        self.received: list[tuple[bytes, Any]] = []
        self.refused = 0
        self.failOn = failOn

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received.append((datagram, addr))
        if datagram == self.failOn:
            raise RuntimeError("protocol bug")

    def connectionRefused(self) -> None:
        self.refused += 1


A = ("10.0.0.1", 3130)
B = ("10.0.0.2", 3131)


class ReadLoopTests(SynchronousTestCase):
    """
    L{ICPPort.doRead} does what C{udp.Port.doRead} does.
    """

    def read(self, script: list[Step], portClass: Any = ICPPort, interface: str = "127.0.0.1",
             maxThroughput: int = 256 * 1024, protocol: Any = None) -> tuple[Any, Recorder, ScriptedSocket]:
        protocol = protocol or Recorder()
        port = portClass(0, protocol, interface, 1000, MemoryReactor())
        port.maxThroughput = maxThroughput
        port.socket = ScriptedSocket(script)
        port.doRead()
        return port, protocol, port.socket

    def test_readsUntilEmpty(self) -> None:
        """
        Every queued datagram goes to the protocol in order, with its
        address, read with the port's C{maxPacketSize}; the read ends
        quietly when the socket has no more.
        """
        _, protocol, sock = self.read([(b"one", A), (b"two", B)])
        self.assertEqual(protocol.received, [(b"one", A), (b"two", B)])
        self.assertEqual(sock.sizes, [1000, 1000, 1000])

    def test_throughputBudget(self) -> None:
        """
        A read stops once C{maxThroughput} bytes were read; the rest waits.
        """
        _, protocol, sock = self.read([(b"x" * 60, A)] * 3, maxThroughput=100)
        self.assertEqual(len(protocol.received), 2)
        self.assertEqual(len(sock.script), 1)

    def test_ipv6AddressCut(self) -> None:
        """
        On an IPv6 port, flow and scope IDs are dropped from the address.
        """
        _, protocol, _ = self.read([(b"q", ("::1", 3130, 0, 0))], interface="::1")
        self.assertEqual(protocol.received, [(b"q", ("::1", 3130))])

    def test_protocolErrorLogged(self) -> None:
        """
        An exception from the protocol is logged and the loop goes on.
        """
        _, protocol, _ = self.read([(b"bad", A), (b"good", B)], protocol=Recorder(failOn=b"bad"))
        self.assertEqual([d for d, _ in protocol.received], [b"bad", b"good"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_temporaryErrorsEndRead(self) -> None:
        """
        C{EINTR} ends the read quietly, like C{EAGAIN}.
        """
        _, protocol, sock = self.read([(b"a", A), InterruptedError(errno.EINTR, "x"), (b"b", A)])
        self.assertEqual(protocol.received, [(b"a", A)])
        self.assertEqual(len(sock.script), 1)

    def test_refused(self) -> None:
        """
        C{ECONNREFUSED} ends the read; a connected port tells its protocol.
        """
        refused = ConnectionRefusedError(errno.ECONNREFUSED, "refused")
        _, protocol, _ = self.read([refused])
        self.assertEqual(protocol.refused, 0)
        protocol = Recorder()
        port = ICPPort(0, protocol, "127.0.0.1", 1000, MemoryReactor())
        port._connectedAddr = A
        port.socket = ScriptedSocket([refused])
        port.doRead()
        self.assertEqual(protocol.refused, 1)

    def test_otherErrorsRaised(self) -> None:
        """
        Any other socket error goes to the reactor, as with Twisted's port.
        """
        self.assertRaises(OSError, self.read, [OSError(errno.EBADF, "bad fd")])

    def test_sameAsTwisted(self) -> None:
        """
        On the same scripts, L{ICPPort} and L{ICPMulticastPort} deliver
        what C{udp.Port} delivers, and leave the same datagrams unread.
        """
        scripts: list[list[Step]] = [
            [(b"a", A), (b"bb", B), (b"ccc", A)],
            [(b"x" * 60, A)] * 4,
            [(b"a", A), InterruptedError(errno.EINTR, "x"), (b"b", A)],
        ]
        for script in scripts:
            outcomes = []
            for portClass in (udp.Port, ICPPort, ICPMulticastPort):
                _, protocol, sock = self.read(script, portClass=portClass, maxThroughput=130)
                outcomes.append((protocol.received, sock.script, sock.sizes))
            self.assertEqual(outcomes[0], outcomes[1])
            self.assertEqual(outcomes[0], outcomes[2])


class ListenTests(SynchronousTestCase):
    """
    L{listenICP} uses the lean ports only where the reactor's own UDP ports
    are Twisted's.
    """

    def test_whichReactors(self) -> None:
        """
        A POSIX reactor qualifies; one that replaces C{listenUDP}, and the
        test reactors, do not.
        """

        class Custom(SelectReactor):
            def listenUDP(self, *a: Any, **kw: Any) -> Any:
                raise NotImplementedError()

        # Instances made without __init__: no waker, no file descriptors.
        self.assertTrue(_usesTwistedUDPPort(SelectReactor.__new__(SelectReactor)))
        self.assertFalse(_usesTwistedUDPPort(Custom.__new__(Custom)))
        self.assertFalse(_usesTwistedUDPPort(FakeUDPReactor()))
        self.assertFalse(_usesTwistedUDPPort(MemoryReactor()))

    def test_fallback(self) -> None:
        """
        On other reactors, C{listenUDP} or C{listenMulticast} is used.
        """
        reactor = FakeUDPReactor()
        plain = listenICP(reactor, 3130, DatagramProtocol(), interface="127.0.0.1")
        group = listenICP(reactor, 3131, DatagramProtocol(), interface="127.0.0.1", multicast=True)
        self.assertEqual((plain.address, group.address), (("127.0.0.1", 3130), ("127.0.0.1", 3131)))
        self.assertTrue(hasattr(group, "joinGroup"))

    def test_readsWholeICPMessages(self) -> None:
        """
        Datagrams are read up to one byte more than the longest ICP message
        (16,384 bytes), on both kinds of port: a longer one is then seen as
        too long, never cut to a valid-looking shorter message.
        """
        reactor = FakeUDPReactor()
        calls: list[int] = []
        original = reactor.listenUDP

        def spy(port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> Any:
            calls.append(maxPacketSize)
            return original(port, protocol, interface=interface, maxPacketSize=maxPacketSize)

        self.patch(reactor, "listenUDP", spy)
        listenICP(reactor, 3130, DatagramProtocol(), interface="127.0.0.1")
        self.patch(ICPPort, "startListening", lambda self: None)
        lean = listenICP(SelectReactor.__new__(SelectReactor), 3130, DatagramProtocol())
        self.assertEqual((calls, lean.maxPacketSize), ([16385], 16385))

    def test_serviceUsesListenICP(self) -> None:
        """
        A node's ICP service listens through L{listenICP}.
        """
        from icpmesh import udpport
        from icpmesh.config import parseConfig
        from icpmesh.service import ICPServer, makeMeshService

        calls: list[tuple[Any, ...]] = []
        original = udpport.listenICP

        def spy(*args: Any, **kw: Any) -> Any:
            calls.append(args[1:3] + (kw["multicast"],))
            return original(*args, **kw)

        self.patch(udpport, "listenICP", spy)
        reactor = FakeUDPReactor()
        node = makeMeshService(parseConfig("icp_port 127.0.0.5:3130\nhttp_port 127.0.0.5:0\n"), reactor=reactor)
        self.assertIsInstance(node._udpService, ICPServer)
        node.startService()
        self.addCleanup(node.stopService)
        self.assertEqual(calls, [(3130, node.protocol, False)])
        self.assertEqual(node.icpPort(), 3130)
