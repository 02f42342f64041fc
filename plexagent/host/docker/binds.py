"""
Bind mounts of the containers the agent starts, checked again at every start.

Docker resolves a bind mount's host path each time the container starts,
following whatever symlink it finds there then. A host path checked when
the container was created (``specs.parse_volumes``) may since have
been replaced by a symlink to anywhere on the host: by a git checkout, an
extracted archive, or anyone with write access below an allowed root. So:

- When the agent creates a container (``/containers/run``, each cron run)
  it records the resolved host paths it validated in the label
  ``plexagent.binds`` (``bind_label``).
- Before every start the agent performs (run, start, restart, a cron run),
  the bind sources of the container as Docker holds them are checked again
  (``check``) in the same worker thread, right before Docker is asked to
  start it (``start_checked``). A restart is a stop then a checked start,
  so a swap during the stop's grace period is caught too.
- Docker also starts containers on its own (restart policies, the daemon
  coming back). ``BindGuard`` checks each running container the agent
  created whenever Docker reports a start and whenever its event watch
  (re)connects; one whose bind now escapes is killed and its restart
  policy set to ``no``, so that Docker does not bring it back.

What cannot be guaranteed: a swap in the instant between the check and
Docker's mount (the guard then stops the container at its start event),
and what a container that Docker started on its own did before the agent
heard of it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import docker.errors
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from plexagent import errors
from plexagent.host.files.paths import PathPolicy

log = Logger()

#: The label recording the host paths the agent validated for a
#: container's bind mounts (a JSON list); its presence marks the containers
#: the agent created.
BIND_LABEL = "plexagent.binds"


def bind_label(volumes: dict[str, Any]) -> str:
    """The ``BIND_LABEL`` value for docker-py ``volumes`` whose host paths were validated."""
    return json.dumps(sorted(source for source in volumes if source.startswith("/")))


def _recorded(info: dict[str, Any]) -> list[str] | None:
    """The host paths recorded at creation; None for a container the agent did not create."""
    labels = (info.get("Config") or {}).get("Labels") or {}
    if BIND_LABEL not in labels:
        return None
    try:
        value = json.loads(labels[BIND_LABEL])
    except ValueError:
        return []
    if not isinstance(value, list):
        return []
    return [s for s in value if isinstance(s, str)]


def bind_mounts(info: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path, container path) of each bind mount in Docker's inspect data."""
    found: dict[str, str] = {}
    for mount in info.get("Mounts") or []:
        if mount.get("Type") == "bind" and isinstance(mount.get("Source"), str):
            found.setdefault(mount["Source"], str(mount.get("Destination", "")))
    host = info.get("HostConfig") or {}
    for bind in host.get("Binds") or []:
        source, _, rest = str(bind).partition(":")
        if source.startswith("/"):
            found.setdefault(source, rest.partition(":")[0])
    for mount in host.get("Mounts") or []:
        if mount.get("Type") == "bind" and isinstance(mount.get("Source"), str):
            found.setdefault(mount["Source"], str(mount.get("Target", "")))
    return sorted(found.items())


def problem(info: dict[str, Any], policy: PathPolicy) -> str | None:
    """
    Why starting this container now would mount a host path outside the
    allowed paths, or None.

    For a container the agent created, every bind must be one it validated
    and must still resolve inside the allowed paths. For others (made with
    the docker CLI), only binds inside the allowed paths are the agent's
    business: they must still resolve inside them.
    """
    recorded = _recorded(info)
    for source, target in bind_mounts(info):
        if recorded is not None and source not in recorded:
            return f"{source} (mounted at {target}) is not a host path the agent checked when it created the container"
        if recorded is None and not policy.contains(os.path.normpath(source)):
            continue
        real = os.path.realpath(source)
        if not policy.contains(real):
            return f"{source} (mounted at {target}) now resolves to {real}, outside agent_api.allowed_paths"
    return None


def check(info: dict[str, Any], policy: PathPolicy) -> None:
    """Raise ``Conflict`` naming the path when the container's binds escape (``problem``)."""
    why = problem(info, policy)
    if why is not None:
        raise errors.Conflict(
            "bind mount outside the allowed paths",
            f"{why}; the container was not started. Put the directory back, "
            "or remove the container and run it again with allowed volumes",
        )


def start_checked(client: Any, ref: str, policy: PathPolicy, restart_timeout: int | None = None) -> str:
    """
    In a worker thread: start container ``ref`` (stop it first when
    ``restart_timeout`` is given) once its binds pass ``check``. Its id.
    """
    api = client.api
    info = api.inspect_container(ref)
    check(info, policy)
    container_id = info["Id"]
    if restart_timeout is not None:
        api.stop(container_id, timeout=restart_timeout)
        # The stop may have taken its whole grace period: look again.
        check(api.inspect_container(container_id), policy)
    api.start(container_id)
    return container_id


# -- Docker's own starts -----------------------------------------------------


def _guarded(info: dict[str, Any], policy: PathPolicy) -> bool:
    """A running container this agent created (its recorded paths are in its roots)."""
    recorded = _recorded(info)
    if recorded is None or not (info.get("State") or {}).get("Running"):
        return False
    return all(policy.contains(os.path.normpath(source)) for source in recorded)


def contain(client: Any, container_id: str, policy: PathPolicy) -> tuple[str, str] | None:
    """
    In a worker thread: if ``container_id`` is a running container the
    agent created whose binds now escape, remove its restart policy and
    kill it. (name, why) when it did.
    """
    api = client.api
    try:
        info = api.inspect_container(container_id)
    except docker.errors.NotFound:
        return None
    if not _guarded(info, policy):
        return None
    why = problem(info, policy)
    if why is None:
        return None
    try:
        # First, so that Docker does not start it again once killed.
        api.update_container(info["Id"], restart_policy={"Name": "no"})
        api.kill(info["Id"])
    except docker.errors.NotFound:
        return None
    except docker.errors.APIError as e:
        if e.status_code != 409:  # 409: it stopped meanwhile
            raise
    return (info.get("Name") or "").lstrip("/"), why


def contain_all(client: Any, policy: PathPolicy) -> list[tuple[str, str]]:
    """In a worker thread: ``contain`` every running container the agent created."""
    found = []
    for summary in client.api.containers(filters={"label": BIND_LABEL, "status": "running"}):
        result = contain(client, summary["Id"], policy)
        if result is not None:
            found.append(result)
    return found


class BindGuard(service.Service):
    """
    Stops the containers the agent created that Docker started on its own
    (restart policies, the daemon coming back) with a bind that now
    escapes the allowed paths: on each container start Docker reports, and
    for every running one whenever the event watch (re)connects (starts
    while it was not connected are not reported). While Docker is
    unreachable the watch is retried every ``retry`` seconds, doubling up
    to ``max_retry``.
    """

    def __init__(self, facade: Any, policy: PathPolicy, clock: Any, retry: float = 1.0,
                 max_retry: float = 30.0) -> None:
        self.setName("dockerbinds")
        self.facade = facade
        self.pool = facade.pool
        self.policy = policy
        self.clock = clock
        self.retry = retry
        self.max_retry = max_retry
        self._delay = retry
        self._timer: Any = None
        #: (container name, why) of each container stopped, oldest first
        self.contained: list[tuple[str, str]] = []
        self._waiting: list[defer.Deferred[tuple[str, str]]] = []

    def startService(self) -> None:
        super().startService()
        watch = self.facade.container_list
        watch.on_event.append(self._event)
        watch.on_connect.append(self._connected)
        watch.on_end.append(self._ended)
        # Only once the reactor runs: a start that fails later (a listener
        # that cannot bind) must not leave a watching thread behind.
        self._timer = self.clock.callLater(0, self._reconnect)

    def stopService(self) -> None:
        super().stopService()
        watch = self.facade.container_list
        for hooks, hook in ((watch.on_event, self._event), (watch.on_connect, self._connected),
                            (watch.on_end, self._ended)):
            if hook in hooks:
                hooks.remove(hook)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def next_contained(self) -> defer.Deferred[tuple[str, str]]:
        """Fires with (name, why) when the guard next stops a container."""
        d: defer.Deferred[tuple[str, str]] = defer.Deferred()
        self._waiting.append(d)
        return d

    def _event(self, event: Any) -> None:
        if not isinstance(event, dict) or event.get("Action") != "start":
            return
        actor = event.get("Actor") or {}
        if BIND_LABEL not in (actor.get("Attributes") or {}) or not actor.get("ID"):
            return
        container_id = actor["ID"]
        self._run(lambda: self.pool.background_call(contain, container_id, self.policy),
                  lambda found: [found] if found else [])

    def _connected(self) -> None:
        self._delay = self.retry
        self._run(lambda: self.pool.background_call(contain_all, self.policy), lambda found: found)

    def _ended(self) -> None:
        if not self.running or not self.pool.running or (self._timer is not None and self._timer.active()):
            return
        delay, self._delay = self._delay, min(self._delay * 2, self.max_retry)
        self._timer = self.clock.callLater(delay, self._reconnect)

    def _reconnect(self) -> None:
        self._timer = None
        if self.running:
            self.facade.container_list.watch()

    def _run(self, call: Callable[[], defer.Deferred[Any]], found: Callable[[Any], list[tuple[str, str]]]) -> None:
        if not self.running:
            return
        d = call()

        def done(result: Any) -> None:
            for name, why in found(result):
                self._stopped(name, why)

        def failed(failure: Any) -> None:
            log.warn("cannot check the bind mounts of started containers: {why}", why=failure.getErrorMessage())

        d.addCallbacks(done, failed)

    def _stopped(self, name: str, why: str) -> None:
        log.warn("container {name} was killed and its restart policy set to no: {why}", name=name, why=why)
        self.contained.append((name, why))
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback((name, why))
