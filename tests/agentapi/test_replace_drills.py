"""
SIGKILL drills of the container replace: a real agent (``twistd``) kills
itself right before and right after each step of the replace journal is
written (``replace_killhook``), is started again, and must leave exactly
one container under the name, running the image the journal's step
implies: the old one until ``healthy`` was written, the new one from then
on. Drills on a replace whose new container crashes cover the rollback's
own steps.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import treq
from twisted.internet import reactor
from twisted.trial import unittest

from plexagent.host.docker.recreate import REPLACE_LABEL
from plexagent.host.docker.replacejournal import JOURNAL_FILE
from plexagent.testing import docker as td
from plexagent.testing.fixtures import AgentProcess, AgentSandbox
from tests.agentapi.test_replace import CRASH, LOOP

#: The steps the journal writes, in order, for a replace whose new container is healthy...
SUCCESSFUL_STEPS = ("prepared", "aside", "created", "old_stopped", "new_started", "healthy", "finished")
#: ... and the steps of one whose new container crashes that the first list does not cover.
FAILING_STEPS = ("new_started", "rolling_back", "finished")


def expected(step: str, when: str, failing: bool) -> str:
    """"old" or "new": the container a restarted agent must leave under the name."""
    if failing:
        return "old"
    reached = SUCCESSFUL_STEPS.index(step) + (1 if when == "after" else 0)
    return "new" if reached > SUCCESSFUL_STEPS.index("healthy") else "old"


class ReplaceDrills(unittest.TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.docker = td.test_client(self)
        self.repo = f"pa-test-drill-{uuid.uuid4().hex[:8]}"
        self.images = {
            "old": td.commit_image(self, self.docker, f"{self.repo}:v1", LOOP),
            "new": td.commit_image(self, self.docker, f"{self.repo}:v2", LOOP, ["ENV VERSION=2"]),
            "crash": td.commit_image(self, self.docker, f"{self.repo}:crash", CRASH),
        }
        self.name = td.unique_name(self, self.docker, "drill")
        # After the agents are reaped: whatever a failed drill left, aside names included.
        self.addCleanup(lambda: [self.docker.api.remove_container(c["Id"], force=True)
                                 for c in self.docker.api.containers(all=True, filters={"name": self.name})])
        self.sandbox = AgentSandbox()
        self.addCleanup(self.sandbox.cleanup)
        self.sandbox.document["agent_api"].update({"enabled": True, "allowed_paths": [self.sandbox.root + "/"]})
        self.sandbox.document["node_api"].update({"socket_group": "", "secrets_group": ""})
        self.sandbox.document["docker"] = {"host": td.docker_host(), "threads": 4, "replace_stable_time": 1.0}

    async def start_agent(self, preamble: str = "") -> tuple[AgentProcess, int]:
        port = td._free_port()
        self.sandbox.document["agent_api"]["listen"] = f"127.0.0.1:{port}"
        process = AgentProcess(self.sandbox.write(), reactor, preamble=preamble)
        process.start()

        async def reap() -> None:
            process.kill()
            await process.wait()

        self.addCleanup(reap)
        await process.wait_for_output(r"agent_api\.listen listening on")
        return process, port

    def journal(self) -> dict[str, Any]:
        path = os.path.join(self.sandbox.data_dir, JOURNAL_FILE)
        if not os.path.exists(path):
            return {"active": [], "history": {}}
        with open(path, "rb") as f:
            return json.loads(f.read())

    def holders(self) -> list[dict[str, Any]]:
        found = self.docker.api.containers(all=True, filters={"name": self.name})
        return [self.docker.api.inspect_container(c["Id"]) for c in found]

    async def drill(self, step: str, when: str, failing: bool = False) -> None:
        self.docker.api.start(self.docker.api.create_container(
            f"{self.repo}:v1", name=self.name,
            host_config=self.docker.api.create_host_config(restart_policy={"Name": "unless-stopped"}))["Id"])
        hook = f"import tests.agentapi.replace_killhook as hook; hook.install({step!r}, {when!r})"
        process, port = await self.start_agent(hook)
        image = f"{self.repo}:{'crash' if failing else 'v2'}"
        answer = treq.post(f"http://127.0.0.1:{port}/containers/{self.name}/replace", json={"image": image},
                           headers={"X-API-Key": self.sandbox.api_key}, persistent=False)
        answer.addErrback(lambda _: None)  # the agent dies before it answers
        status = await process.wait()
        self.assertEqual(status, -9, process.output)
        await answer

        unfinished = [r for r in self.journal()["active"] if r["name"] == self.name]
        process, _ = await self.start_agent()
        if unfinished:
            self.assertEqual(unfinished[0]["phase"], step if when == "after" else _previous(step, failing))
            await process.wait_for_output(rf"container {self.name}: the replace interrupted at \w+ was")

        holders = self.holders()
        self.assertEqual([h["Name"].lstrip("/") for h in holders], [self.name], "exactly one container, no leftover")
        [container] = holders
        want = expected(step, when, failing)
        self.assertEqual((container["Image"], container["State"]["Running"]), (self.images[want], True),
                         process.output)
        # Whichever runs has its restart policy: the old one got its own back.
        self.assertEqual(container["HostConfig"]["RestartPolicy"]["Name"], "unless-stopped")
        self.assertEqual(self.journal()["active"], [])
        if want == "old":
            self.assertNotIn(REPLACE_LABEL, container["Config"]["Labels"] or {})
        else:
            self.assertIn(self.name, self.journal()["history"])


def _previous(step: str, failing: bool) -> str:
    """The step written last when the agent is killed right before writing ``step``."""
    steps = SUCCESSFUL_STEPS[:5] + ("rolling_back", "finished") if failing else SUCCESSFUL_STEPS
    return steps[steps.index(step) - 1]


def _make(step: str, when: str, failing: bool) -> Any:
    async def test(self: ReplaceDrills) -> None:
        await self.drill(step, when, failing)

    outcome = "rolled_back" if expected(step, when, failing) == "old" else "completed"
    kind = "a_failing_replace" if failing else "a_replace"
    test.__name__ = f"test_{kind}_killed_{when}_{step}_is_{outcome}"
    return test


for _step in SUCCESSFUL_STEPS:
    for _when in ("before", "after"):
        _test = _make(_step, _when, False)
        setattr(ReplaceDrills, _test.__name__, _test)
for _step in FAILING_STEPS:
    for _when in ("before", "after"):
        _test = _make(_step, _when, True)
        setattr(ReplaceDrills, _test.__name__, _test)
