"""
plexsphere's signed event envelope (docs/control-plane-plexsphere.md,
"Events"): decoding, verification, and what each event asks of the agent.

An event's ``data:`` line is an envelope ``{id, type, scope, key_id,
issued_at, payload, signature}``, decoded as Go decodes it. Its Ed25519
signature covers ``{"id":…,"type":…,"scope":…,"key_id":…,"issued_at":…,
"payload":…}`` in that order without whitespace: the strings written as Go's
``encoding/json`` writes them, ``issued_at`` rewritten as Go's RFC3339Nano,
the payload's own bytes with the whitespace between tokens removed (member
order, numbers and escapes kept). ``signature`` and unknown members are not
signed. Verification, in order: a signature and an ``issued_at`` are
present; ``issued_at`` is at most 5 minutes old or ahead; ``key_id`` names a
key in force (the previous key only inside its window); the key verifies
the signature. There are no nonces: a replay inside the 5 minutes is
verified again and asks for one more state pull, which is harmless.
"""

from __future__ import annotations

import base64
from typing import Any

import attrs

from plexagent.controlplane import gojson
from plexagent.controlplane.gojson import GoTime
from plexagent.controlplane.keys import KeySet, SigningKey
from plexagent.controlplane.protocol import (
    Dropped,
    DropReason,
    Effect,
    Envelope,
    Ignore,
    InstallSigningKeys,
    PullState,
    RotateNodeKey,
    check_fresh,
    decode_envelope_fields,
)

#: The largest event the agent decodes.
MAX_EVENT_BYTES = 1 << 20

ENVELOPE = {"id": gojson.STRING, "type": gojson.STRING, "scope": gojson.STRING, "key_id": gojson.STRING,
            "issued_at": gojson.TIME, "payload": gojson.RAW, "signature": gojson.STRING}
#: The payload of ``signing_key_rotated``.
ROTATION = {"key_id": gojson.STRING, "public_key": gojson.STRING, "previous_key_id": gojson.STRING,
            "transition_expires": gojson.TIME}

#: Events after which the node pulls its whole state (their payloads are not read).
PULL_EVENTS = frozenset({
    "node_state_updated", "policy_updated", "bridge_config_updated", "action_request", "session_setup",
    "session_revoked", "peer_registered", "peer_psk_assigned", "peer_deregistered", "peer_endpoint_changed",
    "peer_key_rotated",
})


@attrs.frozen
class PlexsphereEnvelope(Envelope):
    scope: str = ""
    key_id: str = ""
    #: None when absent or null
    issued_at: GoTime | None = None
    signature: str = attrs.field(default="", repr=False)


def decode_envelope(data: bytes) -> PlexsphereEnvelope:
    """The envelope in an event's data; Dropped if Go could not decode it."""
    fields = decode_envelope_fields(data, ENVELOPE)
    issued: GoTime | None = fields["issued_at"]
    return PlexsphereEnvelope(
        event_type=fields["type"], event_id=fields["id"],
        issued_at_ns=issued.unix_ns if issued is not None else gojson.ZERO_UNIX_NS,
        payload_raw=fields["payload"], scope=fields["scope"], key_id=fields["key_id"], issued_at=issued,
        signature=fields["signature"],
    )


def _head(event_id: str, event_type: str, scope: str, key_id: str, issued_at: GoTime) -> bytes:
    """The envelope's members before the payload, as Go writes them."""
    return (b'{"id":' + gojson.encode_string(event_id) + b',"type":' + gojson.encode_string(event_type)
            + b',"scope":' + gojson.encode_string(scope) + b',"key_id":' + gojson.encode_string(key_id)
            + b',"issued_at":"' + issued_at.marshal() + b'","payload":')


def signed_bytes(event_id: str, event_type: str, scope: str, key_id: str, issued_at: GoTime,
                 payload_raw: bytes | None) -> bytes:
    """The bytes an event's signature covers; GoTimeError if Go could not write the time."""
    payload = gojson.compact(payload_raw) if payload_raw is not None else b"null"
    return _head(event_id, event_type, scope, key_id, issued_at) + payload + b"}"


def rotation_keys(envelope: Envelope, keys: KeySet) -> KeySet | None:
    """
    The keys a ``signing_key_rotated`` payload puts in force, given the
    keys in force: its key becomes the current one; the key its
    ``previous_key_id`` names stays as the previous one until
    ``transition_expires``, if it is a key held now and the time is set.
    None when the payload is unusable (nothing changes).
    """
    if envelope.payload_raw is None:
        return None
    try:
        fields = gojson.decode_struct(envelope.payload_raw, ROTATION)
    except ValueError:
        return None
    key_id, expires = fields["key_id"], fields["transition_expires"]
    new = SigningKey.parse(fields["public_key"], key_id) if key_id else None
    if new is None:
        return None
    previous = None
    named = fields["previous_key_id"]
    if named and expires is not None and not expires.is_zero():
        previous = next((key for key in (keys.current, keys.previous) if key is not None and key.key_id == named),
                        None)
    return KeySet(new, previous, expires.unix_ns if previous is not None and expires is not None else None)


class PlexsphereEventCodec:
    """Decodes, verifies and interprets plexsphere's events (no state of its own)."""

    max_event_bytes = MAX_EVENT_BYTES

    def decode(self, data: bytes) -> PlexsphereEnvelope:
        return decode_envelope(data)

    def verify(self, envelope: Envelope, keys: KeySet, now_ns: int) -> None:
        assert isinstance(envelope, PlexsphereEnvelope)
        if envelope.signature == "":
            raise Dropped(DropReason.MISSING_FIELD, "signature")
        if envelope.issued_at is None or envelope.issued_at.is_zero():
            raise Dropped(DropReason.MISSING_FIELD, "issued_at")
        check_fresh(envelope.issued_at_ns, now_ns)
        if not keys.usable:
            raise Dropped(DropReason.NO_KEY)
        key = keys.by_id(envelope.key_id, now_ns)
        if key is None:
            raise Dropped(DropReason.UNKNOWN_KEY, "key_id")
        try:
            signature = gojson.std_b64decode(envelope.signature)
            message = signed_bytes(envelope.event_id, envelope.event_type, envelope.scope, envelope.key_id,
                                   envelope.issued_at, envelope.payload_raw)
        except ValueError:  # GoTimeError included: a time Go cannot write never verifies
            raise Dropped(DropReason.BAD_SIGNATURE) from None
        if not key.verifies(signature, message):
            raise Dropped(DropReason.BAD_SIGNATURE)

    def effect(self, envelope: Envelope, keys: KeySet | None = None) -> Effect:
        kind = envelope.event_type
        if kind in PULL_EVENTS:
            return PullState()
        if kind == "rotate_keys":
            return RotateNodeKey()
        if kind == "signing_key_rotated":
            rotated = rotation_keys(envelope, keys if keys is not None else KeySet(None))
            if rotated is None:
                return Ignore("signing_key_rotated payload is not a usable key rotation")
            return InstallSigningKeys(rotated)
        return Ignore(f"no use for {kind or 'untyped'} events")


def sign_plexsphere_event(private_key: Any, event_id: str, event_type: str, scope: str, key_id: str,
                          issued_at: GoTime, payload_raw: bytes | None) -> tuple[bytes, bytes]:
    """
    An envelope as the platform writes it: (the ``data:`` line, the bytes
    signed). ``payload_raw`` goes on the wire as given (None: ``null``).
    """
    signed = signed_bytes(event_id, event_type, scope, key_id, issued_at, payload_raw)
    signature = base64.b64encode(private_key.sign(signed))
    wire = (_head(event_id, event_type, scope, key_id, issued_at)
            + (payload_raw if payload_raw is not None else b"null") + b',"signature":"' + signature + b'"}')
    return wire, signed
