# -*- test-case-name: tests.test_accesslog -*-
"""
The access log, in Squid's native format, so operators can read it with the
tools they already have (calamaris, squid-analyzer, awk one-liners)::

    time.msec elapsed client code/status bytes method URL ident hierarchy/peer type

for example::

    1700000000.123     12 10.0.0.7 TCP_MISS/200 1234 GET http://example.com/ - HIER_DIRECT/example.com text/html
    1700000000.125      0 10.0.0.9 UDP_HIT/000 48 ICP_QUERY http://example.com/ - HIER_NONE/- -

Lines are buffered in memory and written by a timer once a second and when
the node stops: no file I/O per request.
"""

from __future__ import annotations

from typing import IO, Any, Optional, Union

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()

FLUSH_INTERVAL = 1.0
#: Flush early once this many lines are waiting.
MAX_BUFFERED = 2000


class AccessLog(Service):
    """
    A Squid-format access log.

    @ivar path: the file, when opened by path.
    """

    name = "access-log"  # type: ignore[assignment]

    def __init__(self, target: Union[str, IO[str]], reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self._reactor = reactor
        self.path: Optional[str] = target if isinstance(target, str) else None
        self._file: Optional[IO[str]] = None if isinstance(target, str) else target
        self._lines: list[str] = []
        self._loop: Optional[LoopingCall] = None

    def startService(self) -> None:
        Service.startService(self)
        if self._file is None and self.path is not None:
            self._file = open(self.path, "a", encoding="utf-8", buffering=1 << 16)
        loop = self._loop = LoopingCall(self.flush)
        loop.clock = self._reactor
        loop.start(FLUSH_INTERVAL, now=False)

    def stopService(self) -> None:
        Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self.flush()
        if self.path is not None and self._file is not None:
            self._file.close()
            self._file = None

    def _add(self, line: str) -> None:
        lines = self._lines
        lines.append(line)
        if len(lines) >= MAX_BUFFERED:
            self.flush()

    def flush(self) -> None:
        """
        Write what is buffered.
        """
        if not self._lines or self._file is None:
            return
        text = "".join(self._lines)
        self._lines = []
        try:
            self._file.write(text)
            self._file.flush()
        except OSError as e:
            log.error("cannot write the access log: {error}", error=e)

    def logRequest(
        self,
        client: str,
        code: str,
        status: int,
        size: int,
        method: str,
        url: str,
        hierarchy: str,
        peer: str,
        contentType: str = "-",
        elapsedMs: int = 0,
    ) -> None:
        """
        One HTTP request.

        @param client: the client's address.
        @param code: the Squid result code (C{TCP_HIT}, C{TCP_MISS}, ...).
        @param status: the HTTP status sent.
        @param size: body bytes sent.
        @param method: the request method.
        @param url: the request URL.
        @param hierarchy: the hierarchy code (C{HIER_DIRECT},
            C{TIMEOUT_FIRST_PARENT_MISS}, ...).
        @param peer: the host fetched from, or C{"-"}.
        @param contentType: the response's content type, or C{"-"}.
        @param elapsedMs: milliseconds the request took.
        """
        now = self._reactor.seconds()
        self._add(
            f"{now:.3f} {elapsedMs:6d} {client} {code}/{status:03d} {size} {method} "
            f"{_clean(url)} - {hierarchy}/{peer or '-'} {_clean(contentType) or '-'}\n"
        )

    def logICP(self, client: str, code: str, size: int, url: str) -> None:
        """
        One ICP reply we sent (Squid's C{log_icp_queries}).

        @param code: the Squid code (C{"UDP_HIT"}, C{"UDP_MISS"},
            C{"UDP_DENIED"}, C{"UDP_INVALID"}, C{"UDP_MISS_NOFETCH"}), or the
            reply opcode's name without the C{UDP_} prefix.
        @param size: the reply's size in bytes.
        """
        if not code.startswith("UDP_"):
            code = "UDP_" + code
        now = self._reactor.seconds()
        self._add(f"{now:.3f}      0 {client} {code}/000 {size} ICP_QUERY {_clean(url)} - HIER_NONE/- -\n")


def _clean(text: str) -> str:
    """
    Keep one field one word: escape white space and control characters.
    """
    if text.isprintable() and " " not in text:
        return text
    return "".join(c if c.isprintable() and c != " " else f"%{ord(c):02X}" for c in text)
