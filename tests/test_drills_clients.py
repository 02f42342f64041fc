"""
Slow and abusive clients: slowloris, oversized headers and bodies, and
thousands of idle connections. Other clients are still served.
"""

from __future__ import annotations

import socket

from twisted.internet import reactor, task, threads
from twisted.trial import unittest

from plexagent.http.site import PlexChannel
from plexagent.service import makeService
from plexagent.testing.fixtures import AgentSandbox, json_response, unix_http_client

BASE = "http://localhost"


class AbusiveClientTests(unittest.TestCase):
    def setUp(self) -> None:
        self.sandbox = AgentSandbox()
        self.addCleanup(self.sandbox.cleanup)
        self.patch(PlexChannel, "header_timeout", 0.5)
        self.service = makeService(self.sandbox.config(), reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.setblocking(False)
        s.connect(self.sandbox.socket)
        return s

    async def still_serving(self) -> None:
        code, body = await json_response(await unix_http_client(self.sandbox.socket).get(BASE + "/v1/state"))
        self.assertEqual(code, 200)

    async def read_all(self, s: socket.socket, timeout: float = 5.0) -> bytes:
        data = b""
        deadline = reactor.seconds() + timeout
        while reactor.seconds() < deadline:
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                await task.deferLater(reactor, 0.02, lambda: None)
                continue
            if not chunk:
                return data
            data += chunk
        raise AssertionError(f"connection not closed; got {data!r}")

    async def test_slowloris_is_cut_off_after_the_header_timeout(self) -> None:
        s = self.connect()
        self.addCleanup(s.close)
        s.send(b"GET /v1/state HTTP/1.1\r\nHost: x\r\n")
        for _ in range(10):  # one header byte now and then, never finishing
            await task.deferLater(reactor, 0.1, lambda: None)
            try:
                s.send(b"X")
            except OSError:
                break
        response = await self.read_all(s)
        self.assertTrue(response.startswith(b"HTTP/1.1 408 "), response)
        self.assertIn(b'{"error":"request headers not received in time"}', response)
        await self.still_serving()

    async def test_oversized_headers_are_413_json(self) -> None:
        s = self.connect()
        self.addCleanup(s.close)
        s.send(b"GET /v1/state HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 8000 + b"\r\n")
        s.send(b"X-Pad2: " + b"a" * 9000 + b"\r\n\r\n")
        response = await self.read_all(s)
        self.assertTrue(response.startswith(b"HTTP/1.1 413 "), response)
        self.assertIn(b'"request headers too large"', response)
        await self.still_serving()

    async def test_garbage_request_line_is_400_json(self) -> None:
        s = self.connect()
        self.addCleanup(s.close)
        s.send(b"\x00\x01garbage\r\n\r\n")
        response = await self.read_all(s)
        self.assertTrue(response.startswith(b"HTTP/1.1 400 "), response)
        self.assertIn(b"application/json", response)

    async def test_oversized_body_is_413_and_stores_nothing(self) -> None:
        client = unix_http_client(self.sandbox.socket)
        response = await client.put(BASE + "/v1/state/report/k", data=b"x" * (2 * 1024 * 1024))
        code, body = await json_response(response)
        self.assertEqual((code, body["error"]), (413, "request body too large"))
        self.assertEqual((await json_response(await client.get(BASE + "/v1/state/report")))[1], [])

    async def test_thousands_of_idle_connections_do_not_starve_others(self) -> None:
        def open_many() -> list[socket.socket]:
            conns = []
            for _ in range(2000):
                s = socket.socket(socket.AF_UNIX)
                s.connect(self.sandbox.socket)
                conns.append(s)
            return conns

        conns = await threads.deferToThread(open_many)
        self.addCleanup(lambda: [c.close() for c in conns])
        await self.still_serving()
