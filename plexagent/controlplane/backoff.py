"""Retrying: exponential backoff with full jitter, and cancelling a pending timer."""

from __future__ import annotations

import random
from typing import Any, Callable


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


def cancel_call(call: Any) -> None:
    """Cancel a pending ``callLater`` (None or already run: nothing to do)."""
    if call is not None and call.active():
        call.cancel()


def retry_after(failure: Any) -> float | None:
    """The Retry-After floor a failed call carries, if any."""
    from plexagent.controlplane.protocol import ControlPlaneError

    if failure.check(ControlPlaneError):
        return failure.value.retry_after  # type: ignore[no-any-return]
    return None
