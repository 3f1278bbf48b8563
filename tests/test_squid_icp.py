"""
Interoperability of L{icpmesh.icp} and C{icpmesh-query} with a real Squid 5.7.

Each test starts its own memory-only Squid on 127.0.0.3 (about 0.1 s) and
talks to it from 127.0.0.2; origins run on 127.0.0.1.  Skipped when Squid is
not installed, failed instead when C{CI} is set (L{squidlab.requireSquid}).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest
from twisted.trial.unittest import SynchronousTestCase

from icpmesh import icp
from icpmesh.icp import Opcode
from tests import squidlab
from tests.nodelab import Origin

pytestmark = pytest.mark.squid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SQUID_ADDRESS = "127.0.0.3"
CLIENT = "127.0.0.2"
STRANGER = "127.0.0.4"


class SquidICPTests(SynchronousTestCase):
    """
    Our encoder's queries get replies from Squid that our decoder parses,
    with the opcodes RFC 2187 and Squid's documented behaviour predict.
    """

    def setUp(self) -> None:
        self.squid = squidlab.startSquid(self, address=SQUID_ADDRESS, icpAllow=[CLIENT])
        self.origin = Origin("127.0.0.1")
        self.addCleanup(self.origin.stop)

    def query(self, url: str, reqnum: int = 1, options: int = 0, source: str = CLIENT) -> icp.Message:
        """
        Send one query and return the decoded reply, failing if none came.
        """
        reply = self.squid.query(url, source=source, reqnum=reqnum, options=options)
        if reply is None:
            self.fail(f"no ICP reply from Squid for {url!r}\n{self.squid.diagnostics()}")
        return reply

    def cache(self, path: str, maxAge: int) -> str:
        """
        Serve C{path} from the origin with C{max-age=maxAge}, fetch it
        through Squid twice and check the second fetch was a cache hit, so
        the object is certainly in Squid's cache.

        @return: the URL.
        """
        self.origin.routes[path] = (
            200, {"Cache-Control": f"max-age={maxAge}", "Content-Type": "text/plain"}, b"x" * 100,
        )
        url = self.origin.url(path)
        before = len(self.squid.accessLogLines())
        for _ in range(2):
            status, _, body = self.squid.fetch(url)
            self.assertEqual((status, body), (200, b"x" * 100))
        lines = self.squid.waitForAccessLog(before + 2)
        codes = [squidlab.parseAccessLine(line)["code"] for line in lines if url in line]
        self.assertEqual(codes[0], "TCP_MISS", lines)
        self.assertIn(codes[1], ("TCP_MEM_HIT", "TCP_HIT"), lines)
        self.assertEqual(self.origin.counts[path], 1)
        return url

    def test_missHeader(self) -> None:
        """
        A query for an unknown URL gets a version-2 MISS that echoes the
        32-bit request number and the URL, with flags, option data and
        sender address 0, and exactly 20 + len(URL) + 1 bytes long.
        """
        url = "http://unknown.example/never-fetched"
        data = self.squid.icpExchange(icp.encode(icp.query(0xFEDCBA98, url)), CLIENT)
        self.assertIsNotNone(data)
        self.assertEqual(len(data), 20 + len(url) + 1)
        self.assertEqual(
            icp.decode(data), icp.Message(Opcode.MISS, 0xFEDCBA98, url, icp.VERSION_2, 0, 0, 0)
        )

    def test_hitFresh(self) -> None:
        """
        A URL that Squid cached with max-age 3600 is a HIT.
        """
        url = self.cache("/fresh", 3600)
        reply = self.query(url, reqnum=7)
        self.assertEqual((reply.opcode, reply.reqnum, reply.url, reply.options), (Opcode.HIT, 7, url, 0))

    def test_missAlmostStale(self) -> None:
        """
        A URL cached with max-age 25 is a MISS, because Squid answers HIT
        only for objects still fresh 30 s from now (RFC 2187 5.2.3); one
        cached with max-age 60 is a HIT.
        """
        stale = self.cache("/soon-stale", 25)
        fresh = self.cache("/fresh-enough", 60)
        self.assertEqual(self.query(stale).opcode, Opcode.MISS)
        self.assertEqual(self.query(fresh).opcode, Opcode.HIT)

    def test_errWhitespaceEscaped(self) -> None:
        """
        A URL with a space gets ERR with the URL %-escaped once (the Debian
        build carries the CVE-2026-33526 fix).
        """
        reply = self.query("http://x/a b", reqnum=3)
        self.assertEqual((reply.opcode, reply.reqnum, reply.url), (Opcode.ERR, 3, "http://x/a%20b"))

    def test_errRelative(self) -> None:
        """
        A relative URL gets ERR with the URL echoed unchanged.
        """
        reply = self.query("/relative/path", reqnum=4)
        self.assertEqual((reply.opcode, reply.reqnum, reply.url), (Opcode.ERR, 4, "/relative/path"))

    def test_errBadFramingEmptyUrl(self) -> None:
        """
        A QUERY with bytes after the URL's NUL (which our decoder rejects as
        C{bad-url-framing}) gets ERR with an empty URL, which our decoder
        accepts.
        """
        body = b"\0\0\0\0http://a/\0junk"
        data = struct.pack("!BBHIIII", Opcode.QUERY, 2, 20 + len(body), 5, 0, 0, 0) + body
        self.assertEqual(
            self.assertRaises(icp.DecodeError, icp.decode, data).reason, icp.REASON_URL
        )
        reply = self.squid.icpExchange(data, CLIENT)
        self.assertIsNotNone(reply)
        self.assertEqual(icp.decode(reply), icp.Message(Opcode.ERR, 5, ""))

    def test_denied(self) -> None:
        """
        A source that C{icp_access} does not allow gets DENIED, and the
        access log records it as C{UDP_DENIED} for that source.
        """
        reply = self.query("http://example.com/", reqnum=9, source=STRANGER)
        self.assertEqual((reply.opcode, reply.reqnum), (Opcode.DENIED, 9))
        [entry] = [squidlab.parseAccessLine(line) for line in self.squid.waitForAccessLog(1)]
        self.assertEqual((entry["client"], entry["code"], entry["method"]), (STRANGER, "UDP_DENIED", "ICP_QUERY"))

    def test_hitObjFlagIgnored(self) -> None:
        """
        Asking for HIT_OBJ gets a plain HIT with no flags, no option data
        and no object.
        """
        url = self.cache("/object", 3600)
        reply = self.query(url, options=icp.FLAG_HIT_OBJ)
        self.assertEqual((reply.opcode, reply.options, reply.optionData, reply.payload), (Opcode.HIT, 0, 0, None))

    def test_srcRtt(self) -> None:
        """
        SRC_RTT is answered only when Squid knows an RTT to the origin host:
        not for a host it never contacted, but for the origin it fetched
        from, where its netdb entry starts at 1 ms and 0 hops
        (squid-peering.md 4.1).  The HIT_OBJ bit asked for alongside is not
        echoed.
        """
        unknown = self.query("http://unknown.example/", options=icp.FLAG_SRC_RTT)
        self.assertEqual((unknown.opcode, unknown.options, unknown.optionData), (Opcode.MISS, 0, 0))
        url = self.cache("/rtt", 3600)
        reply = self.query(url, options=icp.FLAG_SRC_RTT | icp.FLAG_HIT_OBJ)
        self.assertEqual((reply.opcode, reply.options), (Opcode.HIT, icp.FLAG_SRC_RTT))
        self.assertEqual(icp.parseSrcRtt(reply.optionData), (1, 0))

    def runQueryTool(self, *args: str) -> subprocess.CompletedProcess[str]:
        """
        Run C{python -m icpmesh.query} from the checkout.
        """
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        return subprocess.run(
            [sys.executable, "-m", "icpmesh.query", *args],
            capture_output=True, text=True, env=env, timeout=30, cwd=ROOT,
        )

    def test_queryTool(self) -> None:
        """
        C{python -m icpmesh.query} against Squid prints HIT for a cached URL
        and MISS for an unknown one, with flags 0, and exits 0.
        """
        cached = self.cache("/tool", 3600)
        unknown = "http://unknown.example/tool"
        target = f"{SQUID_ADDRESS}:{self.squid.icpPort}"
        result = self.runQueryTool("--bind", CLIENT, target, cached, unknown)
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = [line.split() for line in result.stdout.splitlines()]
        self.assertEqual([line[:3] for line in lines], [[cached, "HIT", "flags=0"], [unknown, "MISS", "flags=0"]])

    def test_queryToolSelfFilter(self) -> None:
        """
        Sent from Squid's own address, a query is ignored (Squid's self
        filter), so the tool prints TIMEOUT and exits 1.
        """
        target = f"{SQUID_ADDRESS}:{self.squid.icpPort}"
        result = self.runQueryTool("--bind", SQUID_ADDRESS, "--timeout", "0.5", target, "http://a/")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("http://a/ TIMEOUT", result.stdout)
