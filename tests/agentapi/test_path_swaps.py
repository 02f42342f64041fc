"""
Every route that touches host files goes through the one path policy: a
directory (or an allowed root itself) swapped for a symlink to the outside
after each check is refused, and nothing outside is read, written or
removed.

(nginx's configuration is written through /files/write; /docker/build and
volumes hand checked paths to Docker, which opens them itself: a swap in
between is the one race the agent cannot close for them.)
"""

from __future__ import annotations

import base64
import io
import os
from typing import Any, Awaitable, Callable

from twisted.trial import unittest

from tests.agentapi.support import RunningAgentAPI, SwapAfterEachCheck, tree
from tests.agentapi.test_git import make_repository
from tests.agentapi.test_uploads import SITE

SECRET = "outside-" + os.urandom(6).hex()

Route = Callable[[RunningAgentAPI, str], Awaitable[tuple[int, Any]]]


def _chunk(agent: RunningAgentAPI, path: str) -> Awaitable[tuple[int, Any]]:
    params = {"chunk_id": "swap-" + os.urandom(4).hex(), "chunk_index": "0", "total_chunks": "1",
              "extract_path": path + "/site"}
    return agent.call("POST", "/upload/tar/chunked", data=SITE, params=params)


#: route name -> a request naming a path below ``path`` (the swapped directory).
ROUTES: dict[str, Route] = {
    "files/write": lambda a, p: a.post_json("/files/write", {"path": p + "/x", "content": "escaped"}),
    "files/read": lambda a, p: a.get("/files/read", path=p + "/x"),
    "files/exists": lambda a, p: a.get("/files/exists", path=p + "/x"),
    "files/mkdir": lambda a, p: a.post_json("/files/mkdir", {"path": p + "/new/dir"}),
    "files/delete": lambda a, p: a.post_json("/files/delete", {"path": p + "/x"}),
    "files/delete recursive": lambda a, p: a.post_json("/files/delete", {"path": p + "/sub", "recursive": True}),
    "upload/tar (JSON)": lambda a, p: a.post_json("/upload/tar", {"data": base64.b64encode(SITE).decode()},
                                                  params={"extract_path": p + "/site"}),
    "upload/tar (multipart)": lambda a, p: a.call(
        "POST", "/upload/tar", params={"extract_path": p + "/site"},
        files={"tar_file": ("site.tar.gz", "application/gzip", io.BytesIO(SITE))}),
    "upload/tar/stream": lambda a, p: a.call("POST", "/upload/tar/stream", data=SITE,
                                             params={"extract_path": p + "/site"}),
    "upload/tar/stream into an existing directory": lambda a, p: a.call(
        "POST", "/upload/tar/stream", data=SITE, params={"extract_path": p + "/sub"}),
    "upload/tar/stream into the swapped directory itself": lambda a, p: a.call(
        "POST", "/upload/tar/stream", data=SITE, params={"extract_path": p}),
    "upload/tar/chunked": _chunk,
    "git/clone target_path": lambda a, p: a.post_json("/git/clone", {
        "url": "file://" + a.extra_roots["sources"] + "/repo", "target_path": p + "/clone"}),
    "git/clone url": lambda a, p: a.post_json("/git/clone", {
        "url": "file://" + p + "/repo", "target_path": a.extra_roots["clones"] + "/clone"}),
}


class SwappedPathTests(unittest.TestCase):
    def setUp(self) -> None:
        self.agent = RunningAgentAPI(self, extra_roots=("sources", "clones"), git_timeout=30.0)
        make_repository(os.path.join(self.agent.extra_roots["sources"], "repo"))

    def populate(self, inside: str) -> None:
        """The inside and the outside look alike: only a followed link could tell them apart."""
        for top in (inside, self.agent.outside):
            os.makedirs(os.path.join(top, "sub", "deeper"))
            with open(os.path.join(top, "x"), "w") as f:
                f.write(SECRET if top == self.agent.outside else "inside")
            make_repository(os.path.join(top, "repo"))

    async def check_each_route(self, swapped: str) -> None:
        policy = self.agent.context.services["paths"]
        outside_before = tree(self.agent.outside)
        for name, route in ROUTES.items():
            swap = SwapAfterEachCheck(self, policy, swapped, self.agent.outside)
            code, body = await route(self.agent, swapped)
            swap.restore()
            self.assertEqual((code, body.get("error") if isinstance(body, dict) else body),
                             (403, "path not allowed"), name)
            self.assertGreater(swap.checks, 0, name)
            self.assertNotIn(SECRET, str(body), name)
            self.assertEqual(tree(self.agent.outside), outside_before, name)
        self.assertEqual(os.listdir(self.agent.extra_roots["clones"]), [])

    async def test_a_directory_swapped_after_each_check_is_refused_by_every_route(self) -> None:
        self.populate(self.agent.p("d"))
        await self.check_each_route(self.agent.p("d"))

    async def test_an_allowed_root_swapped_after_each_check_is_refused_by_every_route(self) -> None:
        """The root itself becomes a link to the outside, as /tmp/app swapped for a link to /etc."""
        self.populate(self.agent.root)
        await self.check_each_route(self.agent.root)

    def test_the_dockerfile_is_read_through_the_policy(self) -> None:
        from plexagent import errors
        from plexagent.host.docker.builds import dockerfile_document

        inside = self.agent.p("d")
        self.populate(inside)
        policy = self.agent.context.services["paths"]
        swap = SwapAfterEachCheck(self, policy, inside, self.agent.outside)
        e = self.assertRaises(errors.Forbidden, dockerfile_document, policy, inside, "x", False)
        swap.restore()
        self.assertEqual(e.message, "path not allowed")
        self.assertGreater(swap.checks, 0)
