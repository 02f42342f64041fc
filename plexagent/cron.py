"""
Scheduled tasks (seed "Scheduled Tasks (Cron)"): a scheduler inside the
agent, on the reactor's clock, whose every run starts a container through
the Docker pool and removes it afterwards.

- Schedules are cron expressions parsed by croniter, evaluated in UTC.
- Jobs live in ``<node.data_dir>/cron-jobs.json`` (atomic, durable writes)
  and are reloaded on start, each scheduled for its next time *after now*:
  runs missed while the agent was down are not replayed, and a timer that
  fires late (a suspended host, a blocked reactor) runs once, not once per
  missed slot.
- A job whose previous run is still going is not started again: that slot
  is skipped (and counted).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shlex
import uuid
from typing import Any, Callable, Protocol

import attrs
from croniter import croniter
from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from plexagent import errors
from plexagent.dockerbinds import BIND_LABEL, bind_label, start_checked
from plexagent.dockerspec import parse_command, parse_environment, parse_volumes
from plexagent.fileio import atomic_write, ensure_private_dir
from plexagent.paths import PathPolicy

log = Logger()

JOBS_FILE = "cron-jobs.json"
_NETWORK = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")
_IMAGE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.:/@-]{0,511}$")


def iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def validate_schedule(schedule: Any) -> str:
    """A 5-field cron expression (or ``@daily`` and friends); 400 otherwise."""
    if not isinstance(schedule, str) or not schedule.strip():
        raise errors.InvalidInput("schedule is required", "schedule must be a cron expression such as \"0 2 * * *\"")
    text = " ".join(schedule.split())
    fields = text.split(" ")
    if not (text.startswith("@") or len(fields) == 5) or not croniter.is_valid(text):
        raise errors.InvalidInput(
            "invalid schedule", f"schedule {schedule!r} is not a cron expression (minute hour day month weekday)"
        )
    return text


def next_time(schedule: str, after: float) -> float:
    """The first time strictly after ``after`` (epoch seconds, UTC) that ``schedule`` names."""
    start = _dt.datetime.fromtimestamp(after, _dt.timezone.utc)
    return float(croniter(schedule, start).get_next(float))


@attrs.define
class CronJob:
    id: str
    schedule: str
    image: str
    command: Any = None  # list of strings, a string, or None (the image's CMD)
    environment: dict[str, str] = attrs.field(factory=dict)
    volumes: dict[str, dict[str, str]] = attrs.field(factory=dict)
    networks: list[str] = attrs.field(factory=list)
    created: float = 0.0
    last_run: float | None = None
    last_exit_code: int | None = None
    last_error: str | None = None

    def to_record(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "CronJob":
        names = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})

    def command_line(self) -> str:
        """What the job does, as a ``docker run`` line (no environment values: they may be secret)."""
        argv = ["docker", "run", "--rm"]
        for network in self.networks:
            argv += ["--network", network]
        for source, target in self.volumes.items():
            argv += ["-v", f"{source}:{target['bind']}:{target.get('mode', 'rw')}"]
        argv.append(self.image)
        if isinstance(self.command, list):
            argv += self.command
        elif isinstance(self.command, str):
            argv += shlex.split(self.command)
        return shlex.join(argv)


def parse_job(body: Any, policy: PathPolicy) -> dict[str, Any]:
    """The ``/cron/run-docker`` body as CronJob fields; 400 naming the bad field."""
    if not isinstance(body, dict):
        raise errors.InvalidInput("invalid body", "the body must be a JSON object")
    schedule = validate_schedule(body.get("schedule"))
    image = body.get("image")
    if not isinstance(image, str) or not image:
        raise errors.InvalidInput("image is required", "image must be an image reference such as myapp:latest")
    if not _IMAGE.match(image):
        raise errors.InvalidInput("invalid image", f"image {image!r} is not an image reference")
    command = parse_command(body.get("command"))
    environment = parse_environment(body.get("environment"))
    volumes = parse_volumes(body.get("volumes"), policy)
    networks = body.get("networks")
    if networks is None:
        networks = [body["network"]] if isinstance(body.get("network"), str) else []
    if not isinstance(networks, list) or not all(isinstance(n, str) and _NETWORK.match(n) for n in networks):
        raise errors.InvalidInput("invalid networks", "networks must be a list of network names")
    return {
        "schedule": schedule,
        "image": image,
        "command": command,
        "environment": environment,
        "volumes": volumes,
        "networks": list(dict.fromkeys(networks)),
    }


class CronRunner(Protocol):
    def run(self, job: CronJob) -> defer.Deferred[int]:
        """Run ``job`` once; fires with the container's exit code."""


class CronScheduler(service.Service):
    """The cron jobs of one agent, persisted, each timed on ``clock``."""

    def __init__(
        self,
        data_dir: str,
        clock: Any,
        runner: CronRunner,
        max_jobs: int = 100,
        id_factory: Callable[[], str] | None = None,
    ) -> None:
        self.setName("cron")
        self.data_dir = data_dir
        self.path = os.path.join(data_dir, JOBS_FILE)
        self.clock = clock
        self.runner = runner
        self.max_jobs = max_jobs
        self._new_id = id_factory or (lambda: "cron_" + uuid.uuid4().hex[:12])
        self.jobs: dict[str, CronJob] = {}
        self._timers: dict[str, Any] = {}
        self._next: dict[str, float] = {}
        #: job id -> the Deferred of its run in progress
        self.in_progress: dict[str, defer.Deferred[None]] = {}
        self.runs_started = 0
        self.runs_succeeded = 0
        self.runs_failed = 0
        self.runs_skipped = 0

    # -- persistence -------------------------------------------------------

    def load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                document = json.loads(f.read())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            raise SystemExit(f"plexagent: node.data_dir: {self.path}: cannot read the cron jobs ({e})")
        for record in document.get("jobs", []):
            job = CronJob.from_record(record)
            self.jobs[job.id] = job

    def _save(self) -> None:
        ensure_private_dir(self.data_dir)
        document = {"version": 1, "jobs": [job.to_record() for job in self.jobs.values()]}
        atomic_write(self.path, json.dumps(document, indent=1, sort_keys=True).encode("utf-8"))

    # -- service -----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.load()
        for job in self.jobs.values():
            self._schedule(job)
        # Containers of runs that ended while the agent was down (it stopped
        # mid-run and never removed them).
        self.leftovers_removed: defer.Deferred[Any] = defer.succeed(None)
        remove = getattr(self.runner, "remove_leftovers", None)
        if remove is not None and self.jobs:
            d = defer.maybeDeferred(remove, sorted(self.jobs))
            d.addErrback(lambda f: log.warn("cannot remove finished cron containers: {why}", why=f.getErrorMessage()))
            self.leftovers_removed = d

    def stopService(self) -> Any:
        super().stopService()
        stop = getattr(self.runner, "stop", None)
        if stop is not None:
            stop()
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        self._next.clear()

    # -- jobs --------------------------------------------------------------

    def add(self, fields: dict[str, Any]) -> CronJob:
        if len(self.jobs) >= self.max_jobs:
            raise errors.Conflict("too many cron jobs", f"at most {self.max_jobs} jobs (cron.max_jobs); remove one first")
        job = CronJob(id=self._new_id(), created=self.clock.seconds(), **fields)
        self.jobs[job.id] = job
        try:
            self._save()
        except errors.PlexError:
            del self.jobs[job.id]
            raise
        if self.running:
            self._schedule(job)
        return job

    def remove(self, job_id: Any) -> CronJob:
        if not isinstance(job_id, str) or not job_id:
            raise errors.InvalidInput("job_id is required", "job_id must be the id of a cron job")
        job = self.jobs.get(job_id)
        if job is None:
            raise errors.NotFound("cron job not found", f"no cron job has the id {job_id}")
        del self.jobs[job_id]
        try:
            self._save()
        except errors.PlexError:
            self.jobs[job_id] = job
            raise
        timer = self._timers.pop(job_id, None)
        if timer is not None and timer.active():
            timer.cancel()
        self._next.pop(job_id, None)
        return job

    def document(self, job: CronJob) -> dict[str, Any]:
        return {
            "id": job.id,
            "schedule": job.schedule,
            "command": job.command_line(),
            "image": job.image,
            "networks": list(job.networks),
            "created": iso(job.created),
            "last_run": iso(job.last_run),
            "last_exit_code": job.last_exit_code,
            "last_error": job.last_error,
            "next_run": iso(self._next.get(job.id)),
            "running": job.id in self.in_progress,
        }

    def list(self) -> list[dict[str, Any]]:
        return [self.document(job) for job in sorted(self.jobs.values(), key=lambda j: (j.created, j.id))]

    # -- timing ------------------------------------------------------------

    def _schedule(self, job: CronJob) -> None:
        if not self.running:
            return
        now = self.clock.seconds()
        when = next_time(job.schedule, now)
        self._next[job.id] = when
        self._timers[job.id] = self.clock.callLater(max(0.0, when - now), self._due, job.id)

    def _due(self, job_id: str) -> None:
        self._timers.pop(job_id, None)
        job = self.jobs.get(job_id)
        if job is None:
            return
        # The next slot is counted from now: a late timer runs once.
        self._schedule(job)
        self.run_now(job_id)

    def run_now(self, job_id: str) -> defer.Deferred[None]:
        """Start a run of ``job_id`` unless one is going (then that run's Deferred)."""
        job = self.jobs[job_id]
        if job_id in self.in_progress:
            self.runs_skipped += 1
            log.info("cron job {id}: previous run still going, this run is skipped", id=job_id)
            return self.in_progress[job_id]
        self.runs_started += 1
        job.last_run = self.clock.seconds()
        d = defer.maybeDeferred(self.runner.run, job)
        finished: defer.Deferred[None] = defer.Deferred()
        self.in_progress[job_id] = finished

        def done(code: int) -> None:
            job.last_exit_code = code
            job.last_error = None
            if code == 0:
                self.runs_succeeded += 1
            else:
                self.runs_failed += 1

        def failed(failure: Any) -> None:
            self.runs_failed += 1
            job.last_exit_code = None
            value = failure.value
            if isinstance(value, errors.PlexError):
                job.last_error = value.message + (f": {value.details}" if value.details else "")
            else:
                job.last_error = "the run failed"
                log.failure("cron job {id} failed", failure, id=job_id)

        def settle(_: Any) -> None:
            del self.in_progress[job_id]
            if job_id in self.jobs:
                try:
                    self._save()
                except errors.PlexError as e:
                    log.error("cron job {id}: cannot record its run: {why}", id=job_id, why=e.details)
            finished.callback(None)

        d.addCallbacks(done, failed)
        d.addBoth(settle)
        return finished


class DockerCronRunner:
    """
    Runs a job as a container on the Docker pool: create (with its
    networks, environment and volumes), start, poll until it exits (on the
    clock, so no pool thread waits for a long job), then remove it.

    The job's volumes were checked when it was added, but each run binds
    them afresh: every run checks them again against ``paths`` right before
    the start (``dockerbinds.start_checked``), and is refused if one now
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

    async def _run(self, job: CronJob) -> int:
        name = f"plexagent-cron-{job.id}-{uuid.uuid4().hex[:6]}"
        container_id = await self.pool.call(_start_container, job, name, self.paths, what="image")
        try:
            deadline = self.clock.seconds() + self.timeout
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
