"""
``git clone`` on behalf of a remote caller, with credentials that never
touch argv, the URL, a log line, an error message or the clone's
``.git/config``.

The real ``git`` runs through ``plexagent.host.processes`` (never blocking the
reactor, killed past its timeout) in a private staging directory under
``node.data_dir``, where nobody else can swap a path under it. Credentials
reach git only through its environment, read back by a tiny askpass helper
that contains no secret itself; credential helpers, the user's and the
system's git config are switched off so nothing is remembered. Only a
finished clone is moved into ``target_path``, through directory descriptors
(``plexagent.host.files.paths``), so the path policy holds for the result too.

A local source (``file://``) is never read by git in place: it is checked
and copied into the staging directory by ``plexagent.gitsource``, and git
clones that copy (the only local transport it is allowed) with repository
discovery stopped at the staging directory. The clone must stand alone: a
``.git`` file, ``commondir`` or alternates in the result are refused.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import stat
import time
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import attrs
from twisted.internet import threads

from plexagent import errors
from plexagent.fileio import ensure_private_dir, path_error, storage_error
from plexagent.host import gitsource, processes
from plexagent.host.files.paths import PathPolicy, remove_tree
from plexagent.host.files.tarsafe import chmod_directory_at, symlink_target_stays_inside

_ALLOWED_SCHEMES = ("https", "http", "ssh", "git", "file")
#: What git may use for a remote URL: never a local transport.
_REMOTE_PROTOCOLS = "https:http:ssh:git"
_SCP_LIKE = re.compile(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[^/\\]")
_BRANCH = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/+-]{0,254}")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_ASKPASS = """#!/bin/sh
# Answers git's credential prompts from the environment; holds no secret.
case "$1" in
  Username*) printf '%s\\n' "$PLEXAGENT_GIT_USERNAME" ;;
  *) printf '%s\\n' "$PLEXAGENT_GIT_PASSWORD" ;;
esac
"""


@attrs.frozen
class CloneRequest:
    url: str
    target_path: str
    branch: str | None = None
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    depth: int | None = None


def _text(body: dict[str, Any], key: str, required: bool = False) -> str | None:
    value = body.get(key)
    if value is None or value == "":
        if required:
            raise errors.InvalidInput(f"{key} is required", f"{key} must be a non-empty string")
        return None
    if not isinstance(value, str):
        raise errors.InvalidInput(f"invalid {key}", f"{key} must be a string")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise errors.InvalidInput(f"invalid {key}", f"{key} must not contain control characters")
    return value


def parse_clone_request(body: dict[str, Any]) -> CloneRequest:
    """Validate the route's JSON body (credentials taken out of the URL)."""
    url = _text(body, "url", required=True)
    assert url is not None
    target = _text(body, "target_path", required=True)
    assert target is not None
    branch = _text(body, "branch")
    username = _text(body, "username")
    password = _text(body, "password")
    token = _text(body, "token")
    if token is not None and password is None:
        password = token
    depth = body.get("depth")
    if depth is not None:
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= 1_000_000:
            raise errors.InvalidInput("invalid depth", "depth must be an integer from 1 to 1000000")
    if branch is not None and (not _BRANCH.fullmatch(branch) or ".." in branch):
        raise errors.InvalidInput("invalid branch", "branch must be a branch or tag name")
    if len(url) > 4096 or url.startswith("-") or any(c.isspace() for c in url):
        raise errors.InvalidInput("invalid url", "url must be a git URL without spaces")
    clean, url_user, url_password = strip_credentials(url)
    username = username or url_user
    password = password or url_password
    if password is not None and not username:
        username = "x-access-token"
    return CloneRequest(clean, target, branch, username, password, depth)


def strip_credentials(url: str) -> tuple[str, str | None, str | None]:
    """(URL without user info, user, password) for scheme URLs; scp-like kept."""
    if _SCP_LIKE.match(url):
        return url, None, None
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _ALLOWED_SCHEMES:
        raise errors.InvalidInput("invalid url", f"url must use one of {', '.join(_ALLOWED_SCHEMES)}")
    if "@" not in parts.netloc:
        return url, None, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, has_password, password = userinfo.partition(":")
    clean = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return clean, unquote(user) or None, unquote(password) if has_password else None


def scrub(text: str, secrets_: list[str]) -> str:
    """``text`` with every secret (raw or URL-quoted) and URL user info masked."""
    for secret in secrets_:
        if secret:
            for form in {secret, quote(secret, safe=""), quote(secret)}:
                text = text.replace(form, "***")
    return re.sub(r"(://)[^/@\s]+@", r"\1***@", text)


def _move_into_place(policy: PathPolicy, source: str, target_path: str) -> str:
    """
    Move the finished clone at ``source`` (private) to ``target_path``:
    one rename when on the same file system, else a descriptor-based copy
    into a staging sibling and one rename. Refuses a non-empty target.
    """
    real = policy.resolve(target_path, "target_path")
    shown = target_path
    if policy.is_root(real):
        raise errors.Forbidden("path not allowed", shown)
    pfd, name = policy.open_parent(real, create=True, shown=shown)
    try:
        _check_empty_target(pfd, name, shown)
        try:
            os.rename(source, name, dst_dir_fd=pfd)
            chmod_directory_at(pfd, name, 0o755)
            return real
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise errors.Conflict("target_path is not empty", shown) from None
            if e.errno != errno.EXDEV:
                raise path_error(e, shown) from None
        staging = ".plexagent-clone-" + secrets.token_hex(8)
        os.mkdir(staging, 0o700, dir_fd=pfd)
        try:
            sfd = os.open(staging, _DIR_FLAGS, dir_fd=pfd)
            try:
                _copy_tree(source, sfd)
            finally:
                os.close(sfd)
            os.rename(staging, name, src_dir_fd=pfd, dst_dir_fd=pfd)
            chmod_directory_at(pfd, name, 0o755)
        except OSError as e:
            _remove_quietly(pfd, staging, shown)
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise errors.Conflict("target_path is not empty", shown) from None
            raise path_error(e, shown) from None
        except BaseException:
            _remove_quietly(pfd, staging, shown)
            raise
        return real
    finally:
        os.close(pfd)


def _remove_quietly(dir_fd: int, name: str, shown: str) -> None:
    """Remove the tree ``name`` below ``dir_fd`` if it is there, whatever its depth."""
    try:
        remove_tree(dir_fd, name, shown)
    except (OSError, errors.PlexError):
        pass


def check_standalone_clone(repo: str) -> None:
    """
    Refuse a clone (in private staging) that would read objects from
    elsewhere: its ``.git`` must be a plain directory with no ``commondir``,
    no linked or borrowed object store (alternates, a symlink).
    """
    git_dir = os.path.join(repo, ".git")
    objects = os.path.join(git_dir, "objects")
    borrowed = (
        not stat.S_ISDIR(os.lstat(git_dir).st_mode)
        or os.path.lexists(os.path.join(git_dir, "commondir"))
        or not stat.S_ISDIR(os.lstat(objects).st_mode)
        or os.path.lexists(os.path.join(objects, "info", "alternates"))
        or os.path.lexists(os.path.join(objects, "info", "http-alternates"))
    )
    if borrowed:
        raise errors.Forbidden("path not allowed", "the clone would read objects from outside its own directory")


def remove_outward_links(repo: str) -> list[str]:
    """
    Remove from a checkout (in private staging) every symlink whose target
    leaves it (absolute, or more ``..`` than its depth), as tar extraction
    skips them: the agent never follows them, but nginx, a container bound
    to the directory or an operator's tool would. Their paths, relative.
    """
    removed: list[str] = []
    stack = [("", repo)]
    while stack:
        relative, directory = stack.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                name = f"{relative}/{entry.name}" if relative else entry.name
                if name == ".git":
                    continue
                if entry.is_symlink():
                    if not symlink_target_stays_inside(name.split("/"), os.readlink(entry.path)):
                        os.unlink(entry.path)
                        removed.append(name)
                elif entry.is_dir(follow_symlinks=False):
                    stack.append((name, entry.path))
    return sorted(removed)


def _check_empty_target(pfd: int, name: str, shown: str) -> None:
    try:
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise errors.Conflict("target_path is not empty", f"{shown} exists and is not a directory")
    fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
    try:
        if os.listdir(fd):
            raise errors.Conflict("target_path is not empty", shown)
    finally:
        os.close(fd)


def _copy_tree(source: str, dst_fd: int) -> None:
    """Copy the private tree ``source`` below ``dst_fd``, never following links."""
    for entry in os.scandir(source):
        st = entry.stat(follow_symlinks=False)
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), entry.name, dir_fd=dst_fd)
        elif entry.is_dir(follow_symlinks=False):
            os.mkdir(entry.name, 0o700, dir_fd=dst_fd)
            sub = os.open(entry.name, _DIR_FLAGS, dir_fd=dst_fd)
            try:
                _copy_tree(entry.path, sub)
                os.fchmod(sub, stat.S_IMODE(st.st_mode))
            finally:
                os.close(sub)
        elif entry.is_file(follow_symlinks=False):
            with open(entry.path, "rb") as src:
                fd = os.open(entry.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600, dir_fd=dst_fd)
                try:
                    with os.fdopen(fd, "wb", closefd=False) as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    os.fchmod(fd, stat.S_IMODE(st.st_mode) & 0o777)
                finally:
                    os.close(fd)


class GitCloner:
    """Clones repositories into allowed paths; see the module docstring."""

    def __init__(self, policy: PathPolicy, work_dir: str, reactor: Any, timeout: float, git: str = "git") -> None:
        self.policy = policy
        self.work_dir = work_dir
        self.reactor = reactor
        self.timeout = timeout
        self.git = git

    def _in_thread(self, f: Any, *args: Any) -> Any:
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    def _prepare(self, req: CloneRequest) -> tuple[str, str]:
        """Check the target and make a private staging dir: (staging, askpass)."""
        real = self.policy.resolve(req.target_path, "target_path")
        if self.policy.is_root(real):
            raise errors.Forbidden("path not allowed", req.target_path)
        info = self.policy.stat(req.target_path, "target_path")
        if info is not None:
            if info.kind != "directory":
                raise errors.Conflict("target_path is not empty", f"{req.target_path} exists and is not a directory")
            fd = self.policy.open_directory(real, shown=req.target_path)
            try:
                if os.listdir(fd):
                    raise errors.Conflict("target_path is not empty", req.target_path)
            finally:
                os.close(fd)
        try:
            ensure_private_dir(self.work_dir)
            self.remove_stale_staging()
            staging = os.path.join(self.work_dir, secrets.token_hex(8))
            os.mkdir(staging, 0o700)
            os.mkdir(os.path.join(staging, "home"), 0o700)
            askpass = os.path.join(staging, "askpass")
            fd = os.open(askpass, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o700)
            with os.fdopen(fd, "w") as f:
                f.write(_ASKPASS)
        except OSError as e:
            raise storage_error(e, "git staging directory") from None
        return staging, askpass

    def remove_stale_staging(self, now: float | None = None) -> list[str]:
        """
        Remove staging directories older than twice the timeout: no clone
        runs that long, so they were left by a killed agent.
        """
        now = time.time() if now is None else now
        removed: list[str] = []
        try:
            names = os.listdir(self.work_dir)
        except FileNotFoundError:
            return removed
        work = os.open(self.work_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for name in names:
                try:
                    if now - os.lstat(name, dir_fd=work).st_mtime > 2 * self.timeout:
                        _remove_quietly(work, name, name)
                        removed.append(name)
                except OSError:
                    pass
        finally:
            os.close(work)
        return removed

    def _remove_staging(self, staging: str) -> None:
        work = os.open(self.work_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            _remove_quietly(work, os.path.basename(staging), staging)
        finally:
            os.close(work)

    def _local_source(self, url: str) -> str | None:
        """The checked path of a local (file://) source, or None for a remote URL."""
        path = gitsource.local_path(url)
        if path is None:
            if "://" not in url and not _SCP_LIKE.match(url):
                raise errors.InvalidInput("invalid url", "url must be a URL such as https://host/repo.git")
            return None
        # Refused early when plainly outside; gitsource checks all git would read.
        self.policy.resolve(path, "url")
        return path

    async def clone(self, req: CloneRequest) -> dict[str, Any]:
        source = self._local_source(req.url)
        self.policy.resolve(req.target_path, "target_path")
        staging, askpass = await self._in_thread(self._prepare, req)
        hidden = [s for s in (req.password,) if s]
        try:
            if source is not None:
                origin = os.path.join(staging, "source.git")
                await self._in_thread(gitsource.snapshot, self.policy, source, origin, self.timeout)
            else:
                origin = req.url
            env = {
                "PATH": processes.DEFAULT_PATH,
                "HOME": os.path.join(staging, "home"),
                "XDG_CONFIG_HOME": os.path.join(staging, "home"),
                "GIT_CONFIG_NOSYSTEM": "1",
                "GIT_CONFIG_GLOBAL": "/dev/null",
                "GIT_TERMINAL_PROMPT": "0",
                "GIT_ASKPASS": askpass,
                "SSH_ASKPASS": askpass,
                "GIT_SSH_COMMAND": "ssh -o BatchMode=yes",
                "GIT_ALLOW_PROTOCOL": "file" if source is not None else _REMOTE_PROTOCOLS,
                # No repository above the staging directory is ever discovered.
                "GIT_CEILING_DIRECTORIES": self.work_dir,
                "LC_ALL": "C",
            }
            if req.username:
                env["PLEXAGENT_GIT_USERNAME"] = req.username
            if req.password:
                env["PLEXAGENT_GIT_PASSWORD"] = req.password
            argv = [self.git, "-c", "credential.helper=", "-c", "core.askPass=", "-c", "safe.bareRepository=explicit",
                    "-c", "core.alternateRefsCommand=", "clone", "--no-recurse-submodules"]
            if source is not None:
                # Objects are packed and copied, never hard-linked or borrowed.
                argv.append("--no-local")
            if req.branch:
                argv += ["--branch", req.branch, "--single-branch"]
            if req.depth:
                argv += ["--depth", str(req.depth)]
            argv += ["--", origin, "repo"]
            result = await self._run(argv, env, staging)
            if result.exit_code != 0:
                text = scrub(result.stderr.decode("utf-8", "replace").replace(origin, req.url), hidden)
                # git's own words, minus the progress line naming our staging directory.
                message = "\n".join(line for line in text.splitlines() if not line.startswith("Cloning into")).strip()
                raise errors.UpstreamFailed("git clone failed", message[-4000:] or f"git exited with {result.exit_code}")
            repo = os.path.join(staging, "repo")
            await self._in_thread(check_standalone_clone, repo)
            outward = await self._in_thread(remove_outward_links, repo)
            local_env = {"PATH": env["PATH"], "HOME": env["HOME"], "GIT_CONFIG_NOSYSTEM": "1",
                         "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_DIR": os.path.join(repo, ".git")}
            if source is not None:
                # origin is the URL asked for, not the private copy.
                recorded = await self._run([self.git, "config", "remote.origin.url", req.url], local_env, repo)
                if recorded.exit_code != 0:
                    raise errors.StorageError("storage error", "git could not record the clone's origin URL")
            head = await self._run([self.git, "rev-parse", "HEAD"], local_env, repo)
            branch = await self._run([self.git, "rev-parse", "--abbrev-ref", "HEAD"], local_env, repo)
            real = await self._in_thread(_move_into_place, self.policy, repo, req.target_path)
        finally:
            await self._in_thread(self._remove_staging, staging)
        return {
            "success": True,
            "path": real,
            "target_path": real,
            "url": scrub(req.url, hidden),
            "branch": branch.stdout.decode("utf-8", "replace").strip() or None,
            "commit": head.stdout.decode("ascii", "replace").strip() or None,
            "skipped": [{"name": name, "reason": "symlink leads outside the checkout"} for name in outward],
        }

    async def _run(self, argv: list[str], env: dict[str, str], cwd: str) -> processes.ProcessResult:
        try:
            return await processes.run(argv, env=env, cwd=cwd, timeout=self.timeout, reactor=self.reactor)
        except processes.ProcessTimedOut:
            raise processes.ProcessTimedOut(
                "git clone timed out", f"git did not finish within {self.timeout:g} seconds and was stopped"
            ) from None
