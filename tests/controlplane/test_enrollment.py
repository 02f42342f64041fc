"""
Enrollment: retries, refusals, the pin and node.id checks (task.Clock and a
fake enroller), and the whole path against the simulator on loopback: the
identity kept privately, the token file consumed, no second registration.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from typing import Any

from twisted.internet import defer, task
from twisted.trial import unittest

from plexagent.controlplane.backoff import Backoff
from plexagent.controlplane.enrollment import WAIT_AFTER_REFUSAL, WAIT_FOR_TOKEN, BootstrapToken, Enrollment, Token
from plexagent.controlplane.protocol import Identity
from tests.controlplane.fakes import unavailable
from tests.controlplane.harness import AgentTestCase, eventually

K1 = base64.b64encode(b"\x01" * 32).decode()
K2 = base64.b64encode(b"\x02" * 32).decode()


class FakeEnroller:
    def __init__(self) -> None:
        self.attempts: list[tuple[str, Any, defer.Deferred[Identity]]] = []

    def enroll(self, token: str, keypair: Any) -> defer.Deferred[Identity]:
        d: defer.Deferred[Identity] = defer.Deferred()
        self.attempts.append((token, keypair, d))
        return d


def identity(node_id: str = "node-1", key: str = K1) -> Identity:
    return Identity("plexd", node_id, bearer="x" * 32, aes_key=b"x" * 32, nsk_text="x" * 32, signing_public_key=key)


class EnrollmentTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.token_path = self.mktemp()
        self.write_token("tok-1")
        self.enroller = FakeEnroller()
        self.enrolled: list[tuple[Identity, Token]] = []

    def write_token(self, value: str) -> None:
        with open(self.token_path, "w") as f:
            f.write(value + "\n")

    def start(self, pin: str = "", node_id: str = "", env: str = "") -> Enrollment:
        enrollment = Enrollment(self.enroller, BootstrapToken(env, self.token_path), self.clock,
                                lambda i, t: self.enrolled.append((i, t)), pin=pin, node_id=node_id,
                                backoff=Backoff(rng=lambda: 1.0))
        enrollment.start()
        self.addCleanup(enrollment.stop)
        return enrollment

    def test_one_attempt_with_the_token_then_enrolled(self) -> None:
        enrollment = self.start()
        self.assertEqual((enrollment.state, self.enroller.attempts[0][0]), ("enrolling", "tok-1"))
        self.enroller.attempts[0][2].callback(identity())
        self.assertEqual(enrollment.state, "enrolled")
        self.assertEqual(self.enrolled[0][1].source, self.token_path)
        self.assertEqual(dict(enrollment.attempts), {"ok": 1})

    def test_transient_failures_are_retried_with_backoff_and_the_same_key_pair(self) -> None:
        enrollment = self.start()
        self.enroller.attempts[0][2].errback(unavailable(503, call=_register()))
        self.clock.advance(0.99)
        self.assertEqual(len(self.enroller.attempts), 1)
        self.clock.advance(0.01)
        self.enroller.attempts[1][2].errback(unavailable(500, call=_register()))
        self.clock.advance(2)
        self.assertEqual(len(self.enroller.attempts), 3)
        self.assertEqual({id(a[1]) for a in self.enroller.attempts}, {id(enrollment.keypair)})
        self.assertEqual(enrollment.attempts["transient"], 2)

    def test_429_waits_for_retry_after(self) -> None:
        self.start()
        self.enroller.attempts[0][2].errback(unavailable(429, retry_after=30, call=_register()))
        self.clock.advance(29.9)
        self.assertEqual(len(self.enroller.attempts), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.enroller.attempts), 2)

    def test_a_refused_token_is_not_tried_again_but_a_different_one_is(self) -> None:
        enrollment = self.start()
        self.enroller.attempts[0][2].errback(unavailable(409, call=_register()))
        self.assertEqual(enrollment.state, "failed")
        self.assertIn(self.token_path, enrollment.error)
        self.assertNotIn("tok-1", enrollment.error)
        self.clock.advance(WAIT_AFTER_REFUSAL * 3)
        self.assertEqual(len(self.enroller.attempts), 1)
        self.write_token("tok-2")
        self.clock.advance(WAIT_AFTER_REFUSAL)
        self.assertEqual(self.enroller.attempts[1][0], "tok-2")

    def test_without_a_token_it_waits_and_reads_the_file_again(self) -> None:
        os.unlink(self.token_path)
        enrollment = self.start()
        self.assertEqual((enrollment.state, self.enroller.attempts), ("waiting_for_token", []))
        self.write_token("tok-late")
        self.clock.advance(WAIT_FOR_TOKEN)
        self.assertEqual(self.enroller.attempts[0][0], "tok-late")

    def test_the_environment_token_comes_first(self) -> None:
        self.start(env="from-env")
        self.assertEqual(self.enroller.attempts[0][0], "from-env")

    def test_a_signing_key_other_than_the_pin_refuses_the_enrollment(self) -> None:
        enrollment = self.start(pin=K2)
        self.enroller.attempts[0][2].callback(identity(key=K1))
        self.assertEqual(enrollment.state, "failed")
        self.assertIn("does not match control_plane.signing_public_key", enrollment.error)
        self.assertEqual(self.enrolled, [])

    def test_a_node_id_other_than_the_configured_one_refuses_the_enrollment(self) -> None:
        enrollment = self.start(node_id="edge-7")
        self.enroller.attempts[0][2].callback(identity("node-9"))
        self.assertEqual(enrollment.state, "failed")
        self.assertIn("node.id is 'edge-7'", enrollment.error)


def _register() -> Any:
    from plexagent.controlplane.protocol import Call

    return Call.REGISTER


class EnrollmentIntegrationTests(AgentTestCase):
    """An agent with only a URL and a bootstrap token, against the simulator on loopback."""

    async def test_the_node_enrolls_keeps_its_identity_privately_and_consumes_the_token_file(self) -> None:
        sim = await self.start_sim()
        base = self.mktemp()
        agent, client = self.start_agent(sim, base=base)
        await eventually(lambda: sim.open_streams == 1, what="enrolled and streaming")
        self.assertEqual(len(sim.registrations), 1)
        path = os.path.join(base, "data", "identity.json")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path) as f:
            doc = json.load(f)
        self.assertEqual((doc["node_id"], doc["node_secret_key"]), (sim.node_id, sim.token))
        self.assertEqual(doc["public_key"], sim.registrations[0]["public_key"])
        await eventually(lambda: not os.path.exists(os.path.join(base, "bootstrap-token")), what="token file deleted")
        self.assertEqual(agent.link.identity_state, "enrolled")
        code, body = await client.get("/v1/state/secrets/db%2Fpassword")
        self.assertEqual((code, body["value"]), (200, "s3cret-p@ssw0rd"))

    async def test_a_restart_uses_the_stored_identity_and_never_registers_again(self) -> None:
        sim = await self.start_sim()
        base = self.mktemp()
        top_agent, _ = self.start_agent(sim, base=base)
        await eventually(lambda: sim.open_streams == 1, what="enrolled")
        top = top_agent.link.parent
        await top.stopService()
        agent, _ = self.start_agent(sim, base=base)
        await eventually(lambda: sim.open_streams == 1, what="streaming again")
        self.assertEqual(len(sim.registrations), 1)
        self.assertEqual(agent.link.identity.node_id, sim.node_id)

    async def test_a_401_keeps_the_identity_and_the_node_tries_again(self) -> None:
        sim = await self.start_sim()
        agent, _ = self.start_agent(sim, heartbeat_interval=0.1)
        await eventually(lambda: sim.open_streams == 1, what="enrolled")
        sim.faults.revoke_bearer()
        await eventually(lambda: agent.link.auth_failures["heartbeat"] >= 2, what="refused heartbeats")
        sim.faults.bearer_revoked = False
        beats = len(sim.heartbeats)
        await eventually(lambda: len(sim.heartbeats) > beats, what="heartbeats accepted again")
        self.assertEqual(len(sim.registrations), 1)

    async def test_a_registration_that_fails_once_is_retried(self) -> None:
        sim = await self.start_sim()
        sim.faults.fail("register", 503, times=1)
        self.start_agent(sim)
        await eventually(lambda: sim.open_streams == 1, timeout=20, what="enrolled after a retry")
        self.assertEqual(sim.requests.count(("register", "POST")), 2)
        self.assertEqual(len(sim.registrations), 1)

    async def test_an_identity_the_disk_refuses_is_used_in_memory_and_saved_later_then_the_token_deleted(self) -> None:
        from plexagent.controlplane.link import ControlPlaneLink

        self.patch(ControlPlaneLink, "SAVE_RETRY", 0.2)
        sim = await self.start_sim()
        base = self.mktemp()
        identity = os.path.join(base, "data", "identity.json")
        # A directory where the save writes its temporary file: the save fails.
        blocker = os.path.join(base, "data", f".identity.json.tmp-{os.getpid()}")
        os.makedirs(blocker)
        agent, client = self.start_agent(sim, base=base)
        await eventually(lambda: sim.open_streams == 1, what="running with the identity in memory")
        self.assertFalse(os.path.exists(identity))
        self.assertTrue(os.path.exists(os.path.join(base, "bootstrap-token")))  # kept until the identity is saved
        os.rmdir(blocker)
        await eventually(lambda: os.path.isfile(identity), what="the identity saved on a retry")
        await eventually(lambda: not os.path.exists(os.path.join(base, "bootstrap-token")), what="token deleted")
        self.assertEqual(len(sim.registrations), 1)

    async def test_a_stored_identity_for_another_node_id_stops_the_link_saying_so(self) -> None:
        sim = await self.start_sim()
        base = self.mktemp()
        agent, _ = self.start_agent(sim, base=base)
        await eventually(lambda: sim.open_streams == 1, what="enrolled")
        await agent.link.parent.stopService()
        from plexagent.config import parse_config
        from plexagent.service import makeService
        from tests.controlplane.harness import agent_config_document, short_socket_dir

        document = agent_config_document(base, sim, short_socket_dir())
        document["node"]["id"] = "another-node"
        from twisted.internet import reactor

        top = makeService(parse_config(document), reactor)
        top.startService()
        self.addCleanup(top.stopService)
        self.assertEqual(top.agent.link.identity_state, "failed")
        self.assertIn("node.id is 'another-node'", top.agent.link.identity_error)
        self.assertEqual(len(sim.registrations), 1)

    async def test_no_token_or_node_secret_key_reaches_the_log(self) -> None:
        from twisted.logger import formatEvent, globalLogPublisher

        lines: list[str] = []

        def observer(event: dict[str, Any]) -> None:
            lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        sim = await self.start_sim()
        token = sim.bootstrap_tokens[-1]
        self.start_agent(sim)
        await eventually(lambda: sim.open_streams == 1, what="enrolled")
        used = sim.registrations[0]["token"]
        text = "\n".join(lines)
        self.assertIn("enrolled as node", text)
        for secret in (used, token, sim.token):
            self.assertNotIn(secret, text)
