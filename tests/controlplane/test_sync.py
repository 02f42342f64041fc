"""State sync, event stream, heartbeat: timing and behaviour with task.Clock."""

from __future__ import annotations

import json
import os
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import task
from twisted.trial import unittest

from plexagent.controlplane import gojson
from plexagent.controlplane.backoff import Backoff
from plexagent.controlplane.events import EventStream
from plexagent.controlplane.gojson import GoTime
from plexagent.controlplane.keys import KeyRing, KeySet
from plexagent.controlplane.plexd_events import PlexdEventCodec, sign_plexd_event
from plexagent.controlplane.protocol import DropReason, HeartbeatAnswer, PullState, ReplaceState
from plexagent.controlplane.sync import Heartbeat, StateSync
from plexagent.node.state import StateCache
from plexagent.testing.plexd_sim import public_b64
from tests.controlplane.fakes import FakeSession, FakeStreamResponse, fetched, sync_thread, unavailable

STATE = {
    "metadata": {"region": "eu"},
    "data": [{"key": "a", "content_type": "text/plain", "payload": "1", "version": 1, "updated_at": ""}],
    "secret_refs": [{"key": "s", "version": 1}],
}


SIGNER = Ed25519PrivateKey.generate()


def frame(event_type: str, payload: Any, event_id: str = "1", at: float = 0.0) -> bytes:
    """An event signed by SIGNER, issued at clock time ``at`` (a bytes payload goes as is)."""
    raw = payload if isinstance(payload, bytes) else gojson.marshal(payload)
    wire, _ = sign_plexd_event(SIGNER, event_type, event_id, GoTime.from_unix_ns(round(at * 1e9)),
                               f"nonce-{event_id}", raw)
    return f"id: {event_id}\nevent: {event_type}\ndata: ".encode() + wire + b"\n\n"


class BackoffTests(unittest.TestCase):
    def test_ceiling_doubles_from_one_second_up_to_the_cap(self) -> None:
        backoff = Backoff(rng=lambda: 1.0)
        delays = [backoff.next_delay() for _ in range(9)]
        self.assertEqual(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60])

    def test_full_jitter_spans_zero_to_the_ceiling(self) -> None:
        backoff = Backoff(rng=lambda: 0.0)
        self.assertEqual([backoff.next_delay() for _ in range(3)], [0, 0, 0])
        half = Backoff(rng=lambda: 0.5)
        self.assertEqual([half.next_delay() for _ in range(3)], [0.5, 1.0, 2.0])

    def test_jittered_delays_stay_within_bounds(self) -> None:
        backoff = Backoff()
        for n in range(40):
            self.assertTrue(0 <= backoff.next_delay() <= min(60, 2 ** n))

    def test_retry_after_is_a_floor(self) -> None:
        backoff = Backoff(rng=lambda: 0.1)
        self.assertEqual(backoff.next_delay(retry_after=7), 7)

    def test_reset_starts_over_at_one_second(self) -> None:
        backoff = Backoff(rng=lambda: 1.0)
        for _ in range(5):
            backoff.next_delay()
        backoff.reset()
        self.assertEqual(backoff.next_delay(), 1)


class SyncHarness(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.client = FakeSession()
        directory = self.mktemp()
        self.cache = StateCache(directory, run_in_thread=sync_thread)
        self.cache.load()
        self.ring = KeyRing(directory, run_in_thread=sync_thread)
        self.ring.install(KeySet.from_strings(public_b64(SIGNER)), "config")
        self.sync = StateSync(self.client, self.cache, self.ring, self.clock, Backoff(rng=lambda: 1.0),
                              reconcile_interval=60)

    def tearDown(self) -> Any:
        if self.sync.running:
            return self.sync.stopService()


class StateSyncTests(SyncHarness):
    def test_fetched_state_replaces_the_cache(self) -> None:
        self.sync.startService()
        self.client.fetches[0].callback(fetched(STATE))
        self.assertEqual(self.cache.current.metadata, {"region": "eu"})
        self.assertEqual(set(self.cache.current.data), {"a"})

    def test_failures_retry_with_backoff_then_reconcile_every_interval(self) -> None:
        self.sync.startService()
        self.client.fetches[0].errback(unavailable())
        self.clock.advance(0.99)
        self.assertEqual(len(self.client.fetches), 1)
        self.clock.advance(0.01)
        self.client.fetches[1].errback(unavailable())
        self.clock.advance(2)
        self.client.fetches[2].callback(fetched(STATE))
        self.clock.advance(59.9)
        self.assertEqual(len(self.client.fetches), 3)
        self.clock.advance(0.1)
        self.assertEqual(len(self.client.fetches), 4)

    def test_retry_after_on_503_is_honoured(self) -> None:
        self.sync.startService()
        self.client.fetches[0].errback(unavailable(503, retry_after=30))
        self.clock.advance(29.9)
        self.assertEqual(len(self.client.fetches), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.client.fetches), 2)

    def test_retry_after_on_429_is_honoured(self) -> None:
        self.sync.startService()
        self.client.fetches[0].errback(unavailable(429, retry_after=12))
        self.clock.advance(11.9)
        self.assertEqual(len(self.client.fetches), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.client.fetches), 2)

    def test_a_state_the_cache_cannot_store_is_retried_and_the_cache_kept(self) -> None:
        self.sync.startService()
        self.client.fetches[0].callback(fetched(STATE))
        self.clock.advance(60)
        self.client.fetches[1].callback(fetched({**STATE, "metadata": {"region": "\udc80"}}))
        self.assertEqual(self.cache.current.metadata, {"region": "eu"})
        self.clock.advance(1)
        self.assertEqual(len(self.client.fetches), 3)

    def test_failure_keeps_serving_the_cache(self) -> None:
        self.sync.startService()
        self.client.fetches[0].callback(fetched(STATE))
        self.clock.advance(60)
        self.client.fetches[1].errback(unavailable())
        self.assertEqual(self.cache.current.metadata, {"region": "eu"})

    def test_fetch_requested_during_a_fetch_runs_after_it(self) -> None:
        self.sync.startService()
        self.sync.fetch_now()
        self.assertEqual(len(self.client.fetches), 1)
        self.client.fetches[0].callback(fetched(STATE))
        self.assertEqual(len(self.client.fetches), 2)

    def test_fetch_answer_older_than_an_applied_event_is_fetched_again(self) -> None:
        self.sync.startService()
        self.sync.run(ReplaceState({"metadata": {"region": "us"}, "data": {}}), "event")
        self.client.fetches[0].callback(fetched(STATE))
        self.assertEqual(self.cache.current.metadata, {"region": "us"})
        self.client.fetches[1].callback(fetched({**STATE, "metadata": {"region": "us"}}))
        self.assertEqual(self.cache.current.metadata, {"region": "us"})


class StopDuringWriteTests(unittest.TestCase):
    def test_stopping_the_sync_does_not_cancel_the_write_of_a_fetched_state(self) -> None:
        from twisted.internet import defer

        held: list[tuple[Any, tuple[Any, ...], defer.Deferred[Any]]] = []

        def held_thread(f: Any, *args: Any) -> defer.Deferred[Any]:
            d: defer.Deferred[Any] = defer.Deferred()
            held.append((f, args, d))
            return d

        directory = self.mktemp()
        cache = StateCache(directory, run_in_thread=held_thread)
        cache.load()
        client = FakeSession()
        sync = StateSync(client, cache, KeyRing(directory, run_in_thread=sync_thread), task.Clock(),
                         Backoff(rng=lambda: 1.0))
        sync.startService()
        client.fetches[0].callback(fetched(STATE))
        self.successResultOf(sync.stopService())
        idle = cache.idle()
        self.assertNoResult(idle)
        f, args, d = held.pop(0)
        d.callback(f(*args))
        self.successResultOf(idle)
        with open(os.path.join(directory, "state.json")) as fh:
            self.assertEqual(json.load(fh)["metadata"], {"region": "eu"})


class EventStreamTests(SyncHarness):
    def setUp(self) -> None:
        super().setUp()
        self.stream = EventStream(
            self.client, PlexdEventCodec(), self.ring, self.clock, self.sync.run,
            on_reconnect=self.sync.fetch_now, idle_timeout=90, backoff=Backoff(rng=lambda: 1.0),
        )
        self.sync.stream = self.stream
        self.sync.startService()

    def connect(self, index: int = -1) -> FakeStreamResponse:
        response = FakeStreamResponse()
        self.client.streams[index][1].callback(response)
        return response

    def test_stream_starts_after_the_first_successful_fetch(self) -> None:
        self.assertEqual(self.client.streams, [])
        self.client.fetches[0].callback(fetched(STATE))
        self.assertEqual(len(self.client.streams), 1)

    def test_state_event_replaces_metadata_and_data(self) -> None:
        self.client.fetches[0].callback(fetched(STATE))
        response = self.connect()
        response.write(frame("node_state_updated", {"metadata": {"region": "us"}, "data": []}))
        self.assertEqual(self.cache.current.metadata, {"region": "us"})
        self.assertEqual(dict(self.cache.current.data), {})
        self.assertEqual(dict(self.cache.current.secret_refs), {"s": 1})

    def test_secrets_event_replaces_the_secret_index_only(self) -> None:
        self.client.fetches[0].callback(fetched(STATE))
        self.connect().write(frame("node_secrets_updated", {"secret_refs": [{"key": "t", "version": 4}]}))
        self.assertEqual(dict(self.cache.current.secret_refs), {"t": 4})
        self.assertEqual(self.cache.current.metadata, {"region": "eu"})

    def test_unknown_event_types_and_bad_payloads_change_nothing(self) -> None:
        self.client.fetches[0].callback(fetched(STATE))
        response = self.connect()
        response.write(frame("node_rebooted", {"why": "x"}, "1"))
        response.write(frame("node_state_updated", {"metadata": {"x": 1}, "data": []}, "2"))
        response.write(b"garbage\n\n")
        response.write(frame("node_secrets_updated", {"secret_refs": [{"key": "t", "version": 4}]}, "3"))
        self.assertEqual(self.cache.current.metadata, {"region": "eu"})
        self.assertEqual(dict(self.cache.current.secret_refs), {"t": 4})

    def test_an_event_the_cache_cannot_store_is_dropped(self) -> None:
        self.client.fetches[0].callback(fetched(STATE))
        response = self.connect()
        # Genuine, but JSON the cache cannot store (a lone surrogate).
        response.write(frame("node_state_updated", b'{"metadata":{"region":"\\ud800"},"data":[]}', "1"))
        self.assertEqual(self.cache.current.metadata, {"region": "eu"})
        self.assertEqual(self.stream.dropped, {DropReason.UNUSABLE_PAYLOAD: 1})
        response.write(frame("node_state_updated", {"metadata": {"region": "us"}, "data": []}, "2"))
        self.assertEqual(self.cache.current.metadata, {"region": "us"})

    def test_events_that_do_not_verify_are_dropped_and_counted_by_reason(self) -> None:
        self.client.fetches[0].callback(fetched(STATE))
        response = self.connect()
        response.write(frame("node_state_updated", {"metadata": {"region": "stale"}, "data": []}, "1", at=-301))
        response.write(b"id: 2\ndata: {not json\n\n")
        self.ring.install(KeySet.from_strings(public_b64(Ed25519PrivateKey.generate())), "state")
        response.write(frame("node_state_updated", {"metadata": {"region": "forged"}, "data": []}, "3"))
        self.assertEqual(self.cache.current.metadata, {"region": "eu"})
        self.assertEqual(self.stream.dropped, {DropReason.STALE: 1, DropReason.INVALID_JSON: 1,
                                               DropReason.BAD_SIGNATURE: 1})
        self.assertEqual(self.stream.applied, {})

    def test_a_failure_applying_one_event_costs_neither_the_stream_nor_the_next_event(self) -> None:
        self.client.fetches[0].callback(fetched(STATE))
        response = self.connect()
        run = self.stream._run
        calls: list[Any] = []

        def failing_once(effect: Any, origin: str) -> None:
            calls.append(effect)
            if len(calls) == 1:
                raise RuntimeError("a bug")
            run(effect, origin)

        self.stream._run = failing_once
        response.write(frame("node_state_updated", {"metadata": {"region": "lost"}, "data": []}, "1"))
        response.write(frame("node_state_updated", {"metadata": {"region": "us"}, "data": []}, "2"))
        self.assertEqual(self.cache.current.metadata, {"region": "us"})
        self.assertIsNotNone(response.protocol)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_drop_reconnects_with_last_event_id_and_reconciles(self) -> None:
        self.client.fetches[0].callback(fetched(STATE))
        response = self.connect()
        response.write(frame("node_rebooted", {}, "41"))
        response.write(b"id: 42\nevent: node_state_updated\ndata: {\"half")
        response.lose()
        self.clock.advance(1)
        self.assertEqual(self.client.streams[-1][0], "41")
        self.connect()
        self.assertEqual(len(self.client.fetches), 2)

    def test_a_clean_end_after_an_event_reconnects_at_once_ignoring_retry(self) -> None:
        self.client.fetches[0].callback(fetched(STATE))
        response = self.connect()
        response.write(b"retry: 5000\n\n")
        response.write(frame("node_rebooted", {}))
        response.lose()
        self.clock.advance(0)
        self.assertEqual(len(self.client.streams), 2)

    def test_a_connection_that_lived_30_seconds_counts_as_useful(self) -> None:
        self.client.fetches[0].callback(fetched(STATE))
        response = self.connect()
        self.clock.advance(30)
        response.lose()
        self.clock.advance(0)
        self.assertEqual(len(self.client.streams), 2)

    def test_a_connection_ending_before_any_event_backs_off(self) -> None:
        self.client.fetches[0].callback(fetched(STATE))
        self.connect().lose()
        self.clock.advance(0.9)
        self.assertEqual(len(self.client.streams), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.client.streams), 2)

    def test_an_over_long_line_closes_the_stream_and_backs_off(self) -> None:
        self.client.fetches[0].callback(fetched(STATE))
        response = self.connect()
        response.write(frame("node_rebooted", {}))
        response.write(b"data: " + b"x" * 70000)
        self.assertIsNone(response.protocol)
        self.clock.advance(0.9)
        self.assertEqual(len(self.client.streams), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.client.streams), 2)

    def test_repeated_connect_failures_back_off_honouring_retry_after(self) -> None:
        self.client.fetches[0].callback(fetched(STATE))
        self.client.streams[0][1].errback(unavailable(429, retry_after=20))
        self.clock.advance(19.9)
        self.assertEqual(len(self.client.streams), 1)
        self.clock.advance(0.1)
        self.client.streams[1][1].errback(unavailable())
        self.clock.advance(1.9)
        self.assertEqual(len(self.client.streams), 2)
        self.clock.advance(0.1)
        self.assertEqual(len(self.client.streams), 3)

    def test_silent_stream_is_dropped_after_the_idle_timeout(self) -> None:
        self.client.fetches[0].callback(fetched(STATE))
        response = self.connect()
        self.clock.advance(60)
        response.write(b": keep-alive\n\n")
        self.clock.advance(89)
        self.assertIsNotNone(response.protocol)
        self.clock.advance(1)
        self.assertIsNone(response.protocol)
        self.assertFalse(self.stream.connected)
        self.clock.advance(1)
        self.assertEqual(len(self.client.streams), 2)

    def test_stop_closes_the_stream_and_stops_reconnecting(self) -> None:
        self.client.fetches[0].callback(fetched(STATE))
        response = self.connect()
        d = self.sync.stopService()
        self.assertIsNone(response.protocol)
        self.successResultOf(d)
        self.clock.advance(120)
        self.assertEqual(len(self.client.streams), 1)


class HeartbeatTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(1_780_000_000)
        self.client = FakeSession()
        self.effects: list[Any] = []
        self.heartbeat = Heartbeat(self.client, self.clock, 30, lambda effect, origin: self.effects.append(effect))
        self.heartbeat.startService()
        self.addCleanup(self.heartbeat.stopService)

    def test_sent_at_start_then_every_interval(self) -> None:
        self.clock.advance(0)
        for i in range(3):
            self.client.heartbeats[i].callback(HeartbeatAnswer())
            self.clock.advance(29.9)
            self.assertEqual(len(self.client.heartbeats), i + 1)
            self.clock.advance(0.1)
        self.assertEqual(len(self.client.heartbeats), 4)

    def test_what_the_answer_asks_for_is_run(self) -> None:
        self.clock.advance(0)
        self.client.heartbeats[0].callback(HeartbeatAnswer((PullState(),)))
        self.assertEqual(self.effects, [PullState()])
        self.assertEqual(self.heartbeat.last_success, self.clock.seconds())

    def test_failure_waits_for_retry_after_when_longer_than_the_interval(self) -> None:
        self.clock.advance(0)
        self.client.heartbeats[0].errback(unavailable(429, retry_after=45))
        self.clock.advance(44.9)
        self.assertEqual(len(self.client.heartbeats), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.client.heartbeats), 2)
        self.assertEqual(self.heartbeat.failures, 1)


class FetchRequestDuringFailureTests(SyncHarness):
    def test_fetch_requested_during_a_failing_fetch_waits_for_the_backoff(self) -> None:
        self.sync.startService()
        self.sync.fetch_now()
        self.client.fetches[0].errback(unavailable(503, retry_after=10))
        self.assertEqual(len(self.client.fetches), 1)
        self.clock.advance(10)
        self.assertEqual(len(self.client.fetches), 2)
