"""
Durable file primitives: atomic replace with fsync, private directories;
strict JSON for what is stored; setting aside what cannot be loaded.

Nothing persisted may stop the agent from starting: a loader that cannot
use a file (or some records of one) hands it to ``set_aside`` (or
``set_aside_records``), which renames it aside (never deletes it) and logs
once, and goes on without it.

Blocking by nature: callers on the reactor use these only for small files, or
run them in a thread.
"""

from __future__ import annotations

import datetime
import errno
import json
import math
import os
import stat
import time
from typing import Any

from twisted.logger import Logger

from plexagent import errors
from plexagent.strictparse import INT_MAX, INT_MIN, MAX_DEPTH, MAX_VALUES, parse_json

log = Logger()


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


#: The most ``read_stored`` reads of a file unless told otherwise.
STORED_MAX_BYTES = 64 << 20


def read_stored(path: str, limit: int = STORED_MAX_BYTES, follow_symlinks: bool = False) -> bytes:
    """
    The bytes of the regular file at ``path``, at most ``limit`` of them.

    Opened without blocking and without following a symlink (unless
    ``follow_symlinks``): a FIFO, a device, a socket or a link put where a
    file of the agent's belongs raises ``ValueError`` (or ``OSError``)
    instead of hanging the caller or feeding it endless bytes, and so does a
    file larger than ``limit``. ``FileNotFoundError`` passes through.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP and not follow_symlinks:
            raise ValueError("it is a symbolic link, not a file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"it is not a regular file ({_kind_of(st.st_mode)})")
        if st.st_size > limit:
            raise ValueError(f"it holds {st.st_size} bytes, more than the {limit} it may")
        chunks, size = [], 0
        while True:
            data = os.read(fd, min(1 << 20, limit + 1 - size))
            if not data:
                break
            chunks.append(data)
            size += len(data)
            if size > limit:
                raise ValueError(f"it holds more than the {limit} bytes it may")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def ensure_private_dir(path: str) -> None:
    """Create ``path`` (and parents) with mode 0700 if missing."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: Linux's PATH_MAX: the longest path, with its terminating NUL, that a
#: system call takes.
PATH_MAX = 4096

#: errno values that say something about the path a client named, not about
#: the host: (error type, message, what to do).
_PATH_ERRNOS: dict[int, tuple[type[errors.PlexError], str, str]] = {
    errno.ENAMETOOLONG: (errors.InvalidInput, "path too long",
                         f"a name is longer than 255 bytes or the path longer than {PATH_MAX - 1}; use a shorter path"),
    errno.ELOOP: (errors.InvalidInput, "too many levels of symbolic links",
                  "the path loops through symbolic links; remove the loop"),
    errno.EINVAL: (errors.InvalidInput, "invalid path", "the file system refuses this name or operation"),
    errno.ENXIO: (errors.InvalidInput, "not a regular file", "the path names a device, socket or FIFO"),
    errno.ENODEV: (errors.InvalidInput, "not a regular file", "the path names a device"),
    errno.ENOTDIR: (errors.Conflict, "not a directory", "a component of the path is not a directory"),
    errno.EISDIR: (errors.Conflict, "path is a directory", "name a file, or delete the directory first"),
    errno.EEXIST: (errors.Conflict, "path already exists", "delete it first, or choose another path"),
    errno.ENOTEMPTY: (errors.Conflict, "directory not empty", "delete its content first"),
    errno.EBUSY: (errors.Conflict, "path is busy", "it is in use, for example as a mount point"),
    errno.ETXTBSY: (errors.Conflict, "path is busy", "it is a program being run"),
    errno.EROFS: (errors.Conflict, "read-only file system", "the path is on a file system mounted read-only"),
    errno.EPERM: (errors.Forbidden, "operation not permitted",
                  "the file system does not allow this change (an immutable or append-only file, or a special file system)"),
    errno.EACCES: (errors.Forbidden, "permission denied", "the file system does not allow this access"),
    errno.EFBIG: (errors.TooLarge, "file too large", "the file system does not allow a file this large"),
    errno.EMLINK: (errors.StorageFull, "insufficient storage", "the directory cannot hold more entries"),
}


def storage_error(e: OSError, what: str) -> errors.PlexError:
    """
    Map an OSError from the agent's own storage (its data directory) to the
    project's error, never leaking content: a full disk is 507, anything
    else 500, since nothing the client sent caused it.
    """
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return errors.StorageFull("insufficient storage", f"{what}: no space left on device")
    return errors.StorageError("storage error", f"{what}: {e.strerror}")


def path_error(e: OSError, path: str) -> errors.PlexError:
    """
    Map an OSError met while working on ``path``, a host path a client
    named: errors about the path itself (too long, not a directory, read-only,
    ...) are the client's to fix (4xx, naming the path); a full disk stays
    507 and a failing disk 500, as in ``storage_error``.
    """
    known = _PATH_ERRNOS.get(e.errno) if e.errno is not None else None
    if known is None:
        return storage_error(e, path)
    kind, message, advice = known
    return kind(message, f"{path}: {advice}")


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """
    Replace ``path`` with ``data`` atomically and durably.

    Writes a temporary file in the same directory, fsyncs it, renames it over
    ``path`` and fsyncs the directory, so a crash leaves either the old or the
    new content, never a mix. On failure the old content is untouched and the
    temporary file is removed.
    """
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(directory)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise storage_error(e, os.path.basename(path)) from None


def append_durably(path: str, data: bytes, mode: int = 0o600) -> None:
    """Append ``data`` to ``path`` (created if missing) and fsync it; ``storage_error`` on failure."""
    try:
        created = not os.path.lexists(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(os.path.dirname(path) or ".")
    except OSError as e:
        raise storage_error(e, os.path.basename(path)) from None


# -- strict JSON for what is stored -------------------------------------------


class Unencodable(ValueError):
    """A value that cannot be stored as JSON: NaN/Infinity, a lone surrogate, a non-JSON type."""

    def __init__(self, where: str, why: str) -> None:
        super().__init__(f"{where}: {why}")
        self.where = where
        self.why = why


def encode_json(value: Any, *, indent: int | None = None, sort_keys: bool = False) -> bytes:
    """
    ``value`` as UTF-8 JSON, refusing what is not JSON: NaN and infinities,
    strings holding a lone surrogate (not Unicode text, so not UTF-8), types
    JSON has no form for. Raises ``Unencodable`` naming where the bad value
    is (``payload.items[3]``), so a store can refuse it before it changes
    anything.
    """
    separators = None if indent is not None else (",", ":")
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, indent=indent,
                          separators=separators, sort_keys=sort_keys)
        return text.encode("utf-8")
    except RecursionError:
        raise Unencodable("value", "is nested too deeply") from None
    except (ValueError, TypeError, UnicodeEncodeError):
        pass
    where, why = locate_unencodable(value) or ("value", "cannot be written as JSON")
    raise Unencodable(where, why)


def locate_unencodable(value: Any, where: str = "value") -> tuple[str, str] | None:
    """(where, why) of the first part of ``value`` JSON cannot hold; None if it all can."""
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        item, at = stack.pop()
        if item is None or isinstance(item, bool):
            continue
        if isinstance(item, int):
            if not INT_MIN <= item <= INT_MAX:
                return at, "is an integer outside the signed 64-bit range"
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                return at, "is NaN or infinite, which JSON cannot hold"
        elif isinstance(item, str):
            if not _encodes(item):
                return at, "holds a lone surrogate (not valid Unicode text)"
        elif isinstance(item, dict):
            children = []
            for key, child in item.items():
                if not isinstance(key, str):
                    return at, f"has a key that is not a string ({type(key).__name__})"
                if not _encodes(key):
                    return at, "has a key holding a lone surrogate (not valid Unicode text)"
                children.append((child, f"{at}.{key}"))
            stack.extend(reversed(children))
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed([(child, f"{at}[{i}]") for i, child in enumerate(item)]))
        else:
            return at, f"is a {type(item).__name__}, which JSON cannot hold"
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: Stored documents wrap what clients sent (a report payload inside its log
#: record) in a few levels of their own.
STORED_MAX_DEPTH = MAX_DEPTH + 8
#: Stored files hold many client documents (state from the control plane,
#: cron jobs): they are read at start, not while clients wait.
STORED_MAX_VALUES = 100 * MAX_VALUES


def decode_json(data: bytes) -> Any:
    """
    Parse stored JSON as strictly as client input (the one strict parser,
    ``strictparse.parse_json``): UTF-8 only, no NaN or Infinity, no number
    that does not fit, no lone surrogate. ``ValueError`` says why.
    """
    try:
        return parse_json(data, max_bytes=len(data), max_depth=STORED_MAX_DEPTH, max_values=STORED_MAX_VALUES,
                          error="invalid JSON")
    except errors.InvalidInput as e:
        raise ValueError(e.details or e.message) from None


# -- setting aside what cannot be loaded ----------------------------------------

QUARANTINE_MARK = ".quarantined-"


def _aside_path(path: str, now: float | None) -> str:
    moment = datetime.datetime.fromtimestamp(time.time() if now is None else now, datetime.timezone.utc)
    base = f"{path}{QUARANTINE_MARK}{moment.strftime('%Y%m%dT%H%M%SZ')}"
    candidate, n = base, 1
    while os.path.lexists(candidate):
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def _loggable(text: str) -> str:
    """``text`` fit for a log line: a lone surrogate read from a bad file is escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def is_set_aside(name: str) -> bool:
    """Whether ``name`` is something ``set_aside`` made (loaders skip those)."""
    return QUARANTINE_MARK in name


def set_aside(path: str, why: str, now: float | None = None) -> str | None:
    """
    Rename ``path`` (a file or directory that cannot be loaded) aside to
    ``<path>.quarantined-<UTC time>``, so the agent starts without it: never
    deleted, logged once with its path and why. Returns the new path, or
    None (logged) when it could not be renamed.
    """
    why = _loggable(why)
    aside = _aside_path(path, now)
    try:
        os.rename(path, aside)
        fsync_dir(os.path.dirname(path) or ".")
    except FileNotFoundError:
        return None
    except OSError as e:
        log.error("cannot load {path} ({why}) nor set it aside: {error}", path=path, why=why, error=e.strerror)
        return None
    log.warn("set aside {path} as {aside}: {why}; starting without it", path=path, aside=aside, why=why)
    return aside


def set_aside_records(path: str, data: bytes, count: int, why: str, now: float | None = None) -> str | None:
    """
    Keep the ``count`` records of ``path`` that cannot be loaded (``data``,
    as they were) in ``<path>.quarantined-<UTC time>``, written durably, and
    log once; the caller then goes on with the rest. Returns the new path, or
    None (logged) when it could not be written: the caller must then keep
    the records where they are.
    """
    why = _loggable(why)
    aside = _aside_path(path, now)
    try:
        atomic_write(aside, data)
    except errors.PlexError as e:
        log.error("cannot set aside {count} unloadable records of {path} ({why}): {error}",
                  count=count, path=path, why=why, error=e.details)
        return None
    log.warn("set aside {count} unloadable records of {path} in {aside} ({why}); starting with the rest",
             count=count, path=path, aside=aside, why=why)
    return aside
