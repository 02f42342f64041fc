"""The stored identity (identity.json) and the bootstrap token's sources."""

from __future__ import annotations

import json
import os

from twisted.trial import unittest

from plexagent.controlplane.enrollment import BootstrapToken, TokenError
from plexagent.controlplane.identity import IdentityMismatch, IdentityStore, NodeKeyPair
from plexagent.controlplane.plexd import PlexdProtocol
from plexagent.controlplane.protocol import Identity
from tests.controlplane.fakes import sync_thread

NSK = "CT4kN51SZizP0Lywv-GtcnZPWGUnm12X"


class IdentityStoreTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = os.path.join(self.mktemp(), "data")
        self.store = IdentityStore(self.dir, PlexdProtocol(None, None, None), run_in_thread=sync_thread)
        self.identity = Identity("plexd", "n-1", bearer=NSK, aes_key=NSK.encode(), nsk_text=NSK, mesh_ip="10.0.0.1",
                                 signing_public_key="k", keypair=NodeKeyPair.generate(),
                                 enrolled_at="2026-01-01T00:00:00Z")

    def write(self, doc: object) -> None:
        os.makedirs(self.dir, exist_ok=True)
        with open(self.store.path, "w") as f:
            json.dump(doc, f)

    def aside(self) -> list[str]:
        return [n for n in os.listdir(self.dir) if ".quarantined-" in n]

    def test_a_saved_identity_is_private_and_loads_as_it_was(self) -> None:
        self.successResultOf(self.store.save(self.identity))
        self.assertEqual(os.stat(self.store.path).st_mode & 0o777, 0o600)
        self.assertEqual(os.stat(self.dir).st_mode & 0o777, 0o700)
        self.assertEqual(self.store.load(), self.identity)
        with open(self.store.path) as f:
            doc = json.load(f)
        self.assertEqual((doc["format"], doc["protocol"], doc["node_secret_key"]), (1, "plexd", NSK))

    def test_no_file_is_no_identity(self) -> None:
        self.assertIsNone(self.store.load())

    def test_a_corrupt_or_incomplete_identity_is_set_aside(self) -> None:
        for doc in ("{torn", {"format": 2}, {"format": 1, "protocol": "plexd", "node_id": "n"}, [1]):
            if isinstance(doc, str):
                os.makedirs(self.dir, exist_ok=True)
                with open(self.store.path, "w") as f:
                    f.write(doc)
            else:
                self.write(doc)
            self.assertIsNone(self.store.load(), doc)
            self.assertFalse(os.path.exists(self.store.path))
        self.assertEqual(len(self.aside()), 4)

    def test_a_fifo_or_a_link_in_place_of_identity_json_is_set_aside_unread(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        os.mkfifo(self.store.path)
        self.assertIsNone(self.store.load())
        os.symlink("/etc/hostname", self.store.path)
        self.assertIsNone(self.store.load())
        self.assertEqual(len(self.aside()), 2)

    def test_an_identity_of_another_protocol_is_kept_and_refused(self) -> None:
        self.write({"format": 1, "protocol": "plexsphere", "node_id": "n", "node_secret_key": NSK})
        with self.assertRaises(IdentityMismatch) as caught:
            self.store.load()
        self.assertIn("plexagent deregister", str(caught.exception))
        self.assertTrue(os.path.exists(self.store.path))
        self.assertEqual(self.aside(), [])

    def test_an_identity_without_its_key_pair_or_mesh_ip_still_loads(self) -> None:
        self.write({"format": 1, "protocol": "plexd", "node_id": "n", "node_secret_key": NSK})
        identity = self.store.load()
        self.assertEqual((identity.node_id, identity.keypair, identity.mesh_ip), ("n", None, ""))


class BootstrapTokenTests(unittest.TestCase):
    def file(self, content: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(content)
        return path

    def test_the_environment_overrides_the_file(self) -> None:
        token = BootstrapToken("from-env", self.file(b"from-file"))
        self.assertEqual((token.read().value, token.read().source, token.read().from_file),
                         ("from-env", "PLEXD_BOOTSTRAP_TOKEN", False))

    def test_the_file_is_trimmed_and_a_missing_or_empty_one_is_no_token(self) -> None:
        path = self.file(b"  tok-1 \n")
        self.assertEqual(BootstrapToken("", path).read().value, "tok-1")
        self.assertIsNone(BootstrapToken("", self.file(b" \n")).read())
        self.assertIsNone(BootstrapToken("", "/nonexistent/bootstrap-token").read())

    def test_a_token_that_is_too_long_or_not_printable_ascii_names_its_source_not_its_value(self) -> None:
        for content in (b"x" * 513, b"tok\x01en", "tök".encode()):
            path = self.file(content)
            with self.assertRaises(TokenError) as caught:
                BootstrapToken("", path).read()
            self.assertIn(path, str(caught.exception))
            self.assertNotIn(content.decode("utf-8", "replace"), str(caught.exception))
        self.assertEqual(BootstrapToken("", self.file(b"x" * 512)).read().value, "x" * 512)

    def test_an_unreadable_file_names_the_path_and_why(self) -> None:
        path = self.mktemp()
        os.makedirs(path)
        with self.assertRaises(TokenError) as caught:
            BootstrapToken("", path).read()
        self.assertEqual(str(caught.exception), f"control_plane.bootstrap_token_file: cannot read {path}: "
                                                "it is not a regular file (a directory)")

    def test_a_fifo_in_place_of_the_token_file_is_refused_without_blocking(self) -> None:
        path = self.mktemp()
        os.mkfifo(path)
        with self.assertRaises(TokenError) as caught:
            BootstrapToken("", path).read()
        self.assertIn("a FIFO", str(caught.exception))

    def test_a_token_file_behind_a_symlink_is_read(self) -> None:
        target = os.path.abspath(self.file(b"tok-linked"))
        path = self.mktemp()
        os.symlink(target, path)
        self.assertEqual(BootstrapToken("", path).read().value, "tok-linked")

    def test_only_a_token_from_the_file_deletes_the_file(self) -> None:
        path = self.file(b"tok")
        BootstrapToken("env-token", path).delete(BootstrapToken("env-token", path).read())
        self.assertTrue(os.path.exists(path))
        source = BootstrapToken("", path)
        source.delete(source.read())
        self.assertFalse(os.path.exists(path))
