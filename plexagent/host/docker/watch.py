"""
Docker's container events, watched on the pool's background thread, and the
short-lived cache of container lists and states they keep current.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger

from plexagent.host.docker.pool import DockerPool, Stream

log = Logger()


def _notify(hooks: list[Callable[..., None]], *args: Any) -> None:
    for hook in list(hooks):
        try:
            hook(*args)
        except Exception:
            log.failure("a Docker event listener failed")


class ContainerListCache:
    """
    Container views (the list; one container's inspect data, for its
    status) answered from memory while Docker's event stream reports no
    container change since they were fetched, and for at most ``max_age``
    seconds (so Docker's "Up 5 minutes" text stays current).

    Pollers of ``GET /containers`` and ``/containers/<n>/status`` then cost
    the daemon nothing. The event watch runs on its own thread; while it is
    not connected (Docker down, not yet answered) nothing is cached and
    every call asks Docker. A container event clears the list and that
    container's entries.
    """

    def __init__(self, pool: DockerPool, max_age: float = 1.0, max_entries: int = 1024) -> None:
        self.pool = pool
        self.max_age = max_age
        self.max_entries = max_entries
        self.live = False
        self._watch: Stream | None = None
        self._generation = 0
        self._cached: dict[Any, tuple[int, float, Any]] = {}
        self._waiting: list[defer.Deferred[None]] = []
        #: Called on the reactor with each container event, when the watch
        #: (re)connects, and when it ends (the bind guard listens).
        self.on_event: list[Callable[[Any], None]] = []
        self.on_connect: list[Callable[[], None]] = []
        self.on_end: list[Callable[[], None]] = []

    def invalidate(self, event: Any = None) -> None:
        """Forget what ``event`` (a Docker container event) may change; all if no event."""
        self._generation += 1
        actor = (event.get("Actor") or {}).get("ID") or event.get("id") if isinstance(event, dict) else None
        if actor:
            # The list, and that one container's entries; others stay.
            for key, (_, _, value) in list(self._cached.items()):
                if key == "list" or (isinstance(value, dict) and value.get("Id") == actor):
                    del self._cached[key]
        else:
            self._cached.clear()
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def changed(self) -> defer.Deferred[None]:
        """Fires at the next invalidation (an event, a change by the agent)."""
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(d)
        return d

    def _event(self, event: Any) -> None:
        self.invalidate(event)
        _notify(self.on_event, event)

    def _opened(self) -> None:
        self.live = True
        self.invalidate()
        _notify(self.on_connect)

    def _watch_ended(self, _: Any) -> None:
        self._watch = None
        self.live = False
        self.invalidate()
        _notify(self.on_end)

    def watch(self) -> None:
        """Start watching Docker's container events, unless already watching."""
        if self._watch is not None or not self.pool.running:
            return
        self._watch = self.pool.stream(
            lambda client: client.api.events(filters={"type": "container"}, decode=True),
            self._event,
            on_open=self._opened,
            background=True,
        )
        self._watch.done.addBoth(self._watch_ended)

    def get(self, fetch: Callable[[], defer.Deferred[Any]], key: Any = "list") -> defer.Deferred[Any]:
        self.watch()
        now = self.pool.reactor.seconds()
        cached = self._cached.get(key)
        if self.live and cached is not None and cached[0] == self._generation and now - cached[1] <= self.max_age:
            return defer.succeed(cached[2])
        generation, live = self._generation, self.live

        def store(result: Any) -> Any:
            # Only a fetch that began while the watch was live, with no
            # event since, may be served again.
            if live and self.live and generation == self._generation:
                if len(self._cached) >= self.max_entries:
                    self._cached.clear()
                self._cached[key] = (generation, now, result)
            return result

        return fetch().addCallback(store)
