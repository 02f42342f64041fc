"""
An agent speaking plexsphere's protocol to the simulator on loopback: what
only this protocol has (docs/control-plane-plexsphere.md). What both
protocols share runs for both in test_integration, test_crash,
test_signatures and test_outbox.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import reactor, task

from plexagent.testing.simulator import ControlPlaneSimulator
from tests.controlplane.harness import AgentTestCase, eventually
from tests.controlplane.protocols import PLEXSPHERE


class Fixture(AgentTestCase):
    protocol = PLEXSPHERE

    async def connected(self, sim: ControlPlaneSimulator, base: str | None = None, **cp: Any) -> tuple[Any, Any]:
        agent, client = self.start_agent(sim, base, **cp)
        await eventually(lambda: sim.open_streams == 1, what="event stream")
        return agent, client

    def identity(self, base: str) -> dict[str, Any]:
        with open(os.path.join(base, "data", "identity.json")) as f:
            return json.load(f)  # type: ignore[no-any-return]


class EnrollmentTests(Fixture):
    async def test_the_node_enrolls_once_keeps_its_identity_and_drops_the_token(self) -> None:
        sim = await self.start_sim()
        base = self.mktemp()
        agent, client = await self.connected(sim, base)
        identity = self.identity(base)
        self.assertEqual((identity["protocol"], identity["node_id"]), ("plexsphere", agent.link.identity.node_id))
        self.assertEqual(os.stat(os.path.join(base, "data", "identity.json")).st_mode & 0o777, 0o600)
        self.assertFalse(os.path.exists(os.path.join(base, "bootstrap-token")))
        self.assertEqual(agent.link.ring.keys.current.key_id, sim.signing_key_id)
        code, metadata = await client.get("/v1/state/metadata")
        self.assertEqual(metadata["role"], "gateway")
        await agent.link.stopService()
        again, _ = await self.connected(sim, base)
        self.assertEqual(len(sim.registrations), 1)
        self.assertEqual(again.link.identity.node_id, identity["node_id"])

    async def test_a_signing_key_sent_in_its_der_form_verifies_events(self) -> None:
        sim = await self.start_sim(der_signing_key=True)
        agent, client = await self.connected(sim)
        sim.set_data("config", "v1", 1)
        sim.push_state()
        await eventually(lambda: "config" in agent.cache.current.data, what="event applied")
        self.assertEqual(dict(agent.sync.stream.dropped), {})


class SecretTests(Fixture):
    async def test_a_secret_is_read_by_name_at_the_version_asked_for(self) -> None:
        sim = await self.start_sim()
        agent, client = await self.connected(sim)
        sim.set_secret("db-password", b"newer", 3)
        code, body = await client.get("/v1/state/secrets/db-password")
        self.assertEqual((code, body), (200, {"key": "db-password", "value": "newer", "version": 3}))
        code, body = await client.get("/v1/state/secrets/db-password?version=2")
        self.assertEqual((code, body["value"], body["version"]), (200, "s3cret-p@ssw0rd", 2))
        self.assertEqual((await client.get("/v1/state/secrets"))[1], [])

    async def test_bad_names_and_versions_are_refused_without_asking_the_platform(self) -> None:
        sim = await self.start_sim()
        agent, client = await self.connected(sim)
        before = sim.requests.count(("secret", "GET"))
        self.assertEqual(await client.get("/v1/state/secrets/db%2Fpassword"), (400, {"error": "invalid secret key"}))
        self.assertEqual(await client.get("/v1/state/secrets/Db?version=0"), (400, {"error": "invalid version"}))
        self.assertEqual(sim.requests.count(("secret", "GET")), before)

    async def test_the_platform_s_rate_limit_holds_local_reads_for_its_retry_after(self) -> None:
        sim = await self.start_sim()
        agent, client = await self.connected(sim)
        sim.faults.fail("secret", status=429, times=1, retry_after=30)
        response = await client.http.get("http://localhost/v1/state/secrets/db-password")
        self.assertEqual((response.code, json.loads(await response.content())), (429, {"error": "rate limited"}))
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"30"])
        asked = sim.requests.count(("secret", "GET"))
        response = await client.http.get("http://localhost/v1/state/secrets/db-password")
        self.assertEqual(response.code, 429)
        self.assertLessEqual(int(response.headers.getRawHeaders(b"retry-after")[0]), 30)
        await response.content()
        self.assertEqual(sim.requests.count(("secret", "GET")), asked)

    async def test_unknown_and_forbidden_secrets_keep_the_platform_s_answer(self) -> None:
        sim = await self.start_sim()
        agent, client = await self.connected(sim)
        self.assertEqual(await client.get("/v1/state/secrets/nope"), (404, {"error": "not found"}))
        sim.faults.fail("secret", status=403, times=1)
        self.assertEqual(await client.get("/v1/state/secrets/db-password"), (403, {"error": "forbidden"}))
        sim.faults.unprovision("secret")
        self.assertEqual(await client.get("/v1/state/secrets/db-password"),
                         (503, {"error": "control plane unavailable"}))


class ReportRuleTests(Fixture):
    async def test_what_the_platform_cannot_carry_is_refused_at_the_socket_and_never_stored(self) -> None:
        sim = await self.start_sim()
        agent, client = await self.connected(sim)
        self.assertEqual(await client.put_report("Bad", 1), (400, {"error": "invalid report key"}))
        self.assertEqual(await client.put_report("a%2Fb", 1), (400, {"error": "invalid report key"}))
        self.assertEqual(await client.get("/v1/state/report/Bad"), (400, {"error": "invalid report key"}))
        self.assertEqual(await client.delete_report("Bad"), (400, {"error": "invalid report key"}))
        self.assertEqual(await client.put_report("big", "é" * 2048),
                         (400, {"error": "payload exceeds the 4096-byte limit"}))
        self.assertEqual((await client.put_report("fits", "x" * 4094))[0], 200)
        self.assertEqual(await client.get("/v1/state/report"), (200, [{"key": "fits", "version": 1}]))
        await eventually(lambda: "fits" in sim.reported(), what="the report that fits")

    async def test_reports_not_provisioned_stop_report_calls_and_stay_pending(self) -> None:
        sim = await self.start_sim()
        agent, client = await self.connected(sim)
        sim.faults.unprovision("report")
        await client.put_report("a", 1)
        await eventually(lambda: agent.outbox.failures >= 1, what="the 501")
        calls = len(sim.report_calls)
        self.assertEqual(agent.outbox.depth, 1)
        await task.deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(len(sim.report_calls), calls)

    async def test_reports_kept_from_before_that_the_platform_cannot_carry_are_dropped_at_start(self) -> None:
        sim = await self.start_sim()
        # The platform's document has no such key: its delete is expected, not a fault.
        sim.exchange_checks.clear()
        base = self.mktemp()
        standalone, client = self.start_agent(sim, base, url="")
        self.assertEqual((await client.put_report("Old%2Fkey", 1))[0], 200)
        self.assertEqual((await client.put_report("kept", 2))[0], 200)
        await self.last_top.stopService()
        agent, client = await self.connected(sim, base)
        self.assertEqual(await client.get("/v1/state/report"), (200, [{"key": "kept", "version": 1}]))
        await eventually(lambda: ("DELETE", "Old/key") in [(m, k) for m, k, _ in sim.report_calls],
                         what="the dropped report's delete")
        await eventually(lambda: "kept" in sim.reported(), what="the kept report")
        # plexd sends that delete too; the simulator notes the key the platform would not name.
        self.assertEqual(sim.violations, ["report: the report key 'Old/key' is outside ^[a-z][a-z0-9._-]{0,127}$"])
        sim.violations.clear()


class NodeKeyTests(Fixture):
    async def test_a_heartbeat_asking_for_rotation_rotates_and_keeps_the_new_key_pair(self) -> None:
        sim = await self.start_sim()
        base = self.mktemp()
        agent, client = await self.connected(sim, base, heartbeat_interval=0.1)
        before = self.identity(base)["public_key"]
        sim.faults.heartbeat_rotate_keys = 1
        await eventually(lambda: agent.link.node_key_rotations == 1, what="rotation kept")
        await eventually(lambda: self.identity(base)["public_key"] != before, what="identity saved")
        self.assertEqual(sim.key_rotations[-1]["new_public_key"], self.identity(base)["public_key"])

    async def test_a_revoked_credential_enrolls_again_only_with_a_bootstrap_token(self) -> None:
        sim = await self.start_sim()
        base = self.mktemp()
        agent, client = await self.connected(sim, base, heartbeat_interval=0.1)
        first = agent.link.identity.node_id
        sim.faults.bearer_revoked = True
        await eventually(lambda: agent.link.auth_failures.get("heartbeat", 0) >= 2, what="refused heartbeats")
        self.assertEqual((len(sim.registrations), agent.link.identity.node_id), (1, first))
        token = sim.issue_bootstrap_token()
        sim.registration_hooks.append(lambda sim, node: setattr(sim.faults, "bearer_revoked", False))
        with open(os.path.join(base, "bootstrap-token"), "w") as f:
            f.write(token)
        await eventually(lambda: agent.link.identity is not None and agent.link.identity.node_id != first,
                         timeout=20, what="enrolled again")
        await eventually(lambda: self.identity(base)["node_id"] != first, what="the new identity kept")
        await eventually(lambda: sim.open_streams >= 1 and agent.heartbeat.last_success is not None,
                         what="running again")
        self.assertEqual(agent.link.reenrollments, 1)


class EventStreamTests(Fixture):
    async def test_a_stream_not_provisioned_leaves_the_node_pulling_its_state(self) -> None:
        sim = await self.start_sim()
        sim.faults.unprovision("events")
        agent, client = self.start_agent(sim, reconcile_interval=0.2)
        await eventually(lambda: sim.requests.count(("events", "GET")) == 1, what="the stream asked for")
        sim.node.metadata["role"] = "edge"
        await eventually(lambda: agent.cache.current.metadata.get("role") == "edge", what="pulled")
        self.assertEqual(sim.requests.count(("events", "GET")), 1)

    async def test_data_versions_count_value_changes_and_survive_a_restart(self) -> None:
        sim = await self.start_sim()
        base = self.mktemp()
        agent, client = await self.connected(sim, base)
        sim.set_data("config", "one", 1)
        sim.push_state()
        await eventually(lambda: "config" in agent.cache.current.data)
        sim.set_data("config", "two", 1)
        sim.push_state()
        await eventually(lambda: agent.cache.current.data["config"]["payload"] == "two")
        code, entry = await client.get("/v1/state/data/config")
        self.assertEqual((entry["version"], entry["content_type"]), (2, "text/plain; charset=utf-8"))
        await agent.link.stopService()
        again, client = await self.connected(sim, base)
        sim.push_state()
        await eventually(lambda: again.sync.fetches >= 2, what="fetched again")
        self.assertEqual((await client.get("/v1/state/data/config"))[1]["version"], 2)
