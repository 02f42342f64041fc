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
        link = getattr(agent, "link", None)
        if link is not None:
            yield from _link_metrics(link, sync, stream)

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


#: Event types counted by name; others are counted as "other" (labels stay few).
KNOWN_EVENT_TYPES = frozenset({"node_state_updated", "node_secrets_updated", "signing_key_rotated", "rotate_keys"})


def _counter(name: str, text: str, labels: tuple[str, ...], values: Any) -> Any:
    c = CounterMetricFamily(name, text, labels=labels)
    for label_values, value in values:
        c.add_metric(list(label_values), float(value))
    return c


def _link_metrics(link: Any, sync: Any, stream: Any) -> Iterable[Any]:
    """The control-plane link: identity, enrollment, events by outcome, heartbeats, signing keys."""
    identity = link.identity
    g = GaugeMetricFamily("plexagent_control_plane_info", "1, labelled with the protocol and node id in use.",
                          labels=("protocol", "node_id"))
    g.add_metric([link.protocol.name, identity.node_id if identity is not None else ""], 1.0)
    yield g
    g = GaugeMetricFamily("plexagent_control_plane_enrolled", "1 once the node has an identity (enrolled or configured).")
    g.add_metric([], 1.0 if identity is not None else 0.0)
    yield g
    attempts = link.enrollment.attempts if link.enrollment is not None else {}
    yield _counter("plexagent_enrollment_attempts", "Enrollment attempts, by outcome.", ("outcome",),
                   [((outcome,), attempts.get(outcome, 0)) for outcome in ("ok", "transient", "rate_limited", "refused")])
    yield _counter("plexagent_state_fetch_failures", "State fetches that failed.", (),
                   [((), sync.failures if sync is not None else 0)])
    if stream is not None:
        applied: dict[str, int] = {}
        for event_type, n in stream.applied.items():
            label = event_type if event_type in KNOWN_EVENT_TYPES else "other"
            applied[label] = applied.get(label, 0) + n
        yield _counter("plexagent_events_applied", "Events verified and applied, by type.", ("event_type",),
                       [((t,), n) for t, n in sorted(applied.items())])
        yield _counter("plexagent_events_dropped", "Events dropped, never applied, by reason.", ("reason",),
                       [((r.value,), n) for r, n in sorted(stream.dropped.items(), key=lambda i: i[0].value)])
        yield _counter("plexagent_event_stream_connections", "Event stream connections made.", (),
                       [((), stream.connections)])
        if stream.last_event_at is not None:
            g = GaugeMetricFamily("plexagent_events_last_applied_timestamp_seconds", "When the last event was applied.")
            g.add_metric([], float(stream.last_event_at))
            yield g
    heartbeat = link.heartbeat
    yield _counter("plexagent_heartbeat_failures", "Heartbeats that failed.", (),
                   [((), heartbeat.failures if heartbeat is not None else 0)])
    if heartbeat is not None and heartbeat.last_success is not None:
        g = GaugeMetricFamily("plexagent_heartbeat_last_success_timestamp_seconds", "When the last heartbeat succeeded.")
        g.add_metric([], float(heartbeat.last_success))
        yield g
    yield _counter("plexagent_control_plane_auth_failures", "Calls whose credentials the control plane refused.",
                   ("call",), [((call,), n) for call, n in sorted(link.auth_failures.items())])
    keys = link.ring.keys
    g = GaugeMetricFamily("plexagent_signing_key_info", "1 per signing key in force, by role.", labels=("role", "key_id"))
    for role, key in (("current", keys.current), ("previous", keys.previous)):
        if key is not None:
            g.add_metric([role, key.label], 1.0)
    yield g
    yield _counter("plexagent_signing_key_rotations", "Signing keys put in force, by where they came from.",
                   ("source",), [((source,), n) for source, n in sorted(link.ring.rotations.items())])
    yield _counter("plexagent_signing_key_rotations_refused", "Key sets refused: no usable current key.", (),
                   [((), link.ring.refused)])


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
