"""
The agent's own metrics (``AgentMetrics``), in Prometheus text format:
requests and their latency per route and listener (observed by each
``PlexSite`` as requests finish), and, read at scrape time, the report
outbox depth, the control-plane connection, the Docker pool's queue, the
container stats sampler's rounds, the cron runs and the automatic image
cleanups. (The seed's JSON document is ``host.metrics``.)
"""

from __future__ import annotations

from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

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

        yield from _cleanup_metrics(services.get("auto_cleanup"))
        sampler = services.get("container_stats")
        if sampler is not None:
            c = CounterMetricFamily("plexagent_container_stats_rounds", "Rounds of container stats samples ended.")
            c.add_metric([], float(sampler.rounds))
            yield c
            if sampler.last_round_seconds is not None:
                g = GaugeMetricFamily("plexagent_container_stats_round_duration_seconds",
                                      "How long the latest round of container stats samples took.")
                g.add_metric([], float(sampler.last_round_seconds))
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


def _cleanup_metrics(cleaner: Any) -> Iterable[Any]:
    """The automatic image cleanup's counters, when it is enabled."""
    if cleaner is None:
        return
    for name, help_text, value in (
        ("plexagent_image_cleanup_runs", "Automatic image cleanup runs started (data root over the threshold).",
         cleaner.runs),
        ("plexagent_image_cleanup_images_removed", "Images the automatic cleanup deleted.", cleaner.images_removed),
        ("plexagent_image_cleanup_bytes_reclaimed", "Bytes the automatic cleanup reclaimed.", cleaner.bytes_reclaimed),
        ("plexagent_image_cleanup_failures", "Automatic image cleanup runs that failed.", cleaner.failures),
    ):
        c = CounterMetricFamily(name, help_text)
        c.add_metric([], float(value))
        yield c


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
