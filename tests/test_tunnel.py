"""
CONNECT tunnels through a real node (curl -p) to a TCP server on loopback.
"""

from __future__ import annotations

import socket
import threading

from twisted.trial.unittest import SynchronousTestCase

from icpmesh.tunnel import parseAuthority
from tests.nodelab import Node, Origin, curl


class ParseTests(SynchronousTestCase):
    """
    CONNECT targets.
    """

    def test_parse(self) -> None:
        """
        host:port and [v6]:port parse; anything else does not.
        """
        self.assertEqual(parseAuthority(b"example.com:443"), ("example.com", 443))
        self.assertEqual(parseAuthority(b"[::1]:8443"), ("::1", 8443))
        for bad in (b"example.com", b"example.com:0", b"example.com:99999", b":443", b"a/b:443",
                    b"::1:443", b"http://x:443", b"\xff:443"):
            self.assertIsNone(parseAuthority(bad), bad)


class TunnelTests(SynchronousTestCase):
    """
    Real tunnels.
    """

    def setUp(self) -> None:
        self.origin = Origin()
        self.addCleanup(self.origin.stop)

    def test_tunnelAllowedPort(self) -> None:
        """
        With the origin's port in connect_ports, curl's CONNECT tunnel
        carries a whole HTTP exchange, and it is not cached.
        """
        node = Node(self.mktemp(), config=f"connect_ports 443 {self.origin.port}\n")
        self.addCleanup(node.stop)
        proxy = f"http://127.0.0.1:{node.httpPort}"
        result = curl("-p", self.origin.url("/tunnelled"), proxy=proxy)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(b"200 Connection established", result.stdout)
        self.assertTrue(result.stdout.endswith(b"body of /tunnelled"))
        curl("-p", self.origin.url("/tunnelled"), proxy=proxy)
        self.assertEqual(self.origin.counts["/tunnelled"], 2)

    def test_defaultOnly443(self) -> None:
        """
        By default CONNECT to any port but 443 is refused with 403.
        """
        node = Node(self.mktemp())
        self.addCleanup(node.stop)
        result = curl("-p", self.origin.url("/x"), proxy=f"http://127.0.0.1:{node.httpPort}")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(b" 403 ", result.stdout)
        self.assertNotIn("/x", self.origin.counts)

    def test_unreachableTarget(self) -> None:
        """
        A target that refuses the connection gets 502.
        """
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        node = Node(self.mktemp(), config=f"connect_ports {closed}\n")
        self.addCleanup(node.stop)
        result = curl("-p", f"http://127.0.0.1:{closed}/", proxy=f"http://127.0.0.1:{node.httpPort}")
        self.assertIn(b" 502 ", result.stdout)

    def test_bulkBothWays(self) -> None:
        """
        A megabyte each way crosses the tunnel intact.
        """
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        self.addCleanup(server.close)
        payload = bytes(range(256)) * 4096

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                got = b""
                while len(got) < len(payload):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    got += chunk
                conn.sendall(got[::-1])

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        node = Node(self.mktemp(), config=f"connect_ports {port}\n")
        self.addCleanup(node.stop)
        client = socket.create_connection(("127.0.0.1", node.httpPort), timeout=20)
        self.addCleanup(client.close)
        client.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += client.recv(1)
        self.assertIn(b"200", head.split(b"\r\n")[0])
        client.sendall(payload)
        back = b""
        while len(back) < len(payload):
            chunk = client.recv(65536)
            if not chunk:
                break
            back += chunk
        self.assertEqual(back, payload[::-1])
        thread.join(10)
