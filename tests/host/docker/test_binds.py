"""
The rule deciding whether a container's bind mounts may be mounted now, on
Docker's inspect data and a real directory tree (no daemon needed).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from twisted.internet import defer, task
from twisted.trial import unittest

from plexagent import errors
from plexagent.host.docker.binds import (
    BIND_LABEL,
    BindGuard,
    bind_label,
    check,
    contain,
    contain_all,
    problem,
    start_checked,
)
from plexagent.host.files.paths import PathPolicy


def inspect(*binds: str, recorded: list[str] | None = None, running: bool = False) -> dict[str, Any]:
    """Docker's inspect data of a container binding each of ``binds`` at /mnt/<n>."""
    labels = {} if recorded is None else {BIND_LABEL: json.dumps(recorded)}
    return {
        "Id": "c0ffee",
        "Name": "/web",
        "State": {"Running": running},
        "Config": {"Labels": labels},
        "HostConfig": {"Binds": [f"{source}:/mnt/{i}:rw" for i, source in enumerate(binds)]},
        "Mounts": [{"Type": "bind", "Source": s, "Destination": f"/mnt/{i}"} for i, s in enumerate(binds)],
    }


class Tree(unittest.TestCase):
    """``root`` (allowed) with ``root/data`` in it, and ``outside``."""

    def setUp(self) -> None:
        self.base = os.path.realpath(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.base)
        self.root = os.path.join(self.base, "root")
        self.outside = os.path.join(self.base, "outside")
        self.data = os.path.join(self.root, "data")
        for d in (self.data, self.outside):
            os.makedirs(d)
        self.policy = PathPolicy([self.root + "/"])

    def swap(self, target: str) -> None:
        os.rename(self.data, self.data + ".orig")
        os.symlink(target, self.data)


class BindRule(Tree):
    def test_the_label_records_host_paths_not_named_volumes(self) -> None:
        self.assertEqual(json.loads(bind_label({self.data: {}, "cache": {}})), [self.data])

    def test_a_bind_the_agent_checked_and_unchanged_passes(self) -> None:
        self.assertIsNone(problem(inspect(self.data, recorded=[self.data]), self.policy))

    def test_a_bind_swapped_for_a_symlink_outside_names_both_paths(self) -> None:
        self.swap(self.outside)
        why = problem(inspect(self.data, recorded=[self.data]), self.policy)
        self.assertIn(f"{self.data} (mounted at /mnt/0) now resolves to {self.outside}", str(why))

    def test_a_parent_swapped_for_a_symlink_outside_is_caught_too(self) -> None:
        nested = os.path.join(self.data, "nested")
        os.makedirs(nested)
        os.makedirs(os.path.join(self.outside, "nested"))
        self.swap(self.outside)
        self.assertIsNotNone(problem(inspect(nested, recorded=[nested]), self.policy))

    def test_a_symlink_that_stays_inside_the_allowed_paths_passes(self) -> None:
        other = os.path.join(self.root, "other")
        os.makedirs(other)
        self.swap(other)
        self.assertIsNone(problem(inspect(self.data, recorded=[self.data]), self.policy))

    def test_a_bind_the_agent_did_not_record_is_refused_on_its_containers(self) -> None:
        why = problem(inspect(self.data, recorded=[]), self.policy)
        self.assertIn("is not a host path the agent checked", str(why))

    def test_a_recorded_bind_no_longer_in_the_allowed_paths_is_refused(self) -> None:
        narrowed = PathPolicy([os.path.join(self.root, "elsewhere") + "/"])
        self.assertIsNotNone(problem(inspect(self.data, recorded=[self.data]), narrowed))

    def test_other_containers_binds_outside_the_allowed_paths_are_not_the_agents_business(self) -> None:
        self.assertIsNone(problem(inspect(self.outside, "/etc"), self.policy))

    def test_other_containers_binds_inside_the_allowed_paths_must_stay_inside(self) -> None:
        self.swap(self.outside)
        self.assertIsNotNone(problem(inspect(self.data), self.policy))

    def test_check_raises_conflict_naming_the_path_and_what_to_do(self) -> None:
        self.swap(self.outside)
        e = self.assertRaises(errors.Conflict, check, inspect(self.data, recorded=[self.data]), self.policy)
        self.assertEqual(e.message, "bind mount outside the allowed paths")
        self.assertIn(self.data, e.details)
        self.assertIn("remove the container and run it again", e.details)


class RecordingAPI:
    """A docker-py ``APIClient`` stand-in: answers inspect from ``info``, records the rest."""

    def __init__(self, info: dict[str, Any], on_stop: Any = None) -> None:
        self.info = info
        self.on_stop = on_stop
        self.calls: list[str] = []

    def inspect_container(self, ref: str) -> dict[str, Any]:
        self.calls.append("inspect")
        return self.info

    def stop(self, ref: str, timeout: int) -> None:
        self.calls.append("stop")
        if self.on_stop is not None:
            self.on_stop()

    def start(self, ref: str) -> None:
        self.calls.append("start")


class Client:
    def __init__(self, api: RecordingAPI) -> None:
        self.api = api


class StartChecked(Tree):
    def test_a_refused_start_never_asks_docker_to_start(self) -> None:
        self.swap(self.outside)
        api = RecordingAPI(inspect(self.data, recorded=[self.data]))
        self.assertRaises(errors.Conflict, start_checked, Client(api), "web", self.policy)
        self.assertEqual(api.calls, ["inspect"])

    def test_a_restart_refused_before_the_stop_leaves_the_container_running(self) -> None:
        self.swap(self.outside)
        api = RecordingAPI(inspect(self.data, recorded=[self.data], running=True))
        self.assertRaises(errors.Conflict, start_checked, Client(api), "web", self.policy, restart_timeout=1)
        self.assertEqual(api.calls, ["inspect"])

    def test_a_restart_checks_again_after_the_stop(self) -> None:
        api = RecordingAPI(inspect(self.data, recorded=[self.data], running=True),
                           on_stop=lambda: self.swap(self.outside))
        self.assertRaises(errors.Conflict, start_checked, Client(api), "web", self.policy, restart_timeout=1)
        self.assertEqual(api.calls, ["inspect", "stop", "inspect"])

    def test_a_start_by_name_starts_the_id_it_checked(self) -> None:
        api = RecordingAPI(inspect(self.data, recorded=[self.data]))
        self.assertEqual(start_checked(Client(api), "web", self.policy), "c0ffee")
        self.assertEqual(api.calls, ["inspect", "start"])


class Watch:
    """The event watch's hooks, driven by the test."""

    def __init__(self) -> None:
        self.on_event: list[Any] = []
        self.on_connect: list[Any] = []
        self.on_end: list[Any] = []
        self.watches = 0

    def watch(self) -> None:
        self.watches += 1

    def fire(self, hooks: list[Any], *args: Any) -> None:
        for hook in list(hooks):
            hook(*args)


class Pool:
    running = True

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...]]] = []

    def background_call(self, fn: Any, *args: Any) -> defer.Deferred[Any]:
        self.calls.append((fn, args))
        return defer.succeed([] if fn is contain_all else None)


class Facade:
    def __init__(self) -> None:
        self.pool = Pool()
        self.container_list = Watch()


class Guard(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.facade = Facade()
        self.guard = BindGuard(self.facade, PathPolicy(["/srv/"]), self.clock, retry=1.0, max_retry=4.0)
        self.guard.startService()
        self.addCleanup(self.guard.stopService)
        self.clock.advance(0)  # the watch begins once the reactor runs
        self.watch = self.facade.container_list

    def test_it_watches_from_the_start_and_sweeps_at_each_connection(self) -> None:
        self.assertEqual(self.watch.watches, 1)
        self.watch.fire(self.watch.on_connect)
        self.assertEqual([fn for fn, _ in self.facade.pool.calls], [contain_all])

    def test_only_starts_of_containers_the_agent_made_are_checked(self) -> None:
        self.watch.fire(self.watch.on_event, {"Action": "die", "Actor": {"ID": "a", "Attributes": {BIND_LABEL: "[]"}}})
        self.watch.fire(self.watch.on_event, {"Action": "start", "Actor": {"ID": "b", "Attributes": {}}})
        self.watch.fire(self.watch.on_event, {"Action": "start", "Actor": {"ID": "c", "Attributes": {BIND_LABEL: "[]"}}})
        self.assertEqual([(fn, args[0]) for fn, args in self.facade.pool.calls], [(contain, "c")])

    def test_a_lost_watch_is_retried_with_a_doubling_delay_reset_by_a_connection(self) -> None:
        for delay, watches in ((1.0, 2), (2.0, 3), (4.0, 4), (4.0, 5)):
            self.watch.fire(self.watch.on_end)
            self.watch.fire(self.watch.on_end)  # one timer at a time
            self.clock.advance(delay - 0.01)
            self.assertEqual(self.watch.watches, watches - 1)
            self.clock.advance(0.01)
            self.assertEqual(self.watch.watches, watches)
        self.watch.fire(self.watch.on_connect)
        self.watch.fire(self.watch.on_end)
        self.clock.advance(1.0)
        self.assertEqual(self.watch.watches, 6)

    def test_stopping_cancels_the_retry_and_unhooks(self) -> None:
        self.watch.fire(self.watch.on_end)
        self.guard.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual((self.watch.on_event, self.watch.on_connect, self.watch.on_end), ([], [], []))
