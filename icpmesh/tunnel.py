# -*- test-case-name: tests.test_tunnel -*-
"""
CONNECT tunnels (RFC 9110 section 9.3.6), for https through the proxy.

After access control has allowed a C{CONNECT host:port} request, the proxy
hands it to L{startTunnel}.  It connects to the target, answers C{200
Connection established}, and from then on copies bytes both ways between the
client's connection and the target's, with flow control in both directions.
By default only port 443 may be tunnelled (Squid's C{SSL_ports}); the
C{connect_ports} directive changes the list.

Tunnels are never cached and never involve ICP (Squid does not query
neighbours for CONNECT either).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

DEFAULT_CONNECT_PORTS = frozenset({443})


def parseAuthority(uri: bytes) -> Optional[tuple[str, int]]:
    """
    Parse a CONNECT target C{host:port} (C{[v6]:port} for IPv6).

    @return: C{(host, port)}, or C{None} when malformed.
    """
    try:
        text = uri.decode("ascii")
    except UnicodeDecodeError:
        return None
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            return None
        host, portText = text[1:close], text[close + 2 :]
    else:
        host, sep, portText = text.rpartition(":")
        if not sep or ":" in host:
            return None
    if not host or not portText.isdigit() or not 0 < int(portText) < 65536:
        return None
    if any(c in host for c in "/?#@ \t"):
        return None
    return host, int(portText)


class _TargetProtocol(Protocol):
    """
    The connection to the tunnel's target.
    """

    def __init__(self) -> None:
        self.peer: Optional[Any] = None  # the client's transport
        self.onLost: Optional[Callable[[], None]] = None

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.write(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.peer is not None:
            self.peer.loseConnection()
            self.peer = None
        if self.onLost is not None:
            self.onLost()


def startTunnel(
    request: Any,
    host: str,
    port: int,
    reactor: Any,
    connectTimeout: float = 30.0,
    onDone: Optional[Callable[[int, int], None]] = None,
) -> None:
    """
    Open a tunnel for an allowed CONNECT request.

    @param request: the C{twisted.web} request (its channel is taken over).
    @param host: target host.
    @param port: target port.
    @param onDone: called with C{(status, bytesFromTarget)} when the tunnel
        closes (or fails to open), for the access log.
    """
    endpoint = HostnameEndpoint(reactor, host, port, timeout=connectTimeout)
    counts = {"down": 0}

    def connected(target: _TargetProtocol) -> None:
        channel = request.channel
        if channel is None or request._disconnected:
            target.transport.loseConnection()
            return
        clientTransport = channel.transport
        # From here on the client's connection is raw bytes for the target.
        channel.setTimeout(None)
        channel._handlingRequest = False
        clientTransport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        target.peer = clientTransport

        def toTarget(data: bytes) -> None:
            target.transport.write(data)

        def clientLost(reason: Failure = None) -> None:  # type: ignore[assignment]
            if target.peer is not None:
                target.peer = None
                target.transport.loseConnection()

        original = channel.connectionLost

        def lost(reason: Failure) -> None:
            clientLost(reason)
            try:
                original(reason)
            except Exception:
                pass

        channel.dataReceived = toTarget
        channel.connectionLost = lost
        # Bytes the client sent early, buffered by the HTTP channel.
        early = b"".join(channel._dataBuffer)
        channel._dataBuffer = []
        if early:
            target.transport.write(early)
        # Flow control both ways: each side pauses the other.
        clientTransport.unregisterProducer()
        clientTransport.registerProducer(target.transport, True)
        target.transport.registerProducer(clientTransport, True)
        clientTransport.resumeProducing()

        def countingData(data: bytes, write: Callable[[bytes], None] = clientTransport.write) -> None:
            counts["down"] += len(data)
            if target.peer is not None:
                write(data)

        target.dataReceived = countingData  # type: ignore[method-assign]
        if onDone is not None:
            target.onLost = lambda: onDone(200, counts["down"])

    def failed(f: Failure) -> None:
        log.info("CONNECT {host}:{port} failed: {error}", host=host, port=port,
                 error=f.getErrorMessage())
        if request._disconnected:
            return
        body = b"<html><body><h1>502 Bad Gateway</h1><p>Cannot connect.</p></body></html>\n"
        request.setResponseCode(502, b"Bad Gateway")
        request.responseHeaders.setRawHeaders(b"content-type", [b"text/html"])
        request.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
        request.write(body)
        request.finish()
        if onDone is not None:
            onDone(502, 0)

    endpoint.connect(Factory.forProtocol(_TargetProtocol)).addCallbacks(connected, failed)
