"""
The simulator's plexsphere side: the platform's node API as
docs/control-plane-plexsphere.md states it (register, state, heartbeat,
secrets, per-key reports, node key rotation, the signed event stream).
``ControlPlaneSimulator`` (simulator.py) owns the state, credentials,
faults and records these routes use; plexsphere_simstate.py the wire
details they share.

Every answer is checked after it is written: each request and its answer
go to ``sim.check_exchange``. Whatever an agent sent that the contract
forbids (other members, a gzip body, a bearer of another form, an
``Authorization`` on register, a report value over 4096 bytes...) is
appended to ``sim.violations``; errors are ``application/problem+json``.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import uuid
from typing import TYPE_CHECKING, Any, Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from klein import Klein
from twisted.web import http
from twisted.web.iweb import IRequest

from plexagent import errors, strictparse
from plexagent.controlplane import gojson
from plexagent.fileio import STORED_MAX_DEPTH, STORED_MAX_VALUES
from plexagent.testing import plexsphere_simstate as ps

if TYPE_CHECKING:
    from plexagent.testing.simulator import ControlPlaneSimulator, NodeCredentials

_NUMERIC_ID = re.compile(r"[0-9]+")
_UNPARSED = object()

Handler = Callable[..., Any]


class Refusal(Exception):
    """An answer other than success: a problem document."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.headers = headers or {}


def parse_json(raw: bytes) -> Any:
    """The body parsed strictly; ``_UNPARSED`` when it is not JSON."""
    try:
        return strictparse.parse_json(raw, max_depth=STORED_MAX_DEPTH, max_values=STORED_MAX_VALUES)
    except errors.InvalidInput:
        return _UNPARSED


def _headers(raw: Any) -> dict[str, str]:
    return {name.decode("latin-1").lower(): ", ".join(v.decode("latin-1") for v in values)
            for name, values in raw.getAllRawHeaders()}


class PlexsphereRoutes:
    """The plexsphere platform's node endpoints over a ``ControlPlaneSimulator``."""

    app = Klein()

    def __init__(self, sim: "ControlPlaneSimulator") -> None:
        self.sim = sim

    def resource(self) -> Any:
        return self.app.resource()

    # -- plumbing -----------------------------------------------------------

    def violation(self, endpoint: str, text: str) -> None:
        self.sim.violations.append(f"{endpoint}: {text}")

    def problem(self, request: IRequest, endpoint: str, refusal: Refusal) -> bytes:
        body: dict[str, Any] = {"type": "about:blank", "title": http.RESPONSES.get(refusal.status, b"Error").decode(),
                                "status": refusal.status, "detail": refusal.detail,
                                "instance": request.path.decode("utf-8", "replace"), "code": refusal.code}
        if refusal.status == 403 and endpoint in ps.PERMISSION_DENIED:
            body["reason"] = "out_of_scope"
            body["correlation_id"] = str(uuid.uuid4())
        request.setResponseCode(refusal.status)
        request.setHeader(b"content-type", b"application/problem+json")
        for name, value in refusal.headers.items():
            request.setHeader(name.encode(), value.encode())
        return json.dumps(body).encode()

    def answer(self, request: IRequest, value: Any, code: int = 200) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(value).encode()

    def check(self, request: Any, endpoint: str, raw: bytes, body: bytes) -> None:
        self.sim.check_exchange(endpoint, request.method.decode(), request.uri.decode("utf-8", "replace"),
                                _headers(request.requestHeaders), raw, request.code,
                                _headers(request.responseHeaders), body)

    def authorize(self, request: IRequest, endpoint: str, path_id: str | None) -> "NodeCredentials":
        """The node the bearer names (and the path, when it has an id); Refusal otherwise."""
        sim = self.sim
        header = request.getHeader(b"authorization")
        if header is None:
            self.violation(endpoint, "no Authorization header")
            raise Refusal(401, "unauthorized", "an Authorization bearer is required")
        parsed = ps.parse_bearer(header)
        if parsed is None:
            self.violation(endpoint, "the Authorization header is not 'Bearer nsk_plexd_<base64url(node id, nsk)>'")
            raise Refusal(401, "unauthorized", "the bearer is not a node secret key bearer")
        env, node_id, nsk = parsed
        if env != ps.BEARER_ENV:
            self.violation(endpoint, f"the bearer's env segment is {env!r}, not {ps.BEARER_ENV!r}")
        node = sim.nodes.get(node_id)
        if node is None or node.deregistered or nsk != sim.nsk_of(node):
            raise Refusal(401, "unauthorized", "the bearer names no node this control plane knows")
        if sim.faults.bearer_revoked:
            raise Refusal(401, "nsk_revoked" if endpoint == "heartbeat" else "unauthorized",
                          "the node secret key has been revoked")
        if path_id is not None and path_id != node.node_id:
            raise Refusal(403, "node_id_mismatch", "the bearer names another node than the path")
        return node

    def refuse_by_fault(self, endpoint: str) -> None:
        faults = self.sim.faults
        if endpoint in faults.not_provisioned:
            raise Refusal(501, ps.NOT_PROVISIONED.get(endpoint, "not_provisioned"), f"{endpoint} is not provisioned")
        failure = faults.take_failure(endpoint)
        if failure is not None:
            code = failure.code or ps.DEFAULT_CODES.get((endpoint, failure.status), "injected_failure")
            headers = {"Retry-After": str(failure.retry_after)} if failure.retry_after is not None else {}
            raise Refusal(failure.status, code, "injected failure", headers)

    async def serve(self, request: Any, endpoint: str, path_id: str | None, handler: Handler,
                    *args: Any, auth: bool = True) -> Any:
        """One request: record, faults, bearer, the handler, the delay, the exchange check."""
        sim = self.sim
        sim.record_request(request, endpoint)
        raw = request.content.read() if request.content is not None else b""
        if sim.faults.take_cut(endpoint):
            finished = request.notifyFinish()
            request.channel.transport.abortConnection()
            await finished.addErrback(lambda _: None)
            return b""
        try:
            if (request.getHeader(b"content-encoding") or b"").strip():
                self.violation(endpoint, "the request body has a Content-Encoding (bodies go uncompressed)")
                raise Refusal(400, "unsupported_content_encoding", "request bodies must not be encoded")
            node = self.authorize(request, endpoint, path_id) if auth else None
            self.refuse_by_fault(endpoint)
            result = handler(request, node, raw, *args)
            body = await result if inspect.isawaitable(result) else result
        except Refusal as refusal:
            body = self.problem(request, endpoint, refusal)
        if request.code == 200 and endpoint == "events":
            return body  # an open stream: checked when it opened
        body = await sim.delayed(body, endpoint)
        self.check(request, endpoint, raw, body)
        return body

    def members(self, endpoint: str, raw: bytes, required: frozenset[str], optional: frozenset[str],
                code: str) -> dict[str, Any]:
        body = parse_json(raw)
        if not isinstance(body, dict):
            self.violation(endpoint, "the body is not a JSON object")
            raise Refusal(400, code, "the body must be a JSON object")
        missing, unknown = sorted(required - set(body)), sorted(set(body) - required - optional)
        if missing or unknown:
            self.violation(endpoint, f"members: missing {missing}, unknown {unknown}")
            raise Refusal(400, code, f"missing members {missing}, unknown members {unknown}")
        wrong = sorted(k for k in set(body) & (required | optional) if not isinstance(body[k], str)
                       and not (k == "nat_summary" and isinstance(body[k], dict)))
        if wrong:
            self.violation(endpoint, f"members of the wrong type: {wrong}")
            raise Refusal(400, code, f"members of the wrong type: {wrong}")
        return body

    # -- enrollment -----------------------------------------------------------

    @app.route("/v1/register", methods=["POST"])
    async def register(self, request: IRequest) -> Any:
        return await self.serve(request, "register", None, self._register, auth=False)

    def _register(self, request: IRequest, _: Any, raw: bytes) -> bytes:
        sim = self.sim
        if request.getHeader(b"authorization") is not None:
            self.violation("register", "an Authorization header (register takes none)")
        sim.registration_attempts.append(parse_json(raw))
        body = self.members("register", raw, ps.REGISTER_MEMBERS, frozenset({"requested_resource_id"}),
                            "malformed_register_request")
        if body.get("requested_resource_id") == "":
            self.violation("register", "requested_resource_id sent empty (it is sent only when set)")
        key = body["public_key"]
        try:
            raw_key = gojson.std_b64decode(key)
        except ValueError:
            raw_key = b""
        if len(key) != 44 or len(raw_key) != 32 or raw_key == bytes(32):
            raise Refusal(400, "public_key_invalid", "public_key must be standard base64 of a non-zero X25519 key")
        token = body["bootstrap_token"]
        if token not in sim.bootstrap_uses:
            raise Refusal(403, "token_revoked", "the bootstrap token is not one this control plane issued")
        if sim.bootstrap_uses[token] <= 0:
            raise Refusal(403, "token_consumed", "the bootstrap token has been used")
        if body["project_id"] != sim.project_id:
            raise Refusal(403, "project_mismatch", "project_id is not the token's project")
        if body["resource_handle"] != sim.resource_handle:
            raise Refusal(404, "resource_not_found", "no resource has that handle")
        if not body["nonce"]:
            raise Refusal(400, "malformed_register_request", "nonce must not be empty")
        if body["nonce"] in sim.registration_nonces:
            raise Refusal(403, "nonce_collision", "the nonce has been used")
        sim.use_bootstrap_token(token)
        sim.registration_nonces.add(body["nonce"])
        sim.registrations.append(body)
        node = sim.register_node(key)
        answer = {"node_id": node.node_id, "mesh_ip": node.mesh_ip, "signing_public_key": sim.signing_public_key_wire,
                  "signing_key_id": sim.signing_key_id, "nsk": node.nsk_text, "peer_snapshot": [],
                  "domain_mesh_cidr": "10.99.0.0/16"}
        answer.update(sim.faults.registration_answer)
        out = self.answer(request, answer)
        for hook in list(sim.registration_hooks):
            hook(sim, node)
        return out

    # -- node calls -----------------------------------------------------------

    @app.route("/v1/nodes/<node_id>/state", methods=["GET"])
    async def state(self, request: IRequest, node_id: str) -> Any:
        return await self.serve(request, "state", node_id,
                                lambda request, node, raw: self.answer(request, ps.snapshot(self.sim)))

    @app.route("/v1/nodes/<node_id>/heartbeat", methods=["POST"])
    async def heartbeat(self, request: IRequest, node_id: str) -> Any:
        return await self.serve(request, "heartbeat", node_id, self._heartbeat)

    def _heartbeat(self, request: IRequest, node: "NodeCredentials", raw: bytes) -> bytes:
        sim = self.sim
        sim.heartbeats.append(parse_json(raw))
        body = self.members("heartbeat", raw, ps.HEARTBEAT_MEMBERS, frozenset(), "malformed_heartbeat_request")
        if not isinstance(body["nat_summary"], dict):
            self.violation("heartbeat", "nat_summary is not an object")
            raise Refusal(400, "malformed_heartbeat_request", "nat_summary must be an object")
        try:
            client_now = gojson.GoTime.parse(body["client_now"].encode())
        except ValueError:
            self.violation("heartbeat", "client_now is not an RFC 3339 time")
            raise Refusal(400, "malformed_heartbeat_request", "client_now must be an RFC 3339 time") from None
        if not body["client_now"].endswith("Z"):
            self.violation("heartbeat", "client_now is not written in UTC")
        if body["binary_checksum"] == "":
            self.violation("heartbeat", "binary_checksum is empty")
            raise Refusal(400, "binary_checksum_empty", "binary_checksum must not be empty")
        if body["binary_version"] == "":
            self.violation("heartbeat", "binary_version is empty")
            raise Refusal(400, "binary_version_empty", "binary_version must not be empty")
        try:
            checksum = gojson.std_b64decode(body["binary_checksum"])
        except ValueError:
            checksum = b""
        if len(body["binary_checksum"]) != 44 or len(checksum) != 32:
            self.violation("heartbeat", "binary_checksum is not standard base64 of a SHA-256")
        if not body["binary_version"].startswith("plexagent/"):
            self.violation("heartbeat", "binary_version does not start with 'plexagent/'")
        if abs(client_now.unix_ns / 1e9 - sim.now()) > 60:
            raise Refusal(400, "clock_skew", "client_now is more than 60 s away from the control plane's clock")
        reconcile = sim.faults.take("heartbeat_reconcile")
        rotate_keys = sim.faults.take("heartbeat_rotate_keys")
        if rotate_keys:
            node.rotation_pending = True
        return self.answer(request, {"accepted_at": sim.go_time(sim.now()), "reconcile": reconcile,
                                     "rotate_keys": rotate_keys})

    @app.route("/v1/nodes/<node_id>/secrets/<path:name>", methods=["GET"])
    async def secret(self, request: IRequest, node_id: str, name: str) -> Any:
        return await self.serve(request, "secret", node_id, self._secret, name)

    def _secret(self, request: IRequest, node: "NodeCredentials", raw: bytes, name: str) -> bytes:
        sim = self.sim
        if not ps.SECRET_NAME.fullmatch(name):
            self.violation("secret", f"the secret name {name!r} is outside ^[a-z][a-z0-9_-]{{0,62}}$")
            raise Refusal(404, "secret_not_found", "no secret has that name")
        versions = request.args.get(b"version")
        wanted: int | None = None
        if versions is not None:
            text = versions[-1].decode("utf-8", "replace")
            if not _NUMERIC_ID.fullmatch(text) or int(text) < 1:
                self.violation("secret", "version is not a positive integer")
                raise Refusal(400, "invalid_version", "version must be a positive integer")
            wanted = int(text)
        if name not in sim.node.secrets:
            raise Refusal(404, "secret_not_found", "no secret has that name")
        plaintext, version = sim.node.secrets[name]
        if wanted is not None and wanted != version:
            older = sim.secret_history.get(name, {})
            if wanted not in older:
                raise Refusal(404, "secret_version_not_found", "the secret has no such version")
            plaintext, version = older[wanted], wanted
        nonce = os.urandom(12)
        body = bytearray(nonce + AESGCM(sim.nsk_of(node)).encrypt(nonce, plaintext, None))
        if sim.faults.tamper_secrets:
            body[-1] ^= 0x01
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/octet-stream")
        header = sim.faults.secret_version_header
        request.setHeader(b"x-plexsphere-secret-version", (str(version) if header is None else header).encode())
        request.setHeader(b"x-plexsphere-secret-kid", f"nsk-{node.node_id}-v{node.wrap_key_version}".encode())
        request.setHeader(b"cache-control", b"no-store")
        return bytes(body)

    @app.route("/v1/nodes/<node_id>/state/reports/<path:key>", methods=["PUT", "DELETE"])
    async def report(self, request: IRequest, node_id: str, key: str) -> Any:
        return await self.serve(request, "report", node_id, self._report, key)

    def _report(self, request: IRequest, node: "NodeCredentials", raw: bytes, key: str) -> bytes:
        sim = self.sim
        method = request.method.decode()
        value: str | None = None
        if method == "PUT":
            body = parse_json(raw)
            value = body.get("value") if isinstance(body, dict) else None
        sim.report_calls.append((method, key, value))
        if not ps.REPORT_KEY.fullmatch(key):
            self.violation("report", f"the report key {key!r} is outside ^[a-z][a-z0-9._-]{{0,127}}$")
            raise Refusal(404 if method == "DELETE" else 400,
                          "report_not_found" if method == "DELETE" else "invalid_report", "invalid report key")
        if method == "DELETE":
            if raw:
                self.violation("report", "a DELETE with a body")
            if key not in sim.node.reports:
                raise Refusal(404, "report_not_found", "no report has that key")
            del sim.node.reports[key]
            request.setResponseCode(204)
            return b""
        body = self.members("report", raw, frozenset({"value"}), frozenset(), "invalid_report")
        value = body["value"]
        if len(value.encode("utf-8")) > ps.MAX_REPORT_BYTES:
            self.violation("report", f"the value of {key!r} is over 4096 UTF-8 bytes")
            raise Refusal(400, "invalid_report", "value exceeds 4096 bytes")
        refused = sim.faults.refused_report_keys.get(key)
        if refused is not None:
            raise Refusal(refused, "invalid_report" if refused == 400 else
                          ps.DEFAULT_CODES.get(("report", refused), "report_refused"), f"report {key} refused")
        accepted_at = sim.go_time(sim.now())
        known = sim.node.reports.get(key)
        sim.node.reports[key] = {"key": key, "value": value, "payload": ps.report_payload(value),
                                 "accepted_at": accepted_at, "puts": (known["puts"] if known else 0) + 1}
        return self.answer(request, {"accepted_at": accepted_at, "key": key})

    @app.route("/v1/keys/rotate", methods=["POST"])
    async def keys_rotate(self, request: IRequest) -> Any:
        return await self.serve(request, "keys_rotate", None, self._keys_rotate)

    def _keys_rotate(self, request: IRequest, node: "NodeCredentials", raw: bytes) -> bytes:
        sim = self.sim
        body = self.members("keys_rotate", raw, frozenset({"new_public_key"}), frozenset(),
                            "malformed_keys_rotate_request")
        key = body["new_public_key"]
        sim.key_rotations.append({"node_id": node.node_id, "new_public_key": key})
        try:
            decoded = gojson.std_b64decode(key)
        except ValueError:
            decoded = b""
        if len(decoded) != 32:
            self.violation("keys_rotate", "new_public_key is not standard base64 of 32 bytes")
            raise Refusal(422, "keys_rotate_public_key_invalid", "new_public_key must be base64 of 32 bytes")
        if not node.rotation_pending:
            raise Refusal(409, "keys_rotate_no_pending_rotation", "no key rotation is pending for this node")
        if key == node.public_key:
            raise Refusal(422, "keys_rotate_public_key_unchanged", "new_public_key is the node's current key")
        node.rotation_pending = False
        node.public_key = key
        node.wrap_key_version += 1
        return self.answer(request, {"rotation_id": str(uuid.uuid4()), "kid": f"nsk-{node.node_id}-v"
                                     f"{node.wrap_key_version}", "wrap_key_version": node.wrap_key_version})

    @app.route("/v1/nodes/<node_id>/events", methods=["GET"])
    async def events(self, request: IRequest, node_id: str) -> Any:
        return await self.serve(request, "events", node_id, self._events)

    def _events(self, request: IRequest, node: "NodeCredentials", raw: bytes) -> Any:
        sim = self.sim
        last_id = (request.getHeader(b"last-event-id") or b"").decode("utf-8", "replace")
        sim.stream_requests.append(last_id)
        if last_id and not _NUMERIC_ID.fullmatch(last_id):
            self.violation("events", "Last-Event-ID is not a non-negative integer")
            raise Refusal(400, "invalid_last_event_id", "Last-Event-ID must be a non-negative integer")
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-plexsphere-api-version", b"v1")
        opening = b":keep-alive\n\n"
        if last_id:
            opening += b"".join(event.frame(node.node_id) for event in sim.published if event.seq > int(last_id))
        done = sim.start_stream(request, node, opening)
        self.check(request, "events", raw, opening)
        return done
