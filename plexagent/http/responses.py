"""
JSON responses and requests: the one error -> status mapping, JSON bodies
through the one strict parser, Klein apps whose failures are all JSON, and
per-route labels for metrics.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

from klein import Klein
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from werkzeug.exceptions import MethodNotAllowed
from werkzeug.exceptions import NotFound as RouteNotFound
from werkzeug.routing import PathConverter, RequestRedirect

from plexagent import errors, strictparse

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
    errors.RateLimited: 429,
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
    if isinstance(error, errors.RateLimited) and error.retry_after is not None:
        request.setHeader(b"retry-after", b"%d" % error.retry_after)
    return respond(request, error_document(error.message, error.details), status_for(error))


def read_body(request: IRequest) -> bytes:
    """The (already size-limited) request body."""
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    return content.read()


def read_json(request: IRequest) -> Any:
    """
    The request body parsed by the one strict JSON parser, or 400
    ``invalid JSON body`` saying what is wrong and where.
    """
    raw = read_body(request)
    # The body sink already bounded the size; the parser need not again.
    return strictparse.parse_json(raw, max_bytes=max(len(raw), 1))


class _AnyPath(PathConverter):
    """
    ``<path:key>`` that takes the rest of the path as given: werkzeug's own
    will not start with '/', so a key such as ``/etc/x`` (sent as
    ``%2Fetc%2Fx``) would name no route.
    """

    regex = ".+?"
    part_isolating = False


def json_app() -> Klein:
    """
    A Klein app that answers only JSON and routes each path as given.

    werkzeug by default merges ``//`` and adds or drops a trailing slash by
    *redirecting* (an exception Klein does not render): a key beginning
    with '/' (``/v1/state/report/%2Fetc`` arrives as ``.../report//etc``)
    or a stray ``//`` would be a 500. Here such a path is routed as it is,
    and one that matches no route is the usual JSON 404.
    """
    app = Klein()
    url_map = app.url_map
    url_map.merge_slashes = False
    url_map.strict_slashes = False
    url_map.redirect_defaults = False
    url_map.converters["path"] = _AnyPath
    install_error_handlers(app)
    return app


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

    @app.handle_errors(RequestRedirect)  # type: ignore[arg-type]  # *args: see above
    def route_redirect(*args: Any) -> bytes:
        # json_app() turns werkzeug's redirects off; should one come anyway,
        # the path as given names no route.
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


def refuse_unservable(request: Any) -> None:
    """
    Raise the error for a request that no route may see: its body was over
    the limit (413), or its path or Host header cannot be decoded (400,
    which Klein would answer in HTML). Called once the listener's policy
    has let the request in, so a refused client learns nothing more.
    """
    if getattr(request.content, "exceeded", False):
        limit = getattr(request, "body_limit", None) or request.channel.site.max_body_bytes
        raise errors.TooLarge("request body too large", f"the limit is {limit} bytes")
    try:
        b"/".join(request.prepath + request.postpath).decode("utf-8")
    except UnicodeDecodeError:
        raise errors.InvalidInput(
            "invalid URL", "the path must be UTF-8 (percent-escape its bytes as UTF-8)"
        ) from None
    host = request.getHeader(b"host")
    if host is not None and not host.isascii():
        raise errors.InvalidInput("invalid Host header", "the Host header must be ASCII")


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
