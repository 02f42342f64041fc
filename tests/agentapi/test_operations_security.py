"""
Every route of the operations sections sits behind the agent API's
security layers: without the API key nothing is run (no systemctl call,
no ufw, no Docker), and with an IP allowlist other peers are refused.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from plexagent.testing.docker import AgentClient
from plexagent.testing.ops import FakeSystemctl, start_agent

ROUTES = [
    ("POST", "/networks/create", {"name": "pa-test-never"}),
    ("GET", "/networks/bridge", None),
    ("GET", "/nginx/test", None),
    ("POST", "/nginx/reload", None),
    ("GET", "/cron/jobs", None),
    ("POST", "/cron/run-docker", {"schedule": "@daily", "image": "busybox"}),
    ("POST", "/cron/remove", {"job_id": "cron_x"}),
    ("GET", "/services/nginx/status", None),
    ("POST", "/services/nginx/restart", None),
    ("GET", "/firewall/status", None),
    ("POST", "/firewall/allow", {"port": 80}),
    ("GET", "/metrics", None),
]


class SecurityTests(unittest.TestCase):
    def setUp(self) -> None:
        self.systemctl = FakeSystemctl(self)
        self.systemctl.add_unit("nginx", ActiveState="active")

    @defer.inlineCallbacks
    def test_without_the_api_key_every_route_is_401_and_runs_nothing(self):
        agent = start_agent(self, extra={"system": {"path": self.systemctl.path, "ufw": ["no-such-ufw"]},
                                         "nginx": {"command": ["no-such-nginx"]}})
        client = AgentClient(agent)
        for method, path, body in ROUTES:
            code, answer = yield client.call(method, path, key=None, **({"json": body} if body else {}))
            self.assertEqual(code, 401, path)
            code, answer = yield client.call(method, path, key="0" * 64, **({"json": body} if body else {}))
            self.assertEqual(code, 401, path)
        self.assertEqual(self.systemctl.calls(), [])
        self.assertEqual(agent.top.agent.agent_services["cron"].jobs, {})

    @defer.inlineCallbacks
    def test_a_peer_outside_the_allowlist_is_403_even_with_the_key(self):
        agent = start_agent(self, allowed_ips=("10.9.9.9/32",), extra={"system": {"path": self.systemctl.path}})
        client = AgentClient(agent)
        for method, path, body in ROUTES:
            code, _ = yield client.call(method, path, **({"json": body} if body else {}))
            self.assertEqual(code, 403, path)
        self.assertEqual(self.systemctl.calls(), [])


class DockerUnavailableTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_metrics_without_docker_still_report_the_system(self):
        agent = start_agent(self, docker_host_url="unix:///nonexistent/pa-test-docker.sock")
        code, body = yield AgentClient(agent).get("/metrics")
        self.assertEqual(code, 200)
        self.assertIs(body["docker"], False)
        self.assertEqual(body["containers"], {})
        self.assertGreater(body["system"]["memory"]["total"], 0)

    @defer.inlineCallbacks
    def test_networks_without_docker_are_503(self):
        agent = start_agent(self, docker_host_url="unix:///nonexistent/pa-test-docker.sock")
        code, body = yield AgentClient(agent).get("/networks/bridge")
        self.assertEqual((code, body["error"]), (503, "docker unavailable"))
