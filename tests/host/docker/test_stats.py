"""
The container stats sampler: rounds on a clock, CPU% from two samples of
its own, containers that start or die between rounds, Docker unavailable,
and the bound on the pool's threads it takes. A fake Docker client stands
for the engine (the real one is in tests/agentapi/test_metrics.py).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task
from twisted.trial import unittest

from plexagent import errors
from plexagent.host.docker.stats import ContainerStatsSampler, container_entry, cpu_percent


def stats(used: int, system: int, online: int = 2, memory: int = 5000) -> dict[str, Any]:
    return {
        "id": "x",
        "cpu_stats": {"cpu_usage": {"total_usage": used}, "system_cpu_usage": system, "online_cpus": online},
        "precpu_stats": {"cpu_usage": {"total_usage": 0}},
        "memory_stats": {"usage": memory, "limit": 10000, "stats": {"inactive_file": 1000}},
    }


class FakeAPI:
    """docker-py's low-level API as the sampler uses it: a list and one-shot stats."""

    _version = "1.41"

    def __init__(self) -> None:
        self.running: dict[str, str] = {}
        #: container id -> CPU time (ns) it has used; grows by ``step`` a sample
        self.used: dict[str, int] = {}
        self.step = 1_000_000
        self.system = 0
        self.stats_calls: list[str] = []
        self.down = False
        #: containers Docker answers an empty body for (stopping)
        self.stopping: set[str] = set()

    def containers(self) -> list[dict[str, Any]]:
        if self.down:
            raise errors.Unavailable("docker unavailable", "connection refused")
        return [{"Id": cid, "Names": ["/" + name]} for cid, name in self.running.items()]

    def stats(self, container_id: str, stream: bool, one_shot: bool = False) -> dict[str, Any]:
        assert not stream and one_shot
        if container_id not in self.running:
            raise errors.NotFound("container not found")
        if container_id in self.stopping:
            raise ValueError("Expecting value: line 1 column 1 (char 0)")  # Docker's empty answer
        self.stats_calls.append(container_id)
        self.used[container_id] = self.used.get(container_id, 0) + self.step
        self.system += 10_000_000
        return stats(self.used[container_id], self.system)


class FakePool:
    """Runs each call at once, or, when ``hold`` is set, when the test releases it."""

    running = True

    def __init__(self) -> None:
        self.api = FakeAPI()
        self.api_client = type("Client", (), {"api": self.api})()
        self.hold = False
        self.held: list[tuple[defer.Deferred[Any], Any, tuple[Any, ...]]] = []

    def sampling_call(self, fn: Any, *args: Any) -> defer.Deferred[Any]:
        if self.hold:
            d: defer.Deferred[Any] = defer.Deferred()
            self.held.append((d, fn, args))
            return d
        try:
            return defer.succeed(fn(self.api_client, *args))
        except Exception:
            return defer.fail()

    def release(self) -> None:
        held, self.held = self.held, []
        for d, fn, args in held:
            try:
                d.callback(fn(self.api_client, *args))
            except Exception:
                d.errback()


class Watch:
    def __init__(self) -> None:
        self.on_event: list[Any] = []
        self.on_connect: list[Any] = []

    def fire(self, hooks: list[Any], *args: Any) -> None:
        for hook in list(hooks):
            hook(*args)


class Sampler(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.pool = FakePool()
        self.watch = Watch()
        self.sampler = ContainerStatsSampler(self.pool, self.clock, interval=10.0, concurrency=2, watch=self.watch)

    def start(self) -> None:
        self.sampler.startService()
        self.addCleanup(self.sampler.stopService)
        self.clock.advance(0)  # the first round begins once the reactor runs

    def test_nothing_is_sampled_before_the_reactor_runs(self) -> None:
        self.pool.api.running = {"a": "web"}
        self.sampler.startService()
        self.addCleanup(self.sampler.stopService)
        self.assertEqual(self.pool.api.stats_calls, [])
        self.assertEqual(self.sampler.view()["sampled_at"], None)

    def test_a_new_container_is_sampled_twice_and_gets_a_cpu_percent_from_the_two(self) -> None:
        self.pool.api.running = {"a": "web"}
        self.start()
        self.assertEqual(self.pool.api.stats_calls, ["a", "a"])
        view = self.sampler.view()
        # 1 ms of CPU over 10 ms of the host's CPU time on 2 CPUs: 20%.
        self.assertEqual(view["containers"]["web"]["cpu_percent"], 20.0)
        self.assertEqual(view["containers"]["web"]["memory"], {"usage": 4000, "limit": 10000, "percent": 40.0})
        self.assertEqual((view["pending"], view["docker"]), ([], True))
        self.assertEqual(view["sampled_at"], "1970-01-01T00:00:00Z")

    def test_a_known_container_is_sampled_once_a_round_every_interval(self) -> None:
        self.pool.api.running = {"a": "web"}
        self.start()
        self.clock.advance(9.9)
        self.assertEqual(len(self.pool.api.stats_calls), 2)
        self.clock.advance(0.1)
        self.assertEqual(len(self.pool.api.stats_calls), 3)
        self.assertEqual(self.sampler.view()["sampled_at"], "1970-01-01T00:00:10Z")

    def test_cpu_percent_follows_the_latest_two_samples(self) -> None:
        self.pool.api.running = {"a": "web"}
        self.start()
        self.pool.api.step = 5_000_000
        self.clock.advance(10)
        self.assertEqual(self.sampler.view()["containers"]["web"]["cpu_percent"], 100.0)

    def test_a_container_that_dies_is_dropped_at_once(self) -> None:
        self.pool.api.running = {"a": "web", "b": "db"}
        self.start()
        self.watch.fire(self.watch.on_event, {"Action": "die", "Actor": {"ID": "a", "Attributes": {"name": "web"}}})
        self.assertEqual(list(self.sampler.view()["containers"]), ["db"])

    def test_a_container_that_starts_between_rounds_is_sampled_at_once(self) -> None:
        self.start()
        self.pool.api.running = {"c": "new"}
        self.watch.fire(self.watch.on_event, {"Action": "start", "Actor": {"ID": "c", "Attributes": {"name": "new"}}})
        self.assertEqual(self.pool.api.stats_calls, ["c", "c"])
        self.assertIn("new", self.sampler.view()["containers"])

    def test_a_container_not_yet_sampled_twice_is_named_as_pending(self) -> None:
        self.pool.hold = True
        self.start()
        self.pool.release()  # the list: nothing runs yet
        self.pool.api.running = {"c": "new"}
        self.watch.fire(self.watch.on_event, {"Action": "start", "Actor": {"ID": "c", "Attributes": {"name": "new"}}})
        view = self.sampler.view()
        self.assertEqual((view["containers"], view["pending"]), ({}, ["new"]))

    def test_a_renamed_container_is_shown_under_its_new_name(self) -> None:
        self.pool.api.running = {"a": "web"}
        self.start()
        self.watch.fire(self.watch.on_event, {"Action": "rename", "Actor": {"ID": "a", "Attributes": {"name": "web2"}}})
        self.assertEqual(list(self.sampler.view()["containers"]), ["web2"])

    def test_a_container_gone_from_the_list_is_dropped_at_the_next_round(self) -> None:
        self.pool.api.running = {"a": "web", "b": "db"}
        self.start()
        del self.pool.api.running["a"]
        self.clock.advance(10)
        self.assertEqual(list(self.sampler.view()["containers"]), ["db"])

    def test_a_container_gone_between_the_list_and_its_sample_is_left_out(self) -> None:
        self.pool.hold = True
        self.pool.api.running = {"a": "web"}
        self.start()
        self.pool.release()  # the list
        self.pool.api.running = {}
        self.pool.release()  # its samples: not found
        view = self.sampler.view()
        self.assertEqual((view["containers"], view["pending"]), ({}, []))

    def test_a_container_docker_answers_nothing_for_is_left_out_quietly(self) -> None:
        self.pool.api.running = {"a": "web", "b": "db"}
        self.pool.api.stopping = {"a"}
        self.start()  # a failure logged would fail this test
        view = self.sampler.view()
        self.assertEqual((list(view["containers"]), view["pending"]), (["db"], []))

    def test_docker_unavailable_is_said_and_the_samples_are_dropped(self) -> None:
        self.pool.api.running = {"a": "web"}
        self.start()
        self.pool.api.down = True
        self.clock.advance(10)
        view = self.sampler.view()
        self.assertEqual((view["docker"], view["docker_error"], view["containers"]), (False, "connection refused", {}))
        self.pool.api.down = False
        self.clock.advance(10)
        view = self.sampler.view()
        self.assertEqual((view["docker"], list(view["containers"])), (True, ["web"]))
        self.assertNotIn("docker_error", view)

    def test_at_most_concurrency_calls_are_on_the_pool_at_once(self) -> None:
        self.pool.hold = True
        self.pool.api.running = {str(i): f"c{i}" for i in range(5)}
        self.start()
        self.pool.release()  # the list
        waves = []
        while self.pool.held:
            waves.append(len(self.pool.held))
            self.pool.release()
        self.assertEqual(waves, [2, 2, 1])
        self.assertEqual(len(self.sampler.view()["containers"]), 5)

    def test_one_round_at_a_time(self) -> None:
        self.pool.hold = True
        self.start()
        self.watch.fire(self.watch.on_connect)
        self.clock.advance(0)
        self.assertEqual(len(self.pool.held), 1)

    def test_a_reconnected_event_watch_starts_a_round_at_once(self) -> None:
        self.pool.api.running = {"a": "web"}
        self.start()
        self.watch.fire(self.watch.on_connect)
        self.clock.advance(0)
        self.assertEqual(len(self.pool.api.stats_calls), 3)

    def test_rounds_are_counted_and_the_latest_timed(self) -> None:
        self.pool.hold = True
        self.start()
        self.clock.advance(3)
        self.pool.release()  # the list; no container
        self.assertEqual((self.sampler.rounds, self.sampler.last_round_seconds), (1, 3.0))

    def test_next_round_fires_when_a_round_has_ended(self) -> None:
        self.start()
        d = self.sampler.next_round()
        self.assertNoResult(d)
        self.clock.advance(10)
        self.successResultOf(d)

    def test_stopping_cancels_the_next_round_and_unhooks(self) -> None:
        self.start()
        self.sampler.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual((self.watch.on_event, self.watch.on_connect), ([], []))


class CPUPercent(unittest.TestCase):
    def test_two_samples_give_the_share_of_the_host_cpu_time_times_the_cpus(self) -> None:
        self.assertEqual(cpu_percent(stats(1_000_000, 10_000_000), stats(3_000_000, 20_000_000)), 40.0)

    def test_a_restarted_container_has_no_cpu_percent_until_its_next_sample(self) -> None:
        self.assertIsNone(cpu_percent(stats(5_000_000, 10_000_000), stats(1_000_000, 20_000_000)))
        self.assertIsNone(container_entry("web", stats(5_000_000, 10_000_000), stats(1_000_000, 20_000_000)))

    def test_the_entry_has_the_seed_s_figures(self) -> None:
        current = stats(2_000_000, 20_000_000)
        current["networks"] = {"eth0": {"rx_bytes": 10, "tx_bytes": 20}, "eth1": {"rx_bytes": 1, "tx_bytes": 2}}
        current["blkio_stats"] = {"io_service_bytes_recursive": [{"op": "read", "value": 7},
                                                                  {"op": "write", "value": 9}]}
        current["pids_stats"] = {"current": 3}
        entry = container_entry("app", stats(1_000_000, 10_000_000), current)
        assert entry is not None
        self.assertEqual(entry["cpu_percent"], 20.0)
        self.assertEqual(entry["memory"], {"usage": 4000, "limit": 10000, "percent": 40.0})
        self.assertEqual(entry["network"], {"rx_bytes": 11, "tx_bytes": 22})
        self.assertEqual(entry["block_io"], {"read_bytes": 7, "write_bytes": 9})
        self.assertEqual(entry["pids"], 3)


class FirstListing(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.pool = FakePool()
        self.pool.hold = True
        self.sampler = ContainerStatsSampler(self.pool, self.clock, interval=10.0, concurrency=2)
        self.sampler.startService()
        self.addCleanup(self.sampler.stopService)
        self.clock.advance(0)

    def test_before_docker_answers_the_view_says_so(self) -> None:
        view = self.sampler.view()
        self.assertEqual((view["docker"], view["containers"], view["sampled_at"]), (False, {}, None))
        self.assertIn("first listing", view["docker_error"])

    def test_first_listing_fires_when_docker_has_listed_the_containers(self) -> None:
        self.pool.api.running = {"a": "web"}
        d = self.sampler.first_listing(timeout=2.0)
        self.assertNoResult(d)
        self.pool.release()
        self.successResultOf(d)
        view = self.sampler.view()
        self.assertEqual((view["docker"], view["containers"], view["pending"]), (True, {}, ["web"]))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_first_listing_fires_when_docker_refuses(self) -> None:
        self.pool.api.down = True
        d = self.sampler.first_listing(timeout=2.0)
        self.pool.release()
        self.successResultOf(d)
        self.assertIs(self.sampler.view()["docker"], False)

    def test_first_listing_gives_up_waiting_after_its_timeout(self) -> None:
        d = self.sampler.first_listing(timeout=2.0)
        self.clock.advance(1.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.successResultOf(d)

    def test_a_sample_already_in_flight_is_waited_for_not_repeated(self) -> None:
        self.pool.api.running = {"a": "web"}
        self.pool.release()  # the list; the first sample is now on the pool
        self.sampler._event({"Action": "start", "Actor": {"ID": "a", "Attributes": {"name": "web"}}})
        self.assertEqual(len(self.pool.held), 1)
