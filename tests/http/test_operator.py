"""
The agent's own routes on the Unix socket (``/plexagent/``): root only by
``SO_PEERCRED`` (a real process of another user is refused), never on
the Local Node API's TCP listener, not in its OpenAPI document; and
``plexagent reload`` through the socket.
"""

from __future__ import annotations

import io
import json
import os
import pwd

import treq
from twisted.internet import reactor, threads
from twisted.trial import unittest

from plexagent import cli
from plexagent.http.openapi import document
from plexagent.service import makeService
from plexagent.testing.fixtures import AgentSandbox, unix_http_client, write_secret_file
from tests.http.test_peercred import CLIENT_PYTHON, SOCKET_GROUP, ensure_group, ensure_user

POST_CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(("POST " + sys.argv[2] + " HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").encode())
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
head, _, body = data.partition(b"\r\n\r\n")
print(head.split(b" ")[1].decode(), body.decode())
"""


class OperatorRoutes(unittest.TestCase):
    def setUp(self) -> None:
        self.sandbox = AgentSandbox()
        self.addCleanup(self.sandbox.cleanup)
        self.sandbox.enable_http()
        self.sandbox.document["node_api"]["socket_group"] = SOCKET_GROUP
        ensure_group(SOCKET_GROUP)
        self.top = makeService(self.sandbox.config(), reactor)
        self.top.startService()
        self.addCleanup(self.top.stopService)
        self.http = unix_http_client(self.sandbox.socket)

    async def post(self, path: str) -> tuple[int, object]:
        response = await self.http.post("http://localhost" + path)
        return response.code, json.loads(await response.content())

    async def test_root_reloads_and_is_told_what_was_re_read(self) -> None:
        write_secret_file(self.sandbox.document["node_api"]["http_token_file"], "rotated-token")
        status, body = await self.post("/plexagent/reload")
        self.assertEqual((status, body), (200, {"reloaded": ["node_api.http_token_file"], "failed": {}}))

    async def test_another_user_is_403(self) -> None:
        uid = ensure_user("pa-test-plain", SOCKET_GROUP, [])
        entry = pwd.getpwuid(uid)
        reloads = []
        self.top.agent.reloader.add("x", lambda: None, reloads.append)

        def run() -> str:
            import subprocess

            result = subprocess.run([CLIENT_PYTHON, "-c", POST_CLIENT, self.sandbox.socket, "/plexagent/reload"],
                                    user=uid, group=entry.pw_gid, capture_output=True, timeout=30,
                                    env={"PATH": "/usr/bin:/bin"})
            return result.stdout.decode().strip() + result.stderr.decode().strip()

        out = await threads.deferToThread(run)
        self.assertEqual(out, '403 {"error":"forbidden: only root may reload the agent"}')
        self.assertEqual(reloads, [])

    async def test_other_methods_and_paths_are_json_errors(self) -> None:
        response = await self.http.get("http://localhost/plexagent/reload")
        self.assertEqual((response.code, json.loads(await response.content())["error"]), (405, "method not allowed"))
        status, body = await self.post("/plexagent/nothing-here")
        self.assertEqual((status, body), (404, {"error": "not found"}))

    async def test_the_routes_are_not_on_the_tcp_listener(self) -> None:
        reloads = []
        self.top.agent.reloader.add("x", lambda: None, reloads.append)
        port = self.top.getServiceNamed("node_api.http_listen").port.getHost().port
        response = await treq.post(f"http://127.0.0.1:{port}/plexagent/reload", persistent=False,
                                   headers={"Authorization": f"Bearer {self.sandbox.http_token}"})
        self.assertEqual((response.code, json.loads(await response.content())), (404, {"error": "not found"}))
        self.assertEqual(reloads, [])

    def test_the_routes_are_not_in_the_local_node_api_document(self) -> None:
        self.assertEqual([path for path in document("local-node-api")["paths"] if "plexagent" in path], [])

    async def test_plexagent_reload_prints_the_outcome_and_exits_0(self) -> None:
        out, err = io.StringIO(), io.StringIO()
        code = await threads.deferToThread(cli.main, ["reload", "--socket", self.sandbox.socket], io.StringIO(), out,
                                           err)
        self.assertEqual((code, json.loads(out.getvalue())), (0, {"reloaded": ["node_api.http_token_file"],
                                                                  "failed": {}}))

    async def test_plexagent_reload_exits_1_when_a_file_could_not_be_re_read(self) -> None:
        os.remove(self.sandbox.document["node_api"]["http_token_file"])
        out, err = io.StringIO(), io.StringIO()
        code = await threads.deferToThread(cli.main, ["reload", "--socket", self.sandbox.socket], io.StringIO(), out,
                                           err)
        self.assertEqual(code, 1)
        self.assertIn("node_api.http_token_file", json.loads(out.getvalue())["failed"])
