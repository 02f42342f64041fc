"""
Keeping the cache current (docs/control-plane-sync.md): fetch state at
start, then follow the signed event stream, fetch again every
``reconcile_interval``, after every stream reconnect and when a heartbeat
asks for it. On any failure the Local Node API keeps serving
the cache and the failed step is retried with exponential backoff and full
jitter, honouring Retry-After.

Every timer here runs on an injected ``IReactorTime``, so tests drive them
with ``task.Clock``.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from plexagent import __version__
from plexagent.controlplane.client import ControlPlaneClient, ControlPlaneError
from plexagent.controlplane.events import (
    MAX_LINE,
    Envelope,
    EnvelopeVerifier,
    RejectedEnvelope,
    ServerSentEvent,
    SSEParser,
    header_safe_id,
)
from plexagent.logs import describe
from plexagent.node.reports import rfc3339
from plexagent.node.state import (
    InvalidState,
    NodeState,
    StateCache,
    parse_data_entries,
    parse_metadata,
    parse_secret_refs,
)

log = Logger()


class Backoff:
    """
    Exponential backoff with full jitter: the n-th delay is uniform in
    [0, min(cap, base * 2**n)], but never less than a Retry-After the server
    asked for.
    """

    def __init__(self, base: float = 1.0, cap: float = 60.0, rng: Callable[[], float] = random.random) -> None:
        self.base = base
        self.cap = cap
        self._rng = rng
        self.attempt = 0

    def reset(self) -> None:
        self.attempt = 0

    def next_delay(self, retry_after: float | None = None) -> float:
        ceiling = min(self.cap, self.base * (2 ** min(self.attempt, 32)))
        self.attempt += 1
        delay = self._rng() * ceiling
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay


def _retry_after(failure: Any) -> float | None:
    if failure.check(ControlPlaneError):
        return failure.value.retry_after
    return None


def _cancel(call: Any) -> None:
    if call is not None and call.active():
        call.cancel()


class StateSync(service.Service):
    """
    Fetches node state at start, then every ``reconcile_interval`` and on
    demand (``fetch_now``), retrying failures with backoff; applies events
    from the stream (``apply``). A fetched state replaces the cache whole.

    After the first successful fetch it starts ``stream`` (if any), whose
    reconnects call ``fetch_now``.
    """

    #: How often a fetch is discarded because events arrived while it was in
    #: flight (its answer may predate them) before it is taken anyway.
    MAX_STALE_FETCHES = 3

    def __init__(
        self,
        client: ControlPlaneClient,
        cache: StateCache,
        clock: IReactorTime,
        backoff: Backoff | None = None,
        reconcile_interval: float | None = None,
    ) -> None:
        self.client = client
        self.cache = cache
        self.clock = clock
        self.backoff = backoff or Backoff()
        self.reconcile_interval = reconcile_interval
        self.stream: EventStream | None = None
        self._retry_call: Any = None
        self._inflight: defer.Deferred[Any] | None = None
        self._again = False
        self._events_applied = 0
        self._stale_fetches = 0
        self.last_success: float | None = None
        self.fetches = 0

    def startService(self) -> None:
        super().startService()
        self.fetch_now()

    def stopService(self) -> Any:
        super().stopService()
        _cancel(self._retry_call)
        self._retry_call = None
        if self._inflight is not None:
            self._inflight.cancel()
        # The client is not ours to close: it is shared (secret reads, the
        # outbox) and closed by the agent once all its users have stopped.
        return self.stream.stop() if self.stream is not None else defer.succeed(None)

    # -- full fetches ----------------------------------------------------

    def fetch_now(self) -> None:
        """Fetch state now; if a fetch is running, fetch again when it ends."""
        if not self.running:
            return
        if self._inflight is not None:
            self._again = True
            return
        _cancel(self._retry_call)
        self._retry_call = None
        self._again = False
        self.fetches += 1
        events_before = self._events_applied
        d = self.client.fetch_state()
        self._inflight = d
        d.addCallbacks(self._fetched, self._fetch_failed, callbackArgs=(events_before,))
        d.addBoth(self._done)

    def _done(self, result: Any) -> None:
        self._inflight = None
        if self._again and self.running:
            self.fetch_now()

    def _fetched(self, doc: Any, events_before: int) -> Any:
        try:
            state = NodeState.from_document(doc)
        except InvalidState as e:
            log.warn("control plane sent an unusable state document: {error}", error=str(e))
            self._schedule(self.backoff.next_delay())
            return None
        if self._events_applied != events_before and self._stale_fetches < self.MAX_STALE_FETCHES:
            # Events were applied while this answer travelled: it may be
            # older than they are. Ask again rather than step back in time.
            self._stale_fetches += 1
            self._again = True
            return None
        self._stale_fetches = 0
        try:
            # Not chained to the fetch: stopping the sync cancels the fetch,
            # and must not cancel the write (the store waits for it on stop).
            self.cache.replace(state)
        except InvalidState as e:
            log.warn("control plane sent a state the agent cannot store: {error}", error=str(e))
            self._schedule(self.backoff.next_delay())
            return None
        self.backoff.reset()
        self.last_success = self.clock.seconds()
        if self.reconcile_interval is not None:
            self._schedule(self.reconcile_interval)
        if self.stream is not None and not self.stream.started:
            self.stream.start()
        return None

    def _fetch_failed(self, failure: Any) -> None:
        if failure.check(defer.CancelledError):
            return
        # A fetch asked for meanwhile waits for the backoff like this retry:
        # a reconcile request must not defeat it while the control plane fails.
        self._again = False
        if failure.check(ControlPlaneError):
            log.warn("state fetch failed: {error}", error=str(failure.value))
        else:
            log.failure("state fetch failed", failure)
        self._schedule(self.backoff.next_delay(_retry_after(failure)))

    def _schedule(self, delay: float) -> None:
        if not self.running:
            return
        _cancel(self._retry_call)
        self._retry_call = self.clock.callLater(delay, self.fetch_now)

    # -- events ----------------------------------------------------------

    def apply(self, envelope: Envelope) -> None:
        """Apply one verified event to the cache; unknown types are ignored."""
        payload = envelope.payload
        try:
            if envelope.event_type == "node_state_updated":
                if "metadata" not in payload or "data" not in payload:
                    raise InvalidState("payload needs both metadata and data")
                changes = {
                    "metadata": parse_metadata(payload["metadata"]),
                    "data": parse_data_entries(payload["data"]),
                }
            elif envelope.event_type == "node_secrets_updated":
                if "secret_refs" not in payload:
                    raise InvalidState("payload needs secret_refs")
                changes = {"secret_refs": parse_secret_refs(payload["secret_refs"])}
            else:
                log.debug("ignoring event of unknown type {type}", type=envelope.event_type)
                return
        except InvalidState as e:
            log.warn(
                "dropping {type} event {id}: {error}",
                type=envelope.event_type, id=envelope.event_id, error=str(e),
            )
            return
        try:
            self.cache.update(**changes)
        except InvalidState as e:
            log.warn("dropping {type} event {id}: {error}", type=envelope.event_type, id=envelope.event_id,
                     error=str(e))
            return
        self._events_applied += 1

    def stream_reconnected(self) -> None:
        """The stream came back: events may have been missed, reconcile."""
        self.fetch_now()


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
    The subscription to ``GET /v1/nodes/{id}/events``: parses the SSE body,
    verifies each envelope and hands it to ``apply``. Reconnects after any
    drop or failure with ``Last-Event-ID``: at once after a useful
    connection (one that delivered an event or lived ``USEFUL_AFTER``
    seconds), otherwise with backoff and jitter, honouring Retry-After. A
    stream silent for ``idle_timeout`` seconds (not even a keep-alive
    comment), or sending a line longer than plexd's parser takes, is
    closed and reconnected with backoff. ``on_reconnect`` is called on every
    successful connection but the first.
    """

    #: A connection that lived this long without an event still counts as useful.
    USEFUL_AFTER = 30.0

    def __init__(
        self,
        client: ControlPlaneClient,
        clock: IReactorTime,
        verifier: EnvelopeVerifier,
        apply: Callable[[Envelope], None],
        on_reconnect: Callable[[], None] = lambda: None,
        idle_timeout: float = 90.0,
        backoff: Backoff | None = None,
        parser_factory: Callable[[], SSEParser] = SSEParser,
    ) -> None:
        self.client = client
        self.clock = clock
        self.verifier = verifier
        self._apply = apply
        self._on_reconnect = on_reconnect
        self.idle_timeout = idle_timeout
        self.backoff = backoff or Backoff()
        self._parser_factory = parser_factory
        self.started = False
        self.connected = False
        self.last_event_id = b""
        self.connections = 0
        self.rejected = 0
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
        _cancel(self._reconnect_call)
        _cancel(self._watchdog)
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
        d = self.client.open_events(header_safe_id(self.last_event_id))
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
        self._parser = self._parser_factory()
        self._parser.last_event_id = self.last_event_id
        self._protocol = _StreamProtocol(self)
        self._arm_watchdog()
        response.deliverBody(self._protocol)
        log.info("event stream connected")
        if self.connections > 1:
            self._on_reconnect()

    def _open_failed(self, failure: Any) -> None:
        self._connecting = None
        if not self.started:
            return
        log.warn("event stream unavailable: {error}", error=failure.getErrorMessage())
        self._reconnect_later(self.backoff.next_delay(_retry_after(failure)))

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

    def _handle(self, event: ServerSentEvent) -> None:
        # A complete event proves the stream works: failures start over.
        self.backoff.reset()
        self._useful = True
        if event.id:
            self.last_event_id = event.id
        try:
            if event.too_large:
                raise RejectedEnvelope("event data too large")
            envelope = self.verifier.verify(event.data.decode("utf-8", "replace"))
        except RejectedEnvelope as e:
            self.rejected += 1
            log.warn("dropping event {id}: {reason}", id=event.id, reason=str(e))
            return
        try:
            self._apply(envelope)
        except Exception:
            log.failure("applying event {id} failed", id=event.id)

    def _lost(self, protocol: _StreamProtocol, reason: Any) -> None:
        if protocol is not self._protocol:
            return
        self._protocol = None
        self._parser = None
        self.connected = False
        _cancel(self._watchdog)
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
        _cancel(self._reconnect_call)
        self._reconnect_call = self.clock.callLater(delay, self._connect)


class Heartbeat(service.Service):
    """
    POSTs a heartbeat every ``interval`` seconds; an answer of
    ``{"reconcile": true}`` calls ``on_reconcile``. A failed heartbeat is
    simply sent again at the next interval (or after Retry-After, if later).
    """

    def __init__(
        self,
        client: ControlPlaneClient,
        clock: IReactorTime,
        node_id: str,
        interval: float,
        on_reconcile: Callable[[], None],
        status: Callable[[], str] = lambda: "ok",
    ) -> None:
        self.client = client
        self.clock = clock
        self.node_id = node_id
        self.interval = interval
        self._on_reconcile = on_reconcile
        self._status = status
        self._started_at = 0.0
        self._call: Any = None
        self._inflight: defer.Deferred[Any] | None = None
        self.sent = 0

    def startService(self) -> None:
        super().startService()
        self._started_at = self.clock.seconds()
        self._call = self.clock.callLater(0, self.beat)

    def stopService(self) -> Any:
        super().stopService()
        _cancel(self._call)
        if self._inflight is not None:
            self._inflight.cancel()
        return None

    def body(self) -> dict[str, Any]:
        now = self.clock.seconds()
        return {
            "node_id": self.node_id,
            "timestamp": rfc3339(now),
            "status": self._status(),
            "uptime_s": int(now - self._started_at),
            "version": __version__,
        }

    def beat(self) -> None:
        self._call = None
        if not self.running:
            return
        self.sent += 1
        d = self.client.heartbeat(self.body())
        self._inflight = d
        d.addCallbacks(self._answered, self._failed)

    def _answered(self, answer: Any) -> None:
        self._inflight = None
        if isinstance(answer, dict) and answer.get("reconcile") is True:
            log.info("control plane asked for a reconcile")
            self._on_reconcile()
        self._next(self.interval)

    def _failed(self, failure: Any) -> None:
        self._inflight = None
        if failure.check(defer.CancelledError):
            return
        log.warn("heartbeat failed: {error}", error=failure.getErrorMessage())
        self._next(max(self.interval, _retry_after(failure) or 0.0))

    def _next(self, delay: float) -> None:
        if self.running:
            self._call = self.clock.callLater(delay, self.beat)
