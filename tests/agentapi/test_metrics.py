"""
GET /metrics: the seed's JSON from real Docker stats and psutil, and the
agent's own metrics in Prometheus text format, parsed with
prometheus_client's parser.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.trial import unittest

from plexagent.testing.docker import AgentClient, base_image, test_client, unique_name
from plexagent.testing.fixtures import unix_http_client
from plexagent.testing.ops import start_agent


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample, by (name, sorted labels)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


class FakeOutbox:
    depth = 7
    refused = 2


class MetricsTests(unittest.TestCase):
    def setUp(self) -> None:
        self.docker = test_client(self)
        self.agent = start_agent(self, extra={"metrics": {"stats_interval": 0.2}})
        self.client = AgentClient(self.agent)
        self.sampler = self.agent.top.agent.agent_services["container_stats"]

    @defer.inlineCallbacks
    def scrape(self, **kwargs):
        response = yield self.client.request("GET", "/metrics", **kwargs)
        body = yield response.text()
        self.assertEqual(response.code, 200, body)
        return response, samples(body)

    @defer.inlineCallbacks
    def test_json_has_per_container_stats_and_system_figures(self):
        name = unique_name(self, self.docker, "metrics")
        self.docker.containers.run(base_image(), ["sh", "-c", "while true; do :; done"], name=name, detach=True)
        yield self.sampler.next_round()
        code, body = yield self.client.get("/metrics")
        self.assertEqual(code, 200)
        self.assertIs(body["docker"], True)
        entry = body["containers"][name]
        self.assertEqual(set(entry), {"id", "name", "cpu_percent", "memory", "network", "block_io", "pids"})
        self.assertGreater(entry["memory"]["usage"], 0)
        self.assertGreater(entry["memory"]["limit"], 0)
        self.assertGreater(entry["cpu_percent"], 0)
        self.assertEqual(set(entry["network"]), {"rx_bytes", "tx_bytes"})
        self.assertEqual(set(entry["block_io"]), {"read_bytes", "write_bytes"})
        self.assertNotIn(name, body["containers_pending"])
        self.assertEqual(body["stats_interval"], 0.2)
        self.assertRegex(body["sampled_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        system = body["system"]
        self.assertGreater(system["memory"]["total"], 0)
        self.assertGreater(system["disk"]["total"], 0)
        self.assertEqual(set(system["load"]), {"1m", "5m", "15m"})

    @defer.inlineCallbacks
    def test_a_stopped_container_is_no_longer_reported(self):
        name = unique_name(self, self.docker, "metrics")
        container = self.docker.containers.run(base_image(), ["sleep", "600"], name=name, detach=True)
        yield self.sampler.next_round()
        code, body = yield self.client.get("/metrics")
        self.assertIn(name, body["containers"])
        container.kill()
        yield self.sampler.next_round()
        code, body = yield self.client.get("/metrics")
        self.assertEqual(code, 200)
        self.assertNotIn(name, body["containers"])
        self.assertNotIn(name, body["containers_pending"])

    @defer.inlineCallbacks
    def test_the_answer_makes_no_docker_call(self):
        name = unique_name(self, self.docker, "metrics")
        self.docker.containers.run(base_image(), ["sleep", "600"], name=name, detach=True)
        yield self.sampler.next_round()
        calls = []
        pool = self.agent.pool
        for method in ("call", "background_call", "sampling_call"):
            real = getattr(pool, method)
            self.patch(pool, method, lambda *a, real=real, **k: calls.append(a) or real(*a, **k))
        self.sampler.stopService()  # no round meanwhile
        code, body = yield self.client.get("/metrics")
        self.assertEqual(code, 200)
        self.assertIn(name, body["containers"])
        self.assertEqual(calls, [])

    @defer.inlineCallbacks
    def test_prometheus_text_counts_requests_per_route_and_listener(self):
        for _ in range(2):
            code, _ = yield self.client.get("/cron/jobs")
            self.assertEqual(code, 200)
        code, _ = yield self.client.get("/networks/no-such-network-xyz")
        self.assertEqual(code, 404)
        code, _ = yield self.client.get("/cron/jobs", key=None)
        self.assertEqual(code, 401)

        response, found = yield self.scrape(headers={"Accept": "text/plain"})
        self.assertTrue(response.headers.getRawHeaders("content-type")[0].startswith("text/plain"))
        listener = ("listener", "agent_api.listen")
        self.assertEqual(found[("plexagent_http_requests_total",
                                (("code", "200"), listener, ("method", "GET"), ("route", "/cron/jobs")))], 2)
        self.assertEqual(found[("plexagent_http_requests_total",
                                (("code", "404"), listener, ("method", "GET"), ("route", "/networks/<n>")))], 1)
        self.assertEqual(found[("plexagent_http_requests_total",
                                (("code", "401"), listener, ("method", "GET"), ("route", "unrouted")))], 1)
        self.assertEqual(found[("plexagent_http_request_duration_seconds_count", (listener, ("route", "/cron/jobs")))], 2)
        self.assertEqual(found[("plexagent_http_request_duration_seconds_bucket",
                                (("le", "+Inf"), listener, ("route", "/cron/jobs")))], 2)

    @defer.inlineCallbacks
    def test_prometheus_text_has_pool_cron_and_control_plane_state(self):
        yield self.sampler.next_round()
        _, found = yield self.scrape(params={"format": "prometheus"})
        self.assertEqual(found[("plexagent_docker_pool_queue_length", ())], 0)
        self.assertIn(("plexagent_docker_pool_busy_threads", ()), found)
        self.assertEqual(found[("plexagent_cron_runs_total", (("result", "succeeded"),))], 0)
        self.assertEqual(found[("plexagent_cron_runs_total", (("result", "skipped"),))], 0)
        self.assertEqual(found[("plexagent_cron_jobs", ())], 0)
        self.assertGreaterEqual(found[("plexagent_container_stats_rounds_total", ())], 1)
        self.assertIn(("plexagent_container_stats_round_duration_seconds", ()), found)
        self.assertEqual(found[("plexagent_control_plane_configured", ())], 0)
        self.assertEqual(found[("plexagent_control_plane_connected", ())], 0)
        # Standalone: no outbox, no outbox metric.
        self.assertNotIn(("plexagent_outbox_depth", ()), found)

    @defer.inlineCallbacks
    def test_outbox_depth_is_read_from_the_outbox_when_there_is_one(self):
        self.agent.top.agent.agent_services["outbox"] = FakeOutbox()
        _, found = yield self.scrape(params={"format": "prometheus"})
        self.assertEqual(found[("plexagent_outbox_depth", ())], 7)

    @defer.inlineCallbacks
    def test_report_changes_the_control_plane_refused_are_counted(self):
        self.agent.top.agent.agent_services["outbox"] = FakeOutbox()
        _, found = yield self.scrape(params={"format": "prometheus"})
        self.assertEqual(found[("plexagent_outbox_refused_changes_total", ())], 2)

    @defer.inlineCallbacks
    def test_requests_on_the_local_node_api_socket_are_counted_too(self):
        http = unix_http_client(self.agent.config.node_api.socket)
        response = yield http.get("http://localhost/v1/state")
        yield response.content()
        _, found = yield self.scrape(params={"format": "prometheus"})
        keys = [labels for (name, labels) in found if name == "plexagent_http_requests_total"
                and ("listener", "node_api.socket") in labels]
        self.assertEqual(len(keys), 1, keys)
        self.assertIn(("route", "/v1/state"), keys[0])

    @defer.inlineCallbacks
    def test_unknown_format_is_400(self):
        code, body = yield self.client.get("/metrics", params={"format": "xml"})
        self.assertEqual((code, body["error"]), (400, "invalid format"))
