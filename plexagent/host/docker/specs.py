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

Every value is checked against what Docker accepts before Docker is asked:
numbers are finite and within Docker's bounds (a ``1e308`` second interval
overflowed the nanosecond conversion), names and modes are matched whole
(``fullmatch``: a ``$`` lets a trailing newline through), and no string
carries a NUL (Linux argv, environment and paths cannot).
"""

from __future__ import annotations

import ipaddress
import math
import posixpath
import re
from typing import Any

from plexagent import errors
from plexagent.host.docker.binds import BIND_LABEL, bind_label
from plexagent.host.files.paths import PathPolicy
from plexagent.strictparse import parse_int

_NAME = re.compile(r"/?[a-zA-Z0-9][a-zA-Z0-9_.-]*")
_VOLUME_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
#: A bind target: absolute, no ':' (Docker's separator), no control characters.
_TARGET = re.compile(r"/[^:\x00-\x1f\x7f]*")
_HOSTNAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}")
_RESTART = ("no", "always", "unless-stopped", "on-failure")

#: Volume mode options Docker accepts for a bind or a named volume, by
#: group: at most one of each group.
_MODE_GROUPS = (
    ("rw", "ro"),
    ("z", "Z"),
    ("shared", "rshared", "slave", "rslave", "private", "rprivate"),
    ("consistent", "cached", "delegated"),
    ("nocopy",),  # named volumes only
)

#: Docker's bounds for a health check's durations (it refuses less than
#: 1 ms) and counts (a Go int; the 32-bit bound keeps every build happy).
MIN_DURATION = 0.001
MAX_DURATION = 365 * 24 * 3600
MAX_COUNT = 2**31 - 1

#: Labels with this prefix are the agent's own (see ``binds``).
RESERVED_LABEL_PREFIX = "plexagent."


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


def _no_nul(value: str, field: str, message: str | None = None) -> str:
    if "\x00" in value:
        raise errors.InvalidInput(message or f"invalid {field}", f"{field} must not contain a NUL character")
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


def _host_ip(value: str, field: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise errors.InvalidInput("invalid ports", f"{field}: {value!r} is not an IP address") from None


def _container_port(value: Any, field: str) -> str:
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise errors.InvalidInput(
            "invalid ports", f"{field}: {value!r} is not a container port such as 80 or \"53/udp\""
        )
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
            host_port = None if host.strip() in ("", "0") else _port_number(host, field)
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
            ip = _host_ip(spec[1:close], field)
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
            if not spec.startswith("["):
                ip = _host_ip(ip, field)
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
            if not isinstance(key, str) or not key or "=" in key or "\x00" in key:
                raise errors.InvalidInput("invalid environment", f"environment key {key!r} is not a variable name")
            if isinstance(item, (dict, list)) or (isinstance(item, float) and not math.isfinite(item)):
                raise errors.InvalidInput(
                    "invalid environment", f"environment[{key!r}] must be a string, number or boolean"
                )
            text = "" if item is None else str(item) if not isinstance(item, bool) else str(item).lower()
            result[key] = _no_nul(text, f"environment[{key!r}]", "invalid environment")
        return result
    if not isinstance(value, list):
        raise errors.InvalidInput("invalid environment", "environment must be a list of \"K=V\" or an object")
    for i, entry in enumerate(value):
        if not isinstance(entry, str) or "=" not in entry or entry.startswith("="):
            raise errors.InvalidInput("invalid environment", f"environment[{i}] must be \"KEY=VALUE\"")
        _no_nul(entry, f"environment[{i}]", "invalid environment")
        key, _, item = entry.partition("=")
        result[key] = item
    return result


def parse_command(value: Any, field: str = "command") -> list[str] | str | None:
    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip():
            raise errors.InvalidInput(f"invalid {field}", f"{field} must not be empty")
        return _no_nul(value, field)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        for i, item in enumerate(value):
            _no_nul(item, f"{field}[{i}]", f"invalid {field}")
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
        if not isinstance(source, str) or not source or ":" in source:
            raise errors.InvalidInput("invalid volumes", f"{field}: the source must be a host path or a volume name")
        _no_nul(source, field, "invalid volumes")
        if not isinstance(bind, str) or not _TARGET.fullmatch(bind) or posixpath.normpath(bind) == "/":
            raise errors.InvalidInput(
                "invalid volumes",
                f"{field}: the target must be an absolute path in the container other than /, "
                "without ':' or control characters",
            )
        is_path = source.startswith(("/", ".", "~"))
        if is_path:
            source = policy.resolve(source, field)
        elif not _VOLUME_NAME.fullmatch(source):
            raise errors.InvalidInput(
                "invalid volumes", f"{field}: {source!r} is neither an absolute host path nor a volume name"
            )
        result[source] = {"bind": bind, "mode": volume_mode(mode, field, is_path)}
    return result


def volume_mode(mode: Any, field: str, host_path: bool) -> str:
    """A Docker volume mode such as ``rw``, ``ro,z`` or ``rw,rslave``; 400 otherwise."""
    options = mode.split(",") if isinstance(mode, str) else [""]
    allowed = [o for group in _MODE_GROUPS for o in group if not host_path or o != "nocopy"]
    for option in options:
        if option not in allowed:
            raise errors.InvalidInput(
                "invalid volumes",
                f"{field}: mode {mode!r} is not a comma-separated list of {', '.join(allowed)}",
            )
    for group in _MODE_GROUPS:
        if sum(options.count(o) for o in group) > 1:
            raise errors.InvalidInput(
                "invalid volumes", f"{field}: mode {mode!r} gives more than one of {', '.join(group)}"
            )
    return ",".join(options)


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
    if not isinstance(name, str) or name not in _RESTART:
        raise errors.InvalidInput("invalid restart_policy", f"restart_policy must be one of {', '.join(_RESTART)}")
    if isinstance(retries, str):
        try:
            retries = parse_int(retries)
        except ValueError:
            raise errors.InvalidInput("invalid restart_policy", "the retry count must be an integer") from None
    retries = _count(retries, "restart_policy", "the retry count")
    policy: dict[str, Any] = {"Name": name}
    if name == "on-failure":
        policy["MaximumRetryCount"] = retries
    return policy


def _count(value: Any, error_field: str, field: str) -> int:
    """A non-negative integer within Docker's bounds."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise errors.InvalidInput(f"invalid {error_field}", f"{field} must be an integer from 0 to {MAX_COUNT}")
    return value


def _seconds_ns(check: dict[str, Any], field: str, minimum: float = MIN_DURATION) -> int | None:
    """A duration in seconds (from ``minimum`` to ``MAX_DURATION``) as nanoseconds."""
    value = check.get(field)
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not (value == 0 and minimum == 0 or MIN_DURATION <= value <= MAX_DURATION)):
        # Comparisons are false for NaN, so it is refused too.
        low = "0" if minimum == 0 else f"{MIN_DURATION:g}"
        raise errors.InvalidInput(
            "invalid health_check", f"health_check.{field} must be a number of seconds from {low} to {MAX_DURATION}"
        )
    return round(value * 1_000_000_000)


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
    for i, item in enumerate(test_list):
        _no_nul(item, f"health_check.test[{i}]", "invalid health_check")
    check: dict[str, Any] = {"test": test_list}
    for field, minimum in (("interval", MIN_DURATION), ("timeout", MIN_DURATION), ("start_period", 0.0)):
        ns = _seconds_ns(value, field, minimum)
        if ns is not None:
            check[field] = ns
    retries = value.get("retries")
    if retries is not None:
        check["retries"] = _count(retries, "health_check", "health_check.retries")
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
    if "working_dir" in kwargs and not kwargs["working_dir"].startswith("/"):
        raise errors.InvalidInput("invalid workdir", "workdir must be an absolute path in the container")
    if "hostname" in kwargs and not _HOSTNAME.fullmatch(kwargs["hostname"]):
        raise errors.InvalidInput(
            "invalid hostname",
            "hostname must be at most 63 letters, digits, '_', '.' and '-', starting with a letter or digit",
        )
    labels = body.get("labels")
    if labels is None:
        labels = {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise errors.InvalidInput("invalid labels", "labels must be an object of strings")
    for key, value in labels.items():
        _no_nul(key + value, f"labels[{key!r}]", "invalid labels")
        if key.startswith(RESERVED_LABEL_PREFIX):
            raise errors.InvalidInput(
                "invalid labels", f"{key}: labels starting with {RESERVED_LABEL_PREFIX} are the agent's own"
            )
    # Records the host paths checked now: each start checks them again.
    kwargs["labels"] = {**labels, BIND_LABEL: bind_label(kwargs["volumes"])}
    return kwargs


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise errors.InvalidInput(f"invalid {field}", f"{field} must be a string")
    return _no_nul(value, field)


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
    lowered = text.lower()
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
