"""
The control-plane event stream (docs/control-plane-sync.md): an
incremental Server-Sent Events parser with plexd's semantics, and
``EventStream``, the subscription that feeds each event to the protocol's
codec (decode, verify against the signing keys in force, interpret) and
runs what it asks for. An event that cannot be verified is dropped and
counted by reason, never applied.
"""

from __future__ import annotations

import collections
import math
from typing import Any, Callable

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from plexagent.controlplane.backoff import Backoff, cancel_call
from plexagent.controlplane.keys import KeyRing
from plexagent.controlplane.protocol import Call, ControlPlaneError, Dropped, DropReason, Effect, ErrorKind
from plexagent.logs import describe

log = Logger()

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


class _StreamProtocol(Protocol):
    """Receives the event-stream body and hands it to its EventStream."""

    def __init__(self, stream: "EventStream") -> None:
        self._stream = stream

    def dataReceived(self, data: bytes) -> None:
        self._stream._received(self, data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stream._lost(self, reason)

    def close(self) -> None:
        """Drop the connection the body arrives on."""
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]


class EventStream:
    """
    The subscription to the node's event stream. Each event is decoded,
    verified against the signing keys in force (``ring``) and interpreted by
    the protocol's ``codec``; the effect goes to ``run`` (which raises
    Dropped for a state the cache cannot take). Reconnects with
    ``Last-Event-ID``: at once after a useful connection (one that delivered
    an event or lived ``USEFUL_AFTER`` seconds), else with backoff and
    jitter, never sooner than a Retry-After. A stream silent for
    ``idle_timeout`` seconds, or sending a line longer than plexd's parser
    takes, is closed and retried with backoff. ``on_reconnect`` is called on
    every successful connection but the first (events may have been
    missed); ``on_auth_failure`` when the credentials are refused.
    """

    #: A connection that lived this long without an event still counts as useful.
    USEFUL_AFTER = 30.0

    def __init__(
        self,
        session: Any,
        codec: Any,
        ring: KeyRing,
        clock: IReactorTime,
        run: Callable[[Effect, str], None],
        on_reconnect: Callable[[], None] = lambda: None,
        on_auth_failure: Callable[[Call], None] = lambda call: None,
        idle_timeout: float = 90.0,
        backoff: Backoff | None = None,
        pull_on_every_connect: bool = False,
    ) -> None:
        self.session = session
        self.codec = codec
        self.ring = ring
        self.clock = clock
        self._run = run
        self._on_reconnect = on_reconnect
        self._on_auth_failure = on_auth_failure
        self.idle_timeout = idle_timeout
        self.backoff = backoff or Backoff()
        #: whether the first connection is followed by a pull too (else only reconnects)
        self.pull_on_every_connect = pull_on_every_connect
        #: why the stream is not asked for again until the agent restarts, or None
        self.given_up: str | None = None
        self.started = False
        self.connected = False
        self.last_event_id = b""
        self.connections = 0
        #: events dropped, by reason
        self.dropped: collections.Counter[DropReason] = collections.Counter()
        #: events applied, by event type
        self.applied: collections.Counter[str] = collections.Counter()
        #: when the last event was applied (clock seconds)
        self.last_event_at: float | None = None
        self._protocol: _StreamProtocol | None = None
        self._parser: SSEParser | None = None
        self._connecting: defer.Deferred[Any] | None = None
        self._reconnect_call: Any = None
        self._watchdog: Any = None
        self._stopped: defer.Deferred[None] | None = None
        self._connected_at = 0.0
        self._useful = False
        #: the connection was closed for going silent or an over-long line: a failure
        self._broken = False

    def start(self) -> None:
        if self.started:
            return
        self.started = True
        self._connect()

    def stop(self) -> defer.Deferred[None]:
        """Stop reconnecting and close the stream; fires once it is closed."""
        self.started = False
        cancel_call(self._reconnect_call)
        cancel_call(self._watchdog)
        if self._connecting is not None:
            self._connecting.cancel()
        if self._protocol is not None:
            stopped: defer.Deferred[None] = defer.Deferred()
            self._stopped = stopped
            self._protocol.close()
            return stopped
        return defer.succeed(None)

    def _connect(self) -> None:
        self._reconnect_call = None
        d = self.session.open_events(header_safe_id(self.last_event_id))
        self._connecting = d
        d.addCallbacks(self._opened, self._open_failed)

    def _opened(self, response: Any) -> None:
        self._connecting = None
        if not self.started:
            orphan = _StreamProtocol(self)
            response.deliverBody(orphan)
            orphan.close()
            return
        self.connections += 1
        self.connected = True
        self._connected_at = self.clock.seconds()
        self._useful = False
        self._broken = False
        self._parser = SSEParser()
        self._protocol = _StreamProtocol(self)
        self._arm_watchdog()
        response.deliverBody(self._protocol)
        log.info("event stream connected")
        if self.connections > 1 or self.pull_on_every_connect:
            self._on_reconnect()

    def _open_failed(self, failure: Any) -> None:
        self._connecting = None
        if not self.started or failure.check(defer.CancelledError):
            return
        retry_after = None
        if failure.check(ControlPlaneError):
            error = failure.value
            retry_after = error.retry_after
            if error.kind is ErrorKind.AUTH:
                self._on_auth_failure(Call.EVENTS)
            if error.kind is ErrorKind.REFUSED and self.last_event_id:
                # The control plane refused where the stream was to resume: start from now.
                log.warn("the control plane refused Last-Event-ID {id}: reconnecting without it",
                         id=header_safe_id(self.last_event_id)[:64])
                self.last_event_id = b""
            if error.pause is not None and math.isinf(error.pause):
                self.given_up = str(error)
                log.error("event stream refused ({error}): not asking for it again until the agent restarts; "
                          "the state is still fetched every reconcile_interval", error=str(error))
                return
            if error.pause is not None:
                log.warn("event stream not offered ({error}): asking again in {seconds}s, fetching the state "
                         "every reconcile_interval meanwhile", error=str(error), seconds=error.pause)
                self._reconnect_later(max(error.pause, retry_after or 0.0))
                return
        log.warn("event stream unavailable: {error}", error=failure.getErrorMessage())
        self._reconnect_later(self.backoff.next_delay(retry_after))

    def _arm_watchdog(self) -> None:
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.reset(self.idle_timeout)
        else:
            self._watchdog = self.clock.callLater(self.idle_timeout, self._silent)

    def _silent(self) -> None:
        log.warn("event stream silent for {seconds}s: reconnecting", seconds=self.idle_timeout)
        self._broken = True
        if self._protocol is not None:
            self._protocol.close()

    def _received(self, protocol: _StreamProtocol, data: bytes) -> None:
        if protocol is not self._protocol or self._parser is None:
            return
        self._arm_watchdog()
        for event in self._parser.feed(data):
            self._handle(event)
        if self._parser.overflow:
            log.warn("event stream sent a line longer than {limit} bytes: reconnecting", limit=MAX_LINE)
            self._broken = True
            protocol.close()

    def now_ns(self) -> int:
        return round(self.clock.seconds() * 1e9)

    def _handle(self, event: ServerSentEvent) -> None:
        # A complete event proves the stream works: failures start over.
        self.backoff.reset()
        self._useful = True
        if event.id:
            self.last_event_id = event.id
        envelope = None
        try:
            if event.too_large or len(event.data) > self.codec.max_event_bytes:
                raise Dropped(DropReason.TOO_LARGE)
            envelope = self.codec.decode(event.data)
            self.codec.verify(envelope, self.ring.keys, self.now_ns())
            self._run(self.codec.effect(envelope, self.ring.keys), "event")
        except Dropped as dropped:
            self.dropped[dropped.reason] += 1
            # Why, never what: the event's content stays out of the log.
            log.warn("dropping event {id}: {reason}", id=header_safe_id(event.id)[:64] or "(no id)",
                     reason=str(dropped))
            return
        except Exception:
            # A bug must not cost the stream: the event is lost, the next fetch corrects the state.
            log.failure("applying event {id} failed", id=header_safe_id(event.id)[:64] or "(no id)")
            return
        self.applied[envelope.event_type] += 1
        self.last_event_at = self.clock.seconds()

    def _lost(self, protocol: _StreamProtocol, reason: Any) -> None:
        if protocol is not self._protocol:
            return
        self._protocol = None
        self._parser = None
        self.connected = False
        cancel_call(self._watchdog)
        if self._stopped is not None:
            stopped, self._stopped = self._stopped, None
            stopped.callback(None)
        if not self.started:
            return
        log.info("event stream closed: {reason}", reason=describe(reason))
        useful = self._useful or self.clock.seconds() - self._connected_at >= self.USEFUL_AFTER
        if useful and not self._broken:
            # plexd reconnects at once after a clean end: events may be waiting.
            self.backoff.reset()
            self._reconnect_later(0)
        else:
            self._reconnect_later(self.backoff.next_delay())

    def _reconnect_later(self, delay: float) -> None:
        if not self.started:
            return
        cancel_call(self._reconnect_call)
        self._reconnect_call = self.clock.callLater(delay, self._connect)
