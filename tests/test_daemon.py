"""
The real daemon, ``twistd -n --pidfile= plexagent --config FILE``: startup
errors, graceful SIGTERM, durability across SIGKILL, and starting whatever
the data directory holds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import sys
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.testing import MemoryReactor
from twisted.trial import unittest

from plexagent.service import makeService
from plexagent.testing import ControlPlaneSimulator
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

    async def test_node_id_is_required_with_a_pre_provisioned_token(self) -> None:
        self.sandbox.document["control_plane"] = {"url": "http://127.0.0.1:1", "token_file": "/t"}
        status, output = await self.start_failure()
        self.assertNotEqual(status, 0)
        self.assertEqual(output, "plexagent: configuration error: node.id: required when control_plane.token_file is set")

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


class ReloadTests(DaemonCase):
    async def test_sighup_re_reads_the_token_while_the_daemon_keeps_serving(self) -> None:
        import treq

        from plexagent.testing.fixtures import write_secret_file

        self.sandbox.enable_http()
        proc = self.spawn()
        listening = await proc.wait_for_output(r"node_api\.http_listen listening on .*port=(\d+)")
        url = f"http://127.0.0.1:{int(listening.group(1))}/v1/state/metadata"
        write_secret_file(self.sandbox.document["node_api"]["http_token_file"], "rotated-token")
        reloaded = proc.wait_for_output(r"reload: re-read node_api\.http_token_file")
        proc.transport.signalProcess("HUP")
        await reloaded
        response = await treq.get(url, headers={"Authorization": "Bearer rotated-token"}, persistent=False)
        await response.content()
        self.assertEqual(response.code, 200)
        proc.kill(signal.SIGTERM)
        self.assertEqual(await proc.wait(), 0)


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


def poison_data_dir(data_dir: str) -> dict[str, str]:
    """
    Write one file of every kind the agent loads at start, each holding
    something that cannot be loaded; their paths, by kind.
    """

    def write(relative: str, content: bytes) -> str:
        path = os.path.join(data_dir, relative)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with open(path, "wb") as f:
            f.write(content)
        return path

    def report(seq: int, key: str, payload: str) -> bytes:
        return ('{"seq":%d,"op":"put","entry":{"key":"%s","content_type":"application/json","payload":%s,'
                '"version":1,"updated_at":"2026-01-01T00:00:00Z"}}\n' % (seq, key, payload)).encode()

    good_job = {"id": "cron_0123456789ab", "schedule": "0 2 * * *", "image": "myapp:latest", "command": ["true"],
                "environment": {}, "volumes": {}, "networks": [], "created": 0.0, "last_run": None,
                "last_exit_code": None, "last_error": None}
    # Valid syntax, never fires: the job that used to keep the agent down.
    feb31 = {**good_job, "id": "cron_feb31feb31f", "schedule": "0 0 31 2 *"}
    write("uploads/up-1/chunk-000000", b"x")
    return {
        "state": write("state.json", b'{"metadata": {"region": "\\udc80"}}'),
        "reports": write("reports/reports.log", report(1, "good-1", '"a"') + report(2, "poison", '"\\udc80"')
                         + report(3, "nan", "NaN") + report(4, "good-2", '{"n": 2}')),
        "outbox": write("outbox.json", b'{"synced_seq": 1e400}'),
        "cron": write("cron-jobs.json", json.dumps({"version": 1, "jobs": [good_job, feb31]}).encode()),
        "upload": write("uploads/up-1/meta.json", b'{"total_chunks": NaN}'),
        "journal": write("extracting/0123456789abcdef", b"\xff\xfe"),
    }


def plant_special_files(data_dir: str) -> dict[str, str]:
    """
    Put a FIFO (or a link to /dev/zero) where each file the agent loads at
    start belongs: reading one would block forever (or never end).
    """

    def fifo(relative: str) -> str:
        path = os.path.join(data_dir, relative)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        os.mkfifo(path, 0o600)
        return path

    zero = os.path.join(data_dir, "reports", "reports.log")
    os.makedirs(os.path.dirname(zero), mode=0o700, exist_ok=True)
    os.symlink("/dev/zero", zero)
    return {
        "state": fifo("state.json"),
        "reports": zero,
        "outbox": fifo("outbox.json"),
        "cron": fifo("cron-jobs.json"),
        "upload": fifo("uploads/up-1/meta.json"),
        "journal": fifo("extracting/0123456789abcdef"),
    }


class PoisonedDataDirTests(DaemonCase):
    async def test_the_daemon_starts_and_serves_with_every_kind_of_poisoned_file(self) -> None:
        import treq

        from plexagent.testing import docker as docker_fixtures

        sim = ControlPlaneSimulator.example()
        await sim.start(reactor)
        self.addCleanup(lambda: defer.ensureDeferred(sim.stop()))
        self.sandbox.use_control_plane(sim)
        self.sandbox.document["control_plane"]["report_debounce"] = 0.05
        allowed = os.path.join(self.sandbox.root, "allowed")
        os.makedirs(allowed)
        port = docker_fixtures._free_port()
        self.sandbox.document["agent_api"].update(
            {"enabled": True, "listen": f"127.0.0.1:{port}", "allowed_paths": [allowed + "/"]}
        )
        self.sandbox.document["docker"] = {"host": docker_fixtures.docker_host()}
        poisoned = poison_data_dir(self.sandbox.data_dir)

        proc = self.spawn()
        await proc.wait_for_socket(self.sandbox.socket)
        client = unix_http_client(self.sandbox.socket)
        code, state = await json_response(await client.get(BASE + "/v1/state"))
        self.assertEqual(code, 200)
        self.assertEqual(state["report_keys"], [{"key": "good-1", "version": 1}, {"key": "good-2", "version": 1}])

        agent_api = f"http://127.0.0.1:{port}"
        headers = {"X-API-Key": self.sandbox.api_key}
        code, body = await json_response(
            await treq.get(agent_api + "/cron/jobs", headers=headers, persistent=False)
        )
        self.assertEqual((code, [job["id"] for job in body["jobs"]]), (200, ["cron_0123456789ab"]))
        code, _ = await json_response(
            await treq.get(agent_api + "/upload/tar/chunked", params={"chunk_id": "up-1"}, headers=headers,
                           persistent=False)
        )
        self.assertEqual(code, 404)

        # The good reports reach the control plane (outbox.json was set
        # aside: everything is resent) and a state fetch refills the cache.
        while sorted(sim.reported()) != ["good-1", "good-2"] or not state["metadata"]:
            await task.deferLater(reactor, 0.05, lambda: None)
            code, state = await json_response(await client.get(BASE + "/v1/state"))
        for kind, path in poisoned.items():
            if kind == "upload":
                path = os.path.dirname(path)
            directory, name = os.path.split(path)
            aside = [n for n in os.listdir(directory) if n.startswith(name + ".quarantined-")]
            self.assertEqual(len(aside), 1, f"{kind}: {os.listdir(directory)}")
            self.assertEqual(proc.output.count(path + " "), 1, f"{kind} is logged once with its path")


    async def test_the_daemon_starts_when_its_files_are_fifos_or_links_to_devices(self) -> None:
        import treq

        from plexagent.testing import docker as docker_fixtures

        sim = ControlPlaneSimulator.example()
        await sim.start(reactor)
        self.addCleanup(lambda: defer.ensureDeferred(sim.stop()))
        self.sandbox.use_control_plane(sim)
        allowed = os.path.join(self.sandbox.root, "allowed")
        os.makedirs(allowed)
        port = docker_fixtures._free_port()
        self.sandbox.document["agent_api"].update(
            {"enabled": True, "listen": f"127.0.0.1:{port}", "allowed_paths": [allowed + "/"]}
        )
        self.sandbox.document["docker"] = {"host": docker_fixtures.docker_host()}
        planted = plant_special_files(self.sandbox.data_dir)

        proc = self.spawn()
        await proc.wait_for_socket(self.sandbox.socket)
        client = unix_http_client(self.sandbox.socket)
        code, state = await json_response(await client.get(BASE + "/v1/state"))
        self.assertEqual((code, state["report_keys"]), (200, []))
        headers = {"X-API-Key": self.sandbox.api_key}
        agent_api = f"http://127.0.0.1:{port}"
        code, body = await json_response(await treq.get(agent_api + "/cron/jobs", headers=headers, persistent=False))
        self.assertEqual((code, body["jobs"]), (200, []))
        code, _ = await json_response(
            await treq.get(agent_api + "/upload/tar/chunked", params={"chunk_id": "up-1"}, headers=headers,
                           persistent=False)
        )
        self.assertEqual(code, 404)
        for kind, path in planted.items():
            if kind == "upload":
                path = os.path.dirname(path)
            directory, name = os.path.split(path)
            aside = [n for n in os.listdir(directory) if n.startswith(name + ".quarantined-")]
            self.assertEqual(len(aside), 1, f"{kind}: {os.listdir(directory)}")


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
