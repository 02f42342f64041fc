"""The report store: optimistic locking, group commit, failure and recovery."""

from __future__ import annotations

import errno
import os
from typing import Any, Callable

from twisted.internet import defer, task
from twisted.trial import unittest

from plexagent import errors
from plexagent.reports import ReportStore


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
