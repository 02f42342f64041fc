"""
Service Control of the Node Agent API (``/services/<n>/status|restart``):
thin routes over ``host.services.ServiceControl``.
"""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest

from plexagent.http import responses


def register(app: Klein, context: Any) -> None:
    control = context.services["service_control"]

    @app.route("/services/<n>/status", methods=["GET"])
    async def service_status(request: IRequest, n: str) -> bytes:
        return responses.respond(request, await control.status(n))

    @app.route("/services/<n>/restart", methods=["POST"])
    async def service_restart(request: Any, n: str) -> bytes:
        if n == control.agent_service:
            control.check(n)
            result = await control.restart(n, answered=request.notifyFinish())
            return responses.respond(request, result, 202)
        return responses.respond(request, await control.restart(n))
