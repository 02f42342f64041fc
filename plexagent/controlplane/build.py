"""
What identifies the running build to a control plane: the SHA-256 of the
installed package, computed once, in a thread.
"""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Any

from twisted.internet import defer, threads


def package_checksum() -> str:
    """Hex SHA-256 of the installed plexagent package (its .py and .yaml files, sorted by path)."""
    import plexagent

    root = os.path.dirname(os.path.abspath(plexagent.__file__))
    digest = hashlib.sha256()
    paths = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        paths += [os.path.join(directory, f) for f in files if f.endswith((".py", ".yaml"))]
    for path in sorted(paths, key=lambda p: os.path.relpath(p, root)):
        with open(path, "rb") as f:
            digest.update(os.path.relpath(path, root).encode() + b"\0" + f.read() + b"\0")
    return digest.hexdigest()


class BuildChecksum:
    """The package checksum, computed once in a thread however many ask at once."""

    def __init__(self) -> None:
        self._hex = ""
        self._waiters: list[defer.Deferred[str]] | None = None

    def hex(self) -> defer.Deferred[str]:
        """The checksum as 64 hex digits (plexd's form)."""
        if self._hex:
            return defer.succeed(self._hex)
        waiter: defer.Deferred[str] = defer.Deferred()
        if self._waiters is None:
            self._waiters = []

            def computed(result: Any) -> None:
                waiters, self._waiters = self._waiters or [], None
                if isinstance(result, str):
                    self._hex = result
                for d in waiters:
                    d.callback(result) if isinstance(result, str) else d.errback(result)

            threads.deferToThread(package_checksum).addBoth(computed)
        self._waiters.append(waiter)
        return waiter

    def base64(self) -> defer.Deferred[str]:
        """The checksum as standard base64 of its 32 bytes (44 characters)."""
        return self.hex().addCallback(lambda text: base64.b64encode(bytes.fromhex(text)).decode("ascii"))
