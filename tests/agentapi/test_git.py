"""/git/clone with real repositories over file:// and smart HTTP with basic auth."""

from __future__ import annotations

import base64
import os
import subprocess

from twisted.internet import protocol, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from twisted.web import resource, server, twcgi

from tests.agentapi.support import RunningAgentAPI

USER = "deployer"
PASSWORD = "s3cret-Pa55word-never-on-disk"
GIT_ENV = {"PATH": os.environ["PATH"], "HOME": "/nonexistent", "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}


def make_repository(path: str) -> None:
    """A repository with two commits on main and a branch 'feature' (test setup, not agent code)."""
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=path, env=GIT_ENV, check=True, capture_output=True)

    os.makedirs(path)
    git("init", "-q", "-b", "main")
    with open(os.path.join(path, "README"), "w") as f:
        f.write("one\n")
    git("add", "README")
    git("commit", "-q", "-m", "one")
    with open(os.path.join(path, "README"), "a") as f:
        f.write("two\n")
    git("commit", "-q", "-am", "two")
    git("checkout", "-q", "-b", "feature")
    with open(os.path.join(path, "FEATURE"), "w") as f:
        f.write("f\n")
    git("add", "FEATURE")
    git("commit", "-q", "-m", "feature")
    git("checkout", "-q", "main")


def files_containing(directory: str, needle: bytes) -> list[str]:
    found = []
    for current, dirs, files in os.walk(directory):
        for name in files + dirs:
            path = os.path.join(current, name)
            if needle in path.encode():
                found.append(path)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    if needle in f.read():
                        found.append(path)
    return found


class GitBackend(twcgi.CGIScript):
    """``git http-backend`` as a CGI script serving ``project_root``."""

    def __init__(self, project_root: str) -> None:
        exec_path = subprocess.run(["git", "--exec-path"], capture_output=True, text=True, check=True).stdout.strip()
        super().__init__(os.path.join(exec_path, "git-http-backend"))
        self.project_root = project_root

    def runProcess(self, env, request, qargs=[]):
        env["GIT_PROJECT_ROOT"] = self.project_root
        env["GIT_HTTP_EXPORT_ALL"] = "1"
        return super().runProcess(env, request, qargs)


class BasicAuthGitServer(resource.Resource):
    """Smart HTTP on loopback, behind HTTP basic auth."""

    isLeaf = True

    def __init__(self, project_root: str) -> None:
        super().__init__()
        self.backend = GitBackend(project_root)
        self.expected = b"Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode())
        self.authorized = 0
        self.refused = 0

    def render(self, request):
        if request.getHeader(b"authorization") != self.expected:
            self.refused += 1
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Basic realm="git"')
            return b"authentication required\n"
        self.authorized += 1
        # twcgi joins postpath as text to build PATH_INFO.
        request.postpath = [segment.decode() for segment in request.postpath]
        return self.backend.render(request)


class CloneCase(unittest.TestCase):
    def setUp(self) -> None:
        self.agent = RunningAgentAPI(self, git_timeout=30.0)
        self.source = self.agent.p("src", "repo")
        make_repository(self.source)

    async def clone(self, **body):
        return await self.agent.post_json("/git/clone", body)


class FileCloneTests(CloneCase):
    async def test_clone_over_file_url(self) -> None:
        target = self.agent.p("work", "clone")
        code, body = await self.clone(url="file://" + self.source, target_path=target)
        self.assertEqual((code, body["success"], body["path"], body["branch"]), (200, True, target, "main"))
        with open(os.path.join(target, "README")) as f:
            self.assertEqual(f.read(), "one\ntwo\n")
        self.assertEqual(len(body["commit"]), 40)

    async def test_branch_and_depth(self) -> None:
        target = self.agent.p("feature")
        code, body = await self.clone(url="file://" + self.source, target_path=target, branch="feature", depth=1)
        self.assertEqual((code, body["branch"]), (200, "feature"))
        self.assertTrue(os.path.exists(os.path.join(target, "FEATURE")))
        self.assertTrue(os.path.exists(os.path.join(target, ".git", "shallow")))

    async def test_into_existing_empty_directory(self) -> None:
        target = self.agent.p("empty")
        os.makedirs(target)
        code, _ = await self.clone(url="file://" + self.source, target_path=target)
        self.assertEqual(code, 200)
        self.assertTrue(os.path.isfile(os.path.join(target, "README")))

    async def test_non_empty_target_is_409(self) -> None:
        target = self.agent.p("busy")
        os.makedirs(target)
        with open(os.path.join(target, "keep"), "w") as f:
            f.write("x")
        code, body = await self.clone(url="file://" + self.source, target_path=target)
        self.assertEqual((code, body["error"]), (409, "target_path is not empty"))
        self.assertEqual(os.listdir(target), ["keep"])

    async def test_target_outside_allowed_paths_is_403(self) -> None:
        target = os.path.join(self.agent.outside, "clone")
        code, body = await self.clone(url="file://" + self.source, target_path=target)
        self.assertEqual((code, body), (403, {"error": "path not allowed", "details": target}))
        self.assertEqual(os.listdir(self.agent.outside), [])

    async def test_file_url_outside_allowed_paths_is_403(self) -> None:
        outside_repo = os.path.join(self.agent.outside, "repo")
        make_repository(outside_repo)
        code, _ = await self.clone(url="file://" + outside_repo, target_path=self.agent.p("x"))
        self.assertEqual(code, 403)
        self.assertFalse(os.path.exists(self.agent.p("x")))

    async def test_dangerous_urls_and_options_are_400(self) -> None:
        for body in ({"url": "ext::sh -c touch% /tmp/pwned"}, {"url": "--upload-pack=touch /tmp/x"},
                     {"url": "file://" + self.source, "branch": "--upload-pack=x"},
                     {"url": "file://" + self.source, "depth": 0}):
            code, _ = await self.clone(target_path=self.agent.p("bad"), **body)
            self.assertEqual(code, 400, body)
        self.assertFalse(os.path.exists(self.agent.p("bad")))

    async def test_missing_repository_returns_gits_message(self) -> None:
        code, body = await self.clone(url="file://" + self.agent.p("nothing-here"), target_path=self.agent.p("y"))
        self.assertEqual((code, body["error"]), (500, "git clone failed"))
        self.assertIn("does not appear to be a git repository", body["details"])
        self.assertNotIn("Cloning into", body["details"])
        self.assertFalse(os.path.exists(self.agent.p("y")))
        self.assertEqual(os.listdir(os.path.join(self.agent.data_dir, "git-staging")), [])


class StagingTests(unittest.TestCase):
    def test_staging_older_than_twice_the_timeout_is_removed(self) -> None:
        from plexagent.gitclone import GitCloner
        from plexagent.paths import PathPolicy

        work = os.path.realpath(self.mktemp())
        for name, age in (("old", 700), ("running", 100)):
            os.makedirs(os.path.join(work, name))
            os.utime(os.path.join(work, name), (1_000_000 - age, 1_000_000 - age))
        cloner = GitCloner(PathPolicy([work]), work, reactor, timeout=300)
        self.assertEqual(cloner.remove_stale_staging(now=1_000_000), ["old"])
        self.assertEqual(os.listdir(work), ["running"])


class HTTPCloneTests(CloneCase):
    def setUp(self) -> None:
        super().setUp()
        self.server = BasicAuthGitServer(os.path.dirname(self.source))
        self.port = reactor.listenTCP(0, server.Site(self.server), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.url = f"http://127.0.0.1:{self.port.getHost().port}/repo"
        self.logged: list[str] = []
        observer = lambda event: self.logged.append(repr(event) + (formatEvent(event) or ""))
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def assertPasswordNowhere(self) -> None:
        for directory in (self.agent.root, self.agent.data_dir):
            self.assertEqual(files_containing(directory, PASSWORD.encode()), [])
        self.assertEqual([line for line in self.logged if PASSWORD in line], [])

    async def test_clone_with_username_and_password(self) -> None:
        target = self.agent.p("private")
        code, body = await self.clone(url=self.url, target_path=target, username=USER, password=PASSWORD)
        self.assertEqual((code, body["url"]), (200, self.url))
        self.assertGreater(self.server.authorized, 0)
        self.assertTrue(os.path.isfile(os.path.join(target, "README")))
        with open(os.path.join(target, ".git", "config")) as f:
            config = f.read()
        self.assertIn(self.url, config)
        self.assertNotIn(USER, config)
        self.assertPasswordNowhere()

    async def test_credentials_in_the_url_are_moved_out_of_it(self) -> None:
        target = self.agent.p("from-url")
        url = self.url.replace("http://", f"http://{USER}:{PASSWORD}@")
        code, body = await self.clone(url=url, target_path=target)
        self.assertEqual((code, body["url"]), (200, self.url))
        self.assertNotIn(PASSWORD, str(body))
        self.assertPasswordNowhere()

    async def test_without_credentials_fails_with_gits_message(self) -> None:
        code, body = await self.clone(url=self.url, target_path=self.agent.p("anon"))
        self.assertEqual((code, body["error"]), (500, "git clone failed"))
        self.assertIn("Authentication failed", body["details"])
        self.assertFalse(os.path.exists(self.agent.p("anon")))

    async def test_wrong_password_error_is_scrubbed(self) -> None:
        wrong = "wrong-" + PASSWORD
        url = self.url.replace("http://", f"http://{USER}:{wrong}@")
        code, body = await self.clone(url=url, target_path=self.agent.p("denied"))
        self.assertEqual(code, 500)
        self.assertNotIn(wrong, str(body))
        self.assertEqual(files_containing(self.agent.data_dir, wrong.encode()), [])
        self.assertGreater(self.server.refused, 0)


class SilentServer(protocol.Protocol):
    """Accepts and never answers."""


class TimeoutTests(unittest.TestCase):
    async def test_clone_past_timeout_is_killed_and_503(self) -> None:
        agent = RunningAgentAPI(self, git_timeout=0.5)
        factory = protocol.ServerFactory.forProtocol(SilentServer)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        code, body = await agent.post_json("/git/clone", {
            "url": f"http://127.0.0.1:{port.getHost().port}/repo", "target_path": agent.p("slow")})
        self.assertEqual((code, body["error"]), (503, "git clone timed out"))
        self.assertFalse(os.path.exists(agent.p("slow")))


class ParseTests(unittest.TestCase):
    def test_credentials_are_taken_out_of_the_url(self) -> None:
        from plexagent.gitclone import parse_clone_request

        req = parse_clone_request({"url": "https://bob:p%40ss@example.com/r.git", "target_path": "/app/r"})
        self.assertEqual((req.url, req.username, req.password), ("https://example.com/r.git", "bob", "p@ss"))
        self.assertNotIn("p@ss", repr(req))

    def test_token_alone_gets_a_placeholder_username(self) -> None:
        from plexagent.gitclone import parse_clone_request

        req = parse_clone_request({"url": "https://example.com/r.git", "target_path": "/app/r", "token": "t0k"})
        self.assertEqual((req.username, req.password), ("x-access-token", "t0k"))

    def test_scrub_masks_raw_and_quoted_secrets_and_url_userinfo(self) -> None:
        from plexagent.gitclone import scrub

        text = "fatal: https://u:p@ss w0rd@h/ and p%40ss%20w0rd and p@ss w0rd and http://x:y@host/"
        out = scrub(text, ["p@ss w0rd"])
        self.assertNotIn("p@ss w0rd", out)
        self.assertNotIn("p%40ss%20w0rd", out)
        self.assertNotIn("x:y@", out)
