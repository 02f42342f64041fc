"""AES-256-GCM decryption of secret values with the node secret key."""

from __future__ import annotations

import base64
import os

from twisted.trial import unittest

from plexagent.config import ConfigError
from plexagent.node.secrets import DecryptionFailed, SecretBox, parse_node_secret_key


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
    def test_base64_of_32_bytes(self) -> None:
        key = os.urandom(32)
        self.assertEqual(parse_node_secret_key(" " + base64.b64encode(key).decode() + "\n"), key)

    def test_wrong_length_is_a_config_error(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse_node_secret_key(base64.b64encode(os.urandom(16)).decode())
        self.assertIn("node.secret_key_file: must hold 32 bytes", str(caught.exception))

    def test_not_base64_is_a_config_error(self) -> None:
        self.assertRaises(ConfigError, parse_node_secret_key, "not base64!")
