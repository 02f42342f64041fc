"""
The control-plane event stream: an incremental Server-Sent Events parser
(plexd's semantics) and verification of the envelopes it carries
(docs/control-plane.md).

Both are plain objects with no I/O: the parser is fed bytes as they arrive
and returns complete events; the verifier takes an injected clock.
"""

from __future__ import annotations

import base64
import binascii
import collections
import datetime
import json
from typing import Any

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from twisted.internet.interfaces import IReactorTime

#: How far ``issued_at`` may be from the agent's clock, and how long a nonce
#: is remembered (seconds).
FRESHNESS_WINDOW = 300.0

#: The longest line plexd's parser takes (bufio.Scanner's 64 KiB buffer holds
#: the line and its LF; a CR before the LF counts).
MAX_LINE = 65535
#: The most event data the parser collects for one event (more is dropped).
MAX_EVENT_DATA = 1 << 20


@attrs.frozen
class ServerSentEvent:
    """One dispatched SSE event, as bytes (what it means is the envelope's business)."""

    data: bytes
    type: bytes = b"message"
    id: bytes = b""
    #: its data grew past the parser's limit and was not kept
    too_large: bool = False


class SSEParser:
    """
    An incremental Server-Sent Events parser that reads a stream exactly as
    plexd's does (its own parser, not the WHATWG one):

    - lines end at LF only; one CR before the LF is dropped (a lone CR is
      data); a line longer than ``MAX_LINE`` bytes ends the stream
      (``overflow``): nothing after it is read;
    - ``:`` lines are comments; a field is the text before the first colon,
      one space after the colon is dropped; names are case-sensitive;
    - ``event`` sets the type, ``data`` appends a line (``data`` without a
      colon appends an empty one), ``id`` sets the block's id; ``retry`` and
      unknown fields are ignored;
    - a blank line dispatches the block if it has data: its type (default
      ``message``), its data lines joined with LF, its id; a non-empty id
      becomes ``last_event_id``. An id in a block without data is forgotten,
      an empty id never clears ``last_event_id``; a BOM is not stripped; a
      block cut off by the end of the stream is dropped.
    """

    def __init__(self, max_data: int = MAX_EVENT_DATA) -> None:
        self.max_data = max_data
        self.last_event_id = b""
        #: a line was too long: the stream must end
        self.overflow = False
        self._buffer = b""
        self._type = b""
        self._data: list[bytes] = []
        self._size = 0
        self._too_large = False
        self._id = b""

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Consume ``chunk``; return the events it completed, in order."""
        events: list[ServerSentEvent] = []
        if self.overflow:
            return events
        buffer = self._buffer + chunk if self._buffer else chunk
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = buffer[start:end]
            start = end + 1
            if len(line) > MAX_LINE:
                self.overflow = True
                self._buffer = b""
                return events
            self._line(line[:-1] if line.endswith(b"\r") else line, events)
        self._buffer = buffer[start:]
        if len(self._buffer) > MAX_LINE:
            self.overflow = True
            self._buffer = b""
        return events

    def _line(self, line: bytes, events: list[ServerSentEvent]) -> None:
        if not line:
            if self._data or self._too_large:
                events.append(ServerSentEvent(b"" if self._too_large else b"\n".join(self._data),
                                              self._type or b"message", self._id, self._too_large))
                if self._id:
                    self.last_event_id = self._id
            self._type, self._data, self._size, self._too_large, self._id = b"", [], 0, False, b""
            return
        if line[:1] == b":":
            return
        field, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            self._size += len(value) + 1
            if self._size > self.max_data:
                self._too_large = True
                self._data = []
            elif not self._too_large:
                self._data.append(value)
        elif field == b"event":
            self._type = value
        elif field == b"id":
            self._id = value


def header_safe_id(raw: bytes) -> str:
    """``raw`` as a Last-Event-ID header value, or "" when a header cannot carry it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return ""
    if any(c < " " or c == "\x7f" for c in text):
        return ""
    return text


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
