"""Nginx of the Node Agent API: thin routes over ``nginx.Nginx``."""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest

from plexagent.http import responses


def register(app: Klein, context: Any) -> None:
    nginx = context.services["nginx"]

    @app.route("/nginx/test", methods=["GET", "POST"])
    async def nginx_test(request: IRequest) -> bytes:
        return responses.respond(request, await nginx.test())

    @app.route("/nginx/reload", methods=["POST"])
    async def nginx_reload(request: IRequest) -> bytes:
        return responses.respond(request, await nginx.reload())
