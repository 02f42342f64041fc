"""
Builds: the facade's part that runs ``docker build`` and streams its
progress lines.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from twisted.logger import Logger

from plexagent.host.docker.images import raise_on_error_line
from plexagent.host.docker.pool import DockerPool, Stream

log = Logger()


class BuildOperations:
    """The facade's build operation."""

    pool: DockerPool

    def build(self, on_line: Callable[[dict[str, Any]], None], **kwargs: Any) -> Stream:
        """Build (``api.build`` arguments), delivering Docker's progress lines."""

        def source(client: Any) -> Iterable[Any]:
            return raise_on_error_line(client.api.build(decode=True, rm=True, forcerm=True, **kwargs), "build", "")

        return self.pool.stream(source, on_line, what="image")
