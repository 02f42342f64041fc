"""
Container stats sampled in the background, so that ``GET /metrics``
answers from memory instead of asking Docker for each running container
while the client waits.

Every ``interval`` seconds a round lists the running containers and takes
one one-shot stats sample of each (``one_shot=True``: Docker answers with
its next collection, without the second collection a plain stats call
waits for). A container's CPU% comes from two consecutive samples of the
sampler's own: the growth of its CPU time over the growth of the host's.
A container seen for the first time (in a round, or started meanwhile, as
Docker's event stream reports) is sampled twice in a row, so that it has a
CPU% about a second later instead of a round later; a container that dies
is forgotten at once.

The calls run on the Docker pool's stats threads (``sampling_call``: half
of ``docker.threads``, at least one), at most ``concurrency`` at a time,
so that requests keep every thread of the pool proper. Docker answers a
one-shot call at its next collection tick (every second), so a round of
N containers takes about N / ``concurrency`` seconds.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from plexagent import errors
from plexagent.host.docker.pool import DockerPool

log = Logger()

#: Docker events after which a container no longer runs.
_GONE = frozenset(("die", "destroy"))


def _running_containers(client: Any) -> list[tuple[str, str]]:
    return [(c["Id"], (c.get("Names") or ["/" + c["Id"][:12]])[0].lstrip("/")) for c in client.api.containers()]


def _one_shot(client: Any, container_id: str, times: int = 1) -> list[dict[str, Any]]:
    """``times`` consecutive stats samples of one container (Docker spaces them by its collection tick)."""
    from docker.utils import version_lt

    api = client.api
    one_shot = {} if version_lt(api._version, "1.41") else {"one_shot": True}  # else a plain call: two collections
    try:
        return [api.stats(container_id, stream=False, **one_shot) for _ in range(times)]
    except ValueError:
        # Docker answers an empty body for a container that stopped meanwhile.
        raise errors.NotFound("the container stopped while it was sampled") from None


def _cpu_times(stats: dict[str, Any]) -> tuple[int, int, int]:
    cpu = stats.get("cpu_stats") or {}
    usage = cpu.get("cpu_usage") or {}
    online = cpu.get("online_cpus") or len(usage.get("percpu_usage") or []) or 1
    return int(usage.get("total_usage") or 0), int(cpu.get("system_cpu_usage") or 0), int(online)


def cpu_percent(previous: dict[str, Any], current: dict[str, Any]) -> float | None:
    """
    CPU% of a container between two of its stats samples (100 = one core
    busy), as ``docker stats`` shows it; None when the samples cannot be
    compared (the container restarted, the clock of the host's CPU time did
    not move).
    """
    used_before, system_before, _ = _cpu_times(previous)
    used, system, online = _cpu_times(current)
    if used < used_before or system <= system_before:
        return None
    return round((used - used_before) / (system - system_before) * online * 100.0, 2)


def container_entry(name: str, previous: dict[str, Any], current: dict[str, Any]) -> dict[str, Any] | None:
    """One container's entry of the metrics document from two samples; None without a CPU%."""
    percent = cpu_percent(previous, current)
    if percent is None:
        return None
    memory = current.get("memory_stats") or {}
    details = memory.get("stats") or {}
    # What `docker stats` shows: usage without the page cache.
    cache = details.get("inactive_file", details.get("total_inactive_file", details.get("cache", 0)))
    usage = max(0, int(memory.get("usage", 0)) - int(cache or 0))
    limit = int(memory.get("limit", 0))
    rx = tx = 0
    for counters in (current.get("networks") or {}).values():
        rx += int(counters.get("rx_bytes", 0))
        tx += int(counters.get("tx_bytes", 0))
    read = write = 0
    for entry in (current.get("blkio_stats") or {}).get("io_service_bytes_recursive") or []:
        op = str(entry.get("op", "")).lower()
        if op == "read":
            read += int(entry.get("value", 0))
        elif op == "write":
            write += int(entry.get("value", 0))
    return {
        "id": current.get("id", ""),
        "name": name,
        "cpu_percent": percent,
        "memory": {
            "usage": usage,
            "limit": limit,
            "percent": round(usage / limit * 100.0, 2) if limit else 0.0,
        },
        "network": {"rx_bytes": rx, "tx_bytes": tx},
        "block_io": {"read_bytes": read, "write_bytes": write},
        "pids": int((current.get("pids_stats") or {}).get("current", 0) or 0),
    }


@attrs.define
class _Container:
    name: str
    #: the latest complete entry (two samples), or None
    entry: dict[str, Any] | None = None
    latest: dict[str, Any] | None = None


def iso_time(seconds: float) -> str:
    return _dt.datetime.fromtimestamp(seconds, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ContainerStatsSampler(service.Service):
    """
    Samples the running containers' stats in the background (see the
    module's docstring); ``view()`` is what ``GET /metrics`` answers from,
    at once, without a Docker call.

    ``watch`` is the Docker event watch (``ContainerListCache``) whose
    container events keep the running set current between rounds; the
    watch itself is kept connected by the bind guard.
    """

    def __init__(self, pool: DockerPool, clock: Any, interval: float, concurrency: int, watch: Any = None) -> None:
        self.setName("container-stats")
        self.pool = pool
        self.clock = clock
        self.interval = interval
        self.watch = watch
        self._semaphore = defer.DeferredSemaphore(max(1, concurrency))
        #: running containers by id, as of the latest round and events since
        self._containers: dict[str, _Container] = {}
        #: samples in flight, by container id: who waits for each
        self._sampling: dict[str, list[defer.Deferred[None]]] = {}
        self._round: defer.Deferred[None] | None = None
        self._timer: Any = None
        #: when the latest round ended (clock seconds), or None before the first
        self.sampled_at: float | None = None
        #: why Docker could not be listed in the latest round ("" when it could)
        self.docker_error = ""
        #: rounds ended, and how long the latest took (seconds)
        self.rounds = 0
        self.last_round_seconds: float | None = None
        self._waiting: list[defer.Deferred[None]] = []
        #: whether Docker has answered (or refused) a first listing
        self.listed = False
        self._listing: list[defer.Deferred[None]] = []

    # -- the service -------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self.watch is not None:
            self.watch.on_event.append(self._event)
            self.watch.on_connect.append(self._reconnected)
        # Once the reactor runs: a startup that fails later leaves no call behind.
        self._timer = self.clock.callLater(0, self._start_round)

    def stopService(self) -> None:
        super().stopService()
        if self.watch is not None:
            for hooks, hook in ((self.watch.on_event, self._event), (self.watch.on_connect, self._reconnected)):
                if hook in hooks:
                    hooks.remove(hook)
        self._cancel_timer()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def next_round(self) -> defer.Deferred[None]:
        """Fires when the next round (of those not yet begun) has ended."""
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(d)
        return d

    def first_listing(self, timeout: float) -> defer.Deferred[None]:
        """
        Fires once Docker has answered a first listing of the running
        containers (or refused it: Docker is down), or after ``timeout``
        seconds, whichever comes first; at once after that. Never fails.
        """
        if self.listed:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._listing.append(d)
        timer = self.clock.callLater(timeout, lambda: None if d.called else d.callback(None))

        def settled(result: None) -> None:
            if timer.active():
                timer.cancel()

        d.addCallback(settled)
        return d

    def _listed(self) -> None:
        self.listed = True
        waiting, self._listing = self._listing, []
        for d in waiting:
            if not d.called:
                d.callback(None)

    # -- what /metrics answers from ----------------------------------------

    def view(self) -> dict[str, Any]:
        """
        ``containers`` (name -> entry, for each running container sampled
        twice), ``pending`` (names of running containers not yet sampled
        twice), ``docker`` and ``docker_error``, ``sampled_at``.
        """
        containers: dict[str, Any] = {}
        pending: list[str] = []
        for record in self._containers.values():
            if record.entry is not None:
                containers[record.name] = record.entry
            else:
                pending.append(record.name)
        if not self.listed:
            return {"containers": {}, "pending": [], "docker": False, "sampled_at": None,
                    "docker_error": "Docker has not answered the agent's first listing of containers yet"}
        view: dict[str, Any] = {
            "containers": containers,
            "pending": sorted(pending),
            "docker": not self.docker_error,
            "sampled_at": None if self.sampled_at is None else iso_time(self.sampled_at),
        }
        if self.docker_error:
            view["docker_error"] = self.docker_error
        return view

    # -- rounds --------------------------------------------------------------

    def _start_round(self) -> None:
        self._timer = None
        if not self.running or not self.pool.running or self._round is not None:
            return
        waiting, self._waiting = self._waiting, []
        started = self.clock.seconds()
        self._round = defer.ensureDeferred(self._sample_all())

        def ended(result: Any) -> None:
            self._round = None
            if isinstance(result, Failure):
                log.failure("sampling container stats failed", result)
            self.rounds += 1
            self.last_round_seconds = self.clock.seconds() - started
            for d in waiting:
                d.callback(None)
            if self.running and self._timer is None:
                self._timer = self.clock.callLater(self.interval, self._start_round)

        self._round.addBoth(ended)

    async def _sample_all(self) -> None:
        try:
            running = await self.pool.sampling_call(_running_containers)
        except errors.PlexError as e:
            self.docker_error = e.details or e.message
            self._containers.clear()
            self.sampled_at = self.clock.seconds()
            self._listed()
            return
        self.docker_error = ""
        listed = dict(running)
        for container_id in list(self._containers):
            if container_id not in listed:
                del self._containers[container_id]
        for container_id, name in listed.items():
            record = self._containers.get(container_id)
            if record is None:
                self._containers[container_id] = _Container(name)
            else:
                record.name = name
        self._listed()
        await defer.gatherResults(
            [self._sample(container_id) for container_id in listed], consumeErrors=True
        )
        self.sampled_at = self.clock.seconds()

    def _sample(self, container_id: str) -> defer.Deferred[None]:
        """
        Sample one container (twice when it has no sample yet) and update
        its record; fires when done (never fails). A container already
        being sampled is not sampled again: the caller waits for that one.
        """
        sampled: defer.Deferred[None] = defer.Deferred()
        waiting = self._sampling.get(container_id)
        if waiting is not None:
            waiting.append(sampled)
            return sampled
        self._sampling[container_id] = [sampled]
        record = self._containers.get(container_id)
        times = 1 if record is not None and record.latest is not None else 2

        def got(samples: list[dict[str, Any]]) -> None:
            current = self._containers.get(container_id)
            if current is None:
                return  # it died meanwhile
            for sample in samples:
                previous, current.latest = current.latest, sample
                if previous is not None:
                    current.entry = container_entry(current.name, previous, sample)

        def failed(failure: Any) -> None:
            if not self.running:
                return  # stopping: the pool may be closing its client under the call
            if failure.check(errors.NotFound):
                self._containers.pop(container_id, None)  # gone between the list and the call
            elif not failure.check(errors.PlexError):
                log.failure("sampling the stats of container {id} failed", failure, id=container_id[:12])

        def done(result: Any) -> None:
            for d in self._sampling.pop(container_id, []):
                d.callback(None)

        d = self._semaphore.run(self.pool.sampling_call, _one_shot, container_id, times)
        d.addCallbacks(got, failed)
        d.addBoth(done)
        return sampled

    # -- Docker's events between rounds ----------------------------------------

    def _event(self, event: Any) -> None:
        if not isinstance(event, dict):
            return
        actor = event.get("Actor") or {}
        container_id = actor.get("ID") or event.get("id")
        action = str(event.get("Action") or event.get("status") or "")
        if not isinstance(container_id, str) or not container_id:
            return
        name = (actor.get("Attributes") or {}).get("name")
        if action in _GONE:
            self._containers.pop(container_id, None)
        elif action == "start" and self.running and isinstance(name, str):
            self._containers.setdefault(container_id, _Container(name))
            self._sample(container_id)
        elif action == "rename" and container_id in self._containers and isinstance(name, str):
            self._containers[container_id].name = name

    def _reconnected(self) -> None:
        # Events were missed while the watch was down: a round now, not at the next tick.
        if self._round is None and self.running:
            self._cancel_timer()
            self._timer = self.clock.callLater(0, self._start_round)


def sampler_for(pool: DockerPool, clock: Any, interval: float, watch: Any = None) -> ContainerStatsSampler:
    """The sampler on ``pool``, as many calls at once as the pool has stats threads."""
    return ContainerStatsSampler(pool, clock, interval, pool.sampling_threads, watch)
