"""
Signed events end to end (simulator on loopback, agent in process): a
genuine event is applied; every forgery the protocol can meet is dropped
for its reason and changes nothing; the signing key rotates by event and by
state, the previous key verifying only inside its window. Written once,
run for every protocol (tests/controlplane/protocols.py).
"""

from __future__ import annotations

import base64
import os
from typing import Any

from plexagent.controlplane.protocol import DropReason
from plexagent.testing.simulator import ControlPlaneSimulator
from tests.controlplane.harness import AgentTestCase, eventually
from tests.controlplane.protocols import for_each_protocol


class Fixture:
    testcase_base = AgentTestCase

    async def connected(self, **cp: Any) -> tuple[ControlPlaneSimulator, Any]:
        sim = await self.start_sim()  # type: ignore[attr-defined]
        agent, _ = self.start_agent(sim, **cp)  # type: ignore[attr-defined]
        await eventually(lambda: sim.open_streams == 1, what="enrolled and streaming")
        self.seen: list[dict[str, str]] = []
        agent.cache.subscribe(lambda state: self.seen.append(dict(state.metadata)))
        return sim, agent

    async def pushed(self, sim: ControlPlaneSimulator, agent: Any, value: str, key: str = "current") -> None:
        """Push metadata ``value`` and wait until the agent has it."""
        sim.set_metadata({"v": value})
        sim.push_state(key)
        await eventually(lambda: agent.cache.current.metadata.get("v") == value, what=f"metadata {value}")

    def assertNeverApplied(self, forged: str = "yes") -> None:
        self.assertNotIn(forged, [m.get("forged") for m in self.seen])  # type: ignore[attr-defined]


@for_each_protocol()
class SignatureTests(Fixture):
    async def test_a_genuine_event_is_applied(self) -> None:
        sim, agent = await self.connected()
        await self.pushed(sim, agent, "genuine")
        self.assertEqual(sum(agent.sync.stream.applied.values()), 1)
        self.assertEqual(agent.sync.stream.dropped, {})

    async def forged(self, kind: str) -> None:
        sim, agent = await self.connected()
        sim.inject_event_fault(kind)
        await self.pushed(sim, agent, "after")
        self.assertNeverApplied()
        self.assertEqual(dict(agent.sync.stream.dropped), {self.protocol.drop_reasons[kind]: 1})  # type: ignore

    async def test_a_bad_signature_is_dropped(self) -> None:
        await self.forged("bad_signature")

    async def test_a_missing_signature_is_dropped(self) -> None:
        await self.forged("missing_signature")

    async def test_a_stale_event_is_dropped(self) -> None:
        await self.forged("stale")

    async def test_an_event_from_the_future_is_dropped(self) -> None:
        await self.forged("future")

    async def test_an_event_signed_by_an_unknown_key_is_dropped(self) -> None:
        await self.forged("unknown_key")

    async def test_a_malformed_envelope_is_dropped(self) -> None:
        await self.forged("malformed")

    async def test_a_registration_key_other_than_the_pin_stops_the_enrollment(self) -> None:
        sim = await self.start_sim()  # type: ignore[attr-defined]
        pin = base64.b64encode(os.urandom(32)).decode()
        agent, _ = self.start_agent(sim, signing_public_key=pin)  # type: ignore[attr-defined]
        await eventually(lambda: agent.link.identity_state == "failed", what="enrollment refused")
        self.assertIn("control_plane.signing_public_key", agent.link.identity_error)
        self.assertIsNone(agent.link.session)


@for_each_protocol(requires=frozenset({"nonce_replay"}))
class ReplayTests(Fixture):
    async def test_a_replayed_nonce_is_dropped(self) -> None:
        sim, agent = await self.connected()
        await self.pushed(sim, agent, "first")
        sim.inject_event_fault("replay")
        await self.pushed(sim, agent, "after")
        self.assertNeverApplied()
        self.assertEqual(dict(agent.sync.stream.dropped), {DropReason.REPLAY: 1})


@for_each_protocol(requires=frozenset({"state_signing_keys"}))
class StateRotationTests(Fixture):
    async def test_a_rotation_by_state_takes_effect_at_the_next_fetch(self) -> None:
        sim, agent = await self.connected(heartbeat_interval=0.2)
        new = sim.rotate_signing_key(via="state")
        sim.faults.heartbeat_reconcile = 1  # the control plane asks for a fetch
        await eventually(lambda: agent.link.ring.keys.current is not None
                         and agent.link.ring.keys.current.text == new, what="the new key from the state")
        await self.pushed(sim, agent, "signed-with-the-new-key")


@for_each_protocol()
class RotationTests(Fixture):
    async def test_a_rotation_by_event_takes_effect_at_once(self) -> None:
        sim, agent = await self.connected()
        new = sim.rotate_signing_key(via="event")
        await self.pushed(sim, agent, "signed-with-the-new-key")
        self.assertEqual(agent.link.ring.keys.current.text, new)
        self.assertEqual(agent.link.ring.rotations["event"], 1)

    async def test_the_previous_key_verifies_inside_its_window(self) -> None:
        sim, agent = await self.connected()
        sim.rotate_signing_key(via="event", transition=3600)
        await self.pushed(sim, agent, "signed-with-the-previous-key", key="previous")

    async def test_the_previous_key_does_not_verify_after_its_window(self) -> None:
        sim, agent = await self.connected()
        sim.rotate_signing_key(via="event", transition=-1)  # a window already over
        await eventually(lambda: agent.link.ring.keys.previous is not None, what="rotation applied")
        sim.set_metadata({"forged": "yes"})
        sim.push_state("previous")
        await self.pushed(sim, agent, "after")
        self.assertNeverApplied()
        self.assertEqual(dict(agent.sync.stream.dropped), {self.protocol.drop_reasons["unknown_key"]: 1})  # type: ignore
