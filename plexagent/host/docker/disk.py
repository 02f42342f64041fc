"""
Docker's disk usage (``GET /system/df``): what Docker's ``/system/df``
counts for images, containers, volumes and the build cache, and the file
system of Docker's data root as this agent sees it.

The data root (``DockerRootDir`` of ``docker info``) is a path in Docker's
mount namespace. The agent reports its file system only when it can see
that directory as Docker's: it exists here, is laid out as a data root
(``containers/`` and ``image/``) and, when Docker has containers, holds
their directories. Otherwise (Docker in another mount namespace, in a VM,
on another host) the answer says so instead of measuring some other file
system that happens to have that path.
"""

from __future__ import annotations

import os
from typing import Any

#: How many container directories are looked for to tell Docker's data root.
_PROBES = 5


def _sum(values: Any) -> int:
    return sum(v for v in values if isinstance(v, int) and v > 0)


def categories(df: dict[str, Any]) -> dict[str, dict[str, int]]:
    """count, active, size and reclaimable bytes per kind, as ``docker system df`` computes them."""
    images = df.get("Images") or []
    layers = int(df.get("LayersSize") or 0)
    in_use = _sum(
        int(i.get("Size") or 0) - int(i.get("SharedSize") or 0)
        for i in images
        if (i.get("Containers") or 0) > 0 and i.get("Size", -1) != -1 and i.get("SharedSize", -1) != -1
    )
    containers = df.get("Containers") or []
    volumes = df.get("Volumes") or []
    cache = df.get("BuildCache") or []

    def volume_size(v: dict[str, Any]) -> int:
        return int((v.get("UsageData") or {}).get("Size") or 0)

    def volume_refs(v: dict[str, Any]) -> int:
        return int((v.get("UsageData") or {}).get("RefCount") or 0)

    return {
        "images": {
            "count": len(images),
            "active": sum(1 for i in images if (i.get("Containers") or 0) > 0),
            "size": layers,
            "reclaimable": max(0, layers - in_use),
        },
        "containers": {
            "count": len(containers),
            "active": sum(1 for c in containers if c.get("State") == "running"),
            "size": _sum(c.get("SizeRw") for c in containers),
            "reclaimable": _sum(c.get("SizeRw") for c in containers if c.get("State") != "running"),
        },
        "volumes": {
            "count": len(volumes),
            "active": sum(1 for v in volumes if volume_refs(v) > 0),
            "size": _sum(volume_size(v) for v in volumes),
            "reclaimable": _sum(volume_size(v) for v in volumes if volume_refs(v) == 0),
        },
        "build_cache": {
            "count": len(cache),
            "active": sum(1 for b in cache if b.get("InUse")),
            "size": _sum(b.get("Size") for b in cache),
            "reclaimable": _sum(b.get("Size") for b in cache if not b.get("InUse") and not b.get("Shared")),
        },
    }


def _not_visible(path: str, why: str) -> dict[str, Any]:
    return {
        "path": path,
        "available": False,
        "reason": f"{why}: Docker's data root is not visible to the agent (Docker runs in another mount "
                  "namespace, a VM or on another host); measure it where Docker runs",
    }


def filesystem_usage(path: str, container_ids: list[str]) -> dict[str, Any]:
    """The file system holding Docker's data root ``path``, or why it cannot be measured from here."""
    if not isinstance(path, str) or not path.startswith("/"):
        return _not_visible(str(path), "Docker did not report its data root")
    try:
        stat = os.statvfs(path)
    except OSError as e:
        return _not_visible(path, f"cannot stat {path}: {e.strerror}")
    if not (os.path.isdir(os.path.join(path, "containers")) and os.path.isdir(os.path.join(path, "image"))):
        return _not_visible(path, f"{path} here has no containers/ and image/ directories")
    probes = container_ids[:_PROBES]
    if probes and not any(os.path.isdir(os.path.join(path, "containers", c)) for c in probes):
        return _not_visible(path, f"{path} here does not hold Docker's containers")
    total = stat.f_blocks * stat.f_frsize
    free = stat.f_bavail * stat.f_frsize
    used = (stat.f_blocks - stat.f_bfree) * stat.f_frsize
    # As df(1): of the space ordinary users can have (reserved blocks aside).
    usable = used + free
    percent = round(100.0 * used / usable, 1) if usable else 0.0
    return {"path": path, "available": True, "total": total, "used": used, "free": free, "percent": percent}


def data_root(client: Any) -> dict[str, Any]:
    """In a worker thread: the file system of Docker's data root (``filesystem_usage``)."""
    root = client.info().get("DockerRootDir")
    ids = [c["Id"] for c in client.api.containers(all=True, limit=_PROBES)]
    return filesystem_usage(root, ids)


def disk_usage(client: Any) -> dict[str, Any]:
    """In a worker thread: the document of ``GET /system/df``."""
    df = client.df()
    root = client.info().get("DockerRootDir")
    ids = [c.get("Id", "") for c in (df.get("Containers") or [])]
    return {**categories(df), "layers_size": int(df.get("LayersSize") or 0), "data_root": filesystem_usage(root, ids)}
