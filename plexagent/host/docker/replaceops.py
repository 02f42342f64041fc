"""
The blocking steps of a container replace, each run on the Docker pool
(``replace.Replacer`` journals between them). Every step can run again
after a crash: containers are found by ID (a rename keeps it) or by the
replace's token label, never by name alone.
"""

from __future__ import annotations

from typing import Any

import docker.errors

from plexagent import errors
from plexagent.host.docker import recreate
from plexagent.host.docker.binds import check as check_binds
from plexagent.host.docker.binds import start_checked
from plexagent.host.docker.replacejournal import ReplaceRecord, RollbackTarget
from plexagent.host.docker.specs import split_image
from plexagent.host.files.paths import PathPolicy


def _ensure_image(client: Any, reference: str) -> dict[str, Any]:
    """The image's inspect data, pulled first when missing (as ``docker run`` does)."""
    try:
        return client.api.inspect_image(reference)
    except docker.errors.ImageNotFound:
        repository, tag = split_image(reference)
        client.images.pull(repository, tag=tag or "latest")
        return client.api.inspect_image(reference)


def _base(client: Any, info: dict[str, Any]) -> dict[str, Any]:
    """The inspect data of the image ``info``'s container runs (by ID: its tag may have moved)."""
    try:
        return client.api.inspect_image(info["Image"])
    except docker.errors.ImageNotFound:
        raise errors.Conflict(
            "the container's image is gone",
            f"the image {info['Image']} of {info['Name'].lstrip('/')} no longer exists, so what the container "
            "inherits from it cannot be told apart from what was set for it",
        ) from None


def prepare(client: Any, container_id: str, new_image: str | None, target: RollbackTarget | None,
            environment: dict[str, str] | None, policy: PathPolicy, token: str) -> dict[str, Any]:
    """
    Everything a replace (``new_image``) or a rollback (``target``) needs,
    checked before anything changes: the old container, its configuration
    to keep, the new one's body (binds checked now), and whether it has a
    health check. Pulls a missing image.
    """
    info = client.api.inspect_container(container_id)
    recreate.refuse_unreplaceable(info)
    check_binds(info, policy)
    base = _base(client, info)
    if target is None:
        assert new_image is not None
        image = _ensure_image(client, new_image)
        body = recreate.derive(info, base, new_image, environment)
        image_ref = new_image
    else:
        # The tag it was made from, when it still names the same image.
        image_ref = target.image
        try:
            image = client.api.inspect_image(target.image)
            if image["Id"] != target.image_id:
                raise docker.errors.ImageNotFound("moved")
        except docker.errors.ImageNotFound:
            image_ref = target.image_id
            image = _ensure_image(client, target.image_id)
        body = {**target.body, "config": {**target.body["config"], "Image": image_ref}}
    new_body = recreate.checked(body, policy, token)
    state = info.get("State") or {}
    return {
        "info": info,
        "old_image": (info.get("Config") or {}).get("Image") or info["Image"],
        "new_image": image_ref,
        "new_image_id": image["Id"],
        "new_body": new_body,
        "previous_body": recreate.derive(info, base, info["Image"]),
        "health_check": recreate.has_health_check(new_body, image),
        "running": bool(state.get("Running")),
    }


def set_aside(client: Any, record: ReplaceRecord) -> None:
    """Take the old container's restart policy away (Docker must not start it again) and free the name."""
    api = client.api
    api.update_container(record.old_id, restart_policy={"Name": "no"})
    if api.inspect_container(record.old_id)["Name"].lstrip("/") == record.name:
        api.rename(record.old_id, record.aside_name)


def create(client: Any, record: ReplaceRecord) -> str:
    """Create the new container under the name, joined to all its networks; its ID."""
    api = client.api
    body = record.new_body
    answer = api.create_container_from_config(body["config"], record.name)
    container_id = answer["Id"]
    for network in body["networks"]:
        ipam = network.get("IPAMConfig") or {}
        api.connect_container_to_network(
            container_id, network["name"], aliases=network.get("Aliases"), links=network.get("Links"),
            ipv4_address=ipam.get("IPv4Address") or None, ipv6_address=ipam.get("IPv6Address") or None,
            driver_opt=network.get("DriverOpts"),
        )
    return container_id


def stop(client: Any, container_id: str, timeout: int) -> None:
    client.api.stop(container_id, timeout=timeout)


def start(client: Any, container_id: str, policy: PathPolicy) -> dict[str, Any]:
    """Start the new container (binds checked first); its state then."""
    start_checked(client, container_id, policy)
    return client.api.inspect_container(container_id)["State"]


def state(client: Any, container_id: str) -> dict[str, Any]:
    info = client.api.inspect_container(container_id)
    return {**(info.get("State") or {}), "RestartCount": info.get("RestartCount", 0)}


def last_logs(client: Any, record: ReplaceRecord, lines: int = 50) -> str:
    """The new container's last log lines (stdout and stderr), or "" when there is none."""
    for container_id in _new_containers(client, record):
        try:
            return client.api.logs(container_id, stdout=True, stderr=True, tail=lines).decode("utf-8", "replace")
        except docker.errors.NotFound:
            continue
    return ""


def _new_containers(client: Any, record: ReplaceRecord) -> list[str]:
    """The replace's new container(s): by the ID journaled, and by its token label."""
    found = [record.new_id] if record.new_id else []
    labelled = client.api.containers(all=True, filters={"label": f"{recreate.REPLACE_LABEL}={record.token}"})
    found += [c["Id"] for c in labelled if c["Id"] not in found]
    return found


def remove(client: Any, container_id: str, volumes: bool) -> None:
    try:
        client.api.remove_container(container_id, force=True, v=volumes)
    except docker.errors.NotFound:
        pass


def undo(client: Any, record: ReplaceRecord, policy: PathPolicy) -> str:
    """
    Roll back: remove the new container, give the old one its name and
    restart policy back, and start it if it ran before. What it did.
    """
    api = client.api
    for container_id in _new_containers(client, record):
        remove(client, container_id, volumes=True)
    try:
        info = api.inspect_container(record.old_id)
    except docker.errors.NotFound:
        return f"the old container {record.old_id[:12]} is gone: nothing to start again"
    if info["Name"].lstrip("/") != record.name:
        try:
            api.rename(record.old_id, record.name)
        except docker.errors.APIError as e:
            if e.status_code != 409:
                raise
            raise errors.Conflict(
                "the container's name is taken",
                f"another container took the name {record.name}; the old container is kept as {record.aside_name}",
            ) from None
    api.update_container(record.old_id, restart_policy=record.old_restart_policy)
    if record.old_running and not (info.get("State") or {}).get("Running"):
        start_checked(client, record.old_id, policy)
        return f"{record.old_id[:12]} runs again"
    return f"{record.old_id[:12]} is back"


def complete(client: Any, record: ReplaceRecord, policy: PathPolicy) -> bool:
    """
    Finish a replace whose new container was healthy: remove the old one
    and see that the new one runs. False when the new one is gone (the
    caller then rolls back).
    """
    api = client.api
    try:
        info = api.inspect_container(record.new_id) if record.new_id else None
    except docker.errors.NotFound:
        info = None
    if info is None:
        return False
    remove(client, record.old_id, volumes=False)
    if not (info.get("State") or {}).get("Running"):
        start_checked(client, info["Id"], policy)
    return True
