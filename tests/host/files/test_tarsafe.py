"""Extraction of hostile archives: every escape is refused and reported."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
import zlib

from twisted.trial import unittest

from plexagent import errors
from plexagent.host.files.paths import PathPolicy
from plexagent.host.files.staging import StagingJournal
from plexagent.host.files.tarsafe import Limits, extract, symlink_target_stays_inside


def member(
    name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", linkname: str = "", mode: int = 0o644
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def archive(*members: tuple[tarfile.TarInfo, bytes], compress: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    raw = buf.getvalue()
    return gzip.compress(raw, 1) if compress else raw


class ExtractCase(unittest.TestCase):
    def setUp(self) -> None:
        base = os.path.realpath(self.mktemp())
        self.root = os.path.join(base, "app")
        self.outside = os.path.join(base, "outside")
        os.makedirs(self.root)
        os.makedirs(self.outside)
        self.policy = PathPolicy([self.root])
        self.target = os.path.join(self.root, "site")
        self.limits = Limits(max_bytes=1 << 20, max_members=100)

    def extract(self, data: bytes, target: str | None = None, limits: Limits | None = None):
        return extract(io.BytesIO(data), self.policy, target or self.target, limits or self.limits)

    def reasons(self, result) -> dict[str, str]:
        return {s["name"]: s["reason"] for s in result.skipped}

    def assertNothingOutside(self) -> None:
        self.assertEqual(os.listdir(self.outside), [])

    def assertNoStaging(self) -> None:
        for directory, dirs, files in os.walk(self.root):
            for name in dirs + files:
                self.assertFalse(name.startswith(".plexagent-"), os.path.join(directory, name))


class PlainArchiveTests(ExtractCase):
    def test_gzip_archive_is_extracted_and_reported(self) -> None:
        result = self.extract(archive(member("a/b.txt", data=b"hello"), member("c.txt", data=b"x", mode=0o600)))
        with open(os.path.join(self.target, "a", "b.txt"), "rb") as f:
            self.assertEqual(f.read(), b"hello")
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.target, "c.txt")).st_mode), 0o600)
        self.assertEqual((result.files, result.bytes, result.skipped, result.path), (2, 6, [], self.target))
        self.assertNoStaging()

    def test_uncompressed_tar_is_extracted(self) -> None:
        self.extract(archive(member("f", data=b"plain"), compress=False))
        self.assertTrue(os.path.isfile(os.path.join(self.target, "f")))

    def test_leading_dot_slash_names_are_accepted(self) -> None:
        result = self.extract(archive(member("./", tarfile.DIRTYPE, mode=0o755), member("./x", data=b"1")))
        self.assertEqual((result.files, result.skipped), (1, []))

    def test_extraction_merges_into_existing_directory(self) -> None:
        os.makedirs(os.path.join(self.target, "keep"))
        with open(os.path.join(self.target, "old.txt"), "w") as f:
            f.write("old")
        self.extract(archive(member("old.txt", data=b"new"), member("keep/n", data=b"n")))
        with open(os.path.join(self.target, "old.txt")) as f:
            self.assertEqual(f.read(), "new")
        self.assertEqual(sorted(os.listdir(self.target)), ["keep", "old.txt"])
        self.assertNoStaging()

    def test_extraction_into_forbidden_path_creates_nothing(self) -> None:
        self.assertRaises(errors.Forbidden, self.extract, archive(member("f", data=b"x")), os.path.join(self.outside, "t"))
        self.assertNothingOutside()

    def test_internal_symlinks_and_hardlinks_are_kept(self) -> None:
        result = self.extract(archive(
            member("dir/file", data=b"data"),
            member("dir/sub/up", tarfile.SYMTYPE, linkname="../file"),
            member("same", tarfile.SYMTYPE, linkname="dir/file"),
            member("hard", tarfile.LNKTYPE, linkname="dir/file"),
        ))
        self.assertEqual(result.skipped, [])
        with open(os.path.join(self.target, "dir", "sub", "up")) as f:
            self.assertEqual(f.read(), "data")
        self.assertEqual(os.stat(os.path.join(self.target, "hard")).st_nlink, 2)

    def test_not_an_archive_is_invalid_input_and_leaves_nothing(self) -> None:
        self.assertRaises(errors.InvalidInput, self.extract, gzip.compress(b"\x01" * 2000))
        self.assertFalse(os.path.exists(self.target))
        self.assertNoStaging()

    def test_truncated_gzip_is_invalid_input(self) -> None:
        data = archive(member("f", data=os.urandom(50000)))
        self.assertRaises(errors.InvalidInput, self.extract, data[: len(data) // 2])
        self.assertFalse(os.path.exists(self.target))


class HostileArchiveTests(ExtractCase):
    def test_absolute_name_is_skipped(self) -> None:
        evil = os.path.join(self.outside, "abs")
        result = self.extract(archive(member(evil, data=b"x"), member("ok", data=b"y")))
        self.assertEqual(self.reasons(result), {evil: "absolute path"})
        self.assertEqual(result.files, 1)
        self.assertNothingOutside()

    def test_dotdot_name_is_skipped(self) -> None:
        result = self.extract(archive(member("../../outside/x", data=b"x")))
        self.assertEqual(self.reasons(result), {"../../outside/x": "path contains '..'"})
        self.assertNothingOutside()

    def test_absolute_symlink_is_skipped(self) -> None:
        result = self.extract(archive(member("link", tarfile.SYMTYPE, linkname=self.outside)))
        self.assertEqual(self.reasons(result), {"link": "symlink points outside the extraction directory"})
        self.assertFalse(os.path.lexists(os.path.join(self.target, "link")))

    def test_relative_symlink_climbing_out_is_skipped(self) -> None:
        result = self.extract(archive(member("a/link", tarfile.SYMTYPE, linkname="../../outside")))
        self.assertIn("a/link", self.reasons(result))

    def test_symlink_dotdot_through_another_symlink_is_skipped(self) -> None:
        # "here" -> "." is harmless; "b" -> "here/.." would resolve to the
        # parent of the extraction directory although it looks like ".".
        result = self.extract(archive(
            member("here", tarfile.SYMTYPE, linkname="."),
            member("b", tarfile.SYMTYPE, linkname="here/.."),
        ))
        self.assertEqual(self.reasons(result), {"b": "symlink points outside the extraction directory"})

    def test_write_through_an_extracted_symlink_is_skipped(self) -> None:
        result = self.extract(archive(
            member("escape", tarfile.SYMTYPE, linkname=self.outside),
            member("escape/pwned", data=b"x"),
            member("inner", tarfile.DIRTYPE, mode=0o755),
            member("alias", tarfile.SYMTYPE, linkname="inner"),
            member("alias/through", data=b"y"),
        ))
        reasons = self.reasons(result)
        # The outside symlink was never created, so "escape/" is a real
        # directory inside; the kept internal symlink is never written through.
        self.assertEqual(reasons["escape"], "symlink points outside the extraction directory")
        self.assertEqual(reasons["alias/through"], "path passes through a symlink")
        self.assertFalse(os.path.islink(os.path.join(self.target, "escape")))
        self.assertEqual(os.listdir(os.path.join(self.target, "inner")), [])
        self.assertNothingOutside()

    def test_hardlink_to_outside_file_is_skipped(self) -> None:
        secret = os.path.join(self.outside, "secret")
        result = self.extract(archive(
            member("h1", tarfile.LNKTYPE, linkname=secret),
            member("h2", tarfile.LNKTYPE, linkname="../../outside/secret"),
        ))
        self.assertEqual(set(self.reasons(result)), {"h1", "h2"})

    def test_hardlink_through_extracted_symlink_is_skipped(self) -> None:
        with open(os.path.join(self.outside, "secret"), "w") as f:
            f.write("s")
        result = self.extract(archive(
            member("out", tarfile.SYMTYPE, linkname=self.outside),
            member("h", tarfile.LNKTYPE, linkname="out/secret"),
        ))
        self.assertIn("h", self.reasons(result))
        self.assertEqual(os.stat(os.path.join(self.outside, "secret")).st_nlink, 1)

    def test_devices_and_fifos_are_skipped(self) -> None:
        result = self.extract(archive(
            member("null", tarfile.CHRTYPE), member("disk", tarfile.BLKTYPE), member("pipe", tarfile.FIFOTYPE),
        ))
        self.assertEqual(self.reasons(result), {"null": "device node", "disk": "device node", "pipe": "fifo"})

    def test_setuid_and_setgid_bits_are_stripped_and_reported(self) -> None:
        result = self.extract(archive(member("suid", data=b"#!", mode=0o6755), member("dir", tarfile.DIRTYPE, mode=0o3777)))
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.target, "suid")).st_mode), 0o755)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.target, "dir")).st_mode), 0o777)
        self.assertEqual(sorted(result.stripped), ["dir", "suid"])

    def test_symlink_cannot_replace_an_extracted_directory(self) -> None:
        result = self.extract(archive(
            member("d", tarfile.DIRTYPE, mode=0o755),
            member("d", tarfile.SYMTYPE, linkname="."),
            member("d/f", data=b"x"),
        ))
        self.assertEqual(self.reasons(result), {"d": "conflicts with an earlier member"})
        self.assertTrue(os.path.isfile(os.path.join(self.target, "d", "f")))

    def test_merge_does_not_follow_an_existing_symlink_in_the_target(self) -> None:
        os.makedirs(self.target)
        os.symlink(self.outside, os.path.join(self.target, "dir"))
        result = self.extract(archive(member("dir/x", data=b"x")))
        self.assertEqual(self.reasons(result), {"dir": "an existing entry of another type is in the way"})
        self.assertNothingOutside()


class RaceTests(ExtractCase):
    def test_parent_swapped_for_a_symlink_after_the_check_cannot_redirect_extraction(self) -> None:
        parent = os.path.join(self.root, "sites")
        os.makedirs(parent)
        real_resolve = self.policy.resolve

        def resolve_then_swap(path: object, field: str = "path") -> str:
            result = real_resolve(path, field)
            if not os.path.islink(parent):
                os.rename(parent, parent + "-moved")
                os.symlink(self.outside, parent)
            return result

        self.policy.resolve = resolve_then_swap  # type: ignore[method-assign]
        e = self.assertRaises(errors.Forbidden, self.extract, archive(member("f", data=b"x")),
                              os.path.join(parent, "site"))
        self.assertEqual(e.message, "path not allowed")
        self.assertNothingOutside()


class JournalTests(ExtractCase):
    def test_staging_left_by_a_killed_agent_is_removed_at_recovery(self) -> None:
        journal = StagingJournal(os.path.join(os.path.dirname(self.root), "journal"))
        stale = os.path.join(self.root, ".plexagent-extract-0123456789abcdef")
        os.makedirs(os.path.join(stale, "half"))
        journal.record("0123456789abcdef", stale)
        fresh = StagingJournal(journal.directory)  # a new process: nothing running
        self.assertEqual(fresh.recover(self.policy), [stale])
        self.assertEqual(os.listdir(self.root), [])
        self.assertEqual(os.listdir(journal.directory), [])

    def test_recovery_never_touches_paths_outside_the_roots(self) -> None:
        journal = StagingJournal(os.path.join(os.path.dirname(self.root), "journal"))
        victim = os.path.join(self.outside, ".plexagent-extract-00000000000000aa")
        os.makedirs(victim)
        journal.record("00000000000000aa", victim)
        self.assertEqual(StagingJournal(journal.directory).recover(self.policy), [])
        self.assertTrue(os.path.isdir(victim))

    def journal_with(self, entries: dict[str, bytes]) -> StagingJournal:
        journal = StagingJournal(os.path.join(os.path.dirname(self.root), "journal"))
        os.makedirs(journal.directory)
        for token, content in entries.items():
            with open(os.path.join(journal.directory, token), "wb") as f:
                f.write(content)
        return journal

    def test_entries_that_cannot_be_used_are_set_aside_not_deleted(self) -> None:
        good = os.path.join(self.root, ".plexagent-extract-0123456789abcdef")
        os.makedirs(good)
        bad = {
            "00000000000000a1": b"\xff\xfe not utf-8",
            "00000000000000a2": b"relative/.plexagent-extract-00000000000000a2",
            "00000000000000a3": os.path.join(self.root, "site").encode(),
            "not-a-token": os.path.join(self.root, ".plexagent-extract-not-a-token").encode(),
            "00000000000000a4": os.path.join(self.outside, ".plexagent-extract-00000000000000a4").encode(),
        }
        journal = self.journal_with({"0123456789abcdef": good.encode(), **bad})
        os.makedirs(os.path.join(self.root, "site"))
        self.assertEqual(journal.recover(self.policy), [good])
        self.assertTrue(os.path.isdir(os.path.join(self.root, "site")))
        kept = sorted(n.split(".quarantined-")[0] for n in os.listdir(journal.directory))
        self.assertEqual(kept, sorted(bad))
        self.assertTrue(all(".quarantined-" in n for n in os.listdir(journal.directory)))
        # A second recovery leaves what was set aside alone.
        self.assertEqual(journal.recover(self.policy), [])
        self.assertEqual(len(os.listdir(journal.directory)), len(bad))

    def test_an_entry_whose_staging_directory_is_gone_is_forgotten(self) -> None:
        journal = self.journal_with(
            {"0123456789abcdef": os.path.join(self.root, ".plexagent-extract-0123456789abcdef").encode()}
        )
        self.assertEqual(journal.recover(self.policy), [])
        self.assertEqual(os.listdir(journal.directory), [])

    def test_an_entry_that_is_a_directory_is_set_aside(self) -> None:
        journal = self.journal_with({})
        os.makedirs(os.path.join(journal.directory, "0123456789abcdef", "x"))
        self.assertEqual(journal.recover(self.policy), [])
        [aside] = os.listdir(journal.directory)
        self.assertTrue(aside.startswith("0123456789abcdef.quarantined-"))

    def test_a_journal_that_is_a_file_is_set_aside(self) -> None:
        journal = StagingJournal(os.path.join(os.path.dirname(self.root), "journal"))
        with open(journal.directory, "w") as f:
            f.write("x")
        self.assertEqual(journal.recover(self.policy), [])
        stale = os.path.join(self.root, ".plexagent-extract-0123456789abcdef")
        journal.record("0123456789abcdef", stale)
        self.assertEqual(os.listdir(journal.directory), ["0123456789abcdef"])

    def test_extraction_forgets_its_journal_entry(self) -> None:
        journal = StagingJournal(os.path.join(os.path.dirname(self.root), "journal"))
        extract(io.BytesIO(archive(member("f", data=b"x"))), self.policy, self.target, self.limits, None, journal)
        self.assertEqual(os.listdir(journal.directory), [])


class BoundsTests(ExtractCase):
    def test_gzip_bomb_is_cut_off_and_cleaned_up(self) -> None:
        # ~64 MiB of zeros in one member, compressed to ~64 KiB, against a 1 MiB limit.
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo("bomb")
            info.size = 64 << 20
            tar.addfile(info, io.BytesIO(bytes(64 << 20)))
        bomb = zlib.compress(buf.getvalue(), 9, wbits=31)
        self.assertLess(len(bomb), 1 << 20)
        e = self.assertRaises(errors.TooLarge, self.extract, bomb)
        self.assertEqual(e.message, "archive too large")
        self.assertFalse(os.path.exists(self.target))
        self.assertNoStaging()

    def test_bomb_with_lying_small_members_is_cut_off_while_streaming(self) -> None:
        # Two members, each under the limit, together over it: the second is
        # refused before a byte of it is written; the first is cleaned up.
        data = archive(member("a", data=bytes(700_000)), member("b", data=bytes(700_000)))
        self.assertRaises(errors.TooLarge, self.extract, data)
        self.assertFalse(os.path.exists(self.target))

    def test_large_skipped_member_is_skipped_not_mistaken_for_metadata(self) -> None:
        result = self.extract(archive(member("/abs/big", data=bytes(20 << 20)), member("ok", data=b"1")),
                              None, Limits(max_bytes=100 << 20, max_members=10))
        self.assertEqual((self.reasons(result), result.files), ({"/abs/big": "absolute path"}, 1))

    def test_skipped_members_count_toward_the_size_limit(self) -> None:
        self.assertRaises(errors.TooLarge, self.extract, archive(member("/abs/big", data=bytes(2 << 20))))
        self.assertFalse(os.path.exists(self.target))

    def test_member_count_is_bounded(self) -> None:
        data = archive(*[member(f"f{i}", data=b"") for i in range(150)])
        e = self.assertRaises(errors.TooLarge, self.extract, data)
        self.assertEqual(e.message, "too many archive members")
        self.assertNoStaging()

    def test_compressed_input_is_bounded(self) -> None:
        data = archive(member("r", data=os.urandom(300_000)))
        self.assertRaises(errors.TooLarge, extract, io.BytesIO(data), self.policy, self.target,
                          Limits(max_bytes=1 << 20, max_members=10), 100_000)

    def test_huge_pax_header_is_refused(self) -> None:
        info = tarfile.TarInfo("p")
        info.pax_headers = {"comment": "x" * (20 << 20)}
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(info, io.BytesIO(b""))
        self.assertRaises(errors.TooLarge, self.extract, gzip.compress(buf.getvalue(), 1),
                          None, Limits(max_bytes=100 << 20, max_members=10))

    def test_failure_in_existing_target_leaves_it_untouched(self) -> None:
        os.makedirs(self.target)
        with open(os.path.join(self.target, "old"), "w") as f:
            f.write("old")
        data = archive(member("old", data=b"new"), member("big", data=bytes(2 << 20)))
        self.assertRaises(errors.TooLarge, self.extract, data)
        self.assertEqual(os.listdir(self.target), ["old"])
        with open(os.path.join(self.target, "old")) as f:
            self.assertEqual(f.read(), "old")


class SymlinkRuleTests(unittest.TestCase):
    def test_rule(self) -> None:
        self.assertTrue(symlink_target_stays_inside(["a", "b", "l"], "../../x/y"))
        self.assertFalse(symlink_target_stays_inside(["a", "l"], "../../x"))
        self.assertFalse(symlink_target_stays_inside(["l"], "x/../.."))
        self.assertFalse(symlink_target_stays_inside(["l"], "x/.."))
        self.assertFalse(symlink_target_stays_inside(["l"], "/etc"))
        self.assertFalse(symlink_target_stays_inside(["l"], ""))
        self.assertTrue(symlink_target_stays_inside(["l"], "./x"))
