"""
The wire protocols the agent speaks, as the tests see them, and
``for_each_protocol``: a test written once as a mixin runs once per
protocol that has what it needs (no copies, no skips).

Each ``ProtocolCase`` names its simulator and what distinguishes it for the
tests (capabilities, the drop reason each forged event gets). A protocol
added to the agent adds one case here: every mixin then runs for it too.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable
from urllib.parse import quote

import attrs
from twisted.trial import unittest

from plexagent.controlplane.protocol import DropReason
from plexagent.testing.simulator import ControlPlaneSimulator


@attrs.frozen
class ProtocolCase:
    name: str
    #: what the protocol has: "nonce_replay", "event_payloads", "batch_reports", "drift", "secret_index",
    #: "state_signing_keys" (the state names the signing keys), "report_versions" (the control plane sees the
    #: agent's report versions), "per_key_reports" (one call per report key), "node_key_rotation"
    #: (keys/rotate), "key_ids" (events name their signing key)
    capabilities: frozenset[str]
    #: the reason the agent drops each forged event the simulator can inject
    drop_reasons: dict[str, DropReason] = attrs.field(factory=dict, hash=False)
    #: a secret of the example node, named as the protocol's names go, and its value
    secret_key: str = "db/password"
    secret_value: bytes = b"s3cret-p@ssw0rd"
    #: the status with which the control plane refuses a report so that the agent drops it
    refused_report_status: int = 422
    #: data payloads travel as strings (non-strings as compact JSON)
    string_data: bool = False
    #: the members of a heartbeat, in order
    heartbeat_members: list[str] = attrs.field(factory=lambda: ["node_id", "timestamp", "status", "uptime",
                                                                  "binary_checksum"], hash=False)

    def simulator(self, **options: Any) -> ControlPlaneSimulator:
        return ControlPlaneSimulator.example(protocol=self.name, **options)

    def fake_session(self) -> Any:
        """A session whose answers the test fires (task.Clock unit tests)."""
        from tests.controlplane.fakes import FakeSession

        return FakeSession()

    @property
    def forgeries(self) -> list[str]:
        return sorted(self.drop_reasons)

    @property
    def secret_path(self) -> str:
        """``secret_key`` as a Local Node API path segment."""
        return quote(self.secret_key, safe="")

    def data_payload(self, payload: Any) -> Any:
        """What the agent serves as the payload of data the simulator was given as ``payload`` (``set_data``)."""
        if not self.string_data or isinstance(payload, str):
            return payload
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


PLEXD = ProtocolCase(
    "plexd",
    frozenset({"nonce_replay", "event_payloads", "batch_reports", "drift", "secret_index", "state_signing_keys",
               "report_versions"}),
    {
        "bad_signature": DropReason.BAD_SIGNATURE,
        "missing_signature": DropReason.MISSING_FIELD,
        "stale": DropReason.STALE,
        "future": DropReason.FUTURE,
        # plexd's keys have no ids: another key's signature is simply bad.
        "unknown_key": DropReason.BAD_SIGNATURE,
        "malformed": DropReason.INVALID_JSON,
        "replay": DropReason.REPLAY,
    },
)

PLEXSPHERE = ProtocolCase(
    "plexsphere",
    frozenset({"per_key_reports", "node_key_rotation", "key_ids"}),
    {
        "bad_signature": DropReason.BAD_SIGNATURE,
        "missing_signature": DropReason.MISSING_FIELD,
        "stale": DropReason.STALE,
        "future": DropReason.FUTURE,
        # Events name their key: an id the agent does not hold is unknown.
        "unknown_key": DropReason.UNKNOWN_KEY,
        "malformed": DropReason.INVALID_JSON,
    },
    secret_key="db-password",
    refused_report_status=400,
    string_data=True,
    heartbeat_members=["client_now", "binary_checksum", "binary_version", "nat_summary"],
)

PROTOCOLS: tuple[ProtocolCase, ...] = (PLEXD, PLEXSPHERE)


def for_each_protocol(requires: frozenset[str] = frozenset()) -> Callable[[type], type]:
    """
    Generate ``<Mixin>_<protocol>`` TestCase classes in the mixin's module,
    one per protocol having ``requires``, each with ``self.protocol`` set.
    The mixin's ``testcase_base`` (default trial's ``TestCase``) is their
    base; the mixin itself is not a TestCase, so it is never run alone.
    """

    def generate(mixin: type) -> type:
        module = sys.modules[mixin.__module__]
        base = getattr(mixin, "testcase_base", unittest.TestCase)
        for case in PROTOCOLS:
            if requires <= case.capabilities:
                name = f"{mixin.__name__}_{case.name}"
                setattr(module, name, type(name, (mixin, base), {"protocol": case, "__module__": mixin.__module__}))
        return mixin

    return generate
