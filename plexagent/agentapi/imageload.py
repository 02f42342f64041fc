"""
Request bodies that carry an image tar, streamed to ``docker load`` as they
arrive: raw (``application/x-tar``, ``application/octet-stream``),
``multipart/form-data`` with the file field ``image_tar``, or the legacy
JSON ``{"image_tar_b64": "..."}`` decoded on the fly. None of them is held
in memory: a bounded ``TarFeed`` sits between the socket and the worker
thread, and the socket is paused while the feed is full.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import multipart
from twisted.internet import defer
from twisted.logger import Logger

from plexagent import errors
from plexagent.http import web
from plexagent.host.docker.pool import DockerFacade, TarFeed

log = Logger()

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


class ImageTarSink(web.DiscardingContent):
    """
    The body sink of an image-load request (see ``AgentContext.stream_body``).

    The load starts on the first tar byte; the route calls ``finish()`` once
    the body is complete and gets the load result. A body over the upload
    limit or a lost connection aborts the load.
    """

    FIELD = "image_tar"
    B64_FIELD = "image_tar_b64"

    def __init__(self, request: Any, length: int | None, docker: DockerFacade, reactor: Any, limit: int) -> None:
        self._docker = docker
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
            self.result = self._docker.load(self.feed)
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



def register_load(app: Any, context: Any, path: str) -> None:
    """Route ``POST path`` as an image load with a streamed body."""
    docker = context.services["docker"]
    reactor = context.reactor
    limit = context.config.agent_api.max_upload_bytes

    context.stream_body(b"POST", path.encode("ascii"),
                        lambda request, length: ImageTarSink(request, length, docker, reactor, limit))
    context.limit_body(b"POST", path.encode("ascii"), limit)

    async def load(request: Any) -> bytes:
        sink = request.content
        if not isinstance(sink, ImageTarSink):
            raise errors.InvalidInput("the image tar is empty", "send the output of docker save as the body")
        return web.respond(request, await sink.finish())

    app.route(path, methods=["POST"], endpoint=f"load:{path}")(load)
