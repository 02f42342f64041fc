"""
Docker Images of the Node Agent API (list, tag, cleanup, load, pull) and
/docker/login|load|load/stream, against the private daemon and a real
registry with basic auth on loopback.
"""

from __future__ import annotations

import base64
import io
import json
import os
import uuid
from typing import Any

from twisted.internet import defer
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from plexagent.testing import docker as td


def saved_tar(client: Any, reference: str) -> bytes:
    """``docker save`` of ``reference``."""
    # By reference, so the tar names exactly this tag (the image may have others).
    return b"".join(client.api.get_image(reference))


class CapturedLogs:
    """Every log event emitted during a test, formatted."""

    def __init__(self, testcase: unittest.TestCase) -> None:
        self.lines: list[str] = []
        globalLogPublisher.addObserver(self)
        testcase.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict[str, Any]) -> None:
        self.lines.append(formatEvent(event) + repr(event.get("log_failure", "")))

    def text(self) -> str:
        return "\n".join(self.lines)


class ImageRoutes(unittest.TestCase):
    def setUp(self) -> None:
        self.docker = td.test_client(self)
        self.agent = td.start_agent(self)
        self.api = td.AgentClient(self.agent)
        self.repo = f"pa-test-img-{uuid.uuid4().hex[:8]}"

    def tagged(self, tag: str = "v1") -> str:
        reference = f"{self.repo}:{tag}"
        self.docker.api.tag(td.base_image(), self.repo, tag)
        td.remove_image_later(self, self.docker, reference)
        return reference

    # -- list, tag, cleanup ------------------------------------------------

    async def _list(self) -> None:
        reference = self.tagged()
        status, doc = await self.api.get(f"/images/list?prefix={self.repo}")
        self.assertEqual(status, 200)
        [image] = doc["images"]
        self.assertEqual(set(image), {"ID", "RepoTags", "Size", "Created"})
        self.assertIn(reference, image["RepoTags"])
        self.assertTrue(image["ID"].startswith("sha256:"))
        self.assertRegex(image["Created"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        status, doc = await self.api.get("/images/list")
        self.assertGreaterEqual(len(doc["images"]), 1)

    def test_list_filters_by_prefix_with_the_seed_keys(self) -> Any:
        return defer.ensureDeferred(self._list())

    async def _tag(self) -> None:
        source = self.tagged()
        td.remove_image_later(self, self.docker, f"{self.repo}:deploy_4bd0ed9b")
        status, doc = await self.api.post(
            "/images/tag", {"source_image": source, "target_image": f"{self.repo}:deploy_4bd0ed9b"}
        )
        self.assertEqual((status, doc["success"]), (200, True), doc)
        self.assertEqual(self.docker.images.get(f"{self.repo}:deploy_4bd0ed9b").id, self.docker.images.get(source).id)
        status, err = await self.api.post("/images/tag", {"source_image": "pa-test-none:x", "target_image": "a:b"})
        self.assertEqual((status, err["error"]), (404, "image not found"))
        status, err = await self.api.post("/images/tag", {"source_image": source})
        self.assertEqual((status, err["error"]), (400, "target_image is required"))

    def test_tag_names_an_image_again_and_404s_for_unknown_sources(self) -> Any:
        return defer.ensureDeferred(self._tag())

    async def _cleanup(self) -> None:
        # A dangling image: built, then its tag moved away.
        context = os.path.join(self.agent.workdir, "ctx")
        os.makedirs(context)
        with open(os.path.join(context, "Dockerfile"), "w") as f:
            f.write(f"FROM {td.base_image()}\nRUN echo {uuid.uuid4().hex} > /marker\n")
        image, _ = self.docker.images.build(path=context, tag=f"{self.repo}:old", rm=True)
        self.docker.api.tag(td.base_image(), self.repo, "old")
        td.remove_image_later(self, self.docker, f"{self.repo}:old")
        status, doc = await self.api.post("/images/cleanup")
        self.assertEqual(status, 200)
        self.assertIn(image.id, doc["images_deleted"])
        self.assertEqual(doc["removed"], len(doc["images_deleted"]))
        # The base image is in use by a tag: untouched.
        self.docker.images.get(td.base_image())

    def test_cleanup_removes_dangling_images_and_counts_them(self) -> Any:
        return defer.ensureDeferred(self._cleanup())

    # -- loads -------------------------------------------------------------

    def tar_of_new_image(self) -> tuple[str, bytes]:
        reference = self.tagged()
        tar = saved_tar(self.docker, reference)
        self.docker.api.remove_image(reference)
        return reference, tar

    async def _load_raw(self, path: str) -> None:
        reference, tar = self.tar_of_new_image()
        status, doc = await self.api.post(path, data=tar, headers={"Content-Type": "application/x-tar"})
        self.assertEqual(status, 200, doc)
        self.assertEqual((doc["images"], doc["bytes"]), ([reference], len(tar)))
        self.docker.images.get(reference)

    def test_load_stream_loads_a_raw_tar_body(self) -> Any:
        return defer.ensureDeferred(self._load_raw("/docker/load/stream"))

    def test_docker_load_accepts_a_raw_tar_body(self) -> Any:
        return defer.ensureDeferred(self._load_raw("/docker/load"))

    async def _load_multipart(self, path: str) -> None:
        reference, tar = self.tar_of_new_image()
        status, doc = await self.api.post(
            path,
            data={"note": "first field is not the tar"},
            files={"image_tar": ("image.tar", "application/x-tar", io.BytesIO(tar))},
        )
        self.assertEqual(status, 200, doc)
        self.assertEqual(doc["images"], [reference])
        self.docker.images.get(reference)

    def test_images_load_accepts_multipart_image_tar(self) -> Any:
        return defer.ensureDeferred(self._load_multipart("/images/load"))

    def test_docker_load_accepts_multipart_image_tar(self) -> Any:
        return defer.ensureDeferred(self._load_multipart("/docker/load"))

    async def _load_b64(self, path: str, escape_slashes: bool) -> None:
        reference, tar = self.tar_of_new_image()
        encoded = base64.b64encode(tar).decode("ascii")
        body = json.dumps({"name": "app", "image_tar_b64": encoded})
        if escape_slashes:
            body = body.replace("/", "\\/")
        status, doc = await self.api.post(path, data=body.encode(), headers={"Content-Type": "application/json"})
        self.assertEqual(status, 200, doc)
        self.assertEqual(doc["images"], [reference])

    def test_images_load_accepts_legacy_json_base64(self) -> Any:
        return defer.ensureDeferred(self._load_b64("/images/load", escape_slashes=False))

    def test_docker_load_accepts_legacy_json_base64_with_escaped_slashes(self) -> Any:
        return defer.ensureDeferred(self._load_b64("/docker/load", escape_slashes=True))

    async def _load_errors(self) -> None:
        cases = [
            ("/docker/load/stream", {"data": b"", "headers": {"Content-Type": "application/x-tar"}}, "the image tar is empty"),
            ("/docker/load/stream", {"data": b"not a tar" * 200}, "docker could not load the image"),
            ("/images/load", {"files": {"other": ("x", "text/plain", io.BytesIO(b"x"))}}, "image_tar is required"),
            ("/images/load", {"json": {"image_tar": "wrong field"}}, "image_tar_b64 is required"),
            ("/docker/load", {"json": {"image_tar_b64": "@@@@"}}, "invalid image_tar_b64"),
        ]
        for path, kwargs, message in cases:
            status, err = await self.api.post(path, **kwargs)
            self.assertEqual((status, err["error"]), (400, message), (path, err))

    def test_bad_load_bodies_are_400_naming_the_problem(self) -> Any:
        return defer.ensureDeferred(self._load_errors())

    async def _load_unauthenticated(self) -> None:
        _, tar = self.tar_of_new_image()
        status, err = await self.api.post("/docker/load/stream", data=tar, key="wrong")
        self.assertEqual((status, err["error"]), (401, "unauthorized"))
        self.assertEqual(self.agent.pool.active, 0)

    def test_load_without_the_key_is_401_and_reaches_no_docker(self) -> Any:
        return defer.ensureDeferred(self._load_unauthenticated())


class UploadLimit(unittest.TestCase):
    async def _too_large(self) -> None:
        client = td.test_client(self)
        agent = td.start_agent(self, max_upload_bytes=64 * 1024)
        api = td.AgentClient(agent)
        tar = saved_tar(client, td.base_image())
        status, err = await api.post("/docker/load/stream", data=tar)
        self.assertEqual((status, err["error"]), (413, "request body too large"))
        await agent.pool.when_idle()

    def test_a_load_over_max_upload_bytes_is_413(self) -> Any:
        return defer.ensureDeferred(self._too_large())


class RegistryRoutes(unittest.TestCase):
    """Pull and login against Debian's docker-registry with htpasswd auth."""

    USER = "deployer"

    def setUp(self) -> Any:
        self.docker = td.test_client(self)
        self.password = "s3cret-" + uuid.uuid4().hex
        self.registry = td.Registry(self.USER, self.password)
        try:
            self.registry.start()
        except (OSError, RuntimeError) as e:
            td.unreachable(self, "docker-registry", str(e))
        self.addCleanup(self.registry.stop)
        self.logs = CapturedLogs(self)
        self.agent = td.start_agent(self)
        self.api = td.AgentClient(self.agent)
        # Put an image in the registry, as the deployer's CI would.
        self.repository = f"{self.registry.address}/pa-test/app-{uuid.uuid4().hex[:6]}"
        self.docker.api.tag(td.base_image(), self.repository, "v1")
        auth = {"username": self.USER, "password": self.password}
        for line in self.docker.api.push(self.repository, "v1", auth_config=auth, stream=True, decode=True):
            if "error" in line:
                raise RuntimeError(line["error"])
        self.docker.api.remove_image(f"{self.repository}:v1")
        td.remove_image_later(self, self.docker, f"{self.repository}:v1")

    def assertNoPassword(self, *documents: Any) -> None:
        for doc in documents:
            self.assertNotIn(self.password, json.dumps(doc))
        self.assertNotIn(self.password, self.logs.text())

    async def _pull(self) -> None:
        status, doc = await self.api.post(
            "/images/pull",
            {"image": "pa-test/" + self.repository.rsplit("/", 1)[1] + ":v1", "registry": self.registry.address,
             "username": self.USER, "password": self.password},
        )
        self.assertEqual(status, 200, doc)
        self.assertEqual(doc["image"], f"{self.repository}:v1")
        self.assertTrue(doc["id"].startswith("sha256:"))
        self.docker.images.get(f"{self.repository}:v1")
        self.assertNoPassword(doc)

    def test_pull_with_credentials_from_a_private_registry(self) -> Any:
        return defer.ensureDeferred(self._pull())

    async def _pull_stream(self) -> None:
        response = await self.api.request(
            "POST", "/images/pull?stream=true",
            json={"image": f"{self.repository}:v1", "username": self.USER, "password": self.password,
                  "registry": self.registry.address},
        )
        self.assertEqual(response.code, 200)
        lines = [json.loads(line) for line in (await response.content()).splitlines()]
        self.assertTrue(any("status" in line for line in lines[:-1]))
        self.assertEqual(lines[-1], {"status": "complete", "image": f"{self.repository}:v1"})
        self.assertNoPassword(lines)

    def test_pull_streams_progress_lines_when_asked(self) -> Any:
        return defer.ensureDeferred(self._pull_stream())

    async def _pull_refused(self) -> None:
        wrong = "wrong-" + self.password
        status, err = await self.api.post(
            "/images/pull",
            {"image": f"{self.repository}:v1", "username": self.USER, "password": wrong},
        )
        self.assertEqual((status, err["error"]), (403, "the registry refused the credentials"), err)
        self.assertNotIn(wrong, json.dumps(err))
        self.assertNotIn(wrong, self.logs.text())
        status, err = await self.api.post("/images/pull", {"image": f"{self.repository}:v1"})
        self.assertEqual(status, 403, err)

    def test_pull_with_wrong_or_no_credentials_is_403_without_the_password(self) -> Any:
        return defer.ensureDeferred(self._pull_refused())

    async def _login(self) -> None:
        status, doc = await self.api.post(
            "/docker/login", {"registry": self.registry.address, "username": self.USER, "password": self.password}
        )
        self.assertEqual((status, doc["success"]), (200, True), doc)
        # The login is remembered: a pull without credentials now works.
        status, doc = await self.api.post("/images/pull", {"image": f"{self.repository}:v1"})
        self.assertEqual(status, 200, doc)
        self.assertNoPassword(doc)

    def test_login_then_pull_without_credentials(self) -> Any:
        return defer.ensureDeferred(self._login())

    async def _run_pulls(self) -> None:
        status, doc = await self.api.post(
            "/docker/login", {"registry": self.registry.address, "username": self.USER, "password": self.password}
        )
        self.assertEqual(status, 200, doc)
        name = td.unique_name(self, self.docker)
        status, doc = await self.api.post(
            "/containers/run", {"name": name, "image": f"{self.repository}:v1", "command": ["true"]}
        )
        self.assertEqual(status, 201, doc)
        self.docker.images.get(f"{self.repository}:v1")

    def test_run_pulls_a_missing_image_as_docker_run_does(self) -> Any:
        return defer.ensureDeferred(self._run_pulls())

    async def _login_refused(self) -> None:
        wrong = "nope-" + self.password
        status, err = await self.api.post(
            "/docker/login", {"registry": self.registry.address, "username": self.USER, "password": wrong}
        )
        # The registry's refusal, not the agent API's own auth (401/403).
        self.assertEqual((status, err["error"]), (400, "registry login failed"), err)
        self.assertIn("401 Unauthorized", err["details"])
        self.assertNotIn(wrong, json.dumps(err))
        self.assertNotIn(wrong, self.logs.text())
        status, err = await self.api.post("/docker/login", {"registry": self.registry.address, "username": self.USER})
        self.assertEqual((status, err["error"]), (400, "password is required"))

    def test_login_with_a_wrong_password_is_400_saying_why_without_the_password(self) -> Any:
        return defer.ensureDeferred(self._login_refused())

    async def _login_unreachable(self) -> None:
        self.registry.stop()
        status, err = await self.api.post(
            "/docker/login", {"registry": self.registry.address, "username": self.USER, "password": self.password}
        )
        self.assertEqual((status, err["error"]), (400, "registry login failed"), err)
        self.assertIn(self.registry.address, err["details"])
        self.assertNoPassword(err)

    def test_login_to_a_registry_that_does_not_answer_is_400_naming_it(self) -> Any:
        return defer.ensureDeferred(self._login_unreachable())

    async def _pull_missing(self) -> None:
        status, err = await self.api.post(
            "/images/pull",
            {"image": f"{self.registry.address}/pa-test/none:v9", "username": self.USER, "password": self.password},
        )
        self.assertEqual((status, err["error"]), (404, "image not found"), err)

    def test_pull_of_an_unknown_image_is_404(self) -> Any:
        return defer.ensureDeferred(self._pull_missing())
