"""
Durable file primitives: atomic replace with fsync, private directories.

Blocking by nature: callers on the reactor use these only for small files, or
run them in a thread.
"""

from __future__ import annotations

import errno
import os

from plexagent import errors


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


def storage_error(e: OSError, what: str) -> errors.PlexError:
    """Map an OSError to the project's error, never leaking content."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return errors.StorageFull("insufficient storage", f"{what}: no space left on device")
    return errors.StorageError("storage error", f"{what}: {e.strerror}")


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
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
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
