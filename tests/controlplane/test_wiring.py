"""makeService builds the control-plane link from config (no network)."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from plexagent.config import ConfigError, parse_config
from plexagent.controlplane.gojson import GoTime
from plexagent.controlplane.plexd import PlexdLocalRules
from plexagent.controlplane.plexd_events import sign_plexd_event
from plexagent.controlplane.protocol import DropReason
from plexagent.service import makeService
from plexagent.testing.simulator import ControlPlaneSimulator
from tests.controlplane.fakes import FakeStreamResponse
from tests.controlplane.harness import agent_config_document


class WiringTests(unittest.TestCase):
    def document(self, enroll: bool = False, **cp: Any) -> dict[str, Any]:
        sim = ControlPlaneSimulator.example()
        document = agent_config_document(self.mktemp(), sim, enroll=enroll, **cp)
        document["control_plane"]["url"] = "http://127.0.0.1:9"
        return document

    def build(self, enroll: bool = False, **cp: Any) -> Any:
        return makeService(parse_config(self.document(enroll, **cp)), MemoryReactorClock())

    def started(self, enroll: bool = False, **cp: Any) -> Any:
        top = self.build(enroll, **cp)
        top.startService()
        self.addCleanup(top.stopService)
        return top

    def test_the_control_plane_link_starts_after_the_listeners(self) -> None:
        names = [s.name for s in self.build()]
        self.assertEqual(names[-1], "control-plane")
        self.assertLess(names.index("node_api.socket"), names.index("control-plane"))

    def test_a_configured_identity_starts_the_services_with_the_configured_intervals(self) -> None:
        top = self.started(reconcile_interval=12.0, heartbeat_interval=7.0, report_debounce=3.0,
                           events_idle_timeout=45.0)
        agent = top.agent
        self.assertEqual([s.name for s in agent.link], ["state-sync", "heartbeat", "report-outbox"])
        self.assertEqual(agent.sync.reconcile_interval, 12.0)
        self.assertEqual(agent.sync.stream.idle_timeout, 45.0)
        self.assertEqual(agent.heartbeat.interval, 7.0)
        self.assertEqual(agent.outbox.debounce, 3.0)
        self.assertEqual(agent.link.identity.source, "configured")
        self.assertEqual(agent.link.protocol.name, "plexd")
        self.assertIsInstance(agent.link.protocol.local_rules, PlexdLocalRules)

    def test_without_a_token_file_the_node_enrolls_and_its_services_wait_for_the_identity(self) -> None:
        agent = self.started(enroll=True).agent
        self.assertEqual(agent.link.identity_state, "enrolling")
        self.assertIsNone(agent.sync)
        self.assertEqual(list(agent.link), [])

    def test_before_the_node_has_an_identity_the_report_store_already_keeps_deletes_for_the_control_plane(self) -> None:
        # A standalone store may forget old deletes; one with a control plane
        # keeps them until the control plane has them, enrolled or not yet.
        agent = self.started(enroll=True).agent
        self.assertIsNone(agent.outbox)
        self.assertEqual(agent.reports._synced, 0)

    def test_without_any_bootstrap_token_the_node_waits_for_one(self) -> None:
        document = self.document(enroll=True)
        document["control_plane"]["bootstrap_token_file"] = "/nonexistent/bootstrap-token"
        top = makeService(parse_config(document), MemoryReactorClock())
        top.startService()
        self.addCleanup(top.stopService)
        self.assertEqual(top.agent.link.identity_state, "waiting_for_token")

    def test_events_false_means_no_stream(self) -> None:
        self.assertIsNone(self.started(events=False).agent.sync.stream)

    def test_without_a_signing_key_events_are_dropped_until_a_key_arrives(self) -> None:
        agent = self.started().agent
        self.assertIsNone(agent.link.ring.keys.current)
        stream = agent.sync.stream
        stream.started = True
        stream._opened(FakeStreamResponse())
        wire, _ = sign_plexd_event(Ed25519PrivateKey.generate(), "node_state_updated", "1",
                                   GoTime.from_unix_ns(round(stream.clock.seconds() * 1e9)), "n", b"{}")
        stream._received(stream._protocol, b"data: " + wire + b"\n\n")
        self.assertEqual(stream.dropped, {DropReason.NO_KEY: 1})
        self.assertEqual(stream.applied, {})

    def test_a_pinned_signing_key_is_the_first_key_of_a_configured_node(self) -> None:
        import base64

        key = base64.b64encode(bytes(range(32))).decode()
        agent = self.started(signing_public_key=key).agent
        self.assertEqual(agent.link.ring.keys.current.text, key)

    def test_malformed_signing_key_stops_startup_naming_the_key(self) -> None:
        e = self.assertRaises(ConfigError, self.build, signing_public_key="c2hvcnQ=")
        self.assertIn("control_plane.signing_public_key", str(e))

    def test_an_nsk_file_that_is_no_key_stops_startup_naming_the_key(self) -> None:
        document = self.document()
        with open(document["node"]["secret_key_file"], "w") as f:
            f.write("too short")
        e = self.assertRaises(ConfigError, makeService, parse_config(document), MemoryReactorClock())
        self.assertTrue(str(e).startswith("node.secret_key_file: must hold the 32-character node secret key"))
        self.assertNotIn("too short", str(e))

    def test_plexsphere_enrolls_with_the_protocol_s_own_session_and_rules(self) -> None:
        from plexagent.controlplane.plexsphere import PlexsphereProtocol

        document = self.document(enroll=True)
        document["control_plane"].update(protocol="plexsphere", project_id="1b4e28ba-2fa1-11d2-883f-0016d3cca427",
                                         resource_handle="edge-1")
        top = makeService(parse_config(document), MemoryReactorClock())
        self.assertIsInstance(top.agent.link.protocol, PlexsphereProtocol)

    def test_a_plexsphere_node_provisioned_in_advance_needs_a_uuid_node_id(self) -> None:
        document = self.document()
        document["control_plane"].update(protocol="plexsphere", project_id="1b4e28ba-2fa1-11d2-883f-0016d3cca427",
                                         resource_handle="edge-1")
        e = self.assertRaises(ConfigError, makeService, parse_config(document), MemoryReactorClock())
        self.assertIn('node.id: must be the node\'s UUID with protocol "plexsphere"', str(e))

    def test_idle_timeout_must_be_positive(self) -> None:
        e = self.assertRaises(ConfigError, parse_config, {"control_plane": {"events_idle_timeout": 0}})
        self.assertIn("control_plane.events_idle_timeout", str(e))

    def test_standalone_has_no_control_plane_link(self) -> None:
        top = makeService(parse_config({"node": {"data_dir": self.mktemp()},
                                        "node_api": {"socket": "/tmp/x.sock"},
                                        "agent_api": {"enabled": False}}), MemoryReactorClock())
        self.assertNotIn("control-plane", [s.name for s in top])
        self.assertIsNone(top.agent.link)
