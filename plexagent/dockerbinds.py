"""
Bind mounts of the containers the agent starts, checked again at every start.

Docker resolves a bind mount's host path each time the container starts,
following whatever symlink it finds there then. A host path checked when
the container was created (``dockerspec.parse_volumes``) may since have
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

What cannot be guaranteed: a swap in the instant between the check and
Docker's mount, and starts Docker makes on its own (restart policies, the
daemon coming back).
"""

from __future__ import annotations

import json
import os
from typing import Any

from plexagent import errors
from plexagent.paths import PathPolicy

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
