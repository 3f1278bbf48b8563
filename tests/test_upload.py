"""
End-to-end: large uploads through a real node (twistd on loopback) to a
real origin that checks every byte it gets.  The body must reach the origin
while the client is still sending it, and the node must hold it neither in
memory nor in a temporary file.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess

from twisted.trial.unittest import SynchronousTestCase

from tests.nodelab import Node, Origin, curl, waitFor

SIZE = 20 * 1024 * 1024

#: How much the node's peak resident memory may grow during a 20 MB upload.
MAX_GROWTH = 8 * 1024 * 1024


def _payload(size: int) -> bytes:
    """
    C{size} bytes that do not repeat in any short period.
    """
    blocks = []
    counter = 0
    while sum(map(len, blocks)) < size:
        blocks.append(hashlib.sha512(counter.to_bytes(8, "big")).digest() * 64)
        counter += 1
    return b"".join(blocks)[:size]


class UploadTests(SynchronousTestCase):
    """
    PUT 20 MB through a node.
    """

    def setUp(self) -> None:
        self.origin = Origin()
        self.addCleanup(self.origin.stop)
        self.node = Node(self.mktemp())
        self.addCleanup(self.node.stop)
        self.proxy = f"http://127.0.0.1:{self.node.httpPort}"
        # Warm up (imports done on the first forwarded request).
        warm = curl("-X", "PUT", "--data-binary", "warm", self.origin.url("/warm"), proxy=self.proxy)
        self.assertEqual(warm.returncode, 0, warm.stderr)

    def peakMemory(self) -> int:
        """
        The node's peak resident set size (VmHWM), in bytes.
        """
        with open(f"/proc/{self.node.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    def openFiles(self) -> list[str]:
        """
        The files (not sockets, pipes or devices) the node has open.
        """
        found = []
        base = f"/proc/{self.node.process.pid}/fd"
        for fd in os.listdir(base):
            try:
                target = os.readlink(os.path.join(base, fd))
            except OSError:
                continue
            if target.startswith("/") and not target.startswith("/dev/"):
                found.append(target)
        return found

    def test_curlPutStreamed(self) -> None:
        """
        curl uploads 20 MB with PUT (Content-Length, and curl's Expect:
        100-continue), read from a pipe: after curl was given half of it,
        the origin has already received bytes of it while the node has no
        file open that it did not have before (twisted.web would buffer the
        body in a temporary file); then the origin receives every byte, and
        the node's peak memory grows by far less than the body.
        """
        payload = _payload(SIZE)
        half = SIZE // 2
        before = self.peakMemory()
        filesBefore = self.openFiles()
        process = subprocess.Popen(
            ["curl", "-sS", "--max-time", "60", "-D", "-", "-x", self.proxy, "-T", "-",
             "-H", f"Content-Length: {SIZE}", "-H", "Transfer-Encoding:",
             self.origin.url("/upload")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.addCleanup(lambda: process.poll() is None and process.kill())
        assert process.stdin is not None
        process.stdin.write(payload[:half])
        process.stdin.flush()
        self.assertTrue(waitFor(lambda: self.origin.received >= half // 2, timeout=30),
                        f"origin got {self.origin.received} bytes")
        self.assertEqual(self.openFiles(), filesBefore)
        process.stdin.write(payload[half:])
        out, err = process.communicate(timeout=60)
        self.assertEqual(process.returncode, 0, err)
        self.assertIn(b"HTTP/1.1 100 Continue", out)
        self.assertIn(b"\r\nHTTP/1.1 200 ", out)
        self.assertEqual(self.origin.uploads[-1],
                         ("PUT", "/upload", SIZE, hashlib.sha256(payload).hexdigest()))
        self.assertLess(self.peakMemory() - before, MAX_GROWTH)

    def test_chunkedReachesOriginBeforeClientFinishes(self) -> None:
        """
        A chunked 20 MB upload: after the client sent half of it, the
        origin has already received most of that half, while the node has
        no file open that it did not have before (twisted.web would buffer
        such a body in a temporary file); then the rest goes through and the origin's
        checksum matches.
        """
        payload = _payload(SIZE)
        half = SIZE // 2
        url = self.origin.url("/chunked")
        before = self.peakMemory()
        filesBefore = self.openFiles()
        sock = socket.create_connection(("127.0.0.1", self.node.httpPort))
        self.addCleanup(sock.close)
        sock.sendall(f"PUT {url} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())

        def send(data: bytes) -> None:
            for start in range(0, len(data), 65536):
                piece = data[start:start + 65536]
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))

        send(payload[:half])
        self.assertTrue(waitFor(lambda: self.origin.received >= half // 2, timeout=30),
                        f"origin got {self.origin.received} bytes")
        self.assertEqual(self.openFiles(), filesBefore)
        send(payload[half:])
        sock.sendall(b"0\r\n\r\n")
        sock.settimeout(30)
        response = b""
        while b"\r\n\r\n" not in response:
            data = sock.recv(65536)
            if not data:
                break
            response += data
        self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response[:200])
        self.assertEqual(self.origin.uploads[-1],
                         ("PUT", "/chunked", SIZE, hashlib.sha256(payload).hexdigest()))
        self.assertLess(self.peakMemory() - before, MAX_GROWTH)
