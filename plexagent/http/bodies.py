"""
Streamed request bodies: sinks that take a body as it arrives instead of
spooling it, and the parsers they use. A multipart archive read by a
worker thread, a body extracted while it arrives (``StreamingExtraction``),
a chunk spooled to its writer (``ChunkSink``), an image tar fed to a load
in any of its three forms (``ImageTarSink``: raw, multipart, or base64 in
JSON decoded on the fly), and the refusal of a body before it is read
(``RefusedBody``). No sink holds a body in memory; none knows what the
domain does with the bytes.
"""

from __future__ import annotations

import base64
import binascii
import threading
from typing import Any, Callable
from urllib.parse import parse_qsl

import multipart
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from plexagent import errors
from plexagent.http.site import DiscardingContent
from plexagent.pipes import BodyPipe, TarFeed

log = Logger()


class UploadInterrupted(errors.InvalidInput):
    """The client went away before the whole body arrived."""


#: Largest ordinary form field accepted beside ``tar_file``.
MAX_FORM_FIELD = 64 << 10


class MultipartArchive:
    """
    Reads a ``multipart/form-data`` body from ``raw`` (worker side): the
    ordinary fields before the ``tar_file`` part, then ``read(n)`` over that
    part's bytes only.
    """

    def __init__(self, raw: Any, boundary: str, field: str = "tar_file") -> None:
        self._raw = raw
        self._field = field
        self._parser = multipart.PushMultipartParser(boundary, max_segment_count=64)
        self._events = self._all_events()
        self._pending = b""
        self._in_file = False
        self._done = False
        self.fields: dict[str, str] = {}

    def _all_events(self) -> Any:
        try:
            while True:
                data = self._raw.read(1 << 20)
                yield from self._parser.parse(data)
                if not data:
                    self._parser.close()
                    return
        except multipart.MultipartError as e:
            raise errors.InvalidInput("invalid multipart body", str(e)[:200]) from None

    def open(self) -> dict[str, str]:
        """Parse up to the start of the file part; the fields seen before it."""
        segment = None
        value = bytearray()
        for event in self._events:
            if isinstance(event, multipart.MultipartSegment):
                segment = event
                value = bytearray()
                if segment.name == self._field:
                    self._in_file = True
                    return self.fields
            elif event is None:
                if segment is not None and segment.filename is None:
                    try:
                        self.fields[segment.name] = value.decode("utf-8")
                    except UnicodeDecodeError:
                        raise errors.InvalidInput("invalid form field", f"{segment.name} must be UTF-8") from None
                segment = None
            elif segment is not None and segment.filename is None:
                # Other files are ignored; ordinary fields are kept, bounded.
                value += event
                if len(value) > MAX_FORM_FIELD:
                    raise errors.TooLarge(
                        "form field too large", f"fields other than {self._field} are limited to {MAX_FORM_FIELD} bytes"
                    )
        raise errors.InvalidInput(f"{self._field} is required", f"send the archive as the multipart file field {self._field}")

    def read(self, n: int = -1) -> bytes:
        if self._pending:
            if n is None or n < 0:
                out, self._pending = self._pending, b""
            else:
                out, self._pending = self._pending[:n], self._pending[n:]
            return out
        if self._done:
            return b""
        for event in self._events:
            if event is None:
                self._done = True
                return b""
            if isinstance(event, (bytes, bytearray, memoryview)):
                data = bytes(event)
                if n is not None and 0 < n < len(data):
                    data, self._pending = data[:n], data[n:]
                return data
        self._done = True
        return b""


def multipart_boundary(content_type: bytes | None) -> str | None:
    if not content_type:
        return None
    kind, options = multipart.parse_options_header(content_type.decode("latin-1"))
    if kind != "multipart/form-data":
        return None
    return options.get("boundary") or None


def query_params(request: Any) -> dict[str, str]:
    uri = getattr(request, "uri", b"") or b""
    _, _, qs = uri.partition(b"?")
    # Parsed as text: parse_qs on bytes re-encodes each decoded value as
    # ASCII, and raised (dropping the connection) for any escaped non-ASCII
    # character such as extract_path=%C3%A9.
    try:
        pairs = parse_qsl(qs.decode("ascii"), keep_blank_values=True, encoding="utf-8", errors="strict")
    except UnicodeError:
        raise errors.InvalidInput("invalid query parameter", "query parameters must be UTF-8") from None
    out: dict[str, str] = {}
    for key, value in pairs:
        out.setdefault(key, value)
    return out


class NoContent:
    """The body-file methods twisted.web calls on a sink (seek, tell, read)."""

    exceeded = False

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def tell(self) -> int:
        return 0

    def read(self, size: int = -1) -> bytes:
        return b""


class RefusedBody(NoContent):
    """A body that will not be used: the request failed validation (answered before the body is read)."""

    answer_before_body = True

    def __init__(self, error: errors.PlexError) -> None:
        self.error = error

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


def streamed_body(request: Any, kind: type) -> Any:
    """The sink a streaming route's body went to: its refusal raised, or one of ``kind``."""
    sink = request.content
    if isinstance(sink, RefusedBody):
        raise sink.error
    if not isinstance(sink, kind):
        raise errors.InvalidInput("invalid request", "the body could not be streamed")
    return sink


class StreamingExtraction(NoContent):
    """
    A body sink that extracts the archive while it arrives. ``finish()``
    (called by the route, once the whole body is in) fires with the
    ``ExtractionResult``.
    """

    def __init__(self, request: Any, context: Any, work: Callable[[Any], Any]) -> None:
        self._reactor = context.reactor
        channel = request.channel

        def pause() -> None:
            if request.channel is not None:
                channel.pauseProducing()

        def resume() -> None:
            if request.channel is not None:
                channel.resumeProducing()

        self.pipe = BodyPipe(context.reactor, pause, resume)
        self._work = work
        self._started = False
        self._finished = False
        self.done: defer.Deferred[Any] = defer.Deferred()

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        threading.Thread(target=self._run, name="plexagent-extract", daemon=True).start()

    def _run(self) -> None:
        try:
            result = self._work(self.pipe)
        except BaseException as e:
            failure = Failure(e)
            self.pipe.close_reader()
            self._reactor.callFromThread(self.done.errback, failure)
        else:
            self.pipe.close_reader()
            self._reactor.callFromThread(self.done.callback, result)

    def write(self, data: bytes) -> None:
        self._start()
        self.pipe.write(data)

    def finish(self) -> defer.Deferred[Any]:
        self._finished = True
        self._start()
        self.pipe.finish()
        return self.done

    def close(self) -> None:
        if not self._finished:
            # The connection went away mid-body: stop and clean up.
            interrupted = UploadInterrupted("upload interrupted", "the connection closed before the whole body arrived")
            if not self._started:
                self._started = True
                self.done.errback(interrupted)
            else:
                self.pipe.abort(interrupted)
            self.done.addErrback(lambda f: None)


class ChunkSink(NoContent):
    """Spools one chunk's body into its upload directory as it arrives."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer
        self.claimed = False

    @property
    def exceeded(self) -> bool:  # type: ignore[override]
        return self.writer.exceeded

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    def close(self) -> None:
        if not self.claimed:
            # Dropped mid-body, or refused before the route: keep no half chunk.
            self.writer.discard()


_WHITESPACE = b" \t\r\n"


class Base64Field:
    """
    Finds the string value of one key in a streamed JSON object and emits
    its base64-decoded bytes, 4 characters at a time, never holding more
    than one chunk. Base64 has no quote or backslash, so the first quote
    ends the value; JSON escapes that may appear in it (``\\/``, ``\\n``)
    are undone.
    """

    def __init__(self, key: str, out: Any) -> None:
        self.key = key
        self._needle = b'"' + key.encode("ascii") + b'"'
        self._out = out
        self._state = "seek"
        self._buffer = b""
        self._pending = b""
        self._carry = b""
        self.found = False

    @property
    def done(self) -> bool:
        return self._state == "done"

    def feed(self, data: bytes) -> None:
        if self._state == "seek":
            data = self._buffer + data
            at = data.find(self._needle)
            if at < 0:
                self._buffer = data[-(len(self._needle) - 1):]
                return
            self._buffer = b""
            data = data[at + len(self._needle):]
            self._state = "colon"
            self.found = True
        if self._state in ("colon", "quote"):
            data = data.lstrip(_WHITESPACE)
            if self._state == "colon" and data:
                if data[:1] != b":":
                    raise self._invalid()
                data = data[1:].lstrip(_WHITESPACE)
                self._state = "quote"
            if self._state == "quote" and data:
                if data[:1] != b'"':
                    raise errors.InvalidInput(f"invalid {self.key}", f"{self.key} must be a base64 string")
                data = data[1:]
                self._state = "value"
        if self._state == "value" and data:
            end = data.find(b'"')
            text = self._carry + (data if end < 0 else data[:end])
            self._carry = b""
            if end < 0 and text.endswith(b"\\"):
                text, self._carry = text[:-1], b"\\"
            text = (
                text.replace(b"\\/", b"/").replace(b"\\n", b"").replace(b"\\r", b"").replace(b"\\t", b"")
            )
            self._decode(self._pending + text, final=end >= 0)
            if end >= 0:
                self._state = "done"

    def _decode(self, text: bytes, final: bool) -> None:
        usable = len(text) if final else len(text) // 4 * 4
        block, self._pending = text[:usable], text[usable:]
        if not block:
            return
        try:
            decoded = base64.b64decode(block, validate=True)
        except (binascii.Error, ValueError):
            raise errors.InvalidInput(f"invalid {self.key}", f"{self.key} is not valid base64") from None
        self._out(decoded)

    def _invalid(self) -> errors.InvalidInput:
        return errors.InvalidInput("invalid JSON body", f"expected ':' after \"{self.key}\"")

    def close(self) -> None:
        if self._state != "done":
            raise errors.InvalidInput(f"{self.key} is required", f"send the image tar base64-encoded in {self.key}")


class ImageTarSink(DiscardingContent):
    """
    The body sink of an image-load request (see ``AgentContext.stream_body``).

    The load starts on the first tar byte; the route calls ``finish()`` once
    the body is complete and gets the load result. A body over the upload
    limit or a lost connection aborts the load.
    """

    FIELD = "image_tar"
    B64_FIELD = "image_tar_b64"

    def __init__(self, request: Any, length: int | None, load: Callable[[TarFeed], defer.Deferred[dict[str, Any]]],
                 reactor: Any, limit: int) -> None:
        self._load = load
        self._limit = limit
        self.exceeded = length is not None and length > limit
        # Over the limit by its declared length: answered before the body is read.
        self.answer_before_body = self.exceeded
        self.received = 0
        self.error: errors.PlexError | None = None
        self.result: defer.Deferred[dict[str, Any]] | None = None
        self._complete = False
        transport = request.channel.transport
        self._transport = transport
        self.feed = TarFeed(reactor, transport.pauseProducing, self._resume)
        content_type = (request.getHeader(b"content-type") or b"").decode("latin-1")
        self._parser: Any = None
        self._b64: Base64Field | None = None
        self._in_field = False
        mime = content_type.split(";", 1)[0].strip().lower()
        if mime == "multipart/form-data":
            _, options = multipart.parse_options_header(content_type)
            boundary = options.get("boundary")
            if not boundary:
                self.error = errors.InvalidInput("invalid multipart body", "the Content-Type has no boundary")
            else:
                self._parser = multipart.PushMultipartParser(boundary)
        elif mime == "application/json":
            self._b64 = Base64Field(self.B64_FIELD, self._tar)
        request.notifyFinish().addErrback(self._lost)
        if self.exceeded:
            self.feed.abort()

    # -- the body, on the reactor ---------------------------------------

    def write(self, data: bytes) -> None:
        self.received += len(data)
        if self.exceeded or self.error is not None:
            return
        if self.received > self._limit:
            self.exceeded = True
            self._abort()
            return
        try:
            if self._parser is not None:
                self._multipart(data)
            elif self._b64 is not None:
                if not self._b64.done:
                    self._b64.feed(data)
            else:
                self._tar(data)
        except errors.PlexError as e:
            self._fail(e)
        except multipart.MultipartError as e:
            self._fail(errors.InvalidInput("invalid multipart body", str(e)))

    def _multipart(self, data: bytes) -> None:
        for event in self._parser.parse(data):
            if isinstance(event, multipart.MultipartSegment):
                self._in_field = event.name == self.FIELD
            elif event is None:
                self._in_field = False
            elif self._in_field:
                self._tar(event)

    def _tar(self, data: bytes) -> None:
        if not data:
            return
        if self.result is None:
            self.result = self._load(self.feed)
        self.feed.put(bytes(data))

    def _resume(self) -> None:
        # Once the whole body is in, the HTTP channel owns the transport's
        # pausing (it pauses while the request is handled).
        if not self._complete:
            self._transport.resumeProducing()

    def _fail(self, error: errors.PlexError) -> None:
        self.error = error
        self._abort()

    def _abort(self) -> None:
        self.feed.abort()
        if self.result is not None:
            # The worker fails because of the abort: that is expected.
            self.result.addErrback(lambda _: None)

    def _lost(self, reason: Any) -> None:
        if not self._complete:
            self._abort()

    # -- the route --------------------------------------------------------

    def finish(self) -> defer.Deferred[dict[str, Any]]:
        """The body is complete: the load's result (or why there is none)."""
        self._complete = True
        try:
            if self.error is None:
                if self._parser is not None:
                    self._parser.close()
                elif self._b64 is not None:
                    self._b64.close()
        except errors.PlexError as e:
            self._fail(e)
        except multipart.MultipartError as e:
            self._fail(errors.InvalidInput("invalid multipart body", str(e)))
        if self.error is not None:
            return defer.fail(self.error)
        if self.result is None:
            if self._parser is not None:
                return defer.fail(errors.InvalidInput(
                    f"{self.FIELD} is required", f"send the image tar as the multipart file field {self.FIELD}"))
            return defer.fail(errors.InvalidInput("the image tar is empty", "send the output of docker save as the body"))
        self.feed.close()
        return self.result
