"""
Keeping the cache current (docs/control-plane-sync.md): fetch state at
start, then follow the signed event stream, fetch again every
``reconcile_interval`` after the last success, after every stream
reconnect and when a heartbeat answer asks for it. On any failure the Local
Node API keeps serving the cache and the failed step is retried with
exponential backoff and full jitter, honouring Retry-After.

``StateSync.run`` is the one place the effects of events and heartbeat
answers are carried out, whatever protocol produced them.

Every timer here runs on an injected ``IReactorTime``, so tests drive them
with ``task.Clock``.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from plexagent.controlplane.backoff import Backoff, cancel_call, retry_after
from plexagent.controlplane.events import EventStream
from plexagent.controlplane.keys import KeyRing
from plexagent.controlplane.protocol import (
    Call,
    ControlPlaneError,
    Dropped,
    DropReason,
    Effect,
    ErrorKind,
    FetchedState,
    HeartbeatAnswer,
    Ignore,
    InstallSigningKeys,
    PullState,
    ReplaceState,
    RotateNodeKey,
)
from plexagent.node.state import InvalidState, StateCache

log = Logger()

__all__ = ["Backoff", "Heartbeat", "StateSync"]


def _auth_failure(failure: Any, call: Call, report: Callable[[Call], None]) -> None:
    if failure.check(ControlPlaneError) and failure.value.kind is ErrorKind.AUTH:
        report(call)


class StateSync(service.Service):
    """
    Fetches node state at start, then every ``reconcile_interval`` and on
    demand (``fetch_now``), retrying failures with backoff. A fetched state
    replaces the cache whole and installs the signing keys it names.

    After the first successful fetch it starts ``stream`` (if any), whose
    reconnects call ``fetch_now``.
    """

    #: How often a fetch is discarded because events arrived while it was in
    #: flight (its answer may predate them) before it is taken anyway.
    MAX_STALE_FETCHES = 3

    def __init__(
        self,
        session: Any,
        cache: StateCache,
        ring: KeyRing,
        clock: IReactorTime,
        backoff: Backoff | None = None,
        reconcile_interval: float | None = None,
        on_auth_failure: Callable[[Call], None] = lambda call: None,
        rotate_node_key: Callable[[], None] = lambda: None,
    ) -> None:
        self.session = session
        self.cache = cache
        self.ring = ring
        self.clock = clock
        self.backoff = backoff or Backoff()
        self.reconcile_interval = reconcile_interval
        self._on_auth_failure = on_auth_failure
        self._rotate_node_key = rotate_node_key
        self.stream: EventStream | None = None
        self._retry_call: Any = None
        self._inflight: defer.Deferred[Any] | None = None
        self._again = False
        self._events_applied = 0
        self._stale_fetches = 0
        #: when the last fetch succeeded (clock seconds)
        self.last_success: float | None = None
        self.fetches = 0
        self.failures = 0

    def startService(self) -> None:
        super().startService()
        self.fetch_now()

    def stopService(self) -> Any:
        super().stopService()
        cancel_call(self._retry_call)
        self._retry_call = None
        if self._inflight is not None:
            self._inflight.cancel()
        return self.stream.stop() if self.stream is not None else defer.succeed(None)

    # -- full fetches ----------------------------------------------------

    def fetch_now(self) -> None:
        """Fetch state now; if a fetch is running, fetch again when it ends."""
        if not self.running:
            return
        if self._inflight is not None:
            self._again = True
            return
        cancel_call(self._retry_call)
        self._retry_call = None
        self._again = False
        self.fetches += 1
        events_before = self._events_applied
        d = self.session.fetch_state()
        self._inflight = d
        d.addCallbacks(self._fetched, self._fetch_failed, callbackArgs=(events_before,))
        d.addBoth(self._done)

    def _done(self, result: Any) -> None:
        self._inflight = None
        if self._again and self.running:
            self.fetch_now()

    def _fetched(self, fetched: FetchedState, events_before: int) -> None:
        if self._events_applied != events_before and self._stale_fetches < self.MAX_STALE_FETCHES:
            # Events were applied while this answer travelled: it may be
            # older than they are. Ask again rather than step back in time.
            self._stale_fetches += 1
            self._again = True
            return
        self._stale_fetches = 0
        try:
            # Not chained to the fetch: stopping the sync cancels the fetch,
            # and must not cancel the write (the store waits for it on stop).
            self.cache.replace(fetched.state_over(self.cache.current))
        except InvalidState as e:
            self.failures += 1
            log.warn("control plane sent a state the agent cannot store: {error}", error=str(e))
            self._schedule(self.backoff.next_delay())
            return
        if fetched.keys is not None:
            self.ring.install(fetched.keys, "state")
        self.session.state_applied(fetched)
        self.backoff.reset()
        self.last_success = self.clock.seconds()
        if self.reconcile_interval is not None:
            # Counted from this success: a triggered fetch restarts the period.
            self._schedule(self.reconcile_interval)
        if self.stream is not None and not self.stream.started:
            self.stream.start()

    def _fetch_failed(self, failure: Any) -> None:
        if failure.check(defer.CancelledError):
            return
        self.failures += 1
        # A fetch asked for meanwhile waits for the backoff like this retry:
        # a reconcile request must not defeat it while the control plane fails.
        self._again = False
        _auth_failure(failure, Call.STATE, self._on_auth_failure)
        if failure.check(ControlPlaneError):
            log.warn("state fetch failed: {error}", error=str(failure.value))
        else:
            log.failure("state fetch failed", failure)
        self._schedule(self.backoff.next_delay(retry_after(failure)))

    def _schedule(self, delay: float) -> None:
        if not self.running:
            return
        cancel_call(self._retry_call)
        self._retry_call = self.clock.callLater(delay, self.fetch_now)

    # -- effects -----------------------------------------------------------

    def run(self, effect: Effect, origin: str) -> None:
        """
        Carry out what an event or a heartbeat answer asks for. Dropped
        (UNUSABLE_PAYLOAD) when the cache refuses a state: nothing changes.
        """
        if isinstance(effect, ReplaceState):
            try:
                self.cache.update(**effect.changes)
            except InvalidState as e:
                raise Dropped(DropReason.UNUSABLE_PAYLOAD, str(e).partition(":")[0]) from None
            self._events_applied += 1
        elif isinstance(effect, PullState):
            self.fetch_now()
        elif isinstance(effect, InstallSigningKeys):
            self.ring.install(effect.keys, origin)
        elif isinstance(effect, RotateNodeKey):
            self._rotate_node_key()
        elif isinstance(effect, Ignore):
            log.debug("nothing to do for an {origin}: {why}", origin=origin, why=effect.why)


class Heartbeat(service.Service):
    """
    Beats at start, then every ``interval`` seconds; what an answer asks
    for goes to ``run``. A failed heartbeat is sent again at the next
    interval (or after Retry-After, if later).
    """

    def __init__(
        self,
        session: Any,
        clock: IReactorTime,
        interval: float,
        run: Callable[[Effect, str], None],
        on_auth_failure: Callable[[Call], None] = lambda call: None,
    ) -> None:
        self.session = session
        self.clock = clock
        self.interval = interval
        self._run = run
        self._on_auth_failure = on_auth_failure
        self._call: Any = None
        self._inflight: defer.Deferred[Any] | None = None
        self.sent = 0
        self.failures = 0
        self.last_success: float | None = None
        self.answers: collections.Counter[str] = collections.Counter()

    def startService(self) -> None:
        super().startService()
        self._call = self.clock.callLater(0, self.beat)

    def stopService(self) -> Any:
        super().stopService()
        cancel_call(self._call)
        if self._inflight is not None:
            self._inflight.cancel()
        return None

    def beat(self) -> None:
        self._call = None
        if not self.running:
            return
        self.sent += 1
        d = self.session.heartbeat()
        self._inflight = d
        d.addCallbacks(self._answered, self._failed)

    def _answered(self, answer: HeartbeatAnswer) -> None:
        self._inflight = None
        self.last_success = self.clock.seconds()
        for effect in answer.effects:
            log.info("the control plane's heartbeat answer asks for: {effect}", effect=type(effect).__name__)
            try:
                self._run(effect, "heartbeat")
            except Dropped as dropped:
                log.warn("could not do what a heartbeat answer asked: {reason}", reason=str(dropped))
        self._next(self.interval)

    def _failed(self, failure: Any) -> None:
        self._inflight = None
        if failure.check(defer.CancelledError):
            return
        self.failures += 1
        _auth_failure(failure, Call.HEARTBEAT, self._on_auth_failure)
        log.warn("heartbeat failed: {error}", error=failure.getErrorMessage())
        self._next(max(self.interval, retry_after(failure) or 0.0))

    def _next(self, delay: float) -> None:
        if self.running:
            self._call = self.clock.callLater(delay, self.beat)
