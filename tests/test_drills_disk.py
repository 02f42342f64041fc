"""
Disk full: the data dir on a small tmpfs. Writes fail with a clear JSON
error, nothing already stored is corrupted, and the agent recovers when
space returns.
"""

from __future__ import annotations

import json
import os
import subprocess

from twisted.internet import reactor
from twisted.trial import unittest

from plexagent.service import makeService
from plexagent.testing.fixtures import AgentSandbox, json_response, unix_http_client

BASE = "http://localhost"


class DiskFullTests(unittest.TestCase):
    async def setUp(self) -> None:
        self.sandbox = AgentSandbox()
        self.addCleanup(self.sandbox.cleanup)
        os.makedirs(self.sandbox.data_dir)
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", self.sandbox.data_dir],
            capture_output=True,
        )
        if mounted.returncode != 0:
            self.fail(f"cannot mount a tmpfs for the disk-full drill (needs root): {mounted.stderr!r}")
        self.addCleanup(subprocess.run, ["umount", "-l", self.sandbox.data_dir])
        self.service = makeService(self.sandbox.config(), reactor)
        self.service.startService()
        self.addCleanup(lambda: self.service.stopService() if self.service.running else None)
        self.client = unix_http_client(self.sandbox.socket)

    async def put(self, key: str, payload: object) -> tuple[int, object]:
        body = json.dumps({"content_type": "application/json", "payload": payload}).encode()
        return await json_response(await self.client.put(f"{BASE}/v1/state/report/{key}", data=body))

    def fill_disk(self) -> str:
        filler = os.path.join(self.sandbox.data_dir, "filler")
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        return filler

    async def test_writes_fail_with_507_and_recover_when_space_returns(self) -> None:
        self.assertEqual((await self.put("kept", "before"))[0], 200)
        filler = self.fill_disk()
        code, body = await self.put("big", "x" * 200_000)
        self.assertEqual(code, 507)
        self.assertEqual(body["error"], "insufficient storage")
        # Nothing acknowledged before is lost, the refused write is not visible.
        code, listing = await json_response(await self.client.get(BASE + "/v1/state/report"))
        self.assertEqual(listing, [{"key": "kept", "version": 1}])
        os.unlink(filler)
        self.assertEqual((await self.put("big", "x" * 1000))[0], 200)
        await self.service.stopService()
        # And the log still parses after a restart.
        self.service = makeService(self.sandbox.config(), reactor)
        self.service.startService()
        code, listing = await json_response(await self.client.get(BASE + "/v1/state/report"))
        self.assertEqual(listing, [{"key": "big", "version": 1}, {"key": "kept", "version": 1}])


class FilesDiskFullTests(unittest.TestCase):
    """The agent API's file writes on a full disk: a JSON 507, nothing half-written."""

    async def test_file_write_on_a_full_disk_is_507_and_keeps_the_old_file(self) -> None:
        from tests.agentapi.support import RunningAgentAPI

        agent = RunningAgentAPI(self)
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", agent.root], capture_output=True
        )
        if mounted.returncode != 0:
            self.fail(f"cannot mount a tmpfs for the disk-full drill (needs root): {mounted.stderr!r}")
        self.addCleanup(subprocess.run, ["umount", "-l", agent.root])
        code, _ = await agent.call("POST", "/files/write", json={"path": agent.p("config.json"), "content": "old"})
        self.assertEqual(code, 200)
        filler = agent.p("filler")
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        code, body = await agent.call(
            "POST", "/files/write", json={"path": agent.p("config.json"), "content": "new" * 50_000}
        )
        self.assertEqual(code, 507, body)
        self.assertEqual(body["error"], "insufficient storage")
        with open(agent.p("config.json")) as f:
            self.assertEqual(f.read(), "old")
        self.assertEqual(sorted(os.listdir(agent.root)), ["config.json", "filler"])
        os.unlink(filler)
        code, _ = await agent.call("POST", "/files/write", json={"path": agent.p("config.json"), "content": "new"})
        self.assertEqual(code, 200)
