"""
The control-plane transport against a recording server on loopback TCP:
headers, gzip both ways, size caps, timeouts, Retry-After and Go's path
escaping, as plexd's client sends and reads them.
"""

from __future__ import annotations

import gzip
from typing import Any

from twisted.internet import defer, endpoints, reactor, task
from twisted.trial import unittest
from twisted.web import server

from plexagent.controlplane.client import Transport, parse_retry_after, path_escape
from plexagent.controlplane.protocol import Call, ControlPlaneError, ErrorKind
from tests.controlplane.fakes import Recorder
from tests.controlplane.harness import eventually


class TransportTests(unittest.TestCase):
    timeout = 30

    def setUp(self) -> Any:
        self.recorder = Recorder()
        site = server.Site(self.recorder)
        site.noisy = False
        d = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)

        def listening(port: Any) -> None:
            self.port = port
            self.addCleanup(port.stopListening)
            self.transport = Transport(reactor, f"http://127.0.0.1:{port.getHost().port}/prefix/",
                                       request_timeout=2.0, connect_timeout=1.0)
            self.addCleanup(self.transport.close)

        return d.addCallback(listening)

    def headers(self, index: int = -1) -> dict[bytes, list[bytes]]:
        return self.recorder.requests[index]["headers"]

    async def test_json_calls_carry_plexd_s_headers_and_keep_the_url_s_path_prefix(self) -> None:
        reply = await self.transport.request(Call.STATE, "GET", "/v1/nodes/n/state", "the-bearer")
        self.assertEqual(reply.status, 200)
        sent = self.recorder.requests[-1]
        self.assertEqual(sent["path"], b"/prefix/v1/nodes/n/state")
        self.assertEqual(self.headers()[b"authorization"], [b"Bearer the-bearer"])
        self.assertEqual(self.headers()[b"accept"], [b"application/json"])
        self.assertEqual(self.headers()[b"accept-encoding"], [b"gzip"])
        self.assertRegex(self.headers()[b"user-agent"][0], rb"^plexagent/")
        self.assertNotIn(b"content-type", self.headers())

    async def test_no_authorization_without_a_bearer(self) -> None:
        await self.transport.request(Call.REGISTER, "POST", "/v1/register", "", b"{}")
        self.assertNotIn(b"authorization", self.headers())

    async def test_a_body_of_1024_bytes_is_sent_plain_and_1025_gzipped(self) -> None:
        for size in (1024, 1025):
            body = b'{"p":"' + b"x" * (size - 8) + b'"}'
            self.assertEqual(len(body), size)
            await self.transport.request(Call.REPORT, "POST", "/r", "b", body)
            sent = self.recorder.requests[-1]
            self.assertEqual(self.headers()[b"content-type"], [b"application/json"])
            if size == 1024:
                self.assertNotIn(b"content-encoding", self.headers())
                self.assertEqual(sent["body"], body)
            else:
                self.assertEqual(self.headers()[b"content-encoding"], [b"gzip"])
                self.assertEqual(gzip.decompress(sent["body"]), body)

    async def test_a_protocol_may_turn_request_gzip_off(self) -> None:
        body = b'{"p":"' + b"x" * 5000 + b'"}'
        await self.transport.request(Call.REPORT, "POST", "/r", "b", body, gzip_over=None)
        self.assertEqual(self.recorder.requests[-1]["body"], body)
        self.assertNotIn(b"accept-encoding", self.headers())

    async def test_a_post_without_a_body_has_content_length_0_and_no_content_type(self) -> None:
        await self.transport.request(Call.DEREGISTER, "POST", "/d", "b")
        self.assertEqual(self.headers()[b"content-length"], [b"0"])
        self.assertNotIn(b"content-type", self.headers())

    async def test_any_status_is_a_reply(self) -> None:
        def answer(request: Any) -> bytes:
            request.setResponseCode(429)
            request.setHeader(b"retry-after", b"7")
            return b'{"error":"slow down"}'

        self.recorder.answer = answer
        reply = await self.transport.request(Call.STATE, "GET", "/s", "b")
        self.assertEqual((reply.status, reply.retry_after, reply.body), (429, 7.0, b'{"error":"slow down"}'))

    async def test_a_gzipped_answer_is_decompressed(self) -> None:
        def answer(request: Any) -> bytes:
            request.setHeader(b"content-encoding", b"GZIP")
            return gzip.compress(b'{"a":1}')

        self.recorder.answer = answer
        self.assertEqual((await self.transport.request(Call.STATE, "GET", "/s", "b")).body, b'{"a":1}')

    async def test_more_than_10_mib_gunzipped_is_a_transient_failure(self) -> None:
        bomb = gzip.compress(b"[" + b" " * (10 * 1024 * 1024) + b"]")

        def answer(request: Any) -> bytes:
            request.setHeader(b"content-encoding", b"gzip")
            return bomb

        self.recorder.answer = answer
        with self.assertRaises(ControlPlaneError) as caught:
            await self.transport.request(Call.STATE, "GET", "/s", "b")
        self.assertEqual(caught.exception.kind, ErrorKind.TRANSIENT)
        self.assertIn("too large", str(caught.exception))

    async def test_a_plain_answer_over_its_cap_is_a_transient_failure(self) -> None:
        self.recorder.answer = lambda request: b"x" * 5000
        with self.assertRaises(ControlPlaneError) as caught:
            await self.transport.request(Call.STATE, "GET", "/s", "b", max_bytes=4096)
        self.assertIn("too large", str(caught.exception))

    async def test_a_slow_answer_times_out_as_a_transient_failure_naming_the_call(self) -> None:
        self.recorder.answer = lambda request: server.NOT_DONE_YET
        with self.assertRaises(ControlPlaneError) as caught:
            await self.transport.request(Call.HEARTBEAT, "POST", "/h", "secret-bearer", b"{}")
        self.assertEqual(caught.exception.kind, ErrorKind.TRANSIENT)
        self.assertIn("heartbeat", str(caught.exception))
        self.assertNotIn("secret-bearer", str(caught.exception))

    async def test_an_unreachable_control_plane_is_a_transient_failure(self) -> None:
        await self.port.stopListening()
        with self.assertRaises(ControlPlaneError) as caught:
            await self.transport.request(Call.STATE, "GET", "/s", "b")
        self.assertEqual(caught.exception.kind, ErrorKind.TRANSIENT)
        self.assertIn("unreachable", str(caught.exception))

    async def test_the_stream_sends_no_accept_encoding_and_only_its_headers_are_timed(self) -> None:
        requests: list[Any] = []

        def answer(request: Any) -> Any:
            request.setHeader(b"content-type", b"text/event-stream")
            request.write(b": open\n\n")
            requests.append(request)
            return server.NOT_DONE_YET

        self.recorder.answer = answer
        clock = task.Clock()
        self.transport = Transport(reactor, self.transport.base_url, request_timeout=2.0, clock=clock)
        self.addCleanup(self.transport.close)
        response = await self.transport.open_stream(Call.EVENTS, "/e", "b", {b"Last-Event-ID": [b"7"]})
        self.assertEqual(response.code, 200)
        self.assertEqual(self.headers()[b"accept"], [b"text/event-stream"])
        self.assertEqual(self.headers()[b"cache-control"], [b"no-cache"])
        self.assertEqual(self.headers()[b"last-event-id"], [b"7"])
        self.assertNotIn(b"accept-encoding", self.headers())
        received: list[bytes] = []
        done: defer.Deferred[None] = defer.Deferred()

        from twisted.internet.protocol import Protocol

        class Body(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.append(data)

            def connectionLost(self, reason: Any = None) -> None:
                done.callback(None)

        response.deliverBody(Body())
        clock.advance(60)  # far past the request timeout: the stream stays open
        requests[0].write(b"data: later\n\n")
        await eventually(lambda: b"data: later\n\n" in b"".join(received))
        requests[0].finish()
        await done


class RetryAfterTests(unittest.TestCase):
    def test_read_as_go_s_atoi_reads_it(self) -> None:
        cases = {b"7": 7.0, b" 7 ": 7.0, b"+7": 7.0, b"007": 7.0, b"1.5": None, b"0": None, b"-3": None,
                 b"Wed, 21 Oct 2026 07:28:00 GMT": None, b"": None, b"\xff": None, None: None, b"99999": 3600.0}
        for value, expected in cases.items():
            self.assertEqual(parse_retry_after(value), expected, value)


class PathEscapeTests(unittest.TestCase):
    def test_as_go_s_url_path_escape(self) -> None:
        self.assertEqual(path_escape("n-42:eu@west+1 x"), "n-42:eu@west+1%20x")
        self.assertEqual(path_escape("tls/server.key"), "tls%2Fserver.key")
        self.assertEqual(path_escape("no/such key"), "no%2Fsuch%20key")
        self.assertEqual(path_escape("a$&+:=@~._-b?#%ü"), "a$&+:=@~._-b%3F%23%25%C3%BC")
