"""
Health & Monitoring (``/ping``) and Container Management (``/containers``)
of the Node Agent API: thin routes over ``host.docker.facade.DockerFacade``,
and ``/containers/<n>/replace|rollback`` over ``host.docker.replace.Replacer``.
"""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.internet import defer
from twisted.web.iweb import IRequest

from plexagent import __version__, errors
from plexagent.host.docker.health import assess
from plexagent.host.docker.recreate import parse_replace, parse_rollback
from plexagent.host.docker.specs import parse_bool_arg, parse_command, parse_int_arg, parse_run
from plexagent.host.files.paths import PathPolicy
from plexagent.http import responses
from plexagent.http.streaming import arg, json_object, stream_response

#: The logs a client gets when it does not say ``tail``.
DEFAULT_TAIL = 100

#: The longest ``timeout`` of stop and restart, in seconds. Docker's client
#: waits that long plus its own timeout; an unbounded one overflowed the
#: socket timeout (a 500).
MAX_STOP_TIMEOUT = 3600


def _tail(request: IRequest) -> int | str:
    raw = arg(request, "tail")
    if raw is not None and raw.lower() == b"all":
        return "all"
    return parse_int_arg(raw, "tail", DEFAULT_TAIL)


def register(app: Klein, context: Any) -> None:
    docker = context.services["docker"]
    reactor = context.reactor
    paths = PathPolicy(context.config.agent_api.allowed_paths)

    @app.route("/ping", methods=["GET", "HEAD"])
    async def ping(request: IRequest) -> bytes:
        alive = await docker.ping()
        return responses.respond(
            request, {"status": "ok" if alive else "degraded", "version": __version__, "docker": alive}
        )

    @app.route("/containers", methods=["GET"])
    async def list_containers(request: IRequest) -> bytes:
        return responses.respond(request, {"containers": await docker.list_containers()})

    @app.route("/containers/run", methods=["POST"])
    async def run(request: IRequest) -> bytes:
        # Parsed (and volume paths checked) before Docker is asked anything.
        kwargs = parse_run(json_object(request), paths)
        return responses.respond(request, await docker.run(kwargs), 201)

    @app.route("/containers/all/health", methods=["GET"])
    async def all_health(request: IRequest) -> bytes:
        infos = await docker.inspect_all()
        documents = await defer.gatherResults([defer.ensureDeferred(assess(reactor, i)) for i in infos])
        health = {doc["name"]: doc for doc in documents}
        return responses.respond(
            request,
            {
                "containers": health,
                "total": len(health),
                "healthy": sum(1 for d in documents if d["healthy"]),
                "unhealthy": sum(1 for d in documents if not d["healthy"]),
            },
        )

    @app.route("/containers/<n>/start", methods=["POST"])
    async def start(request: IRequest, n: str) -> bytes:
        return responses.respond(request, await docker.act(n, "start"))

    @app.route("/containers/<n>/stop", methods=["POST"])
    async def stop(request: IRequest, n: str) -> bytes:
        timeout = parse_int_arg(arg(request, "timeout"), "timeout", 10, maximum=MAX_STOP_TIMEOUT)
        return responses.respond(request, await docker.act(n, "stop", timeout=timeout))

    @app.route("/containers/<n>/restart", methods=["POST"])
    async def restart(request: IRequest, n: str) -> bytes:
        timeout = parse_int_arg(arg(request, "timeout"), "timeout", 10, maximum=MAX_STOP_TIMEOUT)
        return responses.respond(request, await docker.act(n, "restart", timeout=timeout))

    @app.route("/containers/<n>/remove", methods=["POST", "DELETE"])
    async def remove(request: IRequest, n: str) -> bytes:
        force = parse_bool_arg(arg(request, "force"), "force")
        volumes = parse_bool_arg(arg(request, "volumes"), "volumes")
        return responses.respond(request, await docker.act(n, "remove", force=force, volumes=volumes))

    @app.route("/containers/<n>/status", methods=["GET"])
    async def status(request: IRequest, n: str) -> bytes:
        return responses.respond(request, await docker.status(n))

    @app.route("/containers/<n>/health", methods=["GET"])
    async def health(request: IRequest, n: str) -> bytes:
        info = await docker.inspect(n)
        return responses.respond(request, await assess(reactor, info))

    @app.route("/containers/<n>/inspect", methods=["GET"])
    async def inspect(request: IRequest, n: str) -> bytes:
        return responses.respond(request, await docker.inspect(n))

    @app.route("/containers/<n>/logs", methods=["GET"])
    def logs(request: IRequest, n: str) -> Any:
        tail = _tail(request)
        if parse_bool_arg(arg(request, "follow"), "follow"):
            return defer.ensureDeferred(_follow(request, n, tail))

        async def whole() -> bytes:
            text = await docker.logs(n, tail)
            return responses.respond(request, {"container": n, "tail": tail, "logs": text})

        return defer.ensureDeferred(whole())

    async def _follow(request: IRequest, n: str, tail: int | str) -> Any:
        # Ask Docker first, so a missing container is a 404, not an empty stream.
        await docker.inspect(n)
        return await stream_response(
            request,
            lambda on_chunk: docker.follow_logs(n, tail, on_chunk),
            b"text/plain; charset=utf-8",
            lambda chunk: chunk,
        )

    @app.route("/containers/<n>/exec", methods=["POST"])
    async def exec_(request: IRequest, n: str) -> bytes:
        body = json_object(request)
        command = parse_command(body.get("command", body.get("cmd")))
        if command is None:
            raise errors.InvalidInput("command is required", "command must be a string or a list of strings")
        if isinstance(command, str):
            # A string is a shell command line, as users type it.
            command = ["/bin/sh", "-c", command]
        user = body.get("user") or ""
        workdir = body.get("workdir", body.get("working_dir")) or None
        for field, value in (("user", user), ("workdir", workdir)):
            if value is not None and not isinstance(value, str):
                raise errors.InvalidInput(f"invalid {field}", f"{field} must be a string")
        return responses.respond(request, await docker.exec(n, command, user, workdir))

    replacer = context.services["replacer"]

    @app.route("/containers/<n>/replace", methods=["POST"])
    async def replace(request: IRequest, n: str) -> bytes:
        image, environment, health_timeout, stop_timeout = parse_replace(json_object(request))
        return responses.respond(request, await replacer.replace(n, image, environment, health_timeout, stop_timeout))

    @app.route("/containers/<n>/rollback", methods=["POST"])
    async def rollback(request: IRequest, n: str) -> bytes:
        body = json_object(request) if responses.read_body(request) else {}
        health_timeout, stop_timeout = parse_rollback(body)
        return responses.respond(request, await replacer.rollback(n, health_timeout, stop_timeout))
