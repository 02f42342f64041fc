"""
The extraction journal: an archive is extracted into a staging directory
beside its target and merged in at the end; the journal records each
staging directory so that one left behind by a crash is removed at the
next start, and an entry that cannot be used is set aside.
"""

from __future__ import annotations

import os
import re
import threading

from plexagent import errors
from plexagent.fileio import (
    atomic_write,
    ensure_private_dir,
    is_set_aside,
    read_stored,
    set_aside,
)
from plexagent.host.files.paths import PathPolicy

STAGING_PREFIX = ".plexagent-extract-"
#: the random part of a staging directory's name (and its journal entry's)
_TOKEN = re.compile(r"[0-9a-f]{16}")


class StagingJournal:
    """
    Remembers (under ``node.data_dir``) where staging directories are, so
    that those left by a crash or a kill are removed at the next start.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._active: set[str] = set()
        self._lock = threading.Lock()

    def record(self, token: str, staging_path: str) -> None:
        with self._lock:
            self._active.add(token)
        try:
            ensure_private_dir(self.directory)
            atomic_write(os.path.join(self.directory, token), staging_path.encode("utf-8"))
        except (OSError, errors.PlexError):
            with self._lock:
                self._active.discard(token)
            raise

    def forget(self, token: str) -> None:
        try:
            os.unlink(os.path.join(self.directory, token))
        except OSError:
            pass
        with self._lock:
            self._active.discard(token)

    def recover(self, policy: PathPolicy) -> list[str]:
        """
        Remove staging directories of extractions that are not running; their
        paths. An entry that cannot be used (unreadable, not naming its own
        staging directory, outside the allowed paths now) is set aside, not
        deleted: it may be the only record of a directory left behind.
        """
        removed: list[str] = []
        if os.path.lexists(self.directory) and not os.path.isdir(self.directory):
            set_aside(self.directory, "not a directory")
            return removed
        try:
            tokens = os.listdir(self.directory)
        except FileNotFoundError:
            return removed
        for token in tokens:
            entry = os.path.join(self.directory, token)
            if is_set_aside(token):
                continue
            if token.startswith("."):
                # A temporary file of a record() the crash cut short.
                _unlink(entry)
                continue
            with self._lock:
                if token in self._active:
                    continue
            try:
                path = read_stored(entry, 8192).decode("utf-8")
                if not _TOKEN.fullmatch(token) or not os.path.isabs(path) \
                        or os.path.basename(path) != STAGING_PREFIX + token:
                    raise ValueError("it does not name the staging directory of its extraction")
                # Through the policy: never anything outside the roots.
                policy.delete(path, recursive=True)
                removed.append(path)
            except errors.NotFound:
                pass  # already gone
            except (OSError, ValueError, errors.PlexError) as e:
                why = e.message + (f": {e.details}" if e.details else "") if isinstance(e, errors.PlexError) else str(e)
                set_aside(entry, f"unusable extraction journal entry ({why})")
                continue
            _unlink(entry)
        return removed


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
