"""
Docker networks (seed "Networks"): request validation and the blocking
docker-py calls, run on the Docker pool (``DockerPool.call``).

Plain values in and out; errors are the project's types.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import attrs
from twisted.internet import defer

from plexagent import errors

# Docker's own rule for network names.
_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}")
_DRIVER = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_./:-]{0,127}")


@attrs.frozen
class NetworkSpec:
    name: str
    driver: str = "bridge"
    subnet: str | None = None
    gateway: str | None = None
    ip_range: str | None = None
    internal: bool = False
    attachable: bool = False
    labels: dict[str, str] = attrs.field(factory=dict)


def _network(value: Any, field: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(value, str):
        raise errors.InvalidInput(f"invalid {field}", f"{field} must be a network such as 172.20.0.0/16")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        raise errors.InvalidInput(f"invalid {field}", f"{field}: {value!r} is not a network ({e})") from None


def parse_create(body: Any) -> NetworkSpec:
    """The ``/networks/create`` body as a ``NetworkSpec``; 400 naming the bad field."""
    if not isinstance(body, dict):
        raise errors.InvalidInput("invalid body", "the body must be a JSON object")
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise errors.InvalidInput("name is required", "name must be a non-empty string")
    if not _NAME.fullmatch(name):
        raise errors.InvalidInput("invalid name", "name must start with a letter or digit and contain only [a-zA-Z0-9_.-]")
    driver = body.get("driver", "bridge")
    if driver is None:
        driver = "bridge"
    if not isinstance(driver, str) or not _DRIVER.fullmatch(driver):
        raise errors.InvalidInput("invalid driver", "driver must be a driver name such as bridge or overlay")
    for field in ("internal", "attachable"):
        if not isinstance(body.get(field, False), bool):
            raise errors.InvalidInput(f"invalid {field}", f"{field} must be true or false")
    labels = body.get("labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise errors.InvalidInput("invalid labels", "labels must be an object of strings")

    ipam = body.get("ipam_config", body.get("ipam"))
    if isinstance(ipam, list):
        if len(ipam) > 1:
            raise errors.InvalidInput("invalid ipam_config", "ipam_config takes one pool (subnet, gateway)")
        ipam = ipam[0] if ipam else None
    subnet = gateway = ip_range = None
    if ipam is not None:
        if not isinstance(ipam, dict):
            raise errors.InvalidInput("invalid ipam_config", "ipam_config must be an object with subnet and gateway")
        unknown = set(ipam) - {"subnet", "gateway", "ip_range", "iprange"}
        if unknown:
            raise errors.InvalidInput("invalid ipam_config", f"unknown field ipam_config.{sorted(unknown)[0]}")
        if ipam.get("subnet") is None:
            if ipam.get("gateway") is not None or ipam.get("ip_range", ipam.get("iprange")) is not None:
                raise errors.InvalidInput(
                    "invalid ipam_config.subnet", "ipam_config.subnet is required with a gateway or ip_range"
                )
        else:
            net = _network(ipam["subnet"], "ipam_config.subnet")
            subnet = str(net)
            if ipam.get("gateway") is not None:
                raw = ipam["gateway"]
                try:
                    address = ipaddress.ip_address(raw) if isinstance(raw, str) else None
                except ValueError:
                    address = None
                if address is None:
                    raise errors.InvalidInput(
                        "invalid ipam_config.gateway", f"ipam_config.gateway: {raw!r} is not an IP address"
                    )
                if address not in net:
                    raise errors.InvalidInput(
                        "invalid ipam_config.gateway", f"ipam_config.gateway {address} is not inside the subnet {net}"
                    )
                gateway = str(address)
            raw_range = ipam.get("ip_range", ipam.get("iprange"))
            if raw_range is not None:
                rng = _network(raw_range, "ipam_config.ip_range")
                if rng.version != net.version or not rng.subnet_of(net):  # type: ignore[arg-type]
                    raise errors.InvalidInput(
                        "invalid ipam_config.ip_range", f"ipam_config.ip_range {rng} is not inside the subnet {net}"
                    )
                ip_range = str(rng)
    return NetworkSpec(
        name=name,
        driver=driver,
        subnet=subnet,
        gateway=gateway,
        ip_range=ip_range,
        internal=body.get("internal", False),
        attachable=body.get("attachable", False),
        labels=dict(labels),
    )


def network_details(info: dict[str, Any]) -> dict[str, Any]:
    """What ``GET /networks/<n>`` shows: config and connected containers."""
    ipam = info.get("IPAM") or {}
    containers = []
    for cid, c in sorted((info.get("Containers") or {}).items(), key=lambda kv: (kv[1] or {}).get("Name", "")):
        c = c or {}
        containers.append(
            {
                "id": cid,
                "name": c.get("Name", ""),
                "ipv4_address": c.get("IPv4Address", ""),
                "ipv6_address": c.get("IPv6Address", ""),
                "mac_address": c.get("MacAddress", ""),
            }
        )
    return {
        "id": info.get("Id", ""),
        "name": info.get("Name", ""),
        "driver": info.get("Driver", ""),
        "scope": info.get("Scope", ""),
        "internal": bool(info.get("Internal")),
        "attachable": bool(info.get("Attachable")),
        "created": info.get("Created", ""),
        "ipam": {
            "driver": ipam.get("Driver", ""),
            "config": [
                {"subnet": p.get("Subnet", ""), "gateway": p.get("Gateway", ""), "ip_range": p.get("IPRange", "")}
                for p in ipam.get("Config") or []
            ],
        },
        "options": info.get("Options") or {},
        "labels": info.get("Labels") or {},
        "containers": containers,
    }


def _create(client: Any, spec: NetworkSpec) -> dict[str, Any]:
    import docker.types

    # Exact-name check: Docker's name filter matches substrings.
    if any(n.get("Name") == spec.name for n in client.api.networks(names=[spec.name])):
        raise errors.Conflict("network already exists", f"a network named {spec.name} already exists")
    ipam = None
    if spec.subnet is not None:
        pool = docker.types.IPAMPool(subnet=spec.subnet, gateway=spec.gateway, iprange=spec.ip_range)
        ipam = docker.types.IPAMConfig(pool_configs=[pool])
    try:
        created = client.api.create_network(
            spec.name,
            driver=spec.driver,
            ipam=ipam,
            internal=spec.internal,
            attachable=spec.attachable,
            labels=spec.labels or None,
        )
    except docker.errors.APIError as e:
        if e.status_code == 409:
            raise errors.Conflict("network already exists", str(e.explanation or e)) from None
        if e.status_code in (400, 403, 404) or (e.status_code or 500) >= 500:
            # Overlapping pools, unknown drivers, ... are the request's fault.
            raise errors.InvalidInput("docker refused the network", str(e.explanation or e)) from None
        raise
    info = client.api.inspect_network(created["Id"])
    return {"success": True, **network_details(info)}


def _inspect(client: Any, name: str) -> dict[str, Any]:
    return network_details(client.api.inspect_network(name))


class Networks:
    """Deferred-returning network operations on the Docker pool."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def create(self, spec: NetworkSpec) -> defer.Deferred[dict[str, Any]]:
        return self.pool.call(_create, spec, what="network")

    def inspect(self, name: str) -> defer.Deferred[dict[str, Any]]:
        return self.pool.call(_inspect, name, what="network")
