"""
The report store: entries written by local programs, with optimistic
locking, made durable before they are acknowledged.

Durability is an append-only log (``<data_dir>/reports/reports.log``, one
JSON record a line) written by group commit: a change is checked (key,
version, quota) and encoded before anything changes, queued, and applied to
what readers see (``get``, ``list``, the outbox) only once the batch that
carries it has been written and fdatasync'ed. Version and quota checks run
against the newest state, pending or durable (the reactor being
single-threaded, they are exact for concurrent writers); a failed batch
fails every change not yet durable and leaves the durable state as it was.
Changes arriving while a batch is being synced ride in the next one, so
concurrent writers share fsyncs.

Each record carries a sequence number; the control-plane outbox is simply
"every change with a sequence number above the last one synced", so the log
doubles as the durable outbox and the PUT path pays for one write only.

Loading trusts nothing: a record that is not exactly what ``put`` or
``delete`` would have written (a bad key, a lone surrogate, NaN, a wrong
type) is set aside (``fileio.set_aside_records``) and the rest is loaded.

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
from plexagent.fileio import (
    Unencodable,
    atomic_write,
    encode_json,
    ensure_private_dir,
    fsync_dir,
    read_stored,
    set_aside,
    set_aside_records,
    storage_error,
    write_all,
)

log = Logger()

MAX_KEY_LENGTH = 512
#: Defaults of node_api.max_report_entries and node_api.max_report_bytes.
DEFAULT_MAX_ENTRIES = 10000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
#: The most the report log may hold when it is read back (it is compacted long before).
LOG_MAX_BYTES = 16 << 30


def validate_key(key: object) -> str:
    """Refuse keys that are empty, too long or contain control characters."""
    if not isinstance(key, str) or not key:
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


@attrs.frozen
class _Change:
    """One put (``entry`` set) or delete (``entry`` None), encoded as its log record."""

    seq: int
    key: str
    entry: dict[str, Any] | None
    #: the entry's version, or for a delete the version deleted
    version: int
    #: the log record, newline included
    line: bytes


@attrs.define
class _Batch:
    changes: list[_Change] = attrs.field(factory=list)
    waiters: list[tuple[defer.Deferred[Any], Any]] = attrs.field(factory=list)

    @property
    def last_seq(self) -> int:
        return self.changes[-1].seq


def _encode_record(record: dict[str, Any]) -> bytes:
    """A log record as one line; ``InvalidInput`` naming the field that cannot be stored."""
    try:
        return encode_json(record) + b"\n"
    except Unencodable as e:
        where = e.where.removeprefix("value.entry.").removeprefix("value.")
        if where.startswith("payload"):
            raise errors.InvalidInput(
                "payload must be valid JSON",
                f"{where} {e.why}; JSON has no NaN or Infinity and strings must be Unicode text",
            ) from None
        raise errors.InvalidInput(f"invalid {where.split('.')[0]}", f"{where} {e.why}") from None


def _parse_record(line: bytes) -> _Change:
    """One log line, checked as strictly as client input; ``ValueError`` says what is wrong."""
    record = json.loads(line.decode("utf-8"))
    if not isinstance(record, dict):
        raise ValueError("the record is not a JSON object")
    seq = record.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise ValueError("seq must be a positive integer")
    op = record.get("op")
    try:
        if op == "put":
            raw = record.get("entry")
            if not isinstance(raw, dict):
                raise ValueError("entry must be an object")
            key = validate_key(raw.get("key"))
            content_type = raw.get("content_type")
            if not isinstance(content_type, str) or not content_type:
                raise ValueError("entry.content_type must be a non-empty string")
            if "payload" not in raw:
                raise ValueError("entry.payload is missing")
            version = raw.get("version")
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise ValueError("entry.version must be a positive integer")
            updated_at = raw.get("updated_at")
            if not isinstance(updated_at, str):
                raise ValueError("entry.updated_at must be a string")
            entry = {"key": key, "content_type": content_type, "payload": raw["payload"],
                     "version": version, "updated_at": updated_at}
            clean = _encode_record({"seq": seq, "op": "put", "entry": entry})
            return _Change(seq, key, entry, version, clean)
        if op == "floor":
            version = record.get("version")
            if not isinstance(version, int) or isinstance(version, bool) or version < 0:
                raise ValueError("version must be a non-negative integer")
            return _Change(seq, "", None, version, _encode_record({"seq": seq, "op": "floor", "version": version}))
        if op == "delete":
            key = validate_key(record.get("key"))
            version = record.get("version")
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise ValueError("version must be a positive integer")
            clean = _encode_record({"seq": seq, "op": "delete", "key": key, "version": version})
            return _Change(seq, key, None, version, clean)
    except errors.PlexError as e:
        raise ValueError(f"{e.message}: {e.details}" if e.details else e.message) from None
    raise ValueError(f"unknown op {str(op)[:40]!r}")


class ReportStore:
    """Report entries with optimistic locking and a quota, durable before acknowledged."""

    # Rewrite the log as a snapshot once it holds this many records more
    # than there are live keys.
    COMPACT_SLACK = 4096

    def __init__(
        self,
        data_dir: str,
        clock: IReactorTime,
        run_in_thread: Callable[..., defer.Deferred[Any]] = threads.deferToThread,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self._dir = os.path.join(data_dir, "reports")
        self._path = os.path.join(self._dir, "reports.log")
        self._clock = clock
        self._run_in_thread = run_in_thread
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        # The durable state: what readers and the outbox see.
        self._entries: dict[str, dict[str, Any]] = {}
        self._seqs: dict[str, int] = {}
        #: size of each live entry's log record, and their sum
        self._sizes: dict[str, int] = {}
        self._bytes = 0
        # Deleted keys: last version and sequence number, so versions stay
        # monotonic across delete and re-create and deletes can be synced.
        self._tombstones: dict[str, tuple[int, int]] = {}
        # Past max_entries tombstones, the oldest whose delete the control
        # plane has (``synced``) are forgotten and their versions folded
        # into this floor: a key with no entry and no tombstone starts above
        # it, so no (key, version) is ever used for two values.
        self._floor = 0
        self._floor_seq = 0
        #: the sequence number the control plane has every change up to; None: no control plane
        self._synced: int | None = None
        # The newest change of each key not yet durable, and the entry
        # count and bytes with every pending change applied: what version
        # and quota checks compare against.
        self._latest: dict[str, _Change] = {}
        self._latest_count = 0
        self._latest_bytes = 0
        self._seq = 0
        self.durable_seq = 0
        self._records_in_file = 0
        self._fd: int | None = None
        self._pending = _Batch()
        self._flushing = False
        self._listeners: list[Callable[[int], None]] = []
        self._idle: list[defer.Deferred[None]] = []

    # -- loading ---------------------------------------------------------

    def load(self) -> None:
        """
        Replay the log (at start). A torn last line (a write the crash cut
        short, never acknowledged) is cut off; records that cannot be loaded
        are set aside and the log rewritten without them.
        """
        if os.path.lexists(self._dir) and not os.path.isdir(self._dir):
            set_aside(self._dir, "not a directory")
        ensure_private_dir(self._dir)
        try:
            data = read_stored(self._path, LOG_MAX_BYTES)
        except FileNotFoundError:
            data = b""
        except ValueError as e:
            if set_aside(self._path, str(e)) is None:
                raise OSError(f"{self._path}: {e}, and it cannot be set aside") from None
            data = b""
        lines = data.split(b"\n")
        torn = lines.pop()  # b"" when the log ends with a newline
        good: list[bytes] = []
        bad: list[bytes] = []
        reasons: list[str] = []
        for number, line in enumerate(lines, 1):
            try:
                change = _parse_record(line)
            except (ValueError, RecursionError) as e:
                bad.append(line + b"\n")
                reasons.append(f"record {number}: {e}")
                continue
            self._replay(change)
            good.append(line + b"\n")
        in_file = len(lines)
        if bad:
            why = reasons[0] + (f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else "")
            if set_aside_records(self._path, b"".join(bad), len(bad), why) is not None:
                # Kept aside durably first: a crash here loads them again.
                try:
                    atomic_write(self._path, b"".join(good))
                    torn = b""
                    in_file = len(good)
                except errors.PlexError as e:
                    log.error("cannot rewrite the report log without the records set aside: {why}",
                              why=e.details)
        if torn:
            log.warn("cutting a torn record off the end of the report log")
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        if torn:
            os.ftruncate(self._fd, len(data) - len(torn))
            os.fsync(self._fd)
        self._records_in_file = in_file
        self.durable_seq = self._seq
        self._latest_count, self._latest_bytes = len(self._entries), self._bytes
        if len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            log.warn(
                "the report store holds {count} entries ({size} bytes), more than its quota "
                "(node_api.max_report_entries {max_entries}, node_api.max_report_bytes {max_bytes}): "
                "new entries are refused until some are deleted",
                count=len(self._entries), size=self._bytes, max_entries=self.max_entries, max_bytes=self.max_bytes,
            )

    def _replay(self, change: _Change) -> None:
        self._apply(change)
        self._seq = max(self._seq, change.seq)

    def _apply(self, change: _Change) -> None:
        """Make ``change`` part of the durable state."""
        key = change.key
        if not key:  # a floor record (written by compaction)
            self._floor = max(self._floor, change.version)
            self._floor_seq = max(self._floor_seq, change.seq)
            return
        self._bytes -= self._sizes.pop(key, 0)
        if change.entry is not None:
            self._entries[key] = change.entry
            self._seqs[key] = change.seq
            self._sizes[key] = len(change.line)
            self._bytes += len(change.line)
            self._tombstones.pop(key, None)
        else:
            self._entries.pop(key, None)
            self._seqs.pop(key, None)
            self._tombstones[key] = (change.version, change.seq)

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

    @property
    def total_bytes(self) -> int:
        """Size of the durable entries as stored."""
        return self._bytes

    # -- writing ---------------------------------------------------------

    def _newest(self, key: str) -> tuple[dict[str, Any] | None, int, int]:
        """(entry or None, last version, stored size) of ``key``, pending changes included."""
        change = self._latest.get(key)
        if change is not None:
            if change.entry is not None:
                return change.entry, change.version, len(change.line)
            return None, change.version, 0
        entry = self._entries.get(key)
        if entry is not None:
            return entry, entry["version"], self._sizes[key]
        tombstone = self._tombstones.get(key)
        return None, (tombstone[0] if tombstone else self._floor), 0

    def put(
        self, key: str, content_type: str, payload: Any, if_match: int | None
    ) -> defer.Deferred[dict[str, Any]]:
        """
        Create or replace ``key``; fires with the stored entry once durable.

        ``if_match`` (when given) must equal the current version, 0 for a key
        that does not exist; otherwise ``Conflict("version conflict")``. A
        payload JSON cannot hold (NaN, a lone surrogate) is ``InvalidInput``;
        an entry past the quota ``TooLarge("report quota exceeded")``. On any
        of these nothing changes.
        """
        validate_key(key)
        if not isinstance(content_type, str) or not content_type:
            raise errors.InvalidInput("content_type is required")
        current, last_version, old_size = self._newest(key)
        current_version = current["version"] if current is not None else 0
        if if_match is not None and if_match != current_version:
            raise errors.Conflict("version conflict")
        entry = {
            "key": key,
            "content_type": content_type,
            "payload": payload,
            "version": last_version + 1,
            "updated_at": rfc3339(self._clock.seconds()),
        }
        seq = self._seq + 1
        line = _encode_record({"seq": seq, "op": "put", "entry": entry})
        count = self._latest_count + (0 if current is not None else 1)
        size = self._latest_bytes - old_size + len(line)
        self._check_quota(count, size)
        self._seq = seq
        self._latest_count, self._latest_bytes = count, size
        return self._enqueue(_Change(seq, key, entry, entry["version"], line), entry)

    def _check_quota(self, count: int, size: int) -> None:
        # Only growth is refused: with a quota lowered below what is held,
        # entries can still be replaced by smaller ones and deleted.
        if count > self.max_entries and count > self._latest_count:
            raise errors.TooLarge(
                "report quota exceeded",
                f"the node holds {self._latest_count} report entries, the most node_api.max_report_entries "
                f"({self.max_entries}) allows: delete entries no longer needed, or raise the limit",
            )
        if size > self.max_bytes and size > self._latest_bytes:
            raise errors.TooLarge(
                "report quota exceeded",
                f"the report entries would take {size} bytes, more than node_api.max_report_bytes "
                f"({self.max_bytes}) allows: delete or shrink entries no longer needed, or raise the limit",
            )

    def delete(self, key: str, if_match: int | None = None) -> defer.Deferred[None]:
        """Delete ``key``; fires once durable. ``NotFound`` when absent."""
        validate_key(key)
        current, _, old_size = self._newest(key)
        if current is None:
            raise errors.NotFound("not found")
        if if_match is not None and if_match != current["version"]:
            raise errors.Conflict("version conflict")
        seq = self._seq + 1
        version = current["version"]
        line = _encode_record({"seq": seq, "op": "delete", "key": key, "version": version})
        self._seq = seq
        self._latest_count -= 1
        self._latest_bytes -= old_size
        return self._enqueue(_Change(seq, key, None, version, line), None)

    def _enqueue(self, change: _Change, result: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self._latest[change.key] = change
        batch = self._pending
        batch.changes.append(change)
        batch.waiters.append((d, result))
        if not self._flushing:
            self._flush()
        return d

    def _flush(self) -> None:
        batch, self._pending = self._pending, _Batch()
        self._flushing = True
        if self._records_in_file + len(batch.changes) > len(self._entries) + len(self._tombstones) + self.COMPACT_SLACK:
            snapshot = self._snapshot_bytes(batch)
            d = self._run_in_thread(self._write_snapshot, snapshot)
            count = snapshot.count(b"\n")
            d.addCallback(lambda _: setattr(self, "_records_in_file", count))
        else:
            d = self._run_in_thread(self._append, b"".join(c.line for c in batch.changes))
            d.addCallback(lambda _: setattr(self, "_records_in_file", self._records_in_file + len(batch.changes)))
        d.addCallbacks(lambda _: self._committed(batch), lambda f: self._failed(batch, f))

    def _committed(self, batch: _Batch) -> None:
        for change in batch.changes:
            self._apply(change)
            if self._latest.get(change.key) is change:
                del self._latest[change.key]
        self.durable_seq = batch.last_seq
        self._forget_tombstones()
        self._flushing = False
        if self._pending.changes:
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
        # Fail everything not yet durable: queued changes may have been
        # checked against the failed ones. The durable state never changed.
        queued, self._pending = self._pending, _Batch()
        self._latest.clear()
        self._latest_count, self._latest_bytes = len(self._entries), self._bytes
        self._seq = self.durable_seq
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
            write_all(self._fd, data)
            os.fdatasync(self._fd)
        except OSError as e:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass
            raise storage_error(e, "report log") from None

    def _snapshot_bytes(self, batch: _Batch) -> bytes:
        """The durable state with ``batch`` applied, one record per key, oldest first."""
        lines: dict[str, tuple[int, bytes]] = {}
        for key, entry in self._entries.items():
            seq = self._seqs[key]
            lines[key] = (seq, _encode_record({"seq": seq, "op": "put", "entry": entry}))
        for key, (version, seq) in self._tombstones.items():
            lines[key] = (seq, _encode_record({"seq": seq, "op": "delete", "key": key, "version": version}))
        for change in batch.changes:
            lines[change.key] = (change.seq, change.line)
        if self._floor:
            lines[""] = (self._floor_seq, _encode_record({"seq": self._floor_seq, "op": "floor", "version": self._floor}))
        return b"".join(line for _, line in sorted(lines.values(), key=lambda item: item[0]))

    def _write_snapshot(self, data: bytes) -> None:
        """In a thread: replace the log by a compacted one, atomically."""
        tmp = self._path + ".compact"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                write_all(fd, data)
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

    def synced(self, seq: int) -> None:
        """
        The control plane has every change up to ``seq``. The outbox says so
        as it is built (0) and after each delivery; until the first call the
        store has no control plane and forgets any durable tombstone.
        """
        self._synced = seq if self._synced is None else max(self._synced, seq)
        self._forget_tombstones()

    def _forget_tombstones(self) -> None:
        """
        Past ``max_entries`` tombstones, forget the oldest half whose delete
        the control plane already has, raising the version floor over them:
        deleting keys cannot grow memory, the log or a sync without bound.
        """
        if len(self._tombstones) <= self.max_entries:
            return
        known = self.durable_seq if self._synced is None else min(self._synced, self.durable_seq)
        pending = {change.key for change in self._latest.values()}
        oldest = sorted((seq, key) for key, (_, seq) in self._tombstones.items() if seq <= known and key not in pending)
        for seq, key in oldest[: len(self._tombstones) - self.max_entries // 2]:
            version, _ = self._tombstones.pop(key)
            self._floor = max(self._floor, version)
            self._floor_seq = max(self._floor_seq, seq)

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
        # (seq, key, entry) of live keys, (seq, key, None) of deleted ones:
        # the durable state only, so nothing is sent that may yet fail.
        changes: list[tuple[int, str, Any]] = [
            (s, k, self._entries[k]) for k, s in self._seqs.items() if seq < s <= upto
        ]
        changes += [(s, k, None) for k, (_, s) in self._tombstones.items() if seq < s <= upto]
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
