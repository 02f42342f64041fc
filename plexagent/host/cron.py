"""
Scheduled tasks (seed "Scheduled Tasks (Cron)"): a scheduler inside the
agent, on the reactor's clock, whose every run starts a container through
the Docker pool and removes it afterwards.

- Schedules are cron expressions parsed by croniter, evaluated in UTC.
- A schedule with no next time (``0 0 31 2 *``: valid syntax, never fires)
  is refused like any invalid one.
- Jobs live in ``<node.data_dir>/cron-jobs.json`` (atomic, durable writes)
  and are reloaded on start, each checked as strictly as a new job (a job
  that fails is set aside in ``cron-jobs.json.quarantined-<UTC time>``, the
  others load) and scheduled for its next time *after now*:
  runs missed while the agent was down are not replayed, and a timer that
  fires late (a suspended host, a blocked reactor) runs once, not once per
  missed slot.
- A job whose previous run is still going is not started again: that slot
  is skipped (and counted).
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import os
import re
import shlex
import time
import uuid
from typing import Any, Callable, Protocol, Sequence

import attrs
from croniter import croniter
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from plexagent import errors
from plexagent.fileio import (
    Unencodable,
    atomic_write,
    encode_json,
    ensure_private_dir,
    read_stored,
    set_aside,
    set_aside_records,
)
from plexagent.host.docker.specs import parse_command, parse_environment, parse_volumes
from plexagent.host.files.paths import PathPolicy

log = Logger()

JOBS_FILE = "cron-jobs.json"
_NETWORK = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}")
_IMAGE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.:/@-]{0,511}")
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def validate_schedule(schedule: Any, now: float | None = None) -> str:
    """
    A 5-field cron expression (or ``@daily`` and friends) that fires at
    some time after ``now`` (default: the current time); 400 otherwise.
    """
    if not isinstance(schedule, str) or not schedule.strip():
        raise errors.InvalidInput("schedule is required", "schedule must be a cron expression such as \"0 2 * * *\"")
    text = " ".join(schedule.split())
    fields = text.split(" ")
    if not (text.startswith("@") or len(fields) == 5) or not croniter.is_valid(text):
        raise errors.InvalidInput(
            "invalid schedule", f"schedule {schedule!r} is not a cron expression (minute hour day month weekday)"
        )
    if next_time(text, time.time() if now is None else now) is None:
        raise errors.InvalidInput(
            "invalid schedule",
            f"schedule {schedule!r} never fires: no date matches it (such as the 31st of February); "
            "check the day and month fields",
        )
    return text


def next_time(schedule: str, after: float) -> float | None:
    """
    The first time strictly after ``after`` (epoch seconds, UTC) that
    ``schedule`` names, or None when there is none (a schedule that never
    fires, or one croniter cannot follow).
    """
    try:
        start = _dt.datetime.fromtimestamp(after, _dt.timezone.utc)
        when = float(croniter(schedule, start).get_next(float))
    except Exception:  # noqa: BLE001 - croniter raises many kinds for schedules it cannot follow
        return None
    return when if math.isfinite(when) else None


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
    def from_record(cls, record: Any, policy: PathPolicy, now: float) -> "CronJob":
        """A job read back from disk, checked as strictly as a new one; ``InvalidInput`` says why not."""
        if not isinstance(record, dict):
            raise errors.InvalidInput("invalid job", "a job must be an object")
        job_id = record.get("id")
        if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
            raise errors.InvalidInput("invalid job", "id must be a job id such as cron_0123456789ab")
        environment = record.get("environment", {})
        if not isinstance(environment, dict) or not all(isinstance(v, str) for v in environment.values()):
            raise errors.InvalidInput("invalid environment", "environment must be an object of strings")
        fields = parse_job(record, policy, now)
        created = _number(record.get("created", 0.0), "created")
        last_run = record.get("last_run")
        if last_run is not None:
            last_run = _number(last_run, "last_run")
        last_exit_code = record.get("last_exit_code")
        if last_exit_code is not None and (not isinstance(last_exit_code, int) or isinstance(last_exit_code, bool)):
            raise errors.InvalidInput("invalid job", "last_exit_code must be an integer or null")
        last_error = record.get("last_error")
        if last_error is not None and not isinstance(last_error, str):
            raise errors.InvalidInput("invalid job", "last_error must be a string or null")
        job = cls(id=job_id, created=created, last_run=last_run, last_exit_code=last_exit_code,
                  last_error=last_error, **fields)
        _check_encodable(job)
        return job

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
            try:
                argv += shlex.split(self.command)
            except ValueError:
                argv.append(self.command)
        return _text(shlex.join(argv))


def _text(value: str) -> str:
    """``value`` as it can be sent (a lone surrogate becomes U+FFFD): listings never fail."""
    if _encodes(value):
        return value
    return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _encodes(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_job(body: Any, policy: PathPolicy, now: float | None = None) -> dict[str, Any]:
    """The ``/cron/run-docker`` body as CronJob fields; 400 naming the bad field."""
    if not isinstance(body, dict):
        raise errors.InvalidInput("invalid body", "the body must be a JSON object")
    schedule = validate_schedule(body.get("schedule"), now)
    image = body.get("image")
    if not isinstance(image, str) or not image:
        raise errors.InvalidInput("image is required", "image must be an image reference such as myapp:latest")
    if not _IMAGE.fullmatch(image):
        raise errors.InvalidInput("invalid image", f"image {image!r} is not an image reference")
    command = parse_command(body.get("command"))
    if isinstance(command, str):
        # Docker splits a string command with shlex: one it cannot split
        # would fail every run.
        try:
            shlex.split(command)
        except ValueError as e:
            raise errors.InvalidInput("invalid command", f"command cannot be split into arguments: {e}") from None
    environment = parse_environment(body.get("environment"))
    volumes = parse_volumes(body.get("volumes"), policy)
    networks = body.get("networks")
    if networks is None:
        networks = [body["network"]] if isinstance(body.get("network"), str) else []
    if not isinstance(networks, list) or not all(isinstance(n, str) and _NETWORK.fullmatch(n) for n in networks):
        raise errors.InvalidInput("invalid networks", "networks must be a list of network names")
    fields = {
        "schedule": schedule,
        "image": image,
        "command": command,
        "environment": environment,
        "volumes": volumes,
        "networks": list(dict.fromkeys(networks)),
    }
    _check_encodable(fields)
    return fields


def _check_encodable(job: Any) -> None:
    """Refuse what the jobs file or a listing could not carry (a lone surrogate, NaN), naming the field."""
    record = attrs.asdict(job) if isinstance(job, CronJob) else job
    try:
        encode_json(record)
    except Unencodable as e:
        field = e.where.removeprefix("value.")
        raise errors.InvalidInput(
            f"invalid {field.split('.')[0].split('[')[0]}", f"{field} {e.why}"
        ) from None


#: 10000-01-01T00:00:00Z: times past it cannot be shown as ISO 8601.
_LAST_TIME = 253402300800.0


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < _LAST_TIME:
        raise errors.InvalidInput("invalid job", f"{field} must be a time in seconds since 1970")
    return float(value)


class CronRunner(Protocol):
    def run(self, job: CronJob) -> defer.Deferred[int]:
        """Run ``job`` once; fires with the container's exit code."""

    def adopt(self, container_id: str, started: float) -> defer.Deferred[int]:
        """Follow a run left going by an earlier agent; fires with its exit code (optional)."""


class CronScheduler(service.Service):
    """The cron jobs of one agent, persisted, each timed on ``clock``."""

    def __init__(
        self,
        data_dir: str,
        clock: Any,
        runner: CronRunner,
        max_jobs: int = 100,
        id_factory: Callable[[], str] | None = None,
        policy: PathPolicy | None = None,
    ) -> None:
        self.setName("cron")
        #: checks the volumes of jobs read back from disk (no roots: no host path)
        self.policy = policy if policy is not None else PathPolicy(())
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
        """
        Read the jobs back (at start). A file that cannot be read as a jobs
        document is set aside whole; a job that would be refused if it were
        added now (a schedule that never fires, a bad image or command, a
        volume outside the allowed paths, a lone surrogate) is set aside on
        its own and the others load.
        """
        self.jobs = {}
        try:
            # Parsed leniently: each job is then checked as strictly as a new
            # one, so that one bad job is set aside, not the whole file.
            document = json.loads(read_stored(self.path).decode("utf-8"))
            if not isinstance(document, dict) or document.get("version") != 1:
                raise ValueError("not a version 1 cron jobs document")
            records = document.get("jobs")
            if not isinstance(records, list):
                raise ValueError("jobs must be a list")
        except FileNotFoundError:
            return
        except (OSError, ValueError, RecursionError) as e:
            set_aside(self.path, f"cannot read the cron jobs ({e})")
            return
        now = self.clock.seconds()
        bad: list[Any] = []
        reasons: list[str] = []
        for number, record in enumerate(records, 1):
            try:
                job = CronJob.from_record(record, self.policy, now)
                if job.id in self.jobs:
                    raise errors.InvalidInput("invalid job", f"a second job has the id {job.id}")
            except errors.PlexError as e:
                bad.append(record)
                reasons.append(f"job {number}: {e.message}" + (f": {e.details}" if e.details else ""))
                continue
            self.jobs[job.id] = job
        if bad:
            why = reasons[0] + (f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else "")
            # As read (ensure_ascii keeps even a lone surrogate writable).
            kept = json.dumps({"version": 1, "jobs": bad, "why": reasons}, indent=1).encode("ascii")
            if set_aside_records(self.path, kept, len(bad), why) is not None:
                try:
                    self._save()
                except errors.PlexError as e:
                    log.error("cannot rewrite the cron jobs without those set aside: {why}", why=e.details)
        if len(self.jobs) > self.max_jobs:
            # Kept (they were accepted once), but no job is added until some go.
            log.warn("{count} cron jobs are stored, more than cron.max_jobs ({max_jobs}): "
                     "no job can be added until some are removed", count=len(self.jobs), max_jobs=self.max_jobs)

    def _save(self) -> None:
        ensure_private_dir(self.data_dir)
        document = {"version": 1, "jobs": [job.to_record() for job in self.jobs.values()]}
        atomic_write(self.path, encode_json(document, indent=1, sort_keys=True))

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
        # Runs still going from before the restart: followed as if this
        # agent had started them (timeout, removal, the job's last result),
        # and no second run of the job overlaps them.
        self.leftovers_adopted: defer.Deferred[Any] = defer.succeed([])
        running = getattr(self.runner, "running_leftovers", None)
        if running is not None and self.jobs:
            d = defer.maybeDeferred(running, sorted(self.jobs))
            d.addCallback(self._adopt)
            d.addErrback(lambda f: log.warn("cannot follow cron runs left going: {why}", why=f.getErrorMessage()))
            self.leftovers_adopted = d

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
        # Checked here too, so the jobs file can never hold a job that would
        # stop the scheduler, whoever calls add.
        validate_schedule(job.schedule, self.clock.seconds())
        _check_encodable(job)
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
        if when is None:
            # Checked when the job was added and loaded, so only a schedule
            # that has run out of dates gets here: it stays listed, unscheduled.
            self._next.pop(job.id, None)
            log.warn("cron job {id}: schedule {schedule!r} has no next run; it is not scheduled",
                     id=job.id, schedule=job.schedule)
            return
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

    def _adopt(self, running: "Sequence[tuple[str, str, float]]") -> "Sequence[str]":
        adopt = self.runner.adopt
        adopted = []
        for job_id, container_id, started in running:
            if job_id in self.jobs and job_id not in self.in_progress and self.running:
                log.info("cron job {id}: following its run left going by the last stop", id=job_id)
                self._track(job_id, functools.partial(adopt, container_id, started), started)
                adopted.append(container_id)
        return adopted

    def run_now(self, job_id: str) -> defer.Deferred[None]:
        """Start a run of ``job_id`` unless one is going (then that run's Deferred)."""
        job = self.jobs[job_id]
        if job_id in self.in_progress:
            self.runs_skipped += 1
            log.info("cron job {id}: previous run still going, this run is skipped", id=job_id)
            return self.in_progress[job_id]
        self.runs_started += 1
        return self._track(job_id, lambda: self.runner.run(job), self.clock.seconds())

    def _track(self, job_id: str, start: Callable[[], Any], started: float) -> defer.Deferred[None]:
        """Run ``start()`` as ``job_id``'s run begun at ``started``: record its result when it ends."""
        job = self.jobs[job_id]
        job.last_run = started
        d = defer.maybeDeferred(start)
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
                job.last_error = _text(value.message + (f": {value.details}" if value.details else ""))
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


