"""/files/*: the seed's shapes, the path policy, limits and encodings."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
from typing import Any

from twisted.trial import unittest

from tests.agentapi.support import RunningAgentAPI
from tests.host.files.test_paths import make_deep_tree
from tests.test_drills_disk import mount_tmpfs


class FilesTests(unittest.TestCase):
    def setUp(self) -> None:
        self.agent = RunningAgentAPI(self, max_read_bytes=100)

    async def test_write_then_read_has_the_seeds_shape(self) -> None:
        path = self.agent.p("conf", "config.json")
        code, body = await self.agent.post_json("/files/write", {"path": path, "content": "héllo"})
        self.assertEqual((code, body["success"], body["path"], body["size"]), (200, True, path, 6))
        code, body = await self.agent.get("/files/read", path=path)
        self.assertEqual((code, body), (200, {"path": path, "content": "héllo", "size": 6}))

    async def test_mode_accepts_seed_integer_and_octal_string(self) -> None:
        await self.agent.post_json("/files/write", {"path": self.agent.p("a"), "content": "x", "mode": 644})
        await self.agent.post_json("/files/write", {"path": self.agent.p("b"), "content": "x", "mode": "0600"})
        self.assertEqual(stat.S_IMODE(os.stat(self.agent.p("a")).st_mode), 0o644)
        self.assertEqual(stat.S_IMODE(os.stat(self.agent.p("b")).st_mode), 0o600)

    async def test_invalid_mode_is_400(self) -> None:
        for mode in (999, "rwx", 4755, True):
            code, body = await self.agent.post_json("/files/write", {"path": self.agent.p("m"), "content": "x", "mode": mode})
            self.assertEqual((code, body["error"]), (400, "invalid mode"))
        self.assertFalse(os.path.exists(self.agent.p("m")))

    async def test_write_outside_allowed_paths_is_403_and_creates_nothing(self) -> None:
        target = os.path.join(self.agent.outside, "new", "x")
        code, body = await self.agent.post_json("/files/write", {"path": target, "content": "x"})
        self.assertEqual((code, body), (403, {"error": "path not allowed", "details": target}))
        self.assertEqual(os.listdir(self.agent.outside), [])

    async def test_sibling_prefix_of_a_root_is_403(self) -> None:
        target = self.agent.root + "-evil/x"
        code, body = await self.agent.post_json("/files/write", {"path": target, "content": "x"})
        self.assertEqual(code, 403)
        self.assertFalse(os.path.exists(self.agent.root + "-evil"))

    async def test_dotdot_escape_is_403(self) -> None:
        code, _ = await self.agent.get("/files/read", path=self.agent.p("..", "outside", "x"))
        self.assertEqual(code, 403)

    async def test_write_through_symlink_to_outside_is_403(self) -> None:
        os.symlink(self.agent.outside, self.agent.p("link"))
        code, _ = await self.agent.post_json("/files/write", {"path": self.agent.p("link", "x"), "content": "x"})
        self.assertEqual(code, 403)
        self.assertEqual(os.listdir(self.agent.outside), [])

    async def test_read_over_limit_is_413(self) -> None:
        with open(self.agent.p("big"), "wb") as f:
            f.write(b"x" * 101)
        code, body = await self.agent.get("/files/read", path=self.agent.p("big"))
        self.assertEqual((code, body["error"]), (413, "file too large to read"))

    async def test_non_utf8_read_is_refused_unless_base64_is_asked(self) -> None:
        with open(self.agent.p("bin"), "wb") as f:
            f.write(b"\xff\x00\xfe")
        code, body = await self.agent.get("/files/read", path=self.agent.p("bin"))
        self.assertEqual((code, body["error"]), (400, "file is not valid UTF-8"))
        code, body = await self.agent.get("/files/read", path=self.agent.p("bin"), encoding="base64")
        self.assertEqual(code, 200)
        self.assertEqual(base64.b64decode(body["content"]), b"\xff\x00\xfe")
        self.assertEqual(body["size"], 3)

    async def test_write_base64_content(self) -> None:
        content = base64.b64encode(b"\x00\x01").decode()
        code, _ = await self.agent.post_json(
            "/files/write", {"path": self.agent.p("b"), "content": content, "encoding": "base64"}
        )
        self.assertEqual(code, 200)
        with open(self.agent.p("b"), "rb") as f:
            self.assertEqual(f.read(), b"\x00\x01")

    async def test_read_missing_is_404(self) -> None:
        code, body = await self.agent.get("/files/read", path=self.agent.p("nope"))
        self.assertEqual((code, body["error"]), (404, "path not found"))

    async def test_exists_shape(self) -> None:
        with open(self.agent.p("f"), "wb") as f:
            f.write(b"1234")
        code, body = await self.agent.get("/files/exists", path=self.agent.p("f"))
        self.assertEqual(code, 200)
        self.assertEqual((body["exists"], body["path"], body["size"]), (True, self.agent.p("f"), 4))
        self.assertRegex(body["modified"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        code, body = await self.agent.get("/files/exists", path=self.agent.p("g"))
        self.assertEqual((code, body), (200, {"exists": False, "path": self.agent.p("g")}))

    async def test_exists_outside_is_403(self) -> None:
        code, _ = await self.agent.get("/files/exists", path="/etc/passwd")
        self.assertEqual(code, 403)

    async def test_mkdir_with_parents_and_mode(self) -> None:
        code, body = await self.agent.post_json("/files/mkdir", {"path": self.agent.p("d", "e"), "mode": 750})
        self.assertEqual((code, body["created"]), (201, True))
        self.assertEqual(stat.S_IMODE(os.stat(self.agent.p("d", "e")).st_mode), 0o750)
        code, body = await self.agent.post_json("/files/mkdir", {"path": self.agent.p("d", "e")})
        self.assertEqual((code, body["created"]), (200, False))

    async def test_delete_file_then_404(self) -> None:
        with open(self.agent.p("old"), "w") as f:
            f.write("x")
        code, body = await self.agent.post_json("/files/delete", {"path": self.agent.p("old")})
        self.assertEqual((code, body["deleted"]), (200, "file"))
        self.assertFalse(os.path.exists(self.agent.p("old")))
        code, _ = await self.agent.post_json("/files/delete", {"path": self.agent.p("old")})
        self.assertEqual(code, 404)

    async def test_delete_of_an_allowed_root_is_403(self) -> None:
        code, _ = await self.agent.post_json("/files/delete", {"path": self.agent.root, "recursive": True})
        self.assertEqual(code, 403)
        self.assertTrue(os.path.isdir(self.agent.root))

    async def test_requests_without_api_key_are_401(self) -> None:
        code, _ = await self.agent.call("GET", "/files/read", key=None, params={"path": self.agent.p("x")})
        self.assertEqual(code, 401)
        code, _ = await self.agent.call("POST", "/files/write", key="wrong", data=b"{}")
        self.assertEqual(code, 401)

    async def test_missing_path_is_400(self) -> None:
        code, body = await self.agent.post_json("/files/write", {"content": "x"})
        self.assertEqual((code, body["error"]), (400, "path is required"))

    async def test_a_body_that_is_not_strict_json_is_400_invalid_json_body(self) -> None:
        for body in (b'{"path": NaN}', b'{"path": "\\udc00"}', b"[" * 100_000 + b"]" * 100_000):
            code, doc = await self.agent.call("POST", "/files/mkdir", data=body)
            self.assertEqual((code, doc["error"]), (400, "invalid JSON body"), body[:20])
            self.assertTrue(doc["details"])
        self.assertEqual(os.listdir(self.agent.root), [])


LONG_NAME = "n" * 300


class PathErrorTests(unittest.TestCase):
    """
    An OS error about the path a client named is answered 4xx naming it
    (ENAMETOOLONG, ENOTDIR, EISDIR, EROFS, EPERM, EBUSY, ...), on every
    route that touches host files; a full disk stays 507 (see the disk drill).
    """

    def setUp(self) -> None:
        self.agent = RunningAgentAPI(self, max_read_bytes=100)

    def routes(self) -> dict[str, Any]:
        from tests.agentapi.test_uploads import SITE

        agent = self.agent
        site = base64.b64encode(SITE).decode()
        return {
            "write": lambda p: agent.post_json("/files/write", {"path": p, "content": "x"}),
            "read": lambda p: agent.get("/files/read", path=p),
            "exists": lambda p: agent.get("/files/exists", path=p),
            "mkdir": lambda p: agent.post_json("/files/mkdir", {"path": p}),
            "delete": lambda p: agent.post_json("/files/delete", {"path": p, "recursive": True}),
            "upload/tar": lambda p: agent.post_json("/upload/tar", {"data": site}, params={"extract_path": p}),
            "upload/tar/stream": lambda p: agent.call("POST", "/upload/tar/stream", data=SITE,
                                                      params={"extract_path": p}),
            "upload/tar/chunked": lambda p: agent.call("POST", "/upload/tar/chunked", data=SITE, params={
                "chunk_id": "c-" + os.urandom(4).hex(), "chunk_index": "0", "total_chunks": "1", "extract_path": p}),
            "git/clone": lambda p: agent.post_json("/git/clone", {"url": "file://" + agent.p("no-repo"),
                                                                  "target_path": p}),
        }

    async def test_a_300_byte_name_is_400_naming_the_path_on_every_route(self) -> None:
        path = self.agent.p("dir", LONG_NAME)
        os.makedirs(self.agent.p("dir"))
        for route, call in self.routes().items():
            code, body = await call(path)
            self.assertEqual((code, body["error"]), (400, "path too long"), route)
            self.assertIn(LONG_NAME, body["details"], route)
        self.assertEqual(os.listdir(self.agent.root), ["dir"])
        self.assertEqual(os.listdir(self.agent.p("dir")), [])

    async def test_a_path_longer_than_path_max_is_400_on_every_route(self) -> None:
        path = self.agent.root + "/a" * 3000
        for route, call in self.routes().items():
            code, body = await call(path)
            self.assertEqual((code, body["error"]), (400, "path too long"), route)
        self.assertEqual(os.listdir(self.agent.root), [])

    async def test_a_file_used_as_a_directory_is_409_on_every_route_that_creates(self) -> None:
        with open(self.agent.p("file"), "w") as f:
            f.write("x")
        routes = self.routes()
        for route in ("write", "read", "mkdir", "delete", "upload/tar", "upload/tar/stream"):
            code, body = await routes[route](self.agent.p("file", "below"))
            self.assertEqual((code, body["error"]), (409, "not a directory"), route)
            self.assertIn(self.agent.p("file", "below"), body["details"], route)

    async def test_writing_over_a_directory_is_409(self) -> None:
        os.makedirs(self.agent.p("d"))
        code, body = await self.agent.post_json("/files/write", {"path": self.agent.p("d"), "content": "x"})
        self.assertEqual((code, body["error"]), (409, "path is a directory"))

    async def test_deleting_a_non_empty_directory_without_recursive_is_409(self) -> None:
        os.makedirs(self.agent.p("full", "inner"))
        code, body = await self.agent.post_json("/files/delete", {"path": self.agent.p("full")})
        self.assertEqual((code, body["error"]), (409, "directory not empty"))
        self.assertIn(self.agent.p("full"), body["details"])
        self.assertTrue(os.path.isdir(self.agent.p("full", "inner")))

    async def test_a_symlink_loop_is_4xx(self) -> None:
        os.symlink("b", self.agent.p("a"))
        os.symlink("a", self.agent.p("b"))
        for route, call in self.routes().items():
            code, body = await call(self.agent.p("a", "x"))
            self.assertTrue(400 <= code < 500 and "error" in body, (route, code, body))

    async def test_read_only_file_system_is_409(self) -> None:
        ro = self.agent.p("ro")
        os.makedirs(ro)
        mount_tmpfs(self, ro, "size=64k")
        with open(os.path.join(ro, "kept"), "w") as f:
            f.write("x")
        subprocess.run(["mount", "-o", "remount,ro", ro], check=True)
        routes = self.routes()
        for route in ("write", "mkdir", "delete", "upload/tar", "upload/tar/stream"):
            target = os.path.join(ro, "kept") if route == "delete" else os.path.join(ro, "new")
            code, body = await routes[route](target)
            self.assertEqual((code, body["error"]), (409, "read-only file system"), route)
            self.assertIn(ro, body["details"])
        self.assertEqual(os.listdir(ro), ["kept"])

    async def test_immutable_file_is_403_operation_not_permitted(self) -> None:
        fs = self.agent.p("fs")
        os.makedirs(fs)
        mount_tmpfs(self, fs, "size=64k")
        locked = os.path.join(fs, "locked")
        with open(locked, "w") as f:
            f.write("old")
        subprocess.run(["chattr", "+i", locked], check=True)
        self.addCleanup(subprocess.run, ["chattr", "-i", locked])
        code, body = await self.agent.post_json("/files/write", {"path": locked, "content": "new"})
        self.assertEqual((code, body["error"]), (403, "operation not permitted"))
        code, body = await self.agent.post_json("/files/delete", {"path": locked})
        self.assertEqual((code, body["error"]), (403, "operation not permitted"))
        with open(locked) as f:
            self.assertEqual(f.read(), "old")
        self.assertEqual(os.listdir(fs), ["locked"])

    async def test_deleting_a_mount_point_is_409_busy(self) -> None:
        mnt = self.agent.p("mnt")
        os.makedirs(mnt)
        mount_tmpfs(self, mnt, "size=64k")
        code, body = await self.agent.post_json("/files/delete", {"path": mnt})
        self.assertEqual((code, body["error"]), (409, "path is busy"))
        self.assertTrue(os.path.ismount(mnt))


class TreeDepthTests(unittest.TestCase):
    """Whatever the agent (or anything else on the host) can create, /files/delete removes."""

    def setUp(self) -> None:
        self.agent = RunningAgentAPI(self)
        # rm(1) copes with any depth should a test fail half-way; trial's cleanup does not.
        self.addCleanup(subprocess.run, ["rm", "-rf", "--", self.agent.root])

    async def test_delete_removes_a_3000_deep_tree(self) -> None:
        make_deep_tree(self, self.agent.root, 3000)
        code, body = await self.agent.post_json("/files/delete", {"path": self.agent.p("d"), "recursive": True})
        self.assertEqual((code, body["deleted"]), (200, "directory"))
        self.assertEqual(os.listdir(self.agent.root), [])

    async def test_mkdir_of_a_3000_deep_path_is_400_and_creates_nothing(self) -> None:
        code, body = await self.agent.post_json("/files/mkdir", {"path": self.agent.root + "/d" * 3000})
        self.assertEqual((code, body["error"]), (400, "path too long"))
        self.assertEqual(os.listdir(self.agent.root), [])

    async def test_the_deepest_tree_mkdir_accepts_is_deleted_again(self) -> None:
        depth = (4095 - len(self.agent.root)) // 2
        code, _ = await self.agent.post_json("/files/mkdir", {"path": self.agent.root + "/d" * depth})
        self.assertEqual(code, 201)
        self.assertGreater(depth, 1000)  # past Python's recursion limit
        code, _ = await self.agent.post_json("/files/delete", {"path": self.agent.p("d"), "recursive": True})
        self.assertEqual(code, 200)
        self.assertEqual(os.listdir(self.agent.root), [])

    async def test_tar_members_past_path_max_are_skipped_and_the_rest_is_deleted_again(self) -> None:
        from tests.host.files.test_tarsafe import archive, member

        # An extract_path close to PATH_MAX, then 128-deep members below it.
        base = self.agent.root + "/" + "/".join(["e" * 200] * ((3600 - len(self.agent.root)) // 201))
        deep = "/".join(["m" * 20] * 40)
        data = archive(member("short", data=b"s"), member(deep + "/far", data=b"f"))
        code, body = await self.agent.post_json("/upload/tar", {"data": base64.b64encode(data).decode()},
                                                params={"extract_path": base})
        self.assertEqual(code, 200, body)
        self.assertEqual((body["files"], body["skipped"]), (1, [{"name": deep + "/far", "reason": "path too long"}]))
        code, _ = await self.agent.post_json("/files/delete", {"path": self.agent.p("e" * 200), "recursive": True})
        self.assertEqual(code, 200)
        self.assertEqual(os.listdir(self.agent.root), [])
