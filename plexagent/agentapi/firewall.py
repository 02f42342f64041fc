"""Firewall (UFW) of the Node Agent API: thin routes over ``firewall.Firewall``."""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest

from plexagent.host import firewall
from plexagent.http import responses


def register(app: Klein, context: Any) -> None:
    ufw = context.services["firewall"]

    @app.route("/firewall/status", methods=["GET"])
    async def firewall_status(request: IRequest) -> bytes:
        return responses.respond(request, await ufw.status())

    @app.route("/firewall/allow", methods=["POST"])
    async def firewall_allow(request: IRequest) -> bytes:
        # Validated completely before ufw is run.
        rule = firewall.parse_allow(responses.read_json(request))
        return responses.respond(request, await ufw.allow(rule), 201)
