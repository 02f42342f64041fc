"""
Resumable chunked uploads, persisted under ``node.data_dir/uploads``.

Each upload is a directory named by its ``chunk_id`` holding ``meta.json``
(total chunk count, extract path once known) and one file per chunk
(``chunk-000042``). A chunk is written to a temporary file and renamed into
place only once it is complete and checked, so a crash or a dropped
connection never leaves a half chunk counted as held; re-sending a chunk
replaces it by one rename (idempotent); chunks arrive in any order. Uploads
survive a restart because everything is on disk; those untouched for longer
than ``max_age`` are removed by ``collect_garbage``. An upload whose
``meta.json`` cannot be loaded (checked at every garbage collection, the
first at start, and whenever it is read) is set aside whole as
``<chunk_id>.quarantined-<UTC time>``: never removed, never addressable.

Blocking file work: ``ChunkWriter.write`` handles one network read at a time
(like twisted.web's own body spooling); the rest runs in threads.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import threading
import time
from typing import Any, Callable

import attrs
from twisted.application import service
from twisted.internet import task, threads
from twisted.logger import Logger

from plexagent import errors
from plexagent.fileio import (
    atomic_write,
    decode_json,
    encode_json,
    ensure_private_dir,
    fsync_dir,
    is_set_aside,
    read_stored,
    set_aside,
    storage_error,
    write_all,
)
from plexagent.strictparse import parse_int

log = Logger()

CHUNK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: Most chunks one upload may have.
MAX_CHUNKS = 100000
_META = "meta.json"


def chunk_name(index: int) -> str:
    return f"chunk-{index:06d}"


@attrs.frozen
class UploadStatus:
    chunk_id: str
    total_chunks: int
    received: tuple[int, ...]
    bytes: int
    extract_path: str | None

    @property
    def complete(self) -> bool:
        return len(self.received) == self.total_chunks

    @property
    def missing(self) -> list[int]:
        held = set(self.received)
        return [i for i in range(self.total_chunks) if i not in held]

    def to_json(self) -> dict[str, Any]:
        missing = self.missing
        return {
            "chunk_id": self.chunk_id,
            "total_chunks": self.total_chunks,
            "received": list(self.received),
            "received_count": len(self.received),
            "missing": missing[:1000],
            "missing_count": len(missing),
            "bytes": self.bytes,
            "complete": self.complete,
        }


def validate_chunk_params(chunk_id: object, index: object, total: object) -> tuple[str, int, int]:
    """(chunk_id, chunk_index, total_chunks) checked, or ``InvalidInput``."""
    if not isinstance(chunk_id, str) or not CHUNK_ID.fullmatch(chunk_id):
        raise errors.InvalidInput(
            "invalid chunk_id", "chunk_id must be 1-128 letters, digits, '.', '_' or '-', not starting with '.', '_' or '-'"
        )
    try:
        total_n = parse_int(total)
    except (TypeError, ValueError):
        raise errors.InvalidInput("invalid total_chunks", "total_chunks must be an integer") from None
    if not 1 <= total_n <= MAX_CHUNKS:
        raise errors.InvalidInput("invalid total_chunks", f"total_chunks must be between 1 and {MAX_CHUNKS}")
    try:
        index_n = parse_int(index)
    except (TypeError, ValueError):
        raise errors.InvalidInput("invalid chunk_index", "chunk_index must be an integer") from None
    if not 0 <= index_n < total_n:
        raise errors.InvalidInput("invalid chunk_index", f"chunk_index must be between 0 and {total_n - 1}")
    return chunk_id, index_n, total_n


class ChunkWriter:
    """One incoming chunk, spooled to a temporary file in its upload directory."""

    def __init__(self, store: "ChunkStore", chunk_id: str, index: int, total: int, limit: int) -> None:
        self.store = store
        self.chunk_id = chunk_id
        self.index = index
        self.total = total
        self.limit = limit
        self.received = 0
        self.exceeded = False
        self.error: errors.PlexError | None = None
        self.directory = store.upload_dir(chunk_id)
        ensure_private_dir(self.directory)
        self.temp = os.path.join(self.directory, f".incoming-{index}-{secrets.token_hex(6)}")
        self._fd: int | None = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)

    def write(self, data: bytes) -> None:
        self.received += len(data)
        if self.exceeded or self._fd is None:
            return
        if self.received > self.limit:
            self.exceeded = True
            self.discard()
            return
        try:
            write_all(self._fd, data)
        except OSError as e:
            self.discard()
            self.error = storage_error(e, "upload chunk")

    def commit(self) -> None:
        """Make the chunk held (fsync + rename): blocking, run in a thread."""
        if self._fd is None:
            raise self.error or errors.StorageError("storage error", "the chunk was not stored")
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
            os.close(fd)
            os.replace(self.temp, os.path.join(self.directory, chunk_name(self.index)))
            fsync_dir(self.directory)
        except OSError as e:
            self._unlink()
            raise storage_error(e, "upload chunk") from None

    def discard(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        self._unlink()

    def _unlink(self) -> None:
        try:
            os.unlink(self.temp)
        except OSError:
            pass


class ConcatenatedReader:
    """``read(n)`` across the chunk files of an upload, in index order."""

    def __init__(self, paths: list[str]) -> None:
        self._paths = list(paths)
        self._file: Any = None

    def read(self, n: int = -1) -> bytes:
        while True:
            if self._file is None:
                if not self._paths:
                    return b""
                self._file = open(self._paths.pop(0), "rb")
            data = self._file.read(n if n and n > 0 else 1 << 20)
            if data:
                return data
            self._file.close()
            self._file = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class ChunkStore:
    """The chunked uploads held on disk."""

    def __init__(self, directory: str, max_total_bytes: int, max_age: float, clock: Callable[[], float] = time.time,
                 max_uploads: int = 16) -> None:
        self.directory = directory
        #: bytes all chunked uploads together may hold
        self.max_total_bytes = max_total_bytes
        #: uploads held at once
        self.max_uploads = max_uploads
        self.max_age = max_age
        self.clock = clock
        # chunk id -> {chunk index: size}: what each upload holds, read from
        # its directory once and kept current, so that a chunk costs the same
        # whether it is the first or the 100,000th (no listing per chunk).
        self._held: dict[str, dict[int, int]] | None = None
        self._held_guard = threading.Lock()
        #: chunk ids being assembled right now (touched on the reactor only)
        self.assembling: set[str] = set()
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def upload_dir(self, chunk_id: str) -> str:
        if is_set_aside(chunk_id):
            raise errors.InvalidInput("invalid chunk_id", f"{chunk_id} names an upload set aside; use another chunk_id")
        return os.path.join(self.directory, chunk_id)

    # -- blocking operations (threads) -------------------------------------

    def status(self, chunk_id: str) -> UploadStatus | None:
        directory = self.upload_dir(chunk_id)
        meta = self._read_meta(directory)
        if meta is None:
            return None
        held = self._held_by(chunk_id)
        if held is None:
            return None
        received = [index for index in held if 0 <= index < meta["total_chunks"]]
        size = sum(held[index] for index in received)
        return UploadStatus(chunk_id, meta["total_chunks"], tuple(sorted(received)), size, meta.get("extract_path"))

    def _all_held(self) -> dict[str, dict[int, int]]:
        """Every upload's chunks and sizes (read from disk on first use)."""
        with self._held_guard:
            if self._held is None:
                held: dict[str, dict[int, int]] = {}
                try:
                    names = os.listdir(self.directory)
                except FileNotFoundError:
                    names = []
                for name in names:
                    if not is_set_aside(name) and os.path.isdir(os.path.join(self.directory, name)):
                        held[name] = _scan(os.path.join(self.directory, name))
                self._held = held
            return self._held

    def _held_by(self, chunk_id: str) -> dict[int, int] | None:
        held = self._all_held()
        with self._held_guard:
            if chunk_id not in held:
                directory = os.path.join(self.directory, chunk_id)
                if not os.path.isdir(directory):
                    return None
                held[chunk_id] = _scan(directory)
            return dict(held[chunk_id])

    def _forget(self, chunk_id: str) -> None:
        with self._held_guard:
            if self._held is not None:
                self._held.pop(chunk_id, None)

    def held_bytes(self, chunk_id: str) -> int:
        status = self.status(chunk_id)
        return 0 if status is None else status.bytes

    def _read_meta(self, directory: str) -> dict[str, Any] | None:
        """The upload's metadata; None when it has none or it was set aside for being unloadable."""
        try:
            meta = decode_json(read_stored(os.path.join(directory, _META), 65536))
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
            total = meta.get("total_chunks")
            if not isinstance(total, int) or isinstance(total, bool) or not 1 <= total <= MAX_CHUNKS:
                raise ValueError(f"total_chunks must be an integer between 1 and {MAX_CHUNKS}")
            extract_path = meta.get("extract_path")
            if extract_path is not None and (not isinstance(extract_path, str) or not extract_path):
                raise ValueError("extract_path must be a path")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError) as e:
            set_aside(directory, f"unreadable upload metadata {_META} ({e}): the upload must be sent again")
            self._forget(os.path.basename(directory))
            return None
        return meta
    def accept(self, writer: ChunkWriter, extract_path: str | None) -> UploadStatus:
        """Check the chunk against the upload, commit it, and return the status."""
        with self._lock_for(writer.chunk_id):
            return self._accept(writer, extract_path)

    def _lock_for(self, chunk_id: str) -> threading.Lock:
        # Chunks of one upload arrive in parallel: their meta.json updates
        # (and the total_chunks check) must not interleave.
        with self._locks_guard:
            return self._locks.setdefault(chunk_id, threading.Lock())

    def _accept(self, writer: ChunkWriter, extract_path: str | None) -> UploadStatus:
        directory = writer.directory
        try:
            meta = self._read_meta(directory)
            if meta is None and not os.path.isdir(directory):
                raise errors.Conflict(
                    "upload set aside",
                    f"the stored state of upload {writer.chunk_id} could not be read and was set aside; "
                    "send every chunk again",
                )
            if meta is None:
                meta = {"total_chunks": writer.total, "created": self.clock()}
            elif meta["total_chunks"] != writer.total:
                raise errors.Conflict(
                    "total_chunks does not match the upload",
                    f"upload {writer.chunk_id} has {meta['total_chunks']} chunks; start a new chunk_id to change it",
                )
            everything = self._all_held()
            with self._held_guard:
                mine = everything.get(writer.chunk_id, {})
                if writer.chunk_id not in everything and len(everything) >= self.max_uploads:
                    raise errors.Conflict(
                        "too many chunked uploads",
                        f"{len(everything)} uploads are held, the most agent_api.max_chunked_uploads allows: "
                        "finish or abandon one first (unfinished uploads are removed after agent_api.chunk_max_age)",
                    )
                held = sum(mine.values()) - mine.get(writer.index, 0)
                held_by_all = sum(sum(sizes.values()) for sizes in everything.values()) - mine.get(writer.index, 0)
            if held + writer.received > self.max_total_bytes:
                raise errors.TooLarge("upload too large", f"the chunks exceed the limit of {self.max_total_bytes} bytes")
            if held_by_all + writer.received > self.max_total_bytes:
                raise errors.TooLarge(
                    "chunked uploads too large",
                    f"the chunked uploads held would take more than {self.max_total_bytes} bytes "
                    "(agent_api.max_upload_bytes, for all of them together): finish or abandon one first",
                )
            if extract_path is not None:
                meta["extract_path"] = extract_path
            meta["updated"] = self.clock()
            atomic_write(os.path.join(directory, _META), encode_json(meta))
            writer.commit()
            with self._held_guard:
                everything.setdefault(writer.chunk_id, {})[writer.index] = writer.received
        except BaseException:
            writer.discard()
            raise
        status = self.status(writer.chunk_id)
        assert status is not None
        return status

    def reader(self, chunk_id: str, total: int) -> ConcatenatedReader:
        directory = self.upload_dir(chunk_id)
        return ConcatenatedReader([os.path.join(directory, chunk_name(i)) for i in range(total)])

    def remove(self, chunk_id: str) -> None:
        shutil.rmtree(self.upload_dir(chunk_id), ignore_errors=True)
        self._forget(chunk_id)
        with self._locks_guard:
            self._locks.pop(chunk_id, None)

    def collect_garbage(self) -> list[str]:
        """
        Remove uploads untouched for longer than ``max_age``; their ids.
        Uploads whose metadata cannot be loaded are set aside, and what was
        set aside is left alone.
        """
        removed: list[str] = []
        now = self.clock()
        if os.path.lexists(self.directory) and not os.path.isdir(self.directory):
            set_aside(self.directory, "not a directory")
            return removed
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return removed
        for name in names:
            if name in self.assembling or is_set_aside(name):
                continue
            path = os.path.join(self.directory, name)
            with self._lock_for(name):
                if os.path.isdir(path) and self._read_meta(path) is None and not os.path.isdir(path):
                    continue  # set aside just now
            try:
                newest = max(
                    [os.stat(path).st_mtime] + [os.stat(os.path.join(path, n)).st_mtime for n in os.listdir(path)]
                )
            except OSError:
                continue
            if now - newest > self.max_age:
                shutil.rmtree(path, ignore_errors=True)
                self._forget(name)
                with self._locks_guard:
                    self._locks.pop(name, None)
                removed.append(name)
        return removed


def _scan(directory: str) -> dict[int, int]:
    """{chunk index: size} of the chunks held in an upload's directory."""
    held: dict[int, int] = {}
    try:
        names = os.listdir(directory)
    except OSError:
        return held
    for name in names:
        if name.startswith("chunk-") and name[6:].isdigit() and name[6:].isascii():
            try:
                held[int(name[6:])] = os.stat(os.path.join(directory, name)).st_size
            except OSError:
                continue
    return held


class ChunkGarbageCollector(service.Service):
    """Runs ``ChunkStore.collect_garbage`` periodically, in a thread."""

    def __init__(self, store: ChunkStore, reactor: Any, interval: float | None = None,
                 recover: Callable[[], Any] | None = None) -> None:
        self.setName("upload-chunk-gc")
        self.store = store
        self.reactor = reactor
        self.interval = interval if interval is not None else max(1.0, min(store.max_age / 4, 3600.0))
        #: run once, on the first pass: removes what a killed agent left behind
        self.recover = recover
        self._loop: task.LoopingCall | None = None

    def _pass(self) -> list[str]:
        if self.recover is not None:
            recover, self.recover = self.recover, None
            try:
                recover()
            except Exception:
                log.failure("removing stale extraction staging directories failed")
        return self.store.collect_garbage()

    def _collect(self) -> Any:
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self._pass)

        def report(removed: list[str]) -> None:
            if removed:
                log.info("removed {count} abandoned chunked uploads", count=len(removed))

        d.addCallback(report)
        d.addErrback(lambda f: log.failure("chunk garbage collection failed", f))
        return d

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self._collect)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=True)

    def stopService(self) -> Any:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return None
