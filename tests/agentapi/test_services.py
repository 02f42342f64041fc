"""
Service Control: allowed units only, status and restart through a recording
fake ``systemctl`` on the agent's PATH (no init system runs here), 503
without systemd, and the agent's own restart answered before it is asked for.
"""

from __future__ import annotations

import datetime

from twisted.internet import defer, task
from twisted.trial import unittest

from plexagent import errors
from plexagent.host.programs import Programs
from plexagent.host.services import ServiceControl
from plexagent.host.systemd import Systemd
from plexagent.testing.docker import AgentClient
from plexagent.testing.ops import FakeSystemctl, start_agent


def _systemd_time(epoch: float) -> str:
    moment = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)
    return moment.strftime("%a %Y-%m-%d %H:%M:%S UTC")


class ServiceRoutesTests(unittest.TestCase):
    def setUp(self) -> None:
        from twisted.internet import reactor

        self.systemctl = FakeSystemctl(self)
        self.started = reactor.seconds() - 3600
        self.systemctl.add_unit(
            "nginx", ActiveState="active", SubState="running", UnitFileState="enabled",
            ActiveEnterTimestamp=_systemd_time(self.started),
        )
        self.systemctl.add_unit("docker", ActiveState="inactive", SubState="dead", UnitFileState="disabled",
                                ActiveEnterTimestamp="")
        self.systemctl.add_unit("node-agent", ActiveState="active", SubState="running", UnitFileState="enabled",
                                ActiveEnterTimestamp=_systemd_time(self.started))
        self.agent = start_agent(self, extra={"system": {"path": self.systemctl.path, "self_restart_delay": 0.0}})
        self.client = AgentClient(self.agent)

    @defer.inlineCallbacks
    def test_status_reports_active_enabled_and_uptime(self):
        code, body = yield self.client.get("/services/nginx/status")
        self.assertEqual(code, 200)
        self.assertEqual(body["service"], "nginx")
        self.assertIs(body["active"], True)
        self.assertIs(body["enabled"], True)
        self.assertTrue(3590 <= body["uptime"] <= 3700, body["uptime"])
        self.assertIn(["show", "nginx", "--property=LoadState,ActiveState,SubState,UnitFileState,ActiveEnterTimestamp"],
                      self.systemctl.calls())

    @defer.inlineCallbacks
    def test_status_of_an_inactive_unit_has_no_uptime(self):
        code, body = yield self.client.get("/services/docker/status")
        self.assertEqual(code, 200)
        self.assertEqual((body["active"], body["enabled"], body["uptime"]), (False, False, 0))

    @defer.inlineCallbacks
    def test_service_not_in_allowed_services_is_403_and_systemctl_is_not_run(self):
        code, body = yield self.client.post("/services/sshd/restart")
        self.assertEqual(code, 403)
        self.assertEqual(body["error"], "service not allowed")
        self.assertIn("nginx", body["details"])
        self.assertEqual(self.systemctl.calls(), [])

    @defer.inlineCallbacks
    def test_restart_runs_systemctl_restart_and_reports_status(self):
        code, body = yield self.client.post("/services/nginx/restart")
        self.assertEqual(code, 200)
        self.assertEqual((body["success"], body["service"], body["active"]), (True, "nginx", True))
        self.assertIn(["restart", "nginx"], self.systemctl.calls())

    @defer.inlineCallbacks
    def test_restarting_the_agent_itself_answers_first_then_asks_systemd(self):
        control = self.agent.top.agent.agent_services["service_control"]
        code, body = yield self.client.post("/services/node-agent/restart")
        self.assertEqual(code, 202)
        self.assertIs(body["restarting"], True)
        yield control.self_restart
        self.assertIn(["restart", "--no-block", "node-agent"], self.systemctl.calls())

    @defer.inlineCallbacks
    def test_an_allowed_service_that_systemd_does_not_know_is_404(self):
        self.systemctl.remove_unit("docker")
        for method, path in (("GET", "/services/docker/status"), ("POST", "/services/docker/restart")):
            code, body = yield self.client.call(method, path)
            self.assertEqual((code, body["error"]), (404, "service not found"), path)

    @defer.inlineCallbacks
    def test_without_systemd_status_and_restart_are_503(self):
        self.systemctl.set_mode("offline")
        for method, path in (("GET", "/services/nginx/status"), ("POST", "/services/nginx/restart"),
                             ("POST", "/services/node-agent/restart")):
            code, body = yield self.client.call(method, path)
            self.assertEqual(code, 503, path)
            self.assertEqual(body["error"], "systemd not available", path)


class MissingSystemctlTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_missing_systemctl_is_503_systemd_not_available(self):
        agent = start_agent(self, extra={"system": {"systemctl": ["no-such-systemctl-xyz"]}})
        code, body = yield AgentClient(agent).get("/services/nginx/status")
        self.assertEqual(code, 503)
        self.assertEqual(body["error"], "systemd not available")
        self.assertIn("no-such-systemctl-xyz", body["details"])


class _RecordingSystemd:
    def __init__(self) -> None:
        self.restarts: list[tuple[str, bool]] = []

    async def status(self, unit: str, now: float) -> dict:
        return {"active": True, "enabled": True, "uptime": 1}

    async def restart(self, unit: str, no_block: bool = False) -> None:
        self.restarts.append((unit, no_block))


class SelfRestartTests(unittest.TestCase):
    """The ordering of the agent's own restart, on a task.Clock."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.systemd = _RecordingSystemd()
        self.control = ServiceControl(self.systemd, ("nginx", "node-agent"), "node-agent", self.clock, 1.0)

    def test_self_restart_waits_for_the_answer_then_the_delay(self):
        answered: defer.Deferred[None] = defer.Deferred()
        result = self.successResultOf(defer.ensureDeferred(self.control.restart("node-agent", answered)))
        self.assertTrue(result["restarting"])
        self.clock.advance(10)
        self.assertEqual(self.systemd.restarts, [])
        answered.callback(None)
        self.clock.advance(0.9)
        self.assertEqual(self.systemd.restarts, [])
        self.clock.advance(0.1)
        self.assertEqual(self.systemd.restarts, [("node-agent", True)])

    def test_self_restart_still_happens_when_the_client_went_away(self):
        answered: defer.Deferred[None] = defer.Deferred()
        self.successResultOf(defer.ensureDeferred(self.control.restart("node-agent", answered)))
        answered.errback(ConnectionError("gone"))
        self.clock.advance(1)
        self.assertEqual(self.systemd.restarts, [("node-agent", True)])

    def test_other_units_restart_at_once(self):
        self.successResultOf(defer.ensureDeferred(self.control.restart("nginx")))
        self.assertEqual(self.systemd.restarts, [("nginx", False)])

    def test_unit_names_outside_the_list_are_forbidden(self):
        for name in ("sshd", "../nginx", "nginx;reboot", ""):
            self.failureResultOf(defer.ensureDeferred(self.control.status(name)), errors.Forbidden)


class SystemdParsingTests(unittest.TestCase):
    def test_systemd_timestamps_are_read_as_utc(self):
        from plexagent.host.systemd import parse_timestamp

        self.assertEqual(parse_timestamp("Mon 2026-11-23 15:00:00 UTC"), 1795446000.0)
        self.assertIsNone(parse_timestamp("n/a"))
        self.assertIsNone(parse_timestamp(""))

    def test_systemd_instance_is_built_from_programs(self):
        systemd = Systemd(Programs(task.Clock()), ("systemctl",))
        self.assertEqual(systemd.command, ("systemctl",))
