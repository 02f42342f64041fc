"""
Docker going away and coming back, and the reactor staying responsive
while Docker is slow.

The Docker-down tests put a relay (``td.DockerRelay``) between the agent
and the private daemon and cut it: to the agent the daemon's socket is
gone, exactly as when dockerd stops, while the shared daemon other tests
use keeps running. (A second dockerd is no substitute on a shared host:
started with ``--bridge=none`` to stay off docker0, dockerd deletes the
docker0 bridge, breaking the shared daemon's networking.)
"""

from __future__ import annotations

import time
from typing import Any

import treq
from twisted.internet import defer, endpoints, reactor
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from plexagent.testing import docker as td


class DockerComesAndGoes(unittest.TestCase):
    def setUp(self) -> None:
        self.docker = td.test_client(self)
        self.relay = td.DockerRelay(reactor, td.docker_host())
        self.relay.restore()
        self.addCleanup(self.relay.close)
        self.agent = td.start_agent(self, docker_host_url=self.relay.url)
        self.api = td.AgentClient(self.agent)

    async def _down_and_up(self) -> None:
        status, doc = await self.api.get("/containers")
        self.assertEqual(status, 200)

        await self.relay.cut()
        for path in ("/containers", "/images/list", "/containers/x/status", "/containers/all/health"):
            status, err = await self.api.get(path)
            self.assertEqual((status, err["error"]), (503, "docker unavailable"), path)
        status, err = await self.api.post("/containers/run", {"image": td.base_image()})
        self.assertEqual((status, err["error"]), (503, "docker unavailable"))
        status, doc = await self.api.get("/ping", key=None)
        self.assertEqual((status, doc["status"], doc["docker"]), (200, "degraded", False))

        self.relay.restore()
        status, doc = await self.api.get("/containers")
        self.assertEqual(status, 200)
        status, doc = await self.api.get("/ping", key=None)
        self.assertEqual((doc["status"], doc["docker"]), ("ok", True))

    def test_docker_routes_are_503_while_docker_is_down_and_work_again_after(self) -> Any:
        return defer.ensureDeferred(self._down_and_up())

    async def _never_up(self) -> None:
        await self.relay.cut()
        agent = td.start_agent(self, docker_host_url=self.relay.url)
        api = td.AgentClient(agent)
        status, err = await api.get("/containers")
        self.assertEqual((status, err["error"]), (503, "docker unavailable"))
        self.relay.restore()
        status, _ = await api.get("/containers")
        self.assertEqual(status, 200)

    def test_an_agent_started_while_docker_is_down_connects_when_it_comes_up(self) -> Any:
        return defer.ensureDeferred(self._never_up())

    async def _load_during_outage(self) -> None:
        tar = b"".join(self.docker.api.get_image(td.base_image()))
        await self.relay.cut()
        status, err = await self.api.post("/docker/load/stream", data=tar)
        self.assertEqual((status, err["error"]), (503, "docker unavailable"))

    def test_a_streamed_load_while_docker_is_down_is_503(self) -> Any:
        return defer.ensureDeferred(self._load_during_outage())


@implementer(IAgentEndpointFactory)
class _UnixEndpoints:
    def __init__(self, path: str) -> None:
        self.path = path

    def endpointForURI(self, uri: Any) -> Any:
        return endpoints.UNIXClientEndpoint(reactor, self.path)


async def node_api_get(socket_path: str, path: str) -> int:
    """The status of ``GET path`` on the Local Node API's Unix socket."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent.usingEndpointFactory(reactor, _UnixEndpoints(socket_path), pool=pool)
    response = await agent.request(b"GET", b"http://localhost" + path.encode())
    await treq.content(response)
    return response.code


class ReactorStaysResponsive(unittest.TestCase):
    async def _slow_exec(self) -> None:
        client = td.test_client(self)
        # One Docker thread: a slow call occupies the whole pool.
        agent = td.start_agent(self, threads=1)
        api = td.AgentClient(agent)
        name = td.unique_name(self, client)
        status, doc = await api.post("/containers/run", {"name": name, "image": td.base_image(), "command": ["sleep", "300"]})
        self.assertEqual(status, 201)

        slow = api.post(f"/containers/{name}/exec", {"command": ["sleep", "3"]})
        started = time.monotonic()
        for _ in range(5):
            status, doc = await api.get("/ping", key=None)
            self.assertEqual((status, doc["docker"]), (200, True))
        # The Local Node API on its Unix socket answers too.
        local = await node_api_get(agent.config.node_api.socket, "/v1/state")
        self.assertLess(local, 500)
        elapsed = time.monotonic() - started
        self.assertFalse(slow.called, "the slow exec finished before the pings")
        self.assertLess(elapsed, 1.5)
        status, result = await slow
        self.assertEqual((status, result["exit_code"]), (200, 0))

    def test_ping_and_the_local_node_api_answer_while_a_slow_docker_call_holds_every_worker(self) -> Any:
        return defer.ensureDeferred(self._slow_exec())

    async def _stop_with_open_stream(self) -> None:
        client = td.test_client(self)
        agent = td.start_agent(self)
        api = td.AgentClient(agent)
        name = td.unique_name(self, client)
        await api.post("/containers/run", {"name": name, "image": td.base_image(),
                                           "command": ["sh", "-c", "while true; do echo tick; sleep 0.1; done"]})
        response = await api.request("GET", f"/containers/{name}/logs?follow=true")
        body = td.read_until(response, lambda data: False)
        # Stopping the agent ends the open stream and its worker.
        await agent.top.stopService()
        await body
        self.assertEqual(agent.pool.active, 0)
        self.assertFalse(agent.pool.threadpool.started)

    def test_stopping_the_agent_ends_open_log_streams(self) -> Any:
        return defer.ensureDeferred(self._stop_with_open_stream())
