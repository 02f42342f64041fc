"""
The control-plane event stream: an incremental Server-Sent Events parser and
verification of the signed envelopes it carries (docs/control-plane.md).

Both are plain objects with no I/O: the parser is fed bytes as they arrive
and returns complete events; the verifier takes an injected clock.
"""

from __future__ import annotations

import base64
import binascii
import collections
import datetime
import json
import re
from typing import Any

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from twisted.internet.interfaces import IReactorTime

#: How far ``issued_at`` may be from the agent's clock, and how long a nonce
#: is remembered (seconds).
FRESHNESS_WINDOW = 300.0

_LINE_END = re.compile(rb"\r\n|\r|\n")


@attrs.frozen
class ServerSentEvent:
    """One dispatched SSE event."""

    data: str
    event: str = "message"
    id: str = ""


class SSEParser:
    """
    Incremental Server-Sent Events parser (the WHATWG event-stream format).

    ``feed(bytes)`` returns the events completed by those bytes. Lines may end
    in CRLF, LF or CR, and may be split anywhere across calls (a CR at the end
    of one chunk and an LF at the start of the next are one line end).

    Memory is bounded: a line longer than ``max_line`` bytes is discarded up
    to its end, and an event whose data grows past ``max_event`` bytes (or
    that lost a line that way) is dropped when it would be dispatched. The
    stream goes on either way.
    """

    def __init__(self, max_line: int = 1024 * 1024, max_event: int = 4 * 1024 * 1024) -> None:
        self.max_line = max_line
        self.max_event = max_event
        #: the last event id seen (sent back as Last-Event-ID on reconnect)
        self.last_event_id = ""
        #: the reconnection time the server asked for, in milliseconds
        self.retry: int | None = None
        #: events dropped for exceeding a limit (for logs and tests)
        self.dropped = 0
        self._buffer = b""
        self._skip_lf = False
        self._discarding_line = False
        self._first_line = True
        self._data: list[str] = []
        self._data_size = 0
        self._event_type = ""
        self._poisoned = False

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Consume ``chunk``; return the events it completed, in order."""
        events: list[ServerSentEvent] = []
        if not chunk:
            return events
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if self._discarding_line:
            m = _LINE_END.search(chunk)
            if m is None:
                return events
            self._discarding_line = False
            self._after_line_end(chunk, m)
            chunk = chunk[m.end():]
            if self._skip_lf and chunk[:1] == b"\n":
                self._skip_lf = False
                chunk = chunk[1:]
            # The overlong line was a field of the current event: lose it.
            self._poisoned = True
        buffer = self._buffer + chunk if self._buffer else chunk
        start = 0
        for m in _LINE_END.finditer(buffer):
            if m.start() < start:  # the LF of a CRLF already consumed
                continue
            line = buffer[start:m.start()]
            if len(line) > self.max_line:
                self._poisoned = True
            else:
                self._process_line(line, events)
            start = m.end()
            if m.group() == b"\r" and start == len(buffer):
                # A CR ending the chunk: an LF opening the next is its pair.
                self._skip_lf = True
        rest = buffer[start:]
        if len(rest) > self.max_line:
            self._buffer = b""
            self._discarding_line = True
        else:
            self._buffer = rest
        return events

    def _after_line_end(self, chunk: bytes, m: re.Match[bytes]) -> None:
        if m.group() == b"\r" and m.end() == len(chunk):
            self._skip_lf = True

    def _process_line(self, raw: bytes, events: list[ServerSentEvent]) -> None:
        if self._first_line:
            self._first_line = False
            if raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
        if not raw:
            self._dispatch(events)
            return
        if raw[:1] == b":":
            return  # a comment: keep-alive
        line = raw.decode("utf-8", "replace")
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data_size += len(value) + 1
            if self._data_size > self.max_event:
                self._poisoned = True
                self._data.clear()
            elif not self._poisoned:
                self._data.append(value)
        elif name == "event":
            self._event_type = value
        elif name == "id":
            if "\x00" not in value:
                self.last_event_id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self.retry = int(value)
        # Any other field name is ignored, as the format requires.

    def _dispatch(self, events: list[ServerSentEvent]) -> None:
        data, self._data = self._data, []
        event_type, self._event_type = self._event_type, ""
        poisoned, self._poisoned = self._poisoned, False
        size, self._data_size = self._data_size, 0
        if poisoned:
            self.dropped += 1
            return
        if not size:
            return
        events.append(ServerSentEvent(data="\n".join(data), event=event_type or "message", id=self.last_event_id))


# -- envelopes -----------------------------------------------------------


class RejectedEnvelope(Exception):
    """An envelope that must be dropped; the message says why (no secrets)."""


@attrs.frozen
class Envelope:
    """A verified (or, without a signing key, well-formed) event envelope."""

    event_type: str
    event_id: str
    issued_at: str
    nonce: str
    payload: dict[str, Any]


def canonical_json(payload: Any) -> str:
    """Keys sorted, no insignificant whitespace, non-ASCII written as UTF-8."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def signed_message(event_type: str, event_id: str, issued_at: str, nonce: str, payload: Any) -> bytes:
    """The exact bytes an envelope's signature covers."""
    return (
        "plexagent-event-v1\n"
        + event_type + "\n"
        + event_id + "\n"
        + issued_at + "\n"
        + nonce + "\n"
        + canonical_json(payload)
    ).encode("utf-8")


def parse_rfc3339(text: str) -> float:
    """Seconds since the epoch of an RFC 3339 timestamp with an offset."""
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise RejectedEnvelope("issued_at is not an RFC 3339 timestamp") from None
    if moment.tzinfo is None:
        raise RejectedEnvelope("issued_at has no UTC offset")
    return moment.timestamp()


def parse_public_key(text: str) -> Ed25519PublicKey:
    """A raw 32-byte Ed25519 public key from standard base64; ValueError if not."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not standard base64") from None
    if len(raw) != 32:
        raise ValueError(f"decodes to {len(raw)} bytes, not 32")
    return Ed25519PublicKey.from_public_bytes(raw)


class NonceMemory:
    """
    The nonces seen within the last ``window`` seconds, at most ``capacity``
    of them: when full, the oldest is forgotten first (its envelope's
    ``issued_at`` is the oldest too, so it is the first to turn stale).
    """

    def __init__(self, clock: IReactorTime, window: float = FRESHNESS_WINDOW, capacity: int = 65536) -> None:
        self._clock = clock
        self.window = window
        self.capacity = capacity
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def _expire(self, now: float) -> None:
        while self._seen:
            nonce, expires = next(iter(self._seen.items()))
            if expires > now:
                break
            del self._seen[nonce]

    def seen(self, nonce: str) -> bool:
        """True if ``nonce`` was remembered within the window; else remember it."""
        now = self._clock.seconds()
        self._expire(now)
        if nonce in self._seen:
            return True
        while len(self._seen) >= self.capacity:
            self._seen.popitem(last=False)
        self._seen[nonce] = now + self.window
        return False


class EnvelopeVerifier:
    """
    Parses envelopes and, with a public key, verifies them: the Ed25519
    signature over ``signed_message``, ``issued_at`` within ``window`` of the
    clock, and a nonce not seen within ``window``.
    """

    def __init__(
        self,
        public_key: Ed25519PublicKey | None,
        clock: IReactorTime,
        window: float = FRESHNESS_WINDOW,
        nonce_capacity: int = 65536,
    ) -> None:
        self._key = public_key
        self._clock = clock
        self.window = window
        self.nonces = NonceMemory(clock, window, nonce_capacity)

    @property
    def verifying(self) -> bool:
        return self._key is not None

    def verify(self, data: str) -> Envelope:
        """The envelope in ``data``; ``RejectedEnvelope`` if it must be dropped."""
        try:
            doc = json.loads(data)
        except ValueError:
            raise RejectedEnvelope("envelope is not JSON") from None
        if not isinstance(doc, dict):
            raise RejectedEnvelope("envelope is not a JSON object")
        fields = {}
        for name in ("event_type", "event_id", "issued_at", "nonce"):
            value = doc.get(name)
            if not isinstance(value, str):
                raise RejectedEnvelope(f"envelope field {name} is missing or not a string")
            fields[name] = value
        payload = doc.get("payload")
        if not isinstance(payload, dict):
            raise RejectedEnvelope("envelope payload is missing or not an object")
        envelope = Envelope(payload=payload, **fields)
        if self._key is None:
            return envelope
        signature_text = doc.get("signature")
        if not isinstance(signature_text, str):
            raise RejectedEnvelope("envelope signature is missing")
        try:
            signature = base64.b64decode(signature_text, validate=True)
        except (binascii.Error, ValueError):
            raise RejectedEnvelope("envelope signature is not standard base64") from None
        message = signed_message(
            envelope.event_type, envelope.event_id, envelope.issued_at, envelope.nonce, payload
        )
        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            raise RejectedEnvelope("envelope signature does not verify") from None
        # Only a genuine envelope may touch the clock check and nonce memory:
        # forged ones must not be able to fill it.
        issued = parse_rfc3339(envelope.issued_at)
        if abs(issued - self._clock.seconds()) > self.window:
            raise RejectedEnvelope("envelope issued_at is more than 5 minutes from the agent's clock")
        if self.nonces.seen(envelope.nonce):
            raise RejectedEnvelope("envelope nonce was already seen (replay)")
        return envelope


def sign_envelope(
    private_key: Any, event_type: str, event_id: str, issued_at: str, nonce: str, payload: dict[str, Any]
) -> dict[str, Any]:
    """Build a signed envelope (the control plane's side; used by the simulator)."""
    signature = private_key.sign(signed_message(event_type, event_id, issued_at, nonce, payload))
    return {
        "event_type": event_type,
        "event_id": event_id,
        "issued_at": issued_at,
        "nonce": nonce,
        "payload": payload,
        "signature": base64.b64encode(signature).decode("ascii"),
    }
