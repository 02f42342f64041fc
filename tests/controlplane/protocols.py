"""
The wire protocols the agent speaks, as the tests see them, and
``for_each_protocol``: a test written once as a mixin runs once per
protocol that has what it needs (no copies, no skips).

Each ``ProtocolCase`` names its simulator and what distinguishes it for the
tests (capabilities, the drop reason each forged event gets). A protocol
added to the agent adds one case here: every mixin then runs for it too.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import attrs
from twisted.trial import unittest

from plexagent.controlplane.protocol import DropReason
from plexagent.testing.simulator import ControlPlaneSimulator


@attrs.frozen
class ProtocolCase:
    name: str
    #: what the protocol has: "nonce_replay", "event_payloads", "batch_reports", "drift", "secret_index"
    capabilities: frozenset[str]
    #: the reason the agent drops each forged event the simulator can inject
    drop_reasons: dict[str, DropReason] = attrs.field(factory=dict, hash=False)

    def simulator(self, **options: Any) -> ControlPlaneSimulator:
        return ControlPlaneSimulator.example(protocol=self.name, **options)

    def fake_session(self) -> Any:
        """A session whose answers the test fires (task.Clock unit tests)."""
        from tests.controlplane.fakes import FakeSession

        return FakeSession()

    @property
    def forgeries(self) -> list[str]:
        return sorted(self.drop_reasons)


PLEXD = ProtocolCase(
    "plexd",
    frozenset({"nonce_replay", "event_payloads", "batch_reports", "drift", "secret_index"}),
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

PROTOCOLS: tuple[ProtocolCase, ...] = (PLEXD,)


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
