"""
The report store: entries written by local programs, with optimistic
locking, made durable before they are acknowledged.

Durability is an append-only log (``<data_dir>/reports/reports.log``, one
JSON record a line) written by group commit: every change is applied in
memory at once (so version checks are exact and never race, the reactor
being single-threaded), queued, and acknowledged only after the batch that
carries it has been written and fdatasync'ed. Changes arriving while a batch
is being synced ride in the next one, so concurrent writers share fsyncs.

Each record carries a sequence number; the control-plane outbox is simply
"every change with a sequence number above the last one synced", so the log
doubles as the durable outbox and the PUT path pays for one write only.

Keys are never used as file names: a hostile key cannot name a file.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Callable

import attrs
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from plexagent import errors
from plexagent.fileio import ensure_private_dir, fsync_dir, storage_error

log = Logger()

MAX_KEY_LENGTH = 512


def validate_key(key: str) -> str:
    """Refuse keys that are empty, too long or contain control characters."""
    if not key:
        raise errors.InvalidInput("invalid key", "the key must not be empty")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_LENGTH:
        raise errors.InvalidInput("invalid key", f"the key must be at most {MAX_KEY_LENGTH} bytes")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        raise errors.InvalidInput("invalid key", "the key must not contain control characters")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise errors.InvalidInput("invalid key", "the key must be valid UTF-8") from None
    return key


def rfc3339(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(int(seconds), datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )


@attrs.frozen
class Changes:
    """Durable changes after some sequence number: what the outbox sends."""

    entries: list[dict[str, Any]]
    deleted: list[str]
    upto: int


@attrs.define
class _Batch:
    records: list[bytes] = attrs.field(factory=list)
    waiters: list[tuple[defer.Deferred[Any], Any]] = attrs.field(factory=list)
    undo: list[Callable[[], None]] = attrs.field(factory=list)
    last_seq: int = 0


class ReportStore:
    """Report entries with optimistic locking, durable before acknowledged."""

    # Rewrite the log as a snapshot once it holds this many records more
    # than there are live keys.
    COMPACT_SLACK = 4096

    def __init__(
        self,
        data_dir: str,
        clock: IReactorTime,
        run_in_thread: Callable[..., defer.Deferred[Any]] = threads.deferToThread,
    ) -> None:
        self._dir = os.path.join(data_dir, "reports")
        self._path = os.path.join(self._dir, "reports.log")
        self._clock = clock
        self._run_in_thread = run_in_thread
        self._entries: dict[str, dict[str, Any]] = {}
        self._seqs: dict[str, int] = {}
        # Deleted keys: last version and sequence number, so versions stay
        # monotonic across delete and re-create and deletes can be synced.
        self._tombstones: dict[str, tuple[int, int]] = {}
        self._seq = 0
        self.durable_seq = 0
        self._records_in_file = 0
        self._fd: int | None = None
        self._pending = _Batch()
        self._flushing = False
        self._listeners: list[Callable[[int], None]] = []
        self._idle: list[defer.Deferred[None]] = []
        # For keys with changes not yet durable: (seq, state before it) of
        # each such change, oldest first, so changes_since can report the
        # durable state of the key (the outbox must not skip an acknowledged
        # change hidden behind a newer one that may still fail and be undone).
        self._undurable: dict[str, list[tuple[int, Any]]] = {}

    # -- loading ---------------------------------------------------------

    def load(self) -> None:
        """Replay the log (at start). A torn last line is cut off."""
        ensure_private_dir(self._dir)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        self._fd = fd
        with open(self._path, "rb") as f:
            data = f.read()
        good_end = 0
        offset = 0
        count = 0
        for line in data.splitlines(keepends=True):
            offset += len(line)
            if not line.endswith(b"\n"):
                break
            try:
                self._replay(json.loads(line))
            except (ValueError, KeyError, TypeError) as e:
                log.warn("skipping unreadable report log record: {error}", error=str(e))
            good_end = offset
            count += 1
        if good_end != len(data):
            log.warn("cutting a torn record off the end of the report log")
            os.ftruncate(fd, good_end)
            os.fsync(fd)
        self._records_in_file = count
        self.durable_seq = self._seq

    def _replay(self, record: dict[str, Any]) -> None:
        seq = int(record["seq"])
        if record["op"] == "put":
            entry = record["entry"]
            key = entry["key"]
            self._entries[key] = entry
            self._seqs[key] = seq
            self._tombstones.pop(key, None)
        elif record["op"] == "delete":
            key = record["key"]
            self._entries.pop(key, None)
            self._seqs.pop(key, None)
            self._tombstones[key] = (int(record["version"]), seq)
        else:
            raise ValueError(f"unknown op {record['op']!r}")
        self._seq = max(self._seq, seq)

    # -- reading ---------------------------------------------------------

    def get(self, key: str) -> dict[str, Any]:
        try:
            return self._entries[key]
        except KeyError:
            raise errors.NotFound("not found") from None

    def list(self) -> list[dict[str, Any]]:
        return [{"key": k, "version": e["version"]} for k, e in sorted(self._entries.items())]

    def __len__(self) -> int:
        return len(self._entries)

    # -- writing ---------------------------------------------------------

    def put(
        self, key: str, content_type: str, payload: Any, if_match: int | None
    ) -> defer.Deferred[dict[str, Any]]:
        """
        Create or replace ``key``; fires with the stored entry once durable.

        ``if_match`` (when given) must equal the current version, 0 for a key
        that does not exist; otherwise ``Conflict("version conflict")``.
        """
        validate_key(key)
        current = self._entries.get(key)
        current_version = current["version"] if current else 0
        if if_match is not None and if_match != current_version:
            raise errors.Conflict("version conflict")
        base_version = current_version
        if current is None and key in self._tombstones:
            base_version = self._tombstones[key][0]
        entry = {
            "key": key,
            "content_type": content_type,
            "payload": payload,
            "version": base_version + 1,
            "updated_at": rfc3339(self._clock.seconds()),
        }
        self._seq += 1
        seq = self._seq
        record = {"seq": seq, "op": "put", "entry": entry}
        previous = (current, self._seqs.get(key), self._tombstones.get(key))
        self._undurable.setdefault(key, []).append((seq, previous))
        self._entries[key] = entry
        self._seqs[key] = seq
        self._tombstones.pop(key, None)
        return self._enqueue(record, entry, lambda: self._restore(key, *previous))

    def delete(self, key: str, if_match: int | None = None) -> defer.Deferred[None]:
        """Delete ``key``; fires once durable. ``NotFound`` when absent."""
        validate_key(key)
        current = self._entries.get(key)
        if current is None:
            raise errors.NotFound("not found")
        if if_match is not None and if_match != current["version"]:
            raise errors.Conflict("version conflict")
        self._seq += 1
        seq = self._seq
        record = {"seq": seq, "op": "delete", "key": key, "version": current["version"]}
        previous = (current, self._seqs.get(key), self._tombstones.get(key))
        self._undurable.setdefault(key, []).append((seq, previous))
        del self._entries[key]
        self._seqs.pop(key, None)
        self._tombstones[key] = (current["version"], seq)
        return self._enqueue(record, None, lambda: self._restore(key, *previous))

    def _restore(
        self,
        key: str,
        entry: dict[str, Any] | None,
        seq: int | None,
        tombstone: tuple[int, int] | None,
    ) -> None:
        if entry is None:
            self._entries.pop(key, None)
            self._seqs.pop(key, None)
        else:
            self._entries[key] = entry
            self._seqs[key] = seq  # type: ignore[assignment]
        if tombstone is None:
            self._tombstones.pop(key, None)
        else:
            self._tombstones[key] = tombstone

    def _enqueue(self, record: dict[str, Any], result: Any, undo: Callable[[], None]) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        batch = self._pending
        batch.records.append(
            json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
        )
        batch.waiters.append((d, result))
        batch.undo.append(undo)
        batch.last_seq = record["seq"]
        if not self._flushing:
            self._flush()
        return d

    def _flush(self) -> None:
        batch, self._pending = self._pending, _Batch()
        self._flushing = True
        if self._records_in_file + len(batch.records) > len(self._entries) + len(self._tombstones) + self.COMPACT_SLACK:
            snapshot = self._snapshot_bytes()
            d = self._run_in_thread(self._write_snapshot, snapshot)
            count = snapshot.count(b"\n")
            d.addCallback(lambda _: setattr(self, "_records_in_file", count))
        else:
            d = self._run_in_thread(self._append, b"".join(batch.records))
            d.addCallback(lambda _: setattr(self, "_records_in_file", self._records_in_file + len(batch.records)))
        d.addCallbacks(lambda _: self._committed(batch), lambda f: self._failed(batch, f))

    def _committed(self, batch: _Batch) -> None:
        self.durable_seq = batch.last_seq
        for key in list(self._undurable):
            still = [p for p in self._undurable[key] if p[0] > self.durable_seq]
            if still:
                self._undurable[key] = still
            else:
                del self._undurable[key]
        self._flushing = False
        if self._pending.records:
            self._flush()
        else:
            idle, self._idle = self._idle, []
            for waiter in idle:
                waiter.callback(None)
        for d, result in batch.waiters:
            d.callback(result)
        for listener in self._listeners:
            listener(self.durable_seq)

    def _failed(self, batch: _Batch, failure: Any) -> None:
        # Undo everything not yet durable, newest first, and fail it all:
        # queued changes may have been built on the failed ones.
        queued, self._pending = self._pending, _Batch()
        for b in (queued, batch):
            for undo in reversed(b.undo):
                undo()
        self._seq = self.durable_seq
        self._undurable.clear()
        self._flushing = False
        error = failure.value if isinstance(failure.value, errors.PlexError) else errors.StorageError(
            "storage error", "could not write the report log"
        )
        if not isinstance(failure.value, errors.PlexError):
            log.failure("report log write failed", failure)
        for b in (batch, queued):
            for d, _ in b.waiters:
                d.errback(type(error)(error.message, error.details))
        idle, self._idle = self._idle, []
        for waiter in idle:
            waiter.callback(None)

    def _append(self, data: bytes) -> None:
        """In a thread: append and fdatasync; on failure cut the partial write."""
        assert self._fd is not None
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fdatasync(self._fd)
        except OSError as e:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass
            raise storage_error(e, "report log") from None

    def _snapshot_bytes(self) -> bytes:
        lines: list[dict[str, Any]] = []
        for key, entry in self._entries.items():
            lines.append({"seq": self._seqs[key], "op": "put", "entry": entry})
        for key, (version, seq) in self._tombstones.items():
            lines.append({"seq": seq, "op": "delete", "key": key, "version": version})
        lines.sort(key=lambda r: r["seq"])
        return b"".join(
            json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
            for r in lines
        )

    def _write_snapshot(self, data: bytes) -> None:
        """In a thread: replace the log by a compacted one, atomically."""
        tmp = self._path + ".compact"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self._path)
            fsync_dir(self._dir)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise storage_error(e, "report log") from None
        old, self._fd = self._fd, os.open(self._path, os.O_RDWR | os.O_APPEND)
        if old is not None:
            os.close(old)

    # -- outbox support --------------------------------------------------

    def subscribe(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(durable_seq)`` after every durable commit."""
        self._listeners.append(listener)

    def changes_since(self, seq: int, limit: int | None = None) -> Changes:
        """
        Every durable change with a sequence number above ``seq``; with
        ``limit``, only the oldest ``limit`` of them, and ``upto`` is the
        sequence number of the last one included (so the next call with
        ``seq=upto`` continues where this one stopped).
        """
        upto = self.durable_seq
        # (seq, key, entry) of live keys, (seq, key, None) of deleted ones,
        # as durable: a key whose newest change is not yet durable counts
        # with the state before that change.
        changes: list[tuple[int, str, Any]] = [
            (s, k, self._entries[k]) for k, s in self._seqs.items() if seq < s <= upto
        ]
        changes += [(s, k, None) for k, (_, s) in self._tombstones.items() if seq < s <= upto]
        for key, pending in self._undurable.items():
            entry, entry_seq, tombstone = pending[0][1]
            if entry is not None and seq < entry_seq <= upto:
                changes.append((entry_seq, key, entry))
            elif entry is None and tombstone is not None and seq < tombstone[1] <= upto:
                changes.append((tombstone[1], key, None))
        if limit is not None and len(changes) > limit:
            changes.sort(key=lambda c: c[0])
            changes = changes[:limit]
            upto = changes[-1][0]
        entries = [e for _, _, e in changes if e is not None]
        deleted = [k for _, k, e in changes if e is None]
        entries.sort(key=lambda e: e["key"])
        deleted.sort()
        return Changes(entries=entries, deleted=deleted, upto=upto)

    def idle(self) -> defer.Deferred[None]:
        """Fires when no write is in flight (for a clean stop)."""
        if not self._flushing:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle.append(d)
        return d

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
