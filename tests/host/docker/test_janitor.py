"""
The automatic image cleanup (``[docker.cleanup]``): when it runs (a fake
data root on ``task.Clock``), what it counts and logs, and one real run
against the engine (scoped to the test's own repository: the engine is
shared).
"""

from __future__ import annotations

import uuid
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from plexagent import errors
from plexagent.host.docker.cleanup import CleanupOptions
from plexagent.host.docker.janitor import AutoCleanup, ImageHygiene
from plexagent.host.docker.pool import DockerPool
from plexagent.metrics import AgentMetrics
from plexagent.testing import docker as td
from tests.agentapi.test_images import CapturedLogs

OPTIONS = CleanupOptions(keep_last=3, include_build_cache=True)


class FakeHygiene:
    """A data root at ``percent``; cleanups recorded and answered with ``result`` (or ``error``)."""

    def __init__(self, percent: float | None) -> None:
        self.percent = percent
        self.cleanups: list[tuple[CleanupOptions, bool]] = []
        self.result: dict[str, Any] = {"removed": 2, "space_reclaimed": 5000, "untagged": ["a:1"], "skipped": []}
        self.error: Exception | None = None
        self.root_error: Exception | None = None

    def data_root(self) -> defer.Deferred[dict[str, Any]]:
        if self.root_error is not None:
            return defer.fail(self.root_error)
        if self.percent is None:
            return defer.succeed({"path": "/var/lib/docker", "available": False, "reason": "not visible here"})
        return defer.succeed({"path": "/var/lib/docker", "available": True, "percent": self.percent})

    def cleanup(self, options: CleanupOptions, background: bool = False) -> defer.Deferred[dict[str, Any]]:
        self.cleanups.append((options, background))
        if self.error is not None:
            return defer.fail(self.error)
        return defer.succeed(self.result)


class DecisionTests(unittest.TestCase):
    def start(self, hygiene: Any, threshold: float = 85.0) -> tuple[AutoCleanup, task.Clock]:
        clock = task.Clock()
        cleaner = AutoCleanup(hygiene, clock, threshold, 3600.0, OPTIONS)
        cleaner.startService()
        self.addCleanup(cleaner.stopService)
        return cleaner, clock

    def test_the_first_check_runs_once_the_reactor_runs_then_every_interval(self) -> None:
        cleaner, clock = self.start(FakeHygiene(10.0))
        self.assertEqual(cleaner.checks, 0)
        clock.advance(0)
        self.assertEqual(cleaner.checks, 1)
        clock.advance(3599)
        self.assertEqual(cleaner.checks, 1)
        clock.advance(1)
        self.assertEqual(cleaner.checks, 2)

    def test_under_the_threshold_nothing_runs(self) -> None:
        hygiene = FakeHygiene(84.9)
        cleaner, clock = self.start(hygiene)
        clock.advance(0)
        self.assertEqual((hygiene.cleanups, cleaner.runs), ([], 0))

    def test_at_the_threshold_a_background_cleanup_runs_with_the_configured_options(self) -> None:
        hygiene = FakeHygiene(85.0)
        cleaner, clock = self.start(hygiene)
        logs = CapturedLogs(self)
        clock.advance(0)
        self.assertEqual(hygiene.cleanups, [(OPTIONS, True)])
        self.assertEqual((cleaner.runs, cleaner.images_removed, cleaner.bytes_reclaimed, cleaner.failures),
                         (1, 2, 5000, 0))
        self.assertIn("automatic image cleanup: /var/lib/docker was 85.0% full (threshold 85.0%): removed 2 images",
                      logs.text())

    def test_each_interval_over_the_threshold_runs_again_and_counts_add_up(self) -> None:
        hygiene = FakeHygiene(95.0)
        cleaner, clock = self.start(hygiene)
        clock.advance(0)
        clock.advance(3600)
        self.assertEqual((cleaner.runs, cleaner.images_removed, cleaner.bytes_reclaimed), (2, 4, 10000))

    def test_a_failed_run_is_counted_and_logged_and_the_next_interval_tries_again(self) -> None:
        hygiene = FakeHygiene(99.0)
        hygiene.error = errors.Unavailable("docker unavailable", "connection refused")
        cleaner, clock = self.start(hygiene)
        logs = CapturedLogs(self)
        clock.advance(0)
        self.assertEqual((cleaner.runs, cleaner.failures), (1, 1))
        self.assertIn("automatic image cleanup failed (/var/lib/docker 99.0% full): docker unavailable", logs.text())
        hygiene.error = None
        clock.advance(3600)
        self.assertEqual((cleaner.runs, cleaner.failures, cleaner.images_removed), (2, 1, 2))

    def test_an_unseen_data_root_runs_nothing_and_warns_once(self) -> None:
        hygiene = FakeHygiene(None)
        cleaner, clock = self.start(hygiene)
        logs = CapturedLogs(self)
        clock.advance(0)
        clock.advance(3600)
        self.assertEqual((hygiene.cleanups, cleaner.runs, cleaner.checks), ([], 0, 2))
        self.assertEqual(logs.text().count("automatic image cleanup cannot run: not visible here"), 1)

    def test_docker_unreachable_at_a_check_is_no_run_and_no_failure(self) -> None:
        hygiene = FakeHygiene(99.0)
        hygiene.root_error = errors.Unavailable("docker unavailable", "refused")
        cleaner, clock = self.start(hygiene)
        clock.advance(0)
        self.assertEqual((hygiene.cleanups, cleaner.runs, cleaner.failures), ([], 0, 0))

    def test_stopping_cancels_the_checks(self) -> None:
        hygiene = FakeHygiene(99.0)
        cleaner, clock = self.start(hygiene)
        clock.advance(0)
        cleaner.stopService()
        clock.advance(7200)
        self.assertEqual(cleaner.checks, 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_the_counters_are_in_the_prometheus_metrics(self) -> None:
        hygiene = FakeHygiene(90.0)
        cleaner, clock = self.start(hygiene)
        clock.advance(0)

        class Agent:
            agent_services = {"auto_cleanup": cleaner}
            config = None

        text = AgentMetrics(Agent()).prometheus_text().decode()
        for line in ("plexagent_image_cleanup_runs_total 1.0", "plexagent_image_cleanup_images_removed_total 2.0",
                     "plexagent_image_cleanup_bytes_reclaimed_total 5000.0", "plexagent_image_cleanup_failures_total 0.0"):
            self.assertIn(line, text)


class RealRunTests(unittest.TestCase):
    """One automatic run against the engine, the data root made to look full."""

    def setUp(self) -> None:
        self.docker = td.test_client(self)
        self.pool = DockerPool(reactor, td.docker_host(), threads=2)
        self.pool.startService()
        self.addCleanup(self.pool.stopService)
        self.repo = f"pa-test-auto-{uuid.uuid4().hex[:8]}"

    async def test_over_the_threshold_the_older_images_are_removed_and_counted(self) -> None:
        ids = [td.load_image(self, self.docker, f"{self.repo}:{n}", f"202{n}-01-01T00:00:00Z", uuid.uuid4().bytes * 32)
               for n in range(4)]
        hygiene = ImageHygiene(self.pool)
        real_root = await hygiene.data_root()
        self.assertTrue(real_root["available"], real_root)
        hygiene.data_root = lambda: defer.succeed({**real_root, "percent": 99.0})  # type: ignore[method-assign]
        clock = task.Clock()
        cleaner = AutoCleanup(hygiene, clock, 85.0, 60.0, CleanupOptions(keep_last=2, repository_prefix=self.repo))
        cleaner.startService()
        self.addCleanup(cleaner.stopService)
        checked = cleaner.next_check()
        clock.advance(0)
        await checked
        self.assertEqual((cleaner.runs, cleaner.images_removed, cleaner.bytes_reclaimed, cleaner.failures),
                         (1, 2, 2 * 512, 0))
        left = set(self.docker.api.images(filters={"reference": self.repo}, quiet=True))
        self.assertEqual(left, {ids[2], ids[3]})
