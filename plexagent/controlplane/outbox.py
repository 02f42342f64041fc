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

One poisoned change must not block the others. When the control plane
refuses a batch for its content (a 4xx other than auth, rate limit or
timeout: 400, 413, 422, ...), the outbox first checks that it takes an empty
batch (else the refusal is about the control plane, not the changes, and the
batch is retried with backoff), then bisects the batch: halves are sent on
their own until each refused part is a single change. Those are set aside:
appended to ``<data_dir>/outbox-refused.jsonl`` (so nothing is silently
lost), logged with their key, counted (``refused``), and no longer retried;
the rest is delivered. A newer version of the key is sent as usual.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import attrs
from twisted.application import service
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from plexagent import errors
from plexagent.controlplane.client import ControlPlaneError
from plexagent.controlplane.sync import Backoff, _cancel, _retry_after
from plexagent.fileio import append_durably, atomic_write, decode_json, encode_json, read_stored, set_aside
from plexagent.node.reports import Changes, ReportStore, rfc3339

log = Logger()

#: 4xx answers that say nothing about the changes sent: retried as usual.
_NOT_A_REFUSAL = frozenset({401, 403, 404, 407, 408, 425, 429})


def refusal_status(failure: Any) -> int | None:
    """The status of a control-plane answer refusing what was sent, else None."""
    if not failure.check(ControlPlaneError):
        return None
    status = failure.value.status
    if status is not None and 400 <= status < 500 and status not in _NOT_A_REFUSAL:
        return int(status)
    return None


#: One change of a batch: ("put", entry) or ("delete", key).
_Change = tuple[str, Any]


def _split(changes: Changes) -> list[_Change]:
    return [("put", e) for e in changes.entries] + [("delete", k) for k in changes.deleted]


@attrs.define
class _Bisection:
    """A refused batch being searched for the changes the control plane refuses."""

    upto: int
    truncated: bool
    #: parts still to send, first one next
    parts: list[list[_Change]]
    #: an empty batch was accepted: refusals are about content
    probed: bool = False


class ReportOutbox(service.Service):
    """
    Coalesces report changes for ``debounce`` seconds (counted from the first
    unsent change, so a steady stream of writes cannot postpone a sync
    forever), POSTs them as one ``{"entries": [...], "deleted": [...]}``,
    and on a 2xx makes the new synced sequence number durable. Failures are
    retried with backoff and full jitter, honouring Retry-After.
    """

    FILENAME = "outbox.json"
    REFUSED_FILENAME = "outbox-refused.jsonl"
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
        self._bisection: _Bisection | None = None
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
        if self._bisection is not None:
            self._send_part(self._bisection)
            return
        changes = self.store.changes_since(self.synced_seq, self.max_batch)
        if not changes.entries and not changes.deleted:
            self.synced_seq = max(self.synced_seq, changes.upto)
            self.store.synced(self.synced_seq)
            return
        self.posts += 1
        d = self.client.send_report(changes.entries, changes.deleted)
        self._inflight = d
        truncated = changes.upto < self.store.durable_seq
        d.addCallback(lambda _: self._persist(changes.upto))
        d.addCallbacks(self._sent, self._failed, callbackArgs=(truncated,), errbackArgs=(changes, truncated))

    def _persist(self, upto: int) -> defer.Deferred[int]:
        payload = encode_json({"synced_seq": upto})
        return self._run_in_thread(atomic_write, self._path, payload).addCallback(lambda _: upto)

    def _sent(self, upto: int, truncated: bool) -> None:
        self._inflight = None
        self._bisection = None
        self.synced_seq = upto
        self.store.synced(upto)
        self.backoff.reset()
        if self.running and self.pending:
            # The rest of a backlog goes at once; changes committed while
            # this batch travelled wait for the debounce as usual.
            self._schedule(0 if truncated else self.debounce)

    def _failed(self, failure: Any, changes: Changes, truncated: bool) -> None:
        self._inflight = None
        if failure.check(defer.CancelledError):
            return
        status = refusal_status(failure)
        if status is not None:
            log.warn("the control plane refused a batch of {count} report changes ({status}): "
                     "looking for the changes it refuses", count=len(changes.entries) + len(changes.deleted),
                     status=status)
            batch = _split(changes)
            half = len(batch) // 2
            self._bisection = _Bisection(changes.upto, truncated, [batch[:half], batch[half:]] if half else [batch])
            if self.running:
                self._schedule(0)
            return
        self._retry_later(failure)

    def _retry_later(self, failure: Any) -> None:
        self.failures += 1
        log.warn("report sync failed ({depth} changes pending): {error}",
                 depth=self.depth, error=failure.getErrorMessage())
        if self.running:
            self._schedule(self.backoff.next_delay(_retry_after(failure)))

    # -- finding refused changes -----------------------------------------

    def _send_part(self, bisection: _Bisection) -> None:
        if not bisection.parts:
            d = self._persist(bisection.upto)
            self._inflight = d
            d.addCallbacks(self._sent, self._part_failed, callbackArgs=(bisection.truncated,), errbackArgs=(None,))
            return
        part = bisection.parts[0] if bisection.probed else []
        self.posts += 1
        d = self.client.send_report([c for kind, c in part if kind == "put"],
                                    [c for kind, c in part if kind == "delete"])
        self._inflight = d
        d.addCallbacks(self._part_sent, self._part_failed, errbackArgs=(part if bisection.probed else None,))

    def _part_sent(self, _: Any) -> None:
        self._inflight = None
        bisection = self._bisection
        if bisection is None:
            return
        if bisection.probed:
            bisection.parts.pop(0)
        bisection.probed = True
        self.backoff.reset()
        if self.running:
            self._schedule(0)

    def _part_failed(self, failure: Any, part: list[_Change] | None) -> None:
        self._inflight = None
        bisection = self._bisection
        if failure.check(defer.CancelledError) or bisection is None:
            return
        status = refusal_status(failure)
        if status is None:
            self._retry_later(failure)
        elif part is None:
            # It refuses even an empty batch: the changes are not the
            # reason. Retry the whole batch later; nothing is set aside.
            self._bisection = None
            self._retry_later(failure)
        elif len(part) == 1:
            self._set_aside(part[0], status)
        else:
            half = len(part) // 2
            bisection.parts[0:1] = [part[:half], part[half:]]
            if self.running:
                self._schedule(0)

    def _retry_after_set_aside_failed(self, failure: Any) -> None:
        self._inflight = None
        if not failure.check(errors.PlexError):
            log.failure("setting aside a refused report change failed", failure)
        self._retry_later(failure)

    def _set_aside(self, change: _Change, status: int) -> None:
        """Keep a refused change on disk (in a thread), then log and count it and go on."""
        kind, value = change
        key = value["key"] if kind == "put" else value
        record = {"refused_at": rfc3339(self.clock.seconds()), "status": status, "op": kind, "key": key,
                  "entry": value if kind == "put" else None}
        d = self._run_in_thread(append_durably, self.refused_path, encode_json(record) + b"\n")
        self._inflight = d

        def kept(_: Any) -> None:
            self.refused += 1
            log.warn("the control plane refused the report {op} of {key} ({status}): kept in {path}, "
                     "no longer retried", op=kind, key=key, status=status, path=self.refused_path)
            self._part_sent(None)

        d.addCallbacks(kept, self._retry_after_set_aside_failed)
