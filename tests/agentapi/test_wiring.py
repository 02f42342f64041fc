"""
How service.makeService wires the Docker pool and the Docker route
modules (no Docker needed: a MemoryReactor, nothing started).
"""

from __future__ import annotations

import shutil
import tempfile

from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.trial import unittest

from plexagent import service
from plexagent.host.docker.facade import DockerFacade
from plexagent.host.docker.pool import DockerPool
from plexagent.http import responses
from plexagent.testing import docker as td

#: Every route of issue 5, with its methods.
DOCKER_ROUTES = {
    "/ping": {"GET"},
    "/containers": {"GET"},
    "/containers/run": {"POST"},
    "/containers/<n>/start": {"POST"},
    "/containers/<n>/stop": {"POST"},
    "/containers/<n>/restart": {"POST"},
    "/containers/<n>/remove": {"POST"},
    "/containers/<n>/status": {"GET"},
    "/containers/<n>/health": {"GET"},
    "/containers/all/health": {"GET"},
    "/containers/<n>/logs": {"GET"},
    "/containers/<n>/inspect": {"GET"},
    "/containers/<n>/exec": {"POST"},
    "/containers/<n>/replace": {"POST"},
    "/containers/<n>/rollback": {"POST"},
    "/images/list": {"GET"},
    "/images/pull": {"POST"},
    "/images/tag": {"POST"},
    "/images/load": {"POST"},
    "/images/cleanup": {"POST"},
    "/system/df": {"GET"},
    "/docker/build": {"POST"},
    "/docker/dockerfile": {"POST"},
    "/docker/login": {"POST"},
    "/docker/load": {"POST"},
    "/docker/load/stream": {"POST"},
}


class Wiring(unittest.TestCase):
    def setUp(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="pa-wiring-")
        self.addCleanup(shutil.rmtree, self.workdir, True)
        config = td.agent_config(self.workdir, "unix:///run/example/docker.sock", "key", threads=7)
        self.top = service.makeService(config, MemoryReactor())

    def test_the_docker_pool_is_a_service_sized_and_pointed_by_the_config(self) -> None:
        pool = self.top.getServiceNamed("dockerpool")
        self.assertIsInstance(pool, DockerPool)
        self.assertEqual((pool.threadpool.max, pool.host), (7, "unix:///run/example/docker.sock"))
        self.assertFalse(pool.threadpool.started)  # nothing runs before startService

    def test_the_pool_starts_before_and_stops_after_the_agent_api_listener(self) -> None:
        names = [s.name for s in self.top]
        self.assertLess(names.index("dockerpool"), names.index("agent_api.listen"))

    def test_route_modules_share_the_pool_through_the_context(self) -> None:
        services = self.top.agent.agent_services  # type: ignore[attr-defined]
        self.assertIsInstance(services["docker"], DockerFacade)
        self.assertIs(services["docker"].pool, services["dockerpool"])
        self.assertIs(self.top.agent.agent_api.context.services["docker"], services["docker"])  # type: ignore[attr-defined]

    def test_every_docker_route_of_the_seed_is_registered(self) -> None:
        app = self.top.agent.agent_api.app  # type: ignore[attr-defined]
        routes: dict[str, set[str]] = {}
        for rule, methods in responses.iter_routes(app):
            routes.setdefault(rule, set()).update(methods)
        for rule, methods in DOCKER_ROUTES.items():
            self.assertIn(rule, routes)
            self.assertTrue(methods <= routes[rule], (rule, routes[rule]))


class DiskHygieneWiring(unittest.TestCase):
    def make(self, **cleanup: object) -> service.AgentService:
        import attrs

        workdir = tempfile.mkdtemp(prefix="pa-wiring-")
        self.addCleanup(shutil.rmtree, workdir, True)
        config = td.agent_config(workdir, "unix:///run/example/docker.sock", "key")
        config = attrs.evolve(config, docker=attrs.evolve(
            config.docker, cleanup=attrs.evolve(config.docker.cleanup, **cleanup)))
        return service.makeService(config, MemoryReactorClock())

    def test_the_automatic_cleanup_is_off_by_default(self) -> None:
        top = self.make()
        self.assertNotIn("image-cleanup", [s.name for s in top])
        self.assertNotIn("auto_cleanup", top.agent.agent_services)  # type: ignore[attr-defined]

    def test_enabled_it_runs_with_the_configured_threshold_interval_and_keep_last(self) -> None:
        from plexagent.host.docker.janitor import AutoCleanup

        top = self.make(enabled=True, threshold_percent=70.0, keep_last=5, interval=120.0)
        cleaner = top.getServiceNamed("image-cleanup")
        self.assertIsInstance(cleaner, AutoCleanup)
        self.assertEqual((cleaner.threshold_percent, cleaner.interval, cleaner.options.keep_last,
                          cleaner.options.include_build_cache), (70.0, 120.0, 5, True))
        self.assertIs(cleaner.hygiene, top.agent.agent_services["image_hygiene"])  # type: ignore[attr-defined]

    def test_cleanups_keep_the_images_of_cron_jobs(self) -> None:
        top = self.make()
        services = top.agent.agent_services  # type: ignore[attr-defined]
        services["cron"].add({"schedule": "0 2 * * *", "image": "app:cron", "command": None,
                              "environment": {}, "volumes": {}, "networks": []})
        [job_id] = services["cron"].jobs
        self.assertEqual(services["image_hygiene"].protected(), {"app:cron": f"used by cron job {job_id}"})
