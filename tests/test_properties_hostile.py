"""
Property tests for the parsers that see hostile input from the network:
event envelopes, Docker request shapes, tar member names, cron schedules
and ufw's status output. Whatever comes in, the answer is a value or the
project's own error, never a crash, and nothing escapes its root.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from plexagent import errors
from plexagent.controlplane import gojson
from plexagent.controlplane.gojson import GoTime
from plexagent.controlplane.keys import KeySet, SigningKey
from plexagent.controlplane.plexd_events import PlexdEventCodec, sign_plexd_event
from plexagent.controlplane.protocol import Dropped
from plexagent.host import cron, firewall
from plexagent.host.docker import specs
from plexagent.host.files import tarsafe
from plexagent.host.files.paths import PathPolicy

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=5)


NOW = 1_750_000_000 * 10**9


class EnvelopeProperties(unittest.TestCase):
    """Whatever an event stream carries, plexd's codec answers with a verdict, never a crash."""

    def setUp(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        raw = self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.keys = KeySet(SigningKey(raw))

    def verdict(self, data: bytes, codec: PlexdEventCodec | None = None) -> str:
        codec = codec or PlexdEventCodec()
        try:
            envelope = codec.decode(data)
            codec.verify(envelope, self.keys, NOW)
            codec.effect(envelope)
        except Dropped as dropped:
            return dropped.reason.value
        return "accept"

    @given(st.binary(max_size=300))
    def test_any_bytes_are_an_envelope_or_dropped(self, data: bytes) -> None:
        self.assertNotEqual(self.verdict(data), "accept")

    @given(json_objects, st.dictionaries(st.sampled_from(
        ["event_type", "event_id", "issued_at", "nonce", "signature", "payload"]), json_values))
    def test_any_json_object_is_an_envelope_or_dropped(self, base: dict, fields: dict) -> None:
        self.assertNotEqual(self.verdict(json.dumps({**base, **fields}).encode()), "accept")

    @settings(suppress_health_check=[HealthCheck.too_slow])
    @given(json_objects, st.text(min_size=1, max_size=12), st.text(min_size=1, max_size=12))
    def test_signed_envelopes_verify_and_any_change_to_the_payload_is_dropped(
        self, payload: dict, nonce: str, event_id: str
    ) -> None:
        issued = GoTime.from_unix_ns(NOW)
        assume("inf" not in repr(payload))  # a control plane cannot write Infinity
        wire, _ = sign_plexd_event(self.key, "node_secrets_updated", event_id, issued, nonce, gojson.marshal(payload))
        codec = PlexdEventCodec()
        self.assertIn(self.verdict(wire, codec), ("accept", "unusable_payload"))
        tampered, _ = sign_plexd_event(self.key, "node_secrets_updated", event_id, issued, nonce,
                                       gojson.marshal({**payload, "\u00e9x": 1}))
        original_signature = wire.rpartition(b',"signature":')[2]
        forged = tampered.rpartition(b',"signature":')[0] + b',"signature":' + original_signature
        self.assertEqual(self.verdict(forged), "bad_signature")
        # And the same envelope again is a replay.
        self.assertEqual(self.verdict(wire, codec), "replay")


class DockerSpecProperties(unittest.TestCase):
    def setUp(self) -> None:
        self.root = self.mktemp()
        os.makedirs(self.root)
        self.policy = PathPolicy([self.root + "/"])

    def refused_or_value(self, parse, *args) -> None:  # type: ignore[no-untyped-def]
        try:
            parse(*args)
        except (errors.InvalidInput, errors.Forbidden):
            pass

    @given(json_values)
    def test_ports(self, value: object) -> None:
        self.refused_or_value(specs.parse_ports, value)

    @given(st.lists(st.text(max_size=30), max_size=4) | json_values)
    def test_port_strings(self, value: object) -> None:
        self.refused_or_value(specs.parse_ports, value)

    @given(json_values)
    def test_environment(self, value: object) -> None:
        self.refused_or_value(specs.parse_environment, value)

    @given(json_values)
    def test_command(self, value: object) -> None:
        self.refused_or_value(specs.parse_command, value)

    @given(st.lists(st.text(max_size=40), max_size=4) | json_values)
    def test_volumes_never_name_a_host_path_outside_the_roots(self, value: object) -> None:
        try:
            volumes = specs.parse_volumes(value, self.policy)
        except (errors.InvalidInput, errors.Forbidden):
            return
        for source in volumes:
            if source.startswith("/"):
                self.assertTrue(self.policy.contains(os.path.realpath(source)), source)

    @given(json_objects)
    def test_whole_run_bodies(self, body: dict) -> None:
        self.refused_or_value(specs.parse_run, body, self.policy)


names = st.lists(
    st.sampled_from(["..", ".", "", "a", "b", "/", "etc", "\x00", "é"]), min_size=1, max_size=6
).map("/".join)


class TarMemberNameProperties(unittest.TestCase):
    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.tuples(names, st.sampled_from(["file", "dir", "symlink", "hardlink"]), names),
                    min_size=1, max_size=6))
    def test_no_member_lands_outside_extract_path(self, members: list) -> None:
        base = self.mktemp()
        root = os.path.join(base, "root")
        outside = os.path.join(base, "outside")
        os.makedirs(root)
        os.makedirs(outside)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for name, kind, target in members:
                info = tarfile.TarInfo(name or "x")
                if kind == "file":
                    info.size = 3
                    tar.addfile(info, io.BytesIO(b"abc"))
                    continue
                info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}[kind]
                info.linkname = target
                tar.addfile(info)
        buffer.seek(0)
        policy = PathPolicy([root + "/"])
        try:
            tarsafe.extract(buffer, policy, os.path.join(root, "x"), tarsafe.Limits(max_bytes=1 << 20, max_members=100))
        except errors.PlexError:
            pass
        self.assertEqual(os.listdir(outside), [])
        self.assertEqual(set(os.listdir(base)), {"root", "outside"})
        for directory, dirs, files in os.walk(root):
            for name in dirs + files:
                path = os.path.join(directory, name)
                if os.path.islink(path):
                    self.assertTrue(os.path.realpath(path).startswith(os.path.realpath(root) + "/"), path)


class CronScheduleProperties(unittest.TestCase):
    @given(json_values | st.text(alphabet="0123456789*/,- ", max_size=30))
    def test_any_schedule_is_valid_or_a_400(self, schedule: object) -> None:
        try:
            valid = cron.validate_schedule(schedule)
        except errors.InvalidInput:
            return
        self.assertGreater(cron.next_time(valid, 1_750_000_000.0), 1_750_000_000.0)


class UfwStatusProperties(unittest.TestCase):
    @given(st.lists(st.text(max_size=60), max_size=12))
    def test_any_output_parses_to_the_seed_shape(self, lines: list[str]) -> None:
        document = firewall.parse_status("\n".join(["Status: active", "", "To  Action  From", "--  ------  ----"] + lines))
        self.assertEqual(set(document), {"status", "rules"})
        for rule in document["rules"]:
            self.assertTrue({"action", "port", "protocol", "from_ip"} <= set(rule))

    @given(json_objects)
    def test_allow_bodies_are_a_rule_or_a_400(self, body: dict) -> None:
        try:
            firewall.parse_allow(body)
        except errors.InvalidInput:
            pass
