"""
Helpers the Docker route modules share: the body as a JSON object, and
streamed (chunked) responses fed by a ``host.docker.pool.Stream``.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from twisted.internet import defer
from twisted.python.failure import Failure

from plexagent import errors
from plexagent.http import responses

NDJSON = b"application/x-ndjson"


def json_object(request: Any) -> dict[str, Any]:
    body = responses.read_json(request)
    if not isinstance(body, dict):
        raise errors.InvalidInput("invalid body", "the body must be a JSON object")
    return body


def arg(request: Any, name: str) -> bytes | None:
    values = request.args.get(name.encode("ascii"))
    return values[0] if values else None


def stream_response(
    request: Any,
    start: Callable[[Callable[[Any], None]], Any],
    content_type: bytes,
    encode: Callable[[Any], bytes],
    trailer: Callable[[], Any] | None = None,
) -> defer.Deferred[bytes]:
    """
    Answer 200 with a chunked body: ``start(on_item)`` opens a
    ``host.docker.pool.Stream`` whose items are written as they come (with the
    stream registered as the request's producer, so a slow client slows
    the worker). When the client goes away the stream is stopped and its
    worker ends. If the stream fails, a last NDJSON error line is written
    (the status is already sent). ``trailer()`` may add a last item.
    """
    request.setResponseCode(200)
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"cache-control", b"no-cache")
    request.setHeader(b"x-content-type-options", b"nosniff")

    def on_item(item: Any) -> None:
        data = encode(item)
        if data:
            request.write(data)

    stream = start(on_item)
    request.registerProducer(stream, True)
    result: defer.Deferred[bytes] = defer.Deferred(lambda _: stream.stop())

    def ended(outcome: Any) -> None:
        if result.called:
            return
        try:
            request.unregisterProducer()
        except Exception:
            pass
        if isinstance(outcome, Failure):
            error = outcome.value
            if isinstance(error, errors.PlexError):
                doc = responses.error_document(error.message, error.details)
            else:
                doc = {"error": "internal error"}
            request.write(responses.encode_json(doc) + b"\n")
        elif trailer is not None:
            last = trailer()
            if last is not None:
                request.write(encode(last))
        result.callback(b"")

    stream.done.addBoth(ended)
    return result


def ndjson(item: Any) -> bytes:
    return json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
