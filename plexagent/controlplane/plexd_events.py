"""
plexd's signed event envelope: decoding, verification and what each event
means (docs/control-plane.md, "Events").

An event's data is a JSON envelope ``{event_type, event_id, issued_at,
nonce, payload, signature}``. It is decoded as Go decodes it into plexd's
``SignedEnvelope``, and its Ed25519 signature is checked over the bytes
plexd's verifier builds: ``json.Marshal`` of ``{event_type, event_id,
issued_at, nonce, payload}`` filled from the parsed envelope (strings
re-encoded, the time rewritten, the payload compacted). Verification goes
in plexd's order: signature, nonce and issued_at present; not older than 5
minutes, not more than 5 minutes ahead; a key in force verifies it; its
nonce not seen before (a nonce is recorded only after a good signature).
"""

from __future__ import annotations

import base64
from typing import Any

import attrs

from plexagent import errors, strictparse
from plexagent.controlplane import gojson
from plexagent.controlplane.gojson import GoTime
from plexagent.controlplane.keys import KeySet
from plexagent.controlplane.protocol import (
    FRESHNESS_NS,
    Dropped,
    DropReason,
    Effect,
    Envelope,
    Ignore,
    InstallSigningKeys,
    ReplaceState,
    check_fresh,
    decode_envelope_fields,
)
from plexagent.fileio import STORED_MAX_DEPTH, STORED_MAX_VALUES
from plexagent.node.state import InvalidState, parse_data_entries, parse_metadata, parse_secret_refs

_NS = 1_000_000_000
#: plexd forgets old nonces at most this often, when an event arrives.
NONCE_CLEANUP_NS = 60 * _NS
#: The agent's bound on remembered nonces (plexd has none).
MAX_NONCES = 100_000
#: The largest event the agent decodes.
MAX_EVENT_BYTES = 1 << 20

ENVELOPE = {"event_type": gojson.STRING, "event_id": gojson.STRING, "issued_at": gojson.TIME,
            "nonce": gojson.STRING, "payload": gojson.RAW, "signature": gojson.STRING}
SIGNING_KEYS = {"current": gojson.STRING, "previous": gojson.STRING, "transition_expires": gojson.TIME}


@attrs.frozen
class PlexdEnvelope(Envelope):
    #: None when absent or null (Go's zero time)
    issued_at: GoTime | None = None
    nonce: str = ""
    signature: str = attrs.field(default="", repr=False)


def decode_envelope(data: bytes) -> PlexdEnvelope:
    """plexd's ``ParseEnvelope``: Dropped if Go could not decode it or it lacks a type or id."""
    fields = decode_envelope_fields(data, ENVELOPE)
    if fields["event_type"] == "":
        raise Dropped(DropReason.MISSING_FIELD, "event_type")
    if fields["event_id"] == "":
        raise Dropped(DropReason.MISSING_FIELD, "event_id")
    issued: GoTime | None = fields["issued_at"]
    return PlexdEnvelope(
        event_type=fields["event_type"], event_id=fields["event_id"],
        issued_at_ns=issued.unix_ns if issued is not None else gojson.ZERO_UNIX_NS,
        payload_raw=fields["payload"], issued_at=issued, nonce=fields["nonce"], signature=fields["signature"],
    )


def signed_bytes(event_type: str, event_id: str, issued_at: GoTime | None, nonce: str,
                 payload_raw: bytes | None) -> bytes:
    """
    The bytes plexd's verifier checks the signature over. GoTimeError if
    Go could not write the time (then nothing can verify).
    """
    issued = (issued_at or GoTime((1, 1, 1, 0, 0, 0))).marshal()
    payload = gojson.compact(payload_raw) if payload_raw is not None else b"null"
    return (b'{"event_type":' + gojson.encode_string(event_type) + b',"event_id":' + gojson.encode_string(event_id)
            + b',"issued_at":"' + issued + b'","nonce":' + gojson.encode_string(nonce)
            + b',"payload":' + payload + b"}")


class NonceStore:
    """
    Nonces of verified events, as plexd keeps them: each with its event's
    issued_at, forgotten 5 minutes after it, in a sweep that runs at most
    once a minute when an event arrives (so a nonce lives 5 to about 6
    minutes). Bounded here: past ``capacity`` the oldest is forgotten.
    """

    def __init__(self, now_ns: int, capacity: int = MAX_NONCES) -> None:
        self.capacity = capacity
        self._seen: dict[str, int] = {}
        self._last_cleanup = now_ns

    def __len__(self) -> int:
        return len(self._seen)

    def _sweep(self, now_ns: int) -> None:
        cutoff = now_ns - FRESHNESS_NS
        self._seen = {nonce: issued for nonce, issued in self._seen.items() if issued >= cutoff}
        self._last_cleanup = now_ns

    def add(self, nonce: str, issued_ns: int, now_ns: int) -> bool:
        """Record ``nonce``; False if it was already seen (a replay)."""
        if now_ns - self._last_cleanup >= NONCE_CLEANUP_NS:
            self._sweep(now_ns)
        if nonce in self._seen:
            return False
        if len(self._seen) >= self.capacity:
            self._sweep(now_ns)
            if len(self._seen) >= self.capacity:
                del self._seen[min(self._seen, key=self._seen.__getitem__)]
        self._seen[nonce] = issued_ns
        return True


def _payload_object(envelope: Envelope) -> dict[str, Any]:
    try:
        payload = strictparse.parse_json(envelope.payload_raw if envelope.payload_raw is not None else b"null",
                                         max_depth=STORED_MAX_DEPTH, max_values=STORED_MAX_VALUES)
    except errors.InvalidInput:
        raise Dropped(DropReason.UNUSABLE_PAYLOAD, "payload") from None
    if payload is None:
        return {}
    if not isinstance(payload, dict):
        raise Dropped(DropReason.UNUSABLE_PAYLOAD, "payload")
    return payload


class PlexdEventCodec:
    """Decodes, verifies and interprets plexd's events; holds the nonces seen (one per agent run)."""

    max_event_bytes = MAX_EVENT_BYTES

    def __init__(self) -> None:
        self.nonces: NonceStore | None = None

    def decode(self, data: bytes) -> PlexdEnvelope:
        return decode_envelope(data)

    def verify(self, envelope: Envelope, keys: KeySet, now_ns: int) -> None:
        assert isinstance(envelope, PlexdEnvelope)
        if self.nonces is None:
            # plexd's store starts its cleanup clock when its verifier is made.
            self.nonces = NonceStore(now_ns)
        if envelope.signature == "":
            raise Dropped(DropReason.MISSING_FIELD, "signature")
        if envelope.nonce == "":
            raise Dropped(DropReason.MISSING_FIELD, "nonce")
        if envelope.issued_at is None or envelope.issued_at.is_zero():
            raise Dropped(DropReason.MISSING_FIELD, "issued_at")
        issued = envelope.issued_at_ns
        check_fresh(issued, now_ns)
        try:
            signature = gojson.std_b64decode(envelope.signature)
            message = signed_bytes(envelope.event_type, envelope.event_id, envelope.issued_at, envelope.nonce,
                                   envelope.payload_raw)
        except ValueError:  # GoTimeError included: a time Go cannot write never verifies
            raise Dropped(DropReason.BAD_SIGNATURE) from None
        candidates = keys.candidates(now_ns)
        if not candidates:
            raise Dropped(DropReason.NO_KEY)
        if not any(key.verifies(signature, message) for key in candidates):
            raise Dropped(DropReason.BAD_SIGNATURE)
        if not self.nonces.add(envelope.nonce, issued, now_ns):
            raise Dropped(DropReason.REPLAY)

    def effect(self, envelope: Envelope, keys: KeySet | None = None) -> Effect:
        kind = envelope.event_type
        try:
            if kind == "node_state_updated":
                payload = _payload_object(envelope)
                # An absent member empties that part, as plexd's cache does.
                return ReplaceState({"metadata": parse_metadata(payload.get("metadata")),
                                     "data": parse_data_entries(payload.get("data"))})
            if kind == "node_secrets_updated":
                payload = _payload_object(envelope)
                return ReplaceState({"secret_refs": parse_secret_refs(payload.get("secret_refs"))})
        except InvalidState as e:
            raise Dropped(DropReason.UNUSABLE_PAYLOAD, str(e).partition(":")[0]) from None
        if kind == "signing_key_rotated":
            if envelope.payload_raw is None:
                return Ignore("signing_key_rotated without a payload")
            try:
                fields = gojson.decode_struct(envelope.payload_raw, SIGNING_KEYS)
            except ValueError:
                return Ignore("signing_key_rotated payload is not a key set")
            return InstallSigningKeys(KeySet.from_strings(fields["current"], fields["previous"],
                                                          fields["transition_expires"]))
        return Ignore(f"no use for {kind} events")


def sign_plexd_event(private_key: Any, event_type: str, event_id: str, issued_at: GoTime, nonce: str,
                     payload_raw: bytes | None) -> tuple[bytes, bytes]:
    """
    An envelope as a Go control plane marshals a ``SignedEnvelope``:
    (wire bytes, the bytes signed). ``payload_raw`` goes on the wire as
    given (None: ``null``, as Go writes a nil ``RawMessage``).
    """
    signed = signed_bytes(event_type, event_id, issued_at, nonce, payload_raw)
    signature = base64.b64encode(private_key.sign(signed))
    wire = (b'{"event_type":' + gojson.encode_string(event_type) + b',"event_id":' + gojson.encode_string(event_id)
            + b',"issued_at":"' + issued_at.marshal() + b'","nonce":' + gojson.encode_string(nonce)
            + b',"payload":' + (payload_raw if payload_raw is not None else b"null")
            + b',"signature":"' + signature + b'"}')
    return wire, signed
