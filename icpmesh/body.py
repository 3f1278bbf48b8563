# -*- test-case-name: tests.test_body -*-
"""
Request bodies streamed upstream as they arrive.

C{twisted.web} normally reads a whole request body (into memory, or a
temporary file when it is large) before it calls the resource.  A proxy
would then hold every upload whole and start sending it upstream only at
its end.  L{StreamingRequest} (the request class of
L{icpmesh.service.ProxySite}) instead hands a request with a body to the
resource as soon as its header section is complete, and feeds the body,
chunk by chunk, to a L{RequestBodyStream}: the L{IBodyProducer} the proxy
gives the upstream L{twisted.web.client.Agent}.

Flow control works both ways: while the upstream connection is full (or
not yet connected) at most L{HIGH_WATER} bytes are buffered, and the
client's transport is paused beyond that.

The next request on a persistent connection is parsed only once this
one's body has been read to its end.  When the response is finished
before that (an error answered early, an upstream that answered without
reading everything), the rest of the body is read and dropped, up to
L{DRAIN_LIMIT} bytes; the connection is closed instead when the rest is
longer, when the request was refused as too large, or when the client
waits for C{100 Continue} and was never told to send its body.

GET, HEAD and CONNECT requests, requests without a body, and sites whose
resource does not set C{streamsRequestBodies} are handled exactly as by
L{twisted.web.server.Request}.
"""

from __future__ import annotations

import io
from collections import deque
from typing import Any, Callable, Optional
from urllib.parse import parse_qs

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from twisted.web.server import Request
from zope.interface import implementer

log = Logger()

#: Body bytes held while the upstream cannot take them; beyond this the
#: client's transport is paused.
HIGH_WATER = 64 * 1024

#: Body bytes held at most, whatever happens: a client that goes on
#: sending although its transport was paused has its connection closed
#: (and the upstream request aborted) beyond this.
BUFFER_LIMIT = 16 * HIGH_WATER

#: Body bytes read and dropped after the response was finished early; a
#: longer rest (by Content-Length, or as a chunked body goes on) gets the
#: connection closed instead.
DRAIN_LIMIT = 1024 * 1024

#: Methods whose bodies are read whole first, as twisted.web does.
_BUFFERED_METHODS = frozenset({b"GET", b"HEAD", b"CONNECT"})


class BodyAborted(Exception):
    """
    The request body will not be sent in full: the client went away, or
    the body broke a limit.
    """


@implementer(IBodyProducer)
class RequestBodyStream:
    """
    A request body as it arrives from the client, as an L{IBodyProducer}
    for the upstream agent.

    It can be started again with another consumer (another route) as long
    as no byte has been written to a consumer (L{replayable}); after that
    the body is gone.

    @ivar length: the body's length from C{Content-Length}, or
        C{UNKNOWN_LENGTH} (sent chunked).
    @ivar received: body bytes received from the client so far.
    @ivar sent: body bytes written to an upstream consumer so far.
    @ivar complete: the whole body has been received.
    @ivar clientGone: the client disconnected before the body was complete.
    @ivar answered: the upstream response has arrived (set by the proxy).
    """

    def __init__(self, request: "StreamingRequest", length: Optional[int]) -> None:
        """
        @param request: the request whose body this is.
        @param length: the body's length, or C{None} when it is chunked.
        """
        self._request = request
        self.length: Any = UNKNOWN_LENGTH if length is None else length
        self.received = 0
        self.sent = 0
        self.complete = False
        self.clientGone = False
        self.answered = False
        self._buffer: deque[bytes] = deque()
        self._buffered = 0
        self._consumer: Any = None
        self._owner: Any = None
        self._deferred: Optional[Deferred[None]] = None
        self._paused = False
        self._dead = False
        self._failure: Optional[Failure] = None

    # -- IBodyProducer -------------------------------------------------------

    def startProducing(self, consumer: Any, owner: Any = None) -> "Deferred[None]":
        """
        Write the body to C{consumer}: what is buffered at once, the rest
        as it arrives.

        @param owner: the L{RouteBody} this is started through, if any:
            only its calls pause, resume or stop the body from then on.
        """
        if self._failure is not None:
            return fail(self._failure)
        if self._dead or (self._consumer is not None and self.sent):
            return fail(BodyAborted("the request body was already sent elsewhere"))
        # A consumer still here with nothing written to it is stale: its
        # request failed before it stopped us (twisted.web's client fails
        # the request first, then calls stopProducing), and the next route
        # takes the body over.
        self._consumer = consumer
        self._owner = owner
        self._paused = False
        self._deferred = Deferred(lambda d: self._detachConsumer())
        deferred = self._deferred
        self._request.bodyWanted()
        self._flush()
        return deferred

    def pauseProducing(self, owner: Any = None) -> None:
        """
        The upstream connection is full: hold further chunks.
        """
        if owner is self._owner:
            self._paused = True

    def resumeProducing(self, owner: Any = None) -> None:
        """
        The upstream connection can take more.
        """
        if owner is self._owner:
            self._paused = False
            self._flush()

    def stopProducing(self, owner: Any = None) -> None:
        """
        The upstream connection went away.  Without a byte written the body
        may still go to another route; otherwise it is dropped.
        """
        if owner is self._owner:
            self._detachConsumer()

    def producer(self) -> "RouteBody":
        """
        An L{IBodyProducer} for one upstream request: calls from a request
        that was given up (another route took the body over) are ignored.
        """
        return RouteBody(self)

    # -- what the proxy asks -------------------------------------------------

    def replayable(self) -> bool:
        """
        Whether the body can still be given to another consumer: not a byte
        of it went out and it was not aborted.
        """
        return self.sent == 0 and not self._dead and self._failure is None

    def abort(self, reason: Failure) -> None:
        """
        Give up on the body: the upstream request fails with C{reason} (at
        once if it is being sent, when it starts otherwise) and the rest of
        the body is dropped.
        """
        self._failure = reason
        self._drop()
        deferred, self._deferred = self._deferred, None
        self._consumer = self._owner = None
        if deferred is not None:
            deferred.errback(reason)

    # -- what the request tells ----------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """
        A chunk of the body arrived from the client.
        """
        self.received += len(data)
        if self._dead:
            return
        if self._consumer is not None and not self._paused and not self._buffer:
            self._write(data)
            return
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered > BUFFER_LIMIT:
            log.warn("request body: {buffered} bytes held for the upstream, over {limit}: "
                     "closing the client's connection", buffered=self._buffered, limit=BUFFER_LIMIT)
            self.clientGone = True
            self.abort(Failure(BodyAborted(f"more than {BUFFER_LIMIT} request body bytes held")))
            self._request.dropClient()
        elif self._buffered > HIGH_WATER:
            self._request.pauseClient()

    def bodyComplete(self) -> None:
        """
        The client sent the whole body.
        """
        self.complete = True
        self._flush()

    def clientLost(self, reason: Failure) -> None:
        """
        The client went away before the body was complete.
        """
        if self.complete:
            return
        self.clientGone = True
        if self.answered:
            # The upstream already answered: its connection is given up
            # once the response ends; failing the request now would only
            # be logged as an error by the client protocol.
            self.detach()
        else:
            self.abort(reason)

    def detach(self) -> None:
        """
        The response is finished: nobody wants the rest of the body.
        """
        self._detachConsumer()
        self._drop()

    # -- internals -----------------------------------------------------------

    def _detachConsumer(self) -> None:
        self._consumer = None
        self._owner = None
        self._deferred = None
        if self.sent:
            self._drop()

    def _drop(self) -> None:
        self._dead = True
        self._buffer.clear()
        self._buffered = 0
        self._request.resumeClient()

    def _write(self, data: bytes) -> None:
        self.sent += len(data)
        try:
            self._consumer.write(data)
        except Exception:
            # The agent's consumer refuses more (it should have stopped us
            # first): give the body up rather than let the client's
            # connection see the error.
            log.failure("writing a request body upstream failed")
            self.abort(Failure())

    def _flush(self) -> None:
        while self._buffer and self._consumer is not None and not self._paused:
            data = self._buffer.popleft()
            self._buffered -= len(data)
            self._write(data)
        if self._buffered <= HIGH_WATER // 2:
            self._request.resumeClient()
        if self.complete and not self._buffer and self._deferred is not None:
            deferred, self._deferred = self._deferred, None
            self._consumer = None
            deferred.callback(None)


@implementer(IBodyProducer)
class RouteBody:
    """
    A L{RequestBodyStream} as given to one upstream request (one route).

    When a route fails before a byte of the body went out, the next route
    takes the body over; the failed request may still call
    C{stopProducing} afterwards (twisted.web's client does, right after
    failing the request), which must not stop the body going to the next
    route.

    @ivar stream: the L{RequestBodyStream}.
    """

    def __init__(self, stream: RequestBodyStream) -> None:
        self.stream = stream
        self.length = stream.length

    def startProducing(self, consumer: Any) -> "Deferred[None]":
        return self.stream.startProducing(consumer, self)

    def pauseProducing(self) -> None:
        self.stream.pauseProducing(self)

    def resumeProducing(self) -> None:
        self.stream.resumeProducing(self)

    def stopProducing(self) -> None:
        self.stream.stopProducing(self)


class StreamingRequest(Request):
    """
    A L{twisted.web.server.Request} that is rendered as soon as its header
    section is complete when it has a body (and is not GET, HEAD or
    CONNECT, and the site's resource says C{streamsRequestBodies}); the
    body then arrives in L{bodyStream}.

    @ivar bodyStream: the L{RequestBodyStream}, or C{None} when the body
        is read whole first (then C{content} holds it, as usual).
    @ivar bodyLimit: largest body accepted, checked as bytes arrive, or
        C{None}; set by the resource.
    @ivar onBodyTooLarge: called once when the body grows past
        C{bodyLimit}; set by the resource.
    @ivar bodyRefused: the body grew past C{bodyLimit} and was answered
        C{413} (rather than the connection closed); set by the resource.
    """

    bodyStream: Optional[RequestBodyStream] = None
    bodyLimit: Optional[int] = None
    onBodyTooLarge: Optional[Callable[[], None]] = None
    bodyRefused = False
    _bodyDone = False
    _cleanupPending = False
    _expectContinue = False
    _continued = False
    _closing = False
    _clientPaused = False
    _overLimit = False
    _closed = False
    _drainFrom = 0

    def gotLength(self, length: Optional[int]) -> None:
        channel = self.channel
        command = getattr(channel, "_command", None)
        resource = getattr(getattr(channel, "site", None), "resource", None)
        if (
            length == 0
            or not isinstance(command, bytes)
            or command.upper() in _BUFFERED_METHODS
            or not getattr(resource, "streamsRequestBodies", False)
        ):
            Request.gotLength(self, length)
            return
        version = channel._version
        expect = self.requestHeaders.getRawHeaders(b"expect")
        if expect and expect[0].lower() == b"100-continue" and version == b"HTTP/1.1":
            # twisted.web would answer 100 Continue right after this method
            # returns, before the resource has looked at the request; we
            # answer it when the body is wanted upstream.
            self._expectContinue = True
            self.requestHeaders.removeHeader(b"expect")
        self.bodyStream = RequestBodyStream(self, length)
        # The body goes upstream, never here.
        self.content = io.BytesIO()
        self.method, self.uri, self.clientproto = command, channel._path, version
        self.args = {}
        self.path, _, query = self.uri.partition(b"?")
        if query:
            self.args = parse_qs(query, 1)
        self.process()

    def handleContentChunk(self, data: bytes) -> None:
        stream = self.bodyStream
        if stream is None:
            Request.handleContentChunk(self, data)
            return
        limit = self.bodyLimit
        if limit is not None and not self._overLimit and stream.received + len(data) > limit:
            # Checked before the chunk goes anywhere: it is never sent.
            self._overLimit = True
            if self.onBodyTooLarge is not None:
                self.onBodyTooLarge()
        stream.dataReceived(data)
        if self._cleanupPending and stream.received - self._drainFrom > DRAIN_LIMIT:
            self._close()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        stream = self.bodyStream
        if stream is None:
            Request.requestReceived(self, command, path, version)
            return
        # The body is complete (the request was processed at its headers).
        self._bodyDone = True
        stream.bodyComplete()
        if self._cleanupPending:
            self._cleanupPending = False
            Request._cleanup(self)

    def write(self, data: bytes) -> None:
        if not self.startedWriting and self.bodyStream is not None and not self._bodyDone:
            if (self._expectContinue and not self._continued) or self.code == 413:
                # The client must not send (the rest of) its body.
                self._closing = True
                self.responseHeaders.setRawHeaders(b"connection", [b"close"])
        Request.write(self, data)

    def _cleanup(self) -> None:
        stream = self.bodyStream
        if stream is None or self._bodyDone:
            Request._cleanup(self)
            return
        # The response is complete before the body: read and drop the rest
        # (the next request must not be parsed from it), or close.
        self._cleanupPending = True
        self._drainFrom = stream.received
        stream.detach()
        if self._closing or (
            isinstance(stream.length, int) and stream.length - stream.received > DRAIN_LIMIT
        ):
            self._close()
        else:
            self.resumeClient()

    def connectionLost(self, reason: Failure) -> None:
        if self._cleanupPending:
            # The response was complete; only the rest of the body is lost.
            notifications, self.notifications = self.notifications, []
            for d in notifications:
                d.callback(None)
        Request.connectionLost(self, reason)
        if self.bodyStream is not None and not self._bodyDone:
            self.bodyStream.clientLost(reason)

    # -- for the body stream -------------------------------------------------

    def bodyWanted(self) -> None:
        """
        The body is about to go upstream: tell a client waiting for
        C{100 Continue} to send it.
        """
        if self._expectContinue and not self._continued and not self.startedWriting:
            self._continued = True
            channel = self.channel
            if channel is not None and channel.transport is not None:
                channel.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def pauseClient(self) -> None:
        """
        Stop reading from the client until L{resumeClient}.  (Asked again
        for every chunk over the mark: the channel may have resumed the
        transport for its own reasons.)
        """
        transport = self._clientTransport()
        if transport is not None:
            self._clientPaused = True
            transport.pauseProducing()

    def resumeClient(self) -> None:
        """
        Read from the client again (unless the channel keeps the transport
        paused because the client does not read its responses: it resumes
        it itself when they drain).
        """
        transport = self._clientTransport()
        if self._clientPaused and transport is not None:
            self._clientPaused = False
            if not getattr(self.channel, "_waitingForTransport", False):
                transport.resumeProducing()

    @property
    def holdsClient(self) -> bool:
        """
        Whether the body stream wants the client's transport paused.
        """
        return self._clientPaused

    def dropClient(self) -> None:
        """
        Abort the client's connection: no more of the body is read, and a
        response begun is not finished.
        """
        channel = self.channel
        self._closing = True
        if self._closed or channel is None or channel.transport is None:
            return
        self._closed = True
        channel.persistent = False
        channel.transport.abortConnection()

    def _clientTransport(self) -> Any:
        channel = self.channel
        if channel is None or self._closed:
            return None
        return channel.transport

    def _close(self) -> None:
        """
        Close the connection after the response: the rest of the body is
        not read, and no further request is parsed.
        """
        self._closing = True
        channel = self.channel
        if self._closed or channel is None:
            return
        self._closed = True
        channel.persistent = False
        channel.loseConnection()


class StreamingChannel(HTTPChannel):
    """
    The HTTP/1.1 channel for L{StreamingRequest}s.

    It differs from L{HTTPChannel} in two ways while a request body is
    streamed:

      - when the client's socket drains (our responses were written),
        C{HTTPChannel} would resume reading from the client; this one
        leaves the transport paused while the body stream holds it paused
        (L{StreamingRequest.holdsClient}), so at most about
        L{HIGH_WATER} bytes are buffered;

      - a malformed body (a bad chunk size, say) found after the response
        was started gets the connection aborted: C{HTTPChannel} would write
        a C{400} status line into the middle of the response body, which a
        client could read as part of it.  Counted in C{site.counters}
        (C{malformedBodyAborted}) when the site has counters.
    """

    def resumeProducing(self) -> None:
        if any(getattr(request, "holdsClient", False) for request in self.requests):
            self._waitingForTransport = False
            if self._requestProducer is not None:
                self._requestProducer.resumeProducing()
            return
        HTTPChannel.resumeProducing(self)

    def _respondToBadRequestAndDisconnect(self) -> None:
        if any(request.startedWriting and not request.finished for request in self.requests):
            log.warn("malformed request body from {peer} after the response was started: "
                     "aborting the connection", peer=self.transport.getPeer())
            counters = getattr(getattr(self, "site", None), "counters", None)
            if counters is not None:
                counters["malformedBodyAborted"] += 1
            self.persistent = False
            self.transport.abortConnection()
            return
        HTTPChannel._respondToBadRequestAndDisconnect(self)


    def lineLengthExceeded(self, line: bytes) -> None:
        """
        A request line or header line longer than C{MAX_LENGTH}: answer
        C{431} and close, where C{LineReceiver} would close without a word
        (unless an earlier response on this connection is still going out).
        """
        self.persistent = False
        # The last request is the one being read; earlier ones may still
        # be answering.
        if not any(not request.finished for request in self.requests[:-1]):
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n"
                b"Content-Length: 0\r\n\r\n"
            )
        self.loseConnection()


def streamingChannelFactory(factory: Any) -> _GenericHTTPChannelProtocol:
    """
    A C{protocol} for a L{twisted.web.server.Site}: as twisted.web's own
    (HTTP/1.1, or HTTP/2 when negotiated), with a L{StreamingChannel} for
    HTTP/1.1.
    """
    return _GenericHTTPChannelProtocol(StreamingChannel())
