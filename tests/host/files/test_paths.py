"""The path policy: what is allowed, and that no symlink lets a write escape."""

from __future__ import annotations

import os
import stat
import subprocess
import threading

from twisted.trial import unittest

from plexagent import errors
from plexagent.host.files.paths import PathPolicy


class PolicyCase(unittest.TestCase):
    def setUp(self) -> None:
        base = os.path.realpath(self.mktemp())
        self.root = os.path.join(base, "app")
        self.outside = os.path.join(base, "outside")
        self.sibling = os.path.join(base, "app-evil")
        for d in (self.root, self.outside, self.sibling):
            os.makedirs(d)
        self.policy = PathPolicy([self.root + "/"])

    def p(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)


class ResolveTests(PolicyCase):
    def test_path_inside_root_is_allowed(self) -> None:
        self.assertEqual(self.policy.resolve(self.p("a", "b")), self.p("a", "b"))

    def test_root_itself_is_allowed(self) -> None:
        self.assertEqual(self.policy.resolve(self.root), self.root)

    def test_sibling_prefix_is_not_inside(self) -> None:
        e = self.assertRaises(errors.Forbidden, self.policy.resolve, os.path.join(self.sibling, "x"))
        self.assertEqual(e.message, "path not allowed")
        self.assertEqual(e.details, os.path.join(self.sibling, "x"))

    def test_dotdot_out_of_root_is_forbidden(self) -> None:
        self.assertRaises(errors.Forbidden, self.policy.resolve, self.p("..", "outside", "x"))

    def test_relative_path_is_forbidden(self) -> None:
        self.assertRaises(errors.Forbidden, self.policy.resolve, "app/x")

    def test_empty_or_nul_path_is_invalid(self) -> None:
        self.assertRaises(errors.InvalidInput, self.policy.resolve, "")
        self.assertRaises(errors.InvalidInput, self.policy.resolve, self.p("a\x00b"))
        self.assertRaises(errors.InvalidInput, self.policy.resolve, None)

    def test_symlink_pointing_outside_is_forbidden(self) -> None:
        os.symlink(self.outside, self.p("link"))
        self.assertRaises(errors.Forbidden, self.policy.resolve, self.p("link", "x"))

    def test_symlink_staying_inside_resolves_to_its_target(self) -> None:
        os.mkdir(self.p("real"))
        os.symlink(self.p("real"), self.p("link"))
        self.assertEqual(self.policy.resolve(self.p("link", "x")), self.p("real", "x"))


class WriteTests(PolicyCase):
    def test_write_creates_parents_and_sets_mode(self) -> None:
        real, size = self.policy.write_file(self.p("a", "b", "c.txt"), b"hello", 0o640)
        self.assertEqual((real, size), (self.p("a", "b", "c.txt"), 5))
        with open(real, "rb") as f:
            self.assertEqual(f.read(), b"hello")
        self.assertEqual(stat.S_IMODE(os.stat(real).st_mode), 0o640)

    def test_write_replaces_atomically_leaving_no_temporary(self) -> None:
        self.policy.write_file(self.p("f"), b"old")
        self.policy.write_file(self.p("f"), [b"ne", b"w"])
        self.assertEqual(os.listdir(self.root), ["f"])
        with open(self.p("f"), "rb") as f:
            self.assertEqual(f.read(), b"new")

    def test_write_to_forbidden_path_creates_nothing(self) -> None:
        target = os.path.join(self.outside, "d", "x")
        self.assertRaises(errors.Forbidden, self.policy.write_file, target, b"x")
        self.assertEqual(os.listdir(self.outside), [])

    def test_write_through_outside_symlink_creates_nothing(self) -> None:
        os.symlink(self.outside, self.p("link"))
        self.assertRaises(errors.Forbidden, self.policy.write_file, self.p("link", "x"), b"x")
        self.assertEqual(os.listdir(self.outside), [])

    def test_write_to_a_path_ending_in_slash_or_to_a_root_is_invalid(self) -> None:
        self.assertRaises(errors.InvalidInput, self.policy.write_file, self.p("d") + "/", b"x")
        self.assertRaises(errors.InvalidInput, self.policy.write_file, self.root, b"x")
        self.assertEqual(os.listdir(self.root), [])

    def test_write_over_directory_is_conflict(self) -> None:
        os.mkdir(self.p("d"))
        self.assertRaises(errors.Conflict, self.policy.write_file, self.p("d"), b"x")

    def test_symlink_swapped_in_after_the_check_cannot_redirect_the_write(self) -> None:
        """
        The check passes on a real directory; before the write walks the
        path, the directory is replaced by a symlink to outside the root.
        """
        os.mkdir(self.p("d"))
        real_resolve = self.policy.resolve

        def resolve_then_swap(path: object, field: str = "path") -> str:
            result = real_resolve(path, field)
            os.rename(self.p("d"), self.p("d-moved"))
            os.symlink(self.outside, self.p("d"))
            return result

        self.policy.resolve = resolve_then_swap  # type: ignore[method-assign]
        e = self.assertRaises(errors.Forbidden, self.policy.write_file, self.p("d", "x"), b"escaped")
        self.assertEqual(e.message, "path not allowed")
        self.assertEqual(os.listdir(self.outside), [])

    def test_concurrent_symlink_swapping_never_lets_a_write_escape(self) -> None:
        """A thread flips a directory and an outside symlink while writes run."""
        os.mkdir(self.p("d"))
        stop = threading.Event()

        def flip() -> None:
            while not stop.is_set():
                try:
                    os.rename(self.p("d"), self.p("d-aside"))
                    os.symlink(self.outside, self.p("d"))
                    os.unlink(self.p("d"))
                    os.rename(self.p("d-aside"), self.p("d"))
                except OSError:
                    pass

        flipper = threading.Thread(target=flip)
        flipper.start()
        try:
            for i in range(2000):
                try:
                    self.policy.write_file(self.p("d", f"f{i}"), b"x", create_parents=False)
                except errors.PlexError:
                    pass
        finally:
            stop.set()
            flipper.join()
        self.assertEqual(os.listdir(self.outside), [])


class ReadStatDeleteTests(PolicyCase):
    def test_read_returns_content(self) -> None:
        self.policy.write_file(self.p("f"), b"abc")
        self.assertEqual(self.policy.read_file(self.p("f"), 10), (self.p("f"), b"abc"))

    def test_read_over_limit_is_too_large(self) -> None:
        self.policy.write_file(self.p("f"), b"abcdef")
        self.assertRaises(errors.TooLarge, self.policy.read_file, self.p("f"), 5)

    def test_read_missing_is_not_found(self) -> None:
        self.assertRaises(errors.NotFound, self.policy.read_file, self.p("nope"), 5)

    def test_read_fifo_is_refused_without_blocking(self) -> None:
        os.mkfifo(self.p("fifo"))
        self.assertRaises(errors.InvalidInput, self.policy.read_file, self.p("fifo"), 5)

    def test_stat_of_missing_is_none(self) -> None:
        self.assertIsNone(self.policy.stat(self.p("a", "b")))

    def test_mkdir_creates_with_mode_and_reports_existing(self) -> None:
        self.assertEqual(self.policy.make_directory(self.p("x", "y"), 0o750), (self.p("x", "y"), True))
        self.assertEqual(stat.S_IMODE(os.stat(self.p("x", "y")).st_mode), 0o750)
        self.assertEqual(self.policy.make_directory(self.p("x", "y"))[1], False)

    def test_delete_symlink_removes_the_link_not_its_target(self) -> None:
        self.policy.write_file(self.p("target"), b"keep")
        os.symlink(self.p("target"), self.p("link"))
        self.assertEqual(self.policy.delete(self.p("link")), (self.p("link"), "symlink"))
        self.assertTrue(os.path.exists(self.p("target")))

    def test_delete_link_to_outside_removes_only_the_link(self) -> None:
        with open(os.path.join(self.outside, "precious"), "w") as f:
            f.write("x")
        os.symlink(self.outside, self.p("link"))
        self.policy.delete(self.p("link"), recursive=True)
        self.assertEqual(os.listdir(self.outside), ["precious"])

    def test_delete_root_is_forbidden(self) -> None:
        self.assertRaises(errors.Forbidden, self.policy.delete, self.root, True)

    def test_delete_non_empty_directory_needs_recursive(self) -> None:
        self.policy.write_file(self.p("d", "f"), b"x")
        self.assertRaises(errors.Conflict, self.policy.delete, self.p("d"))
        self.assertEqual(self.policy.delete(self.p("d"), recursive=True)[1], "directory")
        self.assertFalse(os.path.exists(self.p("d")))


def make_deep_tree(testcase: unittest.TestCase, parent: str, depth: int, name: str = "d") -> None:
    """
    ``depth`` nested directories below ``parent``, made through descriptors
    as any program on the host can (no path string past PATH_MAX). Whatever
    the test leaves of ``parent`` is removed by rm(1), which copes with any
    depth (trial's own cleanup does not).
    """
    testcase.addCleanup(subprocess.run, ["rm", "-rf", "--", parent])
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        with open(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as f:
            f.write("x")
    finally:
        os.close(fd)


class RootSwapTests(PolicyCase):
    """A root is opened without following links: a root (or a parent of one)
    swapped for a symlink after startup is refused, not followed."""

    def swap_root_for_link_to_outside(self, directory: str) -> None:
        os.rename(directory, directory + "-aside")
        os.symlink(self.outside, directory)

    def test_root_swapped_for_a_symlink_is_not_opened(self) -> None:
        self.swap_root_for_link_to_outside(self.root)
        e = self.assertRaises(errors.Forbidden, self.policy.open_directory, self.root)
        self.assertEqual(e.message, "path not allowed")

    def test_write_after_the_root_was_swapped_past_the_check_stays_out(self) -> None:
        real_resolve = self.policy.resolve

        def resolve_then_swap(path: object, field: str = "path") -> str:
            result = real_resolve(path, field)
            if not os.path.islink(self.root):
                self.swap_root_for_link_to_outside(self.root)
            return result

        self.policy.resolve = resolve_then_swap  # type: ignore[method-assign]
        self.assertRaises(errors.Forbidden, self.policy.write_file, self.p("x"), b"escaped")
        self.assertEqual(os.listdir(self.outside), [])

    def test_stat_of_a_swapped_root_is_refused(self) -> None:
        self.swap_root_for_link_to_outside(self.root)
        self.policy.resolve = lambda path, field="path": self.root  # type: ignore[method-assign]
        self.assertRaises(errors.Forbidden, self.policy.stat, self.root)

    def test_parent_of_a_root_swapped_for_a_symlink_is_not_followed(self) -> None:
        parent = os.path.join(os.path.dirname(self.root), "parent")
        nested = os.path.join(parent, "app")
        os.makedirs(nested)
        os.makedirs(os.path.join(self.outside, "app"))
        policy = PathPolicy([nested])
        self.swap_root_for_link_to_outside(parent)
        self.assertRaises(errors.Forbidden, policy.open_directory, nested, True)
        self.assertEqual(os.listdir(os.path.join(self.outside, "app")), [])

    def test_missing_root_is_created_without_following_links(self) -> None:
        policy = PathPolicy([os.path.join(self.root, "later", "root")])
        policy.write_file(self.p("later", "root", "f"), b"x")
        with open(self.p("later", "root", "f"), "rb") as f:
            self.assertEqual(f.read(), b"x")


class PathLengthTests(PolicyCase):
    def test_path_of_path_max_bytes_is_too_long(self) -> None:
        path = self.root + "/" + "/".join(["b" * 100] * 41)
        e = self.assertRaises(errors.InvalidInput, self.policy.make_directory, path)
        self.assertEqual(e.message, "path too long")
        self.assertEqual(os.listdir(self.root), [])

    def test_path_resolving_past_path_max_is_too_long(self) -> None:
        """A short path through a symlink into a deep tree cannot go past PATH_MAX either."""
        deep = "/".join(["c" * 200] * 19)
        os.makedirs(self.p(deep))
        os.symlink(deep, self.p("short"))
        e = self.assertRaises(errors.InvalidInput, self.policy.make_directory, self.p("short", "e" * 200, "f"))
        self.assertEqual(e.message, "path too long")

    def test_name_longer_than_name_max_is_invalid_input(self) -> None:
        e = self.assertRaises(errors.InvalidInput, self.policy.write_file, self.p("n" * 300), b"x")
        self.assertEqual(e.message, "path too long")
        self.assertIn("n" * 300, e.details)


class DeleteDepthTests(PolicyCase):
    def test_delete_removes_a_tree_deeper_than_the_recursion_limit(self) -> None:
        make_deep_tree(self, self.root, 3000)
        self.assertEqual(self.policy.delete(self.p("d"), recursive=True), (self.p("d"), "directory"))
        self.assertEqual(os.listdir(self.root), [])

    def test_delete_removes_a_tree_deeper_than_the_descriptor_limit(self) -> None:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        make_deep_tree(self, self.root, 1000)
        self.policy.delete(self.p("d"), recursive=True)
        self.assertEqual(os.listdir(self.root), [])

    def test_delete_of_a_wide_and_deep_tree_leaves_nothing(self) -> None:
        for i in range(20):
            make_deep_tree(self, self.root, 50, name=f"w{i}")
            os.rename(self.p(f"w{i}"), self.p(f"d{i}"))
        os.makedirs(self.p("top"))
        for i in range(20):
            os.rename(self.p(f"d{i}"), self.p("top", f"d{i}"))
            os.symlink(self.outside, self.p("top", f"d{i}", "out"))
        with open(os.path.join(self.outside, "precious"), "w") as f:
            f.write("keep")
        self.policy.delete(self.p("top"), recursive=True)
        self.assertEqual(os.listdir(self.root), [])
        self.assertEqual(os.listdir(self.outside), ["precious"])

    def test_directory_moved_away_while_emptied_stops_the_delete(self) -> None:
        from plexagent.host.files import paths

        make_deep_tree(self, self.root, 3)
        real_remove_entries = paths._remove_entries
        moved = []

        def remove_entries_then_move(fd: int) -> list[str]:
            names = real_remove_entries(fd)
            if not moved and os.fstat(fd).st_ino == os.stat(self.p("d", "d", "d")).st_ino:
                # While the walk is inside d/d/d, d/d leaves the tree being deleted.
                os.rename(self.p("d", "d"), self.p("moved"))
                moved.append(True)
            return names

        paths._remove_entries = remove_entries_then_move  # type: ignore[assignment]
        self.addCleanup(setattr, paths, "_remove_entries", real_remove_entries)
        e = self.assertRaises(errors.Conflict, self.policy.delete, self.p("d"), True)
        self.assertEqual(e.message, "directory changed while deleting")
        # The walk climbed out of "moved" to a parent it never entered: it stopped there.
        self.assertEqual(sorted(os.listdir(self.root)), ["d", "moved"])


class PathErrorMappingTests(unittest.TestCase):
    """One table maps OS errors on a client's path: its faults 4xx, the host's 5xx."""

    def test_each_errno_maps_to_its_status_naming_the_path(self) -> None:
        import errno

        from plexagent.fileio import path_error
        from plexagent.http.responses import status_for

        expected = {
            errno.ENAMETOOLONG: 400, errno.ELOOP: 400, errno.EINVAL: 400, errno.ENXIO: 400, errno.ENODEV: 400,
            errno.ENOTDIR: 409, errno.EISDIR: 409, errno.EEXIST: 409, errno.ENOTEMPTY: 409, errno.EBUSY: 409,
            errno.ETXTBSY: 409, errno.EROFS: 409, errno.EPERM: 403, errno.EACCES: 403, errno.EFBIG: 413,
            errno.EMLINK: 507, errno.ENOSPC: 507, errno.EDQUOT: 507, errno.EIO: 500, errno.ENOMEM: 500,
            errno.EXDEV: 500, errno.ESTALE: 500,
        }
        for number, status in expected.items():
            error = path_error(OSError(number, os.strerror(number)), "/app/some/file")
            self.assertEqual(status_for(error), status, errno.errorcode[number])
            self.assertIn("/app/some/file", error.details, errno.errorcode[number])


class ResolveProperty(unittest.TestCase):
    """Whatever the mix of names, dots and symlinks, a resolved path is inside a root."""

    def test_resolved_paths_are_always_inside_the_root(self) -> None:
        from hypothesis import given, settings
        from hypothesis import strategies as st

        base = os.path.realpath(self.mktemp())
        root = os.path.join(base, "app")
        outside = os.path.join(base, "outside")
        os.makedirs(os.path.join(root, "a", "b"))
        os.makedirs(outside)
        os.symlink(outside, os.path.join(root, "a", "out"))
        os.symlink("../..", os.path.join(root, "a", "up2"))
        os.symlink("b", os.path.join(root, "a", "in"))
        policy = PathPolicy([root])
        names = st.sampled_from(["a", "b", "..", ".", "out", "up2", "in", "", "app", "app-evil", "outside"])

        @settings(max_examples=400, deadline=None)
        @given(st.lists(names, max_size=8))
        def check(parts: list[str]) -> None:
            path = root + "/" + "/".join(parts)
            try:
                real = policy.resolve(path)
            except errors.Forbidden:
                return
            self.assertTrue(real == root or real.startswith(root + "/"), (path, real))
            self.assertEqual(real, os.path.realpath(real))

        check()
