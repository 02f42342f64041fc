"""Networks of the Node Agent API: thin routes over ``networks.Networks``."""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest

from plexagent.host import networks
from plexagent.http import responses


def register(app: Klein, context: Any) -> None:
    nets = networks.Networks(context.services["dockerpool"])

    @app.route("/networks/create", methods=["POST"])
    async def network_create(request: IRequest) -> bytes:
        spec = networks.parse_create(responses.read_json(request))
        return responses.respond(request, await nets.create(spec), 201)

    @app.route("/networks/<n>", methods=["GET"])
    async def network_inspect(request: IRequest, n: str) -> bytes:
        return responses.respond(request, await nets.inspect(n))
