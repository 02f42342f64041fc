"""
Builds: the facade's part that runs ``docker build`` and streams its
progress lines.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

from twisted.logger import Logger

from plexagent import errors
from plexagent.host.docker.images import raise_on_error_line
from plexagent.host.docker.pool import DockerPool, Stream
from plexagent.host.files.paths import PathPolicy

log = Logger()


class BuildOperations:
    """The facade's build operation."""

    pool: DockerPool

    def build(self, on_line: Callable[[dict[str, Any]], None], **kwargs: Any) -> Stream:
        """Build (``api.build`` arguments), delivering Docker's progress lines."""

        def source(client: Any) -> Iterable[Any]:
            return raise_on_error_line(client.api.build(decode=True, rm=True, forcerm=True, **kwargs), "build", "")

        return self.pool.stream(source, on_line, what="image")


#: A Dockerfile larger than this is not one we should echo back.
MAX_DOCKERFILE_BYTES = 1024 * 1024


def dockerfile_document(paths: PathPolicy, context_path: str, name: str, generate: bool) -> dict[str, Any]:
    """
    In a thread: the Dockerfile ``name`` of ``context_path`` as the seed's
    ``/docker/dockerfile`` answers it, read through the path policy (a link
    swapped in cannot redirect the read); without one, a suggestion when
    ``generate``, else ``NotFound``.
    """
    context_real = paths.resolve(context_path, "context_path")
    if not os.path.isdir(context_real):
        raise errors.NotFound("context_path not found", f"{context_path} is not a directory")
    path = paths.resolve(os.path.join(context_real, name), "dockerfile")
    try:
        _, data = paths.read_file(path, MAX_DOCKERFILE_BYTES, "dockerfile")
    except errors.TooLarge:
        raise errors.TooLarge("dockerfile too large", f"the limit is {MAX_DOCKERFILE_BYTES} bytes") from None
    except errors.NotFound:
        data = None
    if data is not None:
        return {"exists": True, "generated": False, "path": path, "dockerfile": data.decode("utf-8", "replace")}
    if not generate:
        raise errors.NotFound("dockerfile not found", f"{path} does not exist; send generate: true for a suggestion")
    kind, text = generate_dockerfile(set(os.listdir(context_real)))
    return {"exists": False, "generated": True, "kind": kind, "path": path, "dockerfile": text}


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
