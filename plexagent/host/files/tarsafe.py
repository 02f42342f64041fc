"""
Hostile-archive-safe, streaming extraction of ``.tar``, ``.tar.gz`` and
``.tgz`` archives.

The archive is read once, front to back, from any object with ``read(n)``
(a request body as it arrives, chunk files, a base64-decoded buffer), so
memory stays bounded whatever the archive's size. Members are written into a
private staging directory through directory descriptors, never by path name:

- absolute names and names with ``..`` are skipped and reported, and so
  are names deeper than 128 levels or that would make a path longer than
  ``PATH_MAX`` below ``extract_path`` (everything extracted can be named,
  and so removed, through the file routes);
- a member whose path passes through a symlink (one extracted earlier, or a
  directory swapped for one) is skipped, as every directory is opened with
  ``O_NOFOLLOW``;
- a symlink is kept only if its target is relative and cannot leave the
  extraction root: after dropping ``.``, it is some ``..`` steps (no more
  than the link's depth) followed by plain names, so by induction every kept
  symlink resolves inside the tree;
- a hardlink is kept only if it names a regular file extracted earlier;
- device nodes, FIFOs and other special members are skipped;
- setuid, setgid and sticky bits are stripped (and reported);
- the total of member sizes is bounded by ``max_bytes`` and the number of
  members by ``max_members``; so is the compressed input and the archive's
  own metadata. Past a bound extraction stops with ``TooLarge`` and the
  staging directory is removed.

Only when the whole archive has been read is the staging directory moved
into place: renamed to ``extract_path`` when that did not exist, else merged
into it entry by entry (each entry replaced by one rename).

Blocking: run ``extract`` in a thread.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
import tarfile
import zlib
from typing import Any, Callable

import attrs

from plexagent import errors
from plexagent.fileio import (
    PATH_MAX,
    path_error,
    write_all,
)
from plexagent.host.files.paths import PathPolicy
from plexagent.host.files.staging import STAGING_PREFIX, StagingJournal

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_COPY_BUFFER = 1 << 20
#: At most this many skipped members are listed one by one.
MAX_REPORTED = 1000
#: Metadata (headers, long names, pax records) allowed per member, on top
#: of a fixed allowance: a huge pax header is a memory bomb of its own.
_METADATA_PER_MEMBER = 4096
_METADATA_ALLOWANCE = 16 << 20


@attrs.frozen
class Limits:
    """Bounds on one extraction."""

    max_bytes: int
    max_members: int


@attrs.define
class ExtractionResult:
    """What an extraction did, for the response."""

    path: str = ""
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    bytes: int = 0
    members: int = 0
    skipped: list[dict[str, str]] = attrs.field(factory=list)
    skipped_count: int = 0
    stripped: list[str] = attrs.field(factory=list)

    def skip(self, name: str, reason: str) -> None:
        self.skipped_count += 1
        if len(self.skipped) < MAX_REPORTED:
            self.skipped.append({"name": name, "reason": reason})

    def to_json(self) -> dict[str, Any]:
        return {
            "success": True,
            "path": self.path,
            "extract_path": self.path,
            "files": self.files,
            "directories": self.directories,
            "symlinks": self.symlinks,
            "bytes": self.bytes,
            "members": self.members,
            "skipped": self.skipped,
            "skipped_count": self.skipped_count,
            "stripped": self.stripped[:MAX_REPORTED],
        }


class _Skip(Exception):
    """This member is not extracted, for the reason given."""


class InputReader:
    """
    Reads the (possibly gzip-compressed) archive from ``raw``, counting and
    bounding what it reads: compressed input up to ``max_input`` bytes, and
    decompressed bytes through ``on_decompressed`` (which may raise).
    """

    def __init__(self, raw: Any, max_input: int, on_decompressed: Callable[[int], None]) -> None:
        self._raw = raw
        self._max_input = max_input
        self._on_decompressed = on_decompressed
        self.input_bytes = 0
        self._pending = b""
        self._pending_input = b""
        self._decompressor: Any = None
        self._gzip: bool | None = None
        self._eof = False

    def _read_raw(self, n: int) -> bytes:
        data = self._raw.read(n)
        self.input_bytes += len(data)
        if self.input_bytes > self._max_input:
            raise errors.TooLarge("upload too large", f"the archive exceeds the limit of {self._max_input} bytes")
        return data

    def _fill(self) -> bytes:
        """The next decompressed piece (at most a buffer's worth), or b"" at the end."""
        if self._gzip is None:
            head = self._read_raw(_COPY_BUFFER)
            self._gzip = head[:2] == b"\x1f\x8b"
            if not self._gzip:
                self._eof = not head
                return head
            self._decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
            self._pending_input = head
        if not self._gzip:
            if self._eof:
                return b""
            data = self._read_raw(_COPY_BUFFER)
            self._eof = not data
            return data
        while not self._eof:
            if self._decompressor is None:
                # Between gzip members: another member, or trailing bytes
                # that gzip -d ignores too.
                while len(self._pending_input) < 2:
                    more = self._read_raw(_COPY_BUFFER)
                    if not more:
                        break
                    self._pending_input += more
                if self._pending_input[:2] != b"\x1f\x8b":
                    self._eof = True
                    return b""
                self._decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
            if not self._pending_input:
                self._pending_input = self._read_raw(_COPY_BUFFER)
                if not self._pending_input:
                    raise errors.InvalidInput("invalid archive", "the gzip stream is truncated")
            try:
                # Bounded output per call: a gzip bomb never inflates in one go.
                out = self._decompressor.decompress(self._pending_input, _COPY_BUFFER)
            except zlib.error:
                raise errors.InvalidInput("invalid archive", "the gzip stream is corrupt") from None
            if self._decompressor.eof:
                self._pending_input = self._decompressor.unused_data
                self._decompressor = None
            else:
                self._pending_input = self._decompressor.unconsumed_tail
            if out:
                return out
        return b""

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = 1 << 62
        while len(self._pending) < n:
            piece = self._fill()
            if not piece:
                break
            self._on_decompressed(len(piece))
            self._pending = self._pending + piece if self._pending else piece
        out, self._pending = self._pending[:n], self._pending[n:]
        return out


def _member_parts(name: str) -> list[str]:
    """The path components of an archive name, or ``_Skip``."""
    if name.startswith("/"):
        raise _Skip("absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _Skip("path contains '..'")
    for p in parts:
        if len(p.encode("utf-8", "surrogateescape")) > 255:
            raise _Skip("name too long")
    if len(parts) > 128:
        raise _Skip("path too deep")
    return parts


def symlink_target_stays_inside(link_parts: list[str], target: str) -> bool:
    """
    Whether a symlink at ``link_parts`` with ``target`` cannot leave the
    extraction root: relative, and some ``..`` steps (at most the link's
    depth) followed only by plain names.
    """
    if not target or target.startswith("/") or "\x00" in target:
        return False
    parts = [p for p in target.split("/") if p not in ("", ".")]
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    if ".." in parts[ups:]:
        return False
    return ups <= len(link_parts) - 1


class _Extractor:
    def __init__(self, staging_fd: int, limits: Limits, result: ExtractionResult, room: int) -> None:
        self.staging_fd = staging_fd
        self.limits = limits
        self.result = result
        #: bytes a member's name may take below the extraction directory
        self.room = room
        #: sizes the headers of regular members announced, extracted or not
        self.declared = 0

    def _open_parent(self, parts: list[str], create: bool) -> int:
        fd = os.dup(self.staging_fd)
        try:
            for name in parts[:-1]:
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise _Skip("link target not in the archive") from None
                    os.mkdir(name, 0o755, dir_fd=fd)
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        if _lstat(fd, name) is not None and stat.S_ISLNK(_lstat(fd, name).st_mode):  # type: ignore[union-attr]
                            raise _Skip("path passes through a symlink") from None
                        raise _Skip("a parent is not a directory") from None
                    raise
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def member(self, tar: tarfile.TarFile, info: tarfile.TarInfo) -> None:
        self.result.members += 1
        if self.result.members > self.limits.max_members:
            raise errors.TooLarge(
                "too many archive members", f"the limit is {self.limits.max_members} members per archive"
            )
        if info.isreg():
            # Skipped members' data is read (and inflated) too: bound it alike.
            self.declared += info.size
            if self.declared > self.limits.max_bytes:
                raise errors.TooLarge(
                    "archive too large", f"its content exceeds the limit of {self.limits.max_bytes} bytes"
                )
        try:
            parts = _member_parts(info.name)
            if not parts:
                return  # the archive's own root ("./")
            if len("/".join(parts).encode("utf-8", "surrogateescape")) > self.room:
                raise _Skip("path too long")
            if info.ischr() or info.isblk():
                raise _Skip("device node")
            if info.isfifo():
                raise _Skip("fifo")
            if not (info.isreg() or info.isdir() or info.issym() or info.islnk()):
                raise _Skip("unsupported member type")
            if info.mode & 0o7000:
                if len(self.result.stripped) < MAX_REPORTED:
                    self.result.stripped.append(info.name)
            parent = self._open_parent(parts, create=True)
            try:
                self._extract(tar, info, parts, parent)
            finally:
                os.close(parent)
        except _Skip as s:
            self.result.skip(info.name, str(s))

    def _extract(self, tar: tarfile.TarFile, info: tarfile.TarInfo, parts: list[str], parent: int) -> None:
        name = parts[-1]
        existing = _lstat(parent, name)
        if info.isdir():
            if existing is None:
                os.mkdir(name, 0o700, dir_fd=parent)
                self.result.directories += 1
            elif not stat.S_ISDIR(existing.st_mode):
                raise _Skip("conflicts with an earlier member")
            # Owner keeps rwx so later members can be written into it.
            chmod_directory_at(parent, name, (info.mode & 0o777) | 0o700)
            return
        if existing is not None:
            if not stat.S_ISREG(existing.st_mode) or not (info.isreg() or info.islnk()):
                raise _Skip("conflicts with an earlier member")
            os.unlink(name, dir_fd=parent)  # a later copy of a file wins, as with tar
        if info.issym():
            if not symlink_target_stays_inside(parts, info.linkname):
                raise _Skip("symlink points outside the extraction directory")
            os.symlink(info.linkname, name, dir_fd=parent)
            self.result.symlinks += 1
        elif info.islnk():
            self._hardlink(info, name, parent)
        else:
            self._file(tar, info, name, parent)

    def _hardlink(self, info: tarfile.TarInfo, name: str, parent: int) -> None:
        try:
            target_parts = _member_parts(info.linkname)
        except _Skip:
            raise _Skip("hardlink points outside the extraction directory") from None
        if not target_parts:
            raise _Skip("hardlink points outside the extraction directory")
        target_dir = self._open_parent(target_parts, create=False)
        try:
            st = _lstat(target_dir, target_parts[-1])
            if st is None or not stat.S_ISREG(st.st_mode):
                raise _Skip("hardlink target is not a file extracted earlier")
            os.link(target_parts[-1], name, src_dir_fd=target_dir, dst_dir_fd=parent, follow_symlinks=False)
            self.result.files += 1
        finally:
            os.close(target_dir)

    def _file(self, tar: tarfile.TarFile, info: tarfile.TarInfo, name: str, parent: int) -> None:
        if self.result.bytes + info.size > self.limits.max_bytes:
            raise errors.TooLarge(
                "archive too large", f"its content exceeds the limit of {self.limits.max_bytes} bytes"
            )
        source = tar.extractfile(info)
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent)
        try:
            if source is not None:
                while True:
                    block = source.read(_COPY_BUFFER)
                    if not block:
                        break
                    self.result.bytes += len(block)
                    if self.result.bytes > self.limits.max_bytes:
                        raise errors.TooLarge(
                            "archive too large", f"its content exceeds the limit of {self.limits.max_bytes} bytes"
                        )
                    write_all(fd, block)
            os.fchmod(fd, info.mode & 0o777)
            try:
                os.utime(fd, (info.mtime, info.mtime))
            except (OverflowError, ValueError, OSError):
                pass  # an absurd timestamp is not worth failing the member
        finally:
            os.close(fd)
        self.result.files += 1


def chmod_directory_at(dir_fd: int, name: str, mode: int) -> None:
    """chmod the directory ``name`` below ``dir_fd`` without following a symlink."""
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _merge(src_fd: int, dst_fd: int, prefix: str, result: ExtractionResult) -> None:
    """Move every entry of ``src_fd`` into ``dst_fd``, merging directories."""
    for name in os.listdir(src_fd):
        src = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
        dst = _lstat(dst_fd, name)
        if dst is None or (not stat.S_ISDIR(src.st_mode) and not stat.S_ISDIR(dst.st_mode)):
            os.replace(name, name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        elif stat.S_ISDIR(src.st_mode) and stat.S_ISDIR(dst.st_mode):
            sub_src = os.open(name, _DIR_FLAGS, dir_fd=src_fd)
            try:
                sub_dst = os.open(name, _DIR_FLAGS, dir_fd=dst_fd)
                try:
                    _merge(sub_src, sub_dst, prefix + name + "/", result)
                finally:
                    os.close(sub_dst)
            finally:
                os.close(sub_src)
        else:
            # Never replace a directory by a file or the reverse: an existing
            # symlink to a directory is not followed either (it is not S_ISDIR).
            result.skip(prefix + name, "an existing entry of another type is in the way")


def _remove_tree(parent_fd: int, name: str) -> None:
    try:
        shutil.rmtree(name, dir_fd=parent_fd)
    except FileNotFoundError:
        pass


def extract(raw: Any, policy: PathPolicy, extract_path: str, limits: Limits, max_input: int | None = None,
            journal: StagingJournal | None = None) -> ExtractionResult:
    """
    Extract the archive read from ``raw`` into ``extract_path`` (checked by
    ``policy``, created if absent) safely; see the module docstring.
    """
    real = policy.resolve(extract_path, "extract_path")
    result = ExtractionResult(path=real)
    existing = policy.stat(extract_path, "extract_path")
    if existing is not None and existing.kind != "directory":
        raise errors.Conflict("extract_path is not a directory", extract_path)
    token = secrets.token_hex(8)
    staging_name = STAGING_PREFIX + token
    if existing is None and not policy.is_root(real):
        # Stage beside the target: one rename makes the whole tree appear.
        home_fd, target_name = policy.open_parent(real, create=True, shown=extract_path)
        stage_in_parent = True
        home = os.path.dirname(real)
    else:
        home_fd = policy.open_directory(real, create=True, shown=extract_path)
        target_name = ""
        stage_in_parent = False
        home = real
    try:
        if journal is not None:
            journal.record(token, os.path.join(home, staging_name))
        try:
            os.mkdir(staging_name, 0o700, dir_fd=home_fd)
            staging_fd = os.open(staging_name, _DIR_FLAGS, dir_fd=home_fd)
        except OSError as e:
            raise path_error(e, extract_path) from None
        try:
            metadata = [0]

            def count_decompressed(n: int) -> None:
                metadata[0] += n
                overhead = metadata[0] - extractor.declared
                allowance = _METADATA_ALLOWANCE + _METADATA_PER_MEMBER * (result.members + 1) + 2 * _COPY_BUFFER
                if overhead > allowance:
                    raise errors.TooLarge("archive metadata too large", "headers or padding exceed what any archive needs")

            # The final path is real + "/" + name, NUL-terminated within PATH_MAX.
            room = PATH_MAX - 2 - len(os.fsencode(real))
            extractor = _Extractor(staging_fd, limits, result, room)
            reader = InputReader(raw, limits.max_bytes if max_input is None else max_input, count_decompressed)
            try:
                with tarfile.open(fileobj=reader, mode="r|", bufsize=_COPY_BUFFER) as tar:  # type: ignore[call-overload]
                    while True:
                        info = tar.next()
                        if info is None:
                            break
                        extractor.member(tar, info)
                        # TarFile remembers every member it read: with many
                        # members that alone would grow without bound.
                        tar.members.clear()
            except (tarfile.TarError, EOFError) as e:
                raise errors.InvalidInput("invalid archive", f"not a readable tar or tar.gz stream ({_describe(e)})") from None
            except OSError as e:
                raise path_error(e, extract_path) from None
            try:
                if stage_in_parent:
                    try:
                        os.rename(staging_name, target_name, src_dir_fd=home_fd, dst_dir_fd=home_fd)
                        chmod_directory_at(home_fd, target_name, 0o755)
                        return result
                    except OSError as e:
                        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                            raise
                        # Created meanwhile: merge into it instead.
                    target_fd = policy.open_directory(real, shown=extract_path)
                else:
                    target_fd = os.dup(home_fd)
                try:
                    _merge(staging_fd, target_fd, "", result)
                finally:
                    os.close(target_fd)
            except OSError as e:
                raise path_error(e, extract_path) from None
        finally:
            os.close(staging_fd)
            _remove_tree(home_fd, staging_name)
    finally:
        os.close(home_fd)
        if journal is not None:
            journal.forget(token)
    return result


def _describe(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text[:200]
