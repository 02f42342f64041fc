"""
What operators see of the control-plane link: GET /plexagent/status on the
Unix socket (and only there), ``plexagent status``, and the Prometheus
metrics.
"""

from __future__ import annotations

import io
import json
import os
import socket
from typing import Any

import treq
from twisted.internet import reactor, threads
from twisted.web.client import Agent, HTTPConnectionPool

from plexagent import cli
from plexagent.controlplane.status import public_url
from plexagent.metrics import AgentMetrics
from tests.controlplane.harness import AgentTestCase, eventually


def free_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


class StatusRouteTests(AgentTestCase):
    async def enrolled(self, **cp: Any) -> tuple[Any, Any, Any]:
        sim = await self.start_sim()
        agent, client = self.start_agent(sim, **cp)
        await eventually(lambda: sim.open_streams == 1, what="enrolled and streaming")
        return sim, agent, client

    async def test_the_status_names_the_protocol_node_and_signing_key_in_use(self) -> None:
        sim, agent, client = await self.enrolled()
        code, doc = await client.get("/plexagent/status")
        self.assertEqual(code, 200)
        self.assertEqual(doc["control_plane"], {"configured": True, "url": sim.url, "protocol": "plexd"})
        self.assertEqual((doc["identity"]["state"], doc["identity"]["node_id"], doc["identity"]["source"]),
                         ("enrolled", sim.node_id, "enrolled"))
        self.assertEqual(doc["signing_keys"]["current"], agent.link.ring.keys.current.fingerprint)
        self.assertEqual(doc["events"]["stream"], "connected")
        self.assertIsNotNone(doc["state"]["last_fetch"])
        self.assertEqual(doc["reports"], {"pending": 0, "refused": 0})

    async def test_dropped_events_are_counted_by_reason(self) -> None:
        sim, agent, client = await self.enrolled()
        sim.inject_event_fault("stale")
        await eventually(lambda: sum(agent.sync.stream.dropped.values()) == 1, what="the forgery dropped")
        code, doc = await client.get("/plexagent/status")
        self.assertEqual(doc["events"]["dropped"], {"stale": 1})

    async def test_nothing_secret_is_in_the_status(self) -> None:
        sim, agent, client = await self.enrolled()
        code, doc = await client.get("/plexagent/status")
        text = json.dumps(doc)
        for secret in (sim.token, sim.nsk_b64, *sim.bootstrap_tokens):
            self.assertNotIn(secret, text)

    async def test_a_node_waiting_for_a_token_says_so(self) -> None:
        sim = await self.start_sim()
        agent, client = self.start_agent(sim, bootstrap_token_file="/nonexistent/bootstrap-token")
        code, doc = await client.get("/plexagent/status")
        self.assertEqual(doc["identity"]["state"], "waiting_for_token")
        self.assertIsNone(doc["identity"]["node_id"])

    async def test_the_route_is_not_served_on_the_tcp_listener(self) -> None:
        sim = await self.start_sim()
        port = free_port()
        from plexagent.config import parse_config
        from plexagent.service import makeService
        from tests.controlplane.harness import agent_config_document, short_socket_dir, write_private

        base = self.mktemp()
        document = agent_config_document(base, sim, short_socket_dir())
        document["node_api"].update(http_enabled=True, http_listen=f"127.0.0.1:{port}",
                                    http_token_file=write_private(os.path.join(base, "api-token"), "t0ken"))
        top = makeService(parse_config(document), reactor)
        top.startService()
        self.addCleanup(top.stopService)
        http = treq.client.HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        response = await http.get(f"http://127.0.0.1:{port}/plexagent/status", headers={"Authorization": "Bearer t0ken"})
        self.assertEqual(response.code, 404)
        self.assertEqual((await response.json())["error"], "not found")
        response = await http.get(f"http://127.0.0.1:{port}/v1/state", headers={"Authorization": "Bearer t0ken"})
        self.assertEqual(response.code, 200)
        await response.content()

    async def test_plexagent_status_prints_the_status_and_json_on_request(self) -> None:
        sim, agent, client = await self.enrolled()
        socket_path = agent.config.node_api.socket
        out, err = io.StringIO(), io.StringIO()
        code = await threads.deferToThread(cli.main, ["status", "--socket", socket_path], None, out, err)
        self.assertEqual(code, 0, err.getvalue())
        text = out.getvalue()
        self.assertIn(f"control plane:  {sim.url} (protocol plexd)", text)
        self.assertIn(f"node:           {sim.node_id} (enrolled, enrolled)", text)
        self.assertIn("signing key:    sha256:", text)
        out = io.StringIO()
        code = await threads.deferToThread(cli.main, ["status", "--socket", socket_path, "--json"], None, out, err)
        self.assertEqual(json.loads(out.getvalue())["identity"]["node_id"], sim.node_id)

    async def test_the_metrics_count_the_link(self) -> None:
        sim, agent, client = await self.enrolled()
        sim.inject_event_fault("bad_signature")
        await eventually(lambda: sum(agent.sync.stream.dropped.values()) == 1, what="the forgery dropped")
        text = AgentMetrics(agent).prometheus_text().decode()
        self.assertIn(f'plexagent_control_plane_info{{node_id="{sim.node_id}",protocol="plexd"}} 1.0', text)
        self.assertIn("plexagent_control_plane_enrolled 1.0", text)
        self.assertIn('plexagent_enrollment_attempts_total{outcome="ok"} 1.0', text)
        self.assertIn('plexagent_events_dropped_total{reason="bad_signature"} 1.0', text)
        self.assertIn('plexagent_signing_key_rotations_total{source="registration"} 1.0', text)
        self.assertIn('plexagent_signing_key_info{key_id="sha256:', text)
        self.assertIn("plexagent_heartbeat_failures_total 0.0", text)


class StandaloneStatusTests(AgentTestCase):
    def test_plexagent_status_says_when_the_agent_cannot_be_reached(self) -> None:
        err = io.StringIO()
        self.assertEqual(cli.main(["status", "--socket", "/nonexistent/api.sock"], None, io.StringIO(), err), 1)
        self.assertIn("cannot reach the agent at /nonexistent/api.sock", err.getvalue())

    def test_a_standalone_agent_s_status(self) -> None:
        doc = cli.format_status({"agent_version": "1", "control_plane": {"configured": False}}, 0)
        self.assertIn("none (standalone)", doc)

    def test_the_url_is_shown_without_credentials(self) -> None:
        self.assertEqual(public_url("https://user:pw@cp.example:8443/base"), "https://cp.example:8443/base")
        self.assertEqual(public_url("https://cp.example"), "https://cp.example")
