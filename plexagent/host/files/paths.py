"""
The path policy: which host paths the Node Agent API may touch, and the
symlink-safe primitives every route uses to touch them.

A path is allowed only if, after normalising ``.``/``..`` and resolving every
symlink, it lies inside one of the allowed roots (sibling prefixes such as
``/app-evil`` do not count for ``/app/``).

Checking a resolved path is not enough on its own: between the check and the
write, someone with write access below a root could swap a directory for a
symlink pointing elsewhere. So nothing here opens a checked path by name.
Every operation walks the *resolved* path one component at a time from
``/`` with ``O_NOFOLLOW`` (the roots themselves included: a root swapped for
a symlink after startup is not followed either): the resolved path contains
no symlink, so meeting one during the walk means the tree changed under us,
and the operation is refused as ``path not allowed``. Once the parent
directory is open, the final step (create, rename, unlink) is made relative
to that descriptor, so later swaps cannot redirect it either.

Paths are bounded by ``PATH_MAX``, given and resolved, so everything the
routes create can be named again; removing a tree still copes with any depth
(``remove_tree``), since other programs on the host are not so bounded.

Everything here blocks on the file system: callers on the reactor run it in a
thread.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from typing import Iterable, Iterator

import attrs

from plexagent import errors
from plexagent.fileio import PATH_MAX, path_error, write_all

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Longest file name most Linux file systems accept.
_NAME_MAX = 255


@attrs.frozen
class EntryInfo:
    """What ``stat`` found at an allowed path."""

    path: str
    kind: str  # "file", "directory", "symlink", "other"
    size: int
    modified: float
    mode: int


def _realpath(path: str) -> str:
    try:
        return os.path.realpath(path)
    except OSError:
        # A symlink vanished while being read: the tree is changing under us.
        raise errors.Conflict("path changed while it was being checked", path) from None


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


class PathPolicy:
    """Checks paths against ``agent_api.allowed_paths`` and touches them safely."""

    def __init__(self, roots: "tuple[str, ...] | list[str]") -> None:
        self.roots = tuple(os.path.realpath(r.rstrip("/") or "/") for r in roots)

    # -- checking ---------------------------------------------------------

    def contains(self, real: str) -> bool:
        return self.root_of(real) is not None

    def root_of(self, real: str) -> str | None:
        """The longest allowed root that ``real`` lies in (or is), or None."""
        best = None
        for root in self.roots:
            if real == root or real.startswith(root.rstrip("/") + "/"):
                if best is None or len(root) > len(best):
                    best = root
        return best

    def is_root(self, real: str) -> bool:
        return real in self.roots

    @staticmethod
    def _validate(path: object, field: str) -> str:
        if not isinstance(path, str) or not path:
            raise errors.InvalidInput(f"{field} is required", f"{field} must be a non-empty string")
        if "\x00" in path:
            raise errors.InvalidInput(f"invalid {field}", f"{field} must not contain NUL")
        try:
            size = len(os.fsencode(path))
        except UnicodeEncodeError:
            raise errors.InvalidInput(f"invalid {field}", f"{field} must be valid UTF-8") from None
        if size >= PATH_MAX:
            raise errors.InvalidInput("path too long", f"{field} is {size} bytes; the limit is {PATH_MAX - 1}")
        if not os.path.isabs(path):
            raise errors.Forbidden("path not allowed", path)
        return path

    @staticmethod
    def _bounded(real: str, text: str) -> str:
        if len(os.fsencode(real)) >= PATH_MAX:
            raise errors.InvalidInput("path too long", f"{text} resolves to a path longer than {PATH_MAX - 1} bytes")
        return real

    def resolve(self, path: object, field: str = "path") -> str:
        """The resolved absolute path, or ``Forbidden("path not allowed")``."""
        text = self._validate(path, field)
        real = _realpath(text)
        if not self.contains(real):
            raise errors.Forbidden("path not allowed", text)
        return self._bounded(real, text)

    def resolve_entry(self, path: object, field: str = "path") -> str:
        """
        Like ``resolve``, but the last component is not followed: for
        operations on the entry itself (delete a symlink, not its target).
        """
        text = self._validate(path, field)
        stripped = text.rstrip("/") or "/"
        parent, name = os.path.split(stripped)
        if name in ("", ".", ".."):
            real = _realpath(stripped)
        else:
            real = os.path.join(_realpath(parent or "/"), name)
        if not self.contains(real):
            raise errors.Forbidden("path not allowed", text)
        return self._bounded(real, text)

    # -- walking ----------------------------------------------------------

    def _components(self, real: str) -> tuple[str, list[str]]:
        root = self.root_of(real)
        if root is None:  # pragma: no cover - callers resolve first
            raise errors.Forbidden("path not allowed", real)
        rest = real[len(root):].strip("/")
        return root, [c for c in rest.split("/") if c]

    def open_directory(self, real: str, create: bool = False, mode: int = 0o755, shown: str | None = None) -> int:
        """
        A descriptor of the directory at resolved path ``real``, walked from
        ``/`` through its root without following any symlink; missing
        directories are created when ``create`` is true (a missing root with
        mode 0755, below it with ``mode``). The caller closes it.

        This is the one place the roots are opened: their resolved paths
        were fixed at startup, so a root (or a parent of one) that is a
        symlink now was swapped since, and is refused like any other.
        """
        shown = real if shown is None else shown
        root, parts = self._components(real)
        steps = [(name, 0o755) for name in root.split("/") if name] + [(name, mode) for name in parts]
        try:
            fd = os.open("/", _DIR_FLAGS)
        except OSError as e:  # pragma: no cover - "/" is always there
            raise path_error(e, shown) from None
        try:
            for name, step_mode in steps:
                child = self._step(fd, name, create, step_mode, shown)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _step(self, fd: int, name: str, create: bool, mode: int, shown: str) -> int:
        """Open ``name`` below ``fd`` as a directory."""
        try:
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise errors.NotFound("path not found", shown) from None
                try:
                    os.mkdir(name, mode, dir_fd=fd)
                except FileExistsError:
                    pass
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                if self._is_symlink(fd, name):
                    # The resolved path had no symlink here: the tree changed
                    # after the check. Refuse rather than follow it.
                    raise errors.Forbidden("path not allowed", shown) from None
            raise path_error(e, shown) from None
        return child

    @staticmethod
    def _is_symlink(dir_fd: int, name: str) -> bool:
        try:
            return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except OSError:
            return False

    def open_parent(self, real: str, create: bool = False, mode: int = 0o755, shown: str | None = None) -> tuple[int, str]:
        """(descriptor of the parent directory of ``real``, final name)."""
        if self.is_root(real):
            raise errors.Forbidden("path not allowed", shown or real)
        parent, name = os.path.split(real)
        return self.open_directory(parent, create, mode, shown or real), name

    # -- operations -------------------------------------------------------

    def write_file(self, path: object, chunks: "bytes | Iterable[bytes]", mode: int = 0o644,
                   field: str = "path", create_parents: bool = True) -> tuple[str, int]:
        """
        Atomically replace the file at ``path`` with ``chunks``.

        A temporary file in the same directory is written, fsynced, given
        ``mode``, then renamed over the target and the directory fsynced: a
        reader or a crash sees the old content or the new, never a mix.
        Returns (resolved path, bytes written).
        """
        real = self.resolve(path, field)
        shown = str(path)
        if shown.endswith("/") or self.is_root(real):
            raise errors.InvalidInput(f"{field} must name a file", f"{shown} names a directory")
        dfd, name = self.open_parent(real, create=create_parents, shown=shown)
        try:
            return real, atomic_write_at(dfd, name, chunks, mode, shown)
        finally:
            os.close(dfd)

    def read_file(self, path: object, limit: int, field: str = "path") -> tuple[str, bytes]:
        """(resolved path, content) of a regular file; ``TooLarge`` past ``limit`` bytes."""
        real = self.resolve(path, field)
        shown = str(path)
        if self.is_root(real):
            raise errors.InvalidInput("path is a directory", shown)
        dfd, name = self.open_parent(real, shown=shown)
        try:
            fd = _open_regular_file(dfd, name, shown)
        finally:
            os.close(dfd)
        try:
            size = os.fstat(fd).st_size
            if size > limit:
                raise errors.TooLarge("file too large to read", f"{shown} is {size} bytes; the limit is {limit} bytes")
            parts = []
            remaining = limit + 1
            while remaining > 0:
                piece = os.read(fd, min(remaining, 1 << 20))
                if not piece:
                    break
                parts.append(piece)
                remaining -= len(piece)
            data = b"".join(parts)
        except OSError as e:
            raise path_error(e, shown) from None
        finally:
            os.close(fd)
        if len(data) > limit:
            raise errors.TooLarge("file too large to read", f"{shown} is larger than the limit of {limit} bytes")
        return real, data

    def stat(self, path: object, field: str = "path") -> EntryInfo | None:
        """What is at ``path`` (following symlinks that stay allowed), or None."""
        real = self.resolve(path, field)
        shown = str(path)
        if self.is_root(real):
            try:
                fd = self.open_directory(real, shown=shown)
            except errors.NotFound:
                return None
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            return EntryInfo(real, _kind(st.st_mode), st.st_size, st.st_mtime, stat.S_IMODE(st.st_mode))
        try:
            dfd, name = self.open_parent(real, shown=shown)
        except errors.NotFound:
            return None
        except errors.Conflict:
            return None
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise path_error(e, shown) from None
        finally:
            os.close(dfd)
        if stat.S_ISLNK(st.st_mode):
            # resolve() followed every symlink: one here was swapped in since
            # (or loops), and what it points to was never checked.
            raise errors.Forbidden("path not allowed", shown)
        return EntryInfo(real, _kind(st.st_mode), st.st_size, st.st_mtime, stat.S_IMODE(st.st_mode))

    def make_directory(self, path: object, mode: int = 0o755, field: str = "path") -> tuple[str, bool]:
        """Create the directory at ``path`` and its parents; (resolved path, created)."""
        real = self.resolve(path, field)
        shown = str(path)
        existed = self.stat(path, field)
        if existed is not None and existed.kind != "directory":
            raise errors.Conflict("path exists and is not a directory", shown)
        fd = self.open_directory(real, create=True, mode=mode, shown=shown)
        try:
            if existed is None:
                # mkdir's mode is filtered by the umask; say exactly what was asked.
                os.fchmod(fd, mode)
        except OSError as e:
            raise path_error(e, shown) from None
        finally:
            os.close(fd)
        return real, existed is None

    def delete(self, path: object, recursive: bool = False, field: str = "path") -> tuple[str, str]:
        """
        Remove the entry at ``path`` (a symlink itself, never its target);
        a non-empty directory only when ``recursive``. (resolved path, kind).
        """
        real = self.resolve_entry(path, field)
        shown = str(path)
        if self.is_root(real):
            raise errors.Forbidden("path not allowed", shown)
        dfd, name = self.open_parent(real, shown=shown)
        try:
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                raise errors.NotFound("path not found", shown) from None
            kind = _kind(st.st_mode)
            if kind == "directory":
                try:
                    os.rmdir(name, dir_fd=dfd)
                except OSError as e:
                    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                    if not recursive:
                        raise errors.Conflict(
                            "directory not empty", f"{shown}: send \"recursive\": true to delete it with its content"
                        ) from None
                    remove_tree(dfd, name, shown)
            else:
                os.unlink(name, dir_fd=dfd)
            os.fsync(dfd)
        except OSError as e:
            raise path_error(e, shown) from None
        finally:
            os.close(dfd)
        return real, kind


def remove_tree(parent_fd: int, name: str, shown: str) -> None:
    """
    Remove the directory ``name`` below ``parent_fd`` with everything in it,
    however deep: an explicit stack instead of recursion, one directory
    descriptor open at a time (the walk climbs back through ``..`` and checks
    it reached the directory it left), and no path strings, so neither
    Python's recursion limit, the descriptor limit nor ``PATH_MAX`` bounds
    the depth. Symlinks inside are removed, never followed.

    Raises ``OSError`` as met, or ``Conflict`` if a directory is moved away
    while being emptied.
    """
    fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    try:
        st = os.fstat(fd)
        # One level per open directory: (its name, its identity, the
        # subdirectories of it still to remove).
        levels = [(name, (st.st_dev, st.st_ino), _remove_entries(fd))]
        while True:
            pending = levels[-1][2]
            if pending:
                child = pending.pop()
                try:
                    child_fd = os.open(child, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    _unlink_entry(fd, child)  # no longer a directory
                    continue
                os.close(fd)
                fd = child_fd
                st = os.fstat(fd)
                levels.append((child, (st.st_dev, st.st_ino), _remove_entries(fd)))
                continue
            emptied = levels.pop()[0]
            if not levels:
                break
            parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != levels[-1][1]:
                raise errors.Conflict("directory changed while deleting", f"{shown}: a directory in it was moved; retry")
            os.rmdir(emptied, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent_fd)


def _remove_entries(dir_fd: int) -> list[str]:
    """Unlink every non-directory in ``dir_fd``; the names of its subdirectories."""
    subdirectories = []
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                subdirectories.append(entry.name)
            elif not _unlink_entry(dir_fd, entry.name):
                subdirectories.append(entry.name)
    return subdirectories


def _unlink_entry(dir_fd: int, name: str) -> bool:
    """Unlink ``name``; False if it turned out to be a directory."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        return False
    return True


def _open_regular_file(dfd: int, name: str, shown: str) -> int:
    """Open ``name`` below ``dfd`` for reading, only if it is a regular file."""
    try:
        before = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        raise errors.NotFound("path not found", shown) from None
    except OSError as e:
        raise path_error(e, shown) from None
    if stat.S_ISLNK(before.st_mode):
        # resolve() followed every symlink: one here was swapped in since.
        raise errors.Forbidden("path not allowed", shown)
    if stat.S_ISDIR(before.st_mode):
        raise errors.InvalidInput("path is a directory", shown)
    if not stat.S_ISREG(before.st_mode):
        # Never open devices or FIFOs: opening alone may block or act.
        raise errors.InvalidInput("not a regular file", shown)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise errors.Forbidden("path not allowed", shown) from None
        raise path_error(e, shown) from None
    after = os.fstat(fd)
    if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino) or not stat.S_ISREG(after.st_mode):
        os.close(fd)
        raise errors.Conflict("file changed while opening it", shown)
    return fd


def _iter_chunks(chunks: "bytes | Iterable[bytes]") -> Iterator[bytes]:
    if isinstance(chunks, (bytes, bytearray, memoryview)):
        yield bytes(chunks)
    else:
        yield from chunks


def temporary_name(name: str) -> str:
    """A hidden sibling name for ``name``, unique, within NAME_MAX."""
    suffix = f".{secrets.token_hex(8)}.tmp"
    return "." + name[: _NAME_MAX - len(suffix) - 1] + suffix


def atomic_write_at(dfd: int, name: str, chunks: "bytes | Iterable[bytes]", mode: int, shown: str) -> int:
    """
    Write ``chunks`` to ``name`` below directory ``dfd`` atomically (temp
    file, fsync, chmod, rename, fsync of the directory). Returns the size.
    """
    tmp = temporary_name(name)
    written = 0
    try:
        try:
            existing = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            raise errors.Conflict("path is a directory", shown)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            for chunk in _iter_chunks(chunks):
                write_all(fd, chunk)
                written += len(chunk)
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        # rename replaces a symlink at ``name`` itself, never its target.
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.fsync(dfd)
    except BaseException as e:
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
        if isinstance(e, OSError):
            if e.errno == errno.EISDIR:
                raise errors.Conflict("path is a directory", shown) from None
            raise path_error(e, shown) from None
        raise
    return written
