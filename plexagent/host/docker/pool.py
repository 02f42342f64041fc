"""
The Docker thread pool: a named, bounded ``ThreadPool`` (``docker.threads``)
on which every blocking docker-py call runs, through ``deferToThreadPool``;
the reactor never waits for Docker. Docker's errors become the project's
error types (``errors.translate``). The client is created lazily and
dropped after a connection error, so when the daemon comes back the next
call reconnects without a restart of the agent. Streams (logs, build and
pull progress) are handed over as ``Stream`` objects (a push producer).

This package knows nothing of HTTP: it takes and returns plain values.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterable

import docker
import docker.errors
from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from plexagent.host.docker.errors import is_unavailable, translate

log = Logger()


def _close_quietly(source: Any) -> None:
    """Close a docker-py stream if it can be closed; it may be closed already."""
    close = getattr(source, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            # Already closed or not closable from here: its reader ends at
            # its next item anyway.
            pass


@implementer(IPushProducer)
class Stream:
    """
    A stream of items produced by a worker thread and delivered on the
    reactor, one ``on_item(item)`` call each, with backpressure: while
    paused, the worker waits before delivering the next item. ``stop``
    cancels it (closing Docker's response when it can, so that a worker
    blocked on a follow-mode read returns at once); ``done`` fires when the
    worker has ended.
    """

    def __init__(self) -> None:
        self._flowing = threading.Event()
        self._flowing.set()
        self.stopped = False
        self.source: Any = None
        self.done: defer.Deferred[None] = defer.Deferred()

    def pauseProducing(self) -> None:
        self._flowing.clear()

    def resumeProducing(self) -> None:
        self._flowing.set()

    def stopProducing(self) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopped = True
        self._flowing.set()
        _close_quietly(self.source)

    def wait_flowing(self) -> None:
        self._flowing.wait()


def default_client_factory(host: str) -> Callable[[], Any]:
    def make() -> Any:
        if host:
            return docker.DockerClient(base_url=host, version="auto")
        return docker.from_env(version="auto")

    return make


class DockerPool(service.Service):
    """
    The agent's Docker access: a named, bounded thread pool started and
    stopped with the service, and ``call(fn, ...)`` running
    ``fn(client, ...)`` on it, returning a Deferred.

    A second, one-thread pool answers ``ping`` so that the health check
    stays prompt while every worker is busy with slow builds; a third, of
    half the threads (at least one), runs the background stats samples
    (``sampling_call``), so that sampling never takes a thread a request
    is waiting for.
    """

    def __init__(
        self,
        reactor: Any,
        host: str = "",
        threads: int = 10,
        client_factory: Callable[[], Any] | None = None,
    ) -> None:
        self.setName("dockerpool")
        self.reactor = reactor
        self.host = host
        self.threadpool = ThreadPool(minthreads=0, maxthreads=threads, name="plexagent-docker")
        self._probe_pool = ThreadPool(minthreads=0, maxthreads=1, name="plexagent-docker-ping")
        self._background_pool = ThreadPool(minthreads=0, maxthreads=1, name="plexagent-docker-events")
        #: how many stats samples may run at once (``sampling_call``)
        self.sampling_threads = max(1, threads // 2)
        self._sampling_pool = ThreadPool(minthreads=0, maxthreads=self.sampling_threads, name="plexagent-docker-stats")
        self._client_factory = client_factory or default_client_factory(host)
        self._client: Any = None
        self._probe_client: Any = None
        self._lock = threading.Lock()
        self._stop_lock = threading.Lock()
        self._streams: set[Stream] = set()
        self._active = 0
        self._idle: list[defer.Deferred[None]] = []
        self._ping: defer.Deferred[bool] | None = None
        self._reactor_trigger: Any = None

    # -- service ---------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.threadpool.start()
        self._probe_pool.start()
        self._background_pool.start()
        self._sampling_pool.start()
        # If the reactor stops without stopService (a crash), do not leave
        # non-daemon threads holding the process.
        self._reactor_trigger = self.reactor.addSystemEventTrigger("during", "shutdown", self._stop_pools)

    def stopService(self) -> Any:
        if not self.running:
            return None  # stopped already (a parent stopped twice)
        super().stopService()
        for stream in list(self._streams):
            stream.stop()
        if self._reactor_trigger is not None:
            self.reactor.removeSystemEventTrigger(self._reactor_trigger)
            self._reactor_trigger = None
        # Joining the workers waits for the Docker calls in flight: do it
        # off the reactor, which must keep running meanwhile (a call may be
        # waiting for bytes the reactor is to deliver).
        stopped: defer.Deferred[None] = defer.Deferred()

        def stop() -> None:
            try:
                self._stop_pools()
            finally:
                self.reactor.callFromThread(stopped.callback, None)

        threading.Thread(target=stop, name="plexagent-docker-stop", daemon=True).start()
        return stopped

    def _stop_pools(self) -> None:
        with self._stop_lock:
            for pool in (self.threadpool, self._probe_pool, self._background_pool, self._sampling_pool):
                if pool.started:
                    pool.stop()
        with self._lock:
            for client in (self._client, self._probe_client):
                if client is not None:
                    try:
                        client.close()
                    except Exception:
                        pass
            self._client = self._probe_client = None

    # -- the client ------------------------------------------------------

    def client(self) -> Any:
        """In a worker thread: the shared client, created on first use."""
        with self._lock:
            if self._client is None:
                self._client = self._client_factory()
            return self._client

    def _forget_client(self) -> None:
        # After a connection error: reconnect (and re-detect the API
        # version) on the next call, e.g. after the daemon was upgraded.
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:
                pass

    def _run(self, fn: Callable[..., Any], what: str, secrets: tuple[str, ...], args: Any, kwargs: Any) -> Any:
        try:
            return fn(self.client(), *args, **kwargs)
        except Exception as e:
            mapped = translate(e, what, secrets)
            if is_unavailable(mapped):
                self._forget_client()
            if mapped is e:
                raise
            raise mapped from None

    # -- calls -----------------------------------------------------------

    def call(
        self,
        fn: Callable[..., Any],
        *args: Any,
        what: str = "container",
        secrets: tuple[str, ...] = (),
        **kwargs: Any,
    ) -> defer.Deferred[Any]:
        """``fn(client, *args, **kwargs)`` on the pool; errors translated."""
        return self._submit(self.threadpool, True, fn, what, secrets, args, kwargs)

    def background_call(
        self, fn: Callable[..., Any], *args: Any, what: str = "container", **kwargs: Any
    ) -> defer.Deferred[Any]:
        """
        Like ``call``, but not counted in ``active``: the agent's own
        background checks, which no request waits for.
        """
        return self._submit(self.threadpool, False, fn, what, (), args, kwargs)

    def sampling_call(self, fn: Callable[..., Any], *args: Any, what: str = "container") -> defer.Deferred[Any]:
        """
        Like ``background_call``, on the stats pool (``sampling_threads``
        threads): the container stats sampler's calls, which wait up to a
        second each for Docker's next collection.
        """
        return self._submit(self._sampling_pool, False, fn, what, (), args, {})

    def _submit(
        self, pool: ThreadPool, counted: bool, fn: Callable[..., Any], what: str, secrets: tuple[str, ...],
        args: Any, kwargs: Any,
    ) -> defer.Deferred[Any]:
        d = deferToThreadPool(self.reactor, pool, self._run, fn, what, secrets, args, kwargs)
        if counted:
            self._active += 1
            d.addBoth(self._finished)
        return d

    def _finished(self, result: Any) -> Any:
        self._active -= 1
        if self._active == 0:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)
        return result

    @property
    def active(self) -> int:
        """How many calls are running or queued."""
        return self._active

    def when_idle(self) -> defer.Deferred[None]:
        """Fires once no call is running or queued (tests, graceful stop)."""
        if self._active == 0:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle.append(d)
        return d

    def stream(
        self,
        open_source: Callable[[Any], Iterable[Any]],
        on_item: Callable[[Any], None],
        what: str = "container",
        secrets: tuple[str, ...] = (),
        on_open: Callable[[], None] | None = None,
        background: bool = False,
    ) -> Stream:
        """
        Iterate ``open_source(client)`` on the pool, delivering each item to
        ``on_item`` on the reactor. ``stream.done`` fires (or fails with the
        translated error) when the worker has ended. ``on_open`` is called
        on the reactor once Docker has answered. A ``background`` stream
        runs on its own thread, not the pool's, and is not counted as an
        active call (the container event watch).
        """
        handle = Stream()
        self._streams.add(handle)

        def work(client: Any) -> None:
            source = open_source(client)
            handle.source = source
            if handle.stopped:
                handle.stop()
                return
            if on_open is not None:
                self.reactor.callFromThread(on_open)
            try:
                for item in source:
                    handle.wait_flowing()
                    if handle.stopped:
                        break
                    self.reactor.callFromThread(_deliver, item)
            finally:
                _close_quietly(source)

        def _deliver(item: Any) -> None:
            if not handle.stopped:
                on_item(item)

        def ended(result: Any) -> None:
            self._streams.discard(handle)
            if _is_failure(result) and not handle.stopped:
                handle.done.errback(result)
            else:
                handle.done.callback(None)

        pool = self._background_pool if background else self.threadpool
        self._submit(pool, not background, work, what, secrets, (), {}).addBoth(ended)
        return handle

    def ping(self, timeout: float = 3.0) -> defer.Deferred[bool]:
        """Whether the daemon answers within ``timeout``, on the probe thread; never fails."""
        if self._ping is None:
            # One probe at a time: concurrent callers share it.
            self._ping = deferToThreadPool(self.reactor, self._probe_pool, self._probe)
            self._ping.addErrback(lambda _: False)

            def clear(answer: bool) -> bool:
                self._ping = None
                return answer

            self._ping.addBoth(clear)

        result: defer.Deferred[bool] = defer.Deferred()

        def answered(answer: bool) -> bool:
            if not result.called:
                timer.cancel()
                result.callback(answer)
            return answer

        def too_slow() -> None:
            if not result.called:
                result.callback(False)

        timer = self.reactor.callLater(timeout, too_slow)
        self._ping.addBoth(answered)
        return result

    def _probe(self) -> bool:
        try:
            with self._lock:
                if self._probe_client is None:
                    self._probe_client = self._client_factory()
                client = self._probe_client
            return bool(client.ping())
        except Exception:
            with self._lock:
                self._probe_client = None
            return False


def _is_failure(value: Any) -> bool:
    return isinstance(value, Failure)
