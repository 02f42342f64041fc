"""
The simulator's plexd side: the routes of plexd's protocol as plexd's own
client calls them (docs/control-plane.md) and its signed events, exactly as
a Go control plane writes them. ``ControlPlaneSimulator`` (simulator.py)
owns the state, credentials, faults and records these routes use.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import zlib
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from klein import Klein
from twisted.web.iweb import IRequest

from plexagent import errors, strictparse
from plexagent.controlplane import gojson
from plexagent.controlplane.gojson import GoTime
from plexagent.controlplane.plexd_events import sign_plexd_event
from plexagent.fileio import STORED_MAX_DEPTH, STORED_MAX_VALUES
from plexagent.node.secrets import SecretBox

if TYPE_CHECKING:
    from plexagent.testing.simulator import ControlPlaneSimulator, NodeCredentials

#: What a plexd heartbeat holds, in Go's order.
HEARTBEAT_MEMBERS = ["node_id", "timestamp", "status", "uptime", "binary_checksum"]


def read_body(request: IRequest) -> Any:
    """The request body, gunzipped when it says so, parsed strictly; ValueError if it is not JSON."""
    raw = request.content.read()
    if (request.getHeader(b"content-encoding") or b"").strip().lower() == b"gzip":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error):
            raise ValueError("body is not valid gzip") from None
    try:
        return strictparse.parse_json(raw, max_depth=STORED_MAX_DEPTH, max_values=STORED_MAX_VALUES)
    except errors.InvalidInput as e:
        raise ValueError(f"body is not JSON: {e.details}") from None


def frame(event_id: str, event_type: str, wire: bytes) -> bytes:
    """One SSE event: id, event, and the envelope as data lines (a multi-line envelope stays multi-line)."""
    data = b"".join(b"data: " + line + b"\n" for line in wire.split(b"\n"))
    return b"id: " + event_id.encode() + b"\nevent: " + event_type.encode() + b"\n" + data + b"\n"


def public_b64(key: Ed25519PrivateKey) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode("ascii")


def flip_bit(b64: bytes) -> bytes:
    raw = bytearray(base64.b64decode(b64))
    raw[0] ^= 0x01
    return base64.b64encode(bytes(raw))


def plexd_envelope(sim: "ControlPlaneSimulator", event_type: str, event_id: str, payload_raw: bytes | None, *,
                   issued_offset: float = 0.0, issued: GoTime | None = None, wire_issued_at: bytes | None = None,
                   nonce: str | None = None,
                   sign_with: Ed25519PrivateKey | None = None, bad_signature: bool = False,
                   signature: str | None = None) -> tuple[bytes, str]:
    """
    The wire bytes of one envelope signed as plexd's verifier checks it, and
    its nonce. ``issued``: the time to sign (default now). Forgeries:
    ``issued_offset`` (seconds from now: stale or future), ``wire_issued_at`` (the time written differently from what was
    signed), ``sign_with`` (another key), ``bad_signature`` (a flipped bit),
    ``signature`` ("" for a missing one).
    """
    nonce = nonce if nonce is not None else base64.b64encode(os.urandom(16)).decode("ascii")
    if issued is None:
        issued = GoTime.from_unix_ns(round((sim.now() + issued_offset) * 1e9))
    wire, _ = sign_plexd_event(sign_with or sim.signing_key, event_type, event_id, issued, nonce, payload_raw)
    if wire_issued_at is not None:
        wire = wire.replace(b'"issued_at":"' + issued.marshal() + b'"', b'"issued_at":"' + wire_issued_at + b'"', 1)
    head, _, tail = wire.rpartition(b',"signature":"')
    sig = tail[:-2]
    if bad_signature:
        sig = flip_bit(sig)
    if signature is not None:
        wire = head + (b',"signature":' + gojson.encode_string(signature) if signature else b"") + b"}"
    else:
        wire = head + b',"signature":"' + sig + b'"}'
    return wire, nonce


class PlexdRoutes:
    """plexd's endpoints over a ``ControlPlaneSimulator``."""

    app = Klein()

    def __init__(self, sim: "ControlPlaneSimulator") -> None:
        self.sim = sim

    def resource(self) -> Any:
        return self.app.resource()

    def _json(self, request: IRequest, value: Any, code: int = 200) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(value).encode()

    def _injected(self, request: IRequest, endpoint: str) -> bytes | None:
        failure = self.sim.faults.take_failure(endpoint)
        if failure is None:
            return None
        if failure.retry_after is not None:
            request.setHeader(b"retry-after", str(failure.retry_after).encode())
        return self._json(request, {"error": "injected failure"}, failure.status)

    def _node(self, request: IRequest, endpoint: str, node_id: str) -> tuple["NodeCredentials | None", Any]:
        """The node a request is for, or (None, the refusal to send)."""
        sim = self.sim
        sim.record_request(request, endpoint)
        node = sim.nodes.get(node_id)
        if node is None or node.deregistered:
            return None, self._json(request, {"error": "unknown node"}, 404)
        auth = request.getHeader(b"authorization") or b""
        if sim.faults.bearer_revoked or auth != b"Bearer " + node.nsk_text.encode():
            return None, self._json(request, {"error": "unauthorized"}, 401)
        injected = self._injected(request, endpoint)
        if injected is not None:
            return None, injected
        return node, None

    @app.route("/v1/register", methods=["POST"])
    async def register(self, request: IRequest) -> bytes:
        sim = self.sim
        sim.record_request(request, "register")
        injected = self._injected(request, "register")
        if injected is not None:
            return injected
        try:
            body = read_body(request)
        except ValueError as e:
            return self._json(request, {"error": str(e)}, 400)
        token = body.get("token") if isinstance(body, dict) else None
        auth = request.getHeader(b"authorization") or b""
        if not isinstance(token, str) or auth != b"Bearer " + token.encode() or not sim.use_bootstrap_token(token):
            return self._json(request, {"error": "unauthorized"}, 401)
        public_key = body.get("public_key")
        try:
            if not isinstance(public_key, str) or len(gojson.std_b64decode(public_key)) != 32:
                raise ValueError
        except ValueError:
            return self._json(request, {"error": "public_key must be base64 of 32 bytes"}, 400)
        sim.registrations.append(body)
        node = sim.register_node(public_key)
        answer = {"node_id": node.node_id, "mesh_ip": node.mesh_ip, "signing_public_key": sim.public_key_b64,
                  "node_secret_key": node.nsk_text, "peers": []}
        answer.update(sim.faults.registration_answer)
        body = self._json(request, answer)
        for hook in list(sim.registration_hooks):
            hook(sim, node)
        return await sim.delayed(body, "register")

    @app.route("/v1/nodes/<node_id>/state", methods=["GET"])
    async def state(self, request: IRequest, node_id: str) -> bytes:
        node, refusal = self._node(request, "state", node_id)
        if node is None:
            return refusal  # type: ignore[no-any-return]
        sim = self.sim
        doc: dict[str, Any] = {"peers": [], "policies": [], "signing_keys": sim.signing_keys_document()}
        doc.update(sim.node.state_document())
        if sim.faults.gzip_bomb:
            doc["padding"] = [[] for _ in range(11 * 1024 * 1024 // 3)]
        body = json.dumps(doc).encode()
        accepts_gzip = b"gzip" in (request.getHeader(b"accept-encoding") or b"")
        if (sim.faults.gzip_responses or sim.faults.gzip_bomb) and accepts_gzip:
            body = gzip.compress(body)
            request.setHeader(b"content-encoding", b"gzip")
        request.setHeader(b"content-type", b"application/json")
        return await sim.delayed(body, "state")

    @app.route("/v1/nodes/<node_id>/secrets/<path:key>", methods=["GET"])
    async def secret(self, request: IRequest, node_id: str, key: str) -> bytes:
        node, refusal = self._node(request, "secret", node_id)
        if node is None:
            return refusal  # type: ignore[no-any-return]
        if key not in self.sim.node.secrets:
            return self._json(request, {"error": "not found"}, 404)
        plaintext, version = self.sim.node.secrets[key]
        ciphertext, nonce = SecretBox(node.nsk_text.encode()).encrypt(plaintext, os.urandom(12))
        if self.sim.faults.tamper_secrets:
            ciphertext = flip_bit(ciphertext.encode()).decode()
        body = {"key": key, "ciphertext": ciphertext, "nonce": nonce, "version": version}
        return await self.sim.delayed(self._json(request, body), "secret")

    @app.route("/v1/nodes/<node_id>/heartbeat", methods=["POST"])
    async def heartbeat(self, request: IRequest, node_id: str) -> bytes:
        node, refusal = self._node(request, "heartbeat", node_id)
        if node is None:
            return refusal  # type: ignore[no-any-return]
        try:
            body = read_body(request)
        except ValueError as e:
            return self._json(request, {"error": str(e)}, 400)
        sim = self.sim
        sim.heartbeats.append(body)
        if not isinstance(body, dict) or list(body) != HEARTBEAT_MEMBERS:
            sim.violations.append(f"heartbeat members {list(body) if isinstance(body, dict) else body!r}")
        reconcile = sim.faults.take("heartbeat_reconcile")
        rotate_keys = sim.faults.take("heartbeat_rotate_keys")
        return await sim.delayed(self._json(request, {"reconcile": reconcile, "rotate_keys": rotate_keys}),
                                 "heartbeat")

    @app.route("/v1/nodes/<node_id>/report", methods=["POST"])
    async def report(self, request: IRequest, node_id: str) -> bytes:
        node, refusal = self._node(request, "report", node_id)
        if node is None:
            return refusal  # type: ignore[no-any-return]
        sim = self.sim
        try:
            body = read_body(request)
            entries = body.get("entries") or []
            deleted = body.get("deleted") or []
            keys = [entry["key"] for entry in entries] + list(deleted)
            if not all(isinstance(k, str) for k in keys):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            return self._json(request, {"error": "bad report body"}, 400)
        poisoned = [k for k in keys if k in sim.faults.refused_report_keys]
        if poisoned:
            sim.refused_report_posts.append(body)
            return self._json(request, {"error": f"report {poisoned[0]} refused"},
                              sim.faults.refused_report_keys[poisoned[0]])
        sim.report_posts.append({"entries": entries, "deleted": deleted})
        sim.raw_report_posts.append(body)
        for entry in entries:
            known = sim.node.reports.get(entry["key"])
            # A resend of the same (key, version) is a no-op.
            if known is None or known["version"] < entry["version"]:
                sim.node.reports[entry["key"]] = entry
        for key in deleted:
            sim.node.reports.pop(key, None)
        request.setResponseCode(204)
        return await sim.delayed(b"", "report")

    @app.route("/v1/nodes/<node_id>/drift", methods=["POST"])
    async def drift(self, request: IRequest, node_id: str) -> bytes:
        node, refusal = self._node(request, "drift", node_id)
        if node is None:
            return refusal  # type: ignore[no-any-return]
        try:
            self.sim.drift_reports.append(read_body(request))
        except ValueError as e:
            return self._json(request, {"error": str(e)}, 400)
        request.setResponseCode(204)
        return await self.sim.delayed(b"", "drift")

    @app.route("/v1/nodes/<node_id>/deregister", methods=["POST"])
    async def deregister(self, request: IRequest, node_id: str) -> bytes:
        node, refusal = self._node(request, "deregister", node_id)
        if node is None:
            return refusal  # type: ignore[no-any-return]
        node.deregistered = True
        self.sim.deregistrations.append(node_id)
        request.setResponseCode(204)
        return b""

    @app.route("/v1/nodes/<node_id>/events", methods=["GET"])
    def events(self, request: IRequest, node_id: str) -> Any:
        node, refusal = self._node(request, "events", node_id)
        if node is None:
            return refusal
        return self.sim.open_stream(request, node)
