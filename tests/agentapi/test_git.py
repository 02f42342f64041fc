"""/git/clone with real repositories over file:// and smart HTTP with basic auth."""

from __future__ import annotations

import base64
import os
import subprocess

from twisted.internet import protocol, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from twisted.web import resource, server, twcgi

from tests.agentapi.support import RunningAgentAPI, SwapAfterEachCheck

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

    def runProcess(self, env, request, qargs=[]):  # noqa: B006 - CGIScript.runProcess's own signature
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

    async def test_symlinks_leading_outside_the_checkout_are_removed_and_listed(self) -> None:
        def git(*args: str) -> None:
            subprocess.run(["git", *args], cwd=self.source, env=GIT_ENV, check=True, capture_output=True)

        os.makedirs(os.path.join(self.source, "conf", "sites"))
        links = {"leak": "/etc/shadow", "etcdir": "/etc", "conf/sites/up": "../../../outside",
                 "conf/sites/ok": "../../README", "conf/here": "sites"}
        for name, target in links.items():
            os.symlink(target, os.path.join(self.source, name))
        git("add", "-A")
        git("commit", "-q", "-m", "links")
        target = self.agent.p("work", "links")
        code, body = await self.clone(url="file://" + self.source, target_path=target)
        self.assertEqual(code, 200, body)
        self.assertEqual([s["name"] for s in body["skipped"]], ["conf/sites/up", "etcdir", "leak"])
        for name in ("leak", "etcdir", "conf/sites/up"):
            self.assertFalse(os.path.lexists(os.path.join(target, name)), name)
        self.assertEqual(os.readlink(os.path.join(target, "conf", "sites", "ok")), "../../README")
        self.assertEqual(os.readlink(os.path.join(target, "conf", "here")), "sites")

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

    async def test_missing_local_repository_is_404(self) -> None:
        code, body = await self.clone(url="file://" + self.agent.p("nothing-here"), target_path=self.agent.p("y"))
        self.assertEqual((code, body), (404, {"error": "repository not found",
                                              "details": self.agent.p("nothing-here") + " is not a git repository"}))
        self.assertFalse(os.path.exists(self.agent.p("y")))
        self.assertEqual(os.listdir(os.path.join(self.agent.data_dir, "git-staging")), [])


class StagingTests(unittest.TestCase):
    def test_staging_older_than_twice_the_timeout_is_removed(self) -> None:
        from plexagent.host.files.paths import PathPolicy
        from plexagent.host.gitclone import GitCloner

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

        def observer(event: dict) -> None:
            self.logged.append(repr(event) + (formatEvent(event) or ""))

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
        from plexagent.host.gitclone import parse_clone_request

        req = parse_clone_request({"url": "https://bob:p%40ss@example.com/r.git", "target_path": "/app/r"})
        self.assertEqual((req.url, req.username, req.password), ("https://example.com/r.git", "bob", "p@ss"))
        self.assertNotIn("p@ss", repr(req))

    def test_token_alone_gets_a_placeholder_username(self) -> None:
        from plexagent.host.gitclone import parse_clone_request

        req = parse_clone_request({"url": "https://example.com/r.git", "target_path": "/app/r", "token": "t0k"})
        self.assertEqual((req.username, req.password), ("x-access-token", "t0k"))

    def test_scrub_masks_raw_and_quoted_secrets_and_url_userinfo(self) -> None:
        from plexagent.host.gitclone import scrub

        text = "fatal: https://u:p@ss w0rd@h/ and p%40ss%20w0rd and p@ss w0rd and http://x:y@host/"
        out = scrub(text, ["p@ss w0rd"])
        self.assertNotIn("p@ss w0rd", out)
        self.assertNotIn("p%40ss%20w0rd", out)
        self.assertNotIn("x:y@", out)


def git_output(path: str, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=path, env=GIT_ENV, check=True, capture_output=True,
                          text=True).stdout.strip()


class LocalSourceTests(CloneCase):
    """
    A local clone reads only a repository whose git directory and object
    store lie inside the allowed paths: every pointer git would follow is
    checked, and git never reads the source in place.
    """

    def setUp(self) -> None:
        super().setUp()
        self.marker = "outside-secret-" + os.urandom(6).hex()
        self.outside_repo = os.path.join(self.agent.outside, "secret")
        os.makedirs(self.outside_repo)
        git_output(self.outside_repo, "init", "-q", "-b", "main")
        with open(os.path.join(self.outside_repo, "SECRET"), "w") as f:
            f.write(self.marker + "\n")
        git_output(self.outside_repo, "add", "SECRET")
        git_output(self.outside_repo, "commit", "-q", "-m", "secret")
        self.outside_commit = git_output(self.outside_repo, "rev-parse", "HEAD")
        self.outside_git = os.path.join(self.outside_repo, ".git")

    async def write(self, path: str, content: str) -> None:
        code, body = await self.agent.post_json("/files/write", {"path": path, "content": content})
        self.assertEqual(code, 200, body)

    async def assertRefused(self, url: str, code: int = 403) -> dict:
        target = self.agent.p("stolen")
        status, body = await self.clone(url=url, target_path=target)
        self.assertEqual(status, code, body)
        self.assertIsInstance(body.get("error"), str)
        self.assertFalse(os.path.exists(target))
        self.assertEqual(files_containing(self.agent.root, self.marker.encode()), [])
        staging = os.path.join(self.agent.data_dir, "git-staging")
        self.assertEqual(os.listdir(staging) if os.path.exists(staging) else [], [])
        return body

    async def test_git_file_pointing_outside_is_403(self) -> None:
        await self.write(self.agent.p("evil", ".git"), f"gitdir: {self.outside_git}\n")
        body = await self.assertRefused("file://" + self.agent.p("evil"))
        self.assertEqual(body["error"], "path not allowed")

    async def test_relative_git_file_pointing_outside_is_403(self) -> None:
        relative = os.path.relpath(self.outside_git, self.agent.p("evil"))
        await self.write(self.agent.p("evil", ".git"), f"gitdir: {relative}\n")
        await self.assertRefused("file://" + self.agent.p("evil"))

    async def test_alternates_pointing_outside_are_403(self) -> None:
        git_dir = os.path.join(self.source, ".git")
        await self.write(os.path.join(git_dir, "objects", "info", "alternates"),
                         os.path.join(self.outside_git, "objects") + "\n")
        await self.write(os.path.join(git_dir, "refs", "heads", "main"), self.outside_commit + "\n")
        await self.assertRefused("file://" + self.source)

    async def test_alternates_chained_through_an_inside_repository_are_403(self) -> None:
        middle = self.agent.p("middle")
        make_repository(middle)
        await self.write(os.path.join(middle, ".git", "objects", "info", "alternates"),
                         os.path.join(self.outside_git, "objects") + "\n")
        git_dir = os.path.join(self.source, ".git")
        await self.write(os.path.join(git_dir, "objects", "info", "alternates"),
                         os.path.join(middle, ".git", "objects") + "\n")
        await self.write(os.path.join(git_dir, "refs", "heads", "main"), self.outside_commit + "\n")
        await self.assertRefused("file://" + self.source)

    async def test_symlinked_objects_directory_is_403(self) -> None:
        git_dir = os.path.join(self.source, ".git")
        subprocess.run(["rm", "-rf", os.path.join(git_dir, "objects")], check=True)
        os.symlink(os.path.join(self.outside_git, "objects"), os.path.join(git_dir, "objects"))
        await self.write(os.path.join(git_dir, "refs", "heads", "main"), self.outside_commit + "\n")
        await self.assertRefused("file://" + self.source)

    async def test_symlinked_refs_directory_is_403(self) -> None:
        git_dir = os.path.join(self.source, ".git")
        subprocess.run(["rm", "-rf", os.path.join(git_dir, "refs")], check=True)
        os.symlink(os.path.join(self.outside_git, "refs"), os.path.join(git_dir, "refs"))
        await self.assertRefused("file://" + self.source)

    async def test_symlinked_pack_directory_is_403(self) -> None:
        git_output(self.outside_repo, "gc", "-q")
        git_dir = os.path.join(self.source, ".git")
        pack = os.path.join(git_dir, "objects", "pack")
        subprocess.run(["rm", "-rf", pack], check=True)
        os.symlink(os.path.join(self.outside_git, "objects", "pack"), pack)
        await self.write(os.path.join(git_dir, "refs", "heads", "main"), self.outside_commit + "\n")
        await self.assertRefused("file://" + self.source)

    async def test_commondir_pointing_outside_is_403(self) -> None:
        fake = self.agent.p("worktree-gitdir")
        await self.write(os.path.join(fake, "HEAD"), "ref: refs/heads/main\n")
        await self.write(os.path.join(fake, "commondir"), self.outside_git + "\n")
        await self.assertRefused("file://" + fake)

    async def test_dot_git_suffix_symlinked_outside_is_403(self) -> None:
        os.symlink(self.outside_git, self.agent.p("elsewhere.git"))
        await self.assertRefused("file://" + self.agent.p("elsewhere"))

    async def test_query_and_fragment_characters_are_part_of_the_path(self) -> None:
        """git reads 'file:///a?/../x' as the path '/a?/../x', not '/a'."""
        await self.write(self.agent.p("a?", "keep"), "x")
        escape = os.path.relpath(self.outside_repo, self.agent.p("a?"))
        await self.assertRefused("file://" + self.agent.p("a") + "?/" + escape)

    async def test_percent_encoded_path_is_checked_decoded(self) -> None:
        encoded = self.outside_repo[:-1] + "%%%02X" % ord(self.outside_repo[-1])
        await self.assertRefused("file://" + encoded)

    async def test_remote_host_in_a_file_url_is_400(self) -> None:
        await self.assertRefused("file://otherhost" + self.source, 400)

    async def test_file_url_without_slashes_is_400(self) -> None:
        await self.assertRefused("file:" + self.source, 400)

    async def test_ext_and_fd_transports_stay_refused(self) -> None:
        for url in ("ext::sh -c cat% /etc/passwd", "fd::3", "ext::git-upload-pack " + self.outside_repo):
            status, body = await self.clone(url=url, target_path=self.agent.p("stolen"))
            self.assertEqual(status, 400, url)
        self.assertFalse(os.path.exists(self.agent.p("stolen")))

    async def test_source_swapped_for_an_outside_symlink_after_each_check_is_403(self) -> None:
        """Every check sees the real repository; every read would meet a link to the outside one."""
        os.rename(self.outside_repo, os.path.join(self.agent.outside, "repo"))
        swap = SwapAfterEachCheck(self, self.agent.context.services["paths"], os.path.dirname(self.source),
                                  self.agent.outside)
        body = await self.assertRefused("file://" + self.source)
        self.assertEqual(body["error"], "path not allowed")
        self.assertGreater(swap.checks, 0)

    async def test_clone_of_a_linked_worktree_inside_the_roots_works(self) -> None:
        worktree = self.agent.p("wt")
        git_output(self.source, "worktree", "add", "-q", worktree, "feature")
        code, body = await self.clone(url="file://" + worktree, target_path=self.agent.p("from-wt"))
        self.assertEqual((code, body["branch"]), (200, "feature"), body)
        self.assertTrue(os.path.isfile(self.agent.p("from-wt", "FEATURE")))

    async def test_alternates_inside_the_roots_are_followed(self) -> None:
        borrower = self.agent.p("borrower")
        subprocess.run(["git", "clone", "-q", "--shared", self.source, borrower], env=GIT_ENV, check=True)
        code, body = await self.clone(url="file://" + borrower, target_path=self.agent.p("from-borrower"))
        self.assertEqual(code, 200, body)
        self.assertTrue(os.path.isfile(self.agent.p("from-borrower", "README")))
        self.assertFalse(os.path.exists(self.agent.p("from-borrower", ".git", "objects", "info", "alternates")))

    async def test_localhost_file_url_and_bare_repository_work(self) -> None:
        bare = self.agent.p("bare.git")
        subprocess.run(["git", "clone", "-q", "--bare", self.source, bare], env=GIT_ENV, check=True)
        code, body = await self.clone(url="file://localhost" + self.agent.p("bare"), target_path=self.agent.p("b"))
        self.assertEqual((code, body["branch"]), (200, "main"), body)
        self.assertTrue(os.path.isfile(self.agent.p("b", "README")))

    async def test_clone_remembers_the_given_url_as_origin(self) -> None:
        url = "file://" + self.source
        code, _ = await self.clone(url=url, target_path=self.agent.p("c"))
        self.assertEqual(code, 200)
        self.assertEqual(git_output(self.agent.p("c"), "config", "remote.origin.url"), url)
        self.assertEqual(git_output(self.agent.p("c"), "log", "--format=%s"), "two\none")

    async def test_a_file_instead_of_a_repository_is_400(self) -> None:
        bundle = self.agent.p("repo.bundle")
        subprocess.run(["git", "bundle", "create", "-q", bundle, "--all"], cwd=self.source, env=GIT_ENV, check=True)
        body = await self.assertRefused("file://" + bundle, 400)
        self.assertEqual(body["error"], "not a git repository")

    async def test_http_alternates_are_neither_followed_nor_carried_into_the_clone(self) -> None:
        await self.write(os.path.join(self.source, ".git", "objects", "info", "http-alternates"),
                         "http://127.0.0.1:9/elsewhere/objects\n")
        code, body = await self.clone(url="file://" + self.source, target_path=self.agent.p("h"))
        self.assertEqual(code, 200, body)
        self.assertFalse(os.path.exists(self.agent.p("h", ".git", "objects", "info", "http-alternates")))

    async def test_shallow_source_is_cloned(self) -> None:
        shallow = self.agent.p("shallow")
        subprocess.run(["git", "clone", "-q", "--depth", "1", "file://" + self.source, shallow], env=GIT_ENV,
                       check=True)
        code, body = await self.clone(url="file://" + shallow, target_path=self.agent.p("s"))
        self.assertEqual(code, 200, body)
        self.assertEqual(git_output(self.agent.p("s"), "log", "--format=%s"), "two")

    async def test_sha256_source_is_cloned(self) -> None:
        sha256 = self.agent.p("sha256")
        os.makedirs(sha256)
        git_output(sha256, "init", "-q", "-b", "main", "--object-format=sha256")
        with open(os.path.join(sha256, "f"), "w") as f:
            f.write("x\n")
        git_output(sha256, "add", "f")
        git_output(sha256, "commit", "-q", "-m", "x")
        code, body = await self.clone(url="file://" + sha256, target_path=self.agent.p("s256"))
        self.assertEqual(code, 200, body)
        self.assertEqual(len(body["commit"]), 64)


class StandaloneCloneTests(unittest.TestCase):
    """Whatever git produced, a clone that borrows objects from elsewhere is not moved into place."""

    def setUp(self) -> None:
        self.repo = os.path.realpath(self.mktemp())
        make_repository(self.repo)

    def test_a_plain_clone_passes(self) -> None:
        from plexagent.host.gitclone import check_standalone_clone

        check_standalone_clone(self.repo)

    def test_alternates_commondir_or_git_file_are_refused(self) -> None:
        from plexagent import errors
        from plexagent.host.gitclone import check_standalone_clone

        git_dir = os.path.join(self.repo, ".git")
        for name in ("objects/info/alternates", "objects/info/http-alternates", "commondir"):
            with open(os.path.join(git_dir, name), "w") as f:
                f.write("/elsewhere\n")
            self.assertRaises(errors.Forbidden, check_standalone_clone, self.repo)
            os.unlink(os.path.join(git_dir, name))
        os.rename(git_dir, self.repo + "-git")
        with open(git_dir, "w") as f:
            f.write(f"gitdir: {self.repo}-git\n")
        self.assertRaises(errors.Forbidden, check_standalone_clone, self.repo)
