"""The report outbox: debounce, retry, durable position (task.Clock)."""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import task
from twisted.trial import unittest

from plexagent.controlplane.backoff import Backoff
from plexagent.controlplane.outbox import ReportOutbox
from plexagent.node.reports import ReportStore
from tests.controlplane.fakes import sync_thread, unavailable
from tests.controlplane.protocols import for_each_protocol


@for_each_protocol()
class OutboxTests:
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.dir = self.mktemp()
        self.client = self.protocol.fake_session()
        self.store = self.new_store()
        self.outbox = self.new_outbox()
        self.outbox.startService()

    def new_store(self) -> ReportStore:
        store = ReportStore(self.dir, self.clock, run_in_thread=sync_thread)
        store.load()
        self.addCleanup(store.close)
        return store

    def new_outbox(self) -> ReportOutbox:
        outbox = ReportOutbox(self.store, self.client.deliver_reports, self.clock, self.dir, debounce=5.0,
                              backoff=Backoff(rng=lambda: 1.0), run_in_thread=sync_thread)
        self.addCleanup(lambda: outbox.running and outbox.stopService())
        return outbox

    def put(self, key: str, payload: Any = 1) -> None:
        self.successResultOf(self.store.put(key, "application/json", payload, None))

    def test_changes_within_the_debounce_are_sent_as_one_request(self) -> None:
        self.put("a")
        self.clock.advance(2)
        self.put("b")
        self.put("a", 2)
        self.successResultOf(self.store.delete("b"))
        self.clock.advance(2.9)
        self.assertEqual(self.client.reports, [])
        self.clock.advance(0.1)
        self.assertEqual(len(self.client.reports), 1)
        entries, deleted, _ = self.client.reports[0]
        self.assertEqual([(e["key"], e["version"]) for e in entries], [("a", 2)])
        self.assertEqual(deleted, ["b"])

    def test_a_steady_stream_of_writes_does_not_postpone_the_sync(self) -> None:
        for _ in range(10):
            self.put("a")
            self.clock.advance(1)
        self.assertGreaterEqual(len(self.client.reports), 1)

    def test_success_makes_the_position_durable(self) -> None:
        self.put("a")
        self.clock.advance(5)
        self.client.reports[0][2].callback((200, None))
        self.assertEqual(self.outbox.depth, 0)
        with open(os.path.join(self.dir, "outbox.json")) as f:
            self.assertEqual(json.load(f), {"synced_seq": self.store.durable_seq})

    def test_changes_during_a_send_go_in_the_next_batch(self) -> None:
        self.put("a")
        self.clock.advance(5)
        self.put("b")
        self.client.reports[0][2].callback((200, None))
        self.clock.advance(5)
        entries, _, _ = self.client.reports[1]
        self.assertEqual([e["key"] for e in entries], ["b"])

    def test_failure_is_retried_with_backoff_and_nothing_is_lost(self) -> None:
        self.put("a")
        self.clock.advance(5)
        self.client.reports[0][2].errback(unavailable(503))
        self.put("b")
        self.assertEqual(self.outbox.depth, 2)
        self.clock.advance(0.99)
        self.assertEqual(len(self.client.reports), 1)
        self.clock.advance(0.01)
        self.client.reports[1][2].errback(unavailable(503))
        self.clock.advance(2)
        entries, _, d = self.client.reports[2]
        self.assertEqual([e["key"] for e in entries], ["a", "b"])
        d.callback((200, None))
        self.assertEqual(self.outbox.depth, 0)

    def test_429_retry_after_is_honoured(self) -> None:
        self.put("a")
        self.clock.advance(5)
        self.client.reports[0][2].errback(unavailable(429, retry_after=40))
        self.clock.advance(39.9)
        self.assertEqual(len(self.client.reports), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.client.reports), 2)

    def test_depth_counts_pending_keys(self) -> None:
        self.assertEqual(self.outbox.depth, 0)
        self.put("a")
        self.put("b")
        self.successResultOf(self.store.delete("a"))
        self.assertEqual(self.outbox.depth, 2)

    def test_changes_pending_before_a_restart_are_sent_at_start(self) -> None:
        self.put("a")
        self.clock.advance(5)
        self.client.reports[0][2].callback((200, None))
        self.put("b")
        self.outbox.stopService()
        self.store.close()
        # A new process: the log and outbox.json are all that survived.
        self.store = self.new_store()
        self.client = self.protocol.fake_session()
        outbox = self.new_outbox()
        outbox.startService()
        self.clock.advance(0)
        entries, _, _ = self.client.reports[0]
        self.assertEqual([e["key"] for e in entries], ["b"])

    def assert_position_set_aside(self, content: bytes) -> None:
        self.put("a")
        self.outbox.stopService()
        with open(os.path.join(self.dir, "outbox.json"), "wb") as f:
            f.write(content)
        outbox = self.new_outbox()
        outbox.startService()
        self.assertEqual(outbox.synced_seq, 0)
        [aside] = [n for n in os.listdir(self.dir) if n.startswith("outbox.json.quarantined-")]
        with open(os.path.join(self.dir, aside), "rb") as f:
            self.assertEqual(f.read(), content)
        self.clock.advance(0)
        entries, _, d = self.client.reports[-1]
        self.assertEqual([e["key"] for e in entries], ["a"])
        d.callback((200, None))
        with open(os.path.join(self.dir, "outbox.json")) as f:
            self.assertEqual(json.load(f), {"synced_seq": self.store.durable_seq})

    def test_an_unreadable_position_is_set_aside(self) -> None:
        self.assert_position_set_aside(b"{torn")

    def test_a_position_of_the_wrong_type_is_set_aside(self) -> None:
        for content in (b'{"synced_seq": "3"}', b'{"synced_seq": true}', b"[1]", b'{"synced_seq": -1}'):
            self.assert_position_set_aside(content)
            for name in os.listdir(self.dir):
                if ".quarantined-" in name:
                    os.unlink(os.path.join(self.dir, name))

    def test_a_position_with_nan_or_an_overflowing_number_is_set_aside(self) -> None:
        self.assert_position_set_aside(b'{"synced_seq": 1e400}')


@for_each_protocol()
class BacklogTests:
    """A long outage's backlog goes out in bounded requests, oldest first."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.dir = self.mktemp()
        self.client = self.protocol.fake_session()
        self.store = ReportStore(self.dir, self.clock, run_in_thread=sync_thread)
        self.store.load()
        self.addCleanup(self.store.close)
        self.outbox = ReportOutbox(self.store, self.client.deliver_reports, self.clock, self.dir, debounce=5.0,
                                   backoff=Backoff(rng=lambda: 1.0), max_batch=3, run_in_thread=sync_thread)
        self.outbox.startService()
        self.addCleanup(self.outbox.stopService)

    def test_backlog_is_sent_in_batches_back_to_back(self) -> None:
        for key in "abcdefg":
            self.successResultOf(self.store.put(key, "text/plain", key, None))
        self.successResultOf(self.store.delete("b"))
        self.clock.advance(5)
        sent = []
        while self.client.reports:
            entries, deleted, d = self.client.reports.pop(0)
            sent.append(([e["key"] for e in entries], deleted))
            d.callback((200, None))
            self.clock.advance(0)
        self.assertEqual(sent, [(["a", "c", "d"], []), (["e", "f", "g"], []), ([], ["b"])])
        self.assertEqual(self.outbox.depth, 0)

    def test_changes_since_with_limit_continues_where_it_stopped(self) -> None:
        for key in "abcde":
            self.successResultOf(self.store.put(key, "text/plain", key, None))
        first = self.store.changes_since(0, limit=2)
        second = self.store.changes_since(first.upto, limit=2)
        third = self.store.changes_since(second.upto, limit=2)
        self.assertEqual([[e["key"] for e in c.entries] for c in (first, second, third)],
                         [["a", "b"], ["c", "d"], ["e"]])
        self.assertEqual(third.upto, self.store.durable_seq)


class HeldWrites:
    """A run_in_thread whose writes the test completes or fails by hand."""

    def __init__(self) -> None:
        self.held: list[tuple[Any, tuple[Any, ...], Any]] = []

    def __call__(self, f: Any, *args: Any) -> Any:
        from twisted.internet import defer

        d: Any = defer.Deferred()
        self.held.append((f, args, d))
        return d

    def complete(self) -> None:
        f, args, d = self.held.pop(0)
        f(*args)
        d.callback(None)

    def fail(self) -> None:
        from plexagent.errors import StorageError

        _, _, d = self.held.pop(0)
        d.errback(StorageError("storage error", "disk on fire"))


class UndoneWriteTests(unittest.TestCase):
    """An acknowledged change hidden behind a newer one that fails is still synced."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.writes = HeldWrites()
        self.store = ReportStore(self.mktemp(), self.clock, run_in_thread=self.writes)
        self.store.load()
        self.addCleanup(self.store.close)

    def test_durable_version_is_reported_while_a_newer_one_is_in_flight(self) -> None:
        acked = self.store.put("k", "text/plain", "v1", None)
        self.writes.complete()
        self.assertEqual(self.successResultOf(acked)["version"], 1)
        newer = self.store.put("k", "text/plain", "v2", None)
        changes = self.store.changes_since(0)
        self.assertEqual([(e["key"], e["version"]) for e in changes.entries], [("k", 1)])
        self.writes.fail()
        self.failureResultOf(newer)
        # The outbox, having sent (and persisted) changes.upto, owes nothing
        # more for "k": its acknowledged version went out.
        self.assertEqual(self.store.changes_since(changes.upto).entries, [])
        self.assertEqual(self.store.get("k")["version"], 1)

    def test_durable_delete_is_reported_while_a_recreate_is_in_flight(self) -> None:
        self.store.put("k", "text/plain", "v1", None)
        self.writes.complete()
        self.store.delete("k")
        self.writes.complete()
        self.store.put("k", "text/plain", "again", None)
        changes = self.store.changes_since(0)
        self.assertEqual((changes.entries, changes.deleted), ([], ["k"]))

    def test_pending_then_committed_change_is_reported_once(self) -> None:
        self.store.put("k", "text/plain", "v1", None)
        self.store.put("j", "text/plain", "v1", None)  # rides in the next batch
        self.writes.complete()
        self.writes.complete()
        changes = self.store.changes_since(0)
        self.assertEqual(sorted(e["key"] for e in changes.entries), ["j", "k"])
        self.assertEqual(self.store._latest, {})


class RefusedChangeTests(unittest.TestCase):
    """A change the control plane refuses is found, set aside, and blocks nothing else."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.dir = self.mktemp()
        self.client = RefusingClient()
        self.store = ReportStore(self.dir, self.clock, run_in_thread=sync_thread)
        self.store.load()
        self.addCleanup(self.store.close)
        self.outbox = ReportOutbox(self.store, self.client.deliver_reports, self.clock, self.dir, debounce=5.0,
                                   backoff=Backoff(rng=lambda: 1.0), run_in_thread=sync_thread)
        self.outbox.startService()
        self.addCleanup(self.outbox.stopService)

    def put(self, key: str, payload: Any = 1) -> None:
        self.successResultOf(self.store.put(key, "application/json", payload, None))

    def sync(self) -> None:
        self.clock.advance(5)
        for _ in range(100):
            self.clock.advance(0)

    def refused_file(self) -> list[dict[str, Any]]:
        with open(os.path.join(self.dir, "outbox-refused.jsonl")) as f:
            return [json.loads(line) for line in f]

    def test_the_others_are_delivered_and_the_refused_one_set_aside(self) -> None:
        for key in "abcdefghij":
            self.put(key)
        self.successResultOf(self.store.delete("j"))
        self.client.refuse("e", 422)
        self.sync()
        self.assertEqual(sorted(self.client.delivered), list("abcdfghi"))
        self.assertEqual(self.client.deleted, ["j"])
        self.assertEqual(self.outbox.depth, 0)
        self.assertEqual(self.outbox.refused, 1)
        [kept] = self.refused_file()
        self.assertEqual((kept["key"], kept["op"], kept["status"], kept["entry"]["version"]), ("e", "put", 422, 1))

    def test_a_refused_change_is_not_retried(self) -> None:
        self.put("bad")
        self.client.refuse("bad")
        self.sync()
        posts = self.client.posts
        self.put("good")
        self.sync()
        self.assertEqual(self.client.delivered, ["good"])
        self.assertEqual(self.client.posts, posts + 1)

    def test_a_newer_version_of_a_refused_key_is_sent(self) -> None:
        self.put("k", "poison")
        self.client.refuse("k")
        self.sync()
        self.client.refused.clear()
        self.put("k", "fine")
        self.sync()
        self.assertEqual(self.client.delivered, ["k"])

    def test_a_refused_delete_is_set_aside_too(self) -> None:
        self.put("a")
        self.put("b")
        self.sync()
        self.successResultOf(self.store.delete("a"))
        self.put("c")
        self.client.refuse("a", 400)
        self.sync()
        self.assertEqual(self.client.delivered, ["a", "b", "c"])
        self.assertEqual([(r["op"], r["key"], r["entry"]) for r in self.refused_file()], [("delete", "a", None)])

    def test_a_control_plane_refusing_even_an_empty_batch_gets_retries_not_set_asides(self) -> None:
        self.put("a")
        self.client.refuse_everything = True
        self.sync()
        self.assertEqual(self.outbox.refused, 0)
        self.assertEqual(self.outbox.depth, 1)
        self.client.refuse_everything = False
        self.clock.advance(60)
        self.sync()
        self.assertEqual(self.client.delivered, ["a"])
        self.assertFalse(os.path.exists(os.path.join(self.dir, "outbox-refused.jsonl")))

    def test_auth_and_rate_limit_answers_are_retried_not_refusals(self) -> None:
        for status in (401, 403, 408, 429):
            self.put("a")
            self.client.refuse("a", status)
            self.sync()
            self.assertEqual(self.outbox.refused, 0, status)
            self.client.refused.clear()
            self.clock.advance(120)
            self.sync()
            self.assertEqual(self.outbox.depth, 0, status)


class RefusingClient:
    """Answers at once: refuses batches holding a refused key, accepts the rest."""

    def __init__(self) -> None:
        self.refused: dict[str, int] = {}
        self.refuse_everything = False
        self.delivered: list[str] = []
        self.deleted: list[str] = []
        self.posts = 0

    def refuse(self, key: str, status: int = 400) -> None:
        self.refused[key] = status

    def deliver_reports(self, changes: Any, set_aside: Any) -> Any:
        from plexagent.controlplane.delivery import deliver_batch

        return deliver_batch(self.send_report, changes, set_aside)

    def send_report(self, entries: list[Any], deleted: list[str]) -> Any:
        from twisted.internet import defer

        from plexagent.controlplane.protocol import Call

        self.posts += 1
        keys = [e["key"] for e in entries] + deleted
        if self.refuse_everything:
            return defer.fail(unavailable(400, call=Call.REPORT))
        for key in keys:
            if key in self.refused:
                return defer.fail(unavailable(self.refused[key], call=Call.REPORT))
        self.delivered += [e["key"] for e in entries]
        self.deleted += deleted
        return defer.succeed((200, None))
