"""``plexagent version``, ``check-config``, ``state`` and ``report`` against a running agent."""

from __future__ import annotations

import io
import json

from twisted.internet import reactor, threads
from twisted.trial import unittest

from plexagent import __version__, cli
from plexagent.service import makeService
from plexagent.testing.fixtures import AgentSandbox


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
