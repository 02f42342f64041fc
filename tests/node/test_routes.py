"""
The Local Node API over a real Unix socket and loopback TCP, against the
control-plane simulator: every route of the guide, its shapes and errors.
"""

from __future__ import annotations

import json
import os
import stat

import treq
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from plexagent.service import makeService
from plexagent.testing import ControlPlaneSimulator
from plexagent.testing.fixtures import AgentSandbox, json_response, unix_http_client

BASE = "http://localhost"


class AgentCase(unittest.TestCase):
    """Starts a simulator and an in-process agent for each test."""

    with_control_plane = True

    async def start_agent(self, sandbox: AgentSandbox | None = None) -> None:
        self.sandbox = sandbox or self.sandbox
        self.service = makeService(self.sandbox.config(), reactor)
        self.service.startService()
        self.addCleanup(self.stop_agent)
        if self.with_control_plane:
            # Wait until the first state fetch has been applied.
            for _ in range(200):
                if self.service.agent.cache.current.metadata:
                    break
                await task.deferLater(reactor, 0.01, lambda: None)

    async def stop_agent(self) -> None:
        if self.service is not None and self.service.running:
            await self.service.stopService()

    async def setUp(self) -> None:
        self.service = None
        self.sim = None
        if self.with_control_plane:
            self.sim = ControlPlaneSimulator.example()
            await self.sim.start(reactor)
            self.addCleanup(lambda: defer.ensureDeferred(self.sim.stop()))
        self.sandbox = AgentSandbox(control_plane=self.sim)
        self.addCleanup(self.sandbox.cleanup)
        self.client = unix_http_client(self.sandbox.socket)
        await self.start_agent()

    async def get(self, path: str, **kw: object) -> tuple[int, object]:
        return await json_response(await self.client.get(BASE + path, **kw))

    async def put(self, path: str, body: object, headers: dict | None = None) -> tuple[int, object]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await json_response(await self.client.put(BASE + path, data=data, headers=headers or {}))

    async def delete(self, path: str, headers: dict | None = None) -> tuple[int, object]:
        return await json_response(await self.client.delete(BASE + path, headers=headers or {}))


class StateRoutesTests(AgentCase):
    async def test_state_summarises_metadata_data_secrets_and_reports(self) -> None:
        await self.put("/v1/state/report/health", {"content_type": "application/json", "payload": {"ok": 1}})
        code, body = await self.get("/v1/state")
        self.assertEqual(code, 200)
        self.assertEqual(
            body,
            {
                "metadata": {"node_id": "edge-us-west-42", "region": "us-west-2", "role": "gateway"},
                "data_keys": [
                    {"key": "nginx.conf", "version": 3, "content_type": "text/plain"},
                    {"key": "routes.json", "version": 1, "content_type": "application/json"},
                ],
                "secret_keys": [{"key": "db/password", "version": 2}, {"key": "tls/server.key", "version": 1}],
                "report_keys": [{"key": "health", "version": 1}],
            },
        )

    async def test_responses_are_json(self) -> None:
        response = await self.client.get(BASE + "/v1/state")
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        await response.content()

    async def test_metadata_lists_all_keys(self) -> None:
        code, body = await self.get("/v1/state/metadata")
        self.assertEqual((code, body), (200, {"node_id": "edge-us-west-42", "region": "us-west-2", "role": "gateway"}))

    async def test_metadata_key_returns_key_and_value(self) -> None:
        self.assertEqual(await self.get("/v1/state/metadata/region"), (200, {"key": "region", "value": "us-west-2"}))

    async def test_unknown_metadata_key_is_404(self) -> None:
        self.assertEqual(await self.get("/v1/state/metadata/nope"), (404, {"error": "not found"}))

    async def test_data_lists_summaries_without_payload(self) -> None:
        code, body = await self.get("/v1/state/data")
        self.assertEqual(code, 200)
        self.assertEqual(
            body,
            [
                {"key": "nginx.conf", "version": 3, "content_type": "text/plain"},
                {"key": "routes.json", "version": 1, "content_type": "application/json"},
            ],
        )

    async def test_data_entry_is_returned_whole(self) -> None:
        self.assertEqual(
            await self.get("/v1/state/data/routes.json"),
            (
                200,
                {
                    "key": "routes.json",
                    "content_type": "application/json",
                    "payload": {"default_backend": "10.0.0.5:8080"},
                    "version": 1,
                    "updated_at": "2025-06-01T12:34:56Z",
                },
            ),
        )

    async def test_unknown_data_key_is_404(self) -> None:
        self.assertEqual(await self.get("/v1/state/data/missing"), (404, {"error": "not found"}))

    async def test_secret_index_lists_keys_and_versions(self) -> None:
        self.assertEqual(
            await self.get("/v1/state/secrets"),
            (200, [{"key": "db/password", "version": 2}, {"key": "tls/server.key", "version": 1}]),
        )

    async def test_openapi_document_is_served(self) -> None:
        code, body = await self.get("/openapi.json")
        self.assertEqual((code, body["openapi"]), (200, "3.1.0"))
        self.assertIn("/v1/state/report/{key}", body["paths"])

    async def test_unknown_path_is_json_404(self) -> None:
        self.assertEqual(await self.get("/v1/nothing"), (404, {"error": "not found"}))

    async def test_wrong_method_is_json_405(self) -> None:
        response = await self.client.post(BASE + "/v1/state", data=b"{}")
        code, body = await json_response(response)
        self.assertEqual((code, body), (405, {"error": "method not allowed"}))
        self.assertIn(b"GET", response.headers.getRawHeaders(b"allow")[0])


class SecretReadTests(AgentCase):
    async def test_root_reads_a_secret_with_percent_encoded_slash(self) -> None:
        self.assertEqual(
            await self.get("/v1/state/secrets/db%2Fpassword"),
            (200, {"key": "db/password", "value": "s3cret-p@ssw0rd", "version": 2}),
        )

    async def test_each_read_fetches_from_the_control_plane(self) -> None:
        await self.get("/v1/state/secrets/db%2Fpassword")
        self.sim.set_secret("db/password", b"rotated", 2)
        self.assertEqual((await self.get("/v1/state/secrets/db%2Fpassword"))[1]["value"], "rotated")

    async def test_unknown_secret_is_404(self) -> None:
        self.assertEqual(await self.get("/v1/state/secrets/nope"), (404, {"error": "not found"}))

    async def test_secret_unknown_to_the_control_plane_is_404(self) -> None:
        del self.sim.node.secrets["db/password"]
        self.assertEqual(await self.get("/v1/state/secrets/db%2Fpassword"), (404, {"error": "not found"}))

    async def test_control_plane_down_is_503(self) -> None:
        await self.sim.stop()
        self.assertEqual(
            await self.get("/v1/state/secrets/db%2Fpassword"), (503, {"error": "control plane unavailable"})
        )

    async def test_control_plane_5xx_is_503(self) -> None:
        self.sim.faults.fail("secret", status=500)
        self.assertEqual(
            await self.get("/v1/state/secrets/db%2Fpassword"), (503, {"error": "control plane unavailable"})
        )

    async def test_control_plane_slower_than_the_timeout_is_503(self) -> None:
        self.sim.faults.delay = 5.0
        self.assertEqual(
            await self.get("/v1/state/secrets/db%2Fpassword"), (503, {"error": "control plane unavailable"})
        )

    async def test_tampered_ciphertext_is_500_decryption_failed(self) -> None:
        self.sim.faults.tamper_secrets = True
        self.assertEqual(await self.get("/v1/state/secrets/db%2Fpassword"), (500, {"error": "decryption failed"}))

    async def test_secret_values_are_never_persisted(self) -> None:
        await self.get("/v1/state/secrets/db%2Fpassword")
        await self.stop_agent()
        for directory, _, files in os.walk(self.sandbox.root):
            for name in files:
                with open(os.path.join(directory, name), "rb") as f:
                    self.assertNotIn(b"s3cret-p@ssw0rd", f.read(), name)


class ReportTests(AgentCase):
    with_control_plane = False

    async def test_put_creates_version_1(self) -> None:
        code, body = await self.put(
            "/v1/state/report/health",
            {"content_type": "application/json", "payload": {"status": "healthy", "uptime_s": 86400}},
        )
        self.assertEqual(code, 200)
        self.assertEqual(body["key"], "health")
        self.assertEqual(body["version"], 1)
        self.assertEqual(body["payload"], {"status": "healthy", "uptime_s": 86400})
        self.assertRegex(body["updated_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")

    async def test_put_with_matching_if_match_increments_version(self) -> None:
        await self.put("/v1/state/report/health", {"content_type": "a", "payload": 1})
        code, body = await self.put("/v1/state/report/health", {"content_type": "a", "payload": 2}, {"If-Match": "1"})
        self.assertEqual((code, body["version"], body["payload"]), (200, 2, 2))

    async def test_put_with_stale_if_match_is_409(self) -> None:
        await self.put("/v1/state/report/health", {"content_type": "a", "payload": 1})
        await self.put("/v1/state/report/health", {"content_type": "a", "payload": 2})
        self.assertEqual(
            await self.put("/v1/state/report/health", {"content_type": "a", "payload": 3}, {"If-Match": "1"}),
            (409, {"error": "version conflict"}),
        )
        self.assertEqual((await self.get("/v1/state/report/health"))[1]["payload"], 2)

    async def test_if_match_zero_creates_a_new_key(self) -> None:
        code, body = await self.put("/v1/state/report/new", {"content_type": "a", "payload": 1}, {"If-Match": "0"})
        self.assertEqual((code, body["version"]), (200, 1))

    async def test_if_match_zero_on_an_existing_key_is_409(self) -> None:
        await self.put("/v1/state/report/k", {"content_type": "a", "payload": 1})
        code, _ = await self.put("/v1/state/report/k", {"content_type": "a", "payload": 1}, {"If-Match": "0"})
        self.assertEqual(code, 409)

    async def test_non_integer_if_match_is_400(self) -> None:
        for value in ("abc", "-1", "1.5", ""):
            self.assertEqual(
                await self.put("/v1/state/report/k", {"content_type": "a", "payload": 1}, {"If-Match": value}),
                (400, {"error": "If-Match must be an integer"}),
                value,
            )

    async def test_invalid_json_body_is_400_saying_where(self) -> None:
        self.assertEqual(
            await self.put("/v1/state/report/k", b"{not json"),
            (400, {"error": "invalid JSON body",
                   "details": "Expecting property name enclosed in double quotes at line 1, column 2"}),
        )

    async def test_what_strict_json_refuses_is_400_and_changes_nothing(self) -> None:
        _, before = await self.put("/v1/state/report/k", {"content_type": "a", "payload": {"ok": 1}})
        for body in (
            b'{"content_type": "a", "payload": NaN}',
            b'{"content_type": "a", "payload": [Infinity]}',
            b'{"content_type": "a", "payload": -Infinity}',
            b'{"content_type": "a", "payload": 1e400}',
            b'{"content_type": "a", "payload": 99999999999999999999}',
            b'{"content_type": "a", "payload": "\\udc00"}',
            b'{"content_type": "a", "payload": {"\\udc00": 1}}',
            b'{"content_type": "\\ud800", "payload": 1}',
            b'{"content_type": "a", "payload": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        ):
            for headers in ({}, {"If-Match": "1"}):
                code, doc = await self.put("/v1/state/report/k", body, headers)
                self.assertEqual((code, doc["error"]), (400, "invalid JSON body"), body[:60])
                self.assertTrue(doc["details"])
            code, doc = await self.put("/v1/state/report/new", body)
            self.assertEqual(code, 400, body[:60])
        self.assertEqual(await self.get("/v1/state/report/k"), (200, before))
        self.assertEqual(await self.get("/v1/state/report"), (200, [{"key": "k", "version": 1}]))

    async def test_missing_content_type_is_400(self) -> None:
        self.assertEqual(
            await self.put("/v1/state/report/k", {"payload": 1}), (400, {"error": "content_type is required"})
        )

    async def test_content_type_that_is_not_a_string_is_400_saying_so(self) -> None:
        for value, kind in ((5, "a number"), (["a"], "an array"), (True, "a boolean"), ({}, "an object")):
            code, doc = await self.put("/v1/state/report/k", {"content_type": value, "payload": 1})
            self.assertEqual((code, doc["error"]), (400, "content_type must be a string"), value)
            self.assertIn(kind, doc["details"])
        self.assertEqual(await self.get("/v1/state/report"), (200, []))

    async def test_missing_payload_is_400(self) -> None:
        self.assertEqual(
            await self.put("/v1/state/report/k", {"content_type": "a"}), (400, {"error": "payload must be valid JSON"})
        )

    async def test_body_over_one_mebibyte_is_413(self) -> None:
        big = {"content_type": "a", "payload": "x" * (1024 * 1024)}
        code, body = await self.put("/v1/state/report/k", big)
        self.assertEqual(code, 413)
        self.assertEqual(body["error"], "request body too large")
        self.assertEqual(await self.get("/v1/state/report"), (200, []))

    async def test_get_returns_the_entry(self) -> None:
        _, put = await self.put("/v1/state/report/inventory", {"content_type": "text/plain", "payload": "x"})
        self.assertEqual(await self.get("/v1/state/report/inventory"), (200, put))

    async def test_list_shows_keys_and_versions(self) -> None:
        await self.put("/v1/state/report/health", {"content_type": "a", "payload": 1})
        await self.put("/v1/state/report/health", {"content_type": "a", "payload": 2})
        await self.put("/v1/state/report/inventory", {"content_type": "a", "payload": 1})
        self.assertEqual(
            await self.get("/v1/state/report"),
            (200, [{"key": "health", "version": 2}, {"key": "inventory", "version": 1}]),
        )

    async def test_delete_is_204_with_empty_body(self) -> None:
        await self.put("/v1/state/report/health", {"content_type": "a", "payload": 1})
        response = await self.client.delete(BASE + "/v1/state/report/health")
        self.assertEqual(response.code, 204)
        self.assertEqual(await response.content(), b"")
        self.assertEqual(await self.get("/v1/state/report/health"), (404, {"error": "not found"}))

    async def test_delete_of_missing_key_is_404(self) -> None:
        self.assertEqual(await self.delete("/v1/state/report/nope"), (404, {"error": "not found"}))

    async def test_recreated_key_continues_its_version(self) -> None:
        # The control plane treats (key, version) as idempotent: a re-created
        # key must not reuse a version it has already seen.
        await self.put("/v1/state/report/k", {"content_type": "a", "payload": 1})
        await self.delete("/v1/state/report/k")
        code, body = await self.put("/v1/state/report/k", {"content_type": "a", "payload": 2}, {"If-Match": "0"})
        self.assertEqual((code, body["version"]), (200, 2))

    async def test_percent_encoded_keys_round_trip(self) -> None:
        code, body = await self.put("/v1/state/report/app%2Fhealth", {"content_type": "a", "payload": 1})
        self.assertEqual((code, body["key"]), (200, "app/health"))
        self.assertEqual((await self.get("/v1/state/report/app%2Fhealth"))[1]["key"], "app/health")

    async def test_hostile_keys_never_name_files(self) -> None:
        for key in ("..%2F..%2Fetc%2Fpasswd", "..", "a%2F..%2F..%2Fx"):
            code, _ = await self.put(f"/v1/state/report/{key}", {"content_type": "a", "payload": 1})
            self.assertEqual(code, 200, key)
        self.assertEqual(sorted(os.listdir(self.sandbox.data_dir)), ["reports"])
        self.assertEqual(os.listdir(os.path.join(self.sandbox.data_dir, "reports")), ["reports.log"])

    async def test_nul_and_overlong_keys_are_400(self) -> None:
        self.assertEqual((await self.put("/v1/state/report/a%00b", {"content_type": "a", "payload": 1}))[0], 400)
        self.assertEqual((await self.put("/v1/state/report/" + "k" * 600, {"content_type": "a", "payload": 1}))[0], 400)

    async def test_fifty_concurrent_puts_with_one_if_match_give_exactly_one_200(self) -> None:
        await self.put("/v1/state/report/race", {"content_type": "a", "payload": 0})
        clients = [unix_http_client(self.sandbox.socket) for _ in range(50)]
        results = await defer.gatherResults(
            [
                defer.ensureDeferred(
                    json_response(
                        await c.put(
                            BASE + "/v1/state/report/race",
                            data=json.dumps({"content_type": "a", "payload": i}).encode(),
                            headers={"If-Match": "1"},
                        )
                    )
                )
                for i, c in enumerate(clients)
            ]
        )
        codes = sorted(code for code, _ in results)
        self.assertEqual(codes, [200] + [409] * 49)
        self.assertEqual((await self.get("/v1/state/report/race"))[1]["version"], 2)

    async def test_acknowledged_reports_survive_a_restart(self) -> None:
        await self.put("/v1/state/report/a", {"content_type": "a", "payload": "one"})
        await self.put("/v1/state/report/b", {"content_type": "a", "payload": "two"})
        await self.delete("/v1/state/report/a")
        await self.stop_agent()
        await self.start_agent()
        self.assertEqual(await self.get("/v1/state/report"), (200, [{"key": "b", "version": 1}]))

    async def test_standalone_agent_serves_empty_state(self) -> None:
        self.assertEqual(
            await self.get("/v1/state"),
            (200, {"metadata": {}, "data_keys": [], "secret_keys": [], "report_keys": []}),
        )


class PersistenceTests(AgentCase):
    async def test_state_is_served_from_disk_when_the_control_plane_is_down(self) -> None:
        await self.stop_agent()
        await self.sim.stop()
        await self.start_agent()
        self.assertEqual((await self.get("/v1/state/metadata/role")), (200, {"key": "role", "value": "gateway"}))

    async def test_state_files_are_private(self) -> None:
        await self.stop_agent()
        data = self.sandbox.data_dir
        self.assertEqual(stat.S_IMODE(os.stat(data).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(data, "state.json")).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(data, "reports", "reports.log")).st_mode), 0o600)

    async def test_socket_mode_is_0660(self) -> None:
        self.assertEqual(stat.S_IMODE(os.stat(self.sandbox.socket).st_mode), 0o660)

    async def test_socket_file_is_removed_on_stop(self) -> None:
        await self.stop_agent()
        self.assertFalse(os.path.exists(self.sandbox.socket))


class TCPListenerTests(AgentCase):
    async def setUp(self) -> None:
        self.service = None
        self.sim = ControlPlaneSimulator.example()
        await self.sim.start(reactor)
        self.addCleanup(lambda: defer.ensureDeferred(self.sim.stop()))
        self.sandbox = AgentSandbox(control_plane=self.sim)
        self.addCleanup(self.sandbox.cleanup)
        import socket

        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.sandbox.enable_http(f"127.0.0.1:{self.port}")
        self.client = unix_http_client(self.sandbox.socket)
        await self.start_agent()
        self.base = f"http://127.0.0.1:{self.port}"
        from twisted.web.client import Agent, HTTPConnectionPool

        self.tcp = treq.client.HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))

    async def tcp_get(self, path: str, headers: dict | None = None) -> tuple[int, object]:
        return await json_response(await self.tcp.get(self.base + path, headers=headers or {}))

    async def test_no_token_is_401(self) -> None:
        self.assertEqual(await self.tcp_get("/v1/state"), (401, {"error": "unauthorized"}))

    async def test_wrong_token_is_401(self) -> None:
        self.assertEqual(
            await self.tcp_get("/v1/state", {"Authorization": "Bearer nope"}), (401, {"error": "unauthorized"})
        )

    async def test_other_scheme_is_401(self) -> None:
        token = self.sandbox.http_token
        self.assertEqual(
            await self.tcp_get("/v1/state", {"Authorization": f"Basic {token}"}), (401, {"error": "unauthorized"})
        )

    async def test_scheme_is_case_insensitive(self) -> None:
        code, _ = await self.tcp_get("/v1/state", {"Authorization": f"bEaReR {self.sandbox.http_token}"})
        self.assertEqual(code, 200)

    async def test_token_grants_secret_reads(self) -> None:
        code, body = await self.tcp_get(
            "/v1/state/secrets/db%2Fpassword", {"Authorization": f"Bearer {self.sandbox.http_token}"}
        )
        self.assertEqual((code, body["value"]), (200, "s3cret-p@ssw0rd"))

    async def test_writes_over_tcp(self) -> None:
        response = await self.tcp.put(
            self.base + "/v1/state/report/health",
            data=b'{"content_type":"application/json","payload":{"status":"healthy"}}',
            headers={"Authorization": f"Bearer {self.sandbox.http_token}"},
        )
        self.assertEqual((await json_response(response))[1]["version"], 1)


class ReportQuotaTests(AgentCase):
    with_control_plane = False

    async def setUp(self) -> None:
        self.service = None
        self.sim = None
        self.sandbox = AgentSandbox()
        self.addCleanup(self.sandbox.cleanup)
        self.sandbox.document["node_api"].update({"max_report_entries": 2, "max_report_bytes": 4096})
        self.client = unix_http_client(self.sandbox.socket)
        await self.start_agent()

    async def test_a_new_key_past_max_report_entries_is_413_json(self) -> None:
        for key in ("a", "b"):
            self.assertEqual((await self.put(f"/v1/state/report/{key}", {"content_type": "a", "payload": 1}))[0], 200)
        code, body = await self.put("/v1/state/report/c", {"content_type": "a", "payload": 1})
        self.assertEqual((code, body["error"]), (413, "report quota exceeded"))
        self.assertIn("node_api.max_report_entries", body["details"])
        self.assertEqual([e["key"] for e in (await self.get("/v1/state/report"))[1]], ["a", "b"])

    async def test_an_entry_past_max_report_bytes_is_413_json(self) -> None:
        code, body = await self.put("/v1/state/report/big", {"content_type": "a", "payload": "x" * 5000})
        self.assertEqual((code, body["error"]), (413, "report quota exceeded"))
        self.assertIn("node_api.max_report_bytes", body["details"])
        self.assertEqual(await self.get("/v1/state/report"), (200, []))
