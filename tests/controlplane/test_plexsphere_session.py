"""
The plexsphere protocol's calls, as a recording HTTP server sees them, and
what the agent makes of each answer (docs/control-plane-plexsphere.md).
"""

from __future__ import annotations

import base64
import json
import math
import os
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.internet import defer, endpoints, reactor, task
from twisted.trial import unittest
from twisted.web import server
from twisted.web.http_headers import Headers

from plexagent import errors
from plexagent.config import parse_config
from plexagent.controlplane.build import package_checksum
from plexagent.controlplane.client import Reply, Transport
from plexagent.controlplane.identity import NodeKeyPair
from plexagent.controlplane.plexsphere import (
    DATA_CONTENT_TYPE,
    PlexsphereProtocol,
    PlexsphereSession,
    bearer_token,
    classify,
)
from plexagent.controlplane.plexsphere_rules import PlexsphereLocalRules
from plexagent.controlplane.protocol import (
    Call,
    ControlPlaneError,
    ErrorKind,
    PullState,
    RefusedChange,
    RotateNodeKey,
    SecretQuery,
    SecretValue,
)
from plexagent.node.reports import Changes
from plexagent.node.secrets import DecryptionFailed
from plexagent.node.state import NodeState
from tests.controlplane.fakes import Recorder

NODE = "0190a8b8-a0c0-7a0a-8a0a-a0a0a0a0a0a3"
NSK = b"\x2a" * 32
NSK_B64 = base64.b64encode(NSK).decode()
PREFIX = b"/v1/nodes/" + NODE.encode()
PROJECT = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"


def problem(status: int, code: str, detail: str = "") -> bytes:
    return json.dumps({"type": "about:blank", "title": "t", "status": status, "detail": detail, "instance": "/x",
                       "code": code}).encode()


class BearerTests(unittest.TestCase):
    def test_the_bearer_is_plexd_s_vector(self) -> None:
        self.assertEqual(bearer_token(NODE, NSK),
                         "nsk_plexd_AZCouKDAegqKCqCgoKCgoyoqKioqKioqKioqKioqKioqKioqKioqKioqKioqKioq")


class ClassificationTests(unittest.TestCase):
    def error(self, call: Call, status: int, body: bytes = b"", headers: Headers | None = None) -> ControlPlaneError:
        return classify(call, Reply(status, headers or Headers(), body))

    def test_registration_refusals_are_permanent_and_the_rest_transient(self) -> None:
        for status in (400, 403, 404, 422):
            self.assertEqual(self.error(Call.REGISTER, status).kind, ErrorKind.PERMANENT, status)
        for status in (500, 503):
            self.assertEqual(self.error(Call.REGISTER, status).kind, ErrorKind.TRANSIENT, status)

    def test_the_problem_s_code_and_detail_are_named_in_the_error(self) -> None:
        error = self.error(Call.REGISTER, 403, problem(403, "token_consumed", "the token was used"))
        self.assertEqual(error.code, "token_consumed")
        self.assertEqual(str(error), "register: control plane answered 403 token_consumed: the token was used")

    def test_an_answer_that_is_no_problem_document_still_classifies(self) -> None:
        for body in (b"", b"<html>", b"[]", b'{"code": 7}'):
            error = self.error(Call.STATE, 503, body)
            self.assertEqual((error.kind, error.code), (ErrorKind.TRANSIENT, ""), body)

    def test_501_stops_reports_for_five_minutes_and_the_stream_for_ten(self) -> None:
        self.assertEqual(self.error(Call.REPORT, 501).pause, 300.0)
        self.assertEqual(self.error(Call.EVENTS, 501).pause, 600.0)
        for call in (Call.STATE, Call.HEARTBEAT, Call.SECRET, Call.ROTATE_KEY):
            error = self.error(call, 501)
            self.assertEqual((error.kind, error.pause), (ErrorKind.NOT_PROVISIONED, None), call)

    def test_the_stream_stops_until_restart_on_401_403_404_and_drops_its_resume_point_on_400(self) -> None:
        for status in (401, 403, 404):
            self.assertTrue(math.isinf(self.error(Call.EVENTS, status).pause), status)
        self.assertEqual(self.error(Call.EVENTS, 400).kind, ErrorKind.REFUSED)
        self.assertIsNone(self.error(Call.EVENTS, 503).pause)

    def test_only_an_invalid_report_is_refused_for_its_content(self) -> None:
        self.assertEqual(self.error(Call.REPORT, 400, problem(400, "invalid_report")).kind, ErrorKind.REFUSED)
        self.assertEqual(self.error(Call.REPORT, 400, problem(400, "report_quota_exceeded")).kind,
                         ErrorKind.TRANSIENT)
        self.assertEqual(self.error(Call.REPORT, 409, problem(409, "report_quota_exceeded")).kind,
                         ErrorKind.TRANSIENT)

    def test_a_revoked_credential_is_told_from_a_refused_one(self) -> None:
        self.assertTrue(self.error(Call.HEARTBEAT, 401, problem(401, "nsk_revoked")).revoked)
        self.assertFalse(self.error(Call.HEARTBEAT, 401, problem(401, "unauthorized")).revoked)

    def test_retry_after_is_read_on_429_and_503(self) -> None:
        headers = Headers({b"retry-after": [b"7"]})
        self.assertEqual(self.error(Call.SECRET, 429, headers=headers).retry_after, 7.0)
        self.assertEqual(self.error(Call.STATE, 503, headers=headers).retry_after, 7.0)
        self.assertIsNone(self.error(Call.STATE, 500, headers=headers).retry_after)


class Fixture(unittest.TestCase):
    timeout = 30

    def setUp(self) -> Any:
        self.recorder = Recorder()
        self.answers: dict[tuple[bytes, bytes], tuple[int, bytes, dict[bytes, bytes]]] = {}
        self.recorder.answer = self.answer
        site = server.Site(self.recorder)
        site.noisy = False
        d = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        return d.addCallback(self.listening)

    def listening(self, port: Any) -> None:
        self.addCleanup(port.stopListening)
        self.url = f"http://127.0.0.1:{port.getHost().port}"
        self.clock = task.Clock()
        self.clock.advance(1_780_000_000)
        self.transport = Transport(reactor, self.url, request_timeout=5.0, clock=self.clock)
        self.addCleanup(self.transport.close)
        config = parse_config({"control_plane": {"url": self.url, "protocol": "plexsphere", "project_id": PROJECT,
                                                 "resource_handle": "edge-7"}})
        self.protocol = PlexsphereProtocol(config, self.transport, self.clock)
        self.identity = self.protocol.identity_from_document({"format": 1, "protocol": "plexsphere",
                                                              "node_id": NODE, "nsk": NSK_B64})
        self.session = self.protocol.session(self.identity)
        assert isinstance(self.session, PlexsphereSession)

    def answer(self, request: Any) -> bytes:
        path = request.uri
        status, body, headers = self.answers.get((request.method, path), (200, b"{}", {}))
        request.setResponseCode(status)
        for name, value in headers.items():
            request.setHeader(name, value)
        return body

    def sent(self, index: int = -1) -> dict[str, Any]:
        return self.recorder.requests[index]

    def body(self, index: int = -1) -> Any:
        return json.loads(self.sent(index)["body"])


class EnrollmentTests(Fixture):
    def registered(self, **answer: Any) -> None:
        doc = {"node_id": NODE, "mesh_ip": "10.8.0.3", "signing_public_key": base64.b64encode(b"\x01" * 32).decode(),
               "signing_key_id": "key-1", "nsk": NSK_B64, "peer_snapshot": [], "domain_mesh_cidr": "10.8.0.0/16"}
        doc.update(answer)
        self.answers[(b"POST", b"/v1/register")] = (200, json.dumps(doc).encode(), {})

    async def test_the_registration_sends_exactly_the_enrollment_members_without_authorization(self) -> None:
        self.registered()
        keypair = NodeKeyPair.generate()
        identity = await self.protocol.enroller().enroll("psb_dev_p_node_abc", keypair)
        sent = self.body()
        self.assertEqual(list(sent), ["project_id", "resource_handle", "bootstrap_token", "nonce", "public_key"])
        self.assertEqual((sent["project_id"], sent["resource_handle"], sent["bootstrap_token"], sent["public_key"]),
                         (PROJECT, "edge-7", "psb_dev_p_node_abc", keypair.public_b64))
        self.assertNotIn(b"authorization", self.sent()["headers"])
        self.assertNotIn(b"content-encoding", self.sent()["headers"])
        self.assertEqual((identity.node_id, identity.aes_key, identity.signing_key_id), (NODE, NSK, "key-1"))
        self.assertEqual(identity.bearer, bearer_token(NODE, NSK))

    async def test_a_retry_with_the_same_token_resends_the_same_nonce(self) -> None:
        self.answers[(b"POST", b"/v1/register")] = (503, problem(503, "pool_exhausted"), {})
        enroller = self.protocol.enroller()
        keypair = NodeKeyPair.generate()
        for _ in range(2):
            with self.assertRaises(ControlPlaneError):
                await enroller.enroll("psb_dev_p_node_abc", keypair)
        self.assertEqual(self.body(0)["nonce"], self.body(1)["nonce"])
        with self.assertRaises(ControlPlaneError):
            await enroller.enroll("psb_dev_p_node_other", keypair)
        self.assertNotEqual(self.body(2)["nonce"], self.body(0)["nonce"])

    async def test_requested_resource_id_is_sent_only_when_set(self) -> None:
        self.registered()
        config = parse_config({"control_plane": {"url": self.url, "protocol": "plexsphere", "project_id": PROJECT,
                                                 "resource_handle": "edge-7", "requested_resource_id": "edge-7-a"}})
        protocol = PlexsphereProtocol(config, self.transport, self.clock)
        await protocol.enroller().enroll("psb_dev_p_node_abc", NodeKeyPair.generate())
        self.assertEqual(self.body()["requested_resource_id"], "edge-7-a")

    async def test_an_nsk_that_is_not_base64_of_32_bytes_refuses_the_registration(self) -> None:
        for nsk in ("short", "*" * 32, base64.b64encode(b"x" * 31).decode()):
            self.registered(nsk=nsk)
            with self.assertRaises(ControlPlaneError) as caught:
                await self.protocol.enroller().enroll("psb_dev_p_node_abc", NodeKeyPair.generate())
            self.assertEqual(caught.exception.kind, ErrorKind.PERMANENT)
            self.assertIn("nsk", str(caught.exception))
            self.assertNotIn(nsk, str(caught.exception))

    async def test_the_identity_document_round_trips(self) -> None:
        self.registered()
        identity = await self.protocol.enroller().enroll("psb_dev_p_node_abc", NodeKeyPair.generate())
        again = self.protocol.identity_from_document(self.protocol.identity_document(identity))
        self.assertEqual(attrs_tuple(again), attrs_tuple(identity))

    def test_leaving_is_not_a_node_call_of_this_protocol(self) -> None:
        failure = self.failureResultOf(self.protocol.enroller().deregister(self.identity), ControlPlaneError)
        self.assertIn("remove the node in the platform", str(failure.value))


def attrs_tuple(identity: Any) -> tuple[Any, ...]:
    return (identity.node_id, identity.bearer, identity.aes_key, identity.nsk_text, identity.mesh_ip,
            identity.signing_public_key, identity.signing_key_id, identity.keypair, identity.enrolled_at)


class StateTests(Fixture):
    def set_state(self, state: Any) -> None:
        doc = {"peers": [], "reachability": {"state": "healthy", "changed_at": "2026-05-01T00:00:00Z"},
               "policy": None, "bridge": None, "state": state, "reports": state}
        self.answers[(b"GET", PREFIX + b"/state")] = (200, json.dumps(doc).encode(), {})

    async def test_the_buckets_become_metadata_and_text_data_entries(self) -> None:
        self.set_state({"metadata": [{"key": "region", "value": "eu-1"}],
                        "data": [{"key": "conf/app", "value": '{"a":1}', "workload_tag": "w"}], "reports": []})
        fetched = await self.session.fetch_state()
        state = fetched.state_over(NodeState())
        self.assertEqual(dict(state.metadata), {"region": "eu-1"})
        entry = state.data["conf/app"]
        self.assertEqual((entry["payload"], entry["content_type"], entry["version"]), ('{"a":1}', DATA_CONTENT_TYPE, 1))
        self.assertEqual(dict(state.secret_refs), {})
        self.assertEqual(self.sent()["headers"][b"authorization"], [b"Bearer " + bearer_token(NODE, NSK).encode()])
        self.assertNotIn(b"accept-encoding", self.sent()["headers"])

    async def test_a_snapshot_is_read_within_what_the_agent_stores_not_one_client_body(self) -> None:
        # 40,000 peers hold more JSON values than one client body may.
        peers = [{"node_id": NODE, "mesh_ip": "10.8.0.3", "public_key": NSK_B64}] * 40_000
        doc = {"peers": peers, "state": {"metadata": [{"key": "region", "value": "eu-1"}], "data": [],
                                         "reports": []}}
        self.answers[(b"GET", PREFIX + b"/state")] = (200, json.dumps(doc).encode(), {})
        state = (await self.session.fetch_state()).state_over(NodeState())
        self.assertEqual(dict(state.metadata), {"region": "eu-1"})

    async def test_a_data_version_counts_changes_of_its_value_only(self) -> None:
        self.set_state({"metadata": [], "data": [{"key": "k", "value": "one"}], "reports": []})
        first = (await self.session.fetch_state()).state_over(NodeState())
        self.clock.advance(10)
        same = (await self.session.fetch_state()).state_over(first)
        self.assertEqual(same.data["k"], first.data["k"])
        self.set_state({"metadata": [], "data": [{"key": "k", "value": "two"}], "reports": []})
        changed = (await self.session.fetch_state()).state_over(same)
        self.assertEqual(changed.data["k"]["version"], 2)
        self.assertNotEqual(changed.data["k"]["updated_at"], first.data["k"]["updated_at"])

    async def test_a_null_state_empties_metadata_and_data(self) -> None:
        self.set_state(None)
        state = (await self.session.fetch_state()).state_over(NodeState({"a": "b"}, {}, {}))
        self.assertEqual((dict(state.metadata), dict(state.data)), ({}, {}))

    async def test_a_bucket_of_the_wrong_shape_is_a_failed_fetch(self) -> None:
        for bad in ({"metadata": {"a": "b"}}, {"data": [{"key": "k", "value": 3}]}, {"metadata": [["a"]]}, []):
            self.set_state(bad)
            with self.assertRaises(ControlPlaneError) as caught:
                await self.session.fetch_state()
            self.assertEqual(caught.exception.kind, ErrorKind.TRANSIENT, bad)


class SecretTests(Fixture):
    def serve(self, plaintext: bytes, version: bytes | None = b"3", path: bytes = PREFIX + b"/secrets/db") -> None:
        nonce = os.urandom(12)
        headers = {b"content-type": b"application/octet-stream", b"x-plexsphere-secret-kid": b"nsk-1",
                   b"cache-control": b"no-store"}
        if version is not None:
            headers[b"x-plexsphere-secret-version"] = version
        self.answers[(b"GET", path)] = (200, nonce + AESGCM(NSK).encrypt(nonce, plaintext, None), headers)

    async def test_the_raw_body_decrypts_with_the_nsk_and_the_version_comes_from_the_header(self) -> None:
        self.serve(b"hunter2")
        value = await self.session.fetch_secret(SecretQuery("db"))
        self.assertEqual((value.plaintext, value.version), (b"hunter2", 3))
        self.assertEqual(self.sent()["headers"][b"accept"], [b"application/octet-stream"])

    async def test_a_version_asked_for_goes_in_the_query(self) -> None:
        self.serve(b"old", path=PREFIX + b"/secrets/db?version=2", version=b"2")
        value = await self.session.fetch_secret(SecretQuery("db", 2))
        self.assertEqual(value.version, 2)

    async def test_a_missing_or_unusable_version_header_is_a_failure(self) -> None:
        for version in (None, b"0", b"-1", b"x", b"1.5"):
            self.serve(b"v", version=version)
            with self.assertRaises(ControlPlaneError):
                await self.session.fetch_secret(SecretQuery("db"))

    async def test_a_tampered_or_short_body_fails_decryption(self) -> None:
        self.answers[(b"GET", PREFIX + b"/secrets/db")] = (200, b"\x00" * 27, {b"x-plexsphere-secret-version": b"1"})
        with self.assertRaises(DecryptionFailed):
            await self.session.fetch_secret(SecretQuery("db"))
        self.serve(b"value")
        status, body, headers = self.answers[(b"GET", PREFIX + b"/secrets/db")]
        self.answers[(b"GET", PREFIX + b"/secrets/db")] = (status, body[:-1] + bytes([body[-1] ^ 1]), headers)
        with self.assertRaises(DecryptionFailed):
            await self.session.fetch_secret(SecretQuery("db"))


class HeartbeatTests(Fixture):
    def answer_with(self, status: int, body: bytes) -> None:
        self.answers[(b"POST", PREFIX + b"/heartbeat")] = (status, body, {})

    async def test_the_heartbeat_holds_exactly_its_four_members(self) -> None:
        self.answer_with(200, b'{"accepted_at":"2026-05-01T00:00:00Z","reconcile":false,"rotate_keys":false}')
        answer = await self.session.heartbeat()
        body = self.body()
        self.assertEqual(list(body), ["client_now", "binary_checksum", "binary_version", "nat_summary"])
        self.assertEqual(body["binary_checksum"], base64.b64encode(bytes.fromhex(package_checksum())).decode())
        self.assertEqual(len(body["binary_checksum"]), 44)
        self.assertTrue(body["binary_version"].startswith("plexagent/"))
        self.assertEqual(body["nat_summary"], {})
        self.assertEqual(body["client_now"], "2026-05-28T20:26:40Z")
        self.assertEqual(answer.effects, ())

    async def test_reconcile_pulls_and_rotate_keys_rotates_the_node_key(self) -> None:
        self.answer_with(200, b'{"accepted_at":"2026-05-01T00:00:00Z","reconcile":true,"rotate_keys":true}')
        self.assertEqual((await self.session.heartbeat()).effects, (PullState(), RotateNodeKey()))

    async def test_a_heartbeat_not_provisioned_is_no_failure(self) -> None:
        self.answer_with(501, problem(501, "heartbeat_not_provisioned"))
        self.assertEqual((await self.session.heartbeat()).effects, ())

    async def test_a_revoked_credential_fails_the_heartbeat_as_an_auth_failure(self) -> None:
        self.answer_with(401, problem(401, "nsk_revoked"))
        with self.assertRaises(ControlPlaneError) as caught:
            await self.session.heartbeat()
        self.assertEqual((caught.exception.kind, caught.exception.revoked), (ErrorKind.AUTH, True))


class ReportTests(Fixture):
    def setUp(self) -> Any:
        self.set_aside: list[RefusedChange] = []
        return super().setUp()

    def keep(self, change: RefusedChange) -> defer.Deferred[None]:
        self.set_aside.append(change)
        return defer.succeed(None)

    def entry(self, key: str, payload: Any) -> dict[str, Any]:
        return {"key": key, "content_type": "application/json", "payload": payload, "version": 4}

    async def test_each_key_is_one_call_in_ascending_order(self) -> None:
        changes = Changes([self.entry("b", {"x": "é"}), self.entry("a", [1, 2])], ["c", "0"], 9)
        await self.session.deliver_reports(changes, self.keep)
        calls = [(r["method"], r["path"].rsplit(b"/", 1)[1], r["body"]) for r in self.recorder.requests]
        self.assertEqual(calls, [(b"DELETE", b"0", b""), (b"PUT", b"a", b'{"value":"[1,2]"}'),
                                 (b"PUT", b"b", '{"value":"{\\"x\\":\\"é\\"}"}'.encode()), (b"DELETE", b"c", b"")])

    async def test_a_large_value_is_never_compressed(self) -> None:
        await self.session.deliver_reports(Changes([self.entry("big", "x" * 3000)], [], 1), self.keep)
        self.assertNotIn(b"content-encoding", self.sent()["headers"])

    async def test_deleting_a_report_the_platform_does_not_have_is_done(self) -> None:
        self.answers[(b"DELETE", PREFIX + b"/state/reports/gone")] = (404, problem(404, "report_not_found"), {})
        await self.session.deliver_reports(Changes([], ["gone"], 1), self.keep)
        self.assertEqual(self.set_aside, [])

    async def test_an_invalid_report_is_set_aside_and_the_others_delivered(self) -> None:
        self.answers[(b"PUT", PREFIX + b"/state/reports/a")] = (400, problem(400, "invalid_report"), {})
        await self.session.deliver_reports(Changes([self.entry("a", 1), self.entry("b", 2)], [], 2), self.keep)
        self.assertEqual([(c.op, c.key, c.code) for c in self.set_aside], [("put", "a", "invalid_report")])
        self.assertEqual(self.sent()["path"], PREFIX + b"/state/reports/b")

    async def test_reports_not_provisioned_pause_the_outbox_for_five_minutes(self) -> None:
        self.answers[(b"PUT", PREFIX + b"/state/reports/a")] = (501, problem(501, "reports_not_provisioned"), {})
        with self.assertRaises(ControlPlaneError) as caught:
            await self.session.deliver_reports(Changes([self.entry("a", 1), self.entry("b", 2)], [], 2), self.keep)
        self.assertEqual((caught.exception.kind, caught.exception.pause), (ErrorKind.NOT_PROVISIONED, 300.0))
        self.assertEqual(len(self.recorder.requests), 1)


class NodeKeyTests(Fixture):
    async def test_a_rotation_sends_a_fresh_public_key_and_keeps_its_pair(self) -> None:
        self.answers[(b"POST", b"/v1/keys/rotate")] = (
            200, b'{"rotation_id":"0190a8b8-a0c0-7a0a-8a0a-a0a0a0a0a0f9","kid":"nsk-2","wrap_key_version":2}', {})
        identity = await self.session.rotate_node_key()
        self.assertEqual(list(self.body()), ["new_public_key"])
        self.assertEqual(self.body()["new_public_key"], identity.keypair.public_b64)
        self.assertEqual(identity.bearer, self.identity.bearer)

    async def test_nothing_pending_unchanged_or_not_provisioned_changes_nothing(self) -> None:
        for status, code in ((409, "keys_rotate_no_pending_rotation"), (422, "keys_rotate_public_key_unchanged"),
                             (501, "keys_rotate_not_provisioned")):
            self.answers[(b"POST", b"/v1/keys/rotate")] = (status, problem(status, code), {})
            self.assertIsNone(await self.session.rotate_node_key(), status)

    async def test_a_failed_rotation_is_an_error(self) -> None:
        self.answers[(b"POST", b"/v1/keys/rotate")] = (500, problem(500, "internal"), {})
        with self.assertRaises(ControlPlaneError):
            await self.session.rotate_node_key()


class LocalRuleTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.rules = PlexsphereLocalRules(self.clock)

    def refusal(self, f: Any, *args: Any) -> str:
        return str(self.assertRaises(errors.PlexError, f, *args).message)

    def test_report_keys_follow_the_platform_s_grammar(self) -> None:
        for key in ("a", "a.b-c_d9", "a" * 128):
            self.rules.check_report_key(key)
        for key in ("A", "9a", "a/b", "a" * 129, "a\n", "", "é"):
            self.assertEqual(self.refusal(self.rules.check_report_key, key), "invalid report key", key)
            self.assertFalse(self.rules.report_key_syncable(key))

    def test_a_value_over_4096_bytes_is_refused_counting_bytes_not_characters(self) -> None:
        self.rules.check_report_put("k", "x" * 4094)  # 4096 bytes with its quotes
        self.assertEqual(self.refusal(self.rules.check_report_put, "k", "x" * 4095),
                         "payload exceeds the 4096-byte limit")
        self.assertEqual(self.refusal(self.rules.check_report_put, "k", "é" * 2048),
                         "payload exceeds the 4096-byte limit")

    def test_the_version_is_checked_before_the_key_and_neither_needs_the_index(self) -> None:
        self.assertEqual(self.refusal(self.rules.secret_query, "BAD", b"0", {}), "invalid version")
        for version in (b"0", b"-1", b"x", b"01", b""):
            self.assertEqual(self.refusal(self.rules.secret_query, "db", version, {}), "invalid version", version)
        self.assertEqual(self.refusal(self.rules.secret_query, "tls/key", None, {}), "invalid secret key")
        self.assertEqual(self.rules.secret_query("db", b"7", {}), SecretQuery("db", 7))

    def test_after_a_429_no_secret_is_fetched_until_retry_after_has_passed(self) -> None:
        error = ControlPlaneError(Call.SECRET, ErrorKind.RATE_LIMITED, "secret: 429", status=429, retry_after=30.0)
        mapped = self.rules.secret_error(error)
        self.assertEqual((type(mapped), mapped.retry_after), (errors.RateLimited, 30))
        self.clock.advance(10.5)
        held = self.assertRaises(errors.RateLimited, self.rules.secret_query, "db", None, {})
        self.assertEqual((held.message, held.retry_after), ("rate limited", 20))
        self.clock.advance(20)
        self.assertEqual(self.rules.secret_query("db", None, {}), SecretQuery("db"))

    def test_control_plane_answers_map_onto_the_local_errors(self) -> None:
        def mapped(kind: ErrorKind, status: int) -> Any:
            error = self.rules.secret_error(ControlPlaneError(Call.SECRET, kind, "x", status=status))
            return type(error), error.message

        self.assertEqual(mapped(ErrorKind.NOT_FOUND, 404), (errors.NotFound, "not found"))
        self.assertEqual(mapped(ErrorKind.TRANSIENT, 403), (errors.Forbidden, "forbidden"))
        for kind, status in ((ErrorKind.AUTH, 401), (ErrorKind.NOT_PROVISIONED, 501), (ErrorKind.TRANSIENT, 503)):
            self.assertEqual(mapped(kind, status), (errors.Unavailable, "control plane unavailable"), status)

    def test_a_secret_s_invalid_utf8_is_replaced_not_refused(self) -> None:
        doc = self.rules.secret_document(SecretValue("db", b"ok\xff", 4), {})
        self.assertEqual(doc, {"key": "db", "value": "ok\ufffd", "version": 4})
