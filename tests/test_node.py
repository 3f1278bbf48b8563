"""
End-to-end: a real node started with twistd, a real origin, curl and raw UDP
on loopback - what the README's first run promises.
"""

from __future__ import annotations

import struct

from twisted.trial.unittest import SynchronousTestCase

from icpmesh import icp
from tests.nodelab import Node, Origin, curl, icpExchange


class FirstRunTests(SynchronousTestCase):
    """
    One node, its defaults, curl and ICP.
    """

    def setUp(self) -> None:
        self.origin = Origin()
        self.addCleanup(self.origin.stop)
        self.node = Node(self.mktemp())
        self.addCleanup(self.node.stop)
        self.proxy = f"http://127.0.0.1:{self.node.httpPort}"
        self.icp = ("127.0.0.1", self.node.icpPort)

    def test_getTwiceSecondIsHit(self) -> None:
        """
        The second GET through the proxy is a HIT that does not reach the
        origin, and the body is the same.
        """
        url = self.origin.url("/hello")
        first = curl(url, proxy=self.proxy)
        second = curl(url, proxy=self.proxy)
        self.assertEqual(first.returncode, 0, first.stderr)
        self.assertIn(b"X-Cache: MISS from", first.stdout)
        self.assertIn(b"X-Cache: HIT from", second.stdout)
        self.assertTrue(second.stdout.endswith(b"body of /hello"))
        self.assertEqual(self.origin.counts["/hello"], 1)

    def test_icpHitAndMiss(self) -> None:
        """
        After a GET, an ICP query for that URL answers HIT; for an unknown
        URL, MISS.
        """
        url = self.origin.url("/cached")
        curl(url, proxy=self.proxy)
        hit = icp.decode(icpExchange(icp.encode(icp.query(11, url)), self.icp, source="127.0.0.2"))
        miss = icp.decode(icpExchange(icp.encode(icp.query(12, url + "x")), self.icp, source="127.0.0.2"))
        self.assertEqual((hit.opcode, hit.reqnum, hit.url), (icp.Opcode.HIT, 11, url))
        self.assertEqual((miss.opcode, miss.reqnum), (icp.Opcode.MISS, 12))

    def test_malformedLeavesNodeAnswering(self) -> None:
        """
        Malformed datagrams of every kind and an ICPv3 query leave the node
        answering queries.
        """
        url = "http://example.com/"
        good = icp.encode(icp.query(1, url))
        v3 = bytearray(good)
        v3[1] = 3
        junk = [b"", b"\x01", good[:19], good[:20], good[:-1], good + b"\0", bytes(v3),
                struct.pack("!BBHIIII", 1, 2, 20, 1, 0, 0, 0),
                struct.pack("!BBHIIII", 99, 2, 21, 1, 0, 0, 0) + b"\0",
                b"\xff" * 2000, bytes(range(256)) * 64]
        for data in junk:
            icpExchange(data, self.icp, timeout=0.05)
        reply = icpExchange(icp.encode(icp.query(77, url)), self.icp)
        self.assertIsNotNone(reply)
        self.assertEqual(icp.decode(reply).reqnum, 77)
        self.assertTrue(self.node.alive())

    def test_badRequests(self) -> None:
        """
        An origin-form request to the proxy gets 400, not a crash.
        """
        result = curl(f"{self.proxy}/not-absolute")
        self.assertIn(b" 400 ", result.stdout.split(b"\r\n", 1)[0])
