"""
Real-socket fixtures: an in-process agent built by ``makeService`` against
the control-plane simulator on loopback TCP, and a client for its Unix
socket.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable

import treq
from twisted.internet import defer, endpoints, reactor, task
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from plexagent.config import parse_config
from plexagent.service import makeService
from plexagent.testing.simulator import ControlPlaneSimulator


@implementer(IAgentEndpointFactory)
class _UnixEndpoints:
    def __init__(self, path: str) -> None:
        self.path = path

    def endpointForURI(self, uri: Any) -> Any:
        return endpoints.UNIXClientEndpoint(reactor, self.path)


class SocketClient:
    """HTTP over the agent's Unix socket."""

    def __init__(self, path: str, persistent: bool = True) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=persistent)
        self.http = treq.client.HTTPClient(Agent.usingEndpointFactory(reactor, _UnixEndpoints(path), pool=self.pool))

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        response = await self.http.request(method, "http://localhost" + path, data=data)
        raw = await response.content()
        return response.code, (json.loads(raw) if raw else None)

    async def get(self, path: str) -> tuple[int, Any]:
        return await self.request("GET", path)

    async def put_report(self, key: str, payload: Any) -> tuple[int, Any]:
        return await self.request("PUT", "/v1/state/report/" + key,
                                  {"content_type": "application/json", "payload": payload})

    async def delete_report(self, key: str) -> tuple[int, Any]:
        return await self.request("DELETE", "/v1/state/report/" + key)

    def close(self) -> defer.Deferred[None]:
        return self.pool.closeCachedConnections()


async def eventually(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """
    Wait until ``condition()`` holds, checking on each reactor turn (every
    5 ms), failing after ``timeout``. The condition, not the wait, is what
    the test synchronises on.
    """
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await task.deferLater(reactor, 0.005, lambda: None)


def write_private(path: str, text: str) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def short_socket_dir() -> str:
    """A directory for a Unix socket (trial's own paths exceed AF_UNIX's 108 bytes)."""
    return tempfile.mkdtemp(prefix="pa-", dir="/tmp")


def agent_config_document(
    base: str, sim: ControlPlaneSimulator, socket_dir: str | None = None, enroll: bool = True, **control_plane: Any
) -> dict[str, Any]:
    """
    A config for an agent in directory ``base`` talking to ``sim``: it
    enrolls with a bootstrap token of its own (a restart uses the identity
    it stored), or with ``enroll=False`` uses the simulator's pre-registered
    node (``token_file`` and ``secret_key_file``).
    """
    os.makedirs(base, exist_ok=True)
    socket_dir = socket_dir or base
    cp: dict[str, Any] = {
        "url": sim.url,
        "report_debounce": 0.05,
        "heartbeat_interval": 30.0,
        "reconcile_interval": 60.0,
        "request_timeout": 2.0,
    }
    node: dict[str, Any] = {"data_dir": os.path.join(base, "data"), "shutdown_timeout": 1.0}
    if sim.protocol == "plexsphere":
        cp.update(protocol="plexsphere", project_id=sim.project_id, resource_handle=sim.resource_handle)
    if enroll:
        cp["bootstrap_token_file"] = write_private(os.path.join(base, "bootstrap-token"),
                                                   sim.issue_bootstrap_token() + "\n")
    else:
        node["id"] = sim.example_node.node_id
        node["secret_key_file"] = write_private(os.path.join(base, "nsk"), sim.example_node.nsk_text)
        if sim.protocol == "plexd":  # plexsphere derives its bearer from the node id and the NSK
            cp["token_file"] = write_private(os.path.join(base, "token"), sim.example_node.nsk_text + "\n")
    cp.update(control_plane)
    return {
        "node": node,
        "control_plane": cp,
        "node_api": {"socket": os.path.join(socket_dir, "api.sock"), "socket_group": "", "secrets_group": ""},
        "agent_api": {"enabled": False},
    }


class AgentTestCase(unittest.TestCase):
    """Starts a simulator; ``start_agent`` runs an agent against it."""

    timeout = 60

    async def start_sim(self, **options: Any) -> ControlPlaneSimulator:
        """The simulator of this test's protocol (``self.protocol``, set by ``for_each_protocol``; else plexd)."""
        from tests.controlplane.protocols import PLEXD

        sim = getattr(self, "protocol", PLEXD).simulator(**options)
        if sim.protocol == "plexsphere":
            # Every request the agent sends and every answer the simulator
            # serves is checked against the protocol's OpenAPI document.
            from plexagent.testing.openapi_check import ExchangeChecker

            self.exchange_checker = ExchangeChecker()
            sim.exchange_checks.append(self.exchange_checker)
            self.addCleanup(lambda: self.assertEqual(sim.violations, []))
        await sim.start(reactor)
        self.addCleanup(lambda: defer.ensureDeferred(sim.stop()))
        return sim

    def allow_fault(self, operation_id: str, status: int) -> None:
        """A fault this test injects on purpose that the OpenAPI document does not declare."""
        checker = getattr(self, "exchange_checker", None)
        if checker is not None:
            checker.allow_undeclared.add((operation_id, status))

    def start_agent(self, sim: ControlPlaneSimulator, base: str | None = None, **control_plane: Any) -> Any:
        base = base or self.mktemp()
        socket_dir = short_socket_dir()
        self.addCleanup(shutil.rmtree, socket_dir, True)
        config = parse_config(agent_config_document(base, sim, socket_dir, **control_plane))
        top = makeService(config, reactor)
        #: the service tree of the agent started last
        self.last_top = top
        top.startService()
        self.addCleanup(top.stopService)
        client = SocketClient(config.node_api.socket)
        self.addCleanup(client.close)
        return top.agent, client
