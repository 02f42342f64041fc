"""
File Operations (seed: /files/write, /files/read, /files/exists,
/files/mkdir, /files/delete): thin routes over ``plexagent.host.files.paths``.

Every path goes through the one ``PathPolicy``; the file work runs in a
thread so the reactor never waits on a disk.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import re
from typing import Any

from klein import Klein
from twisted.internet import threads

from plexagent import errors
from plexagent.host.files.paths import PathPolicy
from plexagent.http import responses

_OCTAL = re.compile("[0-7]{1,4}")


def path_policy(context: Any) -> PathPolicy:
    """The shared policy (built by service.py), or one from the config."""
    policy = context.services.get("paths")
    if policy is None:
        policy = context.services["paths"] = PathPolicy(context.config.agent_api.allowed_paths)
    return policy


def parse_mode(value: object, default: int, field: str = "mode") -> int:
    """
    A permission mode from the seed's ``644`` (digits read as octal) or a
    string such as ``"0644"``/``"644"``/``"0o644"``; at most 0777.
    """
    if value is None:
        return default
    if isinstance(value, bool):
        raise errors.InvalidInput(f"invalid {field}", f"{field} must be octal digits such as 644 or \"0644\"")
    text = str(value) if isinstance(value, int) else value
    if not isinstance(text, str):
        raise errors.InvalidInput(f"invalid {field}", f"{field} must be octal digits such as 644 or \"0644\"")
    digits = text[2:] if text[:2] in ("0o", "0O") else text
    if not _OCTAL.fullmatch(digits):
        raise errors.InvalidInput(f"invalid {field}", f"{field} must be octal digits such as 644 or \"0644\", got {value!r}")
    mode = int(digits, 8)
    if mode > 0o777:
        raise errors.InvalidInput(f"invalid {field}", f"{field} may not set setuid, setgid or sticky bits")
    return mode


def query_arg(request: Any, name: str, required: bool = True) -> str | None:
    values = request.args.get(name.encode("ascii"))
    if not values:
        if required:
            raise errors.InvalidInput(f"{name} is required", f"pass {name} as a query parameter")
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise errors.InvalidInput(f"invalid {name}", f"{name} must be UTF-8") from None


def read_json_object(request: Any) -> dict[str, Any]:
    """The body as a JSON object (the route's body limit applied before it was read)."""
    body = responses.read_json(request)
    if not isinstance(body, dict):
        raise errors.InvalidInput("invalid JSON body", "the body must be a JSON object")
    return body


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def register(app: Klein, context: Any) -> None:
    policy = path_policy(context)
    aapi = context.config.agent_api
    reactor = context.reactor

    def in_thread(f: Any, *args: Any, **kwargs: Any) -> Any:
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args, **kwargs)

    # The file's content is in the JSON body (base64 or text), parsed whole:
    # max_json_bytes bounds it (larger files go through /upload/tar/stream).
    context.limit_body(b"POST", b"/files/write", aapi.max_json_bytes)

    @app.route("/files/write", methods=["POST"])
    async def write(request: Any) -> bytes:
        body = read_json_object(request)
        path = body.get("path")
        content = body.get("content")
        if not isinstance(content, str):
            raise errors.InvalidInput("content is required", "content must be a string")
        encoding = body.get("encoding", "utf-8")
        if encoding == "base64":
            try:
                data = base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError):
                raise errors.InvalidInput("invalid content", "content is not valid base64") from None
        elif encoding in ("utf-8", "utf8", None):
            data = content.encode("utf-8", "surrogatepass")
        else:
            raise errors.InvalidInput("invalid encoding", "encoding must be \"utf-8\" or \"base64\"")
        mode = parse_mode(body.get("mode"), 0o644)
        policy.resolve(path)  # refuse before any thread work
        real, size = await in_thread(policy.write_file, path, data, mode)
        return responses.respond(request, {"success": True, "path": real, "size": size, "mode": f"{mode:04o}"})

    @app.route("/files/read", methods=["GET"])
    async def read(request: Any) -> bytes:
        path = query_arg(request, "path")
        encoding = query_arg(request, "encoding", required=False) or "utf-8"
        if encoding not in ("utf-8", "utf8", "base64"):
            raise errors.InvalidInput("invalid encoding", "encoding must be \"utf-8\" or \"base64\"")
        policy.resolve(path)
        real, data = await in_thread(policy.read_file, path, aapi.max_read_bytes)
        if encoding == "base64":
            return responses.respond(request, {"path": real, "content": base64.b64encode(data).decode("ascii"),
                                         "size": len(data), "encoding": "base64"})
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise errors.InvalidInput("file is not valid UTF-8", f"{path}: read it with ?encoding=base64") from None
        return responses.respond(request, {"path": real, "content": text, "size": len(data)})

    @app.route("/files/exists", methods=["GET"])
    async def exists(request: Any) -> bytes:
        path = query_arg(request, "path")
        policy.resolve(path)
        info = await in_thread(policy.stat, path)
        if info is None:
            return responses.respond(request, {"exists": False, "path": path})
        return responses.respond(request, {
            "exists": True,
            "path": info.path,
            "size": info.size,
            "modified": _iso(info.modified),
            "type": info.kind,
            "mode": f"{info.mode:04o}",
        })

    @app.route("/files/mkdir", methods=["POST"])
    async def mkdir(request: Any) -> bytes:
        body = read_json_object(request)
        path = body.get("path")
        mode = parse_mode(body.get("mode"), 0o755)
        policy.resolve(path)
        real, created = await in_thread(policy.make_directory, path, mode)
        return responses.respond(request, {"success": True, "path": real, "created": created, "mode": f"{mode:04o}"},
                           201 if created else 200)

    @app.route("/files/delete", methods=["POST"])
    async def delete(request: Any) -> bytes:
        body = read_json_object(request)
        path = body.get("path")
        recursive = body.get("recursive", False)
        if not isinstance(recursive, bool):
            raise errors.InvalidInput("invalid recursive", "recursive must be true or false")
        policy.resolve_entry(path)
        real, kind = await in_thread(policy.delete, path, recursive)
        return responses.respond(request, {"success": True, "path": real, "deleted": kind})
