"""
plexd's calls as the agent makes them (a recording server on loopback TCP
answers what a plexd control plane would), and what each answer means.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.internet import defer, endpoints, reactor, task
from twisted.trial import unittest
from twisted.web import server
from twisted.web.http_headers import Headers

from plexagent.config import parse_config
from plexagent.controlplane.build import package_checksum
from plexagent.controlplane.client import Reply, Transport
from plexagent.controlplane.identity import NodeKeyPair
from plexagent.controlplane.plexd import PlexdProtocol, PlexdSession, classify
from plexagent.controlplane.protocol import (
    Call,
    ControlPlaneError,
    ErrorKind,
    Identity,
    PullState,
    RefusedChange,
    SecretQuery,
    build_protocol,
)
from plexagent.node.reports import Changes
from plexagent.node.secrets import DecryptionFailed
from tests.controlplane.fakes import Recorder
from tests.controlplane.harness import eventually

NSK = "CT4kN51SZizP0Lywv-GtcnZPWGUnm12X"
NODE = "n-42:eu@west+1 x"
PREFIX = b"/v1/nodes/n-42:eu@west+1%20x"
K1 = base64.b64encode(b"\x01" * 32).decode()
K2 = base64.b64encode(b"\x02" * 32).decode()


class ClassificationTests(unittest.TestCase):
    def kind(self, call: Call, status: int) -> ErrorKind:
        return classify(call, Reply(status, Headers(), b"")).kind

    def test_registration_ends_on_400_401_403_404_409_and_retries_the_rest(self) -> None:
        for status in (400, 401, 403, 404, 409):
            self.assertEqual(self.kind(Call.REGISTER, status), ErrorKind.PERMANENT, status)
        self.assertEqual(self.kind(Call.REGISTER, 429), ErrorKind.RATE_LIMITED)
        for status in (408, 422, 500, 503):
            self.assertEqual(self.kind(Call.REGISTER, status), ErrorKind.TRANSIENT, status)

    def test_401_is_an_auth_failure_on_every_node_call(self) -> None:
        for call in (Call.STATE, Call.SECRET, Call.HEARTBEAT, Call.REPORT, Call.EVENTS):
            self.assertEqual(self.kind(call, 401), ErrorKind.AUTH, call)

    def test_an_unknown_secret_is_not_found_and_everything_else_transient(self) -> None:
        self.assertEqual(self.kind(Call.SECRET, 404), ErrorKind.NOT_FOUND)
        self.assertEqual(self.kind(Call.STATE, 404), ErrorKind.TRANSIENT)
        self.assertEqual(self.kind(Call.EVENTS, 403), ErrorKind.TRANSIENT)

    def test_report_4xx_about_the_content_are_refusals(self) -> None:
        for status in (400, 409, 413, 422):
            self.assertEqual(self.kind(Call.REPORT, status), ErrorKind.REFUSED, status)
        for status in (403, 404, 407, 408, 425, 500):
            self.assertEqual(self.kind(Call.REPORT, status), ErrorKind.TRANSIENT, status)

    def test_retry_after_is_a_floor_on_429_and_503_only(self) -> None:
        headers = Headers({b"retry-after": [b"9"]})
        self.assertEqual(classify(Call.STATE, Reply(429, headers, b"")).retry_after, 9.0)
        self.assertEqual(classify(Call.STATE, Reply(503, headers, b"")).retry_after, 9.0)
        self.assertIsNone(classify(Call.STATE, Reply(500, headers, b"")).retry_after)


class Fixture(unittest.TestCase):
    timeout = 30

    def setUp(self) -> Any:
        self.recorder = Recorder()
        self.answers: dict[tuple[bytes, bytes], tuple[int, bytes]] = {}
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
        config = parse_config({"node": {"id": NODE}, "control_plane": {"url": self.url}})
        self.protocol = build_protocol(config, self.transport, self.clock)
        assert isinstance(self.protocol, PlexdProtocol)
        self.identity = Identity("plexd", NODE, bearer=NSK, aes_key=NSK.encode(), nsk_text=NSK)
        self.session = self.protocol.session(self.identity)
        assert isinstance(self.session, PlexdSession)

    def answer(self, request: Any) -> bytes:
        status, body = self.answers.get((request.method, request.path), (200, b"{}"))
        request.setResponseCode(status)
        return body

    def sent(self, index: int = -1) -> dict[str, Any]:
        return self.recorder.requests[index]

    def body(self, index: int = -1) -> Any:
        return json.loads(self.sent(index)["body"])


class StateTests(Fixture):
    def set_state(self, doc: Any) -> None:
        self.answers[(b"GET", PREFIX + b"/state")] = (200, json.dumps(doc).encode())

    async def test_null_lists_and_absent_members_are_empty_state(self) -> None:
        self.set_state({"peers": None, "metadata": None, "data": None, "secret_refs": None})
        fetched = await self.session.fetch_state()
        self.assertEqual((dict(fetched.state.metadata), dict(fetched.state.data)), ({}, {}))
        self.assertEqual(self.sent()["headers"][b"authorization"], [b"Bearer " + NSK.encode()])

    async def test_keys_come_with_the_first_fetch_then_only_when_current_or_previous_change(self) -> None:
        self.set_state({"signing_keys": {"current": K2, "previous": K1, "transition_expires": "2026-06-01T00:00:00Z"}})
        first = await self.session.fetch_state()
        self.assertEqual(first.keys.current.raw, b"\x02" * 32)
        self.session.state_applied(first)
        self.set_state({"signing_keys": {"current": K2, "previous": K1, "transition_expires": "2027-01-01T00:00:00Z"}})
        self.assertIsNone((await self.session.fetch_state()).keys)
        self.set_state({"signing_keys": {"current": K1}})
        self.assertEqual((await self.session.fetch_state()).keys.current.raw, b"\x01" * 32)

    async def test_keys_disappearing_from_the_state_leave_the_keys_in_force(self) -> None:
        self.set_state({"signing_keys": {"current": K2}})
        self.session.state_applied(await self.session.fetch_state())
        self.set_state({})
        self.assertIsNone((await self.session.fetch_state()).keys)

    async def test_a_bad_transition_expires_ignores_only_the_keys(self) -> None:
        self.set_state({"metadata": {"a": "b"}, "signing_keys": {"current": K2, "transition_expires": "soon"}})
        fetched = await self.session.fetch_state()
        self.assertIsNone(fetched.keys)
        self.assertEqual(dict(fetched.state.metadata), {"a": "b"})

    async def test_a_state_of_many_entries_holding_payloads_nested_to_the_client_limit_is_taken(self) -> None:
        deep: Any = 1
        for _ in range(63):  # a payload as deep as a client may PUT (64 levels)
            deep = [deep]
        entries = [{"key": f"k{i}", "content_type": "application/json", "payload": {"a": [1, 2, 3]}, "version": 1,
                    "updated_at": ""} for i in range(20_000)]
        entries[0]["payload"] = deep
        self.set_state({"metadata": {}, "data": entries})
        fetched = await self.session.fetch_state()
        self.assertEqual(len(fetched.state.data), 20_000)

    async def test_an_empty_or_unusable_answer_is_a_transient_failure(self) -> None:
        for body in (b"", b"[]", b'{"metadata": {"a": 1}}'):
            self.answers[(b"GET", PREFIX + b"/state")] = (200, body)
            with self.assertRaises(ControlPlaneError) as caught:
                await self.session.fetch_state()
            self.assertEqual(caught.exception.kind, ErrorKind.TRANSIENT, body)

    async def test_drift_is_reported_as_plexd_computes_it_once_per_change(self) -> None:
        entry = {"key": "k", "content_type": "text/plain", "payload": "v", "version": 1, "updated_at": ""}
        self.set_state({"signing_keys": {"current": K2}, "metadata": {"a": "b"}, "data": [entry],
                        "secret_refs": [{"key": "s", "version": 1}]})
        self.session.state_applied(await self.session.fetch_state())
        await eventually(lambda: any(r["path"].endswith(b"/drift") for r in self.recorder.requests))
        drift = json.loads(next(r for r in self.recorder.requests if r["path"].endswith(b"/drift"))["body"])
        self.assertEqual([c["type"] for c in drift["corrections"]],
                         ["signing_keys_updated", "metadata_updated", "data_updated", "secret_refs_updated"])
        self.assertEqual(drift["corrections"][0]["detail"], "signing keys rotated")
        self.assertRegex(drift["timestamp"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        before = len(self.recorder.requests)
        self.session.state_applied(await self.session.fetch_state())  # nothing changed: no drift
        entry["version"] = 2
        self.set_state({"signing_keys": {"current": K2}, "metadata": {"a": "b"}, "data": [entry],
                        "secret_refs": [{"key": "s", "version": 1}]})
        self.session.state_applied(await self.session.fetch_state())
        await eventually(lambda: len(self.recorder.requests) == before + 3)
        self.assertEqual([c["type"] for c in self.body()["corrections"]], ["data_updated"])


    async def test_closing_the_session_abandons_a_drift_report_in_flight(self) -> None:
        from twisted.web import server

        self.set_state({"metadata": {"a": "b"}})
        fetched = await self.session.fetch_state()
        answer = self.recorder.answer
        self.recorder.answer = lambda request: server.NOT_DONE_YET if request.path.endswith(b"/drift") \
            else answer(request)
        self.session.state_applied(fetched)
        await eventually(lambda: any(r["path"].endswith(b"/drift") for r in self.recorder.requests))
        self.assertEqual(len(self.session._detached), 1)
        await self.session.close()
        self.assertEqual(self.session._detached, set())


class SecretTests(Fixture):
    def secret(self, key: bytes, plaintext: bytes, version: int = 3) -> None:
        nonce = os.urandom(12)
        ct = AESGCM(NSK.encode()).encrypt(nonce, plaintext, None)
        body = {"key": key.decode(), "ciphertext": base64.b64encode(ct).decode(),
                "nonce": base64.b64encode(nonce).decode(), "version": version}
        self.answers[(b"GET", PREFIX + b"/secrets/" + key.replace(b"/", b"%2F"))] = (200, json.dumps(body).encode())

    async def test_a_secret_is_fetched_by_its_escaped_key_and_decrypted_with_the_nsk_bytes(self) -> None:
        self.secret(b"tls/server.key", b"pem")
        value = await self.session.fetch_secret(SecretQuery("tls/server.key"))
        self.assertEqual((value.plaintext, value.version), (b"pem", 3))
        self.assertEqual(self.sent()["path"], PREFIX + b"/secrets/tls%2Fserver.key")

    async def test_an_unknown_secret_is_not_found(self) -> None:
        self.answers[(b"GET", PREFIX + b"/secrets/x")] = (404, b'{"error":"not found"}')
        with self.assertRaises(ControlPlaneError) as caught:
            await self.session.fetch_secret(SecretQuery("x"))
        self.assertEqual(caught.exception.kind, ErrorKind.NOT_FOUND)

    async def test_a_tampered_secret_fails_decryption(self) -> None:
        self.secret(b"k", b"v")
        status, body = self.answers[(b"GET", PREFIX + b"/secrets/k")]
        doc = json.loads(body)
        raw = bytearray(base64.b64decode(doc["ciphertext"]))
        raw[0] ^= 1
        doc["ciphertext"] = base64.b64encode(bytes(raw)).decode()
        self.answers[(b"GET", PREFIX + b"/secrets/k")] = (200, json.dumps(doc).encode())
        with self.assertRaises(DecryptionFailed):
            await self.session.fetch_secret(SecretQuery("k"))


class HeartbeatTests(Fixture):
    async def test_the_body_is_exactly_plexd_s_five_members_in_order(self) -> None:
        self.clock.advance(3723)
        await self.session.heartbeat()
        raw = self.sent()["body"].decode()
        self.assertRegex(raw, r'^\{"node_id":"n-42:eu@west\+1 x","timestamp":"[^"]+Z","status":"ok",'
                              r'"uptime":"1h2m3s","binary_checksum":"[0-9a-f]{64}"\}$')
        self.assertEqual(json.loads(raw)["binary_checksum"], package_checksum())

    async def test_reconcile_or_rotate_keys_asks_for_a_state_fetch(self) -> None:
        for answer, effects in ((b'{"reconcile":true}', (PullState(),)), (b'{"rotate_keys":true}', (PullState(),)),
                                (b'{"reconcile":false,"rotate_keys":false}', ()), (b"{}", ())):
            self.answers[(b"POST", PREFIX + b"/heartbeat")] = (200, answer)
            self.assertEqual((await self.session.heartbeat()).effects, effects, answer)

    async def test_an_empty_answer_is_a_failure_as_in_plexd(self) -> None:
        self.answers[(b"POST", PREFIX + b"/heartbeat")] = (204, b"")
        with self.assertRaises(ControlPlaneError):
            await self.session.heartbeat()


class ReportTests(Fixture):
    async def deliver(self, changes: Changes) -> list[RefusedChange]:
        kept: list[RefusedChange] = []

        def keep(change: RefusedChange) -> defer.Deferred[None]:
            kept.append(change)
            return defer.succeed(None)

        await self.session.deliver_reports(changes, keep)
        return kept

    async def test_an_empty_list_is_sent_as_null_and_html_is_escaped_as_go_does(self) -> None:
        entry = {"key": "k", "content_type": "application/json", "payload": {"n": "<&>"}, "version": 1,
                 "updated_at": "2026-01-01T00:00:00Z"}
        await self.deliver(Changes([entry], [], 1))
        self.assertIn(b'"deleted":null', self.sent()["body"])
        self.assertIn(b'"n":"\\u003c\\u0026\\u003e"', self.sent()["body"])
        await self.deliver(Changes([], ["k"], 2))
        self.assertEqual(self.body(), {"entries": None, "deleted": ["k"]})

    async def test_a_refused_change_is_set_aside(self) -> None:
        self.answers[(b"POST", PREFIX + b"/report")] = (400, b'{"error":"bad"}')
        with self.assertRaises(ControlPlaneError) as caught:
            await self.deliver(Changes([], ["k"], 1))
        self.assertEqual(caught.exception.kind, ErrorKind.TRANSIENT)  # even the empty probe was refused


class EnrollmentCallTests(Fixture):
    async def test_register_sends_the_token_as_bearer_and_in_the_body(self) -> None:
        answer = {"node_id": NODE, "mesh_ip": "10.99.0.42", "signing_public_key": K1, "node_secret_key": NSK,
                  "peers": []}
        self.answers[(b"POST", b"/v1/register")] = (200, json.dumps(answer).encode())
        keypair = NodeKeyPair.generate()
        identity = await self.protocol.enroller().enroll("boot-token", keypair)
        self.assertEqual((identity.node_id, identity.bearer, identity.aes_key), (NODE, NSK, NSK.encode()))
        self.assertEqual(self.sent()["headers"][b"authorization"], [b"Bearer boot-token"])
        self.assertRegex(self.sent()["body"].decode(), r'^\{"token":"boot-token","public_key":"[A-Za-z0-9+/]{43}=",'
                                                        r'"hostname":"[^"]*"\}$')
        self.assertEqual(self.body()["public_key"], keypair.public_b64)

    async def test_an_unusable_answer_is_permanent_and_names_the_field(self) -> None:
        for answer, field in (({"node_secret_key": NSK}, "node_id"), ({"node_id": "n"}, "node_secret_key"),
                              ({"node_id": "n", "node_secret_key": "a\nb"}, "node_secret_key")):
            self.answers[(b"POST", b"/v1/register")] = (200, json.dumps(answer).encode())
            with self.assertRaises(ControlPlaneError) as caught:
                await self.protocol.enroller().enroll("t", NodeKeyPair.generate())
            self.assertEqual(caught.exception.kind, ErrorKind.PERMANENT)
            self.assertIn(field, str(caught.exception))
            self.assertNotIn("a\nb", str(caught.exception))

    async def test_deregister_posts_no_body_with_the_nsk(self) -> None:
        self.answers[(b"POST", PREFIX + b"/deregister")] = (204, b"")
        await self.protocol.enroller().deregister(self.identity)
        self.assertEqual(self.sent()["headers"][b"content-length"], [b"0"])
        self.assertEqual(self.sent()["headers"][b"authorization"], [b"Bearer " + NSK.encode()])

    def test_an_identity_document_round_trips_and_holds_the_nsk_as_issued(self) -> None:
        identity = Identity("plexd", NODE, bearer=NSK, aes_key=NSK.encode(), nsk_text=NSK, mesh_ip="10.0.0.1",
                            signing_public_key=K1, keypair=NodeKeyPair.generate(), enrolled_at="2026-01-01T00:00:00Z")
        doc = self.protocol.identity_document(identity)
        self.assertEqual(doc["node_secret_key"], NSK)
        again = self.protocol.identity_from_document(json.loads(json.dumps(doc)))
        self.assertEqual(again, identity)
        self.assertNotIn(NSK, repr(again))

    def test_an_identity_document_without_a_node_id_or_nsk_is_unusable(self) -> None:
        for doc in ({"node_secret_key": NSK}, {"node_id": "n"}, {"node_id": "n", "node_secret_key": NSK, "mesh_ip": 1},
                    {"node_id": "n", "node_secret_key": NSK, "private_key": "short"}):
            self.assertRaises(ValueError, self.protocol.identity_from_document, doc)
        # mesh_ip is not required (the agent has no mesh).
        self.assertEqual(self.protocol.identity_from_document({"node_id": "n", "node_secret_key": NSK}).node_id, "n")


class EventStreamOpenTests(Fixture):
    async def test_refusals_are_classified_and_the_last_event_id_sent(self) -> None:
        self.answers[(b"GET", PREFIX + b"/events")] = (403, b"")
        with self.assertRaises(ControlPlaneError) as caught:
            await self.session.open_events("41")
        self.assertEqual(caught.exception.kind, ErrorKind.TRANSIENT)
        self.assertEqual(self.sent()["headers"][b"last-event-id"], [b"41"])


class RegistryTests(unittest.TestCase):
    def test_each_protocol_name_builds_its_protocol(self) -> None:
        from plexagent.controlplane.plexsphere import PlexsphereProtocol

        for name, cls in (("plexd", PlexdProtocol), ("plexsphere", PlexsphereProtocol)):
            config = parse_config({"control_plane": {"protocol": name}})
            self.assertIsInstance(build_protocol(config, None, task.Clock()), cls)
