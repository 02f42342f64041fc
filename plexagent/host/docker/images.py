"""
Images: the facade's part that lists, tags and inspects them, logs in to
registries and pulls. (Cleanups: ``janitor.ImageHygiene``.)
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import docker
import docker.errors
from twisted.internet import defer
from twisted.logger import Logger

from plexagent import errors
from plexagent.host.docker.errors import engine_error, explain, scrub, stream_error
from plexagent.host.docker.pool import DockerPool, Stream
from plexagent.host.docker.summaries import image_summary

log = Logger()


class _ImageOps:
    """The blocking image operations; each takes the docker client first."""

    @staticmethod
    def list_images(client: Any, prefix: str | None) -> list[dict[str, Any]]:
        images = [image_summary(i) for i in client.api.images()]
        if prefix:
            images = [i for i in images if any(t.startswith(prefix) for t in i["RepoTags"])]
        return images

    @staticmethod
    def tag(client: Any, source: str, repository: str, tag: str | None) -> dict[str, Any]:
        client.api.tag(source, repository, tag)
        target = f"{repository}:{tag}" if tag else repository
        info = client.api.inspect_image(target)
        return {"success": True, "source_image": source, "target_image": target, "id": info["Id"]}

    @staticmethod
    def image_info(client: Any, reference: str) -> dict[str, Any]:
        info = client.api.inspect_image(reference)
        return {"id": info["Id"], "tags": info.get("RepoTags") or [], "size": info.get("Size", 0)}

    @staticmethod
    def login(client: Any, registry: str, username: str, password: str) -> dict[str, Any]:
        try:
            result = client.login(username=username, password=password, registry=registry, reauth=True)
        except docker.errors.APIError as e:
            # Whatever the engine's status, the registry said no to what the
            # client sent (address, credentials): theirs to fix, not the
            # agent API's own authentication (401) or authorisation (403).
            raise errors.InvalidInput("registry login failed", scrub(explain(e), (password,))) from None
        return {"success": True, "registry": registry, "status": (result or {}).get("Status", "Login Succeeded")}


class ImageOperations:
    """The facade's image operations (list, tag, inspect, log in, pull)."""

    pool: DockerPool

    def list_images(self, prefix: str | None) -> defer.Deferred[list[dict[str, Any]]]:
        return self.pool.call(_ImageOps.list_images, prefix, what="image")

    def tag(self, source: str, repository: str, tag: str | None) -> defer.Deferred[dict[str, Any]]:
        return self.pool.call(_ImageOps.tag, source, repository, tag, what="image")

    def image_info(self, reference: str) -> defer.Deferred[dict[str, Any]]:
        return self.pool.call(_ImageOps.image_info, reference, what="image")

    def login(self, registry: str, username: str, password: str) -> defer.Deferred[dict[str, Any]]:
        return self.pool.call(_ImageOps.login, registry, username, password, what="registry", secrets=(password,))

    def pull(
        self, repository: str, tag: str | None, auth: dict[str, str] | None, on_line: Callable[[dict[str, Any]], None]
    ) -> Stream:
        """Pull, delivering Docker's progress lines; ``done`` fails on an error line."""
        secrets = (auth or {}).get("password", "")

        def source(client: Any) -> Iterable[Any]:
            try:
                lines = client.api.pull(repository, tag=tag, stream=True, decode=True, auth_config=auth)
            except docker.errors.APIError as e:
                # Refused before any progress line: the registry's answer.
                explanation = scrub(explain(e), (secrets,))
                if 400 <= (e.status_code or 500) < 500:
                    raise engine_error(e.status_code or 500, explanation, "image") from None
                raise stream_error("pull", explanation) from None
            return raise_on_error_line(lines, "pull", secrets)

        return self.pool.stream(source, on_line, what="image", secrets=(secrets,))


def raise_on_error_line(lines: Iterable[dict[str, Any]], kind: str, secret: str) -> Iterator[dict[str, Any]]:
    """
    Docker reports build and pull failures as a line of the stream: raise
    it, but only once Docker has ended the stream. Hanging up earlier
    cancels the build before Docker removes the failed step's container.
    """
    error = None
    for line in lines:
        if isinstance(line, dict) and ("error" in line or "errorDetail" in line):
            message = line.get("error") or (line.get("errorDetail") or {}).get("message") or "failed"
            error = error or stream_error(kind, scrub(str(message), (secret,)))
            continue
        yield line
    if error is not None:
        raise error
