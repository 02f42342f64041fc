"""
The report outbox: sends every acknowledged report change to the control
plane, at least once.

The report log (``plexagent.reports``) is the durable outbox: every change is
on disk, with a sequence number, before its client is answered. This service
only keeps one number durable besides it, the last sequence number the
control plane acknowledged (``<data_dir>/outbox.json``, replaced atomically),
and sends ``changes_since`` that number. A crash between a successful POST
and the write of that number resends the batch; the control plane treats a
resend of the same ``(key, version)`` as a no-op.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from plexagent.controlplane.sync import Backoff, _cancel, _retry_after
from plexagent.fileio import atomic_write
from plexagent.reports import ReportStore

log = Logger()


class ReportOutbox(service.Service):
    """
    Coalesces report changes for ``debounce`` seconds (counted from the first
    unsent change, so a steady stream of writes cannot postpone a sync
    forever), POSTs them as one ``{"entries": [...], "deleted": [...]}``,
    and on a 2xx makes the new synced sequence number durable. Failures are
    retried with backoff and full jitter, honouring Retry-After.
    """

    FILENAME = "outbox.json"
    #: Changes per request: a backlog from a long outage goes out in
    #: requests of bounded size, oldest first.
    MAX_BATCH = 1000

    def __init__(
        self,
        store: ReportStore,
        client: Any,
        clock: IReactorTime,
        data_dir: str,
        debounce: float = 5.0,
        backoff: Backoff | None = None,
        max_batch: int | None = None,
        run_in_thread: Callable[..., defer.Deferred[Any]] = threads.deferToThread,
    ) -> None:
        self.store = store
        self.client = client
        self.clock = clock
        self.debounce = debounce
        self.backoff = backoff or Backoff()
        self._path = os.path.join(data_dir, self.FILENAME)
        self.max_batch = max_batch or self.MAX_BATCH
        self._run_in_thread = run_in_thread
        #: the last sequence number the control plane acknowledged (durable)
        self.synced_seq = 0
        self._call: Any = None
        self._inflight: defer.Deferred[Any] | None = None
        self._subscribed = False
        self.posts = 0
        self.failures = 0

    # -- state -----------------------------------------------------------

    @property
    def depth(self) -> int:
        """Changes (keys written or deleted) durable here but not yet acknowledged."""
        changes = self.store.changes_since(self.synced_seq)
        return len(changes.entries) + len(changes.deleted)

    @property
    def pending(self) -> bool:
        return self.store.durable_seq > self.synced_seq

    def load(self) -> None:
        """Read the synced sequence number (a small file, at start)."""
        try:
            with open(self._path, "rb") as f:
                doc = json.loads(f.read())
            self.synced_seq = int(doc["synced_seq"])
        except FileNotFoundError:
            self.synced_seq = 0
        except (OSError, ValueError, KeyError, TypeError) as e:
            # Resending everything is safe (resends are no-ops); losing a
            # change is not.
            log.warn("outbox position {path} unreadable ({error}): resending every report",
                     path=self._path, error=str(e))
            self.synced_seq = 0
        if self.synced_seq > self.store.durable_seq:
            # The report log was reset under us: start over.
            self.synced_seq = 0

    # -- lifecycle -------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.load()
        if not self._subscribed:
            self._subscribed = True
            self.store.subscribe(self._committed)
        if self.pending:
            # Changes acknowledged before a restart: send them at once.
            self._schedule(0)

    def stopService(self) -> Any:
        super().stopService()
        _cancel(self._call)
        self._call = None
        if self._inflight is not None:
            self._inflight.cancel()
        return None

    # -- sending ---------------------------------------------------------

    def _committed(self, durable_seq: int) -> None:
        if not self.running or self._inflight is not None:
            return  # an in-flight send looks again when it ends
        if self._call is None or not self._call.active():
            self._schedule(self.debounce)

    def _schedule(self, delay: float) -> None:
        _cancel(self._call)
        self._call = self.clock.callLater(delay, self.send)

    def send(self) -> None:
        """Send every change not yet acknowledged (one request)."""
        self._call = None
        if not self.running or self._inflight is not None:
            return
        changes = self.store.changes_since(self.synced_seq, self.max_batch)
        if not changes.entries and not changes.deleted:
            self.synced_seq = max(self.synced_seq, changes.upto)
            return
        self.posts += 1
        d = self.client.send_report(changes.entries, changes.deleted)
        self._inflight = d
        truncated = changes.upto < self.store.durable_seq
        d.addCallback(lambda _: self._persist(changes.upto))
        d.addCallbacks(self._sent, self._failed, callbackArgs=(truncated,))

    def _persist(self, upto: int) -> defer.Deferred[int]:
        payload = json.dumps({"synced_seq": upto}).encode("ascii")
        return self._run_in_thread(atomic_write, self._path, payload).addCallback(lambda _: upto)

    def _sent(self, upto: int, truncated: bool) -> None:
        self._inflight = None
        self.synced_seq = upto
        self.backoff.reset()
        if self.running and self.pending:
            # The rest of a backlog goes at once; changes committed while
            # this batch travelled wait for the debounce as usual.
            self._schedule(0 if truncated else self.debounce)

    def _failed(self, failure: Any) -> None:
        self._inflight = None
        if failure.check(defer.CancelledError):
            return
        self.failures += 1
        log.warn("report sync failed ({depth} changes pending): {error}",
                 depth=self.depth, error=failure.getErrorMessage())
        if self.running:
            self._schedule(self.backoff.next_delay(_retry_after(failure)))
