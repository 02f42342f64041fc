"""
How the event stream reacts to the ways a control plane refuses it, and
the plexsphere codec's events driving the agent, with task.Clock.
"""

from __future__ import annotations

import math
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import task
from twisted.trial import unittest

from plexagent.controlplane import gojson
from plexagent.controlplane.backoff import Backoff
from plexagent.controlplane.events import EventStream
from plexagent.controlplane.gojson import GoTime
from plexagent.controlplane.keys import KeyRing, KeySet, SigningKey
from plexagent.controlplane.plexsphere_events import PlexsphereEventCodec, sign_plexsphere_event
from plexagent.controlplane.protocol import Call, ControlPlaneError, DropReason, ErrorKind
from plexagent.controlplane.sync import StateSync
from plexagent.node.state import StateCache
from plexagent.testing.plexd_sim import public_b64
from tests.controlplane.fakes import FakeSession, FakeStreamResponse, fetched, sync_thread

SIGNER = Ed25519PrivateKey.generate()
KEY_ID = "did:web:example#key-1"


def frame(event_type: str, payload: Any, seq: int, at: float = 0.0, key_id: str = KEY_ID,
          signer: Ed25519PrivateKey = SIGNER) -> bytes:
    wire, _ = sign_plexsphere_event(signer, f"0190a8b8-a0c0-7a0a-8a0a-{seq:012x}", event_type, "node:n", key_id,
                                    GoTime.from_unix_ns(round(at * 1e9)), gojson.marshal(payload))
    return f"id: {seq}\nevent: {event_type}\ndata: ".encode() + wire + b"\n\n"


class Harness(unittest.TestCase):
    pull_on_every_connect = True

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.session = FakeSession()
        directory = self.mktemp()
        self.cache = StateCache(directory, run_in_thread=sync_thread)
        self.cache.load()
        self.ring = KeyRing(directory, run_in_thread=sync_thread)
        self.ring.install(KeySet(SigningKey.parse(public_b64(SIGNER), KEY_ID)), "registration")
        self.rotations: list[str] = []
        self.sync = StateSync(self.session, self.cache, self.ring, self.clock, Backoff(rng=lambda: 1.0),
                              reconcile_interval=60, rotate_node_key=lambda: self.rotations.append("rotate"))
        self.stream = EventStream(self.session, PlexsphereEventCodec(), self.ring, self.clock, self.sync.run,
                                  on_reconnect=self.sync.fetch_now, backoff=Backoff(rng=lambda: 1.0), idle_timeout=10_000,
                                  pull_on_every_connect=self.pull_on_every_connect)
        self.sync.stream = self.stream
        self.sync.startService()
        self.session.fetches[0].callback(fetched({}))

    def tearDown(self) -> Any:
        return self.sync.stopService()

    def refuse(self, status: int, kind: ErrorKind, pause: float | None = None) -> None:
        self.session.streams[-1][1].errback(ControlPlaneError(Call.EVENTS, kind, f"events: {status}", status=status,
                                                              pause=pause))

    def connect(self) -> FakeStreamResponse:
        response = FakeStreamResponse()
        self.session.streams[-1][1].callback(response)
        return response


class StreamRefusalTests(Harness):
    def test_every_connection_the_first_too_is_followed_by_one_pull(self) -> None:
        self.connect()
        self.assertEqual(len(self.session.fetches), 2)

    def test_a_refused_resume_point_is_dropped_and_the_stream_asked_for_again_without_it(self) -> None:
        response = self.connect()
        response.write(frame("policy_updated", {}, 41))
        response.lose()
        self.clock.advance(0)
        self.assertEqual(self.session.streams[-1][0], "41")
        self.refuse(400, ErrorKind.REFUSED)
        self.clock.advance(1)
        self.assertEqual(self.session.streams[-1][0], "")

    def test_a_stream_refused_for_good_is_not_asked_for_again_and_pulls_go_on(self) -> None:
        self.refuse(403, ErrorKind.PERMANENT, pause=math.inf)
        self.clock.advance(3600)
        self.assertEqual(len(self.session.streams), 1)
        self.assertIn("403", self.stream.given_up)
        self.assertGreater(len(self.session.fetches), 1)

    def test_a_stream_not_provisioned_is_asked_for_again_after_its_pause(self) -> None:
        self.refuse(501, ErrorKind.NOT_PROVISIONED, pause=600.0)
        self.clock.advance(599)
        self.assertEqual(len(self.session.streams), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.session.streams), 2)


class PlexsphereEventTests(Harness):
    def test_a_listed_event_pulls_the_state_and_rotate_keys_rotates_the_node_key(self) -> None:
        response = self.connect()
        fetches = len(self.session.fetches)
        self.session.fetches[-1].callback(fetched({}))
        response.write(frame("node_state_updated", {"revision": 1}, 1))
        self.assertEqual(len(self.session.fetches), fetches + 1)
        response.write(frame("rotate_keys", {}, 2))
        self.assertEqual(self.rotations, ["rotate"])
        self.assertEqual(self.stream.applied, {"node_state_updated": 1, "rotate_keys": 1})

    def test_an_event_naming_a_key_not_held_is_dropped(self) -> None:
        response = self.connect()
        response.write(frame("node_state_updated", {}, 1, key_id="did:web:example#key-9"))
        response.write(frame("node_state_updated", {}, 2, signer=Ed25519PrivateKey.generate()))
        self.assertEqual(self.stream.dropped, {DropReason.UNKNOWN_KEY: 1, DropReason.BAD_SIGNATURE: 1})

    def test_a_rotation_keeps_the_old_key_until_its_transition_ends(self) -> None:
        new = Ed25519PrivateKey.generate()
        response = self.connect()
        response.write(frame("signing_key_rotated", {"key_id": "k2", "public_key": public_b64(new),
                                                     "previous_key_id": KEY_ID,
                                                     "transition_expires": "1970-01-01T00:10:00Z"}, 1))
        self.assertEqual((self.ring.keys.current.key_id, self.ring.keys.previous.key_id), ("k2", KEY_ID))
        response.write(frame("policy_updated", {}, 2))
        response.write(frame("policy_updated", {}, 3, key_id="k2", signer=new))
        self.clock.advance(600)
        response.write(frame("policy_updated", {}, 4, at=600))
        self.assertEqual(self.stream.applied, {"signing_key_rotated": 1, "policy_updated": 2})
        self.assertEqual(self.stream.dropped, {DropReason.UNKNOWN_KEY: 1})


class PlexdFirstConnectTests(Harness):
    pull_on_every_connect = False

    def test_without_the_rule_the_first_connection_pulls_nothing(self) -> None:
        self.connect()
        self.assertEqual(len(self.session.fetches), 1)
