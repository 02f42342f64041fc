"""
The simulator's interop script (``plexagent simulator --script interop``):
a fixed sequence of events for a client built from plexd's own code to
judge, covering what its verifier must accept and what it must reject.

At each registration the node gets key K1 and its first state fetch names
K2 (current) and K1 (previous, for an hour). Each node's first event stream
gets, in order: a K2 event; a pretty-printed multi-line payload with
``<&>``, U+2028, a duplicate member and the numbers ``1.0`` and ``2e3``; an
event whose ``issued_at`` is written with ``+00:00`` and trailing zeros; a
K1 event (previous key, inside its window); a ``signing_key_rotated`` to K3;
a K3 event; then the stream ends. Its second stream (after
``Last-Event-ID``) gets: a replayed nonce, a bad signature, a stale event, a
future event, a missing signature, a malformed envelope, and a last good
event. A client should accept the first six and the last, and reject the
others: 12 events to decide (the malformed one never reaches a verifier).
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from plexagent.controlplane.gojson import GoTime

#: Events a client decides over both streams (the malformed envelope is not one).
DECIDED_EVENTS = 12

PRETTY_PAYLOAD = ('{\n  "metadata": {\n    "note": "<b>Tom & Jerry</b> \u2028 line",\n    "note": "the second wins",\n'
                  '    "zone": "eu"\n  },\n  "data": [],\n  "numbers": [1.0, 2e3]\n}').encode("utf-8")


class InteropScript:
    """Drives ``sim`` as the module says."""

    def __init__(self, sim: Any) -> None:
        self.sim = sim
        sim.registration_hooks.append(self.registered)
        sim.stream_hooks.append(self.stream_opened)

    def registered(self, sim: Any, node: Any) -> None:
        # The registration answered with the current key (K1); from now on
        # the state names K2 as current and K1 as previous.
        k1 = sim.signing_key
        sim.previous_key, sim.signing_key = k1, Ed25519PrivateKey.generate()
        sim.transition_expires = sim.now() + 3600

    def stream_opened(self, sim: Any, stream: Any, node: Any) -> None:
        if node.streams == 1:
            self.first(sim)
            stream.end()
        elif node.streams == 2:
            self.second(sim)

    def first(self, sim: Any) -> None:
        sim.publish("node_state_updated", {"metadata": {"role": "gateway", "step": "current key"}, "data": []})
        sim.publish("node_state_updated", payload_raw=PRETTY_PAYLOAD)
        issued = GoTime.from_unix_ns(round(sim.now() * 1e9))
        y, mo, d, h, mi, s = issued.wall
        written = f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}.{issued.nsec:09d}000+00:00".encode()
        sim.publish("node_state_updated", {"metadata": {"step": "+00:00 with trailing zeros"}, "data": []},
                    issued=issued, wire_issued_at=written)
        sim.publish("node_state_updated", {"metadata": {"step": "previous key"}, "data": []},
                    sign_with=sim.previous_key)
        sim.rotate_signing_key(via="event", transition=3600)
        sim.publish("node_secrets_updated", {"secret_refs": [{"key": "tls/server.key", "version": 1}]})

    def second(self, sim: Any) -> None:
        forged = {"metadata": {"forged": "yes"}, "data": []}
        sim.publish("node_state_updated", forged, apply=False, replay_nonce=True)
        for kind in ("bad_signature", "stale", "future", "missing_signature", "malformed"):
            sim.inject_event_fault(kind)
        sim.publish("node_state_updated", {"metadata": {"role": "gateway", "step": "last"}, "data": []})
