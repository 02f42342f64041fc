"""
Containers: the facade's part that lists, inspects, runs, starts, stops,
restarts and removes them, reads their logs and runs commands in them.
Every start checks the bind mounts first (``binds.start_checked``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import docker
import docker.errors
from twisted.internet import defer
from twisted.logger import Logger

from plexagent.host.docker.binds import start_checked
from plexagent.host.docker.pool import DockerPool, Stream
from plexagent.host.docker.summaries import container_status, container_summary
from plexagent.host.files.paths import PathPolicy

if TYPE_CHECKING:
    from plexagent.host.docker.watch import ContainerListCache
log = Logger()


class _ContainerOps:
    """The blocking container operations; each takes the docker client first."""

    @staticmethod
    def list_containers(client: Any) -> list[dict[str, Any]]:
        return [container_summary(c) for c in client.api.containers(all=True)]

    @staticmethod
    def inspect(client: Any, name: str) -> dict[str, Any]:
        return client.api.inspect_container(name)

    @staticmethod
    def run(client: Any, kwargs: dict[str, Any], policy: PathPolicy) -> dict[str, Any]:
        kwargs = dict(kwargs)
        image = kwargs.pop("image")
        command = kwargs.pop("command", None)
        try:
            container = client.containers.create(image, command, **kwargs)
        except docker.errors.ImageNotFound:
            # As `docker run` does: pull a missing image, then create.
            from plexagent.host.docker.specs import split_image

            repository, tag = split_image(image)
            client.images.pull(repository, tag=tag or "latest")
            container = client.containers.create(image, command, **kwargs)
        try:
            # A pull may have taken minutes since the volumes were checked.
            start_checked(client, container.id, policy)
        except Exception:
            # Do not leave a created-but-broken container holding the name.
            try:
                container.remove(force=True)
            except Exception:
                pass
            raise
        container.reload()
        return {"success": True, "id": container.id, "name": container.name, **container_status(container.attrs)}

    @staticmethod
    def act(client: Any, name: str, action: str, policy: PathPolicy, **kwargs: Any) -> dict[str, Any]:
        api = client.api
        if action == "start":
            name = start_checked(client, name, policy)
        elif action == "stop":
            api.stop(name, timeout=kwargs["timeout"])
        elif action == "restart":
            name = start_checked(client, name, policy, restart_timeout=kwargs.get("timeout", 10))
        elif action == "remove":
            info = api.inspect_container(name)
            api.remove_container(name, v=kwargs["volumes"], force=kwargs["force"])
            return {"success": True, "id": info["Id"], "name": info["Name"].lstrip("/"), "removed": True}
        else:  # pragma: no cover - the routes only pass the actions above
            raise ValueError(action)
        return {"success": True, **container_status(api.inspect_container(name))}

    @staticmethod
    def logs(client: Any, name: str, tail: int | str) -> str:
        raw = client.api.logs(name, stdout=True, stderr=True, tail=tail)
        return raw.decode("utf-8", "replace")

    @staticmethod
    def exec(client: Any, name: str, command: Any, user: str, workdir: str | None) -> dict[str, Any]:
        api = client.api
        exec_id = api.exec_create(name, command, stdout=True, stderr=True, user=user or "", workdir=workdir)
        output = api.exec_start(exec_id["Id"])
        exit_code = api.exec_inspect(exec_id["Id"]).get("ExitCode")
        return {"exit_code": exit_code, "output": output.decode("utf-8", "replace")}

    @staticmethod
    def inspect_all(client: Any) -> list[dict[str, Any]]:
        result = []
        for c in client.api.containers(all=True):
            try:
                result.append(client.api.inspect_container(c["Id"]))
            except docker.errors.NotFound:
                continue  # removed meanwhile
        return result


class ContainerOperations:
    """The facade's container operations (run, start, stop, restart, remove, logs, exec, status)."""

    pool: DockerPool
    paths: PathPolicy
    container_list: ContainerListCache

    def _changes(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        # The agent's own changes show at once, before their event arrives.
        def invalidate(result: Any) -> Any:
            self.container_list.invalidate()
            return result

        return d.addBoth(invalidate)

    def ping(self) -> defer.Deferred[bool]:
        return self.pool.ping()

    def list_containers(self) -> defer.Deferred[list[dict[str, Any]]]:
        return self.container_list.get(lambda: self.pool.call(_ContainerOps.list_containers))

    def inspect(self, name: str) -> defer.Deferred[dict[str, Any]]:
        return self.pool.call(_ContainerOps.inspect, name)

    def status(self, name: str) -> defer.Deferred[dict[str, Any]]:
        # The status text is computed now from the (possibly cached) state.
        info = self.container_list.get(lambda: self.inspect(name), key=("inspect", name))
        return info.addCallback(container_status)

    def run(self, kwargs: dict[str, Any]) -> defer.Deferred[dict[str, Any]]:
        return self._changes(self.pool.call(_ContainerOps.run, kwargs, self.paths, what="image"))

    def act(self, name: str, action: str, **kwargs: Any) -> defer.Deferred[dict[str, Any]]:
        return self._changes(self.pool.call(_ContainerOps.act, name, action, self.paths, **kwargs))

    def logs(self, name: str, tail: int | str) -> defer.Deferred[str]:
        return self.pool.call(_ContainerOps.logs, name, tail)

    def follow_logs(self, name: str, tail: int | str, on_chunk: Callable[[bytes], None]) -> Stream:
        return self.pool.stream(
            lambda client: client.api.logs(name, stdout=True, stderr=True, stream=True, follow=True, tail=tail),
            on_chunk,
        )

    def exec(self, name: str, command: Any, user: str, workdir: str | None) -> defer.Deferred[dict[str, Any]]:
        return self.pool.call(_ContainerOps.exec, name, command, user, workdir)

    def inspect_all(self) -> defer.Deferred[list[dict[str, Any]]]:
        return self.pool.call(_ContainerOps.inspect_all)
