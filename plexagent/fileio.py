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
