"""
The real daemon, ``twistd -n --pidfile= plexagent --config FILE``: startup
errors, graceful SIGTERM, and durability across SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import sys
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.testing import MemoryReactor
from twisted.trial import unittest

from plexagent.service import makeService
from plexagent.testing.fixtures import AgentProcess, AgentSandbox, json_response, unix_http_client

BASE = "http://localhost"


class DaemonCase(unittest.TestCase):
    def setUp(self) -> None:
        self.sandbox = AgentSandbox()
        self.addCleanup(self.sandbox.cleanup)

    def spawn(self) -> AgentProcess:
        proc = AgentProcess(self.sandbox.write(), reactor)
        proc.start()

        async def reap() -> None:
            proc.kill()
            await proc.wait()

        self.addCleanup(lambda: defer.ensureDeferred(reap()))
        return proc

    async def start_failure(self) -> tuple[int, str]:
        proc = self.spawn()
        status = await proc.wait()
        return status, proc.output.strip()


class StartupErrorTests(DaemonCase):
    async def test_unknown_key_stops_startup_naming_it(self) -> None:
        self.sandbox.document["node_api"]["sockett"] = "/x"
        status, output = await self.start_failure()
        self.assertNotEqual(status, 0)
        self.assertEqual(output, "plexagent: configuration error: node_api.sockett: unknown key")

    async def test_wrong_type_stops_startup_naming_the_key(self) -> None:
        self.sandbox.document["control_plane"] = {"heartbeat_interval": "often"}
        status, output = await self.start_failure()
        self.assertNotEqual(status, 0)
        self.assertIn("control_plane.heartbeat_interval: must be a number", output)
        self.assertEqual(len(output.splitlines()), 1, output)

    async def test_node_id_is_required_with_a_control_plane(self) -> None:
        self.sandbox.document["control_plane"] = {"url": "http://127.0.0.1:1"}
        status, output = await self.start_failure()
        self.assertNotEqual(status, 0)
        self.assertEqual(output, "plexagent: configuration error: node.id: required when control_plane.url is set")

    async def test_unreadable_key_file_stops_startup_naming_path(self) -> None:
        self.sandbox.document["node_api"].update({"http_enabled": True, "http_token_file": "/nonexistent/token"})
        status, output = await self.start_failure()
        self.assertNotEqual(status, 0)
        self.assertEqual(
            output,
            "plexagent: configuration error: node_api.http_token_file: cannot read /nonexistent/token: "
            "No such file or directory",
        )

    async def test_listener_that_cannot_bind_stops_startup(self) -> None:
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        self.sandbox.enable_http(f"127.0.0.1:{busy.getsockname()[1]}")
        status, output = await self.start_failure()
        self.assertNotEqual(status, 0)
        self.assertIn("node_api.http_listen: cannot listen", output)

    async def test_a_failed_start_removes_the_socket_it_had_bound(self) -> None:
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        # The socket binds first, then the TCP listener fails.
        self.sandbox.enable_http(f"127.0.0.1:{busy.getsockname()[1]}")
        status, output = await self.start_failure()
        self.assertNotEqual(status, 0)
        self.assertIn("node_api.http_listen: cannot listen", output)
        self.assertEqual(os.listdir(self.sandbox.run_dir), [])

    async def test_socket_held_by_a_live_agent_is_refused(self) -> None:
        live = socket.socket(socket.AF_UNIX)
        live.bind(self.sandbox.socket)
        live.listen(1)
        self.addCleanup(live.close)
        status, output = await self.start_failure()
        self.assertNotEqual(status, 0)
        self.assertIn("another process is listening on", output)


class LifecycleTests(DaemonCase):
    async def test_stale_socket_is_replaced(self) -> None:
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(self.sandbox.socket)
        stale.close()  # bound, never listening: a leftover file
        proc = self.spawn()
        await proc.wait_for_socket(self.sandbox.socket)
        code, _ = await json_response(await unix_http_client(self.sandbox.socket).get(BASE + "/v1/state"))
        self.assertEqual(code, 200)


class CrashTests(DaemonCase):
    async def test_acknowledged_reports_survive_sigkill(self) -> None:
        proc = self.spawn()
        await proc.wait_for_socket(self.sandbox.socket)
        client = unix_http_client(self.sandbox.socket)
        acknowledged: dict[str, int] = {}

        async def writer(n: int) -> None:
            for i in range(25):
                key = f"w{n}-{i % 5}"
                response = await client.put(
                    BASE + f"/v1/state/report/{key}",
                    data=json.dumps({"content_type": "application/json", "payload": {"i": i}}).encode(),
                )
                code, body = await json_response(response)
                if code == 200:
                    acknowledged[key] = max(acknowledged.get(key, 0), body["version"])

        await defer.gatherResults([defer.ensureDeferred(writer(n)) for n in range(8)])
        await client.delete(BASE + "/v1/state/report/w0-0")
        del acknowledged["w0-0"]
        proc.kill(signal.SIGKILL)
        await proc.wait()

        again = self.spawn()
        await again.wait_for_socket(self.sandbox.socket)
        code, listing = await json_response(await unix_http_client(self.sandbox.socket).get(BASE + "/v1/state/report"))
        self.assertEqual(code, 200)
        self.assertEqual({e["key"]: e["version"] for e in listing}, acknowledged)


class MakeServiceTests(unittest.TestCase):
    def make(self, **node_api: object) -> MemoryReactor:
        sandbox = AgentSandbox()
        self.addCleanup(sandbox.cleanup)
        sandbox.document["node_api"].update(node_api)
        memory = MemoryReactor()
        top = makeService(sandbox.config(), memory)
        top.startService()
        self.addCleanup(top.stopService)
        self.sandbox = sandbox
        return memory

    def test_default_opens_only_the_unix_socket(self) -> None:
        memory = self.make()
        self.assertEqual([u[0] for u in memory.unixServers], [self.sandbox.socket])
        self.assertEqual(memory.unixServers[0][3], 0o660)
        self.assertEqual(memory.tcpServers, [])

    def test_http_enabled_adds_the_tcp_listener(self) -> None:
        memory = self.make(http_enabled=True, http_listen="127.0.0.1:9100")
        self.assertEqual([u[0] for u in memory.unixServers], [self.sandbox.socket])
        self.assertEqual([(t[0], t[3]) for t in memory.tcpServers], [(9100, "127.0.0.1")])

    def test_endpoint_descriptions_are_accepted(self) -> None:
        memory = self.make(http_enabled=True, http_listen="tcp:9200:interface=127.0.0.2")
        self.assertEqual([(t[0], t[3]) for t in memory.tcpServers], [(9200, "127.0.0.2")])

    def test_ipv6_host_port(self) -> None:
        memory = self.make(http_enabled=True, http_listen="[::1]:9100")
        self.assertEqual([(t[0], t[3]) for t in memory.tcpServers], [(9100, "::1")])


class SocketActivationTests(DaemonCase):
    def activated(self) -> tuple[Any, Any]:
        """
        What systemd does for a .socket unit: bind and listen (mode 0660),
        then start the service with the socket as fd 3 and
        LISTEN_FDS/LISTEN_PID set. Returns the process's watcher and transport.
        """
        listening = socket.socket(socket.AF_UNIX)
        listening.bind(self.sandbox.socket)
        os.chmod(self.sandbox.socket, 0o660)
        listening.listen(16)
        self.addCleanup(listening.close)
        self.sandbox.document["node_api"]["socket"] = "systemd:domain=UNIX:index=0"
        config = self.sandbox.write()
        from plexagent.testing.fixtures import _ProcessWatcher

        watcher = _ProcessWatcher()
        launcher = (
            "import os, sys; os.environ['LISTEN_PID'] = str(os.getpid()); os.environ['LISTEN_FDS'] = '1'; "
            "os.environ['LISTEN_FDNAMES'] = 'api'; "
            "from twisted.scripts.twistd import run; sys.argv = ['twistd'] + sys.argv[1:]; run()"
        )
        argv = [sys.executable, "-c", launcher, "-n", "--pidfile=", "plexagent", "--config", config]
        transport = reactor.spawnProcess(
            watcher, argv[0], argv, env=dict(os.environ), childFDs={0: "w", 1: "r", 2: "r", 3: listening.fileno()}
        )

        async def reap() -> None:
            if watcher.status is None:
                transport.signalProcess("KILL")
                await watcher.ended

        self.addCleanup(lambda: defer.ensureDeferred(reap()))
        return watcher, transport

    async def test_the_socket_can_come_from_systemd(self) -> None:
        watcher, _ = self.activated()
        await watcher.wait_for("node_api.socket listening on")
        code, body = await json_response(await unix_http_client(self.sandbox.socket).get(BASE + "/v1/state"))
        self.assertEqual(code, 200)
        self.assertEqual(body["report_keys"], [])

    async def test_a_systemd_socket_keeps_its_mode_and_its_file_after_sigterm(self) -> None:
        watcher, transport = self.activated()
        await watcher.wait_for("node_api.socket listening on")
        self.assertEqual(stat.S_IMODE(os.stat(self.sandbox.socket).st_mode), 0o660)
        transport.signalProcess("TERM")
        self.assertEqual(await watcher.ended, 0)
        self.assertEqual(stat.S_IMODE(os.stat(self.sandbox.socket).st_mode), 0o660)

    async def test_a_missing_systemd_socket_is_a_configuration_error(self) -> None:
        self.sandbox.document["node_api"]["socket"] = "systemd:domain=UNIX:index=0"
        status, output = await self.start_failure()
        self.assertNotEqual(status, 0)
        self.assertEqual(
            output,
            "plexagent: configuration error: node_api.socket: 'systemd:domain=UNIX:index=0': "
            "no such socket was passed by systemd",
        )
