"""The report store: optimistic locking, group commit, failure and recovery."""

from __future__ import annotations

import errno
import os
from typing import Any, Callable

from twisted.internet import defer, task
from twisted.trial import unittest

from plexagent import errors
from plexagent.node.reports import ReportStore


class ManualThreads:
    """Runs 'thread' work when the test says so, to observe batching."""

    def __init__(self) -> None:
        self.queue: list[tuple[Callable[..., Any], tuple[Any, ...], defer.Deferred[Any]]] = []
        self.fail_with: Exception | None = None

    def __call__(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.queue.append((f, args, d))
        return d

    def run_one(self) -> None:
        f, args, d = self.queue.pop(0)
        try:
            if self.fail_with is not None:
                raise self.fail_with
            result = f(*args)
        except Exception:
            d.errback()
        else:
            d.callback(result)


def sync_threads(f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(f, *args)


class ReportStoreTests(unittest.TestCase):
    def make(self, threads: Any = sync_threads, path: str | None = None) -> ReportStore:
        self.dir = path or self.mktemp()
        store = ReportStore(self.dir, task.Clock(), run_in_thread=threads)
        store.load()
        self.addCleanup(store.close)
        return store

    def log_lines(self) -> list[bytes]:
        with open(os.path.join(self.dir, "reports", "reports.log"), "rb") as f:
            return f.read().splitlines()

    def test_concurrent_writes_share_one_sync(self) -> None:
        threads = ManualThreads()
        store = self.make(threads)
        first = store.put("k0", "a", 0, None)
        rest = [store.put(f"k{i}", "a", i, None) for i in range(1, 11)]
        self.assertEqual(len(threads.queue), 1)
        threads.run_one()
        self.assertEqual(self.successResultOf(first)["key"], "k0")
        self.assertEqual(len(threads.queue), 1)  # all ten in the next batch
        for d in rest:
            self.assertNoResult(d)
        threads.run_one()
        self.assertEqual([self.successResultOf(d)["version"] for d in rest], [1] * 10)
        self.assertEqual(len(self.log_lines()), 11)

    def test_answer_waits_for_durability(self) -> None:
        threads = ManualThreads()
        store = self.make(threads)
        d = store.put("k", "a", 1, None)
        self.assertNoResult(d)
        threads.run_one()
        self.successResultOf(d)

    def test_failed_write_changes_nothing(self) -> None:
        threads = ManualThreads()
        store = self.make(threads)
        ok = store.put("k", "a", "old", None)
        threads.run_one()
        self.successResultOf(ok)
        threads.fail_with = errors.StorageFull("insufficient storage", "report log: no space left on device")
        failed = store.put("k", "a", "new", 1)
        queued = store.delete("k")
        threads.run_one()
        self.failureResultOf(failed, errors.StorageFull)
        self.failureResultOf(queued, errors.StorageFull)
        self.assertEqual(store.get("k")["payload"], "old")
        self.assertEqual(store.get("k")["version"], 1)
        threads.fail_with = None
        again = store.put("k", "a", "newer", 1)
        threads.run_one()
        self.assertEqual(self.successResultOf(again)["version"], 2)

    def test_disk_full_maps_to_storage_full_and_truncates(self) -> None:
        store = self.make()
        self.successResultOf(store.put("k", "a", 1, None))
        real_write = os.write
        calls = []

        def full(fd: int, data: Any) -> int:
            calls.append(1)
            real_write(fd, bytes(data)[:5])  # a torn partial record...
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(os, "write", full)
        self.failureResultOf(store.put("k", "a", 2, None), errors.StorageFull)
        self.patch(os, "write", real_write)
        # ...is cut off again: the log still parses and holds version 1.
        store.close()
        reloaded = self.make(path=self.dir)
        self.assertEqual(reloaded.get("k")["version"], 1)

    def test_torn_last_line_is_dropped_on_load(self) -> None:
        store = self.make()
        self.successResultOf(store.put("a", "t", 1, None))
        store.close()
        with open(os.path.join(self.dir, "reports", "reports.log"), "ab") as f:
            f.write(b'{"seq":2,"op":"put","entry":{"key":"b"')
        reloaded = self.make(path=self.dir)
        self.assertEqual(reloaded.list(), [{"key": "a", "version": 1}])
        self.successResultOf(reloaded.put("c", "t", 1, None))
        self.assertEqual(len(self.log_lines()), 2)

    def test_log_is_compacted(self) -> None:
        store = self.make()
        store.COMPACT_SLACK = 10
        for i in range(100):
            self.successResultOf(store.put(f"k{i % 3}", "t", i, None))
        self.successResultOf(store.delete("k0"))
        self.assertLessEqual(len(self.log_lines()), 3 + 10 + 1)
        store.close()
        reloaded = self.make(path=self.dir)
        self.assertEqual(reloaded.list(), store.list())
        self.assertEqual(reloaded.get("k1")["payload"], 97)
        # A re-created key continues from its last version.
        self.assertEqual(self.successResultOf(reloaded.put("k0", "t", 1, 0))["version"], 35)

    def test_changes_since_lists_latest_entries_and_deletes(self) -> None:
        store = self.make()
        self.successResultOf(store.put("a", "t", 1, None))
        mark = store.durable_seq
        self.successResultOf(store.put("b", "t", 1, None))
        self.successResultOf(store.put("b", "t", 2, None))
        self.successResultOf(store.put("c", "t", 1, None))
        self.successResultOf(store.delete("a"))
        changes = store.changes_since(mark)
        self.assertEqual([(e["key"], e["version"]) for e in changes.entries], [("b", 2), ("c", 1)])
        self.assertEqual(changes.deleted, ["a"])
        self.assertEqual(changes.upto, store.durable_seq)
        self.assertEqual(store.changes_since(changes.upto).entries, [])

    def test_changes_exclude_what_is_not_yet_durable(self) -> None:
        threads = ManualThreads()
        store = self.make(threads)
        store.put("a", "t", 1, None)
        self.assertEqual(store.changes_since(0).entries, [])
        threads.run_one()
        self.assertEqual(len(store.changes_since(0).entries), 1)

    def test_stale_if_match_raises_conflict_synchronously(self) -> None:
        store = self.make()
        self.successResultOf(store.put("a", "t", 1, None))
        self.assertRaises(errors.Conflict, store.put, "a", "t", 2, 5)
        self.assertRaises(errors.Conflict, store.delete, "a", 9)


class DurableBeforeVisibleTests(unittest.TestCase):
    """A change is seen by readers and the outbox only once it is on disk."""

    def setUp(self) -> None:
        self.threads = ManualThreads()
        self.store = ReportStore(self.mktemp(), task.Clock(), run_in_thread=self.threads)
        self.store.load()
        self.addCleanup(self.store.close)

    def test_a_put_is_not_readable_until_durable(self) -> None:
        d = self.store.put("k", "t", 1, None)
        self.assertRaises(errors.NotFound, self.store.get, "k")
        self.assertEqual(self.store.list(), [])
        self.threads.run_one()
        self.successResultOf(d)
        self.assertEqual(self.store.get("k")["version"], 1)

    def test_reads_serve_the_durable_entry_while_a_replacement_is_pending(self) -> None:
        self.store.put("k", "t", "old", None)
        self.threads.run_one()
        self.store.put("k", "t", "new", 1)
        self.assertEqual(self.store.get("k")["payload"], "old")
        self.assertEqual(self.store.changes_since(0).entries[0]["payload"], "old")

    def test_if_match_is_checked_against_the_newest_pending_version(self) -> None:
        self.store.put("k", "t", "a", 0)
        self.assertRaises(errors.Conflict, self.store.put, "k", "t", "b", 0)
        second = self.store.put("k", "t", "b", 1)
        self.threads.run_one()
        self.threads.run_one()
        self.assertEqual(self.successResultOf(second)["version"], 2)

    def test_a_delete_is_not_visible_until_durable(self) -> None:
        self.store.put("k", "t", 1, None)
        self.threads.run_one()
        self.store.delete("k", 1)
        self.assertEqual(self.store.get("k")["version"], 1)
        self.assertRaises(errors.NotFound, self.store.delete, "k")
        self.threads.run_one()
        self.assertRaises(errors.NotFound, self.store.get, "k")


class UnencodablePayloadTests(unittest.TestCase):
    """A value the log cannot hold is refused before anything changes."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.store = ReportStore(self.dir, task.Clock(), run_in_thread=sync_threads)
        self.store.load()
        self.addCleanup(self.store.close)
        self.successResultOf(self.store.put("good", "t", 1, None))

    def assert_refused_and_nothing_changed(self, payload: Any, content_type: str = "application/json") -> None:
        seq = self.store.durable_seq
        with self.assertRaises(errors.InvalidInput):
            self.store.put("k", content_type, payload, None)
        self.assertEqual(self.store.list(), [{"key": "good", "version": 1}])
        self.assertEqual(self.store.durable_seq, seq)
        # The store goes on: the next change is stored and synced as usual.
        self.assertEqual(self.successResultOf(self.store.put("k", "t", "fine", 0))["version"], 1)
        self.assertEqual(self.store.changes_since(seq).entries[0]["payload"], "fine")

    def test_a_lone_surrogate_in_the_payload_is_refused(self) -> None:
        self.assert_refused_and_nothing_changed({"msg": "bad \udc80 byte"})

    def test_nan_is_refused(self) -> None:
        self.assert_refused_and_nothing_changed({"load": float("nan")})

    def test_infinity_is_refused(self) -> None:
        self.assert_refused_and_nothing_changed([float("inf")])

    def test_a_lone_surrogate_in_the_content_type_is_refused(self) -> None:
        self.assert_refused_and_nothing_changed(1, content_type="text/\ud800")

    def test_the_error_names_where_the_bad_value_is(self) -> None:
        with self.assertRaises(errors.InvalidInput) as caught:
            self.store.put("k", "t", {"cpu": [1.0, float("nan")]}, None)
        self.assertEqual(caught.exception.message, "payload must be valid JSON")
        self.assertIn("payload.cpu[1]", caught.exception.details)

    def test_a_refused_value_never_reaches_the_log(self) -> None:
        self.assertRaises(errors.InvalidInput, self.store.put, "k", "t", "\ud800", None)
        self.store.close()
        reloaded = ReportStore(self.dir, task.Clock(), run_in_thread=sync_threads)
        reloaded.load()
        self.addCleanup(reloaded.close)
        self.assertEqual(reloaded.list(), [{"key": "good", "version": 1}])


class PoisonedLogTests(unittest.TestCase):
    """Records of the log that cannot be loaded are set aside; the rest loads."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.reports = os.path.join(self.dir, "reports")
        self.path = os.path.join(self.reports, "reports.log")
        store = ReportStore(self.dir, task.Clock(), run_in_thread=sync_threads)
        store.load()
        self.successResultOf(store.put("a", "t", 1, None))
        self.successResultOf(store.put("b", "t", 2, None))
        store.close()

    def load(self) -> ReportStore:
        store = ReportStore(self.dir, task.Clock(), run_in_thread=sync_threads)
        store.load()
        self.addCleanup(store.close)
        return store

    def insert(self, *records: bytes) -> None:
        """Put raw records between the first and the second line of the log."""
        with open(self.path, "rb") as f:
            first, rest = f.read().split(b"\n", 1)
        with open(self.path, "wb") as f:
            f.write(first + b"\n" + b"".join(r + b"\n" for r in records) + rest)

    def set_aside(self) -> list[bytes]:
        [name] = [n for n in os.listdir(self.reports) if ".quarantined-" in n]
        with open(os.path.join(self.reports, name), "rb") as f:
            return f.read().splitlines()

    def assert_poison_set_aside(self, *records: bytes) -> None:
        self.insert(*records)
        store = self.load()
        self.assertEqual(store.list(), [{"key": "a", "version": 1}, {"key": "b", "version": 1}])
        self.assertEqual(self.set_aside(), list(records))
        with open(self.path, "rb") as f:
            self.assertNotIn(records[0], f.read())
        # The store works on: a write is stored and loads again.
        self.successResultOf(store.put("c", "t", 3, None))
        store.close()
        self.assertEqual(len(self.load().list()), 3)

    def test_a_record_that_is_not_json_is_set_aside(self) -> None:
        self.assert_poison_set_aside(b'{"seq":9,"op":"put","entry":')

    def test_an_entry_whose_key_is_not_a_string_is_set_aside(self) -> None:
        self.assert_poison_set_aside(
            b'{"seq":9,"op":"put","entry":{"key":5,"content_type":"t","payload":1,"version":1,"updated_at":""}}'
        )

    def test_an_entry_with_a_lone_surrogate_is_set_aside(self) -> None:
        self.assert_poison_set_aside(
            b'{"seq":9,"op":"put","entry":{"key":"x","content_type":"t","payload":"\\udc80",'
            b'"version":1,"updated_at":""}}'
        )

    def test_a_key_with_a_lone_surrogate_is_set_aside(self) -> None:
        self.assert_poison_set_aside(b'{"seq":9,"op":"delete","key":"\\ud800","version":1}')

    def test_nan_and_overflowing_numbers_are_set_aside(self) -> None:
        self.assert_poison_set_aside(
            b'{"seq":9,"op":"put","entry":{"key":"x","content_type":"t","payload":NaN,"version":1,"updated_at":""}}',
            b'{"seq":10,"op":"put","entry":{"key":"y","content_type":"t","payload":1e400,"version":1,'
            b'"updated_at":""}}',
        )

    def test_records_of_the_wrong_types_are_set_aside(self) -> None:
        self.assert_poison_set_aside(
            b'{"seq":"9","op":"delete","key":"x","version":1}',
            b'{"seq":10,"op":"put","entry":{"key":"x","content_type":"t","payload":1,"version":"1",'
            b'"updated_at":""}}',
            b'{"seq":11,"op":"put","entry":{"key":"x","content_type":7,"payload":1,"version":1,"updated_at":""}}',
            b'{"seq":12,"op":"rename","key":"x"}',
            b"[1, 2]",
        )

    def test_a_log_that_is_a_directory_is_set_aside(self) -> None:
        os.unlink(self.path)
        os.makedirs(os.path.join(self.path, "inside"))
        store = self.load()
        self.assertEqual(store.list(), [])
        [aside] = [n for n in os.listdir(self.reports) if n.startswith("reports.log.quarantined-")]
        self.assertTrue(os.path.isdir(os.path.join(self.reports, aside, "inside")))
        self.successResultOf(store.put("c", "t", 3, None))

    def test_a_reports_directory_that_is_a_file_is_set_aside(self) -> None:
        import shutil

        shutil.rmtree(self.reports)
        with open(self.reports, "wb") as f:
            f.write(b"not a directory")
        store = self.load()
        self.successResultOf(store.put("c", "t", 3, None))
        [aside] = [n for n in os.listdir(self.dir) if n.startswith("reports.quarantined-")]
        with open(os.path.join(self.dir, aside), "rb") as f:
            self.assertEqual(f.read(), b"not a directory")


class QuotaTests(unittest.TestCase):
    """Entries count and bytes are bounded; only growth is refused."""

    def make(self, threads: Any = sync_threads, **quota: int) -> ReportStore:
        self.dir = getattr(self, "dir", None) or self.mktemp()
        store = ReportStore(self.dir, task.Clock(), run_in_thread=threads, **quota)
        store.load()
        self.addCleanup(store.close)
        return store

    def test_a_new_key_past_max_entries_is_refused_naming_the_limit(self) -> None:
        store = self.make(max_entries=2)
        self.successResultOf(store.put("a", "t", 1, None))
        self.successResultOf(store.put("b", "t", 1, None))
        with self.assertRaises(errors.TooLarge) as caught:
            store.put("c", "t", 1, None)
        self.assertEqual(caught.exception.message, "report quota exceeded")
        self.assertIn("node_api.max_report_entries (2)", caught.exception.details)
        self.assertEqual(len(store), 2)

    def test_an_existing_key_can_be_replaced_at_the_limit(self) -> None:
        store = self.make(max_entries=1)
        self.successResultOf(store.put("a", "t", 1, None))
        self.assertEqual(self.successResultOf(store.put("a", "t", 2, None))["version"], 2)

    def test_a_delete_makes_room(self) -> None:
        store = self.make(max_entries=1)
        self.successResultOf(store.put("a", "t", 1, None))
        self.successResultOf(store.delete("a"))
        self.successResultOf(store.put("b", "t", 1, None))

    def test_pending_writes_count_against_the_quota(self) -> None:
        threads = ManualThreads()
        store = self.make(threads, max_entries=2)
        store.put("a", "t", 1, None)
        store.put("b", "t", 1, None)
        self.assertRaises(errors.TooLarge, store.put, "c", "t", 1, None)

    def test_a_failed_write_gives_its_room_back(self) -> None:
        threads = ManualThreads()
        store = self.make(threads, max_entries=1)
        failed = store.put("a", "t", 1, None)
        threads.fail_with = errors.StorageFull("insufficient storage", "report log: no space left on device")
        threads.run_one()
        self.failureResultOf(failed, errors.StorageFull)
        threads.fail_with = None
        ok = store.put("b", "t", 1, None)
        threads.run_one()
        self.successResultOf(ok)

    def test_bytes_past_max_bytes_are_refused_naming_the_limit(self) -> None:
        store = self.make(max_bytes=1000)
        self.successResultOf(store.put("a", "t", "x" * 600, None))
        with self.assertRaises(errors.TooLarge) as caught:
            store.put("b", "t", "x" * 600, None)
        self.assertIn("node_api.max_report_bytes (1000)", caught.exception.details)
        # Replacing the entry by one of the same size does not grow the store.
        self.successResultOf(store.put("a", "t", "y" * 600, None))
        self.assertLessEqual(store.total_bytes, 1000)

    def test_over_a_lowered_quota_entries_can_still_shrink_and_go(self) -> None:
        store = self.make()
        for key in "abc":
            self.successResultOf(store.put(key, "t", "x" * 100, None))
        store.max_entries, store.max_bytes = 1, 10
        self.successResultOf(store.put("a", "t", "", None))
        self.successResultOf(store.delete("b"))
        self.assertRaises(errors.TooLarge, store.put, "b", "t", "", None)

    def test_the_quota_is_counted_again_after_a_restart(self) -> None:
        store = self.make(max_entries=2)
        self.successResultOf(store.put("a", "t", 1, None))
        self.successResultOf(store.put("b", "t", "x" * 50, None))
        size = store.total_bytes
        store.close()
        reloaded = self.make(max_entries=2)
        self.assertEqual(reloaded.total_bytes, size)
        self.assertRaises(errors.TooLarge, reloaded.put, "c", "t", 1, None)


class TombstoneTests(unittest.TestCase):
    """Deleted keys are remembered only as long as they must be: at most about max_entries of them."""

    def make(self, path: str | None = None, max_entries: int = 10) -> ReportStore:
        self.dir = path or self.mktemp()
        store = ReportStore(self.dir, task.Clock(), run_in_thread=sync_threads, max_entries=max_entries)
        store.load()
        self.addCleanup(store.close)
        return store

    def churn(self, store: ReportStore, count: int, prefix: str = "k") -> None:
        for i in range(count):
            self.successResultOf(store.put(f"{prefix}{i}", "a", i, None))
            self.successResultOf(store.delete(f"{prefix}{i}"))

    def test_creating_and_deleting_new_keys_keeps_tombstones_bounded(self) -> None:
        store = self.make()
        self.churn(store, 1000)
        self.assertLessEqual(len(store._tombstones), 10)
        self.assertLessEqual(len(store.changes_since(0).deleted), 10)

    def test_a_forgotten_key_comes_back_with_a_higher_version(self) -> None:
        store = self.make()
        for _ in range(3):
            self.successResultOf(store.put("k0", "a", 0, None))
            self.successResultOf(store.delete("k0"))
        self.churn(store, 100, prefix="other")
        self.assertNotIn("k0", store._tombstones)
        self.assertGreater(self.successResultOf(store.put("k0", "a", 1, 0))["version"], 3)

    def test_the_version_floor_survives_a_restart_after_compaction(self) -> None:
        path = self.mktemp()
        store = self.make(path)
        self.successResultOf(store.put("k0", "a", 0, None))
        self.successResultOf(store.put("k0", "a", 0, 1))
        self.successResultOf(store.delete("k0"))
        self.patch(ReportStore, "COMPACT_SLACK", 5)
        self.churn(store, 100, prefix="other")
        store.close()
        again = self.make(path)
        self.assertGreater(self.successResultOf(again.put("k0", "a", 1, 0))["version"], 2)

    def test_a_delete_the_control_plane_has_not_got_is_kept(self) -> None:
        store = self.make()
        store.synced(0)  # as the outbox does when there is a control plane
        self.churn(store, 50)
        self.assertEqual(len(store.changes_since(0).deleted), 50)
        store.synced(store.durable_seq)
        self.assertLessEqual(len(store._tombstones), 10)
