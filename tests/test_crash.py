"""
Crash tests (issue 6): kill -9 a real node with a disk store while it is
writing objects, restart it on the same directory, and check that it never
serves or answers HIT for a partly written object, and that what it does
serve is byte-identical to the origin's.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from twisted.trial.unittest import SynchronousTestCase

from icpmesh import icp
from tests.nodelab import Node, icpExchange, waitFor

SIZE = 512 * 1024


def body(path: str) -> bytes:
    seed = hashlib.sha256(path.encode()).digest()
    return (seed * (SIZE // len(seed) + 1))[:SIZE]


class SlowOrigin:
    """
    An origin that streams 512 KiB bodies; under C{/slow/} in 8 KiB pieces
    20 ms apart (about 1.3 s a body), so that a node is caught mid-write.
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                origin.counts[self.path] = origin.counts.get(self.path, 0) + 1
                data = body(self.path)
                self.send_response(200)
                self.send_header("Cache-Control", "max-age=3600")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                slow = self.path.startswith("/slow/")
                piece = 8192 if slow else 65536
                try:
                    for i in range(0, len(data), piece):
                        self.wfile.write(data[i:i + piece])
                        self.wfile.flush()
                        if slow:
                            time.sleep(0.02)
                except OSError:
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def get(node: Node, url: str, timeout: float = 20) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(node.address, node.httpPort, timeout=timeout)
    try:
        conn.request("GET", url)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def icpOpcode(node: Node, url: str) -> Optional[int]:
    reply = icpExchange(icp.encode(icp.query(7, url)), (node.address, node.icpPort), source="127.0.0.9")
    return None if reply is None else icp.decode(reply).opcode


class KillNineTests(SynchronousTestCase):
    """
    kill -9 in the middle of writes.
    """

    def test_killDuringWrites(self) -> None:
        """
        Complete objects survive; objects being written when the node died
        are neither served nor answered as HIT; every object served after
        the restart is byte-identical to the origin's.
        """
        origin = SlowOrigin()
        self.addCleanup(origin.stop)
        workdir = os.path.abspath(self.mktemp())
        cache = os.path.join(workdir, "cache")
        config = f"store disk dir={cache} max-size=200MB max-object-size=8MB\n"
        node = Node(os.path.join(workdir, "run1"), config=config)
        self.addCleanup(node.stop)

        complete = [origin.url(f"/fast/{i}") for i in range(8)]
        for url in complete:
            status, headers, data = get(node, url)
            self.assertEqual((status, data), (200, body(url.split(str(origin.port), 1)[1])))
        self.assertTrue(waitFor(lambda: all(icpOpcode(node, u) == icp.Opcode.HIT for u in complete), 10))

        inFlight = [origin.url(f"/slow/{i}") for i in range(6)]
        threads = [threading.Thread(target=lambda u=u: _quietGet(node, u), daemon=True) for u in inFlight]
        for t in threads:
            t.start()
        time.sleep(0.5)  # about a third of each slow body has arrived
        os.kill(node.process.pid, signal.SIGKILL)
        node.process.wait(10)
        for t in threads:
            t.join(10)

        restarted = Node(os.path.join(workdir, "run2"), config=config)
        self.addCleanup(restarted.stop)
        self.assertTrue(waitFor(
            lambda: all(icpOpcode(restarted, u) == icp.Opcode.HIT for u in complete), 20),
            "complete objects were lost")
        for url in inFlight:
            self.assertIn(icpOpcode(restarted, url), (icp.Opcode.MISS, icp.Opcode.MISS_NOFETCH), url)
        before = dict(origin.counts)
        for url in complete:
            status, headers, data = get(restarted, url)
            self.assertEqual(status, 200)
            self.assertIn("HIT", headers.get("x-cache", ""))
            self.assertEqual(data, body(url.split(str(origin.port), 1)[1]))
        for url in inFlight:
            status, headers, data = get(restarted, url)
            self.assertEqual((status, len(data)), (200, SIZE))
            self.assertEqual(data, body(url.split(str(origin.port), 1)[1]))
            self.assertIn("MISS", headers.get("x-cache", ""))
        self.assertEqual({k: v for k, v in origin.counts.items() if k.startswith("/fast/")},
                         {k: v for k, v in before.items() if k.startswith("/fast/")})
        self.assertTrue(restarted.alive())


def _quietGet(node: Node, url: str) -> None:
    try:
        get(node, url, timeout=5)
    except Exception:
        pass
