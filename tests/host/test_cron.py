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

from plexagent import errors
from plexagent.host import cron
from plexagent.host.docker import cronrunner
from plexagent.host.files.paths import PathPolicy

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


    def test_a_schedule_that_never_fires_is_400_and_nothing_is_stored(self):
        for schedule in ("0 0 31 2 *", "0 0 30 2 *", "* * 31 4,6,9,11 *"):
            with self.assertRaises(errors.InvalidInput) as caught:
                self.scheduler.add(fields(schedule))
            self.assertIn("never fires", caught.exception.details)
        self.assertEqual(self.scheduler.jobs, {})
        self.assertFalse(os.path.exists(os.path.join(self.data_dir, cron.JOBS_FILE)))

    def test_a_schedule_that_fires_rarely_is_accepted(self):
        self.scheduler.add(fields("0 0 29 2 *"))
        self.assertEqual(self.scheduler.list()[0]["next_run"], "2028-02-29T00:00:00Z")

    def test_values_json_cannot_carry_are_400_naming_the_field(self):
        for extra, field in (
            ({"command": ["sh", "-c", "echo \udc80"]}, "command[2]"),
            ({"command": "echo \ud800"}, "command"),
            ({"environment": {"K": "\udc80"}}, "environment.K"),
        ):
            with self.assertRaises(errors.InvalidInput) as caught:
                self.scheduler.add(fields(**extra))
            self.assertIn(field, caught.exception.details)
        self.assertEqual(self.scheduler.jobs, {})

    def test_a_listing_renders_even_a_command_shlex_cannot_split(self):
        job = self.scheduler.add(fields())
        job.command = "echo 'unterminated"
        self.assertEqual(self.scheduler.list()[0]["command"], "docker run --rm myapp:latest 'echo '\"'\"'unterminated'")

    def test_a_run_error_holding_a_lone_surrogate_is_listed_readably(self):
        self.scheduler.add(fields())
        self.clock.advance(270)
        self.runner.runs[0][1].errback(errors.NotFound("image not found", "no such image: \udc80"))
        [doc] = self.scheduler.list()
        self.assertEqual(doc["last_error"], "image not found: no such image: \ufffd")
        json.dumps(doc, ensure_ascii=False).encode("utf-8")

    def test_a_job_whose_next_run_cannot_be_computed_is_listed_unscheduled(self):
        job = self.scheduler.add(fields())
        job.schedule = "0 0 31 2 *"
        self.scheduler._schedule(job)
        [doc] = self.scheduler.list()
        self.assertIsNone(doc["next_run"])


class PoisonedJobsFileTests(unittest.TestCase):
    """A jobs file or job that cannot be loaded is set aside; the scheduler starts without it."""

    def setUp(self) -> None:
        self.data_dir = self.mktemp()
        os.makedirs(self.data_dir)
        self.path = os.path.join(self.data_dir, cron.JOBS_FILE)
        self.clock = task.Clock()
        self.clock.advance(START)
        self.runner = ControlledRunner()

    def good_record(self, job_id: str = "cron_good") -> dict:
        return cron.CronJob(id=job_id, created=START, **cron.parse_job(fields(), PathPolicy(()))).to_record()

    def write(self, content: bytes) -> None:
        with open(self.path, "wb") as f:
            f.write(content)

    def write_jobs(self, *records: object) -> None:
        self.write(json.dumps({"version": 1, "jobs": [self.good_record(), *records]}).encode())

    def start(self) -> cron.CronScheduler:
        scheduler = cron.CronScheduler(self.data_dir, self.clock, self.runner)
        scheduler.startService()
        self.addCleanup(lambda: scheduler.running and scheduler.stopService())
        return scheduler

    def set_aside(self) -> list[str]:
        return [n for n in os.listdir(self.data_dir) if n.startswith(cron.JOBS_FILE + ".quarantined-")]

    def assert_job_set_aside(self, bad: dict) -> None:
        self.write_jobs(bad)
        scheduler = self.start()
        self.assertEqual([doc["id"] for doc in scheduler.list()], ["cron_good"])
        self.assertEqual(scheduler.list()[0]["next_run"], "2026-01-01T00:05:00Z")
        [aside] = self.set_aside()
        with open(os.path.join(self.data_dir, aside)) as f:
            self.assertEqual(json.load(f)["jobs"], [json.loads(json.dumps(bad))])
        with open(self.path) as f:
            self.assertEqual([j["id"] for j in json.load(f)["jobs"]], ["cron_good"])

    def test_a_job_whose_schedule_never_fires_is_set_aside(self):
        self.assert_job_set_aside({**self.good_record("cron_feb31"), "schedule": "0 0 31 2 *"})

    def test_a_job_with_a_bad_image_is_set_aside(self):
        self.assert_job_set_aside({**self.good_record("cron_img"), "image": "bad image; rm -rf /"})

    def test_a_job_with_a_bad_command_is_set_aside(self):
        self.assert_job_set_aside({**self.good_record("cron_cmd"), "command": [1, 2]})

    def test_a_job_with_a_lone_surrogate_is_set_aside(self):
        self.assert_job_set_aside({**self.good_record("cron_sur"), "command": ["echo", "\udc80"]})

    def test_a_job_with_a_host_volume_outside_the_allowed_paths_is_set_aside(self):
        self.assert_job_set_aside({**self.good_record("cron_vol"), "volumes": {"/etc": {"bind": "/x", "mode": "rw"}}})

    def test_jobs_of_the_wrong_types_are_set_aside(self):
        for bad in ({**self.good_record("cron_t1"), "created": "yesterday"},
                    {**self.good_record("cron_t2"), "last_exit_code": "0"},
                    {**self.good_record("cron_t3"), "environment": {"K": 1}},
                    {**self.good_record("cron_t4"), "created": 1e300},
                    {**self.good_record("../x")},
                    self.good_record("cron_good"),
                    ["not", "a", "job"]):
            for name in self.set_aside():
                os.unlink(os.path.join(self.data_dir, name))
            self.assert_job_set_aside(bad)

    def test_a_file_that_is_not_json_is_set_aside_whole(self):
        self.write(b'{"version": 1, "jobs": [')
        scheduler = self.start()
        self.assertEqual(scheduler.list(), [])
        [aside] = self.set_aside()
        with open(os.path.join(self.data_dir, aside), "rb") as f:
            self.assertEqual(f.read(), b'{"version": 1, "jobs": [')
        scheduler.add(fields())
        self.assertEqual(len(self.start().jobs), 1)

    def test_a_file_of_an_unknown_shape_is_set_aside_whole(self):
        for content in (b"[]", b'{"version": 2, "jobs": []}', b'{"version": 1, "jobs": {}}', b"\xff\xfe"):
            for name in self.set_aside():
                os.unlink(os.path.join(self.data_dir, name))
            self.write(content)
            self.assertEqual(self.start().list(), [])
            self.assertEqual(len(self.set_aside()), 1, content)

    def test_a_jobs_file_that_is_a_directory_is_set_aside(self):
        os.makedirs(self.path)
        scheduler = self.start()
        self.assertEqual(scheduler.list(), [])
        scheduler.add(fields())
        self.assertEqual(len(self.set_aside()), 1)


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

    def test_a_string_command_docker_cannot_split_is_400(self):
        with self.assertRaises(errors.InvalidInput) as caught:
            cron.parse_job({"schedule": "0 2 * * *", "image": "myapp:latest", "command": "echo 'x"}, self.policy)
        self.assertEqual(caught.exception.message, "invalid command")

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
        if fn is cronrunner._start_container:
            return defer.succeed("container-1")
        if fn is cronrunner._container_state:
            status = self.states.pop(0) if self.states else "running"
            return defer.succeed({"Status": status, "ExitCode": 4})
        return defer.succeed(None)


class DockerCronRunnerTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.job = cron.CronJob(id="cron_1", schedule="* * * * *", image="img")

    def test_the_container_is_polled_on_the_clock_and_removed_after_it_exits(self):
        pool = FakePool(["running", "running", "exited"])
        d = cronrunner.DockerCronRunner(pool, self.clock, poll_interval=2.0, timeout=60).run(self.job)
        self.assertNoResult(d)
        self.clock.advance(2)
        self.assertNoResult(d)
        self.clock.advance(2)
        self.assertEqual(self.successResultOf(d), 4)
        self.assertEqual(pool.calls, ["_start_container"] + ["_container_state"] * 3 + ["_remove_container"])

    def test_a_run_past_its_timeout_fails_and_its_container_is_removed(self):
        pool = FakePool([])
        d = cronrunner.DockerCronRunner(pool, self.clock, poll_interval=10.0, timeout=30).run(self.job)
        self.clock.pump([10, 10, 10])
        failure = self.failureResultOf(d, errors.Unavailable)
        self.assertEqual(failure.value.message, "cron run timed out")
        self.assertEqual(pool.calls[-1], "_remove_container")

    def test_stopping_ends_the_run_without_removing_the_running_container(self):
        pool = FakePool([])
        runner = cronrunner.DockerCronRunner(pool, self.clock, poll_interval=2.0, timeout=60)
        d = runner.run(self.job)
        runner.stop()
        failure = self.failureResultOf(d, errors.Unavailable)
        self.assertEqual(failure.value.message, "the agent stopped during the run")
        self.assertNotIn("_remove_container", pool.calls)
        self.assertEqual(self.clock.getDelayedCalls(), [])
