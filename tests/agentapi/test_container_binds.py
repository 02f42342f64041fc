"""
Bind mounts are checked at every start, not only at creation: Docker
resolves a bind's host path each time a container starts, so a directory
swapped for a symlink to somewhere outside the allowed paths must stop the
start (restart, start, a run, a cron run), and a container Docker starts on
its own with such a bind is stopped by the agent. Real containers on the
test daemon, through a real agent.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from plexagent import errors
from plexagent.host.docker.binds import BIND_LABEL
from plexagent.testing import docker as td
from plexagent.testing.ops import start_agent as start_ops_agent

#: Appends a line to /data/log at each start, then waits.
LOGGING = "echo started >> /data/log; trap 'exit 0' TERM; sleep 300 & wait"


class Swap:
    """``root/work/data`` (bound into containers) and ``outside``, a directory outside the allowed paths."""

    def __init__(self, testcase: unittest.TestCase, root: str) -> None:
        self.work = os.path.join(root, "work")
        self.data = os.path.join(self.work, "data")
        os.makedirs(self.data)
        self.outside = os.path.realpath(tempfile.mkdtemp(prefix="pa-outside-"))
        testcase.addCleanup(_remove_tree, self.outside)

    def swap(self) -> None:
        """Replace ``data`` with a symlink to ``outside``, as a checkout or an archive could."""
        os.rename(self.data, self.data + ".orig")
        os.symlink(self.outside, self.data)

    def written_outside(self) -> list[str]:
        return sorted(os.listdir(self.outside))


def _remove_tree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


class BindsCheckedAtEveryStart(unittest.TestCase):
    def setUp(self) -> None:
        self.docker = td.test_client(self)
        self.agent = td.start_agent(self)
        self.api = td.AgentClient(self.agent)
        self.dirs = Swap(self, self.agent.workdir)

    async def run_container(self, **body: Any) -> dict[str, Any]:
        body.setdefault("name", td.unique_name(self, self.docker))
        body.setdefault("image", td.base_image())
        body.setdefault("command", ["sh", "-c", LOGGING])
        body.setdefault("volumes", [f"{self.dirs.data}:/data"])
        status, doc = await self.api.post("/containers/run", body)
        self.assertEqual(status, 201, doc)
        return doc

    def assertRefusedNaming(self, status: int, err: Any, path: str) -> None:
        self.assertEqual((status, err["error"]), (409, "bind mount outside the allowed paths"), err)
        self.assertIn(path, err["details"])
        self.assertIn(self.dirs.outside, err["details"])

    async def _restart(self) -> None:
        doc = await self.run_container()
        self.dirs.swap()
        status, err = await self.api.post(f"/containers/{doc['name']}/restart?timeout=1")
        self.assertRefusedNaming(status, err, self.dirs.data)
        self.assertEqual(self.dirs.written_outside(), [])
        # Refused before the stop: the container runs on, on its old mount.
        self.assertTrue(self.docker.api.inspect_container(doc["name"])["State"]["Running"])

    def test_restart_after_a_bind_source_became_a_symlink_outside_is_409_and_writes_nothing_there(self) -> Any:
        return defer.ensureDeferred(self._restart())

    async def _start(self) -> None:
        doc = await self.run_container()
        status, st = await self.api.post(f"/containers/{doc['name']}/stop?timeout=1")
        self.assertEqual((status, st["state"]), (200, "exited"))
        self.dirs.swap()
        status, err = await self.api.post(f"/containers/{doc['name']}/start")
        self.assertRefusedNaming(status, err, self.dirs.data)
        self.assertEqual(self.dirs.written_outside(), [])
        self.assertFalse(self.docker.api.inspect_container(doc["name"])["State"]["Running"])

    def test_start_after_a_bind_source_became_a_symlink_outside_is_409_and_writes_nothing_there(self) -> Any:
        return defer.ensureDeferred(self._start())

    async def _swap_during_stop(self) -> None:
        # The container swaps its own bind source while it stops (it has the
        # parent directory mounted): the check after the stop catches it.
        swap = (
            f"mv /work/data /work/data.orig && ln -s {self.dirs.outside} /work/data; exit 0"
        )
        doc = await self.run_container(
            command=["sh", "-c", f"echo started >> /data/log; trap '{swap}' TERM; sleep 300 & wait"],
            volumes=[f"{self.dirs.work}:/work", f"{self.dirs.data}:/data"],
        )
        status, err = await self.api.post(f"/containers/{doc['name']}/restart?timeout=5")
        self.assertRefusedNaming(status, err, self.dirs.data)
        self.assertEqual(self.dirs.written_outside(), [])
        self.assertTrue(os.path.islink(self.dirs.data))

    def test_restart_checks_again_after_the_stop_so_a_swap_during_the_stop_is_refused(self) -> Any:
        return defer.ensureDeferred(self._swap_during_stop())

    async def _swap_before_run_starts(self) -> None:
        # As if swapped while Docker pulled the image: the run's own start
        # checks again and leaves no container behind.
        name = td.unique_name(self, self.docker)
        docker = self.agent.top.agent.agent_services["docker"]
        self.dirs.swap()
        kwargs = {
            "image": td.base_image(), "name": name, "command": ["sh", "-c", LOGGING],
            "volumes": {self.dirs.data: {"bind": "/data", "mode": "rw"}},
            "labels": {BIND_LABEL: json.dumps([self.dirs.data])},
        }
        failure = await self.assertFailure(docker.run(kwargs), errors.Conflict)
        self.assertIn(self.dirs.data, failure.details)
        self.assertEqual(self.dirs.written_outside(), [])
        self.assertEqual(self.docker.api.containers(all=True, filters={"name": name}), [])

    def test_run_checks_the_binds_again_right_before_its_start(self) -> Any:
        return defer.ensureDeferred(self._swap_before_run_starts())

    async def _unswapped(self) -> None:
        doc = await self.run_container()
        status, st = await self.api.post(f"/containers/{doc['name']}/restart?timeout=1")
        self.assertEqual((status, st["state"]), (200, "running"))
        # A symlink that stays inside the allowed paths is no escape.
        other = os.path.join(self.agent.workdir, "other")
        os.makedirs(other)
        os.rename(self.dirs.data, self.dirs.data + ".orig")
        os.symlink(other, self.dirs.data)
        status, st = await self.api.post(f"/containers/{doc['name']}/restart?timeout=1")
        self.assertEqual((status, st["state"]), (200, "running"), st)

    def test_restart_with_binds_still_inside_the_allowed_paths_works(self) -> Any:
        return defer.ensureDeferred(self._unswapped())

    async def _cli_containers(self) -> None:
        # Made with the docker CLI: a bind inside the allowed paths is checked ...
        inside = self.docker.containers.create(
            td.base_image(), ["sh", "-c", LOGGING], name=td.unique_name(self, self.docker),
            volumes={self.dirs.data: {"bind": "/data", "mode": "rw"}},
        )
        self.dirs.swap()
        status, err = await self.api.post(f"/containers/{inside.name}/start")
        self.assertRefusedNaming(status, err, self.dirs.data)
        # ... one the operator chose outside them is theirs.
        theirs = self.docker.containers.create(
            td.base_image(), ["sleep", "300"], name=td.unique_name(self, self.docker),
            volumes={self.dirs.outside: {"bind": "/data", "mode": "ro"}},
        )
        status, st = await self.api.post(f"/containers/{theirs.name}/start")
        self.assertEqual((status, st["state"]), (200, "running"), st)

    def test_containers_made_with_the_cli_are_checked_for_binds_inside_the_allowed_paths_only(self) -> Any:
        return defer.ensureDeferred(self._cli_containers())


class DockersOwnStarts(unittest.TestCase):
    """Restart policies and the daemon start containers without asking the agent."""

    def setUp(self) -> None:
        self.docker = td.test_client(self)

    def guard(self, agent: Any) -> Any:
        return agent.top.getServiceNamed("dockerbinds")

    async def _restart_policy(self) -> None:
        agent = td.start_agent(self)
        dirs = Swap(self, agent.workdir)
        with open(os.path.join(dirs.outside, "escaped"), "w"):
            pass
        guard = self.guard(agent)
        contained = guard.next_contained()
        name = td.unique_name(self, self.docker)
        # Swaps its own bind source and fails: Docker's restart policy starts
        # it again, now on the outside directory, where it stays.
        script = (
            f"[ -e /data/escaped ] && exec sleep 300; "
            f"mv /work/data /work/data.orig; ln -s {dirs.outside} /work/data; exit 1"
        )
        status, doc = await td.AgentClient(agent).post("/containers/run", {
            "name": name, "image": td.base_image(), "command": ["sh", "-c", script],
            "volumes": [f"{dirs.work}:/work", f"{dirs.data}:/data"], "restart_policy": "on-failure",
        })
        self.assertEqual(status, 201, doc)
        stopped, why = await contained
        self.assertEqual(stopped, name)
        self.assertIn(dirs.data, why)
        info = self.docker.api.inspect_container(name)
        self.assertFalse(info["State"]["Running"])
        self.assertEqual(info["HostConfig"]["RestartPolicy"]["Name"], "no")

    def test_a_container_docker_restarts_with_an_escaping_bind_is_killed_and_not_restarted(self) -> Any:
        return defer.ensureDeferred(self._restart_policy())

    async def _found_running(self) -> None:
        root = os.path.realpath(tempfile.mkdtemp(prefix="pa-root-"))
        self.addCleanup(_remove_tree, root)
        dirs = Swap(self, root)
        dirs.swap()
        # Started by Docker while no agent watched (the daemon came back).
        name = td.unique_name(self, self.docker)
        self.docker.containers.run(
            td.base_image(), ["sleep", "300"], name=name, detach=True, restart_policy={"Name": "always"},
            volumes={dirs.data: {"bind": "/data", "mode": "rw"}}, labels={BIND_LABEL: json.dumps([dirs.data])},
        )
        agent = td.start_agent(self, allowed_paths=(root + "/",))
        guard = self.guard(agent)
        if not guard.contained:
            await guard.next_contained()
        self.assertEqual([n for n, _ in guard.contained], [name])
        info = self.docker.api.inspect_container(name)
        self.assertFalse(info["State"]["Running"])
        self.assertEqual(info["HostConfig"]["RestartPolicy"]["Name"], "no")

    def test_a_running_container_with_an_escaping_bind_is_stopped_when_the_agent_starts(self) -> Any:
        return defer.ensureDeferred(self._found_running())


class CronRunsCheckTheirBinds(unittest.TestCase):
    def setUp(self) -> None:
        self.docker = td.test_client(self)
        self.agent = start_ops_agent(self, extra={"cron": {"poll_interval": 0.1}})
        self.api = td.AgentClient(self.agent)
        self.dirs = Swap(self, self.agent.workdir)

    @defer.inlineCallbacks
    def test_a_cron_run_after_a_bind_source_became_a_symlink_outside_is_refused_and_writes_nothing(self) -> Any:
        status, body = yield self.api.post("/cron/run-docker", {
            "schedule": "0 2 * * *", "image": td.base_image(),
            "command": ["sh", "-c", "echo ran >> /data/log"], "volumes": [f"{self.dirs.data}:/data"],
        })
        self.assertEqual(status, 201, body)
        job_id = body["job_id"]
        scheduler = self.agent.top.agent.agent_services["cron"]
        yield scheduler.run_now(job_id)
        with open(os.path.join(self.dirs.data, "log")) as f:
            self.assertEqual(f.read(), "ran\n")

        self.dirs.swap()
        yield scheduler.run_now(job_id)
        status, body = yield self.api.get("/cron/jobs")
        [job] = body["jobs"]
        self.assertIsNone(job["last_exit_code"])
        self.assertTrue(job["last_error"].startswith("bind mount outside the allowed paths: "), job)
        self.assertIn(self.dirs.data, job["last_error"])
        self.assertEqual(self.dirs.written_outside(), [])
        self.assertEqual(self.docker.api.containers(all=True, filters={"label": f"plexagent.cron-job={job_id}"}), [])
