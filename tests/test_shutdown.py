"""
Graceful shutdown of the real daemon (``twistd -n plexagent``): on SIGTERM
every listener stops accepting, the requests that have begun arriving
finish (bodies still uploading included) and their answers reach the
client, within ``node.shutdown_timeout``; then the services they use stop,
the socket file is removed, and the process exits 0.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

from twisted.application import service
from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.trial import unittest
from twisted.web.client import ResponseFailed

from plexagent.http.listeners import ListenerService
from plexagent.service import AgentService
from plexagent.testing import ControlPlaneSimulator
from plexagent.testing.fixtures import AgentProcess, json_response, unix_http_client
from tests.host.files.test_tarsafe import archive, member
from tests.test_daemon import DaemonCase

BASE = "http://localhost"
STOPPED_ACCEPTING = r"node_api\.socket stopped accepting connections"


class RawExchange(protocol.Protocol):
    """
    One HTTP exchange written by hand, so a test decides when each part of
    the request is sent. ``continued`` fires on the server's ``100
    Continue``; ``closed`` fires with everything received.
    """

    def __init__(self) -> None:
        self.received = bytearray()
        self.continued: defer.Deferred[None] = defer.Deferred()
        self.closed: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if not self.continued.called and b"HTTP/1.1 100 Continue\r\n\r\n" in self.received:
            self.continued.callback(None)

    def connectionLost(self, reason: Any) -> None:
        self.closed.callback(bytes(self.received))


def final_response(raw: bytes) -> tuple[int, Any]:
    """Status and JSON body of the last response in ``raw`` (after any 100 Continue)."""
    raw = raw.split(b"HTTP/1.1 100 Continue\r\n\r\n")[-1]
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head:
        return 0, None  # no answer at all
    return int(head.split(b" ", 2)[1]), json.loads(body)


def request_head(method: str, target: str, length: int, *headers: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost", f"Content-Length: {length}",
             "Expect: 100-continue", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class ShutdownCase(DaemonCase):
    timeout = 60

    async def simulator(self) -> ControlPlaneSimulator:
        sim = ControlPlaneSimulator.example()
        await sim.start(reactor)
        self.addCleanup(lambda: defer.ensureDeferred(sim.stop()))
        self.sandbox.use_control_plane(sim)
        return sim

    async def started_with_secrets(self) -> tuple[AgentProcess, Any]:
        proc = self.spawn()
        await proc.wait_for_socket(self.sandbox.socket)
        client = unix_http_client(self.sandbox.socket)
        # The secret index comes with the first state fetch.
        while (await json_response(await client.get(BASE + "/v1/state/secrets")))[1] == []:
            await task.deferLater(reactor, 0.05, lambda: None)
        return proc, client

    async def connect_raw(self, proc: AgentProcess, head: bytes) -> RawExchange:
        """Connect to the socket and send ``head``; returns once the agent has parsed it (100 Continue)."""
        exchange = RawExchange()
        await endpoints.connectProtocol(endpoints.UNIXClientEndpoint(reactor, self.sandbox.socket), exchange)
        exchange.transport.write(head)
        await exchange.continued
        return exchange

    async def terminate(self, proc: AgentProcess, stopped: str = STOPPED_ACCEPTING) -> None:
        """SIGTERM, then wait until the agent says it no longer accepts connections."""
        said = proc.wait_for_output(stopped)
        proc.kill(signal.SIGTERM)
        await said


class InFlightRequestTests(ShutdownCase):
    async def test_a_secret_read_waiting_on_the_control_plane_gets_its_full_answer(self) -> None:
        sim = await self.simulator()
        proc, client = await self.started_with_secrets()
        hold = sim.faults.hold("secret")

        async def read() -> tuple[int, Any]:
            return await json_response(await client.get(BASE + "/v1/state/secrets/db%2Fpassword"))

        answer = defer.ensureDeferred(read())
        await hold.arrived  # the agent is waiting on the control plane
        await self.terminate(proc)
        hold.release()
        code, body = await answer
        self.assertEqual((code, body["value"]), (200, "s3cret-p@ssw0rd"))
        self.assertEqual(await proc.wait(), 0)

    async def test_a_report_put_whose_body_is_still_arriving_gets_its_full_answer(self) -> None:
        proc = self.spawn()
        await proc.wait_for_socket(self.sandbox.socket)
        body = json.dumps({"content_type": "application/json", "payload": {"status": "healthy"}}).encode()
        exchange = await self.connect_raw(
            proc,
            request_head("PUT", "/v1/state/report/health", len(body), "Content-Type: application/json")
            + body[:10],
        )
        await self.terminate(proc)
        exchange.transport.write(body[10:])
        raw = await exchange.closed
        code, answer = final_response(raw)
        self.assertEqual(code, 200, raw)
        self.assertEqual((answer["key"], answer["version"]), ("health", 1))
        self.assertEqual(await proc.wait(), 0)

    async def test_an_agent_api_upload_whose_body_is_still_arriving_gets_its_full_answer(self) -> None:
        root = os.path.join(self.sandbox.root, "allowed")
        os.makedirs(root)
        self.sandbox.document["agent_api"].update(
            {"enabled": True, "listen": "127.0.0.1:0", "allowed_paths": [root + "/"]}
        )
        proc = self.spawn()
        port = int((await proc.wait_for_output(r"agent_api\.listen listening on .*?port=(\d+)")).group(1))
        payload = archive(member("site/index.html", data=b"<h1>hello</h1>" * 1000))
        exchange = RawExchange()
        await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port), exchange)
        exchange.transport.write(
            request_head("POST", f"/upload/tar/stream?extract_path={root}/", len(payload), f"X-API-Key: {self.sandbox.api_key}")
        )
        await exchange.continued
        exchange.transport.write(payload[: len(payload) // 2])
        await self.terminate(proc, r"agent_api\.listen stopped accepting connections")
        exchange.transport.write(payload[len(payload) // 2:])
        raw = await exchange.closed
        self.assertEqual(final_response(raw)[0], 200, raw)
        with open(os.path.join(root, "site", "index.html"), "rb") as f:
            self.assertEqual(f.read(), b"<h1>hello</h1>" * 1000)
        self.assertEqual(await proc.wait(), 0)


class ShutdownBoundTests(ShutdownCase):
    async def test_a_request_unfinished_after_shutdown_timeout_is_cut_and_the_agent_exits_0(self) -> None:
        self.sandbox.document["node"]["shutdown_timeout"] = 0.5
        sim = await self.simulator()
        proc, client = await self.started_with_secrets()
        sim.faults.hold("secret")  # never released
        answer = client.get(BASE + "/v1/state/secrets/db%2Fpassword")
        await sim.faults.holds["secret"].arrived
        cut = proc.wait_for_output(r"node_api\.socket: cut 1 connections still busy after node\.shutdown_timeout")
        proc.kill(signal.SIGTERM)
        await cut
        with self.assertRaises(ResponseFailed):
            await answer
        self.assertEqual(await proc.wait(), 0)

    async def test_sigterm_as_soon_as_the_socket_is_bound_exits_0(self) -> None:
        proc = self.spawn()
        # Logged while twistd starts the services, before its reactor runs
        # and installs its own signal handlers.
        await proc.wait_for_output(r"node_api\.socket listening on")
        proc.kill(signal.SIGTERM)
        self.assertEqual(await proc.wait(), 0)
        self.assertFalse(os.path.exists(self.sandbox.socket))

    async def test_the_socket_file_is_removed(self) -> None:
        proc = self.spawn()
        await proc.wait_for_socket(self.sandbox.socket)
        proc.kill(signal.SIGTERM)
        self.assertEqual(await proc.wait(), 0)
        self.assertFalse(os.path.exists(self.sandbox.socket))

    async def test_idle_keep_alive_connections_do_not_delay_the_exit(self) -> None:
        self.sandbox.document["node"]["shutdown_timeout"] = 30.0
        proc = self.spawn()
        await proc.wait_for_socket(self.sandbox.socket)
        client = unix_http_client(self.sandbox.socket, persistent=True)
        self.addCleanup(client.pool.closeCachedConnections)
        code, _ = await json_response(await client.get(BASE + "/v1/state"))
        self.assertEqual(code, 200)
        started = reactor.seconds()
        proc.kill(signal.SIGTERM)
        self.assertEqual(await proc.wait(), 0)
        self.assertLess(reactor.seconds() - started, 10.0)


class _Recorder(service.Service):
    def __init__(self, name: str, events: list[str], stopped: defer.Deferred[None] | None = None) -> None:
        self.setName(name)
        self.events = events
        self.stopped = stopped

    def stopService(self) -> Any:
        super().stopService()
        self.events.append(f"stop {self.name}")
        if self.stopped is None:
            return None
        return self.stopped.addCallback(lambda _: self.events.append(f"stopped {self.name}"))


class _Listener(ListenerService):
    def __init__(self, name: str, events: list[str], stopped: defer.Deferred[None]) -> None:
        self.setName(name)
        self.events = events
        self.stopped = stopped

    def startService(self) -> None:
        service.Service.startService(self)

    def stopService(self) -> Any:
        service.Service.stopService(self)
        self.events.append(f"stop {self.name}")
        return self.stopped.addCallback(lambda _: self.events.append(f"stopped {self.name}"))


class StopOrderTests(unittest.TestCase):
    def test_listeners_drain_before_the_services_they_use_stop_last_added_first(self) -> None:
        events: list[str] = []
        draining = defer.Deferred()
        client_closing: defer.Deferred[None] = defer.Deferred()
        top = AgentService()
        _Recorder("stores", events).setServiceParent(top)
        _Recorder("docker-pool", events).setServiceParent(top)
        _Listener("node_api.socket", events, draining).setServiceParent(top)
        _Recorder("control-plane-connections", events, client_closing).setServiceParent(top)
        _Recorder("state-sync", events).setServiceParent(top)
        top.startService()
        stopped = top.stopService()
        self.assertEqual(events, ["stop node_api.socket"])
        draining.callback(None)
        self.assertEqual(events[-2:], ["stop state-sync", "stop control-plane-connections"])
        client_closing.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(events, [
            "stop node_api.socket", "stopped node_api.socket", "stop state-sync",
            "stop control-plane-connections", "stopped control-plane-connections",
            "stop docker-pool", "stop stores",
        ])


class StoresStopTests(unittest.TestCase):
    """The stores stop last, once the state write in progress is on disk."""

    def setUp(self) -> None:
        from plexagent.node.reports import ReportStore
        from plexagent.node.state import StateCache
        from plexagent.service import _Stores

        #: the writes "in a thread": each finishes when the test fires it
        self.writes: list[defer.Deferred[None]] = []

        def in_thread(f: Any, *args: Any) -> defer.Deferred[None]:
            d: defer.Deferred[None] = defer.Deferred()  # like deferToThread's: no canceller
            self.writes.append(d)
            d.addCallback(lambda _: f(*args))
            return d

        self.data_dir = self.mktemp()
        self.cache = StateCache(self.data_dir, run_in_thread=in_thread)
        self.stores = _Stores(self.cache, ReportStore(self.data_dir, reactor))
        self.stores.startService()

    def test_the_stores_stop_once_the_state_write_in_progress_is_on_disk(self) -> None:
        from plexagent.node.state import NodeState

        data_dir, writes = self.data_dir, self.writes
        self.cache.replace(NodeState(metadata={"role": "gateway"}))
        stopped = self.stores.stopService()
        self.assertNoResult(stopped)
        writes[0].callback(None)  # the write thread finishes
        self.successResultOf(stopped)
        with open(os.path.join(data_dir, "state.json")) as f:
            self.assertEqual(json.load(f)["metadata"], {"role": "gateway"})

    def test_cancelling_a_state_replace_does_not_cut_its_write(self) -> None:
        from plexagent.node.state import NodeState

        # A state fetch cancelled at stop has the cache write chained to it.
        replaced = self.cache.replace(NodeState(metadata={"role": "gateway"}))
        replaced.cancel()
        self.failureResultOf(replaced, defer.CancelledError)
        stopped = self.stores.stopService()
        self.assertNoResult(stopped)
        self.writes[0].callback(None)
        self.successResultOf(stopped)
        with open(os.path.join(self.data_dir, "state.json")) as f:
            self.assertEqual(json.load(f)["metadata"], {"role": "gateway"})
