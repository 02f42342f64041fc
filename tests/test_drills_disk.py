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


def mount_tmpfs(testcase: unittest.TestCase, path: str, options: str) -> None:
    """A small tmpfs at ``path`` for the test's lifetime (needs root)."""
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path], capture_output=True)
    if mounted.returncode != 0:
        testcase.fail(f"cannot mount a tmpfs for the disk-full drill (needs root): {mounted.stderr!r}")
    testcase.addCleanup(subprocess.run, ["umount", "-l", path])


def fill_disk(filler: str) -> str:
    """Write ``filler`` until the filesystem holding it is full."""
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


class DiskFullTests(unittest.TestCase):
    async def setUp(self) -> None:
        self.sandbox = AgentSandbox()
        self.addCleanup(self.sandbox.cleanup)
        os.makedirs(self.sandbox.data_dir)
        mount_tmpfs(self, self.sandbox.data_dir, "size=256k,mode=0700")
        self.service = makeService(self.sandbox.config(), reactor)
        self.service.startService()
        self.addCleanup(lambda: self.service.stopService() if self.service.running else None)
        self.client = unix_http_client(self.sandbox.socket)

    async def put(self, key: str, payload: object) -> tuple[int, object]:
        body = json.dumps({"content_type": "application/json", "payload": payload}).encode()
        return await json_response(await self.client.put(f"{BASE}/v1/state/report/{key}", data=body))

    async def test_writes_fail_with_507_and_recover_when_space_returns(self) -> None:
        self.assertEqual((await self.put("kept", "before"))[0], 200)
        filler = fill_disk(os.path.join(self.sandbox.data_dir, "filler"))
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
        mount_tmpfs(self, agent.root, "size=256k")
        code, _ = await agent.call("POST", "/files/write", json={"path": agent.p("config.json"), "content": "old"})
        self.assertEqual(code, 200)
        filler = fill_disk(agent.p("filler"))
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
