"""
The path policy: which host paths the Node Agent API may touch.

A path is allowed only if, after normalising ``.``/``..`` and resolving every
symlink, it lies inside one of the allowed roots (sibling prefixes such as
``/app-evil`` do not count for ``/app/``).
"""

from __future__ import annotations

import os

from plexagent import errors


class PathPolicy:
    """Checks paths against ``agent_api.allowed_paths``."""

    def __init__(self, roots: "tuple[str, ...] | list[str]") -> None:
        self.roots = tuple(os.path.realpath(r.rstrip("/") or "/") for r in roots)

    def contains(self, real: str) -> bool:
        return any(real == root or real.startswith(root.rstrip("/") + "/") for root in self.roots)

    def resolve(self, path: object, field: str = "path") -> str:
        """The resolved absolute path, or ``Forbidden("path not allowed")``."""
        if not isinstance(path, str) or not path:
            raise errors.InvalidInput(f"{field} is required", f"{field} must be a non-empty string")
        if "\x00" in path:
            raise errors.InvalidInput(f"invalid {field}", f"{field} must not contain NUL")
        if not os.path.isabs(path):
            raise errors.Forbidden("path not allowed", path)
        real = os.path.realpath(path)
        if not self.contains(real):
            raise errors.Forbidden("path not allowed", path)
        return real
