"""
Loads: the facade's part that streams an image tar into ``docker load``
while its request body is still arriving.
"""

from __future__ import annotations

from typing import Any

import docker
import docker.errors
from twisted.internet import defer
from twisted.logger import Logger

from plexagent import errors
from plexagent.host.docker.errors import explain
from plexagent.host.docker.pool import DockerPool
from plexagent.host.docker.summaries import stream_errors
from plexagent.pipes import TarFeed

log = Logger()


class LoadOperations:
    """The facade's image load."""

    pool: DockerPool

    def load(self, feed: TarFeed) -> defer.Deferred[dict[str, Any]]:
        """Stream ``feed``'s tar into ``docker load``; the loaded image names."""

        def load(client: Any) -> dict[str, Any]:
            try:
                lines, error = stream_errors(client.api.load_image(feed.chunks()))
            except docker.errors.APIError as e:
                if (e.status_code or 500) >= 500 or e.status_code == 400:
                    raise errors.InvalidInput("docker could not load the image", explain(e)) from None
                raise
            if error is not None:
                raise errors.InvalidInput("docker could not load the image", error)
            loaded = []
            for line in lines:
                text = line.get("stream", "")
                for prefix in ("Loaded image: ", "Loaded image ID: "):
                    if text.startswith(prefix):
                        loaded.append(text[len(prefix):].strip())
            return {"success": True, "images": loaded, "bytes": feed.total}

        return self.pool.call(load, what="image")
