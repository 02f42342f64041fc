"""
Container health as the seed reports it: Docker's state and health check,
what an exit code means, and whether each published TCP port accepts a
connection (checked on the reactor, never with a blocking socket).
"""

from __future__ import annotations

import datetime
from typing import Any

from twisted.internet import defer, endpoints, protocol

from plexagent.host.docker.summaries import container_status

_EXIT_MEANINGS = {
    0: "exited normally",
    1: "application error",
    2: "misuse of a shell builtin",
    125: "the container failed to run (docker error)",
    126: "the command cannot be invoked",
    127: "the command was not found",
    130: "interrupted (SIGINT)",
    134: "aborted (SIGABRT)",
    137: "killed (SIGKILL): out of memory or not stopping within the stop timeout",
    139: "segmentation fault (SIGSEGV)",
    143: "terminated (SIGTERM)",
}


def exit_meaning(code: int | None, oom_killed: bool = False) -> str | None:
    if code is None:
        return None
    if oom_killed:
        return "killed: out of memory"
    if code in _EXIT_MEANINGS:
        return _EXIT_MEANINGS[code]
    if code > 128:
        return f"killed by signal {code - 128}"
    return "application error"


def published_tcp_ports(info: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(container port, host address to probe, host port) for each published TCP port."""
    ports = ((info.get("NetworkSettings") or {}).get("Ports")) or {}
    result = []
    for container_port, bindings in sorted(ports.items()):
        if not container_port.endswith("/tcp") or not bindings:
            continue
        seen = set()
        for binding in bindings:
            host_ip = binding.get("HostIp") or "0.0.0.0"
            try:
                host_port = int(binding.get("HostPort") or 0)
            except ValueError:
                continue
            if not host_port:
                continue
            address = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host_ip, host_ip)
            if (address, host_port) in seen:
                continue
            seen.add((address, host_port))
            result.append((container_port, address, host_port))
    return result


def container_address(info: dict[str, Any]) -> str | None:
    """The container's own address on its first network, when it has one."""
    settings = info.get("NetworkSettings") or {}
    if settings.get("IPAddress"):
        return settings["IPAddress"]
    for network in (settings.get("Networks") or {}).values():
        if network.get("IPAddress"):
            return network["IPAddress"]
    return None


def probe_tcp(reactor: Any, host: str, port: int, timeout: float = 2.0) -> defer.Deferred[bool]:
    """Whether ``host:port`` accepts a TCP connection within ``timeout``."""
    if ":" in host:
        endpoint: Any = endpoints.TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    else:
        endpoint = endpoints.TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    d = endpoint.connect(protocol.Factory.forProtocol(protocol.Protocol))

    def connected(proto: Any) -> bool:
        proto.transport.abortConnection()
        return True

    d.addCallbacks(connected, lambda _: False)
    return d


async def assess(reactor: Any, info: dict[str, Any], now: datetime.datetime | None = None) -> dict[str, Any]:
    """The health document of one container, from its inspect data."""
    state = info.get("State") or {}
    summary = container_status(info)
    running = state.get("Status") == "running"
    ports = []
    if running:
        published = published_tcp_ports(info)
        address = container_address(info)
        # Docker's userland proxy accepts on the published port even when
        # nothing listens inside, so the service is also checked at the
        # container's own address.
        checks = [probe_tcp(reactor, host, port) for _, host, port in published]
        if address is not None:
            checks += [probe_tcp(reactor, address, int(cport.split("/")[0])) for cport, _, _ in published]
        results = await defer.gatherResults(checks) if checks else []
        inner = results[len(published):] if address is not None else [None] * len(published)
        for (container_port, host, port), reachable, listening in zip(published, results, inner, strict=False):
            ports.append({
                "container_port": container_port,
                "host": host,
                "port": port,
                "reachable": bool(reachable) and listening is not False,
                "published_reachable": reachable,
                "service_listening": listening,
            })
    exit_code = None if running else state.get("ExitCode")
    healthy = (
        running
        and summary["health_status"] in ("healthy", "none")
        and all(p["reachable"] for p in ports)
    )
    moment = now or datetime.datetime.now(datetime.timezone.utc)
    return {
        **summary,
        "healthy": healthy,
        "exit_code": exit_code,
        "exit_meaning": exit_meaning(exit_code, bool(state.get("OOMKilled"))),
        "restart_count": info.get("RestartCount", 0),
        "ports": ports,
        "timestamp": moment.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
