"""The node state cache: what it accepts, and how it loads its file."""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from plexagent.node.state import InvalidState, NodeState, StateCache

GOOD = {
    "metadata": {"region": "eu"},
    "data": [{"key": "a", "content_type": "text/plain", "payload": "1", "version": 1, "updated_at": ""}],
    "secret_refs": [{"key": "s", "version": 1}],
}


def sync_thread(f: Any, *args: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(f, *args)


class StateCacheLoadTests(unittest.TestCase):
    """A state.json that cannot be loaded is set aside; the cache starts empty."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "state.json")

    def load(self) -> StateCache:
        cache = StateCache(self.dir, run_in_thread=sync_thread)
        cache.load()
        return cache

    def set_aside(self) -> list[str]:
        return [n for n in os.listdir(self.dir) if n.startswith("state.json.quarantined-")]

    def assert_set_aside(self, content: bytes) -> None:
        with open(self.path, "wb") as f:
            f.write(content)
        cache = self.load()
        self.assertEqual(cache.current, NodeState())
        [aside] = self.set_aside()
        with open(os.path.join(self.dir, aside), "rb") as f:
            self.assertEqual(f.read(), content)
        # The next fetch is stored as usual.
        self.successResultOf(cache.replace(NodeState.from_document(GOOD)))
        self.assertEqual(self.load().current.metadata, {"region": "eu"})
        for name in self.set_aside():
            os.unlink(os.path.join(self.dir, name))

    def test_a_good_file_loads(self) -> None:
        with open(self.path, "w") as f:
            json.dump(GOOD, f)
        self.assertEqual(dict(self.load().current.secret_refs), {"s": 1})
        self.assertEqual(self.set_aside(), [])

    def test_a_file_that_is_not_json_is_set_aside(self) -> None:
        self.assert_set_aside(b'{"metadata": {"region": ')

    def test_a_file_of_the_wrong_types_is_set_aside(self) -> None:
        for doc in ({"metadata": {"region": 5}}, {"data": {}}, {"secret_refs": [{"key": "s", "version": "1"}]},
                    [GOOD]):
            self.assert_set_aside(json.dumps(doc).encode())

    def test_nan_an_overflowing_number_or_a_lone_surrogate_is_set_aside(self) -> None:
        for payload in (b"NaN", b"1e400", b'"\\udc80"'):
            self.assert_set_aside(b'{"data": [{"key": "a", "payload": %s, "version": 1}]}' % payload)

    def test_a_state_file_that_is_a_directory_is_set_aside(self) -> None:
        os.makedirs(self.path)
        cache = self.load()
        self.assertEqual(len(self.set_aside()), 1)
        self.successResultOf(cache.replace(NodeState.from_document(GOOD)))


class StateCacheBoundaryTests(unittest.TestCase):
    """The cache refuses a state it could neither store nor serve, and keeps what it had."""

    def test_a_state_json_cannot_carry_is_refused(self) -> None:
        cache = StateCache(self.mktemp(), run_in_thread=sync_thread)
        cache.load()
        self.successResultOf(cache.replace(NodeState.from_document(GOOD)))
        for bad in ({"data": [{"key": "a", "payload": float("nan"), "version": 1}]},
                    {"metadata": {"region": "\ud800"}}):
            with self.assertRaises(InvalidState):
                cache.replace(NodeState.from_document(bad))
            self.assertEqual(cache.current.metadata, {"region": "eu"})
