"""Scheduled Tasks (Cron) of the Node Agent API: thin routes over ``cron.CronScheduler``."""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest

from plexagent import errors
from plexagent.host import cron
from plexagent.host.files.paths import PathPolicy
from plexagent.http import responses


def register(app: Klein, context: Any) -> None:
    scheduler = context.services["cron"]
    paths = PathPolicy(context.config.agent_api.allowed_paths)

    @app.route("/cron/jobs", methods=["GET"])
    def cron_jobs(request: IRequest) -> bytes:
        return responses.respond(request, {"jobs": scheduler.list()})

    @app.route("/cron/run-docker", methods=["POST"])
    def cron_run_docker(request: IRequest) -> bytes:
        fields = cron.parse_job(responses.read_json(request), paths)
        job = scheduler.add(fields)
        return responses.respond(request, {"success": True, "job_id": job.id, "job": scheduler.document(job)}, 201)

    @app.route("/cron/remove", methods=["POST", "DELETE"])
    def cron_remove(request: IRequest) -> bytes:
        body = responses.read_json(request)
        if not isinstance(body, dict):
            raise errors.InvalidInput("invalid body", "the body must be a JSON object with job_id")
        job = scheduler.remove(body.get("job_id"))
        return responses.respond(request, {"success": True, "job_id": job.id, "removed": True})
