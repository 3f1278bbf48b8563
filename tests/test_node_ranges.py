"""
End-to-end byte ranges: a real node with a disk store, a real origin and
curl's C{-r}, on loopback.
"""

from __future__ import annotations

import os
import random

from twisted.trial.unittest import SynchronousTestCase

from tests.nodelab import Node, Origin, curl, waitFor


class RangeNodeTests(SynchronousTestCase):
    """
    C{curl -r} through a node whose disk store holds a 1 MiB object.
    """

    def setUp(self) -> None:
        self.origin = Origin()
        self.addCleanup(self.origin.stop)
        self.body = random.Random(3).randbytes(1024 * 1024)
        self.origin.routes["/big"] = (
            200, {"Cache-Control": "max-age=3600", "ETag": '"big1"'}, self.body)
        workdir = os.path.abspath(self.mktemp())
        self.accessLog = os.path.join(workdir, "access.log")
        os.makedirs(os.path.join(workdir, "cache"))
        self.node = Node(workdir, config=(
            f"store disk dir={workdir}/cache max-size=64MB fsync=off\n"
            f"access_log {self.accessLog}\n"
        ))
        self.addCleanup(self.node.stop)
        self.proxy = f"http://127.0.0.1:{self.node.httpPort}"

    def test_curlRanges(self) -> None:
        """
        After one complete GET, C{curl -r 0-99}, C{-r 700000-} and
        C{-r -5} get 206 from the store with the right C{Content-Range}
        and exactly those bytes; the origin is asked once, and the access
        log has C{TCP_HIT/206} lines with the bytes sent.
        """
        url = self.origin.url("/big")
        first = curl(url, proxy=self.proxy)
        self.assertEqual(first.returncode, 0, first.stderr)
        size = len(self.body)
        for spec, first_, last in (("0-99", 0, 99), ("700000-", 700000, size - 1),
                                   ("-5", size - 5, size - 1)):
            result = curl("-r", spec, url, proxy=self.proxy)
            self.assertEqual(result.returncode, 0, result.stderr)
            head, _, body = result.stdout.partition(b"\r\n\r\n")
            self.assertIn(b" 206 ", head.split(b"\r\n", 1)[0], head)
            self.assertIn(f"Content-Range: bytes {first_}-{last}/{size}".encode(), head)
            self.assertIn(b"X-Cache: HIT from", head)
            self.assertTrue(body == self.body[first_ : last + 1], spec)
        self.assertEqual(self.origin.counts["/big"], 1)

        def logged() -> bool:
            try:
                with open(self.accessLog) as f:
                    return f.read().count("TCP_HIT/206") == 3
            except OSError:
                return False

        self.assertTrue(waitFor(logged, timeout=10), "access log lines missing")
        with open(self.accessLog) as f:
            sizes = [line.split()[4] for line in f if "TCP_HIT/206" in line]
        self.assertEqual(sizes, ["100", str(size - 700000), "5"])
