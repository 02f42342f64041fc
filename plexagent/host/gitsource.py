"""
Local sources of ``git clone`` (``file://`` URLs): what git would read of a
repository on this host, checked by the path policy and copied into a
private snapshot that git then clones from.

git follows more than the path it is given: a ``.git`` file
(``gitdir: ...``), a ``commondir`` file (linked worktrees), the
``objects/info/alternates`` of every object store it reads (recursively),
symlinks anywhere inside the repository, and its own discovery (``path/.git``,
``path``, ``path.git``). Any of them can lead outside
``agent_api.allowed_paths``, and any could be swapped between a check and
git's read. So git never reads a local source in place:

- the URL's path is decoded once, here, as git decodes it (git keeps ``?``
  and ``#`` as part of a ``file://`` path, which urllib would drop);
- the git directory is found as git finds it; every pointer (gitdir,
  commondir, alternates) is read, and its target resolved and checked by the
  policy; every directory is opened through ``PathPolicy.open_directory``,
  which follows no symlink, so a swap after the check is refused;
- inside a repository nothing is followed: a symlink there is refused;
- exactly what ``git upload-pack`` needs (HEAD, refs, packed-refs, shallow,
  loose objects and packs, those of alternates included) is hard-linked or
  copied through those descriptors into a private bare repository with a
  minimal config of our own, which git clones.

Blocking: run ``snapshot`` in a thread.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import time
from urllib.parse import unquote

from plexagent import errors
from plexagent.fileio import path_error, write_all
from plexagent.host import processes
from plexagent.host.files.paths import PathPolicy

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LOOSE_DIRECTORY = re.compile(r"[0-9a-f]{2}")
_LOOSE_OBJECT = re.compile(r"[0-9a-f]{38}|[0-9a-f]{62}")
_PACK_FILE = re.compile(r"pack-(?:[0-9a-f]{40}|[0-9a-f]{64})\.(?:pack|idx)")
#: Largest pointer file (HEAD, .git, commondir, alternates, config) read.
_SMALL_FILE = 1 << 20
#: git itself follows alternates this deep, and ignores deeper ones.
_ALTERNATES_DEPTH = 5
_REFS_DEPTH = 64


def local_path(url: str) -> str | None:
    """
    The path a ``file://`` URL names, percent-decoded as git decodes it, or
    None for any other URL. ``?`` and ``#`` are part of the path, as for git;
    the host must be empty or ``localhost`` (git would silently ignore it).
    """
    scheme, colon, rest = url.partition(":")
    if not colon or scheme.lower() != "file":
        return None
    if not rest.startswith("//"):
        raise errors.InvalidInput("invalid url", "a file URL must look like file:///path/to/repository")
    host, _, path = rest[2:].partition("/")
    if host.lower() not in ("", "localhost"):
        raise errors.InvalidInput("invalid url", "a file URL must name a path on this host: file:///path/to/repository")
    try:
        return unquote("/" + path, errors="strict")
    except UnicodeDecodeError:
        raise errors.InvalidInput("invalid url", "the path of a file URL must be UTF-8") from None


def _inside_link(shown: str) -> errors.PlexError:
    return errors.Forbidden(
        "path not allowed", f"{shown} is a symbolic link: links inside a repository are not followed"
    )


def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _open_subdirectory(dir_fd: int, name: str, shown: str) -> int | None:
    """``name`` below ``dir_fd`` as a directory; None if absent; a symlink refused."""
    st = _lstat(dir_fd, name)
    if st is None:
        return None
    if stat.S_ISLNK(st.st_mode):
        raise _inside_link(shown)
    if not stat.S_ISDIR(st.st_mode):
        raise errors.InvalidInput("not a git repository", f"{shown} is not a directory")
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _inside_link(shown) from None
        raise path_error(e, shown) from None


def _open_file(dir_fd: int, name: str, shown: str) -> int | None:
    """``name`` below ``dir_fd`` opened for reading if a regular file; None if absent."""
    st = _lstat(dir_fd, name)
    if st is None:
        return None
    if stat.S_ISLNK(st.st_mode):
        raise _inside_link(shown)
    if not stat.S_ISREG(st.st_mode):
        raise errors.InvalidInput("not a git repository", f"{shown} is not a regular file")
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _inside_link(shown) from None
        raise path_error(e, shown) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise errors.Conflict("repository changed while it was read", shown)
    return fd


def _read_small(dir_fd: int, name: str, shown: str) -> bytes | None:
    fd = _open_file(dir_fd, name, shown)
    if fd is None:
        return None
    try:
        data = os.read(fd, _SMALL_FILE + 1)
    except OSError as e:
        raise path_error(e, shown) from None
    finally:
        os.close(fd)
    if len(data) > _SMALL_FILE:
        raise errors.InvalidInput("not a git repository", f"{shown} is larger than any git pointer file")
    return data


def _pointer(data: bytes, shown: str) -> str:
    try:
        text = data.decode("utf-8").rstrip("\r\n\t ")
    except UnicodeDecodeError:
        raise errors.InvalidInput("not a git repository", f"{shown} is not UTF-8") from None
    if not text or "\n" in text or "\x00" in text:
        raise errors.InvalidInput("not a git repository", f"{shown} does not hold one path")
    return text


def _checked(policy: PathPolicy, base: str, target: str, shown: str) -> str:
    """``target`` (relative to ``base``) resolved; Forbidden outside the roots."""
    try:
        return policy.resolve(os.path.join(base, target), "url")
    except errors.Forbidden:
        raise errors.Forbidden("path not allowed", f"{shown} points to {target}, outside the allowed paths") from None


class _Repository:
    """A git directory and its common directory (the same unless a linked worktree)."""

    def __init__(self, git_dir: str, common_dir: str) -> None:
        self.git_dir = git_dir
        self.common_dir = common_dir


def _as_repository(policy: PathPolicy, git_dir: str) -> _Repository | None:
    """What git's is_git_directory() accepts at ``git_dir``, checked; else None."""
    fd = policy.open_directory(git_dir, shown=git_dir)
    try:
        if _open_file_exists(fd, "HEAD", f"{git_dir}/HEAD") is False:
            return None
        commondir = _read_small(fd, "commondir", f"{git_dir}/commondir")
    finally:
        os.close(fd)
    common = git_dir
    if commondir is not None:
        shown = f"{git_dir}/commondir"
        common = _checked(policy, git_dir, _pointer(commondir, shown), shown)
    try:
        cfd = policy.open_directory(common, shown=common)
    except errors.NotFound:
        return None
    try:
        for name in ("objects", "refs"):
            sub = _open_subdirectory(cfd, name, f"{common}/{name}")
            if sub is None:
                return None
            os.close(sub)
    finally:
        os.close(cfd)
    return _Repository(git_dir, common)


def _open_file_exists(dir_fd: int, name: str, shown: str) -> bool:
    fd = _open_file(dir_fd, name, shown)
    if fd is None:
        return False
    os.close(fd)
    return True


def find_repository(policy: PathPolicy, path: str) -> _Repository:
    """
    The repository git would read for ``path`` (``path/.git``, ``path``,
    ``path.git``, as ``git upload-pack`` tries them), a ``.git`` file
    followed; each step checked by ``policy``.
    """
    text = path.rstrip("/") or "/"
    for candidate in (text + "/.git", text, text + ".git"):
        info = policy.stat(candidate, "url")
        if info is None:
            continue
        if info.kind == "file":
            _, data = policy.read_file(info.path, _SMALL_FILE, "url")
            if not data.startswith(b"gitdir: "):
                raise errors.InvalidInput(
                    "not a git repository",
                    f"{candidate} is a file, neither a git directory nor a .git file naming one (bundles are not cloned)",
                )
            git_dir = _checked(policy, os.path.dirname(info.path), _pointer(data[8:], candidate), candidate)
            found = _as_repository(policy, git_dir)
            if found is None:
                raise errors.InvalidInput("not a git repository", f"{candidate} names {git_dir}, not a git directory")
            return found
        if info.kind == "directory":
            found = _as_repository(policy, info.path)
            if found is not None:
                return found
    raise errors.NotFound("repository not found", f"{path} is not a git repository")


class _Copier:
    """Copies regular files between directory descriptors: a hard link when it can."""

    def __init__(self, deadline: float, timeout: float) -> None:
        self.deadline = deadline
        self.timeout = timeout
        self.can_link = True

    def file(self, src_dir: int, name: str, dst_dir: int, shown: str) -> None:
        if time.monotonic() > self.deadline:
            raise processes.ProcessTimedOut(
                "git clone timed out", f"reading the local repository took longer than {self.timeout:g} seconds"
            )
        st = _lstat(src_dir, name)
        if st is None:
            return  # gone meanwhile (git repacked): git will say if it mattered
        if stat.S_ISLNK(st.st_mode):
            raise _inside_link(shown)
        if not stat.S_ISREG(st.st_mode):
            raise errors.InvalidInput("not a git repository", f"{shown} is not a regular file")
        if _lstat(dst_dir, name) is not None:
            return  # the same object from another store
        if self.can_link:
            try:
                # No AT_SYMLINK_FOLLOW: a symlink swapped in is linked as
                # itself, and refused below, never followed.
                os.link(name, name, src_dir_fd=src_dir, dst_dir_fd=dst_dir, follow_symlinks=False)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES):
                    raise path_error(e, shown) from None
                self.can_link = e.errno != errno.EXDEV
            else:
                linked = os.stat(name, dir_fd=dst_dir, follow_symlinks=False)
                if not stat.S_ISREG(linked.st_mode):
                    os.unlink(name, dir_fd=dst_dir)
                    raise _inside_link(shown)
                return
        src = _open_file(src_dir, name, shown)
        if src is None:
            return
        try:
            dst = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                          dir_fd=dst_dir)
            try:
                while os.sendfile(dst, src, None, 1 << 24):
                    pass
            finally:
                os.close(dst)
        except OSError as e:
            raise path_error(e, shown) from None
        finally:
            os.close(src)


def _copy_refs(src: int, dst: int, shown: str, copier: _Copier) -> None:
    """The tree of loose refs below ``src`` into ``dst``, iteratively."""
    stack = [(os.dup(src), os.dup(dst), shown, 0)]
    try:
        while stack:
            src_fd, dst_fd, where, depth = stack.pop()
            try:
                with os.scandir(src_fd) as entries:
                    names = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
                for name, is_dir in names:
                    if not is_dir:
                        copier.file(src_fd, name, dst_fd, f"{where}/{name}")
                        continue
                    if depth >= _REFS_DEPTH:
                        raise errors.InvalidInput("not a git repository", f"{where}: refs nested too deeply")
                    child = _open_subdirectory(src_fd, name, f"{where}/{name}")
                    if child is None:
                        continue
                    try:
                        os.mkdir(name, 0o700, dir_fd=dst_fd)
                        dst_child = os.open(name, _DIR_FLAGS, dir_fd=dst_fd)
                    except BaseException:
                        os.close(child)
                        raise
                    stack.append((child, dst_child, f"{where}/{name}", depth + 1))
            finally:
                os.close(src_fd)
                os.close(dst_fd)
    finally:
        for src_fd, dst_fd, _, _ in stack:
            os.close(src_fd)
            os.close(dst_fd)


def _copy_store(store: int, where: str, dst_objects: int, copier: _Copier) -> None:
    """One object store's loose objects and packs into ``dst_objects``."""
    with os.scandir(store) as entries:
        names = [e.name for e in entries]
    for name in names:
        if name == "pack":
            dst = os.open("pack", _DIR_FLAGS, dir_fd=dst_objects)
            wanted = _PACK_FILE
        elif _LOOSE_DIRECTORY.fullmatch(name):
            try:
                os.mkdir(name, 0o700, dir_fd=dst_objects)
            except FileExistsError:
                pass
            dst = os.open(name, _DIR_FLAGS, dir_fd=dst_objects)
            wanted = _LOOSE_OBJECT
        else:
            continue
        try:
            src = _open_subdirectory(store, name, f"{where}/{name}")
            if src is None:
                continue
            try:
                with os.scandir(src) as entries:
                    files = [e.name for e in entries if wanted.fullmatch(e.name)]
                for file in files:
                    copier.file(src, file, dst, f"{where}/{name}/{file}")
            finally:
                os.close(src)
        finally:
            os.close(dst)


def _alternates(policy: PathPolicy, store: int, where: str) -> list[str]:
    """The checked object stores named by ``info/alternates`` of ``store``."""
    info = _open_subdirectory(store, "info", f"{where}/info")
    if info is None:
        return []
    try:
        data = _read_small(info, "alternates", f"{where}/info/alternates")
    finally:
        os.close(info)
    if data is None:
        return []
    shown = f"{where}/info/alternates"
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise errors.InvalidInput("not a git repository", f"{shown} is not UTF-8") from None
    stores = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith('"'):
            raise errors.InvalidInput("not a git repository", f"{shown}: quoted paths are not supported")
        stores.append(_checked(policy, where, line, shown))
    return stores


def _object_format(config: bytes) -> str:
    """``extensions.objectformat`` of a repository's config (sha1 when unset)."""
    section = ""
    for raw in config.decode("utf-8", "replace").splitlines():
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        header = re.fullmatch(r"\[\s*([A-Za-z0-9.-]+)(?:\s+\"[^\"]*\")?\s*\](.*)", line)
        if header:
            section, line = header.group(1).lower(), header.group(2).strip()
        key = re.fullmatch(r"([A-Za-z][A-Za-z0-9-]*)\s*=\s*(\S+)", line)
        if key and section == "extensions" and key.group(1).lower() == "objectformat":
            return key.group(2).lower()
    return "sha1"


def _write(dir_fd: int, name: str, data: bytes) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


def snapshot(policy: PathPolicy, path: str, destination: str, timeout: float) -> None:
    """
    Copy what git needs to clone the local repository at ``path`` into a
    new private bare repository ``destination``; see the module docstring.
    Refuses (``Forbidden``) anything that leads outside the allowed paths.
    """
    copier = _Copier(time.monotonic() + timeout, timeout)
    repo = find_repository(policy, path)
    os.mkdir(destination, 0o700)
    dst = os.open(destination, _DIR_FLAGS)
    try:
        for name in ("objects", "objects/pack", "refs"):
            os.mkdir(name, 0o700, dir_fd=dst)
        fd = policy.open_directory(repo.git_dir, shown=path)
        try:
            head = _read_small(fd, "HEAD", f"{repo.git_dir}/HEAD")
        finally:
            os.close(fd)
        if head is None:
            raise errors.Conflict("repository changed while it was read", f"{repo.git_dir}/HEAD")
        _write(dst, "HEAD", head)
        common = policy.open_directory(repo.common_dir, shown=path)
        try:
            config = _read_small(common, "config", f"{repo.common_dir}/config") or b""
            # Our own config, not the source's: it could include other files
            # or set options for upload-pack.
            object_format = _object_format(config)
            if object_format == "sha1":
                _write(dst, "config", b"[core]\n\trepositoryformatversion = 0\n\tbare = true\n")
            else:
                _write(dst, "config", b"[core]\n\trepositoryformatversion = 1\n\tbare = true\n"
                       b"[extensions]\n\tobjectformat = " + object_format.encode() + b"\n")
            for name in ("packed-refs", "shallow"):
                copier.file(common, name, dst, f"{repo.common_dir}/{name}")
            refs = _open_subdirectory(common, "refs", f"{repo.common_dir}/refs")
            if refs is None:
                raise errors.Conflict("repository changed while it was read", f"{repo.common_dir}/refs")
            try:
                dst_refs = os.open("refs", _DIR_FLAGS, dir_fd=dst)
                try:
                    _copy_refs(refs, dst_refs, f"{repo.common_dir}/refs", copier)
                finally:
                    os.close(dst_refs)
            finally:
                os.close(refs)
            objects = _open_subdirectory(common, "objects", f"{repo.common_dir}/objects")
        finally:
            os.close(common)
        if objects is None:
            raise errors.Conflict("repository changed while it was read", f"{repo.common_dir}/objects")
        dst_objects = os.open("objects", _DIR_FLAGS, dir_fd=dst)
        try:
            _copy_stores(policy, objects, f"{repo.common_dir}/objects", dst_objects, copier)
        finally:
            os.close(dst_objects)
    finally:
        os.close(dst)


def _copy_stores(policy: PathPolicy, objects: int, where: str, dst_objects: int, copier: _Copier) -> None:
    """The object store ``objects`` and its alternates, recursively, into ``dst_objects``."""
    seen: set[tuple[int, int]] = set()
    queue = [(objects, where, 0)]
    try:
        while queue:
            fd, store, depth = queue.pop(0)
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                _copy_store(fd, store, dst_objects, copier)
                if depth < _ALTERNATES_DEPTH:
                    for alternate in _alternates(policy, fd, store):
                        queue.append((policy.open_directory(alternate, shown=alternate), alternate, depth + 1))
            finally:
                os.close(fd)
    finally:
        for fd, _, _ in queue:
            os.close(fd)
