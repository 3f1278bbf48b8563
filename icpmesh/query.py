# -*- test-case-name: tests.test_query -*-
"""
C{icpmesh-query}: ask an ICP cache about URLs, for diagnosis.

Usage::

    icpmesh-query [--bind ADDRESS] [--timeout SECONDS] [--src-rtt] [--hit-obj]
                  [--version 2|3] [--json] HOST:PORT URL [URL ...]

One ICP QUERY per URL is sent to HOST:PORT (an icpmesh node, Squid, or any
other ICP cache).  For each URL one line is printed: the URL, the reply
opcode, the option flags, the SRC_RTT data when present, the request number
and the round-trip time, or C{TIMEOUT} when nothing matching came back in
time.  The exit status is 0 when every URL got a reply, 1 otherwise and 2
for usage errors.

Squid ignores ICP datagrams whose source IP is its own, so when it is bound
to a specific address, query it from another one with C{--bind}, for
example C{--bind 127.0.0.2} for a Squid on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
from typing import IO, Any, NoReturn, Optional, Sequence

import attr
from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from icpmesh import icp

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_TIMEOUT",
    "QueryResult",
    "ICPQueryProtocol",
    "parseTarget",
    "formatResult",
    "resultToJSON",
    "makeParser",
    "runQueries",
    "main",
]

log = Logger()

DEFAULT_PORT = 3130
DEFAULT_TIMEOUT = 2.0

Address = tuple[str, int]


@attr.s(auto_attribs=True, slots=True)
class QueryResult:
    """
    The outcome of one query.

    @ivar url: the URL asked about.
    @ivar reqnum: the request number of the query.
    @ivar reply: the reply, or C{None} if none arrived (yet).
    @ivar rttMs: milliseconds from sending the query to receiving the reply.
    @ivar error: why the query could not be sent, if it could not.
    """

    url: str
    reqnum: int
    reply: Optional[icp.Message] = None
    rttMs: Optional[float] = None
    error: Optional[str] = None


def _normalizeHost(host: str) -> str:
    """
    Canonical text form of an IP address literal (so C{0:0::1} matches the
    C{::1} a reply arrives from); other strings are returned unchanged.
    """
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return socket.inet_ntop(family, socket.inet_pton(family, host))
        except (OSError, ValueError):
            continue
    return host


def _safeInetPton(family: int, host: str) -> bool:
    try:
        socket.inet_pton(family, host)
    except (OSError, ValueError):
        return False
    return True


class ICPQueryProtocol(DatagramProtocol):
    """
    Send one ICP QUERY per URL to one cache and collect the replies.

    All queries are sent when the protocol starts; L{done} fires with
    L{results} once every query has a reply or C{timeout} seconds have
    passed.  A reply is accepted only when it comes from C{target} (IP and
    port), and its request number is one of ours and its URL is the query's.
    ERR replies only need the request number: caches echo a bad URL
    %-escaped, or not at all when the framing was broken.  Anything else is
    counted in L{ignored}.

    @ivar results: one L{QueryResult} per URL, in order.
    @ivar done: fires with L{results} when the round ends.
    @ivar ignored: how many datagrams were not accepted as replies.
    """

    def __init__(
        self,
        target: Address,
        urls: Sequence[str],
        timeout: float = DEFAULT_TIMEOUT,
        options: int = 0,
        version: int = icp.VERSION_2,
        firstReqnum: Optional[int] = None,
        reactor: Any = None,
    ) -> None:
        """
        @param target: the cache's (IP address, ICP port).
        @param urls: the URLs to ask about.
        @param timeout: seconds to wait for replies.
        @param options: option flags for every query.
        @param version: ICP version byte of the queries (2, or 3 for tests
            of caches that accept it; Squid 5.7 crashes on version 3).
        @param firstReqnum: request number of the first query (the others
            follow); random by default, so that stray replies to an earlier
            run are not taken for replies.
        @param reactor: provides C{seconds} and C{callLater}.
        """
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self._reactor = reactor
        self.target = (_normalizeHost(target[0]), target[1])
        self.timeout = timeout
        self.options = options
        self.version = version
        if firstReqnum is None:
            firstReqnum = random.randint(1, 0x7FFFFFFF)
        self.results = [
            QueryResult(url, (firstReqnum + i) & 0xFFFFFFFF) for i, url in enumerate(urls)
        ]
        self._byReqnum = {r.reqnum: r for r in self.results}
        self._sentAt: dict[int, float] = {}
        self._outstanding = len(self.results)
        self._timeoutCall: Any = None
        self.ignored = 0
        self.done: Deferred[list[QueryResult]] = Deferred()

    def startProtocol(self) -> None:
        """
        Send every query and start the timeout.
        """
        transport: Any = self.transport
        for result in self.results:
            message = icp.Message(
                icp.Opcode.QUERY,
                result.reqnum,
                result.url,
                version=self.version,
                options=self.options,
            )
            data = icp.encode(message)
            self._sentAt[result.reqnum] = self._reactor.seconds()
            try:
                transport.write(data, self.target)
            except OSError as e:
                result.error = str(e)
                self._outstanding -= 1
        if self._outstanding <= 0:
            self._finish()
        else:
            self._timeoutCall = self._reactor.callLater(self.timeout, self._finish)

    def datagramReceived(self, data: bytes, address: Any) -> None:
        """
        Match a datagram to one of our queries.
        """
        if (_normalizeHost(address[0]), address[1]) != self.target:
            self.ignored += 1
            return
        try:
            message = icp.decode(data)
        except icp.DecodeError as e:
            log.debug("undecodable datagram from {address}: {error}", address=address, error=e)
            self.ignored += 1
            return
        result = self._byReqnum.get(message.reqnum)
        if (
            result is None
            or result.reply is not None
            or message.opcode not in icp.REPLY_OPCODES
            or (message.url != result.url and message.opcode != icp.Opcode.ERR)
        ):
            self.ignored += 1
            return
        result.reply = message
        result.rttMs = (self._reactor.seconds() - self._sentAt[message.reqnum]) * 1000.0
        self._outstanding -= 1
        if self._outstanding == 0:
            self._finish()

    def _finish(self) -> None:
        if self.done.called:
            return
        if self._timeoutCall is not None and self._timeoutCall.active():
            self._timeoutCall.cancel()
        self.done.callback(self.results)

    def stopProtocol(self) -> None:
        """
        End the round early if the port goes away.
        """
        self._finish()


def parseTarget(text: str, defaultPort: int = DEFAULT_PORT) -> Address:
    """
    Parse C{HOST:PORT}, C{[IPV6]:PORT}, C{HOST}, C{[IPV6]} or a bare IPv6
    address.

    @param text: the target as typed.
    @param defaultPort: port used when none is given.
    @return: C{(host, port)}, brackets removed.
    @raise ValueError: if it cannot be parsed or the port is out of range.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty address")
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"missing ']' in {text!r}")
        host, rest = text[1:close], text[close + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"junk after ']' in {text!r}")
        portText = rest[1:] if rest else None
        if not _safeInetPton(socket.AF_INET6, host):
            raise ValueError(f"not an IPv6 address: {host!r}")
    elif text.count(":") > 1:
        host, portText = text, None
        if not _safeInetPton(socket.AF_INET6, host):
            raise ValueError(f"not an IPv6 address: {host!r} (write [ADDRESS]:PORT)")
    else:
        host, colon, portText = text.partition(":")
        if not colon:
            portText = None
        if not host:
            raise ValueError(f"missing host in {text!r}")
    if portText is None:
        return host, defaultPort
    if not portText.isdigit() or not 0 < int(portText) < 65536:
        raise ValueError(f"bad port {portText!r}")
    return host, int(portText)


def _flagsText(options: int) -> str:
    names = icp.flagNames(options)
    return "|".join(names) if names else "0"


def formatResult(result: QueryResult, timeout: float = DEFAULT_TIMEOUT) -> str:
    """
    One human-readable line for a result, for example::

        http://example.com/ HIT flags=0 reqnum=17 rtt=0.41ms

    @param result: the result.
    @param timeout: the timeout used, for the C{TIMEOUT} line.
    @return: the line, without newline.
    """
    reply = result.reply
    if reply is None:
        if result.error is not None:
            return f"{result.url} ERROR reqnum={result.reqnum} ({result.error})"
        return f"{result.url} TIMEOUT reqnum={result.reqnum} (no reply in {timeout:g}s)"
    parts = [result.url, icp.opcodeName(reply.opcode), f"flags={_flagsText(reply.options)}"]
    if reply.options & icp.FLAG_SRC_RTT:
        rtt, hops = icp.parseSrcRtt(reply.optionData)
        parts.append(f"src_rtt={rtt}ms hops={hops}")
    parts.append(f"reqnum={reply.reqnum}")
    parts.append(f"rtt={result.rttMs:.2f}ms")
    if reply.version != icp.VERSION_2:
        parts.append(f"version={reply.version}")
    if reply.url != result.url:
        parts.append(f"echoed={reply.url!r}")
    return " ".join(parts)


def resultToJSON(result: QueryResult) -> dict[str, Any]:
    """
    A JSON-serialisable form of a result.

    @param result: the result.
    @return: a dict with C{url}, C{reqnum}, C{status} (the opcode name,
        C{TIMEOUT} or C{ERROR}) and, for replies, the reply's fields.
    """
    reply = result.reply
    out: dict[str, Any] = {"url": result.url, "reqnum": result.reqnum}
    if reply is None:
        out["status"] = "TIMEOUT" if result.error is None else "ERROR"
        if result.error is not None:
            out["error"] = result.error
        return out
    out.update(
        status=icp.opcodeName(reply.opcode),
        opcode=int(reply.opcode),
        version=reply.version,
        flags=icp.flagNames(reply.options),
        options=reply.options,
        optionData=reply.optionData,
        echoedUrl=reply.url,
        rttMs=round(result.rttMs or 0.0, 3),
    )
    if reply.options & icp.FLAG_SRC_RTT:
        rtt, hops = icp.parseSrcRtt(reply.optionData)
        out["srcRtt"] = {"rttMs": rtt, "hops": hops}
    return out


def makeParser() -> argparse.ArgumentParser:
    """
    The command-line parser of C{icpmesh-query}.
    """
    parser = argparse.ArgumentParser(
        prog="icpmesh-query",
        description="Send ICP (RFC 2186) queries to a cache and print its replies.",
        epilog=(
            "Exit status: 0 if every URL got a reply, 1 otherwise, 2 for usage errors. "
            "Squid ignores queries from its own IP address: query a Squid bound to "
            "127.0.0.1 with --bind 127.0.0.2."
        ),
    )
    parser.add_argument("target", metavar="HOST:PORT", help="the cache's ICP address (port 3130 if omitted; [::1]:3130 for IPv6)")
    parser.add_argument("urls", metavar="URL", nargs="+", help="URLs to ask about")
    parser.add_argument("--bind", metavar="ADDRESS", default=None, help="source address to send from")
    parser.add_argument(
        "--timeout", metavar="SECONDS", type=float, default=DEFAULT_TIMEOUT,
        help=f"how long to wait for replies (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument("--src-rtt", action="store_true", help="set the SRC_RTT flag (ask for the cache's RTT to the origin)")
    parser.add_argument("--hit-obj", action="store_true", help="set the HIT_OBJ flag (Squid and icpmesh ignore it)")
    parser.add_argument(
        "--version", type=int, choices=(2, 3), default=2, dest="icpVersion",
        help="ICP version of the queries (default 2). WARNING: Squid 5.7 crashes on ICPv3 queries (CVE-2026-32748); never send version 3 to a production Squid.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text lines")
    return parser


async def _resolve(reactor: Any, host: str, port: int) -> Address:
    """
    Resolve a host name off the reactor thread; IP literals pass through.
    """
    if _safeInetPton(socket.AF_INET, host) or _safeInetPton(socket.AF_INET6, host):
        return host, port
    from twisted.internet.threads import deferToThreadPool

    infos = await deferToThreadPool(
        reactor, reactor.getThreadPool(), socket.getaddrinfo, host, port, 0, socket.SOCK_DGRAM
    )
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    family, _, _, _, sockaddr = infos[0]
    return str(sockaddr[0]), port


async def runQueries(
    reactor: Any,
    args: argparse.Namespace,
    stdout: Optional[IO[str]] = None,
    stderr: Optional[IO[str]] = None,
) -> int:
    """
    Resolve, bind, query, print; the body of L{main}.

    @param reactor: provides C{listenUDP}, C{callLater}, C{seconds}.
    @param args: parsed options (see L{makeParser}).
    @param stdout: where results go (default C{sys.stdout}).
    @param stderr: where problems go (default C{sys.stderr}).
    @return: the exit status.
    """
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    host, port = parseTarget(args.target)
    try:
        address = await _resolve(reactor, host, port)
    except OSError as e:
        print(f"icpmesh-query: {e}", file=err)
        return 2
    ipv6 = ":" in address[0]
    bind = args.bind
    if bind is None:
        bind = "::" if ipv6 else ""
    elif (":" in bind) != ipv6:
        print(f"icpmesh-query: --bind {bind} and {address[0]} are not the same address family", file=err)
        return 2
    options = (icp.FLAG_SRC_RTT if args.src_rtt else 0) | (icp.FLAG_HIT_OBJ if args.hit_obj else 0)
    protocol = ICPQueryProtocol(
        address, args.urls, timeout=args.timeout, options=options, version=args.icpVersion, reactor=reactor
    )
    try:
        listening = reactor.listenUDP(0, protocol, interface=bind, maxPacketSize=icp.MAX_MESSAGE_LENGTH + 1)
    except Exception as e:
        print(f"icpmesh-query: cannot bind to {bind or '0.0.0.0'}: {e}", file=err)
        return 2
    try:
        results = await protocol.done
    finally:
        stopped = listening.stopListening()
        if stopped is not None:
            await stopped
    if args.json:
        document = {
            "target": f"[{address[0]}]:{address[1]}" if ipv6 else f"{address[0]}:{address[1]}",
            "results": [resultToJSON(r) for r in results],
            "ignored": protocol.ignored,
        }
        print(json.dumps(document, indent=2), file=out)
    else:
        for result in results:
            print(formatResult(result, args.timeout), file=out)
        if protocol.ignored:
            print(f"icpmesh-query: ignored {protocol.ignored} unmatched datagram(s)", file=err)
    return 0 if all(r.reply is not None for r in results) else 1


def _checkArgs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        parseTarget(args.target)
    except ValueError as e:
        parser.error(f"bad HOST:PORT {args.target!r}: {e}")
    if not args.timeout > 0:
        parser.error("--timeout must be positive")
    for url in args.urls:
        try:
            icp.encode(icp.query(0, url))
        except ValueError as e:
            parser.error(f"cannot send URL {url!r}: {e}")


def main(argv: Optional[Sequence[str]] = None) -> NoReturn:
    """
    Entry point of C{icpmesh-query} and C{python -m icpmesh.query}.

    @param argv: arguments without the program name (default C{sys.argv[1:]}).
    @raise SystemExit: always, with the exit status.
    """
    from twisted.internet.task import react

    parser = makeParser()
    args = parser.parse_args(argv)  # exits 2 on usage errors
    _checkArgs(parser, args)

    async def _main(reactor: Any) -> None:
        status = await runQueries(reactor, args)
        if status:
            raise SystemExit(status)

    react(_main)


if __name__ == "__main__":  # pragma: no cover
    main()
