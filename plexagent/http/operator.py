"""
The agent's own routes on the Local Node API's Unix socket, under
``/plexagent/``: outside ``/v1``, not in the Local Node API's OpenAPI
document, never on a TCP listener (only the socket's site mounts them).
They are for the node's operator, not for programs using the Local Node
API: ``GET /plexagent/status`` says which control-plane protocol, node id
and signing keys are in use and how the link is doing (any socket peer);
``POST /plexagent/reload`` re-reads the credentials, for root only
(``SO_PEERCRED``); anyone else gets 403.
"""

from __future__ import annotations

from typing import Any, Callable, cast

from twisted.internet import defer
from twisted.web.iweb import IRequest

from plexagent import errors
from plexagent.http import peercred, responses

#: Where the agent's own socket routes live.
PREFIX = b"/plexagent/"

ROOT_ONLY = "forbidden: only root may reload the agent"


def require_root(request: IRequest, message: str) -> None:
    """Refuse (403 ``message``) a request whose socket peer is not uid 0."""
    creds = peercred.credentials_of(cast(Any, request).channel.transport)
    if creds is None or creds.uid != 0:
        raise errors.Forbidden(message)


class OperatorRoutes:
    """
    The routes under ``/plexagent/``: ``status`` renders ``status()``;
    ``reload`` re-reads the credentials and says what it did.
    """

    app = responses.json_app()

    def __init__(self, reload: Callable[[], defer.Deferred[dict[str, Any]]],
                 status: Callable[[], dict[str, Any]]) -> None:
        self._reload = reload
        self._status = status

    def resource(self) -> Any:
        return self.app.resource()

    @app.route("/plexagent/status", methods=["GET"])
    def status(self, request: IRequest) -> bytes:
        """Which protocol, node and signing keys are in use, and how the control-plane link is doing."""
        return responses.respond(request, self._status())

    @app.route("/plexagent/reload", methods=["POST"])
    async def reload(self, request: IRequest) -> bytes:
        require_root(request, ROOT_ONLY)
        return responses.respond(request, await self._reload())
