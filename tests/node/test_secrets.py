"""AES-256-GCM decryption of secret values with the node secret key."""

from __future__ import annotations

import base64
import json
import os

from twisted.trial import unittest

from plexagent.config import ConfigError
from plexagent.node.secrets import DecryptionFailed, SecretBox, aes_key_from_nsk, parse_node_secret_key


class SecretBoxTests(unittest.TestCase):
    def setUp(self) -> None:
        self.key = os.urandom(32)
        self.box = SecretBox(self.key)

    def test_round_trip(self) -> None:
        ct, nonce = self.box.encrypt(b"s3cret", os.urandom(12))
        self.assertEqual(self.box.decrypt(ct, nonce), b"s3cret")

    def test_tampered_ciphertext_fails_without_detail(self) -> None:
        ct, nonce = self.box.encrypt(b"s3cret", os.urandom(12))
        raw = bytearray(base64.b64decode(ct))
        raw[-1] ^= 1
        with self.assertRaises(DecryptionFailed) as caught:
            self.box.decrypt(base64.b64encode(bytes(raw)).decode(), nonce)
        self.assertEqual(str(caught.exception), "decryption failed")

    def test_wrong_key_fails(self) -> None:
        ct, nonce = SecretBox(os.urandom(32)).encrypt(b"x", os.urandom(12))
        self.assertRaises(DecryptionFailed, self.box.decrypt, ct, nonce)

    def test_malformed_fields_fail_the_same_way(self) -> None:
        ct, nonce = self.box.encrypt(b"x", os.urandom(12))
        for bad_ct, bad_nonce in ((ct, "AAAA"), ("!!", nonce), (None, nonce), (ct, 12), ("", nonce)):
            self.assertRaises(DecryptionFailed, self.box.decrypt, bad_ct, bad_nonce)

    def test_repr_shows_no_key(self) -> None:
        self.assertNotIn(base64.b64encode(self.key).decode(), repr(self.box))


class NodeSecretKeyTests(unittest.TestCase):
    def test_the_32_character_key_a_plexd_control_plane_issues_is_used_as_is(self) -> None:
        self.assertEqual(parse_node_secret_key("CT4kN51SZizP0Lywv-GtcnZPWGUnm12X\n"), b"CT4kN51SZizP0Lywv-GtcnZPWGUnm12X")

    def test_base64_of_32_bytes(self) -> None:
        key = os.urandom(32)
        self.assertEqual(parse_node_secret_key(" " + base64.b64encode(key).decode() + "\n"), key)

    def test_anything_else_is_a_config_error_naming_the_key_and_both_forms(self) -> None:
        for text in (base64.b64encode(os.urandom(16)).decode(), "not base64!", "x" * 31, "x" * 33):
            with self.assertRaises(ConfigError) as caught:
                parse_node_secret_key(text)
            self.assertIn("node.secret_key_file: must hold the 32-character node secret key or standard base64 "
                          "of 32 bytes (44 characters); got", str(caught.exception))
            self.assertNotIn(text, str(caught.exception))

    def test_an_nsk_that_gives_no_key(self) -> None:
        self.assertIsNone(aes_key_from_nsk("short"))


class SecretVectorTests(unittest.TestCase):
    """The Go-made secret vectors: what plexd's DecryptSecret decided (tests/controlplane/vectors)."""

    def cases(self) -> list[dict]:
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "controlplane", "vectors",
                            "plexd-secrets.json")
        with open(path, encoding="utf-8") as f:
            return json.load(f)["cases"]

    def decide(self, aes_key: bytes | None, case: dict) -> str:
        if aes_key is None:
            return "fail"
        try:
            plaintext = SecretBox(aes_key).decrypt(case["ciphertext_b64"], case["nonce_b64"])
        except DecryptionFailed:
            return "fail"
        return "ok" if plaintext == case["plaintext"].encode() else "wrong"

    def test_every_case_is_decided_as_plexd_decided_it_with_the_nsk_as_issued(self) -> None:
        cases = self.cases()
        self.assertEqual(len(cases), 15)
        for case in cases:
            raw = case["nsk"].encode()
            self.assertEqual(self.decide(raw if len(raw) == 32 else None, case), case["expected"], case["name"])

    def test_the_base64_form_of_the_key_works_from_the_key_file(self) -> None:
        # plexd takes the string's bytes, so its base64 form fails there;
        # node.secret_key_file accepts base64 of the 32 bytes.
        case = next(c for c in self.cases() if c["name"] == "nsk-base64-44-chars")
        self.assertEqual(case["expected"], "fail")
        SecretBox(parse_node_secret_key(case["nsk"])).decrypt(case["ciphertext_b64"], case["nonce_b64"])
