"""
The Local Node API route tree (docs/openapi/local-node-api.yaml): parse, call, render.

Authentication happens before these routes (``auth.GuardedResource``); the
listener's policy is on ``request.plexagent_policy`` for the one decision a
route makes itself: whether the client may read secret values.
"""

from __future__ import annotations

from typing import Any, Callable, cast

from twisted.internet import defer
from twisted.web.iweb import IRequest

from plexagent import errors, strictparse
from plexagent.controlplane.protocol import ControlPlaneError, LocalRules
from plexagent.http import responses
from plexagent.node.reports import ReportStore
from plexagent.node.secrets import DecryptionFailed
from plexagent.node.state import StateCache

FORBIDDEN_SECRETS = "forbidden: insufficient privileges for secret access"


def parse_if_match(request: IRequest) -> int | None:
    raw = request.getHeader(b"if-match")
    if raw is None:
        return None
    try:
        # Surrounding whitespace is not part of an HTTP header's value.
        return strictparse.parse_int(raw.strip(b" \t"))
    except ValueError:
        raise errors.InvalidInput("If-Match must be an integer") from None


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return "a string"


def parse_report_body(body: Any) -> tuple[str, Any]:
    if not isinstance(body, dict):
        raise errors.InvalidInput("invalid JSON body", "the body must be a JSON object")
    content_type = body.get("content_type")
    if content_type is None or content_type == "":
        raise errors.InvalidInput("content_type is required")
    if not isinstance(content_type, str):
        raise errors.InvalidInput(
            "content_type must be a string", f"got {_json_type(content_type)}; send e.g. \"application/json\""
        )
    if "payload" not in body:
        raise errors.InvalidInput("payload must be valid JSON")
    return content_type, body["payload"]


class SecretReader:
    """
    Reads one secret value: the protocol's rules decide what may be asked
    (for plexd: a key in the cached index), the session fetches and
    decrypts it. Nothing is kept afterwards.
    """

    def __init__(self, cache: StateCache, session: Callable[[], Any], rules: LocalRules) -> None:
        self._cache = cache
        self._session = session
        self._rules = rules

    async def read(self, key: str, version: bytes | None = None) -> dict[str, Any]:
        index = self._cache.current.secret_refs
        query = self._rules.secret_query(key, version, index)
        session = self._session()
        if session is None:
            raise errors.Unavailable("control plane unavailable")
        try:
            value = await session.fetch_secret(query)
        except ControlPlaneError as e:
            raise self._rules.secret_error(e) from None
        except DecryptionFailed:
            raise errors.UpstreamFailed("decryption failed") from None
        return self._rules.secret_document(value, index)


class NodeAPI:
    """Routes of the Local Node API over the shared domain objects."""

    app = responses.json_app()

    def __init__(self, cache: StateCache, reports: ReportStore, secrets: SecretReader, rules: LocalRules) -> None:
        self.cache = cache
        self.reports = reports
        self.secrets = secrets
        #: what the control plane's wire protocol can carry, checked before anything is stored
        self.rules = rules

    def resource(self) -> Any:
        return self.app.resource()

    @app.route("/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        from plexagent.http.openapi import document_json

        body = document_json("local-node-api")
        request.setHeader(b"content-type", responses.JSON_CONTENT_TYPE)
        request.setHeader(b"content-length", b"%d" % len(body))
        return body

    @app.route("/v1/state", methods=["GET"])
    def state(self, request: IRequest) -> bytes:
        current = self.cache.current
        return responses.respond(
            request,
            {
                "metadata": dict(current.metadata),
                "data_keys": current.data_summaries(),
                "secret_keys": current.secret_summaries(),
                "report_keys": self.reports.list(),
            },
        )

    @app.route("/v1/state/metadata", methods=["GET"])
    def metadata(self, request: IRequest) -> bytes:
        return responses.respond(request, dict(self.cache.current.metadata))

    @app.route("/v1/state/metadata/<path:key>", methods=["GET"])
    def metadata_key(self, request: IRequest, key: str) -> bytes:
        value = self.cache.current.metadata.get(key)
        if value is None:
            raise errors.NotFound("not found")
        return responses.respond(request, {"key": key, "value": value})

    @app.route("/v1/state/data", methods=["GET"])
    def data(self, request: IRequest) -> bytes:
        return responses.respond(request, self.cache.current.data_summaries())

    @app.route("/v1/state/data/<path:key>", methods=["GET"])
    def data_key(self, request: IRequest, key: str) -> bytes:
        entry = self.cache.current.data.get(key)
        if entry is None:
            raise errors.NotFound("not found")
        return responses.respond(request, entry)

    @app.route("/v1/state/secrets", methods=["GET"])
    def secrets_index(self, request: IRequest) -> bytes:
        return responses.respond(request, self.cache.current.secret_summaries())

    @app.route("/v1/state/secrets/<path:key>", methods=["GET"])
    async def secret(self, request: IRequest, key: str) -> bytes:
        if not cast(Any, request).plexagent_policy.may_read_secrets(request):
            raise errors.Forbidden(FORBIDDEN_SECRETS)
        version = request.args.get(b"version", [None])[0] if request.args else None
        value = await self.secrets.read(key, version)
        request.setHeader(b"cache-control", b"no-store")
        return responses.respond(request, value)

    @app.route("/v1/state/report", methods=["GET"])
    def report_index(self, request: IRequest) -> bytes:
        return responses.respond(request, self.reports.list())

    @app.route("/v1/state/report/<path:key>", methods=["GET"])
    def report_get(self, request: IRequest, key: str) -> bytes:
        self.rules.check_report_key(key)
        return responses.respond(request, self.reports.get(key))

    @app.route("/v1/state/report/<path:key>", methods=["PUT"])
    def report_put(self, request: IRequest, key: str) -> defer.Deferred[bytes]:
        self.rules.check_report_key(key)
        content_type, payload = parse_report_body(responses.read_json(request))
        self.rules.check_report_put(key, payload)
        if_match = parse_if_match(request)
        d = self.reports.put(key, content_type, payload, if_match)
        return d.addCallback(lambda entry: responses.respond(request, entry))

    @app.route("/v1/state/report/<path:key>", methods=["DELETE"])
    def report_delete(self, request: IRequest, key: str) -> defer.Deferred[bytes]:
        self.rules.check_report_key(key)
        if_match = parse_if_match(request)

        def deleted(_: Any) -> bytes:
            request.setResponseCode(204)
            return b""

        return self.reports.delete(key, if_match).addCallback(deleted)
