"""``plexagent version``, ``check-config``, ``state`` and ``report`` against a running agent."""

from __future__ import annotations

import io
import json
import os
import socket
import sys

from twisted.internet import reactor, threads
from twisted.trial import unittest

from plexagent import __version__, cli
from plexagent.service import makeService
from plexagent.testing.fixtures import AgentProcess, AgentSandbox


def run(argv: list[str], stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(argv, stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


class VersionAndCheckConfigTests(unittest.TestCase):
    def setUp(self) -> None:
        self.sandbox = AgentSandbox()
        self.addCleanup(self.sandbox.cleanup)

    def test_version(self) -> None:
        self.assertEqual(run(["version"]), (0, f"plexagent {__version__}\n", ""))

    async def test_twistd_plexagent_version_is_plexagents(self) -> None:
        from twisted.internet import utils

        from twisted import copyright

        out, err, code = await utils.getProcessOutputAndValue(
            sys.executable, ["-c", "from twisted.scripts.twistd import run; run()", "plexagent", "--version"],
            env=dict(os.environ),
        )
        self.assertEqual((code, out.decode(), err), (0, f"plexagent {__version__} (Twisted {copyright.version})\n", b""))

    def test_check_config_accepts_a_good_file(self) -> None:
        self.assertEqual(run(["check-config", "--config", self.sandbox.write()]), (0, "configuration OK\n", ""))

    def test_check_config_reports_startups_one_line_error(self) -> None:
        self.sandbox.document["node_api"].update({"http_enabled": True, "http_token_file": "/nonexistent"})
        code, out, err = run(["check-config", "--config", self.sandbox.write()])
        self.assertEqual((code, out), (2, ""))
        self.assertEqual(
            err,
            "plexagent: configuration error: node_api.http_token_file: cannot read /nonexistent: "
            "No such file or directory\n",
        )

    def test_check_config_leaves_socket_activated_listeners_to_systemd(self) -> None:
        self.sandbox.document["node_api"]["socket"] = "systemd:domain=UNIX:index=0"
        code, out, _ = run(["check-config", "--config", self.sandbox.write()])
        self.assertEqual((code, out), (0, "configuration OK (socket-activated listeners not checked)\n"))


class CheckConfigBindTests(unittest.TestCase):
    """check-config tries every bind startup would make, says what startup would say, and keeps nothing."""

    def setUp(self) -> None:
        self.sandbox = AgentSandbox()
        self.addCleanup(self.sandbox.cleanup)

    def busy_port(self) -> int:
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        return busy.getsockname()[1]

    async def assert_startup_says(self, line: str) -> None:
        """The real daemon fails to start with ``line`` as its last log line."""
        proc = AgentProcess(self.sandbox.config_path, reactor)
        proc.start()
        self.assertNotEqual(await proc.wait(), 0)
        last = proc.output.strip().splitlines()[-1]  # after the log lines, its error (timestamped by twistd)
        self.assertTrue(last.endswith("] " + line.strip()), f"{last!r} does not end with {line!r}")

    async def test_a_port_in_use_is_reported_with_startups_line(self) -> None:
        self.sandbox.enable_http(f"127.0.0.1:{self.busy_port()}")
        code, out, err = run(["check-config", "--config", self.sandbox.write()])
        self.assertEqual((code, out), (2, ""))
        self.assertIn("node_api.http_listen: cannot listen: ", err)
        self.assertIn("Address already in use", err)
        await self.assert_startup_says(err)

    async def test_an_agent_api_port_in_use_is_reported_with_startups_line(self) -> None:
        self.sandbox.document["agent_api"].update({"enabled": True, "listen": f"127.0.0.1:{self.busy_port()}"})
        code, out, err = run(["check-config", "--config", self.sandbox.write()])
        self.assertEqual((code, out), (2, ""))
        self.assertIn("agent_api.listen: cannot listen: ", err)
        await self.assert_startup_says(err)

    async def test_a_socket_path_held_by_a_live_process_is_reported_with_startups_line(self) -> None:
        live = socket.socket(socket.AF_UNIX)
        live.bind(self.sandbox.socket)
        live.listen(1)
        self.addCleanup(live.close)
        code, out, err = run(["check-config", "--config", self.sandbox.write()])
        self.assertEqual(
            (code, out, err),
            (2, "", f"plexagent: node_api.socket: another process is listening on {self.sandbox.socket}\n"),
        )
        await self.assert_startup_says(err)

    async def test_a_socket_directory_that_cannot_be_created_is_reported_with_startups_line(self) -> None:
        blocker = os.path.join(self.sandbox.run_dir, "a-file")
        open(blocker, "w").close()
        self.sandbox.document["node_api"]["socket"] = os.path.join(blocker, "run", "api.sock")
        code, out, err = run(["check-config", "--config", self.sandbox.write()])
        self.assertEqual(
            (code, out, err),
            (2, "", f"plexagent: node_api.socket: cannot create {blocker}/run: Not a directory\n"),
        )
        await self.assert_startup_says(err)

    def test_a_socket_path_too_long_to_bind_is_reported(self) -> None:
        long_dir = os.path.join(self.sandbox.run_dir, "d" * 120)
        self.sandbox.document["node_api"]["socket"] = os.path.join(long_dir, "api.sock")
        code, out, err = run(["check-config", "--config", self.sandbox.write()])
        self.assertEqual((code, out), (2, ""))
        self.assertIn("plexagent: node_api.socket: cannot listen: ", err)
        self.assertFalse(os.path.exists(long_dir))

    def test_a_good_config_leaves_no_socket_and_no_directory_behind(self) -> None:
        socket_dir = os.path.join(self.sandbox.run_dir, "new", "dir")
        self.sandbox.document["node_api"]["socket"] = os.path.join(socket_dir, "api.sock")
        self.sandbox.enable_http("127.0.0.1:0")
        self.assertEqual(run(["check-config", "--config", self.sandbox.write()]), (0, "configuration OK\n", ""))
        self.assertEqual(os.listdir(self.sandbox.run_dir), [])

    def test_a_stale_socket_is_left_for_startup_to_replace(self) -> None:
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(self.sandbox.socket)
        stale.close()
        self.assertEqual(run(["check-config", "--config", self.sandbox.write()]), (0, "configuration OK\n", ""))
        self.assertTrue(os.path.exists(self.sandbox.socket))


class SocketCommandTests(unittest.TestCase):
    def setUp(self) -> None:
        self.sandbox = AgentSandbox()
        self.addCleanup(self.sandbox.cleanup)
        self.service = makeService(self.sandbox.config(), reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def cli(self, *argv: str, stdin: str = "") -> "threads.Deferred":
        # The CLI blocks; the agent it talks to runs on this reactor.
        return threads.deferToThread(run, [*argv, "--socket", self.sandbox.socket], stdin)

    async def test_report_put_get_list_delete(self) -> None:
        code, out, _ = await self.cli("report", "put", "health", "--payload", '{"status": "ok"}')
        self.assertEqual((code, json.loads(out)["version"]), (0, 1))
        code, out, _ = await self.cli("report", "put", "health", "--if-match", "1", stdin='{"status": "degraded"}')
        self.assertEqual(json.loads(out)["payload"], {"status": "degraded"})
        code, out, err = await self.cli("report", "put", "health", "--if-match", "1", "--payload", "1")
        self.assertEqual((code, json.loads(err)), (1, {"error": "version conflict"}))
        self.assertEqual(json.loads((await self.cli("report", "list"))[1]), [{"key": "health", "version": 2}])
        self.assertEqual(json.loads((await self.cli("report", "get", "health"))[1])["version"], 2)
        self.assertEqual((await self.cli("report", "delete", "health"))[0], 0)
        self.assertEqual((await self.cli("report", "get", "health"))[0], 1)

    async def test_state(self) -> None:
        code, out, _ = await self.cli("state")
        self.assertEqual((code, json.loads(out)["metadata"]), (0, {}))
        code, _, err = await self.cli("state", "metadata", "region")
        self.assertEqual((code, json.loads(err)), (1, {"error": "not found"}))

    async def test_unreachable_socket_is_a_clear_error(self) -> None:
        code, out, err = await threads.deferToThread(run, ["state", "--socket", "/nonexistent/api.sock"])
        self.assertEqual(code, 1)
        self.assertIn("cannot reach the agent at /nonexistent/api.sock", err)

    async def test_report_put_refuses_a_payload_that_is_not_strict_json_before_sending(self) -> None:
        for payload in ("NaN", "[1e400]", '"\\udc00"'):
            code, out, err = await self.cli("report", "put", "k", "--payload", payload)
            self.assertEqual((code, out), (2, ""), payload)
            self.assertIn("plexagent report put: the payload is not valid JSON: ", err)
        self.assertEqual(json.loads((await self.cli("report", "list"))[1]), [])
