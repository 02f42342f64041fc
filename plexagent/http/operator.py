"""
The agent's own routes on the Local Node API's Unix socket, under
``/plexagent/``: outside ``/v1``, not in the Local Node API's OpenAPI
document, never on a TCP listener (only the socket's site mounts them).
They are for the node's operator, not for programs using the Local Node
API: ``POST /plexagent/reload`` re-reads the credentials, for root only
(``SO_PEERCRED``); anyone else gets 403.
"""

from __future__ import annotations

from typing import Any, Callable, cast

from twisted.internet import defer
from twisted.web import resource
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
    """The routes under ``/plexagent/``; ``reload`` re-reads the credentials and says what it did."""

    app = responses.json_app()

    def __init__(self, reload: Callable[[], defer.Deferred[dict[str, Any]]]) -> None:
        self._reload = reload

    def resource(self) -> Any:
        return self.app.resource()

    @app.route("/plexagent/reload", methods=["POST"])
    async def reload(self, request: IRequest) -> bytes:
        require_root(request, ROOT_ONLY)
        return responses.respond(request, await self._reload())


class SocketRoot(resource.Resource):
    """The socket's tree: ``/plexagent/...`` to the agent's own routes, the rest to the Local Node API."""

    isLeaf = True

    def __init__(self, node_api: Any, operator: Any) -> None:
        super().__init__()
        self._node_api = node_api
        self._operator = operator

    def render(self, request: IRequest) -> Any:
        if request.path.startswith(PREFIX):
            return self._operator.render(request)
        return self._node_api.render(request)
