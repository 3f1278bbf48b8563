"""
TLS where a user expects it: an HTTPS listening port on the node.
"""

from __future__ import annotations

import os
import subprocess

from twisted.trial.unittest import SynchronousTestCase

from icpmesh.config import ConfigError, parseConfig
from icpmesh.service import makeMeshService
from icpmesh.testing import FakeUDPReactor
from tests.nodelab import Node, Origin, curl, freePort


def selfSigned(directory: str) -> tuple[str, str]:
    os.makedirs(directory, exist_ok=True)
    cert = os.path.join(directory, "cert.pem")
    key = os.path.join(directory, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


class HTTPSPortTests(SynchronousTestCase):
    """
    https_port.
    """

    def test_proxyOverTLS(self) -> None:
        """
        A client speaking TLS to the proxy (curl -x https://) gets the
        object, and the second time a HIT.
        """
        cert, key = selfSigned(os.path.abspath(self.mktemp()))
        origin = Origin()
        self.addCleanup(origin.stop)
        port = freePort()
        node = Node(self.mktemp(), config=f"https_port 127.0.0.1:{port} cert={cert} key={key}\n")
        self.addCleanup(node.stop)
        from tests.nodelab import waitFor
        import socket

        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return True
            except OSError:
                return False

        self.assertTrue(waitFor(listening, 10))
        url = origin.url("/over-tls")
        first = curl("--proxy-cacert", cert, url, proxy=f"https://127.0.0.1:{port}")
        second = curl("--proxy-cacert", cert, url, proxy=f"https://127.0.0.1:{port}")
        self.assertEqual(first.returncode, 0, first.stderr)
        self.assertIn(b"X-Cache: MISS", first.stdout)
        self.assertIn(b"X-Cache: HIT", second.stdout)
        self.assertEqual(origin.counts["/over-tls"], 1)

    def test_badCertificate(self) -> None:
        """
        A missing certificate stops start-up with a clear reason.
        """
        config = parseConfig("https_port 127.0.0.1:0 cert=/nonexistent.pem\n", "f.conf")
        e = self.assertRaises(ConfigError, makeMeshService, config, FakeUDPReactor())
        self.assertTrue(str(e).startswith("f.conf:1: https_port: cannot read /nonexistent.pem"), str(e))
        config = parseConfig("https_port 127.0.0.1:0\n", "f.conf")
        e = self.assertRaises(ConfigError, makeMeshService, config, FakeUDPReactor())
        self.assertIn("https_port needs cert=FILE", str(e))


class NeighbourTLSTests(SynchronousTestCase):
    """
    TLS to a neighbour's HTTP port (cache_peer ... tls).
    """

    def test_parentOverTLS(self) -> None:
        """
        A child node reaches its parent's TLS port, verifying the parent's
        certificate against tls-cafile; with the wrong CA the fetch fails
        with 502 rather than going over an unverified connection.
        """
        import socket

        from tests.nodelab import waitFor

        cert, key = selfSigned(os.path.abspath(self.mktemp()))
        otherCert, _ = selfSigned(os.path.abspath(self.mktemp()))
        origin = Origin()
        self.addCleanup(origin.stop)
        tlsPort = freePort(address="127.0.0.21")
        parent = Node(self.mktemp(), address="127.0.0.21",
                      config=f"https_port 127.0.0.21:{tlsPort} cert={cert} key={key}\naccess_log access.log\n")
        self.addCleanup(parent.stop)

        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.21", tlsPort), timeout=0.5).close()
                return True
            except OSError:
                return False

        self.assertTrue(waitFor(listening, 10))

        def child(ca: str) -> Node:
            node = Node(self.mktemp(), address="127.0.0.22", config=(
                f"cache_peer 127.0.0.21 parent {tlsPort} 0 no-query tls tls-cafile={ca} "
                "tls-domain=127.0.0.1 name=parent\n"
                "acl all_requests src 0.0.0.0/0 ::/0\nnever_direct allow all_requests\n"))
            self.addCleanup(node.stop)
            return node

        good = child(cert)
        url = origin.url("/via-tls-parent")
        result = curl(url, proxy=f"http://127.0.0.22:{good.httpPort}")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(result.stdout.endswith(b"body of /via-tls-parent"), result.stdout)
        self.assertEqual(origin.counts["/via-tls-parent"], 1)

        def logged() -> bool:
            with open(os.path.join(parent.workdir, "access.log")) as f:
                return url in f.read()

        self.assertTrue(waitFor(logged, 5), "the parent did not serve it")
        good.stop()

        bad = child(otherCert)
        result = curl(origin.url("/unverified"), proxy=f"http://127.0.0.22:{bad.httpPort}")
        self.assertIn(b" 502 ", result.stdout.split(b"\r\n", 1)[0])
        self.assertNotIn("/unverified", origin.counts)
