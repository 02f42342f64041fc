"""
The Go-made vectors (tests/controlplane/vectors, README there): every event
case is decided by the agent as plexd's own code decided it, the bytes it
verifies are the bytes Go signed, and the simulator's signer reproduces
Go's signatures.
"""

from __future__ import annotations

import base64
import json
import os
import re
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.trial import unittest

from plexagent.controlplane import gojson
from plexagent.controlplane.events import SSEParser
from plexagent.controlplane.gojson import GoTime
from plexagent.controlplane.keys import KeySet
from plexagent.controlplane.plexd_events import PlexdEventCodec, decode_envelope, sign_plexd_event, signed_bytes
from plexagent.controlplane.protocol import Dropped

VECTORS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vectors")


def load(name: str) -> Any:
    with open(os.path.join(VECTORS, name), encoding="utf-8") as f:
        return json.load(f)


EVENTS = load("plexd-events.json")["cases"]

#: Where the agent decides otherwise than plexd, and the rule it follows.
#: plexd's ed25519.Verify panics on a key that is not 32 bytes (its process
#: dies); the agent ignores such keys: with no usable key nothing verifies
#: (no_key), and when the usable one does not verify, the signature is bad.
AGENT_RULES = {
    "keylen-current-31": "no_key",
    "keylen-current-33": "no_key",
    "keylen-current-empty": "no_key",
    "keylen-previous-31-in-window": "bad_signature",
}


def ns(text: str) -> int:
    return GoTime.parse(text.encode()).unix_ns


def wire(event: dict[str, Any]) -> bytes:
    return base64.b64decode(event["wire_b64"])


def keys_of(case: dict[str, Any]) -> KeySet:
    keys = case["keys"]
    expires = GoTime.parse(keys["transition_expires"].encode()) if keys["transition_expires"] else None
    return KeySet.from_strings(keys["current"] or "", keys["previous"] or "", expires)


def decide(case: dict[str, Any]) -> list[str]:
    """The agent's verdict on each event of ``case`` (its ``preceding`` ones first), as the vectors label them."""
    codec = PlexdEventCodec()
    keys = keys_of(case)
    verdicts = []
    for event in [*case.get("preceding", []), case]:
        try:
            codec.verify(codec.decode(wire(event)), keys, ns(event["now"]))
            verdicts.append("accept")
        except Dropped as dropped:
            verdicts.append(dropped.reason.value)
    return verdicts


class EventVectorTests(unittest.TestCase):
    def test_there_are_163_cases(self) -> None:
        self.assertEqual(len(EVENTS), 163)

    def test_every_case_is_decided_as_plexd_decided_it(self) -> None:
        wrong = []
        for case in EVENTS:
            expected = [p["expected"] for p in case.get("preceding", [])] + [AGENT_RULES.get(case["name"],
                                                                                             case["expected"])]
            got = decide(case)
            if got != expected:
                wrong.append(f"{case['name']}: {got} != {expected}")
        self.assertEqual(wrong, [])

    def test_only_the_panic_cases_are_decided_differently(self) -> None:
        self.assertEqual(sorted(AGENT_RULES), sorted(c["name"] for c in EVENTS if c["expected"] == "panic"))

    def test_missing_fields_are_named_as_plexd_names_them(self) -> None:
        for case in EVENTS:
            if case["expected"] != "missing_field":
                continue
            codec = PlexdEventCodec()
            with self.assertRaises(Dropped) as caught:
                codec.verify(codec.decode(wire(case)), keys_of(case), ns(case["now"]))
            self.assertEqual(caught.exception.detail, case["missing_field"], case["name"])

    def test_the_verified_bytes_are_the_bytes_go_signed(self) -> None:
        checked = 0
        for case in EVENTS:
            if case["signed_over"] != "plexd canonical bytes":
                continue
            try:
                envelope = decode_envelope(wire(case))
            except Dropped:
                continue  # plexd does not get as far as verifying either
            try:
                message = signed_bytes(envelope.event_type, envelope.event_id, envelope.issued_at, envelope.nonce,
                                       envelope.payload_raw)
            except ValueError:
                self.assertEqual(case["name"], "ts-offset-plus-2400")  # Go cannot write that zone either
                continue
            self.assertEqual(message, base64.b64decode(case["signed_bytes_b64"]), case["name"])
            checked += 1
        self.assertGreaterEqual(checked, 120)

    def test_the_signer_reproduces_go_s_signatures(self) -> None:
        for case in EVENTS:
            if case["expected"] != "accept" or case["signed_over"] != "plexd canonical bytes":
                continue
            envelope = decode_envelope(wire(case))
            key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(case["seed_hex"]))
            assert envelope.issued_at is not None
            _, signed = sign_plexd_event(key, envelope.event_type, envelope.event_id, envelope.issued_at,
                                         envelope.nonce, envelope.payload_raw)
            self.assertEqual(key.sign(signed), gojson.std_b64decode(envelope.signature), case["name"])

    def test_the_two_worked_examples_of_the_protocol_description(self) -> None:
        for case in EVENTS[:2]:
            self.assertTrue(case["spec_signature_matches"])
            self.assertEqual(decide(case), ["accept"])
            envelope = decode_envelope(wire(case))
            self.assertEqual(signed_bytes(envelope.event_type, envelope.event_id, envelope.issued_at,
                                          envelope.nonce, envelope.payload_raw), case["signed_bytes"].encode())


SSE = load("plexd-sse.json")["cases"]
_ABBREVIATED = re.compile(r"(.{20})\.\.\.\((\d+) bytes\)", re.S)


def same_data(got: bytes, want: str) -> bool:
    """Data over 200 bytes is abbreviated in the vectors as its first 20 characters and its length."""
    m = _ABBREVIATED.fullmatch(want)
    if m is None:
        return got.decode("utf-8", "replace") == want
    return got[:20].decode("utf-8", "replace") == m.group(1) and len(got) == int(m.group(2))


class SSEVectorTests(unittest.TestCase):
    def test_there_are_28_cases(self) -> None:
        self.assertEqual(len(SSE), 28)

    def test_every_stream_yields_what_plexd_s_parser_yields_however_it_is_cut(self) -> None:
        wrong = []
        for case in SSE:
            stream = base64.b64decode(case["stream_b64"])
            for step in (max(len(stream), 1), 1, 7, 4096):
                parser = SSEParser()
                events = []
                for i in range(0, len(stream), step):
                    events += parser.feed(stream[i:i + step])
                ok = len(events) == len(case["events"]) and all(
                    e.type.decode() == w["type"] and e.id.decode() == w["id"] and same_data(e.data, w["data"])
                    for e, w in zip(events, case["events"], strict=False))
                if not ok or parser.last_event_id.decode() != case["last_event_id"]:
                    wrong.append(f"{case['name']} (chunks of {step})")
        self.assertEqual(wrong, [])
