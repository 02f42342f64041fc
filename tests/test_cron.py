"""
The cron scheduler's timing, overlap and persistence rules, on a
``task.Clock`` with a runner the test controls.
"""

from __future__ import annotations

import datetime
import json
import os

from twisted.internet import defer, task
from twisted.trial import unittest

from plexagent import cron, errors
from plexagent.paths import PathPolicy

# 2026-01-01T00:00:30Z
START = datetime.datetime(2026, 1, 1, 0, 0, 30, tzinfo=datetime.timezone.utc).timestamp()


class ControlledRunner:
    """Each run is a Deferred the test fires with the exit code."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, defer.Deferred[int]]] = []

    def run(self, job: cron.CronJob) -> defer.Deferred[int]:
        d: defer.Deferred[int] = defer.Deferred()
        self.runs.append((job.id, d))
        return d


def fields(schedule: str = "*/5 * * * *", **extra) -> dict:
    return {"schedule": schedule, "image": "myapp:latest", "command": ["/bin/sh", "-c", "cleanup.sh"], **extra}


class SchedulerTests(unittest.TestCase):
    def setUp(self) -> None:
        self.data_dir = self.mktemp()
        self.clock = task.Clock()
        self.clock.advance(START)
        self.runner = ControlledRunner()
        self.scheduler = self.make_scheduler()

    def make_scheduler(self) -> cron.CronScheduler:
        ids = iter(f"cron_{i:03d}" for i in range(1000))
        scheduler = cron.CronScheduler(self.data_dir, self.clock, self.runner, max_jobs=3, id_factory=lambda: next(ids))
        scheduler.startService()
        self.addCleanup(lambda: scheduler.running and scheduler.stopService())
        return scheduler

    def test_a_job_runs_at_its_next_scheduled_time(self):
        job = self.scheduler.add(fields())
        [doc] = self.scheduler.list()
        self.assertEqual(doc["next_run"], "2026-01-01T00:05:00Z")
        self.assertEqual(doc["created"], "2026-01-01T00:00:30Z")
        self.clock.advance(269)
        self.assertEqual(self.runner.runs, [])
        self.clock.advance(1)
        self.assertEqual([r[0] for r in self.runner.runs], [job.id])
        self.assertEqual(self.scheduler.list()[0]["next_run"], "2026-01-01T00:10:00Z")

    def test_exit_code_and_time_of_the_last_run_are_recorded(self):
        self.scheduler.add(fields())
        self.clock.advance(270)
        self.runner.runs[0][1].callback(3)
        [doc] = self.scheduler.list()
        self.assertEqual((doc["last_run"], doc["last_exit_code"]), ("2026-01-01T00:05:00Z", 3))
        self.assertEqual((self.scheduler.runs_started, self.scheduler.runs_failed), (1, 1))

    def test_a_run_that_cannot_start_records_why(self):
        self.scheduler.add(fields())
        self.clock.advance(270)
        self.runner.runs[0][1].errback(errors.NotFound("image not found", "no such image: myapp:latest"))
        [doc] = self.scheduler.list()
        self.assertIsNone(doc["last_exit_code"])
        self.assertEqual(doc["last_error"], "image not found: no such image: myapp:latest")

    def test_a_job_whose_previous_run_is_going_is_not_started_twice(self):
        self.scheduler.add(fields())
        self.clock.advance(270)
        self.clock.advance(300)
        self.clock.advance(300)
        self.assertEqual(len(self.runner.runs), 1)
        self.assertEqual(self.scheduler.runs_skipped, 2)
        self.assertTrue(self.scheduler.list()[0]["running"])
        self.runner.runs[0][1].callback(0)
        self.clock.advance(300)
        self.assertEqual(len(self.runner.runs), 2)

    def test_a_late_timer_runs_once_not_once_per_missed_slot(self):
        self.scheduler.add(fields())
        # The host was suspended for an hour: twelve slots went by.
        self.clock.advance(3600)
        self.assertEqual(len(self.runner.runs), 1)
        self.assertEqual(self.scheduler.list()[0]["next_run"], "2026-01-01T01:05:00Z")

    def test_invalid_schedules_are_400(self):
        for schedule in ("61 * * * *", "* * *", "every day", "", None, "* * * * * *"):
            with self.assertRaises(errors.InvalidInput) as caught:
                cron.validate_schedule(schedule)
            self.assertIn("schedule", caught.exception.message)

    def test_removed_jobs_do_not_run(self):
        job = self.scheduler.add(fields())
        self.assertEqual(self.scheduler.remove(job.id).id, job.id)
        self.clock.advance(3600)
        self.assertEqual(self.runner.runs, [])
        self.assertEqual(self.scheduler.list(), [])
        with self.assertRaises(errors.NotFound):
            self.scheduler.remove(job.id)

    def test_the_number_of_jobs_is_bounded(self):
        for _ in range(3):
            self.scheduler.add(fields())
        with self.assertRaises(errors.Conflict):
            self.scheduler.add(fields())

    def test_jobs_survive_a_restart_and_missed_runs_are_not_replayed(self):
        job = self.scheduler.add(fields(environment={"TOKEN": "s3cret"}))
        self.clock.advance(270)
        self.runner.runs[0][1].callback(0)
        self.scheduler.stopService()
        with open(os.path.join(self.data_dir, cron.JOBS_FILE)) as f:
            self.assertEqual(json.load(f)["jobs"][0]["id"], job.id)
        self.assertEqual(os.stat(os.path.join(self.data_dir, cron.JOBS_FILE)).st_mode & 0o077, 0)

        # Down for a day.
        self.clock.advance(86400)
        self.runner.runs.clear()
        again = self.make_scheduler()
        self.assertEqual(self.runner.runs, [])
        [doc] = again.list()
        self.assertEqual((doc["id"], doc["last_exit_code"], doc["last_run"]), (job.id, 0, "2026-01-01T00:05:00Z"))
        self.assertEqual(doc["next_run"], "2026-01-02T00:10:00Z")
        self.assertEqual(again.jobs[job.id].environment, {"TOKEN": "s3cret"})
        self.clock.advance(300)
        self.assertEqual(len(self.runner.runs), 1)

    def test_the_listing_shows_the_command_but_not_environment_values(self):
        self.scheduler.add(fields(environment={"TOKEN": "s3cret"}, networks=["app-network"]))
        [doc] = self.scheduler.list()
        self.assertEqual(doc["command"], "docker run --rm --network app-network myapp:latest /bin/sh -c cleanup.sh")
        self.assertNotIn("s3cret", json.dumps(doc))


class ParseJobTests(unittest.TestCase):
    def setUp(self) -> None:
        self.root = os.path.realpath(self.mktemp())
        os.makedirs(self.root)
        self.policy = PathPolicy((self.root + "/",))

    def test_the_seed_body_is_accepted(self):
        parsed = cron.parse_job(
            {
                "schedule": "0 2 * * *",
                "image": "myapp:latest",
                "command": ["/bin/sh", "-c", "cleanup.sh"],
                "environment": ["DEBUG=1"],
                "volumes": [f"{self.root}/data:/data"],
                "networks": ["app-network"],
            },
            self.policy,
        )
        self.assertEqual(parsed["environment"], {"DEBUG": "1"})
        self.assertEqual(parsed["volumes"], {f"{self.root}/data": {"bind": "/data", "mode": "rw"}})
        self.assertEqual(parsed["networks"], ["app-network"])

    def test_bad_fields_are_named(self):
        base = {"schedule": "0 2 * * *", "image": "myapp:latest"}
        for change, word in (
            ({"schedule": "0 25 * * *"}, "schedule"),
            ({"image": None}, "image"),
            ({"image": "bad image"}, "image"),
            ({"networks": "app-network"}, "networks"),
            ({"environment": ["NOEQUALS"]}, "environment"),
            ({"volumes": ["data"]}, "volumes"),
        ):
            with self.assertRaises(errors.PlexError) as caught:
                cron.parse_job({**base, **change}, self.policy)
            self.assertIn(word, f"{caught.exception.message} {caught.exception.details}")

    def test_volume_sources_outside_the_allowed_paths_are_forbidden(self):
        with self.assertRaises(errors.Forbidden):
            cron.parse_job({"schedule": "0 2 * * *", "image": "myapp:latest", "volumes": ["/etc:/etc"]}, self.policy)


class FakePool:
    """Answers the runner's Docker calls from a script; records them."""

    def __init__(self, states: list[str]) -> None:
        self.states = list(states)
        self.calls: list[str] = []

    def call(self, fn, *args, **kwargs):
        self.calls.append(fn.__name__)
        if fn is cron._start_container:
            return defer.succeed("container-1")
        if fn is cron._container_state:
            status = self.states.pop(0) if self.states else "running"
            return defer.succeed({"Status": status, "ExitCode": 4})
        return defer.succeed(None)


class DockerCronRunnerTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.job = cron.CronJob(id="cron_1", schedule="* * * * *", image="img")

    def test_the_container_is_polled_on_the_clock_and_removed_after_it_exits(self):
        pool = FakePool(["running", "running", "exited"])
        d = cron.DockerCronRunner(pool, self.clock, poll_interval=2.0, timeout=60).run(self.job)
        self.assertNoResult(d)
        self.clock.advance(2)
        self.assertNoResult(d)
        self.clock.advance(2)
        self.assertEqual(self.successResultOf(d), 4)
        self.assertEqual(pool.calls, ["_start_container"] + ["_container_state"] * 3 + ["_remove_container"])

    def test_a_run_past_its_timeout_fails_and_its_container_is_removed(self):
        pool = FakePool([])
        d = cron.DockerCronRunner(pool, self.clock, poll_interval=10.0, timeout=30).run(self.job)
        self.clock.pump([10, 10, 10])
        failure = self.failureResultOf(d, errors.Unavailable)
        self.assertEqual(failure.value.message, "cron run timed out")
        self.assertEqual(pool.calls[-1], "_remove_container")

    def test_stopping_ends_the_run_without_removing_the_running_container(self):
        pool = FakePool([])
        runner = cron.DockerCronRunner(pool, self.clock, poll_interval=2.0, timeout=60)
        d = runner.run(self.job)
        runner.stop()
        failure = self.failureResultOf(d, errors.Unavailable)
        self.assertEqual(failure.value.message, "the agent stopped during the run")
        self.assertNotIn("_remove_container", pool.calls)
        self.assertEqual(self.clock.getDelayedCalls(), [])
