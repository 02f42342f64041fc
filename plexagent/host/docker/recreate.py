"""
A container's configuration as Docker's create body, to make it again from
another image (``POST /containers/<n>/replace``) or from a configuration
kept for a rollback.

The body is built from Docker's inspect data, not from docker-py's
keyword arguments: ``HostConfig`` is carried over whole (ports, binds,
mounts, restart policy, resources, capabilities, devices, DNS, log
driver, ...: everything Docker's create takes), and so are the networks
with their aliases and static addresses. What a container inherits from
its image is not carried over, so that the new image's own defaults apply:
``Cmd`` and ``Entrypoint``, environment entries, labels, exposed ports,
volumes, the health check, user, working directory and stop signal are
kept only where the container's value differs from its old image's (a
value set explicitly to what the old image had is taken as inherited).
Docker's default hostname (the container's short ID) is dropped too.

Bind mounts are checked again (``checked``): every host path through the
path policy (resolved, inside ``agent_api.allowed_paths``), named volumes
by name, and the ``plexagent.binds`` label is made anew, so the new
container is started only with binds the agent validated now.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from plexagent import errors
from plexagent.host.docker.binds import BIND_LABEL
from plexagent.host.docker.specs import RESERVED_LABEL_PREFIX, parse_environment, parse_volumes
from plexagent.host.files.paths import PathPolicy

#: Labels the new container of a replace carries: the replace's token, by
#: which a restarted agent finds it even before its ID was journaled.
REPLACE_LABEL = "plexagent.replace"

#: Config fields kept when they differ from the old image's.
_INHERITABLE = ("User", "WorkingDir", "StopSignal", "Shell", "Healthcheck")
#: Config fields an image does not set: kept when set at all.
_OWN = ("Domainname", "Tty", "OpenStdin", "StdinOnce", "AttachStdin", "AttachStdout", "AttachStderr",
        "StopTimeout", "MacAddress")


def _env_dict(entries: list[str]) -> dict[str, str]:
    result: dict[str, str] = {}
    for entry in entries:
        key, _, value = entry.partition("=")
        result[key] = value
    return result


def _config(info: dict[str, Any], image: dict[str, Any], new_image: str,
            environment: dict[str, str] | None) -> dict[str, Any]:
    config = info.get("Config") or {}
    base = image.get("Config") or {}
    body: dict[str, Any] = {"Image": new_image}
    if config.get("Entrypoint") != base.get("Entrypoint"):
        # An explicit entrypoint drops the image's Cmd: keep the container's as it is.
        body["Entrypoint"] = config.get("Entrypoint")
        body["Cmd"] = config.get("Cmd")
    elif config.get("Cmd") != base.get("Cmd"):
        body["Cmd"] = config.get("Cmd")
    inherited_env = set(base.get("Env") or [])
    env = _env_dict([e for e in (config.get("Env") or []) if e not in inherited_env])
    env.update(environment or {})
    if env:
        body["Env"] = [f"{k}={v}" for k, v in env.items()]
    base_labels = base.get("Labels") or {}
    body["Labels"] = {
        k: v for k, v in (config.get("Labels") or {}).items()
        if base_labels.get(k) != v and not k.startswith(RESERVED_LABEL_PREFIX)
    }
    host = info.get("HostConfig") or {}
    exposed: dict[str, Any] = {p: {} for p in (config.get("ExposedPorts") or {}) if p not in (base.get("ExposedPorts") or {})}
    exposed.update({p: {} for p in (host.get("PortBindings") or {})})
    if exposed:
        body["ExposedPorts"] = exposed
    volumes: dict[str, Any] = {p: {} for p in (config.get("Volumes") or {}) if p not in (base.get("Volumes") or {})}
    if volumes:
        body["Volumes"] = volumes
    for field in _INHERITABLE:
        if config.get(field) not in (None, "", []) and config.get(field) != base.get(field):
            body[field] = config[field]
    hostname = config.get("Hostname")
    if hostname and not str(info.get("Id", "")).startswith(hostname):
        body["Hostname"] = hostname
    for field in _OWN:
        if config.get(field):
            body[field] = config[field]
    return body


def _endpoint(network: dict[str, Any], container_id: str, with_aliases: bool) -> dict[str, Any]:
    endpoint: dict[str, Any] = {}
    aliases = [a for a in (network.get("Aliases") or []) if not container_id.startswith(a)]
    if aliases and with_aliases:
        endpoint["Aliases"] = aliases
    for field in ("IPAMConfig", "Links", "DriverOpts"):
        if network.get(field):
            endpoint[field] = network[field]
    return endpoint


def derive(info: dict[str, Any], image: dict[str, Any], new_image: str,
           environment: dict[str, str] | None = None) -> dict[str, Any]:
    """
    The body that makes ``info``'s container again from ``new_image``
    (``image`` is the inspect data of the image it runs now):
    ``{"config": <Docker's create body>, "networks": [<more networks to connect>]}``.
    Its bind mounts are not checked yet: see ``checked``.
    """
    config = _config(info, image, new_image, environment)
    host = copy.deepcopy(info.get("HostConfig") or {})
    config["HostConfig"] = host
    mode = str(host.get("NetworkMode") or "default")
    networks = (info.get("NetworkSettings") or {}).get("Networks") or {}
    container_id = str(info.get("Id", ""))
    more: list[dict[str, Any]] = []
    if not (mode in ("host", "none") or mode.startswith("container:")):
        primary = "bridge" if mode == "default" else mode
        if primary in networks:
            endpoint = _endpoint(networks[primary], container_id, primary != "bridge")
            config["NetworkingConfig"] = {"EndpointsConfig": {primary: endpoint}}
        for name, network in sorted(networks.items()):
            if name != primary:
                more.append({"name": name, **_endpoint(network, container_id, True)})
    return {"config": config, "networks": more}


def checked(body: dict[str, Any], policy: PathPolicy, token: str) -> dict[str, Any]:
    """
    ``body`` with its bind mounts checked now (the path policy; 403 ``path
    not allowed`` for a host path outside it), its ``plexagent.binds``
    label made anew, and ``token`` in its ``plexagent.replace`` label.
    """
    body = copy.deepcopy(body)
    config = body["config"]
    host = config.setdefault("HostConfig", {})
    volumes = parse_volumes(host.get("Binds") or [], policy)
    host["Binds"] = [f"{source}:{spec['bind']}:{spec['mode']}" for source, spec in volumes.items()] or None
    sources = [source for source in volumes if source.startswith("/")]
    for i, mount in enumerate(host.get("Mounts") or []):
        if isinstance(mount, dict) and mount.get("Type") == "bind":
            mount["Source"] = policy.resolve(str(mount.get("Source", "")), f"mounts[{i}]")
            sources.append(mount["Source"])
    labels = {k: v for k, v in (config.get("Labels") or {}).items() if not k.startswith(RESERVED_LABEL_PREFIX)}
    labels[BIND_LABEL] = json.dumps(sorted(set(sources)))
    labels[REPLACE_LABEL] = token
    config["Labels"] = labels
    return body


def has_health_check(body: dict[str, Any], image: dict[str, Any]) -> bool:
    """Whether a container made from ``body`` on ``image`` (inspect data) has a Docker health check."""
    check = body["config"].get("Healthcheck") or (image.get("Config") or {}).get("Healthcheck") or {}
    test = check.get("Test") or []
    return bool(test) and test[0] != "NONE"


def refuse_unreplaceable(info: dict[str, Any]) -> None:
    """409 for a container that cannot be replaced and kept for a rollback."""
    host = info.get("HostConfig") or {}
    name = str(info.get("Name", "")).lstrip("/")
    if host.get("AutoRemove"):
        raise errors.Conflict(
            "container removes itself when stopped",
            f"{name} was started with --rm (AutoRemove): stopping it would remove it, so it could not be "
            "started again if the new one is not healthy; run it without --rm first",
        )


# -- the request bodies of /containers/<n>/replace and /rollback -------------

#: Seconds a new container has to become healthy, unless the request says.
DEFAULT_HEALTH_TIMEOUT = 60.0
MAX_HEALTH_TIMEOUT = 3600.0
DEFAULT_STOP_TIMEOUT = 10
MAX_STOP_TIMEOUT = 3600
_IMAGE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.:/@-]{0,511}")
REPLACE_FIELDS = ("image", "environment", "health_timeout", "stop_timeout")
ROLLBACK_FIELDS = ("health_timeout", "stop_timeout")


def _timeouts(body: dict[str, Any]) -> tuple[float, int]:
    health = body.get("health_timeout", DEFAULT_HEALTH_TIMEOUT)
    if (isinstance(health, bool) or not isinstance(health, (int, float))
            or not 0 < health <= MAX_HEALTH_TIMEOUT):  # false for NaN too
        raise errors.InvalidInput(
            "invalid health_timeout", f"health_timeout must be a number of seconds above 0, at most {MAX_HEALTH_TIMEOUT:g}"
        )
    stop = body.get("stop_timeout", DEFAULT_STOP_TIMEOUT)
    if isinstance(stop, bool) or not isinstance(stop, int) or not 0 <= stop <= MAX_STOP_TIMEOUT:
        raise errors.InvalidInput("invalid stop_timeout", f"stop_timeout must be an integer from 0 to {MAX_STOP_TIMEOUT}")
    return float(health), stop


def _known(body: dict[str, Any], fields: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise errors.InvalidInput(f"unknown field {unknown[0]}", f"the {what} body takes only {', '.join(fields)}")


def parse_replace(body: dict[str, Any]) -> tuple[str, dict[str, str], float, int]:
    """(image, environment, health_timeout, stop_timeout) of a replace body; 400 naming the field otherwise."""
    _known(body, REPLACE_FIELDS, "replace")
    image = body.get("image")
    if not isinstance(image, str) or not image:
        raise errors.InvalidInput("image is required", "image must be an image reference such as \"app:1.2\"")
    if not _IMAGE.fullmatch(image):
        raise errors.InvalidInput("invalid image", f"image {image!r} is not an image reference such as \"app:1.2\"")
    environment = parse_environment(body.get("environment"))
    health, stop = _timeouts(body)
    return image, environment, health, stop


def parse_rollback(body: dict[str, Any]) -> tuple[float, int]:
    """(health_timeout, stop_timeout) of a rollback body (``{}`` without one)."""
    _known(body, ROLLBACK_FIELDS, "rollback")
    return _timeouts(body)
