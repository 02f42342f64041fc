"""
Docker Operations of the Node Agent API:
``/docker/build|dockerfile|login|load|load/stream``.
"""

from __future__ import annotations

import os
import re
from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest

from plexagent import errors
from plexagent.agentapi.images import register_load
from plexagent.host.docker.specs import optional_str, parse_bool_arg, require_str
from plexagent.host.files.paths import PathPolicy
from plexagent.http import responses
from plexagent.http.streaming import NDJSON, arg, json_object, ndjson, stream_response

#: A Dockerfile larger than this is not one we should echo back.
MAX_DOCKERFILE_BYTES = 1024 * 1024

_SUCCESS = re.compile(r"Successfully built ([0-9a-f]+)")


def generate_dockerfile(names: set[str]) -> tuple[str, str]:
    """(kind, Dockerfile) for a context whose top-level file names are ``names``."""
    if "package.json" in names:
        install = "npm ci --omit=dev" if "package-lock.json" in names else "npm install --omit=dev"
        return "node", (
            "FROM node:20-alpine\nWORKDIR /app\nCOPY package*.json ./\n"
            f"RUN {install}\nCOPY . .\nEXPOSE 3000\nCMD [\"npm\", \"start\"]\n"
        )
    if "requirements.txt" in names or "pyproject.toml" in names:
        install = (
            "pip install --no-cache-dir -r requirements.txt" if "requirements.txt" in names
            else "pip install --no-cache-dir ."
        )
        entry = "app.py" if "app.py" in names else "main.py"
        return "python", (
            "FROM python:3.12-slim\nWORKDIR /app\nCOPY . .\n"
            f"RUN {install}\nEXPOSE 8000\nCMD [\"python\", \"{entry}\"]\n"
        )
    if "go.mod" in names:
        return "go", (
            "FROM golang:1.22-alpine AS build\nWORKDIR /src\nCOPY . .\nRUN go build -o /app .\n"
            "FROM alpine:3.20\nCOPY --from=build /app /app\nEXPOSE 8080\nCMD [\"/app\"]\n"
        )
    return "static", "FROM nginx:alpine\nCOPY . /usr/share/nginx/html\nEXPOSE 80\n"


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
    paths = PathPolicy(context.config.agent_api.allowed_paths)

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
    def dockerfile(request: IRequest) -> bytes:
        body = json_object(request)
        context_path = paths.resolve(require_str(body, "context_path"), "context_path")
        if not os.path.isdir(context_path):
            raise errors.NotFound("context_path not found", f"{body['context_path']} is not a directory")
        name = optional_str(body, "dockerfile") or "Dockerfile"
        path = paths.resolve(os.path.join(context_path, name), "dockerfile")
        if os.path.isfile(path):
            if os.path.getsize(path) > MAX_DOCKERFILE_BYTES:
                raise errors.TooLarge("dockerfile too large", f"the limit is {MAX_DOCKERFILE_BYTES} bytes")
            with open(path, "rb") as f:
                text = f.read(MAX_DOCKERFILE_BYTES).decode("utf-8", "replace")
            return responses.respond(request, {"exists": True, "generated": False, "path": path, "dockerfile": text})
        generate = body.get("generate", False)
        if not isinstance(generate, bool):
            raise errors.InvalidInput("invalid generate", "generate must be true or false")
        if not generate:
            raise errors.NotFound("dockerfile not found", f"{path} does not exist; send generate: true for a suggestion")
        kind, text = generate_dockerfile(set(os.listdir(context_path)))
        return responses.respond(
            request, {"exists": False, "generated": True, "kind": kind, "path": path, "dockerfile": text}
        )

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
