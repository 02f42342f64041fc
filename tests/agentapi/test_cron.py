"""
Cron over HTTP with real containers: a job's run starts a container through
the Docker pool (volumes, environment, networks), records its exit code,
removes the container, and the job survives a restart of the agent.
"""

from __future__ import annotations

import os

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from plexagent.testing.docker import PREFIX, AgentClient, base_image, test_client, unique_network_name
from plexagent.testing.ops import start_agent


class CronRoutesTests(unittest.TestCase):
    def setUp(self) -> None:
        self.docker = test_client(self)
        self.agent = start_agent(self, extra={"cron": {"poll_interval": 0.1}})
        self.client = AgentClient(self.agent)
        self.output = os.path.join(self.agent.workdir, "out")
        os.makedirs(self.output)

    def scheduler(self, agent=None):
        return (agent or self.agent).top.agent.agent_services["cron"]

    def network(self) -> str:
        name = unique_network_name(self, self.docker, "cron-net")
        self.docker.networks.create(name)
        return name

    def leftover_containers(self, job_id: str) -> list:
        return self.docker.api.containers(all=True, filters={"label": f"plexagent.cron-job={job_id}"})

    @defer.inlineCallbacks
    def test_a_run_starts_a_container_records_its_exit_code_and_removes_it(self):
        network = self.network()
        code, body = yield self.client.post("/cron/run-docker", {
            "schedule": "0 2 * * *",
            "image": base_image(),
            "command": ["/bin/sh", "-c", "echo \"$GREETING\" > /out/greeting; ip addr > /out/addr; exit 3"],
            "environment": ["GREETING=hello from cron"],
            "volumes": [f"{self.output}:/out"],
            "networks": [network],
        })
        self.assertEqual(code, 201, body)
        job_id = body["job_id"]
        self.assertTrue(job_id.startswith("cron_"))
        self.assertEqual(body["job"]["schedule"], "0 2 * * *")
        self.assertTrue(body["job"]["next_run"].endswith("T02:00:00Z"))

        # Due now rather than at 02:00: the scheduler's own run path.
        yield self.scheduler().run_now(job_id)

        with open(os.path.join(self.output, "greeting")) as f:
            self.assertEqual(f.read(), "hello from cron\n")
        subnet = self.docker.api.inspect_network(network)["IPAM"]["Config"][0]["Subnet"]
        with open(os.path.join(self.output, "addr")) as f:
            self.assertIn("inet " + subnet.split(".")[0] + "." + subnet.split(".")[1] + ".", f.read())
        code, body = yield self.client.get("/cron/jobs")
        [job] = body["jobs"]
        self.assertEqual((job["id"], job["last_exit_code"]), (job_id, 3))
        self.assertIsNotNone(job["last_run"])
        self.assertEqual(self.leftover_containers(job_id), [])

    @defer.inlineCallbacks
    def test_jobs_persist_across_a_restart_of_the_agent(self):
        code, body = yield self.client.post("/cron/run-docker", {
            "schedule": "*/10 * * * *", "image": base_image(), "command": ["true"],
        })
        self.assertEqual(code, 201)
        job_id = body["job_id"]
        yield self.scheduler().run_now(job_id)
        yield self.agent.stop()
        # A run that ended while the agent was down left its container.
        leftover = self.docker.containers.create(base_image(), ["true"], labels={"plexagent.cron-job": job_id})
        self.addCleanup(lambda: self.docker.api.remove_container(leftover.id, force=True)
                        if self.docker.api.containers(all=True, filters={"id": leftover.id}) else None)

        again = start_agent(self, extra={"cron": {"poll_interval": 0.1}}, workdir=self.agent.workdir,
                            api_key=self.agent.api_key)
        removed = yield self.scheduler(again).leftovers_removed
        self.assertEqual(removed, [leftover.id])
        code, body = yield AgentClient(again).get("/cron/jobs")
        self.assertEqual(code, 200)
        [job] = body["jobs"]
        self.assertEqual((job["id"], job["schedule"], job["last_exit_code"]), (job_id, "*/10 * * * *", 0))
        self.assertIsNotNone(job["next_run"])
        self.assertEqual(job["command"], f"docker run --rm {base_image()} true")

    @defer.inlineCallbacks
    def test_a_run_still_going_at_a_restart_is_followed_timed_out_and_removed(self):
        code, body = yield self.client.post("/cron/run-docker", {
            "schedule": "*/10 * * * *", "image": base_image(), "command": ["sleep", "300"],
        })
        self.assertEqual(code, 201)
        job_id = body["job_id"]
        run = self.scheduler().run_now(job_id)
        while not [c for c in self.leftover_containers(job_id) if c["State"] == "running"]:
            yield deferLater(reactor, 0.05, lambda: None)
        yield self.agent.stop()
        yield run  # the stopping agent leaves the container running
        [going] = self.leftover_containers(job_id)
        self.assertEqual(going["State"], "running")

        again = start_agent(self, extra={"cron": {"poll_interval": 0.1, "run_timeout": 1.0}},
                            workdir=self.agent.workdir, api_key=self.agent.api_key)
        scheduler = self.scheduler(again)
        adopted = yield scheduler.leftovers_adopted
        self.assertEqual(adopted, [going["Id"]])
        # No second run overlaps it ...
        self.assertIs(scheduler.run_now(job_id), scheduler.in_progress[job_id])
        # ... and it ends as a run of this agent would: timed out and removed.
        yield scheduler.in_progress[job_id]
        self.assertEqual(self.leftover_containers(job_id), [])
        code, body = yield AgentClient(again).get("/cron/jobs")
        [job] = body["jobs"]
        self.assertIn("cron run timed out", job["last_error"])

    @defer.inlineCallbacks
    def test_remove_then_listing_is_empty_and_unknown_ids_are_404(self):
        code, body = yield self.client.post("/cron/run-docker", {"schedule": "@daily", "image": base_image()})
        self.assertEqual(code, 201)
        code, answer = yield self.client.post("/cron/remove", {"job_id": body["job_id"]})
        self.assertEqual((code, answer["removed"]), (200, True))
        code, answer = yield self.client.get("/cron/jobs")
        self.assertEqual(answer, {"jobs": []})
        code, answer = yield self.client.post("/cron/remove", {"job_id": body["job_id"]})
        self.assertEqual((code, answer["error"]), (404, "cron job not found"))

    @defer.inlineCallbacks
    def test_invalid_schedule_is_400(self):
        code, body = yield self.client.post("/cron/run-docker", {"schedule": "0 2 * *", "image": base_image()})
        self.assertEqual((code, body["error"]), (400, "invalid schedule"))
        code, body = yield self.client.get("/cron/jobs")
        self.assertEqual(body, {"jobs": []})

    @defer.inlineCallbacks
    def test_a_schedule_that_never_fires_is_400_and_the_agent_still_restarts(self):
        code, body = yield self.client.post("/cron/run-docker", {"schedule": "0 0 31 2 *", "image": base_image()})
        self.assertEqual((code, body["error"]), (400, "invalid schedule"))
        self.assertIn("never fires", body["details"])
        yield self.agent.stop()
        again = start_agent(self, workdir=self.agent.workdir, api_key=self.agent.api_key)
        code, body = yield AgentClient(again).get("/cron/jobs")
        self.assertEqual((code, body), (200, {"jobs": []}))

    @defer.inlineCallbacks
    def test_a_command_json_cannot_carry_is_400_and_the_listing_keeps_working(self):
        raw = b'{"schedule": "@daily", "image": "%s", "command": "echo \\udc80"}' % base_image().encode()
        code, body = yield defer.ensureDeferred(self.client.call(
            "POST", "/cron/run-docker", data=raw, headers={"Content-Type": "application/json"}))
        self.assertEqual(code, 400, body)
        code, body = yield self.client.get("/cron/jobs")
        self.assertEqual((code, body), (200, {"jobs": []}))

    @defer.inlineCallbacks
    def test_a_run_of_a_missing_image_records_the_error(self):
        code, body = yield self.client.post("/cron/run-docker", {
            "schedule": "@hourly", "image": f"{PREFIX}no-such-image:latest",
        })
        self.assertEqual(code, 201)
        yield self.scheduler().run_now(body["job_id"])
        code, body = yield self.client.get("/cron/jobs")
        [job] = body["jobs"]
        self.assertIsNone(job["last_exit_code"])
        self.assertIn("not found", job["last_error"])
