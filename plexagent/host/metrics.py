"""
The seed's ``GET /metrics`` document: per-container CPU, memory, network
and block IO from the stats the sampler (``host.docker.stats``) keeps in
the background, plus the host's disk, memory and load (psutil).
"""

from __future__ import annotations

import os
from typing import Any

import psutil

from plexagent.host.docker.stats import iso_time


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


def snapshot(sampler: Any, clock: Any, disk_path: str = "/") -> dict[str, Any]:
    """
    The seed's metrics document, at once: the containers from the
    sampler's latest samples (``sampled_at``; running containers not yet
    sampled twice are named in ``containers_pending``), and the system
    figures read now.
    """
    view = sampler.view()
    document: dict[str, Any] = {
        "timestamp": iso_time(clock.seconds()),
        "containers": view["containers"],
        "containers_pending": view["pending"],
        "sampled_at": view["sampled_at"],
        "stats_interval": sampler.interval,
        "docker": view["docker"],
    }
    if "docker_error" in view:
        document["docker_error"] = view["docker_error"]
    document["system"] = system_metrics(disk_path)
    return document
