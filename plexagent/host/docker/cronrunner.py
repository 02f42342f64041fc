"""
Cron runs in Docker: each run is a container started from the job's image
(its bind mounts checked first), polled until it exits or times out, and
removed; leftovers of runs a crash interrupted are removed at start.
"""

from __future__ import annotations

import datetime
import time
import uuid
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from plexagent import errors
from plexagent.host.cron import CronJob
from plexagent.host.docker.binds import BIND_LABEL, bind_label, start_checked
from plexagent.host.files.paths import PathPolicy

log = Logger()


class DockerCronRunner:
    """
    Runs a job as a container on the Docker pool: create (with its
    networks, environment and volumes), start, poll until it exits (on the
    clock, so no pool thread waits for a long job), then remove it.

    The job's volumes were checked when it was added, but each run binds
    them afresh: every run checks them again against ``paths`` right before
    the start (``binds.start_checked``), and is refused if one now
    resolves outside the allowed paths.
    """

    def __init__(self, pool: Any, clock: Any, poll_interval: float = 2.0, timeout: float = 3600.0,
                 paths: PathPolicy | None = None) -> None:
        self.pool = pool
        self.paths = paths if paths is not None else PathPolicy(())
        self.clock = clock
        self.poll_interval = poll_interval
        self.timeout = timeout
        self._stopping = False
        self._pauses: set[defer.Deferred[None]] = set()

    def run(self, job: CronJob) -> defer.Deferred[int]:
        return defer.ensureDeferred(self._run(job))

    def remove_leftovers(self, job_ids: list[str]) -> defer.Deferred[list[str]]:
        """Remove the finished containers of these jobs' earlier runs; their ids."""
        return self.pool.call(_remove_finished, job_ids)

    def running_leftovers(self, job_ids: list[str]) -> defer.Deferred[list[tuple[str, str, float]]]:
        """(job id, container id, start time) of these jobs' runs still going from before a restart."""
        return self.pool.call(_still_running, job_ids)

    def adopt(self, container_id: str, started: float) -> defer.Deferred[int]:
        """Follow a run started before a restart as if this agent had started it: bounded, then removed."""
        return defer.ensureDeferred(self._follow(container_id, container_id[:12], started + self.timeout))

    async def _run(self, job: CronJob) -> int:
        name = f"plexagent-cron-{job.id}-{uuid.uuid4().hex[:6]}"
        container_id = await self.pool.call(_start_container, job, name, self.paths, what="image")
        return await self._follow(container_id, name, self.clock.seconds() + self.timeout)

    async def _follow(self, container_id: str, name: str, deadline: float) -> int:
        try:
            while True:
                state = await self.pool.call(_container_state, container_id)
                if state["Status"] in ("exited", "dead"):
                    code = int(state.get("ExitCode", -1))
                    break
                if self.clock.seconds() >= deadline:
                    raise errors.Unavailable(
                        "cron run timed out",
                        f"the container ran longer than {self.timeout:g} seconds (cron.run_timeout) and was removed",
                    )
                await self._pause()
        except _Stopping:
            # Leave the container to finish its work: the next start removes it.
            raise errors.Unavailable(
                "the agent stopped during the run", f"container {name} is removed once it has finished"
            ) from None
        except BaseException:
            await self.pool.call(_remove_container, container_id)
            raise
        await self.pool.call(_remove_container, container_id)
        return code

    async def _pause(self) -> None:
        if self._stopping:
            raise _Stopping()
        d = task.deferLater(self.clock, self.poll_interval, lambda: None)
        self._pauses.add(d)
        try:
            await d
        except defer.CancelledError:
            raise _Stopping() from None
        finally:
            self._pauses.discard(d)

    def stop(self) -> None:
        """Stop following runs (the agent is stopping); their containers keep running."""
        self._stopping = True
        for d in list(self._pauses):
            d.cancel()


class _Stopping(Exception):
    pass


def _start_container(client: Any, job: CronJob, name: str, paths: PathPolicy) -> str:
    networks = list(job.networks)
    kwargs: dict[str, Any] = {
        "name": name,
        "environment": job.environment or None,
        "volumes": job.volumes or None,
        "labels": {"plexagent.cron-job": job.id, BIND_LABEL: bind_label(job.volumes or {})},
        "detach": True,
    }
    if networks:
        kwargs["network"] = networks[0]
    container = client.containers.create(job.image, job.command, **kwargs)
    try:
        for network in networks[1:]:
            client.api.connect_container_to_network(container.id, network)
        start_checked(client, container.id, paths)
    except Exception:
        container.remove(force=True)
        raise
    return container.id


def _container_state(client: Any, container_id: str) -> dict[str, Any]:
    return client.api.inspect_container(container_id)["State"]


def _remove_container(client: Any, container_id: str) -> None:
    import docker.errors

    try:
        client.api.remove_container(container_id, force=True, v=True)
    except docker.errors.NotFound:
        pass


def _still_running(client: Any, job_ids: list[str]) -> list[tuple[str, str, float]]:
    wanted = set(job_ids)
    running = []
    for c in client.api.containers(filters={"label": "plexagent.cron-job", "status": "running"}):
        job_id = (c.get("Labels") or {}).get("plexagent.cron-job")
        if job_id in wanted:
            started = client.api.inspect_container(c["Id"])["State"].get("StartedAt", "")
            running.append((job_id, c["Id"], _epoch(started) or time.time()))
    return running


def _epoch(text: str) -> float | None:
    """Docker's RFC 3339 time (nanoseconds, ``Z``) as epoch seconds."""
    head, _, rest = text.partition(".")
    try:
        moment = datetime.datetime.strptime(head.rstrip("Z"), "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return None
    fraction = rest.rstrip("Z")[:6]
    micro = int(fraction.ljust(6, "0")) if fraction.isdigit() else 0
    return moment.replace(tzinfo=datetime.timezone.utc, microsecond=micro).timestamp()


def _remove_finished(client: Any, job_ids: list[str]) -> list[str]:
    import docker.errors

    wanted = set(job_ids)
    removed = []
    for c in client.api.containers(all=True, filters={"label": "plexagent.cron-job"}):
        if (c.get("Labels") or {}).get("plexagent.cron-job") in wanted and c.get("State") in ("exited", "dead", "created"):
            try:
                client.api.remove_container(c["Id"], force=True, v=True)
                removed.append(c["Id"])
            except docker.errors.NotFound:
                pass
    return removed
