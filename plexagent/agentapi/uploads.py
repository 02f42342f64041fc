"""
File Upload (seed: /upload/tar, /upload/tar/stream, /upload/tar/chunked).

Request bodies never sit in memory. ``/upload/tar/stream`` and the multipart
form of ``/upload/tar`` are claimed with ``context.stream_body``: as the body
arrives it goes through a bounded pipe into a worker thread that extracts it
(``plexagent.host.files.tarsafe``) at the same time; when the pipe is full the
connection stops being read, so a fast client cannot outrun the disk. Chunks
of ``/upload/tar/chunked`` are spooled straight into their upload directory
(``plexagent.host.files.chunks``). Only the legacy JSON form (base64 ``data``) is read
whole, bounded by ``agent_api.max_json_bytes``.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from typing import Any, Callable

from klein import Klein
from twisted.internet import threads
from twisted.logger import Logger

from plexagent import errors
from plexagent.agentapi.files import path_policy, query_arg, read_json_object
from plexagent.fileio import storage_error
from plexagent.host.files import chunks, tarsafe
from plexagent.host.files.staging import StagingJournal
from plexagent.http import responses
from plexagent.http.bodies import (
    ChunkSink,
    MultipartArchive,
    RefusedBody,
    StreamingExtraction,
    multipart_boundary,
    query_params,
    streamed_body,
)

log = Logger()

STREAM_PATH = b"/upload/tar/stream"
TAR_PATH = b"/upload/tar"
CHUNKED_PATH = b"/upload/tar/chunked"

#: Extractions running at once; more are refused with 503 (each has a thread).
MAX_CONCURRENT_EXTRACTIONS = 8


def register(app: Klein, context: Any) -> None:
    policy = path_policy(context)
    aapi = context.config.agent_api
    reactor = context.reactor
    limits = tarsafe.Limits(max_bytes=aapi.max_upload_bytes, max_members=aapi.max_archive_members)
    store = context.services.get("chunks")
    if store is None:
        store = context.services["chunks"] = chunks.ChunkStore(
            os.path.join(context.config.node.data_dir, "uploads"), aapi.max_upload_bytes, aapi.chunk_max_age,
            max_uploads=aapi.max_chunked_uploads,
        )

    journal = context.services.get("staging_journal")
    if journal is None:
        journal = context.services["staging_journal"] = StagingJournal(
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
            extract_path = checked_extract_path(query_params(request))
        except errors.PlexError as e:
            return RefusedBody(e)
        return streaming(request, extract_into(extract_path))

    context.stream_body(b"POST", STREAM_PATH, stream_sink)
    context.limit_body(b"POST", STREAM_PATH, aapi.max_upload_bytes)

    async def finish_streaming(request: Any) -> bytes:
        sink = streamed_body(request, StreamingExtraction)
        result = await sink.finish()
        return responses.respond(request, result.to_json())

    app.route("/upload/tar/stream", methods=["POST"])(finish_streaming)

    # -- /upload/tar -------------------------------------------------------

    def tar_sink(request: Any, length: int | None) -> Any:
        request._parsePOSTFormSubmission = False
        boundary = multipart_boundary(request.getHeader(b"content-type"))
        if boundary is None:
            # The legacy JSON form: an ordinary body, within its limit below.
            return None
        try:
            query = query_params(request)
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
        return responses.respond(request, result.to_json())

    # -- /upload/tar/chunked -----------------------------------------------

    def chunk_sink(request: Any, length: int | None) -> Any:
        request._parsePOSTFormSubmission = False
        try:
            query = query_params(request)
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
        extract_path = query_params(request).get("extract_path")
        status = await in_thread(store.accept, writer, extract_path)
        answer = {"success": True, "chunk_index": writer.index, **status.to_json()}
        target = extract_path or status.extract_path
        if not status.complete or not target:
            answer["extracted"] = False
            return responses.respond(request, answer)
        if writer.chunk_id in store.assembling:
            answer["extracted"] = False
            return responses.respond(request, answer)
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
        return responses.respond(request, answer)

    @app.route("/upload/tar/chunked", methods=["GET"])
    async def chunk_status(request: Any) -> bytes:
        chunk_id = query_arg(request, "chunk_id")
        if not chunks.CHUNK_ID.fullmatch(chunk_id or ""):
            raise errors.InvalidInput("invalid chunk_id", "chunk_id must be 1-128 letters, digits, '.', '_' or '-'")
        status = await in_thread(store.status, chunk_id)
        if status is None:
            raise errors.NotFound("upload not found", f"no chunks are held for chunk_id {chunk_id}")
        return responses.respond(request, {"success": True, **status.to_json()})
