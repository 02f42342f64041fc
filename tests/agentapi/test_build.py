"""
/docker/build and /docker/dockerfile against the private daemon.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from plexagent.testing import docker as td


class BuildRoutes(unittest.TestCase):
    def setUp(self) -> None:
        self.docker = td.test_client(self)
        self.agent = td.start_agent(self)
        self.api = td.AgentClient(self.agent)
        self.context = os.path.join(self.agent.workdir, "code")
        os.makedirs(self.context)
        self.tag = f"pa-test-build-{uuid.uuid4().hex[:8]}:1.0"
        td.remove_image_later(self, self.docker, self.tag)

    def dockerfile(self, text: str, name: str = "Dockerfile") -> None:
        with open(os.path.join(self.context, name), "w") as f:
            f.write(text)

    async def _build(self) -> None:
        self.dockerfile(f"FROM {td.base_image()}\nARG NODE_ENV=dev\nRUN echo $NODE_ENV > /env\n")
        status, doc = await self.api.post(
            "/docker/build",
            {"context_path": self.context, "tag": self.tag, "build_args": {"NODE_ENV": "production"}},
        )
        self.assertEqual(status, 200, doc)
        image = self.docker.images.get(self.tag)
        self.assertEqual((doc["success"], doc["image_id"], doc["tag"]), (True, image.id, self.tag))
        self.assertIn("Successfully tagged", doc["logs"])
        output = self.docker.containers.run(self.tag, ["cat", "/env"], remove=True)
        self.assertEqual(output, b"production\n")

    def test_build_tags_the_image_with_build_args_and_returns_its_id(self) -> Any:
        return defer.ensureDeferred(self._build())

    async def _build_stream(self) -> None:
        self.dockerfile(f"FROM {td.base_image()}\nRUN echo streamed\n", name="Custom.dockerfile")
        response = await self.api.request(
            "POST", "/docker/build?stream=true",
            json={"context_path": self.context, "dockerfile": "Custom.dockerfile", "tag": self.tag},
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/x-ndjson"])
        lines = [json.loads(line) for line in (await response.content()).splitlines()]
        self.assertTrue(any("Step 1/2" in line.get("stream", "") for line in lines))
        self.assertEqual(lines[-1]["status"], "complete")
        self.assertEqual(lines[-1]["image_id"], self.docker.images.get(self.tag).id)

    def test_build_streams_progress_lines_when_asked(self) -> Any:
        return defer.ensureDeferred(self._build_stream())

    async def _build_fails(self) -> None:
        marker = uuid.uuid4().hex
        self.dockerfile(f"FROM {td.base_image()}\nLABEL pa-test-marker={marker}\nRUN exit 7\n")
        status, err = await self.api.post("/docker/build", {"context_path": self.context, "tag": self.tag})
        self.assertEqual((status, err["error"]), (400, "the build failed"), err)
        self.assertIn("7", err["details"])
        # The failed step's container is not left behind.
        leftovers = self.docker.api.containers(all=True, filters={"label": f"pa-test-marker={marker}"})
        self.assertEqual(leftovers, [])
        response = await self.api.request(
            "POST", "/docker/build?stream=true", json={"context_path": self.context, "tag": self.tag}
        )
        lines = [json.loads(line) for line in (await response.content()).splitlines()]
        self.assertEqual(lines[-1]["error"], "the build failed")
        leftovers = self.docker.api.containers(all=True, filters={"label": f"pa-test-marker={marker}"})
        self.assertEqual(leftovers, [])

    def test_a_failing_build_is_400_with_dockers_message(self) -> Any:
        return defer.ensureDeferred(self._build_fails())

    async def _build_paths(self) -> None:
        status, err = await self.api.post("/docker/build", {"context_path": "/etc", "tag": self.tag})
        self.assertEqual((status, err["error"]), (403, "path not allowed"))
        self.dockerfile(f"FROM {td.base_image()}\n")
        status, err = await self.api.post(
            "/docker/build", {"context_path": self.context, "dockerfile": "../../../etc/passwd"}
        )
        self.assertEqual(status, 403, err)
        status, err = await self.api.post("/docker/build", {"context_path": self.context + "/missing"})
        self.assertEqual((status, err["error"]), (404, "context_path not found"))
        status, err = await self.api.post("/docker/build", {"tag": self.tag})
        self.assertEqual((status, err["error"]), (400, "context_path is required"))

    def test_build_refuses_paths_outside_allowed_paths(self) -> Any:
        return defer.ensureDeferred(self._build_paths())

    async def _dockerfile(self) -> None:
        status, err = await self.api.post("/docker/dockerfile", {"context_path": self.context})
        self.assertEqual((status, err["error"]), (404, "dockerfile not found"))
        with open(os.path.join(self.context, "package.json"), "w") as f:
            f.write("{}")
        status, doc = await self.api.post("/docker/dockerfile", {"context_path": self.context, "generate": True})
        self.assertEqual((status, doc["generated"], doc["kind"]), (200, True, "node"))
        self.assertIn("npm", doc["dockerfile"])
        self.dockerfile("FROM scratch\n")
        status, doc = await self.api.post("/docker/dockerfile", {"context_path": self.context, "generate": True})
        self.assertEqual((status, doc["exists"], doc["dockerfile"]), (200, True, "FROM scratch\n"))
        status, err = await self.api.post("/docker/dockerfile", {"context_path": "/root"})
        self.assertEqual(status, 403)

    def test_dockerfile_returns_the_existing_one_or_generates_one(self) -> Any:
        return defer.ensureDeferred(self._dockerfile())
