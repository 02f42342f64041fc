"""makeService builds the control-plane services from config (no network)."""

from __future__ import annotations

import base64
import os
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from plexagent.config import ConfigError, parse_config
from plexagent.service import makeService
from plexagent.testing.legacy_simulator import ControlPlaneSimulator
from tests.controlplane.harness import agent_config_document


class WiringTests(unittest.TestCase):
    def build(self, **cp: Any) -> Any:
        sim = ControlPlaneSimulator.example()
        document = agent_config_document(self.mktemp(), sim, **cp)
        document["control_plane"]["url"] = "http://127.0.0.1:9"
        return makeService(parse_config(document), MemoryReactorClock())

    def test_control_plane_services_follow_the_config(self) -> None:
        key = base64.b64encode(os.urandom(32)).decode()
        top = self.build(signing_public_key=key, reconcile_interval=12.0, heartbeat_interval=7.0,
                         report_debounce=3.0, events_idle_timeout=45.0)
        names = [s.name for s in top]
        self.assertEqual(names[-3:], ["state-sync", "heartbeat", "report-outbox"])
        agent = top.agent
        self.assertEqual(agent.sync.reconcile_interval, 12.0)
        self.assertEqual(agent.sync.stream.idle_timeout, 45.0)
        self.assertTrue(agent.sync.stream.verifier.verifying)
        self.assertEqual(agent.heartbeat.interval, 7.0)
        self.assertEqual(agent.outbox.debounce, 3.0)

    def test_events_false_means_no_stream(self) -> None:
        self.assertIsNone(self.build(events=False).agent.sync.stream)

    def test_without_a_signing_key_events_are_not_verified(self) -> None:
        self.assertFalse(self.build().agent.sync.stream.verifier.verifying)

    def test_malformed_signing_key_stops_startup_naming_the_key(self) -> None:
        e = self.assertRaises(ConfigError, self.build, signing_public_key="c2hvcnQ=")
        self.assertIn("control_plane.signing_public_key", str(e))

    def test_idle_timeout_must_be_positive(self) -> None:
        e = self.assertRaises(ConfigError, parse_config, {"control_plane": {"events_idle_timeout": 0}})
        self.assertIn("control_plane.events_idle_timeout", str(e))

    def test_standalone_has_no_control_plane_services(self) -> None:
        top = makeService(parse_config({"node": {"data_dir": self.mktemp()},
                                        "node_api": {"socket": "/tmp/x.sock"},
                                        "agent_api": {"enabled": False}}), MemoryReactorClock())
        self.assertNotIn("report-outbox", [s.name for s in top])
