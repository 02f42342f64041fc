"""
The control-plane simulator serves plexd's protocol as plexd's client
expects it: every endpoint, its credentials and faults, events signed as
plexd verifies them, and the requests plexd's own client code sent
(tests/controlplane/captures) answered as a plexd control plane answers.
"""

from __future__ import annotations

import base64
import glob
import gzip
import io
import json
import os
import re
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.internet import defer, endpoints, protocol, reactor
from twisted.trial import unittest
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from plexagent.controlplane import gojson
from plexagent.controlplane.keys import KeySet
from plexagent.controlplane.plexd_events import PlexdEventCodec
from plexagent.controlplane.protocol import Dropped, DropReason
from plexagent.testing.simulator import ControlPlaneSimulator
from tests.controlplane.harness import eventually

CAPTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "captures", "plexd")


class Fixture(unittest.TestCase):
    timeout = 30

    async def started(self, sim: ControlPlaneSimulator | None = None) -> ControlPlaneSimulator:
        sim = sim or ControlPlaneSimulator.example()
        await sim.start(reactor)
        self.addCleanup(lambda: defer.ensureDeferred(sim.stop()))
        self.sim = sim
        return sim

    async def call(self, method: str, path: str, bearer: str | None = None, body: Any = None,
                   headers: dict[str, str] | None = None, data: bytes | None = None) -> tuple[int, Any, Any]:
        sent = {k.encode(): [v.encode()] for k, v in (headers or {}).items()}
        if bearer is not None:
            sent[b"Authorization"] = [b"Bearer " + bearer.encode()]
        if body is not None:
            data = json.dumps(body).encode()
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        producer = FileBodyProducer(io.BytesIO(data)) if data is not None else None
        response = await agent.request(method.encode(), (self.sim.url + path).encode(), Headers(sent), producer)
        raw = await readBody(response)
        return response.code, (json.loads(raw) if raw else None), response

    async def enroll(self) -> dict[str, Any]:
        code, answer, _ = await self.call("POST", "/v1/register", self.sim.bootstrap_token,
                                          {"token": self.sim.bootstrap_token, "public_key": base64.b64encode(
                                              bytes(32)).decode(), "hostname": "h"})
        self.assertEqual(code, 200)
        return answer  # type: ignore[no-any-return]


class RegistrationTests(Fixture):
    async def test_a_bootstrap_token_enrolls_once_and_the_answer_is_plexd_s(self) -> None:
        sim = await self.started()
        answer = await self.enroll()
        self.assertEqual(set(answer), {"node_id", "mesh_ip", "signing_public_key", "node_secret_key", "peers"})
        self.assertEqual(len(answer["node_secret_key"]), 32)
        self.assertEqual(answer["signing_public_key"], sim.public_key_b64)
        self.assertEqual((sim.node_id, sim.token), (answer["node_id"], answer["node_secret_key"]))
        code, _, _ = await self.call("POST", "/v1/register", sim.bootstrap_token,
                                     {"token": sim.bootstrap_token, "public_key": answer["signing_public_key"]})
        self.assertEqual(code, 401)

    async def test_the_bearer_must_be_the_token_in_the_body(self) -> None:
        sim = await self.started()
        code, _, _ = await self.call("POST", "/v1/register", "other", {"token": sim.bootstrap_token,
                                                                       "public_key": sim.public_key_b64})
        self.assertEqual(code, 401)

    async def test_a_public_key_that_is_not_32_bytes_is_400(self) -> None:
        sim = await self.started()
        code, _, _ = await self.call("POST", "/v1/register", sim.bootstrap_token,
                                     {"token": sim.bootstrap_token, "public_key": "c2hvcnQ="})
        self.assertEqual(code, 400)


class NodeCallTests(Fixture):
    async def test_calls_need_the_node_s_own_nsk_as_bearer(self) -> None:
        sim = await self.started()
        answer = await self.enroll()
        path = f"/v1/nodes/{answer['node_id']}/state"
        self.assertEqual((await self.call("GET", path, answer["node_secret_key"]))[0], 200)
        self.assertEqual((await self.call("GET", path, sim.example_node.nsk_text))[0], 401)
        self.assertEqual((await self.call("GET", "/v1/nodes/nobody/state", sim.token))[0], 404)
        sim.faults.revoke_bearer()
        self.assertEqual((await self.call("GET", path, answer["node_secret_key"]))[0], 401)

    async def test_the_state_carries_the_signing_keys_and_the_example_node(self) -> None:
        sim = await self.started()
        code, state, _ = await self.call("GET", f"/v1/nodes/{sim.node_id}/state", sim.token)
        self.assertEqual(state["signing_keys"], {"current": sim.public_key_b64})
        self.assertEqual(state["metadata"]["role"], "gateway")
        self.assertEqual((state["peers"], state["policies"]), ([], []))
        new = sim.rotate_signing_key(via="state", transition=60)
        code, state, _ = await self.call("GET", f"/v1/nodes/{sim.node_id}/state", sim.token)
        self.assertEqual(state["signing_keys"]["current"], new)
        self.assertRegex(state["signing_keys"]["transition_expires"], r"Z$")

    async def test_gzipped_answers_only_to_clients_that_accept_them(self) -> None:
        sim = await self.started()
        sim.faults.gzip_responses = True
        path = f"/v1/nodes/{sim.node_id}/state"
        _, _, response = await self.call("GET", path, sim.token, headers={"Accept-Encoding": "identity"})
        self.assertIsNone(response.headers.getRawHeaders("content-encoding"))

    async def test_secrets_are_encrypted_with_the_nsk_bytes(self) -> None:
        sim = await self.started()
        code, body, _ = await self.call("GET", f"/v1/nodes/{sim.node_id}/secrets/db%2Fpassword", sim.token)
        plaintext = AESGCM(sim.token.encode()).decrypt(base64.b64decode(body["nonce"]),
                                                       base64.b64decode(body["ciphertext"]), None)
        self.assertEqual((code, plaintext, body["version"]), (200, b"s3cret-p@ssw0rd", 2))
        self.assertEqual((await self.call("GET", f"/v1/nodes/{sim.node_id}/secrets/nope", sim.token))[0], 404)

    async def test_a_heartbeat_of_other_members_is_answered_and_recorded_as_a_violation(self) -> None:
        sim = await self.started()
        sim.faults.heartbeat_rotate_keys = 1
        code, answer, _ = await self.call("POST", f"/v1/nodes/{sim.node_id}/heartbeat", sim.token,
                                          {"node_id": sim.node_id, "uptime_s": 1})
        self.assertEqual(answer, {"reconcile": False, "rotate_keys": True})
        self.assertEqual(len(sim.violations), 1)

    async def test_reports_take_gzip_and_null_lists_and_refuse_what_is_not_strict_json(self) -> None:
        sim = await self.started()
        path = f"/v1/nodes/{sim.node_id}/report"
        entry = {"key": "k", "content_type": "application/json", "payload": 1, "version": 1, "updated_at": "x"}
        code, _, _ = await self.call("POST", path, sim.token, data=gzip.compress(json.dumps(
            {"entries": [entry], "deleted": None}).encode()), headers={"Content-Encoding": "gzip"})
        self.assertEqual(code, 204)
        self.assertEqual(sim.raw_report_posts[-1]["deleted"], None)
        self.assertEqual((await self.call("POST", path, sim.token, data=b'{"entries":null,"deleted":["k"]}'))[0], 204)
        self.assertEqual(sim.reported(), {})
        self.assertEqual((await self.call("POST", path, sim.token, data=b'{"entries":[{"key":"a","payload":NaN}]}'))[0],
                         400)

    async def test_a_deregistered_node_is_unknown(self) -> None:
        sim = await self.started()
        answer = await self.enroll()
        base = f"/v1/nodes/{answer['node_id']}"
        self.assertEqual((await self.call("POST", base + "/deregister", answer["node_secret_key"]))[0], 204)
        self.assertEqual(sim.deregistrations, [answer["node_id"]])
        self.assertEqual((await self.call("GET", base + "/state", answer["node_secret_key"]))[0], 404)

    async def test_injected_failures_carry_an_integer_retry_after(self) -> None:
        sim = await self.started()
        sim.faults.fail("state", 429, retry_after=7)
        code, _, response = await self.call("GET", f"/v1/nodes/{sim.node_id}/state", sim.token)
        self.assertEqual((code, response.headers.getRawHeaders("retry-after")), (429, ["7"]))


class StreamReader(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.ended = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.ended = True


class EventTests(Fixture):
    async def stream(self, last_event_id: str = "") -> StreamReader:
        sim = self.sim
        headers = {b"Authorization": [b"Bearer " + sim.token.encode()], b"Accept": [b"text/event-stream"]}
        if last_event_id:
            headers[b"Last-Event-ID"] = [last_event_id.encode()]
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        response = await agent.request(b"GET", f"{sim.url}/v1/nodes/{sim.node_id}/events".encode(), Headers(headers))
        reader = StreamReader()
        response.deliverBody(reader)
        self.addCleanup(lambda: reader.transport.stopProducing())
        await eventually(lambda: b": stream open" in reader.data)
        return reader

    def decide(self, data: bytes, codec: PlexdEventCodec | None = None) -> str:
        codec = codec or PlexdEventCodec()
        keys = KeySet.from_strings(self.sim.public_key_b64)
        try:
            codec.verify(codec.decode(data), keys, round(reactor.seconds() * 1e9))
        except Dropped as dropped:
            return dropped.reason.value
        return "accept"

    def data_of(self, raw: bytes, event_id: str) -> bytes:
        block = raw.split(b"id: " + event_id.encode() + b"\n", 1)[1].split(b"\n\n", 1)[0]
        return b"\n".join(line[6:] for line in block.split(b"\n") if line.startswith(b"data: "))

    async def test_published_events_verify_and_every_forgery_is_dropped_for_its_reason(self) -> None:
        sim = await self.started()
        reader = await self.stream()
        good = sim.publish("node_state_updated", {"metadata": {"a": "<&>"}, "data": []})
        pretty = sim.publish("node_state_updated", payload_raw=b'{\n  "metadata": {"b": "\xe2\x80\xa8"},\n "data": []}')
        offset = sim.publish("node_state_updated", {"metadata": {}, "data": []},
                             wire_issued_at=b"2099-01-01T00:00:00.000+00:00")
        faults = {kind: sim.inject_event_fault(kind) for kind in
                  ("bad_signature", "missing_signature", "stale", "future", "unknown_key", "malformed")}
        await eventually(lambda: f"id: {faults['malformed']}\n".encode() in reader.data)
        self.assertEqual(self.decide(self.data_of(reader.data, good)), "accept")
        self.assertEqual(self.decide(self.data_of(reader.data, pretty)), "accept")
        self.assertEqual(self.decide(self.data_of(reader.data, offset)), "future")  # written other than signed
        expected = {"bad_signature": "bad_signature", "missing_signature": "missing_field", "stale": "stale",
                    "future": "future", "unknown_key": "bad_signature", "malformed": "invalid_json"}
        for kind, event_id in faults.items():
            self.assertEqual(self.decide(self.data_of(reader.data, event_id)), expected[kind], kind)

    async def test_a_replayed_nonce_is_a_replay(self) -> None:
        sim = await self.started()
        reader = await self.stream()
        first = sim.publish("node_secrets_updated", {"secret_refs": []})
        again = sim.inject_event_fault("replay")
        await eventually(lambda: f"id: {again}\n".encode() in reader.data)
        codec = PlexdEventCodec()
        self.assertEqual(self.decide(self.data_of(reader.data, first), codec), "accept")
        self.assertEqual(self.decide(self.data_of(reader.data, again), codec), DropReason.REPLAY.value)

    async def test_a_rotation_by_event_is_signed_with_the_old_key(self) -> None:
        sim = await self.started()
        reader = await self.stream()
        old = sim.public_key_b64
        new = sim.rotate_signing_key(via="event")
        event_id = sim.events[-1][0]
        await eventually(lambda: f"id: {event_id}\n".encode() in reader.data)
        codec = PlexdEventCodec()
        envelope = codec.decode(self.data_of(reader.data, event_id))
        codec.verify(envelope, KeySet.from_strings(old), round(reactor.seconds() * 1e9))
        self.assertEqual(codec.effect(envelope).keys.current.text, new)

    async def test_a_reconnect_with_last_event_id_gets_what_followed(self) -> None:
        sim = await self.started()
        first = sim.publish("node_secrets_updated", {"secret_refs": []})
        second = sim.publish("node_secrets_updated", {"secret_refs": []})
        reader = await self.stream(first)
        self.assertIn(f"id: {second}\n".encode(), reader.data)
        self.assertNotIn(f"id: {first}\n".encode(), reader.data)
        self.assertEqual(sim.stream_requests, [first])


def captured_request(path: str) -> tuple[bytes, bytes]:
    """The request head (as received) and body of one capture."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")
    start = lines.index("# request line and headers exactly as received (header order and case as sent)") + 1
    end = lines.index("", start)
    head = "\r\n".join(lines[start:end]).encode() + b"\r\n\r\n"
    body_path = path[:-4] + ".body.bin"
    body = open(body_path, "rb").read() if os.path.exists(body_path) else b""
    return head, body


class HeadReader(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if b"\r\n\r\n" in self.data and not self.done.called:
            self.done.callback(self.data)
            self.transport.loseConnection()


class CaptureReplayTests(Fixture):
    async def test_every_request_plexd_s_client_sent_is_answered_as_a_plexd_control_plane_answers(self) -> None:
        sim = await self.started(ControlPlaneSimulator.example(node_id="n-42:eu@west+1 x",
                                                               nsk_text="CT4kN51SZizP0Lywv-GtcnZPWGUnm12X",
                                                               bootstrap_tokens=[]))
        sim.issue_bootstrap_token(uses=2, token="lab-bootstrap-token-1")  # the first attempt was answered 503
        sim.set_secret("tls/server.key", b"pem", 3)
        captures = sorted(glob.glob(os.path.join(CAPTURES, "*.txt")))
        self.assertEqual(len(captures), 16)
        answered = {}
        for path in captures:
            head, body = captured_request(path)
            reader = HeadReader()
            endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", sim.port)
            await endpoints.connectProtocol(endpoint, reader)
            reader.transport.write(head + body)
            status = int((await reader.done).split(b" ", 2)[1])
            answered[os.path.basename(path)[:3]] = status
        unknown_secret = next(os.path.basename(p)[:3] for p in captures if "no_2Fsuch" in p)
        self.assertEqual({n: s for n, s in answered.items() if not 200 <= s < 300}, {unknown_secret: 404})
        self.assertEqual(sim.violations, [])
        self.assertTrue(all(re.fullmatch(r"[0-9a-f]*", hb["binary_checksum"]) for hb in sim.heartbeats))


class InteropScriptTests(Fixture):
    """The interop script's events, decided as plexd's client decides them (keys from the state, then rotated)."""

    async def events_of(self, answer: dict[str, Any], last_event_id: str = "") -> list[bytes]:
        sim = self.sim
        headers = {b"Authorization": [b"Bearer " + answer["node_secret_key"].encode()]}
        if last_event_id:
            headers[b"Last-Event-ID"] = [last_event_id.encode()]
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        response = await agent.request(b"GET", f"{sim.url}/v1/nodes/{answer['node_id']}/events".encode(),
                                       Headers(headers))
        reader = StreamReader()
        response.deliverBody(reader)
        self.addCleanup(lambda: reader.transport.stopProducing())
        # The first stream ends after its events; the second stays open after its last.
        await eventually(lambda: reader.ended or b'"step":"last"' in reader.data, what="the script's events")
        return [block for block in reader.data.split(b"\n\n") if b"data: " in block]

    async def test_the_script_s_events_are_accepted_and_rejected_as_its_description_says(self) -> None:
        from plexagent.controlplane.events import SSEParser
        from plexagent.controlplane.protocol import InstallSigningKeys
        from plexagent.testing.interop import InteropScript

        sim = await self.started()
        InteropScript(sim)
        answer = await self.enroll()
        code, state, _ = await self.call("GET", f"/v1/nodes/{answer['node_id']}/state", answer["node_secret_key"])
        keys = state["signing_keys"]
        self.assertNotEqual(keys["current"], answer["signing_public_key"])
        self.assertEqual(keys["previous"], answer["signing_public_key"])
        ring = KeySet.from_strings(keys["current"], keys["previous"],
                                   gojson.GoTime.parse(keys["transition_expires"].encode()))
        codec = PlexdEventCodec()
        verdicts = []
        last_id = ""
        for batch in (await self.events_of(answer), None):
            if batch is None:
                batch = await self.events_of(answer, last_id)
            parser = SSEParser()
            for event in parser.feed(b"\n\n".join(batch) + b"\n\n"):
                try:
                    envelope = codec.decode(event.data)
                    codec.verify(envelope, ring, round(reactor.seconds() * 1e9))
                    effect = codec.effect(envelope)
                    if isinstance(effect, InstallSigningKeys):
                        ring = effect.keys
                    verdicts.append("accept")
                except Dropped as dropped:
                    verdicts.append(dropped.reason.value)
            last_id = parser.last_event_id.decode()
        self.assertEqual(verdicts, ["accept"] * 6 + ["replay", "bad_signature", "stale", "future", "missing_field",
                                                     "invalid_json", "accept"])
