"""
The Docker facade: Deferred-returning Docker operations on a ``DockerPool``,
one part for what each serves (containers, images, builds, loads).
"""

from __future__ import annotations

from twisted.logger import Logger

from plexagent.host.docker.builds import BuildOperations
from plexagent.host.docker.containers import ContainerOperations
from plexagent.host.docker.images import ImageOperations
from plexagent.host.docker.loads import LoadOperations
from plexagent.host.docker.pool import DockerPool
from plexagent.host.docker.watch import ContainerListCache
from plexagent.host.files.paths import PathPolicy

log = Logger()




class DockerFacade(ContainerOperations, ImageOperations, BuildOperations, LoadOperations):
    """
    Deferred-returning Docker operations on a ``DockerPool``. Every start
    of a container (run, start, restart) first checks its bind mounts
    against ``paths`` (``binds.start_checked``).
    """

    def __init__(self, pool: DockerPool, paths: PathPolicy | None = None) -> None:
        self.pool = pool
        self.paths = paths if paths is not None else PathPolicy(())
        self.container_list = ContainerListCache(pool)
