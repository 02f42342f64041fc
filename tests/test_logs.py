"""Structured JSON logs: one object a line, request fields, no credentials."""

from __future__ import annotations

import io
import json
import sys
from typing import Any

from twisted.internet import defer, reactor
from twisted.logger import Logger, LogLevel
from twisted.trial import unittest

from plexagent.logs import JSONLineObserver, OneLineFailures, describe
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
            1 / 0  # noqa: B018 - a real exception to log
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
        sandbox = AgentSandbox()
        self.addCleanup(sandbox.cleanup)
        sandbox.enroll_with(sim)  # the bootstrap token and the node secret key it gets must stay out of the log
        bootstrap_token = sim.bootstrap_tokens[-1]
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
        self.assertEqual(len(sim.registrations), 1)
        for secret in ("s3cret-p@ssw0rd", sim.token, sim.nsk_b64, bootstrap_token):
            self.assertNotIn(secret, output)


class OneLineFailuresTests(unittest.TestCase):
    def render(self, emit: Any) -> str:
        from twisted.logger import textFileLogObserver

        out = io.StringIO()
        emit(Logger(namespace="t", observer=OneLineFailures(textFileLogObserver(out))))
        return out.getvalue()

    def test_a_failure_is_one_line_with_its_type_and_message(self) -> None:
        def emit(log: Logger) -> None:
            try:
                raise ValueError("bad\nvalue")
            except ValueError:
                log.failure("applying event {id} failed", id="7")

        text = self.render(emit)
        self.assertEqual(text.count("\n"), 1, text)
        self.assertTrue(text.rstrip().endswith("[t#critical] applying event 7 failed: ValueError: bad value"), text)

    def test_a_debug_failure_keeps_its_traceback(self) -> None:
        def emit(log: Logger) -> None:
            try:
                1 / 0  # noqa: B018 - a real exception to log
            except ZeroDivisionError:
                log.failure("detail", level=LogLevel.debug)

        self.assertIn("Traceback (most recent call last)", self.render(emit))

    def test_twisted_web_wrapped_failures_are_unwrapped(self) -> None:
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure
        from twisted.web.client import ResponseFailed

        wrapped = ResponseFailed([Failure(ConnectionLost("gone")), Failure(ConnectionLost("gone"))])
        self.assertEqual(describe(Failure(wrapped)), "ConnectionLost: Connection to the other side was lost in a "
                                                     "non-clean fashion: gone.")


class TwistdLogObserverTests(unittest.TestCase):
    def make(self, *twistd_args: str) -> Any:
        from twisted.application import service
        from twisted.scripts.twistd import ServerOptions

        from plexagent import tap

        sandbox = AgentSandbox()
        self.addCleanup(sandbox.cleanup)
        options = ServerOptions()
        options.parseOptions([*twistd_args, "-n", "--pidfile=", "plexagent", "--config", sandbox.write()])
        application = service.Application("plexagent")
        tap.makeService(options.subOptions).setServiceParent(application)
        from twisted.logger import ILogObserver

        return application.getComponent(ILogObserver, None)

    def test_twistds_text_log_gets_failures_on_one_line(self) -> None:
        self.assertIsInstance(self.make(), OneLineFailures)

    def test_an_explicit_logger_is_left_alone(self) -> None:
        self.assertIsNone(self.make("--logger=plexagent.logs.json_observer"))


class DaemonTextLogTests(unittest.TestCase):
    timeout = 60

    async def test_no_factory_lines_or_failure_reprs_across_requests_and_an_outage(self) -> None:
        from plexagent.testing.fixtures import AgentProcess

        sim = ControlPlaneSimulator.example()
        await sim.start(reactor)
        self.addCleanup(lambda: defer.ensureDeferred(sim.stop()))
        sandbox = AgentSandbox(control_plane=sim)
        self.addCleanup(sandbox.cleanup)
        proc = AgentProcess(sandbox.write(), reactor)  # twistd's default text log
        proc.start()
        self.addCleanup(lambda: defer.ensureDeferred(self.stop(proc)))
        await proc.wait_for_output("event stream connected")
        client = unix_http_client(sandbox.socket)
        secret = BASE + "/v1/state/secrets/db%2Fpassword"
        for _ in range(3):
            self.assertEqual((await json_response(await client.get(secret)))[0], 200)
        await sim.stop()  # the outage: pooled connections and the event stream are cut
        await proc.wait_for_output("event stream closed")
        self.assertEqual((await json_response(await client.get(secret)))[0], 503)
        await sim.start(reactor)
        self.assertEqual((await json_response(await client.get(secret)))[0], 200)
        await self.stop(proc)
        output = proc.output
        for noise in ("Starting factory", "Stopping factory", "<twisted.python.failure.Failure", "Traceback"):
            self.assertNotIn(noise, output)
        self.assertRegex(output, r"event stream closed: ConnectionLost: [^\n]*\n")

    async def stop(self, proc: Any) -> None:
        import signal

        proc.kill(signal.SIGTERM)
        await proc.wait()
