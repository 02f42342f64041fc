"""
``plexagent deregister`` and ``plexagent simulator`` (``python -m
plexagent.testing``), run as the commands they are, in their own processes.
"""

from __future__ import annotations

import json
import os
import re
import sys

from twisted.internet import defer, reactor, utils
from twisted.trial import unittest

from plexagent.testing.fixtures import AgentProcess, AgentSandbox, _ProcessWatcher
from tests.controlplane.harness import eventually


async def plexagent(*argv: str) -> tuple[int, str, str]:
    out, err, code = await utils.getProcessOutputAndValue(
        sys.executable, ["-m", "plexagent.cli", *argv], env=dict(os.environ))
    return code, out.decode(), err.decode()


class DeregisterTests(unittest.TestCase):
    timeout = 60

    async def enrolled_and_stopped(self) -> tuple[AgentSandbox, object]:
        from plexagent.testing.simulator import ControlPlaneSimulator

        sim = ControlPlaneSimulator.example()
        await sim.start(reactor)
        self.addCleanup(lambda: defer.ensureDeferred(sim.stop()))
        sandbox = AgentSandbox()
        self.addCleanup(sandbox.cleanup)
        sandbox.enroll_with(sim)
        agent = AgentProcess(sandbox.write())
        agent.start()
        await agent.wait_for_socket(sandbox.socket)
        await eventually(lambda: sim.open_streams == 1, timeout=30, what="enrolled")
        agent.kill(15)
        await agent.wait()
        return sandbox, sim

    async def test_deregister_tells_the_control_plane_and_forgets_the_identity(self) -> None:
        sandbox, sim = await self.enrolled_and_stopped()
        node_id = sim.node_id
        identity = os.path.join(sandbox.data_dir, "identity.json")
        self.assertTrue(os.path.exists(identity))
        code, out, err = await plexagent("deregister", "--config", sandbox.config_path)
        self.assertEqual(code, 0, err)
        self.assertIn(f"node {node_id} deregistered", out)
        self.assertEqual(sim.deregistrations, [node_id])
        self.assertFalse(os.path.exists(identity))
        self.assertFalse(os.path.exists(os.path.join(sandbox.data_dir, "signing-keys.json")))
        self.assertTrue(os.path.exists(os.path.join(sandbox.data_dir, "state.json")))  # only --purge removes it
        self.assertNotIn(sim.token, out + err)

    async def test_a_refused_deregistration_removes_nothing(self) -> None:
        sandbox, sim = await self.enrolled_and_stopped()
        sim.faults.fail("deregister", 503)
        code, out, err = await plexagent("deregister", "--config", sandbox.config_path)
        self.assertEqual(code, 1)
        self.assertIn("control plane answered 503", err)
        self.assertIn("nothing removed", err)
        self.assertTrue(os.path.exists(os.path.join(sandbox.data_dir, "identity.json")))

    async def test_forget_removes_the_identity_without_asking_and_purge_the_state(self) -> None:
        sandbox, sim = await self.enrolled_and_stopped()
        await sim.stop()
        code, out, err = await plexagent("deregister", "--config", sandbox.config_path, "--forget", "--purge")
        self.assertEqual(code, 0, err)
        self.assertIn("forgotten locally", out)
        for name in ("identity.json", "state.json", "reports"):
            self.assertFalse(os.path.exists(os.path.join(sandbox.data_dir, name)), name)
        self.assertEqual(sim.deregistrations, [])

    async def test_a_running_agent_is_not_deregistered(self) -> None:
        from plexagent.testing.simulator import ControlPlaneSimulator

        sim = ControlPlaneSimulator.example()
        await sim.start(reactor)
        self.addCleanup(lambda: defer.ensureDeferred(sim.stop()))
        sandbox = AgentSandbox()
        self.addCleanup(sandbox.cleanup)
        sandbox.enroll_with(sim)
        agent = AgentProcess(sandbox.write())
        agent.start()
        self.addCleanup(lambda: defer.ensureDeferred(self.stop(agent)))
        await agent.wait_for_socket(sandbox.socket)
        code, out, err = await plexagent("deregister", "--config", sandbox.config_path)
        self.assertEqual(code, 2)
        self.assertIn("stop it first", err)

    async def stop(self, agent: AgentProcess) -> None:
        agent.kill(15)
        await agent.wait()

    async def test_a_node_never_enrolled_has_nothing_to_deregister(self) -> None:
        sandbox = AgentSandbox()
        self.addCleanup(sandbox.cleanup)
        sandbox.document["control_plane"] = {"url": "http://127.0.0.1:9"}
        code, out, err = await plexagent("deregister", "--config", sandbox.write())
        self.assertEqual((code, err.strip()), (1, "plexagent deregister: not enrolled: nothing to deregister"))


class SimulatorCommandTests(unittest.TestCase):
    timeout = 60

    async def test_the_simulator_prints_its_url_and_a_token_that_enrolls_a_node(self) -> None:
        token_file = self.mktemp()
        watcher = _ProcessWatcher()
        argv = [sys.executable, "-m", "plexagent.testing", "--port", "0", "--token-file", token_file]
        transport = reactor.spawnProcess(watcher, argv[0], argv, env=dict(os.environ))

        async def stop() -> None:
            if watcher.status is None:
                transport.signalProcess("TERM")
                await watcher.ended

        self.addCleanup(lambda: defer.ensureDeferred(stop()))
        match = await watcher.wait_for(r"url: +(http://127\.0\.0\.1:\d+)\n  bootstrap token: +(\S+)\n")
        url, token = match.group(1).decode(), match.group(2).decode()
        with open(token_file) as f:
            self.assertEqual(f.read(), token + "\n")
        self.assertEqual(os.stat(token_file).st_mode & 0o777, 0o600)
        sandbox = AgentSandbox()
        self.addCleanup(sandbox.cleanup)
        with open(os.path.join(sandbox.root, "bootstrap-token"), "w") as f:
            f.write(token)
        sandbox.document["control_plane"] = {"url": url,
                                             "bootstrap_token_file": os.path.join(sandbox.root, "bootstrap-token")}
        agent = AgentProcess(sandbox.write())
        agent.start()
        await agent.wait_for_socket(sandbox.socket)
        code, out, err = 0, "", ""
        for _ in range(600):
            code, out, err = await plexagent("status", "--socket", sandbox.socket, "--json")
            if code == 0 and json.loads(out)["identity"]["state"] == "enrolled":
                break
        self.assertEqual(json.loads(out)["identity"]["state"], "enrolled", err)
        self.assertTrue(re.fullmatch(r"node-\d+", json.loads(out)["identity"]["node_id"]))
        agent.kill(15)
        self.assertEqual(await agent.wait(), 0)

    async def test_in_plexsphere_mode_it_prints_the_enrollment_settings_and_its_token_registers(self) -> None:
        import base64
        import uuid

        import treq

        watcher = _ProcessWatcher()
        argv = [sys.executable, "-m", "plexagent.testing", "--protocol", "plexsphere", "--port", "0"]
        transport = reactor.spawnProcess(watcher, argv[0], argv, env=dict(os.environ))

        async def stop() -> None:
            if watcher.status is None:
                transport.signalProcess("TERM")
                await watcher.ended

        self.addCleanup(lambda: defer.ensureDeferred(stop()))
        match = await watcher.wait_for(r'url: +(http://127\.0\.0\.1:\d+)\n  bootstrap token: +(psb_\S+)\n(?s:.*)'
                                       r'project_id = "([^"]+)"\n  resource_handle = "([^"]+)"\n')
        url, token, project_id, handle = (g.decode() for g in match.groups())
        self.assertIn(b'protocol = "plexsphere"', match.group(0))
        body = {"project_id": project_id, "resource_handle": handle, "bootstrap_token": token,
                "nonce": str(uuid.uuid4()), "public_key": base64.b64encode(os.urandom(32)).decode()}
        response = await treq.post(url + "/v1/register", json=body, persistent=False)
        answer = await response.json()
        self.assertEqual(response.code, 200)
        self.assertEqual(str(uuid.UUID(answer["node_id"])), answer["node_id"])

    async def test_plexagent_simulator_is_the_same_command(self) -> None:
        code, out, err = await plexagent("simulator", "--help")
        self.assertEqual(code, 0)
        self.assertIn("--script {interop}", out)
