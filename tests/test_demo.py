"""
The demo (``python -m plexagent.demo``, what ``scripts/demo.sh`` runs): a
second demo whose socket or port is taken says so in one line, exits
non-zero and changes nothing of the demo already running.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from plexagent.testing.fixtures import _ProcessWatcher, json_response, unix_http_client


def free_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def snapshot(directory: str) -> dict[str, tuple[bytes, int]]:
    """Content and modification time of the demo's config and key files (the bootstrap token is consumed)."""
    files = {}
    for name in ("plexagent.toml", "api-token"):
        path = os.path.join(directory, name)
        with open(path, "rb") as f:
            files[name] = (f.read(), os.stat(path).st_mtime_ns)
    return files


class DemoTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        # Short: the demo's socket lives in this directory (108-byte limit).
        self.base = tempfile.mkdtemp(prefix="pa-demo-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.base, True)
        self.port = free_port()

    def demo(self, directory: str, port: int) -> _ProcessWatcher:
        watcher = _ProcessWatcher()
        argv = [sys.executable, "-m", "plexagent.demo", "--dir", directory, "--http-port", str(port)]
        transport = reactor.spawnProcess(watcher, argv[0], argv, env=dict(os.environ))

        async def stop() -> None:
            if watcher.status is None:
                transport.signalProcess("TERM")
                await watcher.ended

        self.addCleanup(lambda: defer.ensureDeferred(stop()))
        return watcher

    async def running_demo(self) -> str:
        directory = os.path.join(self.base, "first")
        first = self.demo(directory, self.port)
        await first.wait_for("plexagent demo is running")
        return directory

    async def test_the_demo_node_enrolls_with_a_bootstrap_token_and_serves_the_guide_s_example(self) -> None:
        directory = await self.running_demo()
        client = unix_http_client(os.path.join(directory, "api.sock"))
        for _ in range(200):
            code, metadata = await json_response(await client.get("http://localhost/v1/state/metadata"))
            if metadata.get("role") == "gateway" and os.path.exists(os.path.join(directory, "data", "identity.json")):
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(metadata["region"], "us-west-2")
        with open(os.path.join(directory, "data", "identity.json")) as f:
            self.assertEqual(json.load(f)["protocol"], "plexd")
        self.assertFalse(os.path.exists(os.path.join(directory, "bootstrap-token")))
        code, secret = await json_response(await client.get("http://localhost/v1/state/secrets/db%2Fpassword"))
        self.assertEqual((code, secret["value"]), (200, "s3cret-p@ssw0rd"))

    async def test_a_second_demo_on_the_same_directory_says_the_socket_is_taken_and_changes_nothing(self) -> None:
        directory = await self.running_demo()
        before = snapshot(directory)
        second = self.demo(directory, self.port)
        self.assertNotEqual(await second.ended, 0)
        output = bytes(second.output).decode()
        self.assertEqual(len(output.splitlines()), 1, output)
        self.assertIn(f"another process is listening on {directory}/api.sock", output)
        self.assertEqual(snapshot(directory), before)
        code, _ = await json_response(await unix_http_client(os.path.join(directory, "api.sock")).get(
            "http://localhost/v1/state"))
        self.assertEqual(code, 200)

    async def test_a_second_demo_on_a_taken_port_says_so_and_creates_nothing(self) -> None:
        await self.running_demo()
        elsewhere = os.path.join(self.base, "second")
        second = self.demo(elsewhere, self.port)
        self.assertNotEqual(await second.ended, 0)
        output = bytes(second.output).decode()
        self.assertEqual(len(output.splitlines()), 1, output)
        self.assertIn(f"Couldn't listen on 127.0.0.1:{self.port}: [Errno 98] Address already in use", output)
        self.assertFalse(os.path.exists(elsewhere))
