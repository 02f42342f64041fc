"""
The site and channel every listener serves: body limits applied before a
byte is read, JSON answers to malformed or oversized requests, a header
timeout, and a graceful stop that lets answers in flight reach their
clients.
"""

from __future__ import annotations

import itertools
import os
import re
import tempfile
import time
from io import BytesIO
from typing import Any, Callable

from twisted.internet import defer, protocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server

from plexagent.http.responses import JSON_CONTENT_TYPE, encode_json, error_document

log = Logger()


class _LimitedContent:
    """
    A request-body sink that stops storing past ``limit`` bytes.

    Small bodies stay in memory, larger ones spill to a temporary file; past
    the limit the rest of the body is counted and discarded, so an oversized
    upload costs neither memory nor disk.
    """

    _SPILL = 256 * 1024

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.received = 0
        self.exceeded = False
        self._file: Any = BytesIO()
        self._spilled = False

    def write(self, data: bytes) -> None:
        self.received += len(data)
        if self.exceeded:
            return
        if self.received > self.limit:
            self.exceeded = True
            self._file.close()
            self._file = BytesIO()
            return
        if not self._spilled and self.received > self._SPILL:
            spill = tempfile.TemporaryFile()
            spill.write(self._file.getvalue())
            self._file = spill
            self._spilled = True
        self._file.write(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def read(self, size: int = -1) -> bytes:
        return self._file.read(size)

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        self._file.close()


class DiscardingContent:
    """
    A body sink that keeps nothing, and the file-like base of sinks that
    pass the body on as it arrives.
    """

    exceeded = False

    def write(self, data: bytes) -> None:
        pass

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def read(self, size: int = -1) -> bytes:
        return b""

    def tell(self) -> int:
        return 0

    def close(self) -> None:
        pass


class UnreadBody(DiscardingContent):
    """
    The sink of a request answered before its body is read: its declared
    length is over the route's limit (``exceeded``), or the listener's
    policy refused it. The channel reads none of the body, answers at once
    and then closes the connection (``PlexChannel``).
    """

    answer_before_body = True

    def __init__(self, exceeded: bool = False) -> None:
        self.exceeded = exceeded


_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")
_request_ids = (f"{os.getpid():x}-{n:x}" for n in itertools.count(1))


class RequestLog:
    """
    A site observer that logs each finished request as structured fields
    (request id, listener, method, route pattern, status, duration), never
    the URL's query or any header: nothing credential-bearing.
    """

    def __init__(self, listener: str) -> None:
        self.listener = listener

    def __call__(self, request: Any, seconds: float) -> None:
        log.info(
            "{method} {route} {status} {duration_ms}ms",
            request_id=request.request_id,
            listener=self.listener,
            method=request.method.decode("ascii", "replace"),
            route=getattr(request, "plexagent_route", None) or "(unrouted)",
            status=request.code,
            duration_ms=round(seconds * 1000.0, 3),
        )


def chain_observers(*observers: Any) -> Any:
    """One site observer calling each of ``observers`` (None ones are skipped)."""
    present = [o for o in observers if o is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]

    def observe(request: Any, seconds: float) -> None:
        for observer in present:
            observer(request, seconds)

    return observe


#: A hook that may give a request its own body sink (for streaming routes).
#: Called as ``factory(request, method, path, length)``; returns a file-like
#: object with ``write`` or None to use the default limited sink.
ContentFactory = Callable[[Any, bytes, bytes, "int | None"], Any]

#: ``limits(method, path)``: the body limit of the route a request line
#: names (``path`` without its query), or None for the site's default.
BodyLimits = Callable[[bytes, bytes], "int | None"]


def origin_form(target: bytes) -> bytes:
    """
    The path and query of a request target: a server must accept the
    absolute form (``http://host/path?q``, what a client talking to a proxy
    sends) and route it by its path (RFC 9112, section 3.2.2).
    """
    lowered = target[:8].lower()
    if not (lowered.startswith(b"http://") or lowered.startswith(b"https://")):
        return target
    rest = target.split(b"//", 1)[1]
    ends = [i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0]
    if not ends:
        return b"/"
    tail = rest[min(ends):]
    return tail if tail.startswith(b"/") else b"/" + tail


class PlexRequest(server.Request):
    """
    A Request whose body is bounded, which its Site can count, and which
    never answers with one of twisted.web's HTML pages.
    """

    # A PlexSite's channel and a body sink of ours (typed loosely on purpose:
    # twisted.web declares them narrower than what it actually holds).
    channel: Any
    content: Any

    #: the site that processes this request (set when processing begins)
    _plex_site: Any = None
    #: whether the site's observer is to hear of this request when it finishes
    _observed = False
    #: the body limit that applied to this request
    body_limit: int | None = None

    def gotLength(self, length: int | None) -> None:
        # Called once the headers are in, before any byte of the body: the
        # channel knows the request line, so the route's limit applies now.
        site = self.channel.site
        method = getattr(self.channel, "_command", b"")
        path = origin_form(getattr(self.channel, "_path", b""))
        limit = self.body_limit = site.body_limit(method, path)
        if site.content_factory is not None:
            # A streaming route's sink bounds its body itself.
            sink = site.content_factory(self, method, path, length)
            if sink is not None:
                self.content = sink
                return
        if length is not None and length > limit:
            # Answer 413 without reading (or storing) a byte of the body.
            self.content = UnreadBody(exceeded=True)
            return
        # A chunked body (no length) is counted as it comes: past the limit
        # nothing more is kept, and the answer is 413.
        self.content = _LimitedContent(limit)

    def handleContentChunk(self, data: bytes) -> None:
        self.content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        super().requestReceived(command, origin_form(path), version)

    #: when processing began (``time.perf_counter``), for the site's observer
    _plex_started = 0.0

    _request_id: str | None = None

    @property
    def request_id(self) -> str:
        """The client's ``X-Request-Id`` when sane (and echoed back), else made up on first use."""
        if self._request_id is None:
            self._request_id = next(_request_ids)
        return self._request_id

    def process(self) -> None:
        site = self.channel.site
        self._plex_site = site
        if site.observer is not None:
            self._observed = True
            self._plex_started = time.perf_counter()
        given = self.requestHeaders.getRawHeaders(b"x-request-id")
        if given and _REQUEST_ID.fullmatch(given[0]):
            self._request_id = given[0].decode("ascii")
            self.responseHeaders.setRawHeaders(b"x-request-id", given[:1])
        super().process()

    def _handleStar(self) -> None:
        # twisted.web answers a request for '*' (OPTIONS *) itself, before
        # any resource: hand it to the site's resource like any other
        # target, so the listener's policy decides (no route serves '*').
        try:
            self.render(self.channel.site.getResourceFor(self))
        except BaseException:
            self.processingFailed(Failure())

    def getRequestHostname(self) -> bytes:
        # Without a Host header twisted.web falls back to the listening
        # address's host, which a Unix socket does not have.
        if self.getHeader(b"host") is None and getattr(self.getHost(), "host", None) is None:
            return b"localhost"
        return super().getRequestHostname()

    def processingFailed(self, reason: Failure) -> Any:
        """A failure no handler caught: log it once, answer a JSON 500, never a traceback."""
        log.failure(
            "unhandled error in {method} {route}",
            reason,
            method=self.method.decode("ascii", "replace"),
            route=getattr(self, "plexagent_route", None) or "(unrouted)",
            request_id=self.request_id,
        )
        if self.finished or self._disconnected:
            return reason
        if self.startedWriting:
            # Part of another answer is out: the client must not take it as whole.
            self.channel.transport.abortConnection()
            return reason
        body = encode_json({"error": "internal error"})
        self.setResponseCode(500)
        self.responseHeaders.setRawHeaders(b"content-type", [JSON_CONTENT_TYPE])
        self.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        self.write(body)
        self.finish()
        return reason

    def write(self, data: bytes) -> None:
        site = getattr(self.channel, "site", None)
        if not self.startedWriting and site is not None and site.stopping:
            # The listener is shutting down: this response is the connection's last.
            self.channel.persistent = False
            self.setHeader(b"connection", b"close")
        super().write(data)

    def finish(self) -> Any:
        if self._plex_site is not None and self._plex_site.stopping:
            # Close the connection once this response is sent (see PlexSite.shut_down).
            self.channel.persistent = False
        result = super().finish()
        if self._observed:
            self._observed = False
            observer = self._plex_site.observer
            if observer is not None:
                observer(self, time.perf_counter() - self._plex_started)
        return result


def _raw_json_response(code: int, reason: bytes, error: str, details: str | None = None) -> bytes:
    body = encode_json(error_document(error, details))
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n" % (code, reason, len(body))
    ) + body


class PlexChannel(http.HTTPChannel):
    """
    An HTTPChannel that answers malformed and oversized requests with JSON,
    and gives each request ``header_timeout`` seconds from its first byte
    (the first request: from the connection) to its last header line, so a
    client trickling headers (slowloris) or sending nothing cannot hold a
    connection forever.
    """

    header_timeout = 10.0
    #: seconds, from its headers, that the body of a request answered before
    #: its body is still read and thrown away: a client that sends its body
    #: before reading the answer (most do) reads the answer, rather than a
    #: reset from a connection closed on unread data
    linger_timeout = 30.0
    transport: Any
    site: Any
    #: bytes of such a body still to throw away
    _unread_body = 0
    _close_when_read = False
    _linger_timer: Any = None
    #: when the current request's headers must be complete (None: not waiting)
    _headers_due: float | None = None
    # One timer per connection, re-armed only when it fires: no timer is
    # created or cancelled per request on a busy keep-alive connection.
    _header_timer: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        # A connection that sends nothing is waiting for its first request's
        # headers too: it gets the same header timeout as a slow one, not
        # the idle timeout of a connection that has been served.
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._headers_due = self.site.reactor.seconds() + self.header_timeout
        timer = self._header_timer
        if timer is None or not timer.active():
            self._header_timer = self.callLater(self.header_timeout, self._check_headers)

    def dataReceived(self, data: bytes) -> None:
        if self._headers_due is None and self.line_mode and not self.requests:
            self._headers_due = self.site.reactor.seconds() + self.header_timeout
            timer = self._header_timer
            if timer is None or not timer.active():
                self._header_timer = self.callLater(self.header_timeout, self._check_headers)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._headers_due = None
        super().allHeadersReceived()
        request = self.requests[-1]
        if self.length and getattr(request.content, "answer_before_body", False):
            # Answer now: with no length left to read, HTTPChannel hands the
            # request on at once. Its body, as it comes, is thrown away (a
            # chunked body has no known end: it is read as usual), and the
            # connection is closed after it.
            self._unread_body = self.length
            self.length = 0
            self.persistent = False
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            self._linger_timer = self.callLater(self.linger_timeout, self.transport.abortConnection)

    def _send100Continue(self) -> None:
        # No "100 Continue" to a client whose body will not be read.
        if not (self.length and getattr(self.requests[-1].content, "answer_before_body", False)):
            super()._send100Continue()

    def rawDataReceived(self, data: bytes) -> None:
        if self._unread_body:
            taken = min(len(data), self._unread_body)
            self._unread_body -= taken
            if not self._unread_body and self._close_when_read:
                super().loseConnection()
                return
            data = data[taken:]
            if not data:
                return
        super().rawDataReceived(data)

    def loseConnection(self) -> None:
        if self._unread_body:
            # Answered before its body: close once the body is in (no reset
            # for the client still sending it), or at the linger timeout.
            self._close_when_read = True
            return None
        return super().loseConnection()

    def _check_headers(self) -> None:
        self._header_timer = None
        due = self._headers_due
        if due is None:
            return
        remaining = due - self.site.reactor.seconds()
        if remaining > 0:
            self._header_timer = self.callLater(remaining, self._check_headers)
            return
        self._headers_due = None
        self.transport.write(_raw_json_response(408, b"Request Timeout", "request headers not received in time"))
        self.transport.loseConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
        if self._receivedHeaderSize > self.totalHeadersSize:
            response = _raw_json_response(
                413, b"Request Entity Too Large", "request headers too large",
                f"the request line and headers may be {self.totalHeadersSize} bytes in all",
            )
        elif self._receivedHeaderCount > self.maxHeaders:
            response = _raw_json_response(
                413, b"Request Entity Too Large", "request headers too large",
                f"a request may have {self.maxHeaders} header lines",
            )
        else:
            response = _raw_json_response(400, b"Bad Request", "malformed HTTP request")
        self.transport.write(response)
        self.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        # LineReceiver's answer is to drop the connection without a word.
        self.transport.write(_raw_json_response(
            413, b"Request Entity Too Large", "request headers too large",
            f"the request line and each header line may be {self.MAX_LENGTH} bytes",
        ))
        self.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        for timer in (self._header_timer, self._linger_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._header_timer = self._linger_timer = None
        super().connectionLost(reason)
        self.site.connection_closed(self)

    def busy(self) -> bool:
        """Whether a request is on this connection: any part of it received, or its response not yet sent."""
        # LineReceiver keeps the bytes of a request line or header not yet complete in _buffer.
        return bool(self.requests) or bool(self._buffer)


class _TooManyConnections(protocol.Protocol):
    """Answers a connection past the listener's cap with a 503 and closes it."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(_raw_json_response(
            503, b"Service Unavailable", "too many connections",
            "the listener holds as many connections as it may; retry shortly",
        ))
        self.transport.loseConnection()


def _plex_channel() -> Any:
    # twisted.web wraps every channel in this (private) protocol switcher;
    # Site has no public hook for the channel class.
    return http._GenericHTTPChannelProtocol(PlexChannel())


class PlexSite(server.Site):
    """
    A Site with body limits and graceful shutdown.

    Each request's body limit is ``body_limits(method, path)`` of its route
    (else ``max_body_bytes``), applied from the request line and headers
    before any byte of the body is read: a declared length over it is a 413
    at once, a chunked body is counted as it arrives.

    ``shut_down(timeout, clock)`` (once its port has stopped listening)
    closes idle connections, lets every request that has begun arriving
    finish and its response be sent, and cuts what is left after the
    timeout.
    """

    requestFactory = PlexRequest
    protocol = staticmethod(_plex_channel)
    # No access log line per request through twisted.web's combined log: the
    # agent logs requests itself where needed; this keeps the hot path cheap.
    noisy = False
    #: set by shut_down: responses close their connections
    stopping = False

    def __init__(
        self,
        resource: Any,
        max_body_bytes: int,
        content_factory: ContentFactory | None = None,
        idle_timeout: float = 60.0,
        body_limits: BodyLimits | None = None,
        max_connections: int = 4096,
    ) -> None:
        # parsePOSTFormSubmission: twisted.web would parse a urlencoded or
        # multipart POST body into ``args`` (beside the query) before any
        # resource runs, and answer a malformed one itself, ahead of the
        # listener's policy. These APIs take JSON bodies and query params.
        super().__init__(resource, timeout=idle_timeout, parsePOSTFormSubmission=False)
        self.max_body_bytes = max_body_bytes
        self.content_factory = content_factory
        self._body_limits = body_limits
        #: the listener's config key (e.g. ``agent_api.listen``), for metrics
        self.listener_name = ""
        #: ``observer(request, seconds)`` is called as each request finishes
        self.observer: Callable[[Any, float], None] | None = None
        #: open connections (the HTTP channels inside twisted.web's wrappers)
        self._channels: set[Any] = set()
        self._all_closed: list[defer.Deferred[None]] = []
        #: connections open at once; past it a new one is answered 503 and closed
        self.max_connections = max_connections
        #: connections refused for being past ``max_connections``
        self.refused_connections = 0

    def buildProtocol(self, addr: Any) -> Any:
        if len(self._channels) >= self.max_connections:
            # Every connection holds a descriptor: past the cap the agent
            # would run out of them for its own files and calls.
            self.refused_connections += 1
            return _TooManyConnections()
        channel = super().buildProtocol(addr)
        self._channels.add(getattr(channel, "_channel", channel))
        return channel

    def connection_closed(self, channel: Any) -> None:
        """Called by each connection as it closes."""
        self._channels.discard(channel)
        if not self._channels:
            waiting, self._all_closed = self._all_closed, []
            for d in waiting:
                d.callback(None)

    def log(self, request: Any) -> None:
        pass

    def body_limit(self, method: bytes, path: bytes) -> int:
        """The body limit of the route ``method path`` names (else ``max_body_bytes``)."""
        if self._body_limits is not None:
            limit = self._body_limits(method, path.split(b"?", 1)[0])
            if limit is not None:
                return limit
        return self.max_body_bytes

    @property
    def open_connections(self) -> int:
        return len(self._channels)

    def busy_connections(self) -> int:
        """Connections with a request on them (arriving, being processed or being answered)."""
        return sum(1 for channel in self._channels if channel.busy())

    def shut_down(self, timeout: float, clock: Any) -> defer.Deferred[int]:
        """
        Close every connection gracefully: idle ones at once, busy ones when
        their request has been answered; abort those still open after
        ``timeout`` seconds. Fires with the number of connections aborted
        once every connection has closed.
        """
        self.stopping = True
        if not self._channels:
            return defer.succeed(0)
        closed: defer.Deferred[None] = defer.Deferred()
        self._all_closed.append(closed)
        aborted = [0]

        def close_idle() -> None:
            for channel in list(self._channels):
                if not channel.busy():
                    channel.loseConnection()

        def abort_the_rest() -> None:
            for channel in list(self._channels):
                aborted[0] += 1
                channel.transport.abortConnection()

        # One reactor turn first: bytes already received on an accepted
        # connection are read, so a request that has begun arriving is not
        # taken for an idle connection.
        clock.callLater(0, close_idle)
        timer = clock.callLater(timeout, abort_the_rest)

        def done(_: None) -> int:
            if timer.active():
                timer.cancel()
            return aborted[0]

        return closed.addCallback(done)
