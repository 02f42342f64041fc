"""
``POST /containers/<n>/replace`` and ``/rollback`` against the real engine:
what carries over, the health verdicts, the automatic rollback, and the
refusals that change nothing. (The journal's crash drills: test_replace_drills.)
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from plexagent.testing import docker as td

#: A CMD that runs until stopped, and exits at once on SIGTERM.
LOOP = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.2; done"]
#: A CMD that says why and exits.
CRASH = ["sh", "-c", "echo the new version cannot start: missing config >&2; exit 3"]


class ReplaceCase(unittest.TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.docker = td.test_client(self)
        # Last of all (after the agent stopped): whatever a replace cut short left, aside names included.
        self.addCleanup(lambda: [self.docker.api.remove_container(c["Id"], force=True) for c in (
            self.docker.api.containers(all=True, filters={"name": self.name}) if hasattr(self, "name") else [])])
        self.agent = td.start_agent(self, replace_stable_time=1.0)
        self.api = td.AgentClient(self.agent)
        self.repo = f"pa-test-rep-{uuid.uuid4().hex[:8]}"
        self.v1 = td.commit_image(self, self.docker, f"{self.repo}:v1", LOOP)
        self.v2 = td.commit_image(self, self.docker, f"{self.repo}:v2", LOOP, ["ENV VERSION=2"])
        self.name = td.unique_name(self, self.docker, "rep")
        self.replacer = self.agent.top.agent.agent_services["replacer"]

    async def run_container(self, **fields: Any) -> dict[str, Any]:
        status, doc = await self.api.post("/containers/run", {"name": self.name, "image": f"{self.repo}:v1", **fields})
        self.assertEqual(status, 201, doc)
        return doc

    def holders(self) -> list[dict[str, Any]]:
        """Every container whose name is exactly the test's name, inspected."""
        found = self.docker.api.containers(all=True, filters={"name": self.name})
        return [self.docker.api.inspect_container(c["Id"]) for c in found
                if self.name in [n.lstrip("/") for n in c["Names"]]]

    def leftovers(self) -> list[str]:
        """Containers whose name starts with the test's name, other than the name itself."""
        found = self.docker.api.containers(all=True, filters={"name": self.name})
        return [n for c in found for n in c["Names"] if n.lstrip("/") != self.name]

    def the_one(self) -> dict[str, Any]:
        holders = self.holders()
        self.assertEqual(len(holders), 1, holders)
        self.assertEqual(self.leftovers(), [])
        return holders[0]


class ReplaceTests(ReplaceCase):
    async def test_the_name_moves_to_a_running_container_of_the_new_image_with_the_old_configuration(self) -> None:
        data = os.path.join(self.agent.workdir, "data-dir")
        os.makedirs(data)
        network = td.unique_network_name(self, self.docker)
        self.docker.networks.create(network)
        # Cleanups run last first: the container goes before its network.
        self.addCleanup(lambda: [self.docker.api.remove_container(c["Id"], force=True)
                                 for c in self.docker.api.containers(all=True, filters={"name": self.name})])
        old = await self.run_container(environment={"MODE": "good", "KEEP": "1"}, labels={"team": "web"},
                                       restart_policy="unless-stopped", volumes=[f"{data}:/data:ro"],
                                       network=network, ports=["127.0.0.1:0:8080"], hostname="web1", user="nobody")
        status, doc = await self.api.post(f"/containers/{self.name}/replace",
                                          {"image": f"{self.repo}:v2", "environment": {"MODE": "better"}})
        self.assertEqual(status, 200, doc)
        self.assertEqual((doc["success"], doc["name"], doc["image"], doc["image_id"], doc["health"]),
                         (True, self.name, f"{self.repo}:v2", self.v2, "running"))
        self.assertEqual((doc["previous"]["id"], doc["previous"]["image"], doc["previous"]["image_id"]),
                         (old["id"], f"{self.repo}:v1", self.v1))
        new = self.the_one()
        self.assertEqual((new["Id"], new["Image"], new["State"]["Running"]), (doc["id"], self.v2, True))
        env = set(new["Config"]["Env"])
        self.assertTrue({"MODE=better", "KEEP=1", "VERSION=2"} <= env, env)
        self.assertEqual(new["Config"]["Labels"]["team"], "web")
        self.assertEqual(new["HostConfig"]["RestartPolicy"]["Name"], "unless-stopped")
        self.assertEqual(new["HostConfig"]["Binds"], [f"{data}:/data:ro"])
        self.assertEqual((new["Config"]["Hostname"], new["Config"]["User"]), ("web1", "nobody"))
        self.assertEqual(new["HostConfig"]["PortBindings"]["8080/tcp"][0]["HostIp"], "127.0.0.1")
        self.assertIn(network, new["NetworkSettings"]["Networks"])
        self.assertEqual(self.docker.api.containers(all=True, filters={"id": old["id"]}), [])
        self.docker.api.inspect_image(self.v1)  # the rollback target stays

    async def test_a_command_inherited_from_the_image_follows_the_new_image_and_an_explicit_one_stays(self) -> None:
        marker = ["sh", "-c", "trap 'exit 0' TERM; echo v3 started; while :; do sleep 0.2; done"]
        td.commit_image(self, self.docker, f"{self.repo}:v3", marker)
        await self.run_container()
        status, doc = await self.api.post(f"/containers/{self.name}/replace", {"image": f"{self.repo}:v3"})
        self.assertEqual(status, 200, doc)
        self.assertEqual(self.the_one()["Config"]["Cmd"], marker)

        explicit = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.3; done"]
        self.docker.api.remove_container(self.name, force=True)
        await self.run_container(command=explicit)
        status, doc = await self.api.post(f"/containers/{self.name}/replace", {"image": f"{self.repo}:v3"})
        self.assertEqual(status, 200, doc)
        self.assertEqual(self.the_one()["Config"]["Cmd"], explicit)

    async def test_a_new_container_that_exits_is_rolled_back_and_the_answer_is_409_with_its_logs(self) -> None:
        td.commit_image(self, self.docker, f"{self.repo}:crash", CRASH)
        old = await self.run_container()
        status, doc = await self.api.post(f"/containers/{self.name}/replace", {"image": f"{self.repo}:crash"})
        self.assertEqual((status, doc["error"]), (409, "replace failed: the new container was not healthy"), doc)
        self.assertEqual(doc["details"]["reason"], "it exited with code 3")
        self.assertIn("the new version cannot start: missing config", doc["details"]["logs"])
        back = self.the_one()
        self.assertEqual((back["Id"], back["Image"], back["State"]["Running"]), (old["id"], self.v1, True))
        self.assertEqual(back["HostConfig"]["RestartPolicy"]["Name"], "no")

    async def test_the_old_restart_policy_comes_back_with_a_rollback(self) -> None:
        td.commit_image(self, self.docker, f"{self.repo}:crash", CRASH)
        await self.run_container(restart_policy="always")
        status, doc = await self.api.post(f"/containers/{self.name}/replace", {"image": f"{self.repo}:crash"})
        self.assertEqual(status, 409, doc)
        self.assertEqual(doc["details"]["reason"], "it restarted (its process exited)")
        self.assertEqual(self.the_one()["HostConfig"]["RestartPolicy"]["Name"], "always")

    async def test_a_docker_health_check_decides_and_a_failing_one_rolls_back(self) -> None:
        check = {"test": "test \"$MODE\" = good", "interval": 0.2, "timeout": 1, "retries": 2}
        old = await self.run_container(environment={"MODE": "good"}, health_check=check)
        status, doc = await self.api.post(f"/containers/{self.name}/replace",
                                          {"image": f"{self.repo}:v2", "environment": {"MODE": "bad"}})
        self.assertEqual(status, 409, doc)
        self.assertTrue(doc["details"]["reason"].startswith("its health check failed"), doc)
        self.assertEqual(self.the_one()["Id"], old["id"])
        status, doc = await self.api.post(f"/containers/{self.name}/replace", {"image": f"{self.repo}:v2"})
        self.assertEqual((status, doc["health"]), (200, "healthy"), doc)

    async def test_not_healthy_within_health_timeout_is_rolled_back(self) -> None:
        old = await self.run_container()
        status, doc = await self.api.post(f"/containers/{self.name}/replace", {"image": f"{self.repo}:v2"})
        self.assertEqual(status, 200, doc)
        never = {"test": "exit 1", "interval": 30, "start_period": 60}
        self.docker.api.remove_container(self.name, force=True)
        old = await self.run_container(health_check=never)
        status, doc = await self.api.post(f"/containers/{self.name}/replace",
                                          {"image": f"{self.repo}:v2", "health_timeout": 1.5})
        self.assertEqual(status, 409, doc)
        self.assertEqual(doc["details"]["reason"], "its health check did not pass within 1.5 s (health_timeout)")
        self.assertEqual(self.the_one()["Id"], old["id"])


class RollbackTests(ReplaceCase):
    async def test_rollback_goes_back_to_the_previous_image_and_configuration(self) -> None:
        await self.run_container(environment={"MODE": "one"})
        status, replaced = await self.api.post(f"/containers/{self.name}/replace",
                                               {"image": f"{self.repo}:v2", "environment": {"MODE": "two"}})
        self.assertEqual(status, 200, replaced)
        status, doc = await self.api.post(f"/containers/{self.name}/rollback")
        self.assertEqual(status, 200, doc)
        self.assertEqual((doc["image"], doc["image_id"], doc["previous"]["id"]), (f"{self.repo}:v1", self.v1, replaced["id"]))
        back = self.the_one()
        self.assertEqual((back["Image"], back["Config"]["Image"], back["State"]["Running"]), (self.v1, f"{self.repo}:v1", True))
        self.assertIn("MODE=one", back["Config"]["Env"])
        # The rollback is a replace too: rolling back again returns to v2.
        status, doc = await self.api.post(f"/containers/{self.name}/rollback", {"health_timeout": 30, "stop_timeout": 1})
        self.assertEqual((status, doc["image_id"]), (200, self.v2), doc)

    async def test_rollback_of_a_container_never_replaced_is_409(self) -> None:
        await self.run_container()
        status, doc = await self.api.post(f"/containers/{self.name}/rollback")
        self.assertEqual((status, doc["error"]), (409, "nothing to roll back"))

    async def test_the_rollback_target_image_is_kept_by_cleanups(self) -> None:
        await self.run_container()
        status, doc = await self.api.post(f"/containers/{self.name}/replace", {"image": f"{self.repo}:v2"})
        self.assertEqual(status, 200, doc)
        # The tag moves on, as when a new version is pushed under the same tag: v1 is dangling now.
        self.docker.api.tag(self.v2, self.repo, "v1")
        status, doc = await self.api.post("/images/cleanup", {"keep_last": 0, "repository_prefix": self.repo})
        self.assertEqual(status, 200, doc)
        self.assertNotIn(self.v1, doc["images_deleted"])
        status, doc = await self.api.post("/images/cleanup")
        self.assertEqual(status, 200, doc)
        self.assertNotIn(self.v1, doc["images_deleted"])
        self.assertIn({"id": self.v1, "reason": f"kept for the rollback of container {self.name}"},
                      [{"id": s["id"], "reason": s["reason"]} for s in doc["skipped"]])
        self.docker.api.inspect_image(self.v1)


class RefusalTests(ReplaceCase):
    async def test_a_second_replace_of_the_same_container_while_one_runs_is_409(self) -> None:
        # The new container is healthy only once the test says so: the first replace waits till then.
        await self.run_container(health_check={"test": "test -f /tmp/go", "interval": 0.2, "retries": 100000})
        journal = self.replacer.journal
        begun: defer.Deferred[None] = defer.Deferred()
        real_begin = journal.begin

        def begin(record: Any) -> None:
            real_begin(record)
            begun.callback(None)

        journal.begin = begin
        started: defer.Deferred[Any] = defer.Deferred()
        real_record = journal.record

        def record(entry: Any, phase: str) -> None:
            real_record(entry, phase)
            if phase == "new_started":
                started.callback(entry)

        journal.record = record
        first = self.api.post(f"/containers/{self.name}/replace", {"image": f"{self.repo}:v2"})
        await begun
        for path, body in (("replace", {"image": f"{self.repo}:v1"}), ("rollback", None)):
            status, doc = await self.api.post(f"/containers/{self.name}/{path}", body)
            self.assertEqual((status, doc["error"]), (409, "a replace is in progress"), path)
        self.assertEqual(self.replacer.busy, {self.name: "replace"})
        record = await started
        self.docker.api.exec_start(self.docker.api.exec_create(record.new_id, ["touch", "/tmp/go"])["Id"])
        status, doc = await first
        self.assertEqual((status, doc["health"]), (200, "healthy"), doc)

    async def test_bad_fields_are_400_naming_them_and_nothing_changes(self) -> None:
        old = await self.run_container()
        for body, error in (({}, "image is required"), ({"image": "a b"}, "invalid image"),
                            ({"image": "x", "environment": 5}, "invalid environment"),
                            ({"image": "x", "health_timeout": 0}, "invalid health_timeout"),
                            ({"image": "x", "health_timeout": "9"}, "invalid health_timeout"),
                            ({"image": "x", "stop_timeout": 1.5}, "invalid stop_timeout"),
                            ({"image": "x", "stop_timeout": 3601}, "invalid stop_timeout"),
                            ({"image": "x", "tag": "y"}, "unknown field tag")):
            status, doc = await self.api.post(f"/containers/{self.name}/replace", body)
            self.assertEqual((status, doc["error"]), (400, error), body)
        status, doc = await self.api.post(f"/containers/{self.name}/rollback", {"stop_timeout": -1})
        self.assertEqual((status, doc["error"]), (400, "invalid stop_timeout"))
        self.assertEqual(self.the_one()["Id"], old["id"])

    async def test_a_health_timeout_shorter_than_the_stable_time_is_400(self) -> None:
        await self.run_container()
        status, doc = await self.api.post(f"/containers/{self.name}/replace",
                                          {"image": f"{self.repo}:v2", "health_timeout": 0.5})
        self.assertEqual((status, doc["error"]), (400, "invalid health_timeout"), doc)

    async def test_a_missing_container_is_404_and_an_image_that_cannot_be_pulled_changes_nothing(self) -> None:
        status, doc = await self.api.post(f"/containers/{self.name}/replace", {"image": f"{self.repo}:v2"})
        self.assertEqual((status, doc["error"]), (404, "container not found"))
        old = await self.run_container()
        # A registry on loopback that is not there: the pull fails, nothing else is tried.
        status, doc = await self.api.post(f"/containers/{self.name}/replace", {"image": "127.0.0.1:9/pa-test/none:1"})
        self.assertEqual((status, doc["error"]), (500, "docker failed"), doc)
        self.assertEqual(self.the_one()["Id"], old["id"])

    async def test_a_bind_outside_the_allowed_paths_is_403_and_nothing_changes(self) -> None:
        outside = os.path.realpath(self.mktemp())
        os.makedirs(outside)
        self.docker.api.create_container(f"{self.repo}:v1", name=self.name,
                                         host_config=self.docker.api.create_host_config(binds=[f"{outside}:/x"]))
        status, doc = await self.api.post(f"/containers/{self.name}/replace", {"image": f"{self.repo}:v2"})
        self.assertEqual((status, doc["error"]), (403, "path not allowed"), doc)
        self.assertEqual(self.the_one()["Image"], self.v1)

    async def test_a_container_started_with_rm_is_409(self) -> None:
        self.docker.api.create_container(f"{self.repo}:v1", name=self.name,
                                         host_config=self.docker.api.create_host_config(auto_remove=True))
        status, doc = await self.api.post(f"/containers/{self.name}/replace", {"image": f"{self.repo}:v2"})
        self.assertEqual((status, doc["error"]), (409, "container removes itself when stopped"))

    async def test_replace_and_rollback_need_the_api_key(self) -> None:
        for path in ("replace", "rollback"):
            status, doc = await self.api.post(f"/containers/{self.name}/{path}", {"image": "x"}, key=None)
            self.assertEqual((status, doc["error"]), (401, "unauthorized"))

