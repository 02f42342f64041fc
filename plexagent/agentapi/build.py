"""
Docker Operations of the Node Agent API:
``/docker/build|dockerfile|login|load|load/stream``.
"""

from __future__ import annotations

import os
import re
from typing import Any

from klein import Klein
from twisted.internet import threads
from twisted.web.iweb import IRequest

from plexagent import errors
from plexagent.agentapi.images import register_load
from plexagent.host.docker.builds import dockerfile_document
from plexagent.host.docker.specs import optional_str, parse_bool_arg, require_str
from plexagent.host.files.paths import PathPolicy
from plexagent.http import responses
from plexagent.http.streaming import NDJSON, arg, json_object, ndjson, stream_response

_SUCCESS = re.compile(r"Successfully built ([0-9a-f]+)")


def build_request(body: dict[str, Any], paths: PathPolicy) -> dict[str, Any]:
    """``api.build`` arguments from a build body; paths checked."""
    context_path = paths.resolve(require_str(body, "context_path"), "context_path")
    if not os.path.isdir(context_path):
        raise errors.NotFound("context_path not found", f"{body['context_path']} is not a directory")
    kwargs: dict[str, Any] = {"path": context_path}
    dockerfile = optional_str(body, "dockerfile")
    if dockerfile:
        resolved = paths.resolve(os.path.join(context_path, dockerfile), "dockerfile")
        if not (resolved + "/").startswith(context_path.rstrip("/") + "/"):
            raise errors.Forbidden("path not allowed", "dockerfile must be inside context_path")
        if not os.path.isfile(resolved):
            raise errors.NotFound("dockerfile not found", dockerfile)
        kwargs["dockerfile"] = os.path.relpath(resolved, context_path)
    elif not os.path.isfile(os.path.join(context_path, "Dockerfile")):
        raise errors.NotFound("dockerfile not found", "context_path has no Dockerfile; generate one with /docker/dockerfile")
    tag = optional_str(body, "tag")
    if tag:
        kwargs["tag"] = tag
    build_args = body.get("build_args")
    if build_args is not None:
        if not isinstance(build_args, dict) or not all(isinstance(k, str) for k in build_args):
            raise errors.InvalidInput("invalid build_args", "build_args must be an object of strings")
        kwargs["buildargs"] = {k: str(v) for k, v in build_args.items()}
    for field, key in (("nocache", "nocache"), ("no_cache", "nocache"), ("pull", "pull")):
        if field in body:
            if not isinstance(body[field], bool):
                raise errors.InvalidInput(f"invalid {field}", f"{field} must be true or false")
            kwargs[key] = body[field]
    return kwargs


def image_id_of(lines: list[dict[str, Any]]) -> str | None:
    """The built image's ID: Docker's aux record, else its "Successfully built" line."""
    for line in lines:
        aux = line.get("aux") if isinstance(line, dict) else None
        if isinstance(aux, dict) and aux.get("ID"):
            return aux["ID"]
    for line in reversed(lines):
        m = _SUCCESS.search(str(line.get("stream", ""))) if isinstance(line, dict) else None
        if m:
            return m.group(1)
    return None


def register(app: Klein, context: Any) -> None:
    docker = context.services["docker"]
    paths = context.services.get("paths") or PathPolicy(context.config.agent_api.allowed_paths)

    @app.route("/docker/build", methods=["POST"])
    async def build(request: IRequest) -> Any:
        kwargs = build_request(json_object(request), paths)
        lines: list[dict[str, Any]] = []
        if parse_bool_arg(arg(request, "stream"), "stream"):

            def start(on_item: Any) -> Any:
                def on_line(line: Any) -> None:
                    lines.append(line)
                    on_item(line)

                return docker.build(on_line, **kwargs)

            return await stream_response(
                request,
                start,
                NDJSON,
                ndjson,
                trailer=lambda: {"status": "complete", "image_id": image_id_of(lines), "tag": kwargs.get("tag")},
            )
        await docker.build(lines.append, **kwargs).done
        output = [line["stream"] for line in lines if isinstance(line, dict) and "stream" in line]
        return responses.respond(
            request,
            {"success": True, "image_id": image_id_of(lines), "tag": kwargs.get("tag"), "logs": "".join(output)},
        )

    @app.route("/docker/dockerfile", methods=["POST"])
    async def dockerfile(request: IRequest) -> bytes:
        body = json_object(request)
        generate = body.get("generate", False)
        if not isinstance(generate, bool):
            raise errors.InvalidInput("invalid generate", "generate must be true or false")
        context_path = require_str(body, "context_path")
        name = optional_str(body, "dockerfile") or "Dockerfile"
        document = await threads.deferToThreadPool(
            context.reactor, context.reactor.getThreadPool(), dockerfile_document, paths, context_path, name, generate
        )
        return responses.respond(request, document)

    @app.route("/docker/login", methods=["POST"])
    async def login(request: IRequest) -> bytes:
        body = json_object(request)
        registry = optional_str(body, "registry") or "docker.io"
        username = require_str(body, "username")
        password = body.get("password")
        if not isinstance(password, str) or not password:
            raise errors.InvalidInput("password is required", "password must be a non-empty string")
        return responses.respond(request, await docker.login(registry, username, password))

    register_load(app, context, "/docker/load")
    register_load(app, context, "/docker/load/stream")
