"""
A chunked upload survives a SIGKILL of the real agent process (twistd),
mid-chunk, and resumes after a restart.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile

import treq
from twisted.internet import defer, error, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from tests.agentapi.support import API_KEY, tree
from tests.host.files.test_tarsafe import archive, member

WORKTREE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LISTENING = re.compile(rb"agent_api\.listen listening on .*?port=(\d+)")


class AgentProcess(protocol.ProcessProtocol):
    """``twistd -n --pidfile= plexagent --config FILE``; ``listening`` fires with the API port."""

    def __init__(self) -> None:
        self.output = b""
        self.listening: defer.Deferred[int] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        match = LISTENING.search(self.output)
        if match and not self.listening.called:
            self.listening.callback(int(match.group(1)))

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        if not self.listening.called:
            self.listening.errback(RuntimeError("agent exited before listening:\n" + self.output.decode(errors="replace")))
        self.ended.callback(None)


class HalfRequest(protocol.Protocol):
    """Sends a request head and only part of its body, then waits."""

    def __init__(self, head: bytes, part: bytes) -> None:
        self.head = head
        self.part = part

    def connectionMade(self) -> None:
        self.transport.write(self.head + self.part)


class ChunkedUploadRestartTests(unittest.TestCase):
    def setUp(self) -> None:
        base = os.path.realpath(self.mktemp())
        self.root = os.path.join(base, "root")
        data_dir = os.path.join(base, "data")
        for d in (self.root, data_dir):
            os.makedirs(d)
        # A short directory: AF_UNIX paths are limited to 108 bytes.
        run_dir = tempfile.mkdtemp(prefix="plexagent-test-")
        self.addCleanup(shutil.rmtree, run_dir, True)
        key_file = os.path.join(base, "api-key")
        with open(key_file, "w") as f:
            f.write(API_KEY)
        os.chmod(key_file, 0o600)
        self.config_file = os.path.join(base, "plexagent.toml")
        with open(self.config_file, "w") as f:
            f.write(f"""
[node]
data_dir = {json.dumps(data_dir)}
shutdown_timeout = 1.0

[node_api]
socket = {json.dumps(os.path.join(run_dir, "api.sock"))}

[agent_api]
listen = "127.0.0.1:0"
api_key_file = {json.dumps(key_file)}
allowed_paths = [{json.dumps(self.root + "/")}]
""")
        self.process: AgentProcess | None = None

    async def start_agent(self) -> int:
        self.process = AgentProcess()
        env = dict(os.environ, PYTHONPATH=WORKTREE)
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "plexagent", "--config", self.config_file]
        self.transport = reactor.spawnProcess(self.process, sys.executable, argv, env=env, path=WORKTREE)
        self.addCleanup(self.stop_agent, self.process, self.transport)
        return await self.process.listening

    async def kill_agent(self) -> None:
        self.transport.signalProcess("KILL")
        await self.process.ended

    async def stop_agent(self, process: AgentProcess, transport) -> None:
        if not process.ended.called:
            try:
                transport.signalProcess("TERM")
            except error.ProcessExitedAlready:
                pass
            await process.ended

    async def send_chunk(self, port: int, index: int, data: bytes, **extra: str):
        params = {"chunk_id": "resume-me", "chunk_index": str(index), "total_chunks": "3", **extra}
        response = await treq.post(f"http://127.0.0.1:{port}/upload/tar/chunked", data=data, params=params,
                                   headers={"X-API-Key": API_KEY}, persistent=False)
        return response.code, await response.json()

    async def status(self, port: int):
        response = await treq.get(f"http://127.0.0.1:{port}/upload/tar/chunked", params={"chunk_id": "resume-me"},
                                  headers={"X-API-Key": API_KEY}, persistent=False)
        return response.code, await response.json()

    async def test_upload_resumes_after_sigkill_mid_chunk(self) -> None:
        payload = archive(member("app/main.py", data=os.urandom(200_000)), member("README", data=b"r"))
        size = len(payload) // 3 + 1
        pieces = [payload[i:i + size] for i in range(0, len(payload), size)]

        port = await self.start_agent()
        code, body = await self.send_chunk(port, 0, pieces[0])
        self.assertEqual((code, body["received"]), (200, [0]))

        # Chunk 1 is cut off mid-body by SIGKILL.
        head = (f"POST /upload/tar/chunked?chunk_id=resume-me&chunk_index=1&total_chunks=3 HTTP/1.1\r\n"
                f"Host: 127.0.0.1\r\nX-API-Key: {API_KEY}\r\nContent-Length: {len(pieces[1])}\r\n\r\n").encode()
        half = HalfRequest(head, pieces[1][: len(pieces[1]) // 2])
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), half)
        await self.kill_agent()
        half.transport.loseConnection()

        port = await self.start_agent()
        code, body = await self.status(port)
        self.assertEqual((code, body["received"], body["missing"]), (200, [0], [1, 2]))

        target = os.path.join(self.root, "deployed")
        code, body = await self.send_chunk(port, 2, pieces[2])
        self.assertEqual(body["received"], [0, 2])
        code, body = await self.send_chunk(port, 1, pieces[1], extract_path=target)
        self.assertEqual((code, body["extracted"], body["files"]), (200, True, 2))
        self.assertEqual(tree(target)["README"], b"r")
