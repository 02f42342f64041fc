"""
File Upload (seed: /upload/tar, /upload/tar/stream, /upload/tar/chunked).

Request bodies never sit in memory. ``/upload/tar/stream`` and the multipart
form of ``/upload/tar`` are claimed with ``context.stream_body``: as the body
arrives it goes through a bounded pipe into a worker thread that extracts it
(``plexagent.tarsafe``) at the same time; when the pipe is full the
connection stops being read, so a fast client cannot outrun the disk. Chunks
of ``/upload/tar/chunked`` are spooled straight into their upload directory
(``plexagent.chunks``). Only the legacy JSON form (base64 ``data``) is read
whole, bounded by ``agent_api.max_json_bytes``.
"""

from __future__ import annotations

import base64
import binascii
import collections
import io
import os
import threading
from typing import Any, Callable
from urllib.parse import parse_qsl

import multipart
from klein import Klein
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from plexagent import errors
from plexagent.host.files import chunks, tarsafe
from plexagent.http import web
from plexagent.agentapi.files import path_policy, query_arg, read_json_object
from plexagent.fileio import storage_error

log = Logger()

STREAM_PATH = b"/upload/tar/stream"
TAR_PATH = b"/upload/tar"
CHUNKED_PATH = b"/upload/tar/chunked"

#: Bytes buffered between the connection and the extracting thread before
#: the connection is paused, and the level at which it is resumed.
PIPE_HIGH_WATER = 8 << 20
PIPE_LOW_WATER = 2 << 20
#: Extractions running at once; more are refused with 503 (each has a thread).
MAX_CONCURRENT_EXTRACTIONS = 8
#: Largest ordinary form field accepted beside ``tar_file``.
MAX_FORM_FIELD = 64 << 10


class UploadInterrupted(errors.InvalidInput):
    """The client went away before the whole body arrived."""


class BodyPipe:
    """
    A bounded byte pipe from the reactor (``write``, ``finish``, ``abort``)
    to one worker thread (``read``). Past the high-water mark ``pause`` is
    called; once the worker drains below the low-water mark, ``resume``
    (both on the reactor).
    """

    def __init__(self, reactor: Any, pause: Callable[[], None], resume: Callable[[], None],
                 high: int = PIPE_HIGH_WATER, low: int = PIPE_LOW_WATER) -> None:
        self._reactor = reactor
        self._pause = pause
        self._resume = resume
        self._high = high
        self._low = low
        self._cond = threading.Condition()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._eof = False
        self._error: errors.PlexError | None = None
        self._closed = False
        self._paused = False

    # reactor side

    def write(self, data: bytes) -> None:
        with self._cond:
            if self._closed:
                return
            self._chunks.append(data)
            self._size += len(data)
            self._cond.notify()
            pause = self._size > self._high and not self._paused
            if pause:
                self._paused = True
        if pause:
            self._pause()

    def finish(self) -> None:
        with self._cond:
            self._eof = True
            self._cond.notify()

    def abort(self, error: errors.PlexError) -> None:
        with self._cond:
            self._error = error
            self._cond.notify()

    @property
    def paused(self) -> bool:
        return self._paused

    # worker side

    def read(self, n: int = -1) -> bytes:
        with self._cond:
            while not self._chunks and not self._eof and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise self._error
            if not self._chunks:
                return b""
            first = self._chunks[0]
            if n is None or n < 0 or len(first) <= n:
                out = self._chunks.popleft()
            else:
                out, self._chunks[0] = first[:n], first[n:]
            self._size -= len(out)
            resume = self._paused and self._size < self._low
            if resume:
                self._paused = False
        if resume:
            self._reactor.callFromThread(self._resume)
        return out

    def close_reader(self) -> None:
        """The worker is done: drop what is buffered and discard what comes."""
        with self._cond:
            self._closed = True
            self._chunks.clear()
            self._size = 0
            resume = self._paused
            self._paused = False
        if resume:
            self._reactor.callFromThread(self._resume)


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
                    raise errors.TooLarge("form field too large", f"fields other than {self._field} are limited to {MAX_FORM_FIELD} bytes")
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


def _boundary(content_type: bytes | None) -> str | None:
    if not content_type:
        return None
    kind, options = multipart.parse_options_header(content_type.decode("latin-1"))
    if kind != "multipart/form-data":
        return None
    return options.get("boundary") or None


def _query(request: Any) -> dict[str, str]:
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


class _NoContent:
    """The body-file methods twisted.web calls on a sink (seek, tell, read)."""

    exceeded = False

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def tell(self) -> int:
        return 0

    def read(self, size: int = -1) -> bytes:
        return b""


class RefusedBody(_NoContent):
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


class StreamingExtraction(_NoContent):
    """
    A body sink that extracts the archive while it arrives. ``finish()``
    (called by the route, once the whole body is in) fires with the
    ``ExtractionResult``.
    """

    def __init__(self, request: Any, context: Any, work: Callable[[Any], tarsafe.ExtractionResult]) -> None:
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
        self.done: defer.Deferred[tarsafe.ExtractionResult] = defer.Deferred()

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

    def finish(self) -> defer.Deferred[tarsafe.ExtractionResult]:
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


def register(app: Klein, context: Any) -> None:
    policy = path_policy(context)
    aapi = context.config.agent_api
    reactor = context.reactor
    limits = tarsafe.Limits(max_bytes=aapi.max_upload_bytes, max_members=aapi.max_archive_members)
    store = context.services.get("chunks")
    if store is None:
        store = context.services["chunks"] = chunks.ChunkStore(
            os.path.join(context.config.node.data_dir, "uploads"), aapi.max_upload_bytes, aapi.chunk_max_age
        )

    journal = context.services.get("staging_journal")
    if journal is None:
        journal = context.services["staging_journal"] = tarsafe.StagingJournal(
            os.path.join(context.config.node.data_dir, "extracting")
        )

    def in_thread(f: Any, *args: Any) -> Any:
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    running = [0]

    def streaming(request: Any, work: Callable[[Any], tarsafe.ExtractionResult]) -> Any:
        if running[0] >= MAX_CONCURRENT_EXTRACTIONS:
            return RefusedBody(errors.Unavailable(
                "too many uploads in progress", f"at most {MAX_CONCURRENT_EXTRACTIONS} run at once; retry shortly"
            ))
        running[0] += 1
        sink = StreamingExtraction(request, context, work)

        def done(result: Any) -> Any:
            running[0] -= 1
            return result

        sink.done.addBoth(done)
        return sink

    def extract_into(extract_path: str | None) -> Callable[[Any], tarsafe.ExtractionResult]:
        def work(raw: Any) -> tarsafe.ExtractionResult:
            if not extract_path:
                raise errors.InvalidInput("extract_path is required", "pass extract_path as a query parameter")
            return tarsafe.extract(raw, policy, extract_path, limits, aapi.max_upload_bytes, journal)

        return work

    def checked_extract_path(query: dict[str, str], required: bool = True) -> str | None:
        extract_path = query.get("extract_path")
        if extract_path is None:
            if required:
                raise errors.InvalidInput("extract_path is required", "pass extract_path as a query parameter")
            return None
        policy.resolve(extract_path, "extract_path")
        return extract_path

    # -- /upload/tar/stream ------------------------------------------------

    def stream_sink(request: Any, length: int | None) -> Any:
        request._parsePOSTFormSubmission = False
        try:
            extract_path = checked_extract_path(_query(request))
        except errors.PlexError as e:
            return RefusedBody(e)
        return streaming(request, extract_into(extract_path))

    context.stream_body(b"POST", STREAM_PATH, stream_sink)
    context.limit_body(b"POST", STREAM_PATH, aapi.max_upload_bytes)

    async def finish_streaming(request: Any) -> bytes:
        sink = streamed_body(request, StreamingExtraction)
        result = await sink.finish()
        return web.respond(request, result.to_json())

    app.route("/upload/tar/stream", methods=["POST"])(finish_streaming)

    # -- /upload/tar -------------------------------------------------------

    def tar_sink(request: Any, length: int | None) -> Any:
        request._parsePOSTFormSubmission = False
        boundary = _boundary(request.getHeader(b"content-type"))
        if boundary is None:
            # The legacy JSON form: an ordinary body, within its limit below.
            return None
        try:
            query = _query(request)
            extract_path = checked_extract_path(query, required=False)
        except errors.PlexError as e:
            return RefusedBody(e)

        def work(raw: Any) -> tarsafe.ExtractionResult:
            form = MultipartArchive(raw, boundary)
            fields = form.open()
            target = extract_path or fields.get("extract_path")
            return extract_into(target)(form)

        return streaming(request, work)

    context.stream_body(b"POST", TAR_PATH, tar_sink)
    # The multipart form streams (bounded by max_upload_bytes as it is
    # extracted); this is the limit of the legacy JSON form.
    context.limit_body(b"POST", TAR_PATH, aapi.max_json_bytes)

    @app.route("/upload/tar", methods=["POST"])
    async def upload_tar(request: Any) -> bytes:
        if isinstance(request.content, (StreamingExtraction, RefusedBody)):
            return await finish_streaming(request)
        body = read_json_object(request)
        extract_path = query_arg(request, "extract_path", required=False) or body.get("extract_path")
        if not isinstance(extract_path, str) or not extract_path:
            raise errors.InvalidInput("extract_path is required", "pass extract_path as a query parameter")
        policy.resolve(extract_path, "extract_path")
        data = body.get("data")
        if not isinstance(data, str):
            raise errors.InvalidInput("data is required", "send the archive base64-encoded in data, or as multipart tar_file")
        try:
            archive = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise errors.InvalidInput("invalid data", "data is not valid base64") from None
        del body, data
        result = await in_thread(extract_into(extract_path), io.BytesIO(archive))
        return web.respond(request, result.to_json())

    # -- /upload/tar/chunked -----------------------------------------------

    def chunk_sink(request: Any, length: int | None) -> Any:
        request._parsePOSTFormSubmission = False
        try:
            query = _query(request)
            chunk_id, index, total = chunks.validate_chunk_params(
                query.get("chunk_id"), query.get("chunk_index"), query.get("total_chunks")
            )
            checked_extract_path(query, required=False)
            if length is not None and length > aapi.max_upload_bytes:
                raise errors.TooLarge("upload too large", f"the limit is {aapi.max_upload_bytes} bytes")
            return ChunkSink(chunks.ChunkWriter(store, chunk_id, index, total, aapi.max_upload_bytes))
        except errors.PlexError as e:
            return RefusedBody(e)
        except OSError as e:
            return RefusedBody(storage_error(e, "upload chunk"))

    context.stream_body(b"POST", CHUNKED_PATH, chunk_sink)
    context.limit_body(b"POST", CHUNKED_PATH, aapi.max_upload_bytes)

    @app.route("/upload/tar/chunked", methods=["POST"])
    async def upload_chunk(request: Any) -> bytes:
        sink = streamed_body(request, ChunkSink)
        writer = sink.writer
        sink.claimed = True
        if writer.chunk_id in store.assembling:
            writer.discard()
            raise errors.Conflict("upload is being assembled", f"chunk_id {writer.chunk_id} is complete and being extracted")
        extract_path = _query(request).get("extract_path")
        status = await in_thread(store.accept, writer, extract_path)
        answer = {"success": True, "chunk_index": writer.index, **status.to_json()}
        target = extract_path or status.extract_path
        if not status.complete or not target:
            answer["extracted"] = False
            return web.respond(request, answer)
        if writer.chunk_id in store.assembling:
            answer["extracted"] = False
            return web.respond(request, answer)
        store.assembling.add(writer.chunk_id)
        try:
            def assemble() -> tarsafe.ExtractionResult:
                reader = store.reader(writer.chunk_id, status.total_chunks)
                try:
                    result = tarsafe.extract(reader, policy, target, limits, aapi.max_upload_bytes, journal)
                finally:
                    reader.close()
                store.remove(writer.chunk_id)
                return result

            result = await in_thread(assemble)
        finally:
            store.assembling.discard(writer.chunk_id)
        answer.update(result.to_json())
        answer["extracted"] = True
        return web.respond(request, answer)

    @app.route("/upload/tar/chunked", methods=["GET"])
    async def chunk_status(request: Any) -> bytes:
        chunk_id = query_arg(request, "chunk_id")
        if not chunks.CHUNK_ID.fullmatch(chunk_id or ""):
            raise errors.InvalidInput("invalid chunk_id", "chunk_id must be 1-128 letters, digits, '.', '_' or '-'")
        status = await in_thread(store.status, chunk_id)
        if status is None:
            raise errors.NotFound("upload not found", f"no chunks are held for chunk_id {chunk_id}")
        return web.respond(request, {"success": True, **status.to_json()})


class ChunkSink(_NoContent):
    """Spools one chunk's body into its upload directory as it arrives."""

    def __init__(self, writer: chunks.ChunkWriter) -> None:
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
