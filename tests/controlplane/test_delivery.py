"""One batch of report changes in one request; a refused change is found by bisection and set aside."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from plexagent.controlplane.delivery import BatchDelivery
from plexagent.controlplane.protocol import Call, ControlPlaneError, ErrorKind, RefusedChange
from plexagent.node.reports import Changes


def entry(key: str, version: int = 1) -> dict[str, Any]:
    return {"key": key, "content_type": "application/json", "payload": 1, "version": version, "updated_at": ""}


def failure(kind: ErrorKind, status: int) -> ControlPlaneError:
    return ControlPlaneError(Call.REPORT, kind, f"report: control plane answered {status}", status=status)


class Refusing:
    """A control plane that refuses (REFUSED) any request holding a refused key."""

    def __init__(self) -> None:
        self.refused: dict[str, int] = {}
        self.refuse_everything = False
        self.transient: list[ControlPlaneError] = []
        self.requests: list[tuple[list[str], list[str]]] = []
        self.delivered: list[str] = []
        self.set_aside: list[RefusedChange] = []

    def post(self, entries: list[Any], deleted: list[str]) -> defer.Deferred[None]:
        keys = [e["key"] for e in entries] + list(deleted)
        self.requests.append(([e["key"] for e in entries], list(deleted)))
        if self.transient:
            return defer.fail(self.transient.pop(0))
        if self.refuse_everything:
            return defer.fail(failure(ErrorKind.REFUSED, 400))
        for key in keys:
            if key in self.refused:
                return defer.fail(failure(ErrorKind.REFUSED, self.refused[key]))
        self.delivered += keys
        return defer.succeed(None)

    def keep(self, change: RefusedChange) -> defer.Deferred[None]:
        self.set_aside.append(change)
        return defer.succeed(None)

    def deliver(self, changes: Changes) -> defer.Deferred[None]:
        return defer.ensureDeferred(BatchDelivery(self.post, self.keep).deliver(changes))


class BatchDeliveryTests(unittest.TestCase):
    def setUp(self) -> None:
        self.cp = Refusing()

    def test_an_accepted_batch_is_one_request(self) -> None:
        self.successResultOf(self.cp.deliver(Changes([entry("a"), entry("b")], ["c"], 3)))
        self.assertEqual(self.cp.requests, [(["a", "b"], ["c"])])

    def test_the_others_are_delivered_and_the_refused_one_set_aside(self) -> None:
        self.cp.refused["e"] = 422
        self.successResultOf(self.cp.deliver(Changes([entry(k) for k in "abcdefghi"], ["j"], 10)))
        self.assertEqual(sorted(self.cp.delivered), list("abcdfghij"))
        self.assertEqual(self.cp.set_aside, [RefusedChange("put", "e", entry("e"), 422)])

    def test_a_refused_delete_is_set_aside_too(self) -> None:
        self.cp.refused["gone"] = 400
        self.successResultOf(self.cp.deliver(Changes([entry("a")], ["gone"], 2)))
        self.assertEqual(self.cp.set_aside, [RefusedChange("delete", "gone", None, 400)])

    def test_an_empty_batch_is_probed_before_bisecting(self) -> None:
        self.cp.refused["x"] = 400
        self.successResultOf(self.cp.deliver(Changes([entry("x"), entry("y")], [], 2)))
        self.assertEqual(self.cp.requests[1], ([], []))

    def test_a_control_plane_refusing_even_an_empty_batch_is_a_transient_failure_setting_nothing_aside(self) -> None:
        self.cp.refuse_everything = True
        error = self.failureResultOf(self.cp.deliver(Changes([entry("a")], [], 1)), ControlPlaneError).value
        self.assertEqual((error.kind, error.status), (ErrorKind.TRANSIENT, 400))
        self.assertEqual(self.cp.set_aside, [])

    def test_a_transient_failure_during_the_search_fails_the_delivery(self) -> None:
        self.cp.refused["b"] = 400
        self.cp.transient = []
        original = self.cp.post
        calls = []

        def post(entries: list[Any], deleted: list[str]) -> defer.Deferred[None]:
            calls.append(None)
            if len(calls) == 3:
                return defer.fail(failure(ErrorKind.TRANSIENT, 503))
            return original(entries, deleted)

        self.cp.post = post  # type: ignore[method-assign]
        self.failureResultOf(self.cp.deliver(Changes([entry("a"), entry("b")], [], 2)), ControlPlaneError)
        self.assertEqual(self.cp.set_aside, [])
