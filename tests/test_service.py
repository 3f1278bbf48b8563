"""
Tests for L{icpmesh.service.makeMeshService} with fake reactors: the
embedding path.
"""

from __future__ import annotations

from twisted.application.service import IService, MultiService
from twisted.trial.unittest import SynchronousTestCase

from icpmesh import icp
from icpmesh.config import ConfigError, parseConfig
from icpmesh.service import makeMeshService, tuneGarbageCollector
from icpmesh.testing import FakeUDPReactor

CONFIG = """
http_port 127.0.0.1:3128
icp_port 127.0.0.1:3130
visible_hostname node1
"""


class ServiceTests(SynchronousTestCase):
    """
    Building, starting and stopping a node on a fake reactor.
    """

    def test_startStop(self) -> None:
        """
        Starting listens on the configured TCP and UDP ports; stopping
        closes them.
        """
        reactor = FakeUDPReactor()
        svc = makeMeshService(parseConfig(CONFIG, "t"), reactor=reactor)
        self.assertTrue(IService.providedBy(svc))
        parent = MultiService()
        svc.setServiceParent(parent)
        parent.startService()
        self.assertEqual([(p[0], p[3]) for p in reactor.tcpServers], [(3128, "127.0.0.1")])
        self.assertIn(("127.0.0.1", 3130), reactor.ports)
        self.assertEqual(svc.icpPort(), 3130)
        self.successResultOf(parent.stopService())
        self.assertNotIn(("127.0.0.1", 3130), reactor.ports)

    def test_answersICP(self) -> None:
        """
        The started node answers an ICP query from a loopback client.
        """
        reactor = FakeUDPReactor()
        svc = makeMeshService(parseConfig(CONFIG, "t"), reactor=reactor)
        svc.startService()
        self.addCleanup(svc.stopService)
        from twisted.internet.protocol import DatagramProtocol

        got: list[bytes] = []

        class Client(DatagramProtocol):
            def datagramReceived(self, data: bytes, addr: object) -> None:
                got.append(data)

        port = reactor.listenUDP(0, Client(), interface="127.0.0.5")
        port.write(icp.encode(icp.query(9, "http://example.com/")), ("127.0.0.1", 3130))
        reactor.pump(0.01)
        [reply] = [icp.decode(d) for d in got]
        self.assertEqual((reply.opcode, reply.reqnum), (icp.Opcode.MISS, 9))

    def test_noICP(self) -> None:
        """
        icp_port none: no UDP port.
        """
        reactor = FakeUDPReactor()
        svc = makeMeshService(parseConfig("icp_port none\nhttp_port 127.0.0.1:0\n", "t"), reactor=reactor)
        svc.startService()
        self.assertEqual(reactor.ports, {})
        self.assertIsNone(svc.protocol)

    def test_badConfig(self) -> None:
        """
        Errors in a plugin's part of the config surface from
        makeMeshService as ConfigError with file and line.
        """
        e = self.assertRaises(ConfigError, makeMeshService,
                              parseConfig("store memory colour=blue\n", "f.conf"), FakeUDPReactor())
        self.assertTrue(str(e).startswith("f.conf:1: "))


class LimitsTests(SynchronousTestCase):
    """
    Request size limits from the config reach the proxy and its channel.
    """

    def test_limits(self) -> None:
        """
        request_header_max_size and request_body_max_size configure the
        proxy; the HTTP channel reads enough to let the proxy answer 431.
        """
        svc = makeMeshService(parseConfig(
            "http_port 127.0.0.1:0\nrequest_header_max_size 32 KB\nrequest_body_max_size 1 MB\n", "t"),
            reactor=FakeUDPReactor())
        self.assertEqual((svc.proxy.maxRequestHeaderSize, svc.proxy.maxRequestBodySize), (32768, 1024**2))
        channel = svc.site.buildProtocol(None)
        self.assertGreater(channel._channel.totalHeadersSize, 32768)

    def statusFor(self, limit: str, headers: bytes) -> bytes:
        """
        The status line a node with C{request_header_max_size limit} sends
        for an C{only-if-cached} GET carrying the extra header lines
        C{headers}, through the node's own C{ProxySite}.
        """
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        svc = makeMeshService(parseConfig(f"http_port 127.0.0.1:0\nrequest_header_max_size {limit}\n", "t"),
                              reactor=FakeUDPReactor())
        address = IPv4Address("TCP", "127.0.0.1", 40000)
        channel = svc.site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        channel.makeConnection(transport)
        channel.dataReceived(b"GET http://127.0.0.1:1/x HTTP/1.1\r\nHost: 127.0.0.1:1\r\n" + headers
                             + b"Cache-Control: only-if-cached\r\n\r\n")
        return transport.value().split(b"\r\n", 1)[0]

    def test_headerLimitAboveTwistedDefault(self) -> None:
        """
        With request_header_max_size above twisted.web's 16 KiB, a 20 KB
        header line is served, and a 33 KB one gets the proxy's 431 (not a
        bare 400 from twisted.web, nor a dropped connection).
        """
        def status(size: int) -> bytes:
            return self.statusFor("32 KB", b"X-Big: " + b"a" * size + b"\r\n")

        self.assertEqual(status(20000), b"HTTP/1.1 504 Gateway Timeout")
        self.assertEqual(status(33000), b"HTTP/1.1 431 Request Header Fields Too Large")

    def test_smallHeaderLimit(self) -> None:
        """
        With a limit below twisted.web's 16 KiB: many short header lines
        over the limit, one long line, and one line longer than any line
        the channel reads all get 431.
        """
        def status(headers: bytes) -> bytes:
            return self.statusFor("1 KB", headers)

        tooLarge = b"HTTP/1.1 431 Request Header Fields Too Large"
        self.assertEqual(status(b"X-A: 1\r\n" * 20), b"HTTP/1.1 504 Gateway Timeout")
        self.assertEqual(status(b"".join(b"X%03d:v\r\n" % i for i in range(150))), tooLarge)
        self.assertEqual(status(b"X-Big: " + b"a" * 12000 + b"\r\n"), tooLarge)
        self.assertEqual(status(b"X-Big: " + b"a" * 20000 + b"\r\n"), tooLarge)

    def test_cdnCacheControl(self) -> None:
        """
        cdn_cache_control reaches the proxy; C{restrictive} by default.
        """
        def mode(text: str) -> str:
            svc = makeMeshService(parseConfig("http_port 127.0.0.1:0\n" + text, "t"), reactor=FakeUDPReactor())
            return str(svc.proxy.cdnCacheControl)

        self.assertEqual((mode(""), mode("cdn_cache_control on\n")), ("restrictive", "on"))


class CARPWiringTests(SynchronousTestCase):
    """
    A node with the carp selector publishes its membership table.
    """

    def test_tableServed(self) -> None:
        """
        GET /carp on the proxy port returns the array membership table
        naming every member.
        """
        from twisted.internet.testing import StringTransport

        svc = makeMeshService(parseConfig(
            "http_port 127.0.0.1:0\nselector carp\n"
            "cache_peer 127.0.0.11 parent 3128 0 carp name=p1\n"
            "cache_peer 127.0.0.12 parent 3128 0 carp name=p2 weight=2\n", "t"),
            reactor=FakeUDPReactor())
        channel = svc.site.buildProtocol(None)
        transport = StringTransport()
        from twisted.internet.address import IPv4Address
        transport.getPeer = lambda: IPv4Address("TCP", "127.0.0.1", 5555)  # type: ignore[method-assign]
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /carp HTTP/1.1\r\nHost: x\r\n\r\n")
        response = transport.value()
        self.assertIn(b" 200 ", response.split(b"\r\n", 1)[0])
        self.assertIn(b"p1", response)
        self.assertIn(b"p2", response)


class GarbageCollectorTests(SynchronousTestCase):
    """
    L{tuneGarbageCollector}, which C{twistd icpmesh} runs at start-up.
    """

    def test_tune(self) -> None:
        """
        It freezes what is alive and raises only the youngest threshold;
        cycles made afterwards are still collected.
        """
        import gc
        import weakref

        before = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *before)
        self.addCleanup(gc.unfreeze)
        tuneGarbageCollector(12345)
        self.assertEqual(gc.get_threshold(), (12345,) + before[1:])
        self.assertGreater(gc.get_freeze_count(), 0)

        class Node:
            other: "Node"

        a, b = Node(), Node()
        a.other, b.other = b, a
        ref = weakref.ref(a)
        del a, b
        gc.collect()
        self.assertIsNone(ref())

    def test_notCPython(self) -> None:
        """
        Without C{gc.freeze} (PyPy) it does nothing, and does not fail.
        """
        import gc

        from icpmesh import service

        class NoFreeze:
            def __getattr__(self, name: str) -> object:
                if name == "freeze":
                    raise AttributeError(name)
                raise AssertionError(f"gc.{name} used")

        self.patch(service, "gc", NoFreeze())
        tuneGarbageCollector(5)
        self.assertNotEqual(gc.get_threshold()[0], 5)
