"""
What the simulator's plexsphere mode adds to the simulator's state
(docs/control-plane-plexsphere.md): the node bearer, bootstrap tokens of
the platform's form, the node state snapshot, and its signed events with
their numeric sequence ids. ``plexsphere_sim`` serves them.

How protocol-neutral operations read in this mode:

- ``set_data(key, payload, ...)``: the snapshot's ``state.data`` value is
  ``payload`` itself when it is a string, else its compact JSON
  (``data_value``); ``version`` and ``content_type`` are not on the wire
  (the agent numbers versions itself). An agent then serves that string as
  the entry's payload.
- ``reported()``: key -> ``{"key", "value" (the string PUT), "payload"
  (that string parsed as JSON, else the string itself), "accepted_at",
  "puts" (PUTs accepted for the key)}``: ``payload`` compares with what was
  written to the Local Node API.
- Events carry opaque payloads: a forged or genuine ``node_state_updated``
  only makes the agent pull the state.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import uuid
from typing import TYPE_CHECKING, Any, Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from plexagent.controlplane import gojson
from plexagent.controlplane.gojson import GoTime
from plexagent.controlplane.plexsphere_events import sign_plexsphere_event

if TYPE_CHECKING:
    from plexagent.testing.simulator import ControlPlaneSimulator

#: The pre-registered node of plexsphere mode (the bearer vector's node).
EXAMPLE_NODE_UUID = "0190a8b8-a0c0-7a0a-8a0a-a0a0a0a0a0a3"
EXAMPLE_PROJECT_ID = "0190a8b8-a0c0-7a0a-8a0a-a0a0a0a0a001"
EXAMPLE_RESOURCE_HANDLE = "edge-us-west-42"
#: The segment the agent's bearer carries after ``nsk_``.
BEARER_ENV = "plexd"
KEY_ID_PREFIX = "did:web:simulator.plexagent.test#key-"
#: What a forged event signed by a key nobody holds names as its key.
UNKNOWN_KEY_ID = "did:web:simulator.plexagent.test#key-nobody-holds"

REPORT_KEY = re.compile(r"[a-z][a-z0-9._-]{0,127}")
SECRET_NAME = re.compile(r"[a-z][a-z0-9_-]{0,62}")
TOKEN_FORM = re.compile(r"psb_[^_]+_[^_]+_[^_]+_[^_]+")
_BEARER = re.compile(rb"Bearer nsk_([^_\s]+)_([A-Za-z0-9_-]{64})")
MAX_REPORT_BYTES = 4096

REGISTER_MEMBERS = frozenset({"project_id", "resource_handle", "bootstrap_token", "nonce", "public_key"})
HEARTBEAT_MEMBERS = frozenset({"client_now", "binary_checksum", "binary_version", "nat_summary"})

#: The code an injected failure carries when the test names none: (endpoint, status) -> code.
DEFAULT_CODES = {
    ("register", 403): "token_consumed", ("register", 404): "resource_not_found",
    ("register", 400): "public_key_invalid", ("register", 503): "pool_exhausted",
    ("state", 503): "datastore_unavailable", ("state", 501): "signed_event_bus_not_provisioned",
    ("heartbeat", 400): "clock_skew", ("heartbeat", 401): "nsk_revoked", ("heartbeat", 403): "node_id_mismatch",
    ("heartbeat", 501): "heartbeat_not_provisioned",
    ("secret", 404): "secret_not_found", ("secret", 429): "per_node_rate_limited",
    ("secret", 501): "secrets_not_provisioned", ("secret", 503): "openbao_unavailable",
    ("report", 400): "invalid_report", ("report", 404): "report_not_found",
    ("report", 501): "reports_not_provisioned",
    ("keys_rotate", 409): "keys_rotate_no_pending_rotation", ("keys_rotate", 422): "keys_rotate_public_key_unchanged",
    ("keys_rotate", 501): "keys_rotate_not_provisioned",
    ("events", 501): "signed_event_bus_not_provisioned", ("events", 503): "event_stream_unavailable",
}
#: Endpoints whose 403 is a PermissionDenied problem (with ``reason`` and ``correlation_id``).
PERMISSION_DENIED = frozenset({"heartbeat", "secret", "report", "keys_rotate"})
NOT_PROVISIONED = {"state": "signed_event_bus_not_provisioned", "events": "signed_event_bus_not_provisioned",
                   "heartbeat": "heartbeat_not_provisioned", "secret": "secrets_not_provisioned",
                   "report": "reports_not_provisioned", "keys_rotate": "keys_rotate_not_provisioned"}


def bearer(node_id: str, nsk: bytes, env: str = BEARER_ENV) -> str:
    """The node's bearer: ``nsk_<env>_`` + unpadded base64url of the node UUID's 16 bytes and the 32 NSK bytes."""
    raw = uuid.UUID(node_id).bytes + nsk
    return f"nsk_{env}_" + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def parse_bearer(header: bytes) -> tuple[str, str, bytes] | None:
    """(env, node UUID, NSK bytes) of an ``Authorization`` value, or None when it is not a node bearer."""
    match = _BEARER.fullmatch(header)
    if match is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(match.group(2) + b"==")
    except ValueError:
        return None
    if len(raw) != 48:
        return None
    return match.group(1).decode("ascii"), str(uuid.UUID(bytes=raw[:16])), raw[16:]


def new_nsk_b64() -> str:
    """A node secret key as the platform returns it: standard base64 of 32 random bytes."""
    return base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def new_bootstrap_token(project_id: str) -> str:
    """A token of the platform's form ``psb_<env>_<project>_<kind>_<random>`` (no ``_`` inside a segment)."""
    return f"psb_sim_{project_id.replace('-', '')[:12]}_node_{secrets.token_hex(16)}"


def data_value(payload: Any) -> str:
    """A data entry's wire value: a string as it is, anything else as compact JSON."""
    if isinstance(payload, str):
        return payload
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def report_payload(value: str) -> Any:
    """What a reported value says: its JSON when it is JSON, else the string itself."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def key_id(number: int) -> str:
    return f"{KEY_ID_PREFIX}{number}"


def snapshot(sim: "ControlPlaneSimulator") -> dict[str, Any]:
    """GET /v1/nodes/{id}/state: NodeStateSnapshot; buckets sorted by key, ``reports`` the same as ``state``."""
    node = sim.node
    buckets: dict[str, Any] | None = None
    if not sim.null_state:
        buckets = {
            "metadata": [{"key": k, "value": node.metadata[k]} for k in sorted(node.metadata)],
            "data": [{"key": k, "value": data_value(node.data[k].get("payload"))} for k in sorted(node.data)],
            "reports": [{"key": k, "value": node.reports[k]["value"]} for k in sorted(node.reports)],
        }
    fingerprint = base64.b64encode(hashlib.sha256(b"no rules").digest()).decode("ascii")
    return {
        "peers": [],
        "reachability": {"state": "healthy", "changed_at": sim.go_time(sim.started_at)},
        "policy": {"revision_id": sim.policy_revision, "fingerprint": fingerprint, "rules": []},
        "bridge": {},
        "state": buckets,
        "reports": buckets,
    }


def envelope(sim: "ControlPlaneSimulator", event_type: str, envelope_id: str, scope: str, payload_raw: bytes | None,
             *, issued_offset: float = 0.0, issued: GoTime | None = None, sign_with: Ed25519PrivateKey | None = None,
             key_id: str | None = None, bad_signature: bool = False, signature: str | None = None) -> bytes:
    """
    The ``data:`` line of one event, signed as the platform signs it.
    Forgeries: ``issued_offset`` (seconds from now), ``sign_with``/``key_id``
    (another key or key id), ``bad_signature`` (a flipped bit), ``signature``
    ("" leaves it out).
    """
    from plexagent.testing.plexd_sim import flip_bit

    if issued is None:
        issued = GoTime.from_unix_ns(round((sim.now() + issued_offset) * 1e9))
    wire, _ = sign_plexsphere_event(sign_with or sim.signing_key, envelope_id, event_type, scope,
                                    sim.signing_key_id if key_id is None else key_id, issued, payload_raw)
    head, _, tail = wire.rpartition(b',"signature":"')
    sig = tail[:-2]
    if bad_signature:
        sig = flip_bit(sig)
    if signature is not None:
        return head + (b',"signature":' + gojson.encode_string(signature) if signature else b"") + b"}"
    return head + b',"signature":"' + sig + b'"}'


class PublishedEvent:
    """One published event: its numeric sequence id and its frame for each node (signed once per node's scope)."""

    def __init__(self, seq: int, make: Callable[[str], bytes]) -> None:
        self.seq = seq
        self._make = make
        self._frames: dict[str, bytes] = {}

    def frame(self, node_id: str) -> bytes:
        if node_id not in self._frames:
            self._frames[node_id] = self._make(node_id)
        return self._frames[node_id]


#: What ``inject_event_fault`` sends for each forgery (plexsphere has no nonces, so no replay).
FORGERIES: dict[str, dict[str, Any]] = {
    "bad_signature": {"bad_signature": True},
    "missing_signature": {"signature": ""},
    "stale": {"issued_offset": -301.0},
    "future": {"issued_offset": 301.0},
    "unknown_key": {"key_id": UNKNOWN_KEY_ID},
    "malformed": {"raw_data": b'{"id":"0190a8b8-0000-7000-8000-000000000000","type":"node_state_updated","pay'},
}


def publish(sim: "ControlPlaneSimulator", event_type: str, payload: Any = None, *, payload_raw: bytes | None = None,
            apply: bool = True, raw_data: bytes | None = None, **forgery: Any) -> str:
    """
    ``ControlPlaneSimulator.publish`` in plexsphere mode: one event, its id
    the next sequence number, signed for each stream's node (``scope``
    ``node:<id>``, a fresh UUID as envelope id); kept for Last-Event-ID
    replays. ``forgery``: see ``envelope``. With ``apply``, a
    ``node_state_updated`` whose payload holds ``metadata``/``data`` also
    changes the state (as in plexd mode).
    """
    seq = next(sim._event_ids)
    if payload_raw is None:
        payload_raw = gojson.marshal(payload)
    envelope_id = str(uuid.uuid4())
    # Sign now (the time is now), for any node later asked for.
    offset = forgery.pop("issued_offset", 0.0)
    issued = forgery.pop("issued", None) or GoTime.from_unix_ns(round((sim.now() + offset) * 1e9))

    def make(node_id: str) -> bytes:
        from plexagent.testing.plexd_sim import frame

        wire = raw_data if raw_data is not None else envelope(
            sim, event_type, envelope_id, f"node:{node_id}", payload_raw, issued=issued, **forgery)
        return frame(str(seq), event_type, wire)

    event = PublishedEvent(seq, make)
    sim.published.append(event)
    sim.events.append((str(seq), event.frame(sim.node_id)))
    if apply and event_type == "node_state_updated" and isinstance(payload, dict):
        if "metadata" in payload or "data" in payload:
            sim.node.metadata = dict(payload.get("metadata") or {})
            sim.node.data = {e["key"]: e for e in payload.get("data") or []}
    if event_type == "rotate_keys":
        for node in sim.nodes.values():
            node.rotation_pending = True
    for stream in list(sim._streams):
        stream.send(event.frame(stream.node.node_id if stream.node is not None else sim.node_id))
    return str(seq)
