"""
Shared HTTP plumbing: JSON responses, the one error -> status mapping, body
limits, and a Site that knows its open connections (for graceful stop).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import tempfile
import time
from io import BytesIO
from typing import Any, Callable, Iterable

from klein import Klein
from twisted.internet import defer
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.iweb import IRequest
from werkzeug.exceptions import MethodNotAllowed, NotFound as RouteNotFound

from plexagent import errors

log = Logger()

JSON_CONTENT_TYPE = b"application/json"

#: The one place where error types become status codes.
STATUS_FOR_ERROR: dict[type[errors.PlexError], int] = {
    errors.InvalidInput: 400,
    errors.Unauthorized: 401,
    errors.Forbidden: 403,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.TooLarge: 413,
    errors.StorageError: 500,
    errors.UpstreamFailed: 500,
    errors.Unavailable: 503,
    errors.StorageFull: 507,
}


def status_for(error: errors.PlexError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS_FOR_ERROR:
            return STATUS_FOR_ERROR[cls]
    return 500


def encode_json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def respond(request: IRequest, value: Any, code: int = 200) -> bytes:
    """Set status and JSON content type; return the encoded body."""
    body = encode_json(value)
    request.setResponseCode(code)
    request.setHeader(b"content-type", JSON_CONTENT_TYPE)
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


def error_document(message: str, details: Any = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"error": message}
    if details is not None:
        doc["details"] = details
    return doc


def respond_error(request: IRequest, error: errors.PlexError) -> bytes:
    return respond(request, error_document(error.message, error.details), status_for(error))


def read_body(request: IRequest) -> bytes:
    """The (already size-limited) request body."""
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    return content.read()


def read_json(request: IRequest) -> Any:
    """Parse the request body as JSON or raise ``invalid JSON body``."""
    raw = read_body(request)
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise errors.InvalidInput("invalid JSON body") from None


def install_error_handlers(app: Klein) -> None:
    """Make every failure on ``app`` a JSON error; never an HTML traceback."""

    # Handlers take *args: on an app bound to an instance (a Klein app in a
    # class body), Klein passes the instance first.

    @app.handle_errors(errors.PlexError)  # type: ignore[arg-type]  # *args: see above
    def plex_error(*args: Any) -> bytes:
        request, failure = args[-2:]
        return respond_error(request, failure.value)

    @app.handle_errors(RouteNotFound)  # type: ignore[arg-type]  # *args: see above
    def route_not_found(*args: Any) -> bytes:
        request, failure = args[-2:]
        return respond(request, {"error": "not found"}, 404)

    @app.handle_errors(MethodNotAllowed)  # type: ignore[arg-type]  # *args: see above
    def method_not_allowed(*args: Any) -> bytes:
        request, failure = args[-2:]
        allowed = failure.value.valid_methods or []
        if allowed:
            request.setHeader(b"allow", ", ".join(allowed).encode("ascii"))
        return respond(request, {"error": "method not allowed"}, 405)

    @app.handle_errors(Exception)  # type: ignore[arg-type]  # *args: see above
    def unexpected(*args: Any) -> bytes:
        request, failure = args[-2:]
        log.failure(
            "unhandled error in {method} {route}",
            failure,
            method=request.method.decode("ascii", "replace"),
            route=getattr(request, "plexagent_route", None) or "(unrouted)",
            request_id=getattr(request, "request_id", ""),
        )
        return respond(request, {"error": "internal error"}, 500)


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
    A body sink that keeps nothing (for requests refused before routing),
    and the file-like base of sinks that pass the body on as it arrives.
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


_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._-]{1,64}$")
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


class PlexRequest(server.Request):
    """A Request whose body is bounded and which its Site can count."""

    # A PlexSite's channel and a body sink of ours (typed loosely on purpose:
    # twisted.web declares them narrower than what it actually holds).
    channel: Any
    content: Any

    #: the site that processes this request (set when processing begins)
    _plex_site: Any = None
    #: whether the site's observer is to hear of this request when it finishes
    _observed = False

    def gotLength(self, length: int | None) -> None:
        site = self.channel.site
        limit = site.max_body_bytes
        if length is not None and length > limit and site.content_factory is None:
            # Refuse before storing a byte.
            self.content = _LimitedContent(0)
            self.content.exceeded = True
            return
        if site.content_factory is not None:
            # The channel knows the request line before the body arrives.
            method = getattr(self.channel, "_command", b"")
            path = getattr(self.channel, "_path", b"")
            sink = site.content_factory(self, method, path, length)
            if sink is not None:
                self.content = sink
                return
            if length is not None and length > limit:
                self.content = _LimitedContent(0)
                self.content.exceeded = True
                return
        self.content = _LimitedContent(limit)

    def handleContentChunk(self, data: bytes) -> None:
        self.content.write(data)

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
        if given and _REQUEST_ID.match(given[0]):
            self._request_id = given[0].decode("ascii")
            self.responseHeaders.setRawHeaders(b"x-request-id", given[:1])
        if getattr(self.content, "exceeded", False):
            self.setResponseCode(413)
            self.setHeader(b"content-type", JSON_CONTENT_TYPE)
            body = encode_json({"error": "request body too large",
                                "details": f"the limit is {site.max_body_bytes} bytes"})
            self.setHeader(b"content-length", str(len(body)).encode())
            self.write(body)
            self.finish()
            return
        super().process()

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


def _raw_json_response(code: int, reason: bytes, error: str) -> bytes:
    body = encode_json({"error": error})
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n" % (code, reason, len(body))
    ) + body


class PlexChannel(http.HTTPChannel):
    """
    An HTTPChannel that answers malformed and oversized requests with JSON,
    and gives each request ``header_timeout`` seconds from its first byte to
    its last header line, so a client trickling headers (slowloris) cannot
    hold a connection forever.
    """

    header_timeout = 10.0
    transport: Any
    site: Any
    #: when the current request's headers must be complete (None: not waiting)
    _headers_due: float | None = None
    # One timer per connection, re-armed only when it fires: no timer is
    # created or cancelled per request on a busy keep-alive connection.
    _header_timer: Any = None

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
            response = _raw_json_response(413, b"Request Entity Too Large", "request headers too large")
        else:
            response = _raw_json_response(400, b"Bad Request", "malformed HTTP request")
        self.transport.write(response)
        self.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._header_timer is not None and self._header_timer.active():
            self._header_timer.cancel()
        self._header_timer = None
        super().connectionLost(reason)
        self.site.connection_closed(self)

    def busy(self) -> bool:
        """Whether a request is on this connection: any part of it received, or its response not yet sent."""
        # LineReceiver keeps the bytes of a request line or header not yet complete in _buffer.
        return bool(self.requests) or bool(self._buffer)


def _plex_channel() -> Any:
    # twisted.web wraps every channel in this (private) protocol switcher;
    # Site has no public hook for the channel class.
    return http._GenericHTTPChannelProtocol(PlexChannel())


class PlexSite(server.Site):
    """
    A Site with JSON body limits and graceful shutdown.

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
    ) -> None:
        super().__init__(resource, timeout=idle_timeout)
        self.max_body_bytes = max_body_bytes
        self.content_factory = content_factory
        #: the listener's config key (e.g. ``agent_api.listen``), for metrics
        self.listener_name = ""
        #: ``observer(request, seconds)`` is called as each request finishes
        self.observer: Callable[[Any, float], None] | None = None
        #: open connections (the HTTP channels inside twisted.web's wrappers)
        self._channels: set[Any] = set()
        self._all_closed: list[defer.Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> Any:
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


def iter_routes(app: Klein) -> Iterable[tuple[str, tuple[str, ...]]]:
    """(path pattern, methods) for every route of ``app`` (for docs and tests)."""
    for rule in app.url_map.iter_rules():
        yield rule.rule, tuple(sorted(rule.methods or ()))


def label_routes(app: Klein) -> None:
    """
    Have each request routed by ``app`` remember its route pattern as
    ``request.plexagent_route`` (``/containers/<n>/status``), so metrics
    are per route, not per URL.
    """
    rules = {rule.endpoint: rule.rule for rule in app.url_map.iter_rules()}
    execute = app.execute_endpoint

    def execute_endpoint(endpoint: str, request: Any, *args: Any, **kwargs: Any) -> Any:
        request.plexagent_route = rules.get(endpoint, endpoint)
        return execute(endpoint, request, *args, **kwargs)

    app.execute_endpoint = execute_endpoint  # type: ignore[method-assign]
