"""
The report outbox: sends every acknowledged report change to the control
plane, at least once.

The report log (``plexagent.node.reports``) is the durable outbox: every change is
on disk, with a sequence number, before its client is answered. This service
only keeps one number durable besides it, the last sequence number the
control plane acknowledged (``<data_dir>/outbox.json``, replaced atomically),
and sends ``changes_since`` that number. A crash between a successful POST
and the write of that number resends the batch; the control plane treats a
resend of the same ``(key, version)`` as a no-op.

How a batch goes over the wire is the protocol's (``deliver``, the
session's ``deliver_reports``). One poisoned change must not block the
others: a change the control plane refuses for its content is handed back
to ``set_aside`` here, which appends it to ``<data_dir>/outbox-refused.jsonl``
(so nothing is silently lost), logs it with its key, counts it
(``refused``) and no longer retries it; the rest is delivered. A newer
version of the key is sent as usual.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from plexagent import errors
from plexagent.controlplane.backoff import Backoff, cancel_call, retry_after
from plexagent.controlplane.protocol import Call, ControlPlaneError, ErrorKind, RefusedChange, SetAside
from plexagent.fileio import append_durably, atomic_write, decode_json, encode_json, read_stored, set_aside
from plexagent.node.reports import Changes, ReportStore, rfc3339

log = Logger()

#: Delivers one batch: (changes, set_aside) -> fires once delivered.
Deliver = Callable[[Changes, SetAside], defer.Deferred[Any]]


class ReportOutbox(service.Service):
    """
    Coalesces report changes for ``debounce`` seconds (counted from the first
    unsent change, so a steady stream of writes cannot postpone a sync
    forever), delivers them (``deliver``: the protocol's batch), and once
    delivered makes the new synced sequence number durable. Failures are
    retried with backoff and full jitter, honouring Retry-After; a control
    plane that does not offer reports yet pauses them for as long as it says.
    """

    FILENAME = "outbox.json"
    REFUSED_FILENAME = "outbox-refused.jsonl"
    #: Changes per request: a backlog from a long outage goes out in
    #: requests of bounded size, oldest first.
    MAX_BATCH = 1000

    def __init__(
        self,
        store: ReportStore,
        deliver: Deliver,
        clock: IReactorTime,
        data_dir: str,
        debounce: float = 5.0,
        backoff: Backoff | None = None,
        max_batch: int | None = None,
        run_in_thread: Callable[..., defer.Deferred[Any]] = threads.deferToThread,
        on_auth_failure: Callable[[Call], None] = lambda call: None,
    ) -> None:
        self.store = store
        self._deliver = deliver
        self._on_auth_failure = on_auth_failure
        self.clock = clock
        self.debounce = debounce
        self.backoff = backoff or Backoff()
        self._path = os.path.join(data_dir, self.FILENAME)
        self.refused_path = os.path.join(data_dir, self.REFUSED_FILENAME)
        self.max_batch = max_batch or self.MAX_BATCH
        self._run_in_thread = run_in_thread
        #: the last sequence number the control plane acknowledged (durable)
        self.synced_seq = 0
        # From now on the store keeps each delete until the control plane has it.
        store.synced(0)
        self._call: Any = None
        self._inflight: defer.Deferred[Any] | None = None
        self._subscribed = False
        self.posts = 0
        self.failures = 0
        #: changes the control plane refused, set aside (since start)
        self.refused = 0

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
        """Read the synced sequence number (a small file, at start); set it aside if unusable."""
        self.synced_seq = 0
        try:
            doc = decode_json(read_stored(self._path, 4096))
            seq = doc.get("synced_seq") if isinstance(doc, dict) else None
            if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
                raise ValueError("synced_seq must be a non-negative integer")
            self.synced_seq = seq
        except FileNotFoundError:
            pass
        except (OSError, ValueError, RecursionError) as e:
            # Resending everything is safe (resends are no-ops); losing a
            # change is not.
            set_aside(self._path, f"unreadable outbox position ({e}): every report is resent")
        if self.synced_seq > self.store.durable_seq:
            # The report log was reset under us: start over.
            self.synced_seq = 0
        self.store.synced(self.synced_seq)

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
        cancel_call(self._call)
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
        cancel_call(self._call)
        self._call = self.clock.callLater(delay, self.send)

    def send(self) -> None:
        """Send every change not yet acknowledged (one batch)."""
        self._call = None
        if not self.running or self._inflight is not None:
            return
        changes = self.store.changes_since(self.synced_seq, self.max_batch)
        if not changes.entries and not changes.deleted:
            self.synced_seq = max(self.synced_seq, changes.upto)
            self.store.synced(self.synced_seq)
            return
        self.posts += 1
        d = self._deliver(changes, self._set_aside)
        self._inflight = d
        truncated = changes.upto < self.store.durable_seq
        d.addCallback(lambda _: self._persist(changes.upto))
        d.addCallbacks(self._sent, self._failed, callbackArgs=(truncated,))

    def _persist(self, upto: int) -> defer.Deferred[int]:
        payload = encode_json({"synced_seq": upto})
        return self._run_in_thread(atomic_write, self._path, payload).addCallback(lambda _: upto)

    def _sent(self, upto: int, truncated: bool) -> None:
        self._inflight = None
        self.synced_seq = upto
        self.store.synced(upto)
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
        if failure.check(ControlPlaneError):
            error = failure.value
            if error.kind is ErrorKind.AUTH:
                self._on_auth_failure(Call.REPORT)
            if error.kind is ErrorKind.NOT_PROVISIONED and error.pause:
                log.warn("the control plane does not take reports yet: trying again in {seconds}s "
                         "({depth} changes pending)", seconds=error.pause, depth=self.depth)
                if self.running:
                    self._schedule(error.pause)
                return
        elif not failure.check(errors.PlexError):
            log.failure("report sync failed", failure)
        log.warn("report sync failed ({depth} changes pending): {error}",
                 depth=self.depth, error=failure.getErrorMessage())
        if self.running:
            self._schedule(self.backoff.next_delay(retry_after(failure)))

    def _set_aside(self, change: RefusedChange) -> defer.Deferred[None]:
        """Keep a refused change on disk (in a thread), then log and count it."""
        record = {"refused_at": rfc3339(self.clock.seconds()), "status": change.status, "code": change.code,
                  "op": change.op, "key": change.key, "entry": dict(change.entry) if change.entry else None}
        d = self._run_in_thread(append_durably, self.refused_path, encode_json(record) + b"\n")

        def kept(_: Any) -> None:
            self.refused += 1
            log.warn("the control plane refused the report {op} of {key} ({status}): kept in {path}, "
                     "no longer retried", op=change.op, key=change.key, status=change.status, path=self.refused_path)

        return d.addCallback(kept)
