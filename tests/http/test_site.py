"""
HTTP-level edges on the agent's real listeners (the Local Node API's Unix
socket and the Node Agent API's TCP port): requests no client library
would send are answered with a 4xx JSON document by the route or the
listener's policy, never a 5xx, an HTML page or a dropped connection.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from twisted.web import resource

from plexagent.http import site
from plexagent.testing import docker as td
from plexagent.testing.rawhttp import RawResponse, exchange
from tests.test_drills_disk import mount_tmpfs

JSON = b"application/json"


def http_request(method: bytes, target: bytes, headers: dict[bytes, bytes] | None = None, body: bytes = b"",
                 version: bytes = b"HTTP/1.1", host: bytes | None = b"localhost") -> bytes:
    head = [method + b" " + target + b" " + version]
    if host is not None:
        head.append(b"Host: " + host)
    head.append(b"Connection: close")
    for name, value in (headers or {}).items():
        head.append(name + b": " + value)
    if body or method in (b"POST", b"PUT"):
        head.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class Listeners(unittest.TestCase):
    """One whole agent; raw requests to its socket and its agent API port."""

    allowed_ips: tuple[str, ...] = ()

    def setUp(self) -> None:
        td.test_client(self)
        self.agent = td.start_agent(self, allowed_ips=self.allowed_ips)
        self.failures: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if "log_failure" in event:
                self.failures.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    async def socket(self, data: bytes, until_closed: bool = True) -> RawResponse:
        endpoint = UNIXClientEndpoint(reactor, self.agent.config.node_api.socket)
        return await exchange(endpoint, data, until_closed=until_closed)

    async def tcp(self, data: bytes, until_closed: bool = True) -> RawResponse:
        endpoint = TCP4ClientEndpoint(reactor, self.agent.host, self.agent.port)
        return await exchange(endpoint, data, until_closed=until_closed)

    async def agent_api(self, method: bytes, target: bytes, body: bytes = b"",
                        headers: dict[bytes, bytes] | None = None, key: bool = True) -> RawResponse:
        given = {b"X-API-Key": self.agent.api_key.encode()} if key else {}
        return await self.tcp(http_request(method, target, {**given, **(headers or {})}, body))

    def head_only(self, method: bytes, target: bytes, length: int, key: bool = True,
                  headers: dict[bytes, bytes] | None = None) -> bytes:
        """A request line and headers declaring a body of ``length`` bytes, and no body."""
        given = {b"X-API-Key": self.agent.api_key.encode()} if key else {}
        given.update(headers or {})
        given[b"Content-Length"] = b"%d" % length
        return http_request(method, target, given)[:-len(b"Content-Length: 0\r\n\r\n")] + b"\r\n"

    def assertJSON(self, response: RawResponse, status: int, error: str | None = None) -> Any:
        self.assertEqual(response.status, status, response.raw[:300])
        self.assertEqual(response.content_type, JSON, response.raw[:300])
        document = response.json()
        if error is not None:
            self.assertEqual(document["error"], error)
        return document

    def assertNothingFailed(self) -> None:
        self.assertEqual([e["log_failure"].getErrorMessage() for e in self.failures], [])


class SlashesInPaths(Listeners):
    async def test_report_keys_with_leading_trailing_and_double_slashes_are_stored_and_read_back(self) -> None:
        for escaped, key in ((b"%2Fetc%2Fx", "/etc/x"), (b"a%2F%2Fb", "a//b"), (b"x%2F", "x/"), (b"%2F", "/")):
            path = b"/v1/state/report/" + escaped
            put = await self.socket(http_request(b"PUT", path, body=b'{"content_type":"a","payload":1}'))
            self.assertEqual(self.assertJSON(put, 200)["key"], key)
            self.assertEqual(self.assertJSON(await self.socket(http_request(b"GET", path)), 200)["key"], key)
            deleted = await self.socket(http_request(b"DELETE", path))
            self.assertEqual(deleted.status, 204, deleted.raw)
            self.assertJSON(await self.socket(http_request(b"GET", path)), 404, "not found")
        self.assertNothingFailed()

    async def test_empty_segments_on_the_socket_are_json_404(self) -> None:
        for target in (b"/v1//state", b"/v1/state/metadata/%2Fx", b"/v1/state/data/%2Fx",
                       b"/v1/state/secrets/%2Fx", b"/v1/state/report/%2Fnope"):
            self.assertJSON(await self.socket(http_request(b"GET", target)), 404, "not found")
        self.assertNothingFailed()

    async def test_empty_segments_on_the_agent_api_are_json_404(self) -> None:
        for method, target in ((b"GET", b"/containers/%2Fx/status"), (b"GET", b"/networks/%2Fx"),
                               (b"GET", b"/services/%2Fnginx/status"), (b"POST", b"/files//write"),
                               (b"POST", b"/containers/x%2F/stop")):
            self.assertJSON(await self.agent_api(method, target, b"{}"), 404, "not found")
        self.assertNothingFailed()


class RequestForms(Listeners):
    async def test_an_http10_request_without_host_is_served(self) -> None:
        response = await self.socket(http_request(b"GET", b"/v1/state", version=b"HTTP/1.0", host=None))
        self.assertEqual(sorted(self.assertJSON(response, 200)), ["data_keys", "metadata", "report_keys", "secret_keys"])
        response = await self.tcp(b"GET /ping HTTP/1.0\r\n\r\n")
        self.assertEqual(self.assertJSON(response, 200)["status"], "ok")
        self.assertNothingFailed()

    async def test_a_request_line_over_the_limit_is_413_json(self) -> None:
        target = b"/v1/state/data/" + b"a" * 20000
        for send in (self.socket, self.tcp):
            self.assertJSON(await send(http_request(b"GET", target)), 413, "request headers too large")

    async def test_a_header_line_over_the_limit_is_413_json(self) -> None:
        headers = {b"X-Pad": b"a" * 17000}
        for send in (self.socket, self.tcp):
            self.assertJSON(await send(http_request(b"GET", b"/ping", headers)), 413, "request headers too large")

    async def test_a_path_that_is_not_utf8_is_400_json(self) -> None:
        self.assertJSON(await self.socket(http_request(b"GET", b"/v1/state/data/%ff")), 400, "invalid URL")
        self.assertJSON(await self.socket(http_request(b"GET", b"/v1/state/data/\xff")), 400)
        self.assertJSON(await self.agent_api(b"GET", b"/containers/%C3%28/status"), 400, "invalid URL")
        self.assertJSON(await self.agent_api(b"GET", b"/containers/\xc3\x28/status"), 400)
        self.assertNothingFailed()

    async def test_a_host_header_that_is_not_ascii_is_400_json(self) -> None:
        response = await self.socket(http_request(b"GET", b"/v1/state", host=b"h\xffst"))
        self.assertJSON(response, 400, "invalid Host header")

    async def test_options_star_on_the_socket_is_a_json_answer(self) -> None:
        self.assertJSON(await self.socket(http_request(b"OPTIONS", b"*")), 404, "not found")

    async def test_options_star_needs_the_api_key(self) -> None:
        self.assertJSON(await self.agent_api(b"OPTIONS", b"*", key=False), 401, "unauthorized")
        self.assertJSON(await self.agent_api(b"OPTIONS", b"*"), 404, "not found")

    async def test_a_form_body_is_left_to_the_route_not_parsed_before_the_policy(self) -> None:
        form = {b"Content-Type": b"multipart/form-data"}
        response = await self.agent_api(b"POST", b"/files/mkdir", b"not a form", form, key=False)
        self.assertJSON(response, 401, "unauthorized")
        response = await self.agent_api(b"POST", b"/files/mkdir", b"not a form", form)
        self.assertJSON(response, 400, "invalid JSON body")


class BodyLimits(Listeners):
    """Each route's body limit applies from the request's head, before any byte of the body."""

    async def test_a_declared_body_over_the_routes_limit_is_413_before_any_byte_is_read(self) -> None:
        # The client sends no byte of its 600 MB body and still gets the answer.
        request = self.head_only(b"POST", b"/files/mkdir", 600_000_000)
        response = await self.tcp(request, until_closed=False)
        self.assertEqual(self.assertJSON(response, 413, "request body too large")["details"],
                         "the limit is 1048576 bytes")
        self.assertEqual(response.headers[b"connection"], b"close")

    async def test_the_start_of_a_body_over_the_limit_is_thrown_away_not_spooled(self) -> None:
        spool = os.path.realpath(self.mktemp())
        os.makedirs(spool)
        mount_tmpfs(self, spool, "size=64m")
        self.patch(tempfile, "tempdir", spool)

        def used() -> int:
            st = os.statvfs(spool)
            return (st.f_blocks - st.f_bfree) * st.f_frsize

        before = used()
        request = self.head_only(b"POST", b"/files/mkdir", 600_000_000) + b"x" * (8 << 20)
        self.assertJSON(await self.tcp(request, until_closed=False), 413, "request body too large")
        # The Local Node API too (one limit for all its routes).
        request = self.head_only(b"PUT", b"/v1/state/report/k", 600_000_000) + b"x" * (8 << 20)
        self.assertJSON(await self.socket(request, until_closed=False), 413, "request body too large")
        self.assertEqual(used(), before)

    async def test_no_100_continue_for_a_body_that_will_not_be_read(self) -> None:
        request = self.head_only(b"POST", b"/files/mkdir", 600_000_000, headers={b"Expect": b"100-continue"})
        response = await self.tcp(request, until_closed=False)
        self.assertEqual(response.status, 413, response.raw)
        self.assertNotIn(b"100 Continue", response.raw)

    async def test_an_unauthenticated_body_is_refused_before_it_is_read(self) -> None:
        response = await self.tcp(self.head_only(b"POST", b"/files/write", 600_000_000, key=False),
                                  until_closed=False)
        self.assertJSON(response, 401, "unauthorized")

    async def test_routes_have_their_own_limits(self) -> None:
        content = "a" * (2 << 20)
        target = os.path.join(self.agent.workdir, "big")
        body = b'{"path": "%s", "content": "%s"}' % (target.encode(), content.encode())
        self.assertEqual(self.assertJSON(await self.agent_api(b"POST", b"/files/write", body), 200)["size"], 2 << 20)
        body = b'{"path": "%s", "mode": "%s"}' % (target.encode(), content.encode())
        self.assertJSON(await self.agent_api(b"POST", b"/files/mkdir", body), 413, "request body too large")
        self.assertJSON(await self.agent_api(b"POST", b"/containers/x/exec", body), 413, "request body too large")

    async def test_files_write_takes_at_most_max_json_bytes_by_default(self) -> None:
        # Its body is parsed whole in memory: 16 MiB, not hundreds of MB.
        request = self.head_only(b"POST", b"/files/write", (16 << 20) + 1)
        response = await self.tcp(request, until_closed=False)
        self.assertEqual(self.assertJSON(response, 413, "request body too large")["details"],
                         f"the limit is {16 << 20} bytes")

    async def test_a_chunked_body_over_the_limit_is_413(self) -> None:
        chunk = b"x" * (64 << 10)
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(20)) + b"0\r\n\r\n"
        request = (b"POST /files/mkdir HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-API-Key: "
                   + self.agent.api_key.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)
        self.assertJSON(await self.tcp(request), 413, "request body too large")

    async def test_a_client_that_neither_sends_its_body_nor_closes_is_cut_off(self) -> None:
        self.patch(site.PlexChannel, "linger_timeout", 0.2)
        response = await self.socket(self.head_only(b"PUT", b"/v1/state/report/k", 600_000_000))
        self.assertJSON(response, 413, "request body too large")

    async def test_a_client_that_sends_its_body_anyway_reads_the_413(self) -> None:
        # A refused client that sends its body anyway reads the answer, and
        # the connection is closed once the body is in (no reset).
        body = b"x" * (3 << 20)
        response = await self.socket(http_request(b"PUT", b"/v1/state/report/k", body=body))
        self.assertJSON(response, 413, "request body too large")


class AllowlistedListener(Listeners):
    allowed_ips = ("10.0.0.0/8",)

    async def test_options_star_from_outside_the_allowlist_is_403(self) -> None:
        for method in (b"OPTIONS", b"GET"):
            self.assertJSON(await self.agent_api(method, b"*"), 403, "IP not in allowlist")


class _Broken(resource.Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        raise RuntimeError("a bug")


class UnhandledFailures(unittest.TestCase):
    async def test_a_failure_no_handler_caught_is_a_json_500_logged_once(self) -> None:
        port = reactor.listenTCP(0, site.PlexSite(_Broken(), 1024), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        failures: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if "log_failure" in event:
                failures.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        response = await exchange(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
                                  http_request(b"GET", b"/x"))
        self.assertEqual((response.status, response.content_type, response.json()),
                         (500, JSON, {"error": "internal error"}))
        self.assertNotIn(b"a bug", response.raw)
        self.assertEqual([e["log_failure"].getErrorMessage() for e in failures], ["a bug"])
        self.flushLoggedErrors(RuntimeError)
