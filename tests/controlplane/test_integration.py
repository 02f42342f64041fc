"""
The agent against the control-plane simulator on real loopback TCP, one
test per fault the simulator can inject (plexagent.testing.simulator.Faults).
Each class is written once, over the simulator's protocol-neutral
operations, and runs once per protocol (tests/controlplane/protocols.py).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor

from plexagent.testing.simulator import ControlPlaneSimulator
from tests.controlplane.harness import AgentTestCase, eventually
from tests.controlplane.protocols import for_each_protocol


def entry(key: str, payload: Any, version: int) -> dict[str, Any]:
    return {"key": key, "content_type": "application/json", "payload": payload, "version": version,
            "updated_at": "2026-01-01T00:00:00Z"}


def push(sim: ControlPlaneSimulator, value: Any, version: int) -> str:
    """Change the node's state at the control plane and tell the node (an event)."""
    sim.set_metadata({"region": "test"})
    sim.set_data("config", value, version)
    return sim.push_state()


class Fixture:
    testcase_base = AgentTestCase

    async def connected_agent(self, sim: ControlPlaneSimulator, **cp: Any) -> tuple[Any, Any]:
        agent, client = self.start_agent(sim, **cp)
        await eventually(lambda: sim.open_streams == 1, what="event stream")
        return agent, client

    async def data_value(self, client: Any, key: str = "config") -> Any:
        code, body = await client.get("/v1/state/data/" + key)
        return body.get("payload") if code == 200 else None


@for_each_protocol()
class EventStreamIntegrationTests(Fixture):
    async def test_published_state_is_readable_on_the_socket(self) -> None:
        sim = await self.start_sim()
        agent, client = await self.connected_agent(sim)
        push(sim, "v1", 1)
        await eventually(lambda: agent.cache.current.data.get("config") is not None, what="event applied")
        self.assertEqual(await self.data_value(client), "v1")
        code, metadata = await client.get("/v1/state/metadata")
        self.assertEqual(metadata, {"region": "test"})

    async def test_drop_mid_event_reconnects_with_last_event_id_and_reconciles(self) -> None:
        sim = await self.start_sim()
        agent, client = await self.connected_agent(sim)
        first = push(sim, "v1", 1)
        await eventually(lambda: "config" in agent.cache.current.data)
        fetches = sim.requests.count(("state", "GET"))
        sim.drop_streams(mid_event=True)
        await eventually(lambda: sim.open_streams == 1 and len(sim.stream_requests) == 2, what="reconnect")
        self.assertEqual(sim.stream_requests[-1], first)
        await eventually(lambda: sim.requests.count(("state", "GET")) > fetches, what="reconcile")
        push(sim, "v2", 2)
        await eventually(lambda: agent.cache.current.data["config"]["payload"] == "v2")
        self.assertEqual(agent.sync.stream.connections, 2)

    async def test_events_missed_while_disconnected_are_replayed(self) -> None:
        sim = await self.start_sim()
        agent, client = await self.connected_agent(sim)
        push(sim, "v1", 1)
        await eventually(lambda: "config" in agent.cache.current.data)
        sim.drop_streams()
        # Published while the agent is away: the replay or the reconcile brings it.
        push(sim, "v2", 2)
        await eventually(lambda: agent.cache.current.data["config"]["payload"] == "v2")

    async def test_garbage_lines_are_ignored_and_the_stream_goes_on(self) -> None:
        sim = await self.start_sim()
        agent, client = await self.connected_agent(sim)
        sim.send_garbage()
        push(sim, "after-garbage", 1)
        await eventually(lambda: "config" in agent.cache.current.data)
        self.assertEqual(await self.data_value(client), "after-garbage")
        self.assertEqual(agent.sync.stream.connections, 1)

    async def test_silent_stream_is_reconnected_by_the_watchdog(self) -> None:
        sim = await self.start_sim(keepalive=0.05)
        agent, client = await self.connected_agent(sim, events_idle_timeout=0.3)
        sim.faults.silent_stream = True
        await eventually(lambda: len(sim.stream_requests) >= 2, what="watchdog reconnect")
        sim.faults.silent_stream = False
        await eventually(lambda: sim.open_streams == 1)
        push(sim, "after-silence", 1)
        await eventually(lambda: "config" in agent.cache.current.data)

    async def test_keepalives_keep_a_quiet_stream_alive(self) -> None:
        sim = await self.start_sim(keepalive=0.05)
        agent, client = await self.connected_agent(sim, events_idle_timeout=0.3)
        start = reactor.seconds()
        await eventually(lambda: reactor.seconds() - start > 1.0, what="a second of keep-alives")
        self.assertEqual(len(sim.stream_requests), 1)

    async def test_event_stream_refused_with_retry_after_is_retried_later(self) -> None:
        sim = await self.start_sim()
        self.allow_fault("GetNodeEvents", 429)
        sim.faults.fail("events", status=429, times=1, retry_after=1)
        agent, client = self.start_agent(sim)
        await eventually(lambda: sim.open_streams == 1, what="stream after Retry-After")
        times = [t for t, e in sim.request_times if e == "events"]
        self.assertGreaterEqual(times[1] - times[0], 1.0)


    async def test_event_stream_slow_past_the_timeout_is_retried(self) -> None:
        sim = await self.start_sim()
        sim.faults.slow("events", 5.0)
        agent, client = self.start_agent(sim, request_timeout=0.3)
        await eventually(lambda: len(sim.stream_requests) >= 2, timeout=20, what="retry after timeout")
        self.assertFalse(agent.sync.stream.connected)
        sim.faults.delays.clear()
        await eventually(lambda: agent.sync.stream.connected, timeout=20, what="stream connected")
        push(sim, "late", 1)
        await eventually(lambda: "config" in agent.cache.current.data)


@for_each_protocol(requires=frozenset({"secret_index"}))
class SecretIndexEventTests(Fixture):
    async def test_secrets_event_replaces_the_secret_index(self) -> None:
        sim = await self.start_sim()
        agent, client = await self.connected_agent(sim)
        sim.set_secret("api/key", b"k", 9)
        sim.push_secret_index()
        await eventually(lambda: "api/key" in agent.cache.current.secret_refs)
        code, index = await client.get("/v1/state/secrets")
        self.assertIn({"key": "api/key", "version": 9}, index)


@for_each_protocol()
class StateFetchIntegrationTests(Fixture):
    async def test_control_plane_down_at_start_socket_serves_cache_then_catches_up(self) -> None:
        sim = await self.start_sim()
        await sim.stop()
        agent, client = self.start_agent(sim)
        code, body = await client.get("/v1/state")
        self.assertEqual(code, 200)
        self.assertEqual(body["metadata"], {})
        await sim.start(reactor)
        await eventually(lambda: agent.cache.current.metadata.get("role") == "gateway", timeout=20)
        await eventually(lambda: sim.open_streams == 1, timeout=20)

    async def test_control_plane_going_down_and_back(self) -> None:
        sim = await self.start_sim()
        agent, client = await self.connected_agent(sim)
        await sim.stop()
        code, body = await client.get("/v1/state/metadata/role")
        self.assertEqual((code, body["value"]), (200, "gateway"))
        await sim.start(reactor)
        await eventually(lambda: sim.open_streams == 1, timeout=20, what="stream back")
        push(sim, "back", 1)
        await eventually(lambda: "config" in agent.cache.current.data)

    async def test_state_5xx_is_retried(self) -> None:
        sim = await self.start_sim()
        sim.faults.fail("state", status=500, times=2)
        agent, client = self.start_agent(sim)
        await eventually(lambda: agent.cache.current.metadata.get("role") == "gateway", timeout=20)
        self.assertEqual(sim.requests.count(("state", "GET")), 3)

    async def test_state_429_retry_after_is_honoured(self) -> None:
        sim = await self.start_sim()
        self.allow_fault("GetNodeState", 429)
        sim.faults.fail("state", status=429, times=1, retry_after=2)
        agent, client = self.start_agent(sim)
        await eventually(lambda: agent.cache.current.metadata.get("role") == "gateway", timeout=20)
        times = [t for t, e in sim.request_times if e == "state"]
        self.assertGreaterEqual(times[1] - times[0], 2)

    async def test_slow_answer_past_the_timeout_is_abandoned_and_retried(self) -> None:
        sim = await self.start_sim()
        sim.faults.slow("state", 3.0)
        agent, client = self.start_agent(sim, request_timeout=0.3)
        await eventually(lambda: sim.requests.count(("state", "GET")) >= 2, what="retry after timeout")
        self.assertEqual(agent.cache.current.metadata, {})
        sim.faults.delays.clear()
        await eventually(lambda: agent.cache.current.metadata.get("role") == "gateway", timeout=20)

    async def test_heartbeat_answering_reconcile_fetches_state(self) -> None:
        sim = await self.start_sim()
        agent, client = await self.connected_agent(sim, heartbeat_interval=0.1)
        # Settled: the first heartbeat answered, the fetches of the start (and of the connection) done.
        settled_fetches = 2 if agent.link.protocol.pull_on_every_connect else 1
        await eventually(lambda: bool(sim.heartbeats) and agent.sync.fetches >= settled_fetches
                         and agent.sync._inflight is None, what="the agent settled")
        fetches = sim.requests.count(("state", "GET"))
        sim.node.metadata["role"] = "edge"  # changed without an event
        sim.faults.heartbeat_reconcile = 1
        await eventually(lambda: agent.cache.current.metadata.get("role") == "edge", what="reconcile")
        self.assertGreater(sim.requests.count(("state", "GET")), fetches)
        body = sim.heartbeats[0]
        self.assertEqual(list(body), self.protocol.heartbeat_members)  # type: ignore[attr-defined]
        self.assertEqual(sim.violations, [])

    async def test_reconcile_interval_fetches_periodically(self) -> None:
        sim = await self.start_sim()
        agent, client = await self.connected_agent(sim, reconcile_interval=0.2)
        sim.node.metadata["role"] = "edge"
        await eventually(lambda: agent.cache.current.metadata.get("role") == "edge", what="periodic reconcile")

    async def test_tampered_secret_is_a_generic_decryption_failure(self) -> None:
        sim = await self.start_sim()
        agent, client = await self.connected_agent(sim)
        sim.faults.tamper_secrets = True
        code, body = await client.get("/v1/state/secrets/" + self.protocol.secret_path)  # type: ignore
        self.assertEqual((code, body["error"]), (500, "decryption failed"))
        self.assertNotIn("s3cret", str(body))


@for_each_protocol()
class ReportSyncIntegrationTests(Fixture):
    async def test_acknowledged_changes_reach_the_control_plane(self) -> None:
        sim = await self.start_sim()
        agent, client = await self.connected_agent(sim)
        for i in range(20):
            code, _ = await client.put_report(f"k{i}", {"n": i})
            self.assertEqual(code, 200)
        code, _ = await client.delete_report("k3")
        self.assertEqual(code, 204)
        await eventually(lambda: agent.outbox.depth == 0 and len(sim.reported()) == 19)
        self.assertNotIn("k3", sim.reported())
        self.assertEqual(sim.reported()["k7"]["payload"], {"n": 7})

    async def test_report_5xx_for_a_while_loses_nothing(self) -> None:
        sim = await self.start_sim()
        agent, client = await self.connected_agent(sim)
        sim.faults.fail("report", status=503, times=3)
        acknowledged, versions = {}, {}
        for i in range(10):
            code, body = await client.put_report(f"r{i}", i)
            acknowledged[body["key"]], versions[body["key"]] = i, body["version"]
        await eventually(lambda: agent.outbox.failures >= 1, what="first failure")
        self.assertGreater(agent.outbox.depth, 0)
        await eventually(lambda: agent.outbox.depth == 0, timeout=30, what="outbox drained")
        self.assertEqual({k: e["payload"] for k, e in sim.reported().items()}, acknowledged)
        if "report_versions" in self.protocol.capabilities:  # type: ignore[attr-defined]
            self.assertEqual({k: e["version"] for k, e in sim.reported().items()}, versions)

    async def test_report_429_waits_for_retry_after(self) -> None:
        sim = await self.start_sim()
        self.allow_fault("PutNodeStateReport", 429)
        agent, client = await self.connected_agent(sim)
        sim.faults.fail("report", status=429, times=1, retry_after=1)
        await client.put_report("a", 1)
        await eventually(lambda: "a" in sim.reported(), timeout=20)
        times = [t for t, e in sim.request_times if e == "report"]
        self.assertGreaterEqual(times[1] - times[0], 1.0)

    async def test_changes_during_an_outage_are_sent_when_it_ends(self) -> None:
        sim = await self.start_sim()
        agent, client = await self.connected_agent(sim)
        await sim.stop()
        for i in range(5):
            await client.put_report(f"o{i}", i)
        await client.delete_report("o0")
        await eventually(lambda: agent.outbox.failures >= 1)
        self.assertEqual(agent.outbox.depth, 5)
        await sim.start(reactor)
        await eventually(lambda: agent.outbox.depth == 0, timeout=40, what="outbox drained")
        self.assertEqual(sorted(sim.reported()), ["o1", "o2", "o3", "o4"])


@for_each_protocol()
class PoisonedReportTests(Fixture):
    """One change nobody can use never stops the delivery of the others."""

    async def test_a_batch_refused_for_one_key_still_delivers_every_other(self) -> None:
        sim = await self.start_sim()
        agent, client = await self.connected_agent(sim)
        sim.faults.refuse_report_key("poison", status=self.protocol.refused_report_status)  # type: ignore
        for key in ("a", "b", "poison", "c", "d"):
            self.assertEqual((await client.put_report(key, {"k": key}))[0], 200)
        await eventually(lambda: agent.outbox.depth == 0, timeout=20, what="outbox drained")
        self.assertEqual(sorted(sim.reported()), ["a", "b", "c", "d"])
        self.assertEqual(agent.outbox.refused, 1)
        # Later reports keep arriving.
        await client.put_report("e", 1)
        await eventually(lambda: "e" in sim.reported(), timeout=20, what="a later report")

    async def test_payloads_json_cannot_carry_are_400_and_sync_goes_on(self) -> None:
        sim = await self.start_sim()
        agent, client = await self.connected_agent(sim)
        for raw in (b'{"content_type":"a","payload":"\\udc80"}', b'{"content_type":"a","payload":NaN}',
                    b'{"content_type":"a","payload":[Infinity]}', b'{"content_type":"a","payload":1e400}'):
            response = await client.http.request("PUT", "http://localhost/v1/state/report/bad", data=raw)
            body = json.loads(await response.content())
            self.assertEqual(response.code, 400, raw)
            self.assertIn("error", body)
        self.assertEqual(await client.get("/v1/state/report"), (200, []))
        await client.put_report("good", 1)
        await eventually(lambda: "good" in sim.reported(), timeout=20, what="the good report")
        self.assertEqual(sorted(sim.reported()), ["good"])


@for_each_protocol()
class NoSecretsInLogsTests(Fixture):
    async def test_no_token_key_or_secret_value_is_logged_through_faults(self) -> None:
        from twisted.logger import formatEvent, globalLogPublisher

        lines: list[str] = []

        def observer(event: dict[str, Any]) -> None:
            lines.append(formatEvent(event) + repr(event.get("log_failure", "")))

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        sim = await self.start_sim()
        sim.faults.fail("state", status=500, times=1)
        sim.faults.fail("report", status=503, times=2)
        agent, client = self.start_agent(sim, heartbeat_interval=0.1)
        await eventually(lambda: sim.open_streams == 1, timeout=20)
        await client.put_report("r", {"x": 1})
        code, body = await client.get("/v1/state/secrets/" + self.protocol.secret_path)  # type: ignore
        self.assertEqual((code, body["value"]), (200, "s3cret-p@ssw0rd"))
        sim.inject_event_fault("bad_signature")
        sim.drop_streams(mid_event=True)
        await eventually(lambda: "r" in sim.reported(), timeout=20)
        text = "\n".join(lines)
        self.assertIn("report sync failed", text)
        for secret in (sim.token, sim.nsk_b64, "s3cret-p@ssw0rd"):
            self.assertNotIn(secret, text)
