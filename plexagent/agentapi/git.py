"""Git Operations (seed: /git/clone): a thin route over ``plexagent.gitclone``."""

from __future__ import annotations

import os
from typing import Any

from klein import Klein

from plexagent.agentapi.files import path_policy, read_json_object
from plexagent.host.gitclone import GitCloner, parse_clone_request
from plexagent.http import responses


def register(app: Klein, context: Any) -> None:
    cloner = context.services.get("git")
    if cloner is None:
        cloner = context.services["git"] = GitCloner(
            path_policy(context),
            os.path.join(context.config.node.data_dir, "git-staging"),
            context.reactor,
            context.config.agent_api.git_timeout,
        )

    @app.route("/git/clone", methods=["POST"])
    async def clone(request: Any) -> bytes:
        request_ = parse_clone_request(read_json_object(request))
        return responses.respond(request, await cloner.clone(request_))
