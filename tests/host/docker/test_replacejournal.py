"""
The replace journal (loaded strictly, set aside when it cannot be, never
stopping a start), the derivation of a container's create body from its
inspect data, and the recovery's retries while Docker does not answer.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import defer, task
from twisted.trial import unittest

from plexagent import errors
from plexagent.host.docker import recreate
from plexagent.host.docker.replace import Replacer
from plexagent.host.docker.replacejournal import JOURNAL_FILE, ReplaceJournal, ReplaceRecord, RollbackTarget
from plexagent.host.files.paths import PathPolicy

BODY = {"config": {"Image": "app:1", "HostConfig": {}}, "networks": []}


def record(name: str = "web", phase: str = "created") -> ReplaceRecord:
    return ReplaceRecord(
        token="a" * 32, name=name, kind="replace", phase=phase, old_id="1" * 64, old_running=True,
        old_restart_policy={"Name": "always"}, old_image="app:1", old_image_id="sha256:" + "2" * 64,
        new_image="app:2", new_body=BODY, previous_body=BODY, stop_timeout=10, health_timeout=60.0,
        started=1.0, new_id="3" * 64,
    )


class JournalTests(unittest.TestCase):
    def setUp(self) -> None:
        self.data_dir = os.path.realpath(self.mktemp())
        self.path = os.path.join(self.data_dir, JOURNAL_FILE)

    def test_steps_and_history_survive_a_restart(self) -> None:
        journal = ReplaceJournal(self.data_dir)
        journal.begin(record(phase="prepared"))
        journal.record(journal.active["web"], "aside")
        journal.history["db"] = RollbackTarget(BODY, "db:1", "sha256:" + "4" * 64, "5" * 64, 2.0)
        journal.save("aside")
        again = ReplaceJournal(self.data_dir)
        again.load()
        self.assertEqual((again.active["web"].phase, again.active["web"]), ("aside", journal.active["web"]))
        self.assertEqual(again.history, journal.history)
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)

    def test_finishing_forgets_the_replace_and_keeps_its_rollback_target(self) -> None:
        journal = ReplaceJournal(self.data_dir)
        journal.begin(record())
        target = RollbackTarget(BODY, "app:1", "sha256:" + "2" * 64, "3" * 64, 2.0)
        journal.finish(journal.active["web"], target)
        again = ReplaceJournal(self.data_dir)
        again.load()
        self.assertEqual((again.active, again.history), ({}, {"web": target}))

    def test_a_finish_that_cannot_be_written_leaves_the_replace_unfinished(self) -> None:
        journal = ReplaceJournal(self.data_dir)
        journal.begin(record())
        real_save = journal.save

        def save(step: str) -> None:
            if step == "finished":
                raise errors.StorageFull("insufficient storage", "container-replace.json: no space left on device")
            real_save(step)

        journal.save = save  # type: ignore[method-assign]
        with self.assertRaises(errors.StorageFull):
            journal.finish(journal.active["web"], RollbackTarget(BODY, "app:1", "sha256:" + "2" * 64, "3" * 64, 2.0))
        self.assertEqual((list(journal.active), journal.history), (["web"], {}))

    def test_a_second_replace_of_a_name_is_409(self) -> None:
        journal = ReplaceJournal(self.data_dir)
        journal.begin(record())
        with self.assertRaises(errors.Conflict):
            journal.begin(record())

    def write(self, document: Any) -> None:
        os.makedirs(self.data_dir, exist_ok=True)
        with open(self.path, "w") as f:
            f.write(document if isinstance(document, str) else json.dumps(document))

    def assert_set_aside(self) -> None:
        journal = ReplaceJournal(self.data_dir)
        journal.load()
        self.assertEqual((journal.active, journal.history), ({}, {}))
        self.assertFalse(os.path.exists(self.path))
        self.assertEqual(len([n for n in os.listdir(self.data_dir) if ".quarantined-" in n]), 1)

    def test_a_journal_that_is_not_json_is_set_aside(self) -> None:
        self.write('{"version": 1, "active": [')
        self.assert_set_aside()

    def test_a_journal_of_another_version_is_set_aside(self) -> None:
        self.write({"version": 2, "active": [], "history": {}})
        self.assert_set_aside()

    def test_an_entry_with_a_bad_field_sets_the_journal_aside(self) -> None:
        for field, value in (("phase", "halfway"), ("old_id", "abc"), ("name", "../x"), ("stop_timeout", True),
                             ("new_body", {"config": []}), ("health_timeout", float("nan"))):
            entry = record().to_record()
            entry[field] = value
            with self.subTest(field=field):
                text = json.dumps({"version": 1, "active": [entry], "history": {}})
                self.write(text)
                self.assert_set_aside()
                for name in os.listdir(self.data_dir):
                    os.unlink(os.path.join(self.data_dir, name))

    def test_a_missing_journal_is_an_empty_one(self) -> None:
        journal = ReplaceJournal(self.data_dir)
        journal.load()
        self.assertEqual((journal.active, journal.history), ({}, {}))


class DeriveTests(unittest.TestCase):
    image = {"Config": {"Cmd": ["/bin/app"], "Entrypoint": None, "Env": ["PATH=/bin", "MODE=image"],
                        "Labels": {"vendor": "acme"}, "ExposedPorts": {"80/tcp": {}}, "User": "app",
                        "Healthcheck": {"Test": ["CMD", "true"]}}}

    def info(self, **config: Any) -> dict[str, Any]:
        base = {"Cmd": ["/bin/app"], "Entrypoint": None, "Env": ["PATH=/bin", "MODE=image", "KEY=1"],
                "Labels": {"vendor": "acme", "team": "web", "plexagent.binds": "[]"}, "Hostname": "0123456789ab",
                "ExposedPorts": {"80/tcp": {}}, "User": "app", "Healthcheck": {"Test": ["CMD", "true"]}}
        base.update(config)
        return {"Id": "0123456789ab" + "f" * 52, "Image": "sha256:old", "Config": base,
                "HostConfig": {"NetworkMode": "net1", "RestartPolicy": {"Name": "always"},
                               "PortBindings": {"8080/tcp": [{"HostPort": "18080"}]}},
                "NetworkSettings": {"Networks": {
                    "net1": {"Aliases": ["api", "0123456789ab"], "IPAMConfig": {"IPv4Address": "10.9.0.5"}},
                    "net2": {"Aliases": ["api2"]}}}}

    def test_what_the_container_inherited_from_its_image_is_left_to_the_new_image(self) -> None:
        config = recreate.derive(self.info(), self.image, "app:2")["config"]
        for field in ("Cmd", "Entrypoint", "User", "Healthcheck", "Hostname"):
            self.assertNotIn(field, config)
        self.assertEqual(config["Env"], ["KEY=1"])
        self.assertEqual(config["Labels"], {"team": "web"})
        self.assertEqual(config["ExposedPorts"], {"8080/tcp": {}})

    def test_what_was_set_for_the_container_is_kept(self) -> None:
        info = self.info(Cmd=["/bin/app", "--fast"], User="root", Hostname="web1",
                         Healthcheck={"Test": ["CMD", "check"]})
        config = recreate.derive(info, self.image, "app:2", {"KEY": "2", "NEW": "x"})["config"]
        self.assertEqual((config["Cmd"], config["User"], config["Hostname"], config["Healthcheck"]),
                         (["/bin/app", "--fast"], "root", "web1", {"Test": ["CMD", "check"]}))
        self.assertEqual(config["Env"], ["KEY=2", "NEW=x"])

    def test_an_explicit_entrypoint_keeps_the_command_as_it_is(self) -> None:
        config = recreate.derive(self.info(Entrypoint=["/bin/sh", "-c"]), self.image, "app:2")["config"]
        self.assertEqual((config["Entrypoint"], config["Cmd"]), (["/bin/sh", "-c"], ["/bin/app"]))

    def test_the_host_config_and_networks_are_kept_whole(self) -> None:
        body = recreate.derive(self.info(), self.image, "app:2")
        self.assertEqual(body["config"]["HostConfig"]["RestartPolicy"], {"Name": "always"})
        self.assertEqual(body["config"]["NetworkingConfig"],
                         {"EndpointsConfig": {"net1": {"Aliases": ["api"], "IPAMConfig": {"IPv4Address": "10.9.0.5"}}}})
        self.assertEqual(body["networks"], [{"name": "net2", "Aliases": ["api2"]}])

    def test_checked_binds_go_through_the_path_policy_and_get_a_new_label(self) -> None:
        root = os.path.realpath(self.mktemp())
        os.makedirs(os.path.join(root, "data"))
        body = recreate.derive(self.info(), self.image, "app:2")
        body["config"]["HostConfig"]["Binds"] = [f"{root}/data:/data:ro", "cache:/cache"]
        out = recreate.checked(body, PathPolicy((root + "/",)), "b" * 32)
        self.assertEqual(out["config"]["HostConfig"]["Binds"], [f"{root}/data:/data:ro", "cache:/cache:rw"])
        self.assertEqual(out["config"]["Labels"], {"team": "web", "plexagent.binds": json.dumps([f"{root}/data"]),
                                                   recreate.REPLACE_LABEL: "b" * 32})
        body["config"]["HostConfig"]["Binds"] = ["/etc:/host-etc"]
        with self.assertRaises(errors.Forbidden):
            recreate.checked(body, PathPolicy((root + "/",)), "b" * 32)


class FlakyPool:
    """Answers ``errors.Unavailable`` until ``up`` is set; records the steps called."""

    def __init__(self) -> None:
        self.up = False
        self.calls: list[str] = []

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        self.calls.append(fn.__name__)
        if not self.up:
            return defer.fail(errors.Unavailable("docker unavailable", "refused"))
        return defer.succeed("rolled back" if fn.__name__ == "undo" else True)


class RecoveryTests(unittest.TestCase):
    def test_an_unfinished_replace_is_retried_until_docker_answers_and_its_name_stays_busy(self) -> None:
        data_dir = os.path.realpath(self.mktemp())
        journal = ReplaceJournal(data_dir)
        journal.begin(record(phase="old_stopped"))
        pool, clock = FlakyPool(), task.Clock()
        replacer = Replacer(pool, ReplaceJournal(data_dir), PathPolicy(()), clock, retry=1.0, max_retry=4.0)
        replacer.startService()
        self.addCleanup(replacer.stopService)
        done = replacer.recovered()
        clock.advance(0)
        self.assertEqual((pool.calls, replacer.busy), (["undo"], {"web": "recovery"}))
        clock.advance(1)
        clock.advance(2)
        self.assertEqual(pool.calls, ["undo"] * 3)
        pool.up = True
        clock.advance(4)
        self.assertTrue(done.called)
        self.assertEqual((replacer.busy, replacer.journal.active), ({}, {}))

    def test_a_replace_journaled_healthy_is_completed_not_rolled_back(self) -> None:
        data_dir = os.path.realpath(self.mktemp())
        ReplaceJournal(data_dir).begin(record(phase="healthy"))
        pool, clock = FlakyPool(), task.Clock()
        pool.up = True
        replacer = Replacer(pool, ReplaceJournal(data_dir), PathPolicy(()), clock)
        replacer.startService()
        self.addCleanup(replacer.stopService)
        clock.advance(0)
        self.assertEqual(pool.calls, ["complete"])
        self.assertEqual(replacer.journal.history["web"].image_id, "sha256:" + "2" * 64)
