"""
The control-plane simulator in plexsphere mode serves the platform's node
API as docs/control-plane-plexsphere.md states it, over real HTTP: the
bearer, registration and its refusals, strict heartbeats, encrypted secret
bodies, per-key reports, node key rotation, and the signed event stream
(numeric ids, Last-Event-ID replays, keep-alives), each fault it can
inject, and what it records of what was sent.
"""

from __future__ import annotations

import base64
import json
import os
import re
import uuid
from typing import Any

import treq
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from plexagent.controlplane.events import SSEParser
from plexagent.controlplane.keys import ED25519_SPKI_PREFIX, KeySet, SigningKey
from plexagent.controlplane.plexsphere_events import PlexsphereEventCodec
from plexagent.controlplane.protocol import Dropped, InstallSigningKeys, PullState, RotateNodeKey
from plexagent.testing import plexsphere_simstate as ps
from plexagent.testing.simulator import ControlPlaneSimulator
from tests.controlplane.harness import eventually

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
PROBLEM_MEMBERS = {"type", "title", "status", "detail", "instance", "code"}


def x25519_public() -> str:
    return base64.b64encode(os.urandom(32)).decode()


class Fixture(unittest.TestCase):
    timeout = 30

    async def started(self, **options: Any) -> ControlPlaneSimulator:
        sim = ControlPlaneSimulator.example(protocol="plexsphere", **options)
        await sim.start(reactor)
        self.addCleanup(lambda: defer.ensureDeferred(sim.stop()))
        self.sim = sim
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        return sim

    async def call(self, method: str, path: str, bearer: str | None = None, body: Any = None,
                   data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
        """(status, the body parsed as JSON when it is JSON, else bytes, the response)."""
        sent = dict(headers or {})
        if bearer is not None:
            sent["Authorization"] = "Bearer " + bearer
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        response = await treq.request(method, self.sim.url + path, headers=sent, data=data, pool=self.pool)
        raw = await response.content()
        kind = (response.headers.getRawHeaders("content-type") or [""])[0]
        return response.code, (json.loads(raw) if "json" in kind and raw else raw), response

    def register_body(self, **changes: Any) -> dict[str, Any]:
        body = {"project_id": self.sim.project_id, "resource_handle": self.sim.resource_handle,
                "bootstrap_token": self.sim.bootstrap_token, "nonce": str(uuid.uuid4()),
                "public_key": x25519_public()}
        body.update(changes)
        return {k: v for k, v in body.items() if v is not None}

    def heartbeat_body(self, **changes: Any) -> dict[str, Any]:
        body = {"client_now": self.sim.go_time(self.sim.now()),
                "binary_checksum": base64.b64encode(bytes(32)).decode(), "binary_version": "plexagent/1.0",
                "nat_summary": {}}
        body.update(changes)
        return {k: v for k, v in body.items() if v is not None}

    def assertProblem(self, result: tuple[int, Any, Any], status: int, code: str) -> dict[str, Any]:
        got, body, response = result
        self.assertEqual((got, body.get("code") if isinstance(body, dict) else body), (status, code))
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/problem+json"])
        self.assertLessEqual(PROBLEM_MEMBERS, set(body))
        return body  # type: ignore[no-any-return]

    @property
    def base(self) -> str:
        return f"/v1/nodes/{self.sim.node_id}"


class BearerTests(Fixture):
    def test_the_bearer_is_plexd_s_vector(self) -> None:
        vector = "nsk_plexd_AZCouKDAegqKCqCgoKCgoyoqKioqKioqKioqKioqKioqKioqKioqKioqKioqKioq"
        self.assertEqual(ps.bearer("0190a8b8-a0c0-7a0a-8a0a-a0a0a0a0a0a3", b"\x2a" * 32), vector)
        self.assertEqual(ps.parse_bearer(b"Bearer " + vector.encode()),
                         ("plexd", "0190a8b8-a0c0-7a0a-8a0a-a0a0a0a0a0a3", b"\x2a" * 32))

    async def test_the_example_node_has_a_uuid_and_its_bearer_is_derived_from_its_nsk(self) -> None:
        sim = await self.started()
        self.assertTrue(UUID.fullmatch(sim.node_id))
        self.assertEqual(sim.token, ps.bearer(sim.node_id, base64.b64decode(sim.example_node.nsk_text)))
        self.assertEqual((await self.call("GET", self.base + "/state", sim.token))[0], 200)
        self.assertEqual(sim.violations, [])

    async def test_the_raw_nsk_a_missing_bearer_and_another_node_s_bearer_are_401_and_violations(self) -> None:
        sim = await self.started()
        self.assertProblem(await self.call("GET", self.base + "/state", sim.example_node.nsk_text), 401,
                           "unauthorized")
        self.assertProblem(await self.call("GET", self.base + "/state"), 401, "unauthorized")
        stranger = ps.bearer(str(uuid.uuid4()), os.urandom(32))
        self.assertProblem(await self.call("GET", self.base + "/state", stranger), 401, "unauthorized")
        self.assertEqual(len(sim.violations), 2)
        self.assertNotIn(sim.example_node.nsk_text, " ".join(sim.violations))

    async def test_a_revoked_bearer_is_nsk_revoked_on_heartbeat(self) -> None:
        sim = await self.started()
        sim.faults.revoke_bearer()
        self.assertProblem(await self.call("POST", self.base + "/heartbeat", sim.token, self.heartbeat_body()), 401,
                           "nsk_revoked")
        self.assertProblem(await self.call("GET", self.base + "/state", sim.token), 401, "unauthorized")

    async def test_a_bearer_for_another_node_than_the_path_is_a_permission_denied_403(self) -> None:
        await self.started()
        code, answer, _ = await self.call("POST", "/v1/register", body=self.register_body())
        other = ps.bearer(answer["node_id"], base64.b64decode(answer["nsk"]))
        body = self.assertProblem(await self.call("POST", f"/v1/nodes/{ps.EXAMPLE_NODE_UUID}/heartbeat", other,
                                                  self.heartbeat_body()), 403, "node_id_mismatch")
        self.assertEqual(body["reason"], "out_of_scope")
        self.assertTrue(UUID.fullmatch(body["correlation_id"]))


class RegisterTests(Fixture):
    async def test_a_token_of_the_platform_s_form_registers_once(self) -> None:
        sim = await self.started()
        self.assertTrue(ps.TOKEN_FORM.fullmatch(sim.bootstrap_token))
        body = self.register_body()
        code, answer, _ = await self.call("POST", "/v1/register", body=body)
        self.assertEqual(code, 200)
        self.assertEqual(set(answer), {"node_id", "mesh_ip", "signing_public_key", "signing_key_id", "nsk",
                                       "peer_snapshot", "domain_mesh_cidr"})
        self.assertTrue(UUID.fullmatch(answer["node_id"]))
        self.assertEqual(len(base64.b64decode(answer["nsk"])), 32)
        self.assertEqual((answer["signing_public_key"], answer["signing_key_id"], answer["peer_snapshot"]),
                         (sim.public_key_b64, sim.signing_key_id, []))
        self.assertEqual((sim.node_id, sim.registrations), (answer["node_id"], [body]))
        self.assertEqual((await self.call("GET", f"/v1/nodes/{answer['node_id']}/state", sim.token))[0], 200)
        self.assertProblem(await self.call("POST", "/v1/register", body=self.register_body()), 403, "token_consumed")
        self.assertEqual(sim.violations, [])

    async def test_each_refusal_has_the_contract_s_status_and_code(self) -> None:
        sim = await self.started()
        cases = [
            (self.register_body(project_id=str(uuid.uuid4())), 403, "project_mismatch"),
            (self.register_body(resource_handle="elsewhere"), 404, "resource_not_found"),
            (self.register_body(public_key=base64.b64encode(bytes(32)).decode()), 400, "public_key_invalid"),
            (self.register_body(public_key="c2hvcnQ="), 400, "public_key_invalid"),
            (self.register_body(bootstrap_token="psb_sim_x_node_never-issued"), 403, "token_revoked"),
        ]
        for body, status, code in cases:
            self.assertProblem(await self.call("POST", "/v1/register", body=body), status, code)
        self.assertEqual((sim.registrations, len(sim.registration_attempts)), ([], 5))
        self.assertEqual((await self.call("POST", "/v1/register", body=self.register_body()))[0], 200)

    async def test_a_reused_nonce_collides(self) -> None:
        sim = await self.started()
        sim.issue_bootstrap_token()
        body = self.register_body()
        self.assertEqual((await self.call("POST", "/v1/register", body=body))[0], 200)
        again = dict(body, bootstrap_token=sim.bootstrap_tokens[1])
        self.assertProblem(await self.call("POST", "/v1/register", body=again), 403, "nonce_collision")

    async def test_other_members_and_an_authorization_header_are_violations(self) -> None:
        sim = await self.started()
        self.assertProblem(await self.call("POST", "/v1/register", body=self.register_body(hostname="h")), 400,
                           "malformed_register_request")
        self.assertEqual((await self.call("POST", "/v1/register", sim.bootstrap_token, self.register_body()))[0], 200)
        self.assertEqual(len(sim.violations), 2)
        self.assertIn("Authorization", sim.violations[1])

    async def test_the_first_n_attempts_can_fail(self) -> None:
        sim = await self.started()
        sim.faults.fail("register", 503, times=2)
        for _ in range(2):
            self.assertProblem(await self.call("POST", "/v1/register", body=self.register_body()), 503,
                               "pool_exhausted")
        self.assertEqual((await self.call("POST", "/v1/register", body=self.register_body()))[0], 200)

    async def test_the_signing_key_can_come_in_its_der_form(self) -> None:
        sim = await self.started(der_signing_key=True)
        code, answer, _ = await self.call("POST", "/v1/register", body=self.register_body())
        der = base64.b64decode(answer["signing_public_key"])
        self.assertEqual((len(der), der[:12]), (44, ED25519_SPKI_PREFIX))
        self.assertEqual(SigningKey.parse(answer["signing_public_key"]).text, sim.public_key_b64)


class StateTests(Fixture):
    async def test_the_snapshot_has_sorted_string_buckets_and_reports_mirroring_state(self) -> None:
        sim = await self.started()
        sim.set_data("b", "as is", 1)
        sim.set_data("a/path", {"n": 1, "s": "é"}, 1)
        code, snap, _ = await self.call("GET", self.base + "/state", sim.token)
        self.assertEqual(set(snap), {"peers", "reachability", "policy", "bridge", "state", "reports"})
        self.assertEqual(snap["reachability"]["state"], "healthy")
        self.assertEqual([e["key"] for e in snap["state"]["metadata"]], ["node_id", "region", "role"])
        data = {e["key"]: e["value"] for e in snap["state"]["data"]}
        self.assertEqual([e["key"] for e in snap["state"]["data"]], sorted(data))
        self.assertEqual((data["b"], data["a/path"]), ("as is", '{"n":1,"s":"é"}'))
        self.assertEqual(data["routes.json"], ps.data_value({"default_backend": "10.0.0.5:8080"}))
        self.assertEqual(snap["reports"], snap["state"])

    async def test_state_can_be_null(self) -> None:
        sim = await self.started()
        sim.null_state = True
        code, snap, _ = await self.call("GET", self.base + "/state", sim.token)
        self.assertEqual((code, snap["state"], snap["reports"]), (200, None, None))

    async def test_state_can_be_not_provisioned(self) -> None:
        sim = await self.started()
        sim.faults.unprovision("state")
        self.assertProblem(await self.call("GET", self.base + "/state", sim.token), 501,
                           "signed_event_bus_not_provisioned")


class HeartbeatTests(Fixture):
    async def test_a_heartbeat_of_the_four_members_is_answered_with_one_shot_flags(self) -> None:
        sim = await self.started()
        sim.faults.heartbeat_reconcile = 1
        sim.faults.heartbeat_rotate_keys = 1
        code, first, _ = await self.call("POST", self.base + "/heartbeat", sim.token, self.heartbeat_body())
        code, second, _ = await self.call("POST", self.base + "/heartbeat", sim.token, self.heartbeat_body())
        self.assertEqual(set(first), {"accepted_at", "reconcile", "rotate_keys"})
        self.assertEqual([(a["reconcile"], a["rotate_keys"]) for a in (first, second)], [(True, True), (False, False)])
        self.assertEqual((len(sim.heartbeats), sim.violations), (2, []))

    async def test_an_unknown_or_missing_member_is_malformed_and_a_violation(self) -> None:
        sim = await self.started()
        for body in (self.heartbeat_body(uptime=1), self.heartbeat_body(nat_summary=None)):
            self.assertProblem(await self.call("POST", self.base + "/heartbeat", sim.token, body), 400,
                               "malformed_heartbeat_request")
        self.assertEqual(len(sim.violations), 2)

    async def test_a_client_clock_over_60_seconds_away_is_clock_skew(self) -> None:
        sim = await self.started()
        body = self.heartbeat_body(client_now=sim.go_time(sim.now() - 61))
        self.assertProblem(await self.call("POST", self.base + "/heartbeat", sim.token, body), 400, "clock_skew")

    async def test_a_gzipped_body_is_refused_and_a_violation(self) -> None:
        import gzip

        sim = await self.started()
        code, _, _ = await self.call("POST", self.base + "/heartbeat", sim.token,
                                     data=gzip.compress(json.dumps(self.heartbeat_body()).encode()),
                                     headers={"Content-Encoding": "gzip"})
        self.assertEqual((code, len(sim.violations)), (400, 1))


class SecretTests(Fixture):
    async def test_the_body_is_nonce_ciphertext_tag_under_the_nsk_with_version_headers(self) -> None:
        sim = await self.started()
        code, body, response = await self.call("GET", self.base + "/secrets/db-password", sim.token)
        self.assertEqual(code, 200)
        self.assertEqual(AESGCM(sim.nsk).decrypt(body[:12], body[12:], None), b"s3cret-p@ssw0rd")
        header = response.headers.getRawHeaders
        self.assertEqual((header("x-plexsphere-secret-version"), header("cache-control"), header("content-type")),
                         (["2"], ["no-store"], ["application/octet-stream"]))
        self.assertTrue(header("x-plexsphere-secret-kid")[0])

    async def test_an_older_version_is_served_by_number_and_an_unknown_one_is_404(self) -> None:
        sim = await self.started()
        sim.set_secret("db-password", b"newer", 3)
        code, body, response = await self.call("GET", self.base + "/secrets/db-password?version=2", sim.token)
        self.assertEqual(AESGCM(sim.nsk).decrypt(body[:12], body[12:], None), b"s3cret-p@ssw0rd")
        self.assertEqual(response.headers.getRawHeaders("x-plexsphere-secret-version"), ["2"])
        self.assertProblem(await self.call("GET", self.base + "/secrets/db-password?version=9", sim.token), 404,
                           "secret_version_not_found")
        self.assertProblem(await self.call("GET", self.base + "/secrets/nope", sim.token), 404, "secret_not_found")

    async def test_rate_limits_not_provisioned_and_tampering_can_be_injected(self) -> None:
        sim = await self.started()
        sim.faults.fail("secret", 429, retry_after=7)
        result = await self.call("GET", self.base + "/secrets/db-password", sim.token)
        self.assertProblem(result, 429, "per_node_rate_limited")
        self.assertEqual(result[2].headers.getRawHeaders("retry-after"), ["7"])
        sim.faults.unprovision("secret")
        self.assertProblem(await self.call("GET", self.base + "/secrets/db-password", sim.token), 501,
                           "secrets_not_provisioned")
        sim.faults.not_provisioned.clear()
        sim.faults.tamper_secrets = True
        code, body, _ = await self.call("GET", self.base + "/secrets/db-password", sim.token)
        self.assertRaises(InvalidTag, AESGCM(sim.nsk).decrypt, body[:12], body[12:], None)

    async def test_a_name_outside_the_grammar_is_a_violation(self) -> None:
        sim = await self.started()
        self.assertProblem(await self.call("GET", self.base + "/secrets/db%2Fpassword", sim.token), 404,
                           "secret_not_found")
        self.assertEqual(len(sim.violations), 1)


class ReportTests(Fixture):
    async def test_put_then_delete_is_recorded_in_order_and_read_back_as_sent(self) -> None:
        sim = await self.started()
        code, answer, _ = await self.call("PUT", self.base + "/state/reports/app.health", sim.token,
                                          {"value": '{"ok":true}'})
        self.assertEqual((code, set(answer), answer["key"]), (200, {"accepted_at", "key"}, "app.health"))
        self.assertEqual(sim.reported()["app.health"]["payload"], {"ok": True})
        self.assertEqual(sim.reported()["app.health"]["value"], '{"ok":true}')
        code, snap, _ = await self.call("GET", self.base + "/state", sim.token)
        self.assertEqual(snap["state"]["reports"], [{"key": "app.health", "value": '{"ok":true}'}])
        self.assertEqual((await self.call("DELETE", self.base + "/state/reports/app.health", sim.token))[0], 204)
        self.assertProblem(await self.call("DELETE", self.base + "/state/reports/app.health", sim.token), 404,
                           "report_not_found")
        self.assertEqual(sim.report_calls, [("PUT", "app.health", '{"ok":true}'), ("DELETE", "app.health", None),
                                            ("DELETE", "app.health", None)])
        self.assertEqual((sim.reported(), sim.violations), ({}, []))

    async def test_not_provisioned_and_a_refused_key_can_be_injected(self) -> None:
        sim = await self.started()
        sim.faults.unprovision("report")
        self.assertProblem(await self.call("PUT", self.base + "/state/reports/a", sim.token, {"value": "1"}), 501,
                           "reports_not_provisioned")
        self.assertProblem(await self.call("DELETE", self.base + "/state/reports/a", sim.token), 501,
                           "reports_not_provisioned")
        sim.faults.not_provisioned.clear()
        sim.faults.refuse_report_key("poison")
        body = self.assertProblem(await self.call("PUT", self.base + "/state/reports/poison", sim.token,
                                                  {"value": "1"}), 400, "invalid_report")
        self.assertEqual(body["status"], 400)
        self.assertEqual(sim.violations, [])

    async def test_a_bad_key_other_members_and_an_over_long_value_are_violations(self) -> None:
        sim = await self.started()
        for key, body in (("Upper", {"value": "1"}), ("a", {"value": "1", "workload_tag": "x"}),
                          ("a", {"value": "é" * 2049})):
            self.assertProblem(await self.call("PUT", self.base + "/state/reports/" + key, sim.token, body), 400,
                               "invalid_report")
        self.assertEqual(len(sim.violations), 3)
        self.assertEqual(sim.reported(), {})

    async def test_a_connection_can_be_cut_instead_of_answered(self) -> None:
        from twisted.web.client import ResponseNeverReceived

        sim = await self.started()
        sim.faults.cut("report")
        with self.assertRaises(ResponseNeverReceived):
            await self.call("PUT", self.base + "/state/reports/a", sim.token, {"value": "1"})
        self.assertEqual((await self.call("PUT", self.base + "/state/reports/a", sim.token, {"value": "1"}))[0], 200)


class KeysRotateTests(Fixture):
    async def rotate(self, key: str) -> tuple[int, Any, Any]:
        return await self.call("POST", "/v1/keys/rotate", self.sim.token, {"new_public_key": key})

    async def test_a_rotation_is_accepted_only_while_one_is_pending(self) -> None:
        sim = await self.started()
        self.assertProblem(await self.rotate(x25519_public()), 409, "keys_rotate_no_pending_rotation")
        sim.faults.heartbeat_rotate_keys = 1
        await self.call("POST", self.base + "/heartbeat", sim.token, self.heartbeat_body())
        new = x25519_public()
        code, answer, _ = await self.rotate(new)
        self.assertEqual((code, set(answer)), (200, {"rotation_id", "kid", "wrap_key_version"}))
        self.assertTrue(UUID.fullmatch(answer["rotation_id"]))
        self.assertEqual(answer["wrap_key_version"], 2)
        self.assertEqual(sim.nodes[sim.node_id].public_key, new)
        self.assertProblem(await self.rotate(x25519_public()), 409, "keys_rotate_no_pending_rotation")
        self.assertEqual(len(sim.key_rotations), 3)

    async def test_the_node_s_current_key_is_unchanged_422(self) -> None:
        sim = await self.started()
        key = x25519_public()
        code, answer, _ = await self.call("POST", "/v1/register", body=self.register_body(public_key=key))
        sim.publish("rotate_keys", {})
        self.assertProblem(await self.rotate(key), 422, "keys_rotate_public_key_unchanged")

    async def test_other_members_are_a_violation_and_not_provisioned_can_be_injected(self) -> None:
        sim = await self.started()
        self.assertProblem(await self.call("POST", "/v1/keys/rotate", sim.token, {"new_public_key": x25519_public(),
                                                                                  "node_id": sim.node_id}),
                           400, "malformed_keys_rotate_request")
        self.assertEqual(len(sim.violations), 1)
        sim.faults.unprovision("keys_rotate")
        self.assertProblem(await self.rotate(x25519_public()), 501, "keys_rotate_not_provisioned")


class Stream:
    """One open event stream read over treq."""

    def __init__(self, response: Any) -> None:
        self.response = response
        self.data = b""
        self.done = treq.collect(response, self._chunk)
        self.done.addErrback(lambda _: None)

    def _chunk(self, data: bytes) -> None:
        self.data += data

    def envelopes(self) -> dict[str, bytes]:
        """Event id -> its data line, for every complete event so far."""
        parser = SSEParser()
        return {event.id.decode(): event.data for event in parser.feed(self.data)}


class EventTests(Fixture):
    async def stream(self, last_event_id: str | None = None) -> Stream:
        headers = {"Authorization": "Bearer " + self.sim.token, "Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        response = await treq.get(self.sim.url + self.base + "/events", headers=headers, pool=self.pool,
                                  unbuffered=True)
        stream = Stream(response)
        await eventually(lambda: stream.data.startswith(b":keep-alive\n\n"), what="the stream's first comment")
        return stream

    def keys(self) -> KeySet:
        return KeySet(SigningKey.parse(self.sim.public_key_b64, self.sim.signing_key_id))

    def decide(self, data: bytes, keys: KeySet | None = None) -> str:
        codec = PlexsphereEventCodec()
        try:
            codec.verify(codec.decode(data), keys or self.keys(), round(reactor.seconds() * 1e9))
        except Dropped as dropped:
            return dropped.reason.value
        return "accept"

    async def test_the_stream_s_headers_and_a_published_event_verifying_under_the_registration_key(self) -> None:
        sim = await self.started()
        stream = await self.stream()
        header = stream.response.headers.getRawHeaders
        self.assertEqual((header("content-type"), header("cache-control")), (["text/event-stream"], ["no-cache"]))
        self.assertTrue(header("x-plexsphere-api-version"))
        first, second = sim.push_state(), sim.publish("policy_updated", {"revision": 2})
        self.assertEqual((first, second), ("1", "2"))
        await eventually(lambda: "2" in stream.envelopes(), what="two events")
        data = stream.envelopes()["1"]
        self.assertNotIn(b"\n", data)
        envelope = json.loads(data)
        self.assertEqual(list(envelope), ["id", "type", "scope", "key_id", "issued_at", "payload", "signature"])
        self.assertTrue(UUID.fullmatch(envelope["id"]))
        self.assertEqual((envelope["scope"], envelope["key_id"]), (f"node:{sim.node_id}", sim.signing_key_id))
        self.assertEqual(self.decide(data), "accept")
        self.assertIsInstance(PlexsphereEventCodec().effect(PlexsphereEventCodec().decode(data)), PullState)
        self.assertEqual(sim.stream_requests, [""])

    async def test_last_event_id_replays_what_followed_it_only(self) -> None:
        sim = await self.started()
        for _ in range(3):
            sim.push_state()
        stream = await self.stream("1")
        await eventually(lambda: "3" in stream.envelopes(), what="the replay")
        self.assertEqual(sorted(stream.envelopes()), ["2", "3"])
        self.assertEqual(sim.stream_requests, ["1"])

    async def test_a_last_event_id_that_is_not_a_number_is_400(self) -> None:
        sim = await self.started()
        code, body, _ = await self.call("GET", self.base + "/events", sim.token, headers={"Last-Event-ID": "abc"})
        self.assertEqual((code, body["status"]), (400, 400))
        self.assertEqual((sim.open_streams, len(sim.violations)), (0, 1))

    async def test_the_event_bus_can_be_not_provisioned(self) -> None:
        sim = await self.started()
        sim.faults.unprovision("events")
        self.assertProblem(await self.call("GET", self.base + "/events", sim.token), 501,
                           "signed_event_bus_not_provisioned")

    async def test_keep_alive_comments_come_while_the_stream_is_quiet(self) -> None:
        await self.started(keepalive=0.05)
        stream = await self.stream()
        await eventually(lambda: stream.data.count(b":keep-alive\n\n") >= 3, what="keep-alives")

    async def test_each_forgery_is_dropped_for_its_reason(self) -> None:
        sim = await self.started()
        stream = await self.stream()
        forged = {kind: sim.inject_event_fault(kind) for kind in
                  ("bad_signature", "missing_signature", "stale", "future", "unknown_key")}
        malformed = sim.inject_event_fault("malformed")
        await eventually(lambda: malformed in stream.envelopes(), what="the forgeries")
        expected = {"bad_signature": "bad_signature", "missing_signature": "missing_field", "stale": "stale",
                    "future": "future", "unknown_key": "unknown_key"}
        self.assertEqual({kind: self.decide(stream.envelopes()[eid]) for kind, eid in forged.items()}, expected)
        with self.assertRaises(Dropped) as caught:
            PlexsphereEventCodec().decode(stream.envelopes()[malformed])
        self.assertEqual(caught.exception.reason.value, "invalid_json")
        self.assertRaises(KeyError, sim.inject_event_fault, "replay")

    async def test_a_rotation_event_installs_the_new_key_and_the_old_one_verifies_in_its_window(self) -> None:
        sim = await self.started()
        stream = await self.stream()
        old = self.keys()
        new = sim.rotate_signing_key(via="event", transition=60)
        rotation = sim.events[-1][0]
        previous = sim.push_state("previous")
        current = sim.push_state()
        await eventually(lambda: current in stream.envelopes(), what="the events after the rotation")
        codec = PlexsphereEventCodec()
        envelope = codec.decode(stream.envelopes()[rotation])
        self.assertEqual(self.decide(stream.envelopes()[rotation], old), "accept")
        effect = codec.effect(envelope, old)
        assert isinstance(effect, InstallSigningKeys)
        self.assertEqual((effect.keys.current.text, effect.keys.current.key_id), (new, sim.signing_key_id))
        self.assertEqual(effect.keys.previous.key_id, sim.previous_key_id)
        self.assertEqual(self.decide(stream.envelopes()[current], effect.keys), "accept")
        self.assertEqual(self.decide(stream.envelopes()[previous], effect.keys), "accept")
        self.assertEqual(self.decide(stream.envelopes()[current], old), "unknown_key")

    async def test_a_rotate_keys_event_asks_for_a_node_key_rotation(self) -> None:
        sim = await self.started()
        stream = await self.stream()
        event_id = sim.publish("rotate_keys", {})
        await eventually(lambda: event_id in stream.envelopes())
        codec = PlexsphereEventCodec()
        self.assertIsInstance(codec.effect(codec.decode(stream.envelopes()[event_id])), RotateNodeKey)
        self.assertTrue(sim.nodes[sim.node_id].rotation_pending)

    async def test_each_node_s_events_are_scoped_to_it(self) -> None:
        sim = await self.started()
        code, answer, _ = await self.call("POST", "/v1/register", body=self.register_body())
        stream = await self.stream()  # the new node's (the current one)
        event_id = sim.push_state()
        await eventually(lambda: event_id in stream.envelopes())
        self.assertEqual(json.loads(stream.envelopes()[event_id])["scope"], f"node:{answer['node_id']}")


class ExchangeCheckTests(Fixture):
    async def test_every_answer_is_handed_to_the_exchange_checks_and_what_they_return_are_violations(self) -> None:
        sim = await self.started()
        seen: list[tuple[Any, ...]] = []

        def check(*exchange: Any) -> list[str]:
            seen.append(exchange)
            return [f"checked {exchange[0]} {exchange[5]}"]

        sim.exchange_checks.append(check)
        await self.call("GET", self.base + "/state?x=1", sim.token)
        await self.call("PUT", self.base + "/state/reports/a", sim.token, {"value": "1"})
        stream = await EventTests.stream(self)  # type: ignore[arg-type]
        self.assertTrue(stream.data)
        self.assertEqual([(e[0], e[1], e[5]) for e in seen], [("state", "GET", 200), ("report", "PUT", 200),
                                                               ("events", "GET", 200)])
        endpoint, method, path, headers, body, status, response_headers, response_body = seen[1]
        self.assertEqual((path, body, response_headers["content-type"]),
                         (self.base + "/state/reports/a", b'{"value": "1"}', "application/json"))
        self.assertEqual(headers["authorization"], "Bearer " + sim.token)
        self.assertEqual(seen[0][2], self.base + "/state?x=1")
        self.assertEqual(json.loads(response_body)["key"], "a")
        self.assertEqual(seen[2][7], b":keep-alive\n\n")
        self.assertEqual(seen[2][6]["content-type"], "text/event-stream")
        self.assertEqual(sim.violations, ["checked state 200", "checked report 200", "checked events 200"])
