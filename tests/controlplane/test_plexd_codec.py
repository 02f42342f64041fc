"""plexd's event codec: the order of its checks, its nonce memory and what each event means."""

from __future__ import annotations

import base64
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.trial import unittest

from plexagent.controlplane import gojson
from plexagent.controlplane.gojson import GoTime
from plexagent.controlplane.keys import KeySet, SigningKey
from plexagent.controlplane.plexd_events import NonceStore, PlexdEventCodec, sign_plexd_event
from plexagent.controlplane.protocol import Dropped, DropReason, Ignore, InstallSigningKeys, ReplaceState

NOW = 1_780_000_000 * 10**9
MINUTE = 60 * 10**9


def public(key: Ed25519PrivateKey) -> SigningKey:
    return SigningKey(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


class Events:
    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.keys = KeySet(public(self.key))
        self.count = 0

    def wire(self, event_type: str = "node_state_updated", payload: Any = None, *, at: int = NOW,
             nonce: str | None = None, key: Ed25519PrivateKey | None = None, raw: bytes | None = None) -> bytes:
        self.count += 1
        payload_raw = raw if raw is not None else gojson.marshal(
            payload if payload is not None else {"metadata": {"n": str(self.count)}, "data": []})
        wire, _ = sign_plexd_event(key or self.key, event_type, f"evt-{self.count}", GoTime.from_unix_ns(at),
                                   nonce or f"nonce-{self.count}", payload_raw)
        return wire


class VerificationTests(unittest.TestCase):
    def setUp(self) -> None:
        self.events = Events()
        self.codec = PlexdEventCodec()

    def reason(self, wire: bytes, now: int = NOW, keys: KeySet | None = None) -> DropReason | None:
        try:
            self.codec.verify(self.codec.decode(wire), keys or self.events.keys, now)
        except Dropped as dropped:
            return dropped.reason
        return None

    def test_a_genuine_fresh_event_verifies(self) -> None:
        self.assertIsNone(self.reason(self.events.wire()))

    def test_exactly_five_minutes_either_way_is_fresh_and_one_nanosecond_more_is_not(self) -> None:
        self.assertIsNone(self.reason(self.events.wire(at=NOW - 5 * MINUTE)))
        self.assertIsNone(self.reason(self.events.wire(at=NOW + 5 * MINUTE)))
        self.assertEqual(self.reason(self.events.wire(at=NOW - 5 * MINUTE - 1)), DropReason.STALE)
        self.assertEqual(self.reason(self.events.wire(at=NOW + 5 * MINUTE + 1)), DropReason.FUTURE)

    def test_staleness_is_decided_before_the_signature(self) -> None:
        forged = self.events.wire(at=NOW - 10 * MINUTE, key=Ed25519PrivateKey.generate())
        self.assertEqual(self.reason(forged), DropReason.STALE)

    def test_another_key_s_signature_is_bad(self) -> None:
        self.assertEqual(self.reason(self.events.wire(key=Ed25519PrivateKey.generate())), DropReason.BAD_SIGNATURE)

    def test_without_any_key_nothing_verifies(self) -> None:
        self.assertEqual(self.reason(self.events.wire(), keys=KeySet()), DropReason.NO_KEY)

    def test_a_replayed_nonce_is_refused_but_only_after_a_good_signature(self) -> None:
        forged = self.events.wire(nonce="n1", key=Ed25519PrivateKey.generate())
        self.assertEqual(self.reason(forged), DropReason.BAD_SIGNATURE)
        self.assertIsNone(self.reason(self.events.wire(nonce="n1")))
        self.assertEqual(self.reason(self.events.wire(nonce="n1")), DropReason.REPLAY)

    def test_missing_fields_are_checked_signature_then_nonce_then_issued_at(self) -> None:
        self.assertEqual(self.codec.decode(b'{"event_type":"x","event_id":"1"}').event_type, "x")
        with self.assertRaises(Dropped) as caught:
            self.codec.verify(self.codec.decode(b'{"event_type":"x","event_id":"1"}'), self.events.keys, NOW)
        self.assertEqual((caught.exception.reason, caught.exception.detail), (DropReason.MISSING_FIELD, "signature"))
        with self.assertRaises(Dropped) as caught:
            self.codec.verify(self.codec.decode(b'{"event_type":"x","event_id":"1","signature":"AA=="}'),
                              self.events.keys, NOW)
        self.assertEqual(caught.exception.detail, "nonce")

    def test_envelopes_go_cannot_decode(self) -> None:
        for data, reason in ((b"not json", DropReason.INVALID_JSON), (b'{"event_type":1}', DropReason.INVALID_JSON),
                             (b'{"issued_at":"yesterday"}', DropReason.BAD_ISSUED_AT),
                             (b'{"event_id":"1"}', DropReason.MISSING_FIELD)):
            with self.assertRaises(Dropped) as caught:
                self.codec.decode(data)
            self.assertEqual(caught.exception.reason, reason, data)

    def test_the_previous_key_verifies_only_inside_its_window(self) -> None:
        old = Ed25519PrivateKey.generate()
        keys = KeySet(self.events.keys.current, public(old), NOW + MINUTE)
        self.assertIsNone(self.reason(self.events.wire(key=old), keys=keys))
        self.assertEqual(self.reason(self.events.wire(key=old, at=NOW + MINUTE), now=NOW + MINUTE, keys=keys),
                         DropReason.BAD_SIGNATURE)
        self.assertEqual(self.reason(self.events.wire(key=old), keys=KeySet(self.events.keys.current, public(old))),
                         DropReason.BAD_SIGNATURE)


class NonceStoreTests(unittest.TestCase):
    def test_a_nonce_is_forgotten_at_the_first_sweep_five_minutes_after_its_event(self) -> None:
        store = NonceStore(NOW)
        self.assertTrue(store.add("a", NOW, NOW))
        self.assertFalse(store.add("a", NOW, NOW + 5 * MINUTE))
        # Swept at most once a minute, when an event arrives: at 6 minutes it is gone.
        self.assertTrue(store.add("a", NOW + 6 * MINUTE, NOW + 6 * MINUTE))

    def test_between_sweeps_an_old_nonce_still_counts_as_seen(self) -> None:
        store = NonceStore(NOW)
        store.add("a", NOW, NOW)
        store.add("b", NOW + 5 * MINUTE, NOW + 5 * MINUTE)  # the sweep at 5 minutes keeps "a" (not older than 5)
        self.assertFalse(store.add("a", NOW + 5 * MINUTE + MINUTE // 2, NOW + 5 * MINUTE + MINUTE // 2))

    def test_the_store_is_bounded_by_forgetting_the_oldest(self) -> None:
        store = NonceStore(NOW, capacity=3)
        for i, nonce in enumerate("abcd"):
            self.assertTrue(store.add(nonce, NOW + i, NOW))
        self.assertEqual(len(store), 3)
        self.assertTrue(store.add("a", NOW, NOW))


class EffectTests(unittest.TestCase):
    def setUp(self) -> None:
        self.codec = PlexdEventCodec()

    def effect(self, event_type: str, payload: bytes | None) -> Any:
        wire, _ = sign_plexd_event(Ed25519PrivateKey.generate(), event_type, "1", GoTime.from_unix_ns(NOW), "n",
                                   payload)
        return self.codec.effect(self.codec.decode(wire))

    def test_state_updates_replace_metadata_and_data_and_an_absent_member_empties_it(self) -> None:
        entry = {"key": "k", "content_type": "text/plain", "payload": "v", "version": 2, "updated_at": "x"}
        effect = self.effect("node_state_updated", gojson.marshal({"metadata": {"a": "b"}, "data": [entry]}))
        self.assertIsInstance(effect, ReplaceState)
        self.assertEqual(effect.changes["metadata"], {"a": "b"})
        self.assertEqual(effect.changes["data"]["k"]["version"], 2)
        self.assertEqual(self.effect("node_state_updated", b"{}").changes, {"metadata": {}, "data": {}})
        self.assertEqual(self.effect("node_state_updated", b"null").changes, {"metadata": {}, "data": {}})

    def test_secret_updates_replace_the_index(self) -> None:
        effect = self.effect("node_secrets_updated", b'{"secret_refs":[{"key":"s","version":3}]}')
        self.assertEqual(effect.changes, {"secret_refs": {"s": 3}})

    def test_payloads_the_cache_cannot_take_are_unusable(self) -> None:
        for payload in (b"[1]", b'{"metadata":{"a":1}}', b'{"data":[{"key":""}]}', b'{"secret_refs":7}',
                        b'{"metadata":{"a":"\\ud800"}}'):
            with self.assertRaises(Dropped) as caught:
                self.effect("node_state_updated" if b"secret" not in payload else "node_secrets_updated", payload)
            self.assertEqual(caught.exception.reason, DropReason.UNUSABLE_PAYLOAD, payload)

    def test_signing_key_rotated_installs_the_keys_it_carries(self) -> None:
        current = base64.b64encode(b"\x01" * 32).decode()
        previous = base64.b64encode(b"\x02" * 32).decode()
        effect = self.effect("signing_key_rotated", gojson.marshal(
            {"current": current, "previous": previous, "transition_expires": "2026-01-01T00:00:00Z"}))
        self.assertIsInstance(effect, InstallSigningKeys)
        self.assertEqual(effect.keys.current.raw, b"\x01" * 32)
        self.assertEqual(effect.keys.transition_expires_ns, GoTime.parse(b"2026-01-01T00:00:00Z").unix_ns)

    def test_a_rotation_with_an_unusable_current_key_carries_no_current_key(self) -> None:
        effect = self.effect("signing_key_rotated", b'{"current":"c2hvcnQ="}')
        self.assertFalse(effect.keys.usable)

    def test_other_events_are_ignored(self) -> None:
        for event_type in ("rotate_keys", "peer_added", "whatever"):
            self.assertIsInstance(self.effect(event_type, b"{}"), Ignore)
        self.assertIsInstance(self.effect("signing_key_rotated", b"[]"), Ignore)
