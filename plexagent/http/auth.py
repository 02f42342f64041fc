"""
Listener policies: who may use a listener, and who may read secret values.

Each listener's Site carries one policy; ``GuardedResource`` applies it
before any route runs, so route code never repeats an auth check.
"""

from __future__ import annotations

import hmac
from typing import Any, Protocol, cast

from twisted.web import resource
from twisted.web.iweb import IRequest

from plexagent import errors
from plexagent.http import peercred, responses


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
        creds = peercred.credentials_of(cast(Any, request).channel.transport)
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
            responses.refuse_unservable(request)
        except errors.PlexError as e:
            # A refused client gets its answer and the connection closes: it
            # holds no descriptor of the agent's beyond that.
            request.setHeader(b"connection", b"close")
            channel = getattr(request, "channel", None)
            if channel is not None:
                channel.persistent = False
            return responses.respond_error(request, e)
        cast(Any, request).plexagent_policy = self.policy
        return self._inner.render(request)


def parse_networks(entries: "tuple[str, ...] | list[str]") -> "list[Any]":
    import ipaddress

    return [ipaddress.ip_network(e.strip(), strict=False) for e in entries]


_PRIVATE_V4 = None


def _is_rfc1918(address: Any) -> bool:
    import ipaddress

    global _PRIVATE_V4
    if _PRIVATE_V4 is None:
        _PRIVATE_V4 = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")]
    if getattr(address, "ipv4_mapped", None) is not None:
        address = address.ipv4_mapped
    return address.version == 4 and any(address in n for n in _PRIVATE_V4)


class AgentAPIPolicy:
    """
    The Node Agent API's layers, in the seed's order: the IP allowlist (the
    TCP peer address, never a header) -> 403; then ``X-API-Key`` compared in
    constant time -> 401. ``GET /ping`` needs no key. With
    ``require_auth_always`` off, RFC 1918 peers skip the key (the seed's VPC
    bypass).
    """

    PUBLIC = frozenset({(b"GET", b"/ping"), (b"HEAD", b"/ping")})

    def __init__(self, allowed_ips: "tuple[str, ...]", api_key: str, require_auth_always: bool = True) -> None:
        self._networks = parse_networks(allowed_ips)
        self._key = api_key.encode("utf-8")
        self._always = require_auth_always

    def peer_ip(self, request: IRequest) -> Any:
        import ipaddress

        peer = request.getClientAddress()
        host = getattr(peer, "host", None)
        if host is None:
            return None
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return None
        return address

    def ip_allowed(self, request: IRequest) -> bool:
        if not self._networks:
            return True
        address = self.peer_ip(request)
        if address is None:
            return False
        candidates = [address]
        mapped = getattr(address, "ipv4_mapped", None)
        if mapped is not None:
            candidates.append(mapped)
        return any(a.version == n.version and a in n for a in candidates for n in self._networks)

    def authenticate(self, request: IRequest) -> None:
        if not self.ip_allowed(request):
            raise errors.Forbidden("IP not in allowlist")
        path = request.path.split(b"?", 1)[0]
        if (request.method, path) in self.PUBLIC:
            return
        if not self._always:
            address = self.peer_ip(request)
            if address is not None and _is_rfc1918(address):
                return
        given = request.getHeader(b"x-api-key")
        if given is None or not constant_time_equal(given.strip(), self._key):
            raise errors.Unauthorized("unauthorized")

    def may_read_secrets(self, request: IRequest) -> bool:
        return False
