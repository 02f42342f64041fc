"""
Metrics (seed ``GET /metrics``).

- ``snapshot``: the seed's JSON: per-container CPU, memory, network and
  block IO from Docker stats (one stats call per running container, all at
  once on the Docker pool), plus the host's disk, memory and load (psutil).
- ``AgentMetrics``: the agent's own metrics in Prometheus text format:
  requests and their latency per route and listener (observed by each
  ``web.PlexSite`` as requests finish), and, read at scrape time, the
  report outbox depth, the control-plane connection, the Docker pool's
  queue and the cron runs.
"""

from __future__ import annotations

import datetime as _dt
import os
from typing import Any, Iterable

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.internet import defer

from plexagent import errors

PROMETHEUS_CONTENT_TYPE = CONTENT_TYPE_LATEST

_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"))

#: Latency buckets (seconds): the Local Node API answers in well under a
#: millisecond; Docker-backed routes take up to seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class AgentMetrics:
    """The agent's own Prometheus registry."""

    def __init__(self, agent: Any = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "plexagent_http_requests",
            "HTTP requests answered, by listener, route pattern, method and status code.",
            ("listener", "route", "method", "code"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "plexagent_http_request_duration_seconds",
            "Time from a request's arrival to its last byte, by listener and route pattern.",
            ("listener", "route"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        # (listener, route, method, code) -> (counter child, histogram child):
        # labels() takes a lock and builds a key; this is the hot path.
        self._children: dict[tuple[str, str, str, int], tuple[Any, Any]] = {}
        if agent is not None:
            self.registry.register(_AgentCollector(agent))

    def observe(self, listener: str, request: Any, seconds: float) -> None:
        route = getattr(request, "plexagent_route", None) or "unrouted"
        method = request.method.decode("ascii", "replace") if isinstance(request.method, bytes) else str(request.method)
        if method not in _METHODS:
            method = "OTHER"
        key = (listener, route, method, request.code)
        children = self._children.get(key)
        if children is None:
            children = (
                self.requests.labels(listener, route, method, str(request.code)),
                self.latency.labels(listener, route),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def observer_for(self, listener: str) -> Any:
        """The ``PlexSite.observer`` of the listener named ``listener``."""

        def observe(request: Any, seconds: float) -> None:
            self.observe(listener, request, seconds)

        return observe

    def prometheus_text(self) -> bytes:
        return generate_latest(self.registry)


class _AgentCollector:
    """Reads the agent's background parts at scrape time; tolerates missing ones."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        agent = self.agent
        services = getattr(agent, "agent_services", {}) or {}

        outbox = services.get("outbox") or getattr(agent, "outbox", None)
        depth = getattr(outbox, "depth", None)
        if depth is not None:
            g = GaugeMetricFamily("plexagent_outbox_depth", "Report changes waiting to be sent to the control plane.")
            g.add_metric([], float(depth))
            yield g
        refused = getattr(outbox, "refused", None)
        if refused is not None:
            c = CounterMetricFamily(
                "plexagent_outbox_refused_changes",
                "Report changes the control plane refused: kept in outbox-refused.jsonl, no longer retried.",
            )
            c.add_metric([], float(refused))
            yield c

        config = getattr(agent, "config", None)
        configured = bool(config is not None and config.control_plane.url)
        sync = getattr(agent, "sync", None)
        stream = getattr(sync, "stream", None)
        if stream is not None:
            connected = bool(getattr(stream, "connected", False))
        else:
            connected = getattr(sync, "last_success", None) is not None
        g = GaugeMetricFamily("plexagent_control_plane_configured", "1 when a control plane is configured.")
        g.add_metric([], 1.0 if configured else 0.0)
        yield g
        g = GaugeMetricFamily(
            "plexagent_control_plane_connected",
            "1 while the agent is connected to the control plane (its event stream, else its last fetch succeeded).",
        )
        g.add_metric([], 1.0 if configured and connected else 0.0)
        yield g
        last = getattr(sync, "last_success", None)
        if last is not None:
            g = GaugeMetricFamily(
                "plexagent_control_plane_last_success_timestamp_seconds", "When the last state fetch succeeded."
            )
            g.add_metric([], float(last))
            yield g

        pool = services.get("dockerpool")
        if pool is not None:
            stats = _threadpool_statistics(pool)
            g = GaugeMetricFamily("plexagent_docker_pool_queue_length", "Docker calls waiting for a pool thread.")
            g.add_metric([], float(stats[0]))
            yield g
            g = GaugeMetricFamily("plexagent_docker_pool_busy_threads", "Pool threads running a Docker call.")
            g.add_metric([], float(stats[1]))
            yield g
            g = GaugeMetricFamily("plexagent_docker_pool_active_calls", "Docker calls running or queued.")
            g.add_metric([], float(getattr(pool, "active", 0)))
            yield g

        scheduler = services.get("cron")
        if scheduler is not None:
            c = CounterMetricFamily("plexagent_cron_runs", "Cron job runs, by result.", labels=("result",))
            c.add_metric(["succeeded"], float(scheduler.runs_succeeded))
            c.add_metric(["failed"], float(scheduler.runs_failed))
            c.add_metric(["skipped"], float(scheduler.runs_skipped))
            yield c
            c = CounterMetricFamily("plexagent_cron_runs_started", "Cron job runs started.")
            c.add_metric([], float(scheduler.runs_started))
            yield c
            g = GaugeMetricFamily("plexagent_cron_jobs", "Scheduled cron jobs.")
            g.add_metric([], float(len(scheduler.jobs)))
            yield g
            g = GaugeMetricFamily("plexagent_cron_runs_in_progress", "Cron runs going now.")
            g.add_metric([], float(len(scheduler.in_progress)))
            yield g


def _threadpool_statistics(pool: Any) -> tuple[int, int]:
    """(queued, busy) of the Docker pool's Twisted ThreadPool."""
    team = getattr(getattr(pool, "threadpool", None), "_team", None)
    if team is not None:
        try:
            stats = team.statistics()
            return stats.backloggedWorkCount, stats.busyWorkerCount
        except Exception:  # noqa: BLE001 - a private API of Twisted's: degrade, never fail a scrape
            pass
    return 0, 0


# -- the seed's JSON ------------------------------------------------------------


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
    for (cid, name), (ok, value) in zip(running, results):
        if ok:
            document["containers"][name] = container_metrics(name, value)
        # A container that stopped meanwhile has no stats: leave it out.
    document["system"] = system_metrics(disk_path)
    return document
