"""
The cleanup's plan and options (pure functions of Docker's image list and
the request body), and how the data root's file system is measured (on
real directories).
"""

from __future__ import annotations

import os

from twisted.trial import unittest

from plexagent import errors
from plexagent.host.docker.cleanup import CleanupOptions, parse_cleanup_options, parse_duration, plan
from plexagent.host.docker.disk import categories, filesystem_usage

DAY = 86400.0
NOW = 1_700_000_000.0


def image(id_: str, tags: list[str], age_days: float, size: int = 100, digests: list[str] | None = None) -> dict:
    return {"Id": f"sha256:{id_}", "RepoTags": tags, "RepoDigests": digests or [], "Created": int(NOW - age_days * DAY),
            "Size": size, "SharedSize": 0, "Containers": 0}


def removed(images: list[dict], **options) -> dict[str, list[str]]:
    return {r.id.removeprefix("sha256:"): sorted(r.refs) for r in plan(images, CleanupOptions(**options), NOW)}


class DurationTests(unittest.TestCase):
    def test_units_and_sums_are_seconds(self) -> None:
        self.assertEqual([parse_duration(t) for t in ("72h", "90m", "1d12h", "30s", "1.5h")],
                         [72 * 3600, 90 * 60, 36 * 3600, 30, 5400])

    def test_anything_else_is_400_naming_older_than(self) -> None:
        for bad in ("72", "h", "-1h", "1w", "1h ", " 1h", "1H", "٣h", "1e3h", "", 72, None, "1h\n", "1.h"):
            with self.assertRaises(errors.InvalidInput, msg=repr(bad)) as caught:
                parse_duration(bad)
            self.assertEqual(caught.exception.message, "invalid older_than")

    def test_more_than_a_century_is_refused(self) -> None:
        with self.assertRaises(errors.InvalidInput):
            parse_duration("36501d")


class OptionTests(unittest.TestCase):
    def test_every_field_is_read(self) -> None:
        options = parse_cleanup_options({"keep_last": 3, "older_than": "72h", "repository_prefix": "reg:5000/app",
                                         "include_build_cache": True, "dry_run": True})
        self.assertEqual((options.keep_last, options.older_than, options.repository_prefix,
                          options.include_build_cache, options.dry_run), (3, 72 * 3600.0, "reg:5000/app", True, True))

    def test_an_empty_object_asks_for_the_dangling_images_only(self) -> None:
        self.assertEqual(parse_cleanup_options({}), CleanupOptions())

    def test_each_bad_field_is_400_naming_it(self) -> None:
        for body, field in (({"keep_last": -1}, "keep_last"), ({"keep_last": True}, "keep_last"),
                            ({"keep_last": 1.5}, "keep_last"), ({"keep_last": "3"}, "keep_last"),
                            ({"keep_last": 10**7}, "keep_last"), ({"older_than": "3 days"}, "older_than"),
                            ({"repository_prefix": ""}, "repository_prefix"),
                            ({"repository_prefix": "App"}, "repository_prefix"),
                            ({"repository_prefix": "a\nb"}, "repository_prefix"),
                            ({"repository_prefix": 5}, "repository_prefix"),
                            ({"include_build_cache": "true"}, "include_build_cache"),
                            ({"dry_run": 1}, "dry_run")):
            with self.assertRaises(errors.InvalidInput, msg=repr(body)) as caught:
                parse_cleanup_options(body)
            self.assertEqual(caught.exception.message, f"invalid {field}")
            self.assertIn(field, caught.exception.details)

    def test_an_unknown_field_is_400_naming_it(self) -> None:
        with self.assertRaises(errors.InvalidInput) as caught:
            parse_cleanup_options({"keep-last": 3})
        self.assertEqual(caught.exception.message, "unknown field keep-last")


class PlanTests(unittest.TestCase):
    images = [
        image("a1", ["app:1"], 30), image("a2", ["app:2"], 20), image("a3", ["app:3", "app:latest"], 10),
        image("a4", ["app:4"], 1), image("b1", ["reg:5000/web:1"], 40), image("d1", [], 50), image("d2", [], 0.5),
    ]

    def test_without_criteria_only_dangling_images_go(self) -> None:
        self.assertEqual(removed(self.images), {"d1": [], "d2": []})

    def test_keep_last_keeps_the_newest_images_of_each_repository(self) -> None:
        self.assertEqual(removed(self.images, keep_last=2),
                         {"a1": ["app:1"], "a2": ["app:2"], "d1": [], "d2": []})

    def test_an_image_with_two_tags_counts_once(self) -> None:
        self.assertNotIn("a3", removed(self.images, keep_last=2))

    def test_older_than_alone_takes_every_older_image(self) -> None:
        self.assertEqual(removed(self.images, older_than=15 * DAY, older_than_text="15d"),
                         {"a1": ["app:1"], "a2": ["app:2"], "b1": ["reg:5000/web:1"], "d1": []})

    def test_keep_last_and_older_than_must_both_allow_a_removal(self) -> None:
        self.assertEqual(removed(self.images, keep_last=1, older_than=25 * DAY, older_than_text="25d"),
                         {"a1": ["app:1"], "d1": []})

    def test_a_repository_prefix_scopes_the_cleanup_and_leaves_dangling_images(self) -> None:
        self.assertEqual(removed(self.images, keep_last=0, repository_prefix="reg:5000/"), {"b1": ["reg:5000/web:1"]})

    def test_keep_last_zero_removes_every_tagged_image(self) -> None:
        self.assertEqual(set(removed(self.images, keep_last=0)), {"a1", "a2", "a3", "a4", "b1", "d1", "d2"})

    def test_an_image_in_two_repositories_loses_only_the_references_chosen(self) -> None:
        images = [image("x1", ["one:1", "two:1"], 10), image("x2", ["one:2"], 5)]
        [removal] = plan(images, CleanupOptions(keep_last=1), NOW)
        self.assertEqual((removal.refs, removal.deletes), (["one:1"], False))

    def test_digest_references_go_with_the_tags_of_their_repository(self) -> None:
        images = [image("p1", ["app:1"], 10, digests=["app@sha256:aa"]), image("p2", ["app:2"], 5)]
        [removal] = plan(images, CleanupOptions(keep_last=1), NOW)
        self.assertEqual((sorted(removal.refs), removal.deletes), (["app:1", "app@sha256:aa"], True))


class CategoryTests(unittest.TestCase):
    def test_reclaimable_is_what_docker_system_df_counts(self) -> None:
        df = {
            "LayersSize": 1000,
            "Images": [{"Size": 600, "SharedSize": 100, "Containers": 1}, {"Size": 400, "SharedSize": 100, "Containers": 0}],
            "Containers": [{"State": "running", "SizeRw": 10}, {"State": "exited", "SizeRw": 30}],
            "Volumes": [{"UsageData": {"Size": 50, "RefCount": 1}}, {"UsageData": {"Size": 70, "RefCount": 0}},
                        {"UsageData": {"Size": -1, "RefCount": 0}}],
            "BuildCache": [{"Size": 5, "InUse": True}, {"Size": 7, "Shared": True}, {"Size": 9}],
        }
        self.assertEqual(categories(df), {
            "images": {"count": 2, "active": 1, "size": 1000, "reclaimable": 500},
            "containers": {"count": 2, "active": 1, "size": 40, "reclaimable": 30},
            "volumes": {"count": 3, "active": 1, "size": 120, "reclaimable": 70},
            "build_cache": {"count": 3, "active": 1, "size": 21, "reclaimable": 9},
        })


class DataRootTests(unittest.TestCase):
    def setUp(self) -> None:
        self.root = os.path.realpath(self.mktemp())
        os.makedirs(os.path.join(self.root, "containers", "c" * 64))
        os.makedirs(os.path.join(self.root, "image"))

    def test_a_visible_data_root_reports_its_file_system(self) -> None:
        usage = filesystem_usage(self.root, ["c" * 64])
        st = os.statvfs(self.root)
        self.assertEqual((usage["available"], usage["path"], usage["total"]), (True, self.root, st.f_blocks * st.f_frsize))
        self.assertEqual(usage["used"] + usage["free"] + (st.f_bfree - st.f_bavail) * st.f_frsize, usage["total"])
        self.assertTrue(0 <= usage["percent"] <= 100)

    def test_a_missing_data_root_is_said_to_be_unseen_not_measured(self) -> None:
        usage = filesystem_usage(os.path.join(self.root, "elsewhere"), [])
        self.assertEqual(usage["available"], False)
        self.assertNotIn("percent", usage)
        self.assertIn("another mount namespace", usage["reason"])
        self.assertIn("No such file or directory", usage["reason"])

    def test_a_directory_not_laid_out_as_a_data_root_is_not_measured(self) -> None:
        other = os.path.realpath(self.mktemp())
        os.makedirs(other)
        usage = filesystem_usage(other, [])
        self.assertEqual(usage["available"], False)
        self.assertIn("no containers/ and image/", usage["reason"])

    def test_a_data_root_without_dockers_containers_is_not_measured(self) -> None:
        usage = filesystem_usage(self.root, ["d" * 64, "e" * 64])
        self.assertEqual(usage["available"], False)
        self.assertIn("does not hold Docker's containers", usage["reason"])
