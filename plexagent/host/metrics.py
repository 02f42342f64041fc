"""
The seed's ``GET /metrics`` document: per-container CPU, memory, network
and block IO from Docker stats (one stats call per running container, all
at once on the Docker pool), plus the host's disk, memory and load
(psutil).
"""

from __future__ import annotations

import datetime as _dt
import os
from typing import Any

import psutil
from twisted.internet import defer

from plexagent import errors


def _cpu_percent(stats: dict[str, Any]) -> float:
    cpu = stats.get("cpu_stats") or {}
    pre = stats.get("precpu_stats") or {}
    cpu_delta = (cpu.get("cpu_usage") or {}).get("total_usage", 0) - (pre.get("cpu_usage") or {}).get("total_usage", 0)
    system_delta = cpu.get("system_cpu_usage", 0) - pre.get("system_cpu_usage", 0)
    online = cpu.get("online_cpus") or len((cpu.get("cpu_usage") or {}).get("percpu_usage") or []) or 1
    if cpu_delta <= 0 or system_delta <= 0:
        return 0.0
    return round(cpu_delta / system_delta * online * 100.0, 2)


def container_metrics(name: str, stats: dict[str, Any]) -> dict[str, Any]:
    """One container's entry from a Docker stats document."""
    memory = stats.get("memory_stats") or {}
    details = memory.get("stats") or {}
    # What `docker stats` shows: usage without the page cache.
    cache = details.get("inactive_file", details.get("total_inactive_file", details.get("cache", 0)))
    usage = max(0, int(memory.get("usage", 0)) - int(cache or 0))
    limit = int(memory.get("limit", 0))
    rx = tx = 0
    for counters in (stats.get("networks") or {}).values():
        rx += int(counters.get("rx_bytes", 0))
        tx += int(counters.get("tx_bytes", 0))
    read = write = 0
    for entry in (stats.get("blkio_stats") or {}).get("io_service_bytes_recursive") or []:
        op = str(entry.get("op", "")).lower()
        if op == "read":
            read += int(entry.get("value", 0))
        elif op == "write":
            write += int(entry.get("value", 0))
    return {
        "id": stats.get("id", ""),
        "name": name,
        "cpu_percent": _cpu_percent(stats),
        "memory": {
            "usage": usage,
            "limit": limit,
            "percent": round(usage / limit * 100.0, 2) if limit else 0.0,
        },
        "network": {"rx_bytes": rx, "tx_bytes": tx},
        "block_io": {"read_bytes": read, "write_bytes": write},
        "pids": int((stats.get("pids_stats") or {}).get("current", 0) or 0),
    }


def system_metrics(disk_path: str = "/") -> dict[str, Any]:
    """The host's memory, disk and load, from psutil (reads /proc and statvfs: quick)."""
    memory = psutil.virtual_memory()
    disk = psutil.disk_usage(disk_path)
    load = os.getloadavg()
    return {
        "cpu_count": psutil.cpu_count() or 0,
        "load": {"1m": load[0], "5m": load[1], "15m": load[2]},
        "memory": {
            "total": memory.total,
            "available": memory.available,
            "used": memory.used,
            "percent": memory.percent,
        },
        "disk": {"path": disk_path, "total": disk.total, "used": disk.used, "free": disk.free, "percent": disk.percent},
    }


def _running_containers(client: Any) -> list[tuple[str, str]]:
    return [(c["Id"], (c.get("Names") or ["/" + c["Id"][:12]])[0].lstrip("/")) for c in client.api.containers()]


def _stats(client: Any, container_id: str) -> dict[str, Any]:
    return client.api.stats(container_id, stream=False)


async def snapshot(pool: Any, clock: Any, disk_path: str = "/") -> dict[str, Any]:
    """The seed's metrics document: containers (concurrently) and the system."""
    document: dict[str, Any] = {
        "timestamp": _dt.datetime.fromtimestamp(clock.seconds(), _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "containers": {},
        "docker": True,
    }
    try:
        running = await pool.call(_running_containers)
    except errors.Unavailable as e:
        document["docker"] = False
        document["docker_error"] = e.details or e.message
        running = []
    results = await defer.DeferredList(
        [pool.call(_stats, cid) for cid, _ in running], consumeErrors=True
    )
    for (_, name), (ok, value) in zip(running, results, strict=True):
        if ok:
            document["containers"][name] = container_metrics(name, value)
        # A container that stopped meanwhile has no stats: leave it out.
    document["system"] = system_metrics(disk_path)
    return document
