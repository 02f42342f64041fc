"""The signing keys in force: parsing, the transition window, rotation and persistence."""

from __future__ import annotations

import base64
import json
import os

from twisted.trial import unittest

from plexagent.controlplane.keys import KeyRing, KeySet, SigningKey
from tests.controlplane.fakes import sync_thread

K1 = base64.b64encode(b"\x01" * 32).decode()
K2 = base64.b64encode(b"\x02" * 32).decode()


class SigningKeyTests(unittest.TestCase):
    def test_only_standard_base64_of_32_bytes_is_a_key(self) -> None:
        self.assertEqual(SigningKey.parse(K1).raw, b"\x01" * 32)
        for text in ("", "c2hvcnQ=", base64.b64encode(b"\x01" * 33).decode(), K1.rstrip("="), "not base64!"):
            self.assertIsNone(SigningKey.parse(text), text)

    def test_a_key_without_an_id_is_labelled_by_its_fingerprint(self) -> None:
        self.assertRegex(SigningKey.parse(K1).label, r"^sha256:[0-9a-f]{16}$")
        self.assertEqual(SigningKey(b"\x01" * 32, "k-7").label, "k-7")


class KeySetTests(unittest.TestCase):
    def test_keys_that_are_not_32_bytes_are_left_out(self) -> None:
        keys = KeySet.from_strings("c2hvcnQ=", K2)
        self.assertIsNone(keys.current)
        self.assertFalse(keys.usable)

    def test_the_previous_key_counts_while_now_is_before_transition_expires(self) -> None:
        keys = KeySet(SigningKey.parse(K1), SigningKey.parse(K2), 1000)
        self.assertEqual(len(keys.candidates(999)), 2)
        self.assertEqual(len(keys.candidates(1000)), 1)
        self.assertEqual(len(KeySet(SigningKey.parse(K1), SigningKey.parse(K2)).candidates(0)), 1)

    def test_by_id_picks_a_candidate(self) -> None:
        keys = KeySet(SigningKey(b"\x01" * 32, "a"), SigningKey(b"\x02" * 32, "b"), 10)
        self.assertEqual(keys.by_id("b", 5).key_id, "b")
        self.assertIsNone(keys.by_id("b", 10))


class KeyRingTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.ring = KeyRing(self.dir, run_in_thread=sync_thread)

    def test_installed_keys_are_persisted_privately_and_seed_the_next_start(self) -> None:
        self.assertTrue(self.ring.install(KeySet.from_strings(K2, K1), "state"))
        self.assertEqual(os.stat(self.ring.path).st_mode & 0o777, 0o600)
        again = KeyRing(self.dir, run_in_thread=sync_thread)
        self.assertEqual(again.seed(("registration", K1)), "persisted")
        self.assertEqual(again.keys.current.raw, b"\x02" * 32)

    def test_a_set_without_a_usable_current_key_is_refused_and_the_keys_in_force_stay(self) -> None:
        self.ring.install(KeySet.from_strings(K1), "registration")
        self.assertFalse(self.ring.install(KeySet.from_strings("c2hvcnQ=", K2), "event"))
        self.assertEqual(self.ring.keys.current.raw, b"\x01" * 32)
        self.assertEqual(self.ring.refused, 1)
        self.assertEqual(dict(self.ring.rotations), {"registration": 1})

    def test_seeding_takes_the_first_usable_candidate(self) -> None:
        self.assertEqual(self.ring.seed(("registration", "garbage"), ("config", K2)), "config")
        self.assertEqual(self.ring.keys.current.raw, b"\x02" * 32)
        self.assertIsNone(KeyRing(self.mktemp()).seed(("registration", "")))

    def test_an_unusable_persisted_file_is_set_aside_and_the_candidates_used(self) -> None:
        with open(self.ring.path, "w") as f:
            json.dump({"format": 1, "keys": {"current": {"key": "c2hvcnQ="}}}, f)
        self.assertEqual(self.ring.seed(("registration", K1)), "registration")
        self.assertTrue(any(".quarantined-" in name for name in os.listdir(self.dir)))
