"""``plexagent derive-key``."""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import tempfile

from twisted.trial import unittest

from plexagent import cli

TOKEN = "dop_v1_example-token"
EXPECTED = hmac.new(TOKEN.encode(), b"node-agent:", hashlib.sha256).hexdigest()


def run(argv: list[str], stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(argv, stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


class DeriveKey(unittest.TestCase):
    def test_token_on_stdin_prints_the_hex_hmac(self) -> None:
        self.assertEqual(run(["derive-key"], TOKEN + "\n"), (0, EXPECTED + "\n", ""))

    def test_token_file(self) -> None:
        fd, path = tempfile.mkstemp()
        self.addCleanup(os.unlink, path)
        os.write(fd, f"  {TOKEN}\n".encode())
        os.close(fd)
        self.assertEqual(run(["derive-key", "--token-file", path]), (0, EXPECTED + "\n", ""))

    def test_unreadable_file_or_empty_token_fails_without_echoing_the_token(self) -> None:
        code, out, err = run(["derive-key", "--token-file", "/nonexistent/token"])
        self.assertEqual((code, out), (1, ""))
        self.assertIn("/nonexistent/token", err)
        code, out, err = run(["derive-key"], "   \n")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("empty", err)
