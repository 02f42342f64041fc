"""
Connections cost the agent a file descriptor each: a listener holds at
most ``max_connections`` of them, a connection that sends nothing is
closed after the header timeout, a client the listener's policy refuses
gets its answer and the connection closes, and together the listeners
leave descriptors for the agent's own files.
"""

from __future__ import annotations

import json
import resource
from typing import Any

from twisted.application import service
from twisted.internet import defer, endpoints, protocol, reactor
from twisted.trial import unittest
from twisted.web import resource as web_resource

from plexagent import errors
from plexagent.http import auth
from plexagent.http.listeners import ListenerService
from plexagent.http.site import PlexChannel, PlexSite
from plexagent.service import RESERVED_DESCRIPTORS, budget_descriptors
from plexagent.testing.rawhttp import RawResponse, exchange

REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


class _Hello(web_resource.Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"{}"


class _Refuse:
    """A listener policy that refuses everyone, as the allowlist does a stranger."""

    def authenticate(self, request: Any) -> None:
        raise errors.Forbidden("IP not in allowlist")


class _Idle(protocol.Protocol):
    """A client that connects, sends nothing and records what it is told."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = protocol.connectionDone) -> None:
        self.closed.callback(self.received)


class ConnectionTests(unittest.TestCase):
    def serve(self, resource: Any = None, max_connections: int = 4096) -> Any:
        site = PlexSite(resource or _Hello(), 1024, max_connections=max_connections)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        return site

    async def idle(self) -> _Idle:
        client = _Idle()
        await endpoints.connectProtocol(self.endpoint, client)
        self.addCleanup(lambda: client.transport.abortConnection() if not client.closed.called else None)
        return client

    async def test_a_connection_past_the_cap_is_answered_503_and_closed(self) -> None:
        site = self.serve(max_connections=3)
        held = [await self.idle() for _ in range(3)]
        refused = RawResponse.parse(await (await self.idle()).closed)
        self.assertEqual((refused.status, refused.json()["error"]), (503, "too many connections"))
        self.assertEqual(site.refused_connections, 1)
        held[0].transport.loseConnection()
        await held[0].closed
        served = await exchange(self.endpoint, REQUEST)
        self.assertEqual(served.status, 200)

    async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(self) -> None:
        self.patch(PlexChannel, "header_timeout", 0.2)
        self.serve()
        answer = RawResponse.parse(await (await self.idle()).closed)
        self.assertEqual((answer.status, answer.json()["error"]), (408, "request headers not received in time"))

    async def test_a_request_the_policy_refuses_closes_its_connection(self) -> None:
        self.serve(auth.GuardedResource(_Refuse(), _Hello()))
        keep_alive = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        answer = await exchange(self.endpoint, keep_alive)  # returns once the server closes
        self.assertEqual((answer.status, answer.headers[b"connection"]), (403, b"close"))
        self.assertEqual(answer.json(), {"error": "IP not in allowlist"})


class DescriptorBudgetTests(unittest.TestCase):
    def tree(self, *caps: int) -> service.MultiService:
        top = service.MultiService()
        for i, cap in enumerate(caps):
            site = PlexSite(_Hello(), 1024, max_connections=cap)
            ListenerService(f"listener-{i}", None, site, reactor, 1.0).setServiceParent(top)
        return top

    def limit(self, soft: int, hard: int) -> list[tuple[int, int]]:
        raised: list[tuple[int, int]] = []
        current = [soft, hard]

        def setrlimit(which: int, limits: tuple[int, int]) -> None:
            raised.append(limits)
            current[:] = limits

        self.patch(resource, "getrlimit", lambda which: tuple(current))
        self.patch(resource, "setrlimit", setrlimit)
        return raised

    def test_the_soft_limit_is_raised_to_the_hard_limit(self) -> None:
        raised = self.limit(1024, 65536)
        top = self.tree(4096, 4096)
        budget_descriptors(top)
        self.assertEqual(raised, [(65536, 65536)])
        self.assertEqual([child.site.max_connections for child in top], [4096, 4096])

    def test_listeners_share_what_the_limit_leaves_beside_the_reserve(self) -> None:
        self.limit(4096, 4096)
        top = self.tree(4096, 4096, 100)
        budget_descriptors(top)
        share = (4096 - RESERVED_DESCRIPTORS) // 3
        self.assertEqual([child.site.max_connections for child in top], [share, share, 100])


class _Echo(web_resource.Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return json.dumps({"path": request.path.decode(), "args": sorted(k.decode() for k in request.args)}).encode()


class RequestFormTests(unittest.TestCase):
    """Request forms a listener answers as the HTTP standard says, in JSON when refused."""

    def setUp(self) -> None:
        port = reactor.listenTCP(0, PlexSite(_Echo(), 1024), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)

    async def test_an_absolute_form_target_is_routed_by_its_path(self) -> None:
        for target, path in ((b"http://agent.example/ping?x=1", "/ping"), (b"HTTPS://h:9999/a/b", "/a/b"),
                             (b"http://h", "/"), (b"http://h?q=1", "/")):
            answer = await exchange(self.endpoint, b"GET " + target + b" HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            self.assertEqual((answer.status, answer.json()["path"]), (200, path), target)

    async def test_more_header_lines_than_allowed_is_413_json(self) -> None:
        head = b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X-A: 1\r\n" * 600 + b"\r\n"
        answer = await exchange(self.endpoint, head)
        self.assertEqual((answer.status, answer.json()["error"]), (413, "request headers too large"))
        self.assertIn("header lines", answer.json()["details"])
