"""
The project's own error types.

Domain modules raise these and know nothing of HTTP; ``plexagent.http.responses`` maps
each type to one status code. ``message`` is what the client sees as
``error``; ``details`` is optional extra context. Neither may ever contain a
secret value, a token or a credential.
"""

from __future__ import annotations

from typing import Any


class PlexError(Exception):
    """Base of every error a client may see."""

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidInput(PlexError):
    """The request is malformed or a field has a bad value (400)."""


class Unauthorized(PlexError):
    """No valid credential (401)."""


class Forbidden(PlexError):
    """The credential is valid but not allowed to do this (403)."""


class NotFound(PlexError):
    """The thing named does not exist (404)."""


class Conflict(PlexError):
    """The change conflicts with the current state (409)."""


class RateLimited(PlexError):
    """Too many requests: try again after ``retry_after`` seconds when it is known (429)."""

    def __init__(self, message: str, details: Any = None, retry_after: int | None = None) -> None:
        super().__init__(message, details)
        self.retry_after = retry_after


class TooLarge(PlexError):
    """The body or file exceeds a limit (413)."""


class StorageFull(PlexError):
    """The disk is full; nothing was changed (507)."""


class StorageError(PlexError):
    """Local storage failed; nothing was changed (500)."""


class Unavailable(PlexError):
    """A dependency (control plane, Docker, systemd, ...) is unreachable (503)."""


class UpstreamFailed(PlexError):
    """A dependency answered but failed in a way that is not the client's fault (500)."""
