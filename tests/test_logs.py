"""Structured JSON logs: one object a line, request fields, no credentials."""

from __future__ import annotations

import io
import json
import sys

from twisted.internet import defer, reactor
from twisted.logger import LogLevel, Logger, globalLogPublisher
from twisted.trial import unittest

from plexagent.logs import JSONLineObserver
from plexagent.testing import ControlPlaneSimulator
from plexagent.testing.fixtures import AgentSandbox, _ProcessWatcher, json_response, unix_http_client

BASE = "http://localhost"


class JSONLineObserverTests(unittest.TestCase):
    def test_request_event_becomes_one_json_line_with_its_fields(self) -> None:
        out = io.StringIO()
        observer = JSONLineObserver(out)
        Logger(namespace="t", observer=observer).info(
            "{method} {route} {status}", method="GET", route="/v1/state", status=200, request_id="r-1",
            duration_ms=1.5, listener="node_api.socket", token="must-not-appear",
        )
        record = json.loads(out.getvalue())
        self.assertEqual(out.getvalue().count("\n"), 1)
        self.assertEqual(record["message"], "GET /v1/state 200")
        self.assertEqual(record["level"], "info")
        self.assertEqual(
            {k: record[k] for k in ("method", "route", "status", "request_id", "duration_ms", "listener")},
            {"method": "GET", "route": "/v1/state", "status": 200, "request_id": "r-1", "duration_ms": 1.5,
             "listener": "node_api.socket"},
        )
        self.assertNotIn("must-not-appear", out.getvalue())

    def test_failures_carry_their_traceback(self) -> None:
        out = io.StringIO()
        try:
            1 / 0
        except ZeroDivisionError:
            Logger(observer=JSONLineObserver(out)).failure("boom")
        record = json.loads(out.getvalue())
        self.assertEqual(record["level"], "critical")
        self.assertIn("ZeroDivisionError", record["traceback"])


class DaemonLogTests(unittest.TestCase):
    async def test_requests_are_logged_as_json_with_id_route_status_and_no_secret(self) -> None:
        sim = ControlPlaneSimulator.example()
        await sim.start(reactor)
        self.addCleanup(lambda: defer.ensureDeferred(sim.stop()))
        sandbox = AgentSandbox(control_plane=sim)
        self.addCleanup(sandbox.cleanup)
        sandbox.document["node"]["access_log"] = True
        watcher = _ProcessWatcher()
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
                "--logger=plexagent.logs.json_observer", "plexagent", "--config", sandbox.write()]
        import os

        transport = reactor.spawnProcess(watcher, argv[0], argv, env=dict(os.environ))

        async def stop() -> None:
            if watcher.status is None:
                transport.signalProcess("TERM")
                await watcher.ended

        self.addCleanup(lambda: defer.ensureDeferred(stop()))
        from plexagent.testing.fixtures import AgentProcess

        probe = AgentProcess(sandbox.config_path)
        probe.watcher = watcher
        await probe.wait_for_socket(sandbox.socket)
        client = unix_http_client(sandbox.socket)
        while (await json_response(await client.get(BASE + "/v1/state/secrets")))[1] == []:
            from twisted.internet import task

            await task.deferLater(reactor, 0.05, lambda: None)
        response = await client.get(BASE + "/v1/state/secrets/db%2Fpassword", headers={"X-Request-Id": "abc-123"})
        self.assertEqual(response.headers.getRawHeaders(b"x-request-id"), [b"abc-123"])
        await json_response(response)
        await stop()
        lines = [line for line in bytes(watcher.output).decode().splitlines() if line.strip()]
        records = [json.loads(line) for line in lines]  # every line is JSON
        requests = [r for r in records if r.get("request_id") == "abc-123"]
        self.assertEqual(len(requests), 1)
        self.assertEqual(
            {k: requests[0][k] for k in ("method", "route", "status", "listener")},
            {"method": "GET", "route": "/v1/state/secrets/<path:key>", "status": 200, "listener": "node_api.socket"},
        )
        output = bytes(watcher.output).decode()
        for secret in ("s3cret-p@ssw0rd", sim.token, sim.nsk_b64):
            self.assertNotIn(secret, output)
