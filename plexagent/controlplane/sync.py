"""
Keeping the cache current: fetch state from the control plane, retrying with
exponential backoff and full jitter, while the Local Node API keeps serving
what is cached.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from plexagent.controlplane.client import ControlPlaneClient, ControlPlaneError
from plexagent.state import InvalidState, NodeState, StateCache

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


class StateSync(service.Service):
    """Fetches node state at start (and on demand), retrying until it succeeds."""

    def __init__(
        self,
        client: ControlPlaneClient,
        cache: StateCache,
        clock: IReactorTime,
        backoff: Backoff | None = None,
    ) -> None:
        self.client = client
        self.cache = cache
        self.clock = clock
        self.backoff = backoff or Backoff()
        self._retry_call: Any = None
        self._inflight: defer.Deferred[Any] | None = None
        self.last_success: float | None = None

    def startService(self) -> None:
        super().startService()
        self.fetch_now()

    def stopService(self) -> Any:
        super().stopService()
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        if self._inflight is not None:
            self._inflight.cancel()
        return self.client.close()

    def fetch_now(self) -> None:
        """Fetch state now unless a fetch is already running."""
        if self._inflight is not None or not self.running:
            return
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        d = self.client.fetch_state()
        self._inflight = d
        d.addCallbacks(self._fetched, self._fetch_failed)
        d.addBoth(self._done)

    def _done(self, result: Any) -> None:
        self._inflight = None

    def _fetched(self, doc: Any) -> Any:
        try:
            state = NodeState.from_document(doc)
        except InvalidState as e:
            log.warn("control plane sent an unusable state document: {error}", error=str(e))
            self._schedule_retry(None)
            return None
        self.backoff.reset()
        self.last_success = self.clock.seconds()
        return self.cache.replace(state)

    def _fetch_failed(self, failure: Any) -> None:
        if failure.check(defer.CancelledError):
            return
        retry_after = None
        if failure.check(ControlPlaneError):
            retry_after = failure.value.retry_after
            log.warn("state fetch failed: {error}", error=str(failure.value))
        else:
            log.failure("state fetch failed", failure)
        self._schedule_retry(retry_after)

    def _schedule_retry(self, retry_after: float | None) -> None:
        if not self.running:
            return
        delay = self.backoff.next_delay(retry_after)
        self._retry_call = self.clock.callLater(delay, self.fetch_now)
