"""
Request shapes of the Docker routes -> docker-py arguments.

Users send the seed's forms and the obvious variants (``ports`` as a list of
``"8080:80"``, ``"53:53/udp"``, ``"127.0.0.1:8443:443"`` or a
``{host: container}`` object; ``environment`` as ``["K=V"]`` or an object;
``command`` as a list or a string; ``health_check.test`` as a shell string
or a Docker test list). Each parser takes plain JSON values and returns
plain values or raises ``errors.InvalidInput`` naming the field; host paths
of volumes go through the path policy (``errors.Forbidden``) before anything
is created.
"""

from __future__ import annotations

import re
from typing import Any

from plexagent import errors
from plexagent.paths import PathPolicy
from plexagent.strictparse import parse_int

_NAME = re.compile(r"/?[a-zA-Z0-9][a-zA-Z0-9_.-]*")
_VOLUME_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
_RESTART = ("no", "always", "unless-stopped", "on-failure")


def require_str(body: dict[str, Any], field: str) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value.strip():
        raise errors.InvalidInput(f"{field} is required", f"{field} must be a non-empty string")
    return value.strip()


def optional_str(body: dict[str, Any], field: str) -> str | None:
    value = body.get(field)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise errors.InvalidInput(f"invalid {field}", f"{field} must be a string")
    return value


def container_name(value: Any, field: str = "name") -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value) or len(value) > 255:
        raise errors.InvalidInput(
            f"invalid {field}",
            f"{field} must start with a letter or digit and contain only letters, digits, '_', '.' and '-'",
        )
    return value


def _port_number(value: Any, field: str) -> int:
    try:
        number = parse_int(value)
    except ValueError:
        raise errors.InvalidInput("invalid ports", f"{field}: {value!r} is not a port number") from None
    if not 1 <= number <= 65535:
        raise errors.InvalidInput("invalid ports", f"{field}: {number} is not between 1 and 65535")
    return number


def _container_port(value: Any, field: str) -> str:
    text = str(value)
    port, _, proto = text.partition("/")
    proto = proto or "tcp"
    if proto not in ("tcp", "udp", "sctp"):
        raise errors.InvalidInput("invalid ports", f"{field}: protocol must be tcp, udp or sctp, got {proto!r}")
    return f"{_port_number(port, field)}/{proto}"


def parse_ports(value: Any) -> dict[str, Any]:
    """
    ``{"80/tcp": 8080, "443/tcp": ("127.0.0.1", 8443), "53/udp": 53}``
    (docker-py's form: container port -> host binding).
    """
    if value is None:
        return {}
    result: dict[str, Any] = {}
    if isinstance(value, dict):
        for host, container in value.items():
            field = f"ports[{host!r}]"
            host_port = None if str(host).strip() in ("", "0") else _port_number(host, field)
            result[_container_port(container, field)] = host_port
        return result
    if not isinstance(value, list):
        raise errors.InvalidInput("invalid ports", "ports must be a list such as [\"8080:80\"] or an object {\"8080\": 80}")
    for i, entry in enumerate(value):
        field = f"ports[{i}]"
        if isinstance(entry, int):
            entry = str(entry)
        if not isinstance(entry, str) or not entry:
            raise errors.InvalidInput("invalid ports", f"{field} must be a string such as \"8080:80\"")
        spec, slash, proto = entry.partition("/")
        suffix = f"/{proto}" if slash else ""
        if spec.startswith("["):
            # [::1]:8443:443
            close = spec.find("]")
            if close < 0 or spec[close + 1: close + 2] != ":":
                raise errors.InvalidInput("invalid ports", f"{field}: {entry!r} is not [IP]:HOST:CONTAINER")
            ip = spec[1:close]
            rest = spec[close + 2:].split(":")
            if len(rest) != 2:
                raise errors.InvalidInput("invalid ports", f"{field}: {entry!r} is not [IP]:HOST:CONTAINER")
            parts = [ip] + rest
        else:
            parts = spec.split(":")
        if len(parts) == 1:
            result[_container_port(parts[0] + suffix, field)] = None
        elif len(parts) == 2:
            # Host port 0 (or empty): Docker picks a free one.
            host_port = _port_number(parts[0], field) if parts[0] not in ("", "0") else None
            result[_container_port(parts[1] + suffix, field)] = host_port
        elif len(parts) == 3:
            ip, host, container = parts
            binding: Any = (ip, _port_number(host, field)) if host not in ("", "0") else (ip,)
            result[_container_port(container + suffix, field)] = binding
        else:
            raise errors.InvalidInput("invalid ports", f"{field}: {entry!r} is not HOST:CONTAINER or IP:HOST:CONTAINER")
    return result


def parse_environment(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    result: dict[str, str] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or not key or "=" in key:
                raise errors.InvalidInput("invalid environment", f"environment key {key!r} is not a variable name")
            result[key] = "" if item is None else str(item) if not isinstance(item, bool) else str(item).lower()
        return result
    if not isinstance(value, list):
        raise errors.InvalidInput("invalid environment", "environment must be a list of \"K=V\" or an object")
    for i, entry in enumerate(value):
        if not isinstance(entry, str) or "=" not in entry or entry.startswith("="):
            raise errors.InvalidInput("invalid environment", f"environment[{i}] must be \"KEY=VALUE\"")
        key, _, item = entry.partition("=")
        result[key] = item
    return result


def parse_command(value: Any, field: str = "command") -> list[str] | str | None:
    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip():
            raise errors.InvalidInput(f"invalid {field}", f"{field} must not be empty")
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise errors.InvalidInput(f"invalid {field}", f"{field} must be a string or a non-empty list of strings")


def parse_volumes(value: Any, policy: PathPolicy) -> dict[str, dict[str, str]]:
    """
    docker-py's ``{source: {"bind": target, "mode": mode}}``. A source that
    looks like a path must be inside the allowed paths (resolved, so ``..``
    and symlinks cannot escape); anything else is a named volume.
    """
    if value is None:
        return {}
    entries: list[tuple[str, Any, Any, Any]] = []
    if isinstance(value, dict):
        for source, target in value.items():
            field = f"volumes[{source!r}]"
            if isinstance(target, dict):
                bind = target.get("bind")
                mode = target.get("mode", "rw")
            else:
                bind, mode = target, "rw"
            entries.append((field, source, bind, mode))
    elif isinstance(value, list):
        for i, entry in enumerate(value):
            field = f"volumes[{i}]"
            if not isinstance(entry, str):
                raise errors.InvalidInput("invalid volumes", f"{field} must be \"SOURCE:TARGET[:MODE]\"")
            parts = entry.split(":")
            if len(parts) == 2:
                entries.append((field, parts[0], parts[1], "rw"))
            elif len(parts) == 3:
                entries.append((field, parts[0], parts[1], parts[2]))
            else:
                raise errors.InvalidInput("invalid volumes", f"{field} must be \"SOURCE:TARGET[:MODE]\"")
    else:
        raise errors.InvalidInput("invalid volumes", "volumes must be a list of \"SOURCE:TARGET\" or an object")
    result: dict[str, dict[str, str]] = {}
    for field, source, bind, mode in entries:
        if not isinstance(source, str) or not source:
            raise errors.InvalidInput("invalid volumes", f"{field}: the source must be a host path or a volume name")
        if not isinstance(bind, str) or not bind.startswith("/"):
            raise errors.InvalidInput("invalid volumes", f"{field}: the target must be an absolute path in the container")
        if not isinstance(mode, str) or not re.fullmatch(r"[a-zA-Z,]+", mode):
            raise errors.InvalidInput("invalid volumes", f"{field}: mode must be such as rw or ro")
        if source.startswith(("/", ".", "~")):
            source = policy.resolve(source, field)
        elif not _VOLUME_NAME.fullmatch(source):
            raise errors.InvalidInput("invalid volumes", f"{field}: {source!r} is neither an absolute host path nor a volume name")
        result[source] = {"bind": bind, "mode": mode}
    return result


def parse_restart_policy(value: Any) -> dict[str, Any] | None:
    if value is None or value == "":
        return None
    retries: Any
    if isinstance(value, dict):
        name = value.get("Name", value.get("name"))
        retries = value.get("MaximumRetryCount", value.get("maximum_retry_count", 0))
    elif isinstance(value, str):
        name, _, count = value.partition(":")
        retries = count or 0
    else:
        raise errors.InvalidInput("invalid restart_policy", "restart_policy must be a string such as \"unless-stopped\"")
    if name not in _RESTART:
        raise errors.InvalidInput("invalid restart_policy", f"restart_policy must be one of {', '.join(_RESTART)}")
    try:
        retries = parse_int(retries)
    except (TypeError, ValueError):
        raise errors.InvalidInput("invalid restart_policy", "the retry count must be an integer") from None
    policy: dict[str, Any] = {"Name": name}
    if name == "on-failure":
        policy["MaximumRetryCount"] = retries
    return policy


def _seconds_ns(check: dict[str, Any], field: str) -> int | None:
    value = check.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise errors.InvalidInput("invalid health_check", f"health_check.{field} must be a number of seconds")
    return int(value * 1_000_000_000)


def parse_health_check(value: Any) -> dict[str, Any] | None:
    """docker-py's healthcheck dict (durations in nanoseconds)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise errors.InvalidInput("invalid health_check", "health_check must be an object with test, interval, timeout, retries")
    test = value.get("test")
    if isinstance(test, str) and test.strip():
        test_list = ["CMD-SHELL", test]
    elif isinstance(test, list) and test and all(isinstance(t, str) for t in test):
        test_list = test if test[0] in ("CMD", "CMD-SHELL", "NONE") else ["CMD"] + test
    else:
        raise errors.InvalidInput("invalid health_check", "health_check.test must be a shell command string or a list")
    check: dict[str, Any] = {"test": test_list}
    for field in ("interval", "timeout", "start_period"):
        ns = _seconds_ns(value, field)
        if ns is not None:
            check[field] = ns
    retries = value.get("retries")
    if retries is not None:
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise errors.InvalidInput("invalid health_check", "health_check.retries must be a non-negative integer")
        check["retries"] = retries
    return check


def parse_run(body: Any, policy: PathPolicy) -> dict[str, Any]:
    """The body of ``POST /containers/run`` -> ``containers.create`` arguments."""
    if not isinstance(body, dict):
        raise errors.InvalidInput("invalid body", "the body must be a JSON object")
    image = require_str(body, "image")
    kwargs: dict[str, Any] = {"image": image}
    name = body.get("name")
    if name is not None:
        kwargs["name"] = container_name(name)
    command = parse_command(body.get("command", body.get("cmd")))
    if command is not None:
        kwargs["command"] = command
    kwargs["ports"] = parse_ports(body.get("ports"))
    kwargs["environment"] = parse_environment(body.get("environment", body.get("env")))
    kwargs["volumes"] = parse_volumes(body.get("volumes"), policy)
    network = optional_str(body, "network")
    if network:
        kwargs["network"] = network
    restart = parse_restart_policy(body.get("restart_policy", body.get("restart")))
    if restart:
        kwargs["restart_policy"] = restart
    health = parse_health_check(body.get("health_check", body.get("healthcheck")))
    if health:
        kwargs["healthcheck"] = health
    for field, key in (("user", "user"), ("workdir", "working_dir"), ("working_dir", "working_dir"),
                       ("entrypoint", "entrypoint"), ("hostname", "hostname")):
        value = body.get(field)
        if value is not None:
            kwargs[key] = parse_command(value, field) if field == "entrypoint" else _string(value, field)
    labels = body.get("labels")
    if labels is not None:
        if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise errors.InvalidInput("invalid labels", "labels must be an object of strings")
        kwargs["labels"] = labels
    return kwargs


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise errors.InvalidInput(f"invalid {field}", f"{field} must be a string")
    return value


def split_image(reference: str) -> tuple[str, str | None]:
    """``repo[:tag][@digest]`` -> (repo, tag or digest or None)."""
    if "@" in reference:
        repo, _, digest = reference.partition("@")
        return repo, digest
    slash = reference.rfind("/")
    colon = reference.rfind(":")
    if colon > slash:
        return reference[:colon], reference[colon + 1:]
    return reference, None


def parse_bool_arg(value: bytes | str | None, field: str, default: bool = False) -> bool:
    if value is None:
        return default
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise errors.InvalidInput(f"invalid {field}", f"{field} must be true or false")


def parse_int_arg(value: bytes | str | None, field: str, default: int, minimum: int = 0,
                  maximum: int | None = None) -> int:
    if value is None:
        return default
    try:
        number = parse_int(value, signed=True)
    except ValueError:
        raise errors.InvalidInput(f"invalid {field}", f"{field} must be an integer") from None
    if number < minimum:
        raise errors.InvalidInput(f"invalid {field}", f"{field} must be at least {minimum}")
    if maximum is not None and number > maximum:
        raise errors.InvalidInput(f"invalid {field}", f"{field} must be at most {maximum}")
    return number
