"""
Tests for L{icpmesh.accesslog}: Squid's native access.log format, buffered.
"""

from __future__ import annotations

import io

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from icpmesh.accesslog import FLUSH_INTERVAL, MAX_BUFFERED, AccessLog


class CountingFile(io.StringIO):
    """
    A text file that counts its writes.
    """

    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


class AccessLogTests(SynchronousTestCase):
    """
    Lines, buffering and flushing.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1700000000.123)
        self.file = CountingFile()
        self.log = AccessLog(self.file, reactor=self.clock)

    def test_requestLineFormat(self) -> None:
        """
        An HTTP request is logged as Squid's native format: time with
        milliseconds, elapsed ms right-aligned in six columns, client,
        code/status, size, method, URL, ident, hierarchy/peer, type.
        """
        self.log.logRequest("127.0.0.1", "TCP_MISS", 200, 1234, "GET", "http://x/", "HIER_DIRECT",
                            "93.184.216.34", "text/html", 12)
        self.log.flush()
        self.assertEqual(
            self.file.getvalue(),
            "1700000000.123     12 127.0.0.1 TCP_MISS/200 1234 GET http://x/ - "
            "HIER_DIRECT/93.184.216.34 text/html\n",
        )

    def test_icpLineFormat(self) -> None:
        """
        An ICP reply is logged as Squid logs it, with status 000, method
        ICP_QUERY and hierarchy HIER_NONE/-; a bare opcode name gets the
        UDP_ prefix.
        """
        self.log.logICP("10.0.0.9", "UDP_HIT", 48, "http://x/")
        self.log.logICP("10.0.0.9", "MISS_NOFETCH", 48, "http://y/")
        self.log.flush()
        self.assertEqual(
            self.file.getvalue().splitlines(),
            [
                "1700000000.123      0 10.0.0.9 UDP_HIT/000 48 ICP_QUERY http://x/ - HIER_NONE/- -",
                "1700000000.123      0 10.0.0.9 UDP_MISS_NOFETCH/000 48 ICP_QUERY http://y/ - HIER_NONE/- -",
            ],
        )

    def test_fieldsStayOneWord(self) -> None:
        """
        White space and control characters in a URL or content type are
        escaped, so every line keeps its ten fields.
        """
        self.log.logRequest("::1", "TCP_HIT", 200, 1, "GET", "http://x/a b\n", "HIER_NONE", "-",
                            "text/html; charset=utf-8")
        self.log.flush()
        line = self.file.getvalue()
        self.assertEqual(line.count("\n"), 1)
        self.assertEqual(len(line.split()), 10)
        self.assertIn("http://x/a%20b%0A", line)

    def test_emptyPeerIsDash(self) -> None:
        """
        An empty peer and content type are written as C{-}.
        """
        self.log.logRequest("::1", "TCP_DENIED", 403, 0, "GET", "http://x/", "HIER_NONE", "", "")
        self.log.flush()
        self.assertTrue(self.file.getvalue().endswith(" HIER_NONE/- -\n"))

    def test_bufferedUntilTimer(self) -> None:
        """
        Lines are not written per request but by the flush timer once the
        service runs.
        """
        self.log.startService()
        self.log.logRequest("::1", "TCP_HIT", 200, 1, "GET", "http://x/", "HIER_NONE", "-")
        self.log.logRequest("::1", "TCP_HIT", 200, 1, "GET", "http://y/", "HIER_NONE", "-")
        self.assertEqual(self.file.getvalue(), "")
        self.clock.advance(FLUSH_INTERVAL)
        self.assertEqual(len(self.file.getvalue().splitlines()), 2)
        self.assertEqual(self.file.writes, 1)
        self.log.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_flushedAtStop(self) -> None:
        """
        Stopping the service writes what is still buffered.
        """
        self.log.startService()
        self.log.logICP("::1", "UDP_MISS", 40, "http://x/")
        self.log.stopService()
        self.assertIn("UDP_MISS/000", self.file.getvalue())

    def test_flushWhenFull(self) -> None:
        """
        A full buffer is written without waiting for the timer.
        """
        for i in range(MAX_BUFFERED):
            self.log.logICP("::1", "UDP_MISS", 40, f"http://x/{i}")
        self.assertEqual(len(self.file.getvalue().splitlines()), MAX_BUFFERED)

    def test_openedByPath(self) -> None:
        """
        Given a path, the log opens it for appending when started and closes
        it when stopped.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("old\n")
        log = AccessLog(path, reactor=self.clock)
        log.startService()
        log.logRequest("::1", "TCP_MISS", 200, 1, "GET", "http://x/", "HIER_DIRECT", "x")
        log.stopService()
        with open(path) as f:
            lines = f.read().splitlines()
        self.assertEqual(lines[0], "old")
        self.assertIn("TCP_MISS/200", lines[1])
