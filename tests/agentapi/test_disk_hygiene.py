"""
Disk hygiene against the real engine: ``GET /system/df`` and ``POST
/images/cleanup`` with a body. Every cleanup here is scoped to the test's
own repository (``repository_prefix``): the engine is shared with other
tests. The images are loaded with chosen creation times (``td.load_image``).
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from twisted.trial import unittest

from plexagent.testing import docker as td


def days_ago(days: int) -> str:
    import datetime

    moment = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=days)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class DiskUsageTests(unittest.TestCase):
    def setUp(self) -> None:
        self.docker = td.test_client(self)
        self.agent = td.start_agent(self)
        self.api = td.AgentClient(self.agent)

    async def test_df_counts_each_kind_and_measures_the_data_root(self) -> None:
        status, doc = await self.api.get("/system/df")
        self.assertEqual(status, 200, doc)
        for kind in ("images", "containers", "volumes", "build_cache"):
            self.assertEqual(set(doc[kind]), {"count", "active", "size", "reclaimable"}, kind)
            self.assertLessEqual(doc[kind]["reclaimable"], doc[kind]["size"], kind)
        self.assertGreaterEqual(doc["images"]["count"], 1)  # the base image at least
        root = self.docker.info()["DockerRootDir"]
        st = os.statvfs(root)
        self.assertEqual((doc["data_root"]["path"], doc["data_root"]["available"], doc["data_root"]["total"]),
                         (root, True, st.f_blocks * st.f_frsize))
        self.assertTrue(0 < doc["data_root"]["percent"] < 100)

    async def test_df_needs_the_api_key(self) -> None:
        status, doc = await self.api.get("/system/df", key=None)
        self.assertEqual((status, doc["error"]), (401, "unauthorized"))


class CleanupTests(unittest.TestCase):
    def setUp(self) -> None:
        self.docker = td.test_client(self)
        self.agent = td.start_agent(self)
        self.api = td.AgentClient(self.agent)
        self.repo = f"pa-test-clean-{uuid.uuid4().hex[:8]}"

    def image(self, tag: str, age_days: int) -> str:
        return td.load_image(self, self.docker, f"{self.repo}:{tag}", days_ago(age_days), uuid.uuid4().bytes * 64)

    def exists(self, image_id: str) -> bool:
        return bool(self.docker.api.images(filters={"reference": self.repo}, quiet=True)
                    and image_id in self.docker.api.images(quiet=True))

    async def cleanup(self, **body: Any) -> tuple[int, Any]:
        return await self.api.post("/images/cleanup", {"repository_prefix": self.repo, **body})

    async def test_keep_last_removes_the_older_images_of_a_repository(self) -> None:
        old, middle, new = self.image("1", 30), self.image("2", 20), self.image("3", 10)
        status, doc = await self.cleanup(keep_last=1)
        self.assertEqual(status, 200, doc)
        self.assertEqual(sorted(doc["images_deleted"]), sorted([old, middle]))
        self.assertEqual((doc["removed"], doc["dry_run"]), (2, False))
        self.assertEqual(sorted(doc["untagged"]), [f"{self.repo}:1", f"{self.repo}:2"])
        self.assertEqual(doc["space_reclaimed"], 2 * 1024)
        self.assertEqual([self.exists(i) for i in (old, middle, new)], [False, False, True])

    async def test_older_than_keeps_the_younger_images(self) -> None:
        old, young = self.image("old", 10), self.image("young", 1)
        status, doc = await self.cleanup(older_than="72h")
        self.assertEqual((status, doc["images_deleted"]), (200, [old]), doc)
        self.assertTrue(self.exists(young))

    async def test_a_dry_run_lists_what_would_go_and_removes_nothing(self) -> None:
        old, new = self.image("1", 5), self.image("2", 1)
        status, doc = await self.cleanup(keep_last=1, dry_run=True)
        self.assertEqual((status, doc["dry_run"], doc["images_deleted"], doc["space_reclaimed"]), (200, True, [old], 1024))
        self.assertEqual([i["reason"] for i in doc["images"]], [f"not among the newest 1 of {self.repo}"])
        self.assertTrue(self.exists(old) and self.exists(new))

    async def test_an_image_a_stopped_container_uses_is_never_removed(self) -> None:
        used = self.image("used", 9)
        name = td.unique_name(self, self.docker)
        self.docker.api.create_container(f"{self.repo}:used", name=name)
        status, doc = await self.cleanup(keep_last=0)
        self.assertEqual((status, doc["images_deleted"]), (200, []), doc)
        self.assertEqual(doc["skipped"][0]["reason"], f"used by container {name}")
        self.assertTrue(self.exists(used))

    async def test_an_image_a_cron_job_uses_is_never_removed(self) -> None:
        used, unused = self.image("cron", 9), self.image("other", 8)
        status, job = await self.api.post("/cron/run-docker", {"schedule": "0 2 * * *", "image": f"{self.repo}:cron"})
        self.assertEqual(status, 201, job)
        status, doc = await self.cleanup(keep_last=0)
        self.assertEqual((status, doc["images_deleted"]), (200, [unused]), doc)
        self.assertEqual(doc["skipped"][0]["reason"], f"used by cron job {job['job_id']}")
        self.assertTrue(self.exists(used))

    async def test_every_bad_field_is_400_naming_it_and_removes_nothing(self) -> None:
        kept = self.image("1", 9)
        for body, field in (({"keep_last": -1}, "keep_last"), ({"older_than": "3 days"}, "older_than"),
                            ({"repository_prefix": 7}, "repository_prefix"), ({"dry_run": "yes"}, "dry_run"),
                            ({"include_build_cache": None}, "include_build_cache")):
            status, doc = await self.api.post("/images/cleanup", {"keep_last": 0, **body})
            self.assertEqual((status, doc["error"]), (400, f"invalid {field}"), body)
        status, doc = await self.api.post("/images/cleanup", {"keep_last": 0, "everything": True})
        self.assertEqual((status, doc["error"]), (400, "unknown field everything"))
        status, doc = await self.api.post("/images/cleanup?all=true", {"keep_last": 0})
        self.assertEqual((status, doc["error"]), (400, "all goes without a body"))
        status, doc = await self.api.post("/images/cleanup", data=b"[1]", headers={"Content-Type": "application/json"})
        self.assertEqual((status, doc["error"]), (400, "invalid body"))
        self.assertTrue(self.exists(kept))

    async def test_a_body_over_the_routes_limit_is_413_before_it_is_read(self) -> None:
        kept = self.image("1", 9)
        body = b'{"keep_last": 0, "repository_prefix": "' + b"a" * 20000 + b'"}'
        status, doc = await self.api.post("/images/cleanup", data=body, headers={"Content-Type": "application/json"})
        self.assertEqual((status, doc["error"]), (413, "request body too large"))
        self.assertTrue(self.exists(kept))
