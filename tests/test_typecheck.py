"""mypy (with the zope.interface plugin) accepts the whole package."""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.internet import threads
from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TypeCheckTests(unittest.TestCase):
    timeout = 600

    async def test_mypy_finds_no_errors(self) -> None:
        result = await threads.deferToThread(
            subprocess.run,
            [sys.executable, "-m", "mypy", "--config-file", os.path.join(ROOT, "mypy.ini"), "plexagent"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
