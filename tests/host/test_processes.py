"""Running external programs through the reactor."""

from __future__ import annotations

import os

import psutil
from twisted.trial import unittest

from plexagent import errors
from plexagent.host import processes


class RunTests(unittest.TestCase):
    def test_exit_code_and_output_are_collected(self):
        d = processes.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
        d.addCallback(self.assertEqual, processes.ProcessResult(3, b"out\n", b"err\n"))
        return d

    def test_environment_is_exactly_what_is_given(self):
        d = processes.run(["sh", "-c", 'echo "$X|$HOME"'], env={"PATH": processes.DEFAULT_PATH, "X": "1"})
        d.addCallback(lambda r: self.assertEqual(r.stdout, b"1|\n"))
        return d

    def test_cwd_is_used(self):
        here = os.path.realpath(self.mktemp())
        os.makedirs(here)
        d = processes.run(["pwd"], cwd=here)
        d.addCallback(lambda r: self.assertEqual(r.stdout.decode().strip(), here))
        return d

    def test_stdin_is_closed(self):
        d = processes.run(["cat"])
        d.addCallback(self.assertEqual, processes.ProcessResult(0, b"", b""))
        return d

    def test_timeout_kills_program_and_its_children(self):
        tag = "31.%d" % os.getpid()
        d = processes.run(["sh", "-c", f"sleep {tag} & sleep {tag}"], timeout=0.3)
        d = self.assertFailure(d, processes.ProcessTimedOut)

        def no_survivor(e):
            self.assertIn("did not finish within", e.details)
            alive = [
                p for p in psutil.process_iter(["cmdline", "status"])
                if p.info["cmdline"] == ["sleep", tag] and p.info["status"] != psutil.STATUS_ZOMBIE
            ]
            self.assertEqual(alive, [])

        return d.addCallback(no_survivor)

    def test_missing_program_is_unavailable(self):
        return self.assertFailure(processes.run(["no-such-program-xyz"]), errors.Unavailable)

    def test_output_is_bounded(self):
        d = processes.run(["sh", "-c", "head -c 100000 /dev/zero"], max_output=1000)
        d.addCallback(lambda r: self.assertEqual(len(r.stdout), 1000))
        return d
