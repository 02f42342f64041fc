"""
Docker Images of the Node Agent API: ``/images/list|pull|tag|load|cleanup``,
and Docker's disk usage, ``/system/df`` (``host.docker.janitor``).
"""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest

from plexagent import errors
from plexagent.host.docker.cleanup import CleanupOptions, parse_cleanup_options
from plexagent.host.docker.specs import optional_str, parse_bool_arg, require_str, split_image
from plexagent.http import responses
from plexagent.http.bodies import ImageTarSink
from plexagent.http.streaming import NDJSON, arg, json_object, ndjson, stream_response

#: The body limit of ``POST /images/cleanup``: a handful of small fields.
CLEANUP_BODY_LIMIT = 16 * 1024

#: Registry names meaning Docker Hub: an image there needs no prefix.
DOCKER_HUB = ("", "docker.io", "index.docker.io", "registry-1.docker.io", "https://index.docker.io/v1/")


def pull_request(body: dict[str, Any]) -> tuple[str, str, dict[str, str] | None]:
    """(repository, tag, auth_config) of a pull body."""
    image = require_str(body, "image")
    registry = (optional_str(body, "registry") or "").strip().rstrip("/")
    for scheme in ("https://", "http://"):
        if registry.startswith(scheme):
            registry = registry[len(scheme):]
    if registry not in DOCKER_HUB and not image.startswith(registry + "/"):
        image = f"{registry}/{image}"
    repository, tag = split_image(image)
    username = optional_str(body, "username")
    password = optional_str(body, "password")
    auth = None
    if username or password:
        if not (username and password):
            raise errors.InvalidInput("username and password go together", "send both or neither")
        auth = {"username": username, "password": password, "serveraddress": registry or "docker.io"}
    return repository, tag or "latest", auth


def register(app: Klein, context: Any) -> None:
    docker = context.services["docker"]

    @app.route("/images/list", methods=["GET"])
    async def list_images(request: IRequest) -> bytes:
        raw = arg(request, "prefix")
        prefix = raw.decode("utf-8", "replace") if raw else None
        return responses.respond(request, {"images": await docker.list_images(prefix)})

    @app.route("/images/pull", methods=["POST"])
    async def pull(request: IRequest) -> Any:
        repository, tag, auth = pull_request(json_object(request))
        reference = f"{repository}@{tag}" if tag.startswith("sha256:") else f"{repository}:{tag}"
        if parse_bool_arg(arg(request, "stream"), "stream"):
            return await stream_response(
                request,
                lambda on_line: docker.pull(repository, tag, auth, on_line),
                NDJSON,
                ndjson,
                trailer=lambda: {"status": "complete", "image": reference},
            )
        lines: list[dict[str, Any]] = []
        await docker.pull(repository, tag, auth, lines.append).done
        info = await docker.image_info(reference)
        statuses = [line["status"] for line in lines if isinstance(line, dict) and "status" in line]
        return responses.respond(
            request,
            {"success": True, "image": reference, **info, "status": statuses[-1] if statuses else ""},
        )

    @app.route("/images/tag", methods=["POST"])
    async def tag(request: IRequest) -> bytes:
        body = json_object(request)
        source = body.get("source_image", body.get("source"))
        target = body.get("target_image", body.get("target"))
        source = require_str({"source_image": source}, "source_image")
        target = require_str({"target_image": target}, "target_image")
        repository, target_tag = split_image(target)
        return responses.respond(request, await docker.tag(source, repository, target_tag or "latest"))

    hygiene = context.services["image_hygiene"]
    context.limit_body(b"POST", b"/images/cleanup", CLEANUP_BODY_LIMIT)

    @app.route("/images/cleanup", methods=["POST"])
    async def cleanup(request: IRequest) -> bytes:
        all_unused = parse_bool_arg(arg(request, "all"), "all")
        if responses.read_body(request):
            if arg(request, "all") is not None:
                raise errors.InvalidInput("all goes without a body",
                                          "with a body, send \"keep_last\": 0 to remove every unused image")
            options = parse_cleanup_options(json_object(request))
        else:
            # The seed's form: dangling images, or every unused one.
            options = CleanupOptions(keep_last=0 if all_unused else None)
        return responses.respond(request, await hygiene.cleanup(options))

    @app.route("/system/df", methods=["GET"])
    async def disk_usage(request: IRequest) -> bytes:
        return responses.respond(request, await hygiene.disk_usage())

    register_load(app, context, "/images/load")


def register_load(app: Any, context: Any, path: str) -> None:
    """Route ``POST path`` as an image load with a streamed body."""
    docker = context.services["docker"]
    reactor = context.reactor
    limit = context.config.agent_api.max_upload_bytes

    context.stream_body(b"POST", path.encode("ascii"),
                        lambda request, length: ImageTarSink(request, length, docker.load, reactor, limit))
    context.limit_body(b"POST", path.encode("ascii"), limit)

    async def load(request: Any) -> bytes:
        sink = request.content
        if not isinstance(sink, ImageTarSink):
            raise errors.InvalidInput("the image tar is empty", "send the output of docker save as the body")
        return responses.respond(request, await sink.finish())

    app.route(path, methods=["POST"], endpoint=f"load:{path}")(load)
