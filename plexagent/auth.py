"""
Listener policies: who may use a listener, and who may read secret values.

Each listener's Site carries one policy; ``GuardedResource`` applies it
before any route runs, so route code never repeats an auth check.
"""

from __future__ import annotations

import hmac
from typing import Any, Protocol

from twisted.web import resource
from twisted.web.iweb import IRequest

from plexagent import errors, peercred, web


class ListenerPolicy(Protocol):
    def authenticate(self, request: IRequest) -> None:
        """Raise ``errors.PlexError`` when the request may not be served."""

    def may_read_secrets(self, request: IRequest) -> bool:
        """Whether this request's client may read secret values."""


def constant_time_equal(given: bytes, expected: bytes) -> bool:
    return hmac.compare_digest(given, expected)


class PeerCredentialPolicy:
    """
    The Local Node API's Unix socket: access is governed by the socket's file
    mode; secret values only for uid 0 or members of the secrets group.
    """

    def __init__(self, secrets_gid: int | None, proc_root: str = "/proc") -> None:
        self._secrets_gid = secrets_gid
        self._proc_root = proc_root

    def authenticate(self, request: IRequest) -> None:
        return None

    def may_read_secrets(self, request: IRequest) -> bool:
        creds = peercred.credentials_of(request.channel.transport)
        if creds is None:
            return False
        if creds.uid == 0:
            return True
        if self._secrets_gid is None:
            return False
        groups = peercred.process_groups(creds.pid, creds.uid, self._proc_root)
        return groups is not None and self._secrets_gid in groups


class BearerTokenPolicy:
    """The Local Node API's TCP listener: ``Authorization: Bearer <token>``."""

    def __init__(self, token: str) -> None:
        self._token = token.encode("utf-8")

    def authenticate(self, request: IRequest) -> None:
        header = request.getHeader(b"authorization")
        if header is not None:
            scheme, _, value = header.partition(b" ")
            if scheme.lower() == b"bearer" and constant_time_equal(value.strip(), self._token):
                return
        raise errors.Unauthorized("unauthorized")

    def may_read_secrets(self, request: IRequest) -> bool:
        # The token is the credential on TCP, and it grants secret reads.
        return True


class GuardedResource(resource.Resource):
    """Applies a listener policy, then hands the request to ``inner``."""

    isLeaf = True

    def __init__(self, policy: Any, inner: Any) -> None:
        super().__init__()
        self.policy = policy
        self._inner = inner

    def render(self, request: IRequest) -> Any:
        try:
            self.policy.authenticate(request)
        except errors.PlexError as e:
            return web.respond_error(request, e)
        request.plexagent_policy = self.policy
        return self._inner.render(request)
