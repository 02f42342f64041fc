"""
The Docker thread pool and a Deferred-returning facade over docker-py.

Every docker-py call blocks, so every one of them runs here, on the agent's
own bounded, named ``ThreadPool`` (``docker.threads``), through
``deferToThreadPool``; the reactor never waits for Docker. Docker's errors
become the project's error types (``translate``), with Docker's own message
in ``details``. The client is created lazily and dropped after a connection
error, so when the daemon comes back the next call reconnects without a
restart of the agent.

This module knows nothing of HTTP: it takes and returns plain values.
Streams (logs, build and pull progress, image loads) are handed over as
``Stream`` objects (a push producer) and ``TarFeed`` objects (a bounded
queue of body chunks).
"""

from __future__ import annotations

import collections
import datetime as _dt
import re
import threading
from typing import Any, Callable, Iterable, Iterator

import docker
import docker.errors
import requests.exceptions
from twisted.application import service
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from plexagent import errors
from plexagent.host.docker.binds import start_checked
from plexagent.host.files.paths import PathPolicy

log = Logger()

DOCKER_UNAVAILABLE = "docker unavailable"


def _scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


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


#: Docker's refusals recognised by their text, whatever status the engine
#: gave them: engines answer many refusals of a container's parameters with
#: a 500 (they carry no error type), and a registry's answer comes back as a
#: 500 too. First match wins; Docker's own explanation goes in ``details``.
_REFUSALS: tuple[tuple[re.Pattern[str], type[errors.PlexError], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), kind, message)
    for pattern, kind, message in (
        (r"port is already allocated|address already in use", errors.Conflict, "a host port is already in use"),
        (r"unable to find (user|group)|no matching entries in (passwd|group) file", errors.InvalidInput,
         "docker refused the user"),
        (r"invalid mode|invalid volume specification|invalid mount config|not a shared (or slave )?mount"
         r"|duplicate mount point|error mounting|trying to mount", errors.InvalidInput, "docker refused the volumes"),
        (r"restart policy|maximum retry count", errors.InvalidInput, "docker refused the restart policy"),
        (r"healthcheck", errors.InvalidInput, "docker refused the health check"),
        (r"invalid port|port specification|invalid ip address|invalid host ?port", errors.InvalidInput,
         "docker refused the ports"),
        (r"working directory", errors.InvalidInput, "docker refused the working directory"),
        (r"invalid reference format", errors.InvalidInput, "invalid image reference"),
        (r"unauthorized|authentication required|no basic auth credentials|incorrect username or password",
         errors.Forbidden, "the registry refused the credentials"),
        (r"pull access denied|manifest unknown|repository does not exist|manifest for \S+ not found",
         errors.NotFound, "image not found"),
        (r"oci runtime (create )?failed|runc create failed|executable file not found", errors.InvalidInput,
         "docker could not start the container's process"),
    )
)

#: What a 404 is about, from Docker's explanation; else the caller's ``what``.
_SUBJECTS = tuple(
    (re.compile(pattern, re.IGNORECASE), subject)
    for pattern, subject in (
        (r"no such container", "container"),
        (r"no such image|pull access denied|manifest unknown|repository does not exist|reference does not exist",
         "image"),
        (r"no such network|network \S+ not found", "network"),
        (r"no such volume|volume \S+ not found", "volume"),
        (r"no such exec", "exec instance"),
    )
)


def translate(exc: BaseException, what: str = "container", secrets: Iterable[str] = ()) -> BaseException:
    """
    The project's error for a docker-py exception (or ``exc`` itself when it
    is not Docker's). ``what`` names the thing a 404 is about when Docker's
    message does not; any string in ``secrets`` is blanked out of the
    details.

    Docker's refusal of the request (a 4xx, or a 500 whose text is a known
    refusal: ``_REFUSALS``) is the client's: 400, 404 or 409 with Docker's
    explanation. Anything else from the engine is a 500; an unreachable
    daemon is a 503.
    """
    secrets = tuple(secrets)
    if isinstance(exc, errors.PlexError):
        return exc
    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError)):
        return errors.Unavailable(DOCKER_UNAVAILABLE, _scrub(_first_line(exc), secrets))
    if isinstance(exc, docker.errors.APIError):
        status = 404 if isinstance(exc, docker.errors.NotFound) else exc.status_code or 500
        return engine_error(status, _scrub(_explanation(exc), secrets), what)
    if isinstance(exc, docker.errors.DockerException):
        text = str(exc)
        # Creating the client fails this way when the daemon is unreachable.
        if "Error while fetching server API version" in text or "Connection" in text:
            return errors.Unavailable(DOCKER_UNAVAILABLE, _scrub(_first_line(exc), secrets))
        return errors.InvalidInput("docker refused the parameters", _scrub(text, secrets))
    return exc


def engine_error(status: int, explanation: str, what: str = "container") -> errors.PlexError:
    """The project's error for the Docker engine's answer ``status`` explained by ``explanation``."""
    if status == 404:
        subject = next((s for pattern, s in _SUBJECTS if pattern.search(explanation)), what)
        return errors.NotFound(f"{subject} not found", explanation)
    if status == 409:
        return errors.Conflict("conflict with the container's or image's current state", explanation)
    if 400 <= status < 500 or status == 500:
        for pattern, kind, message in _REFUSALS:
            if pattern.search(explanation):
                return kind(message, explanation)
    if status in (401, 403):
        return errors.Forbidden("docker refused the request", explanation)
    if 400 <= status < 500:
        return errors.InvalidInput("docker refused the parameters", explanation)
    return errors.UpstreamFailed("docker failed", explanation)


def _explanation(exc: Any) -> str:
    text = getattr(exc, "explanation", None)
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return str(text or exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:500]


def is_unavailable(exc: BaseException) -> bool:
    return isinstance(exc, errors.Unavailable)


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


class TarFeed:
    """
    A bounded hand-over of tar bytes from the reactor (``put``) to the worker
    thread that streams them to Docker (``chunks``).

    When more than ``high_water`` bytes wait, ``pause()`` is called on the
    reactor (the HTTP layer stops reading the socket); when the worker has
    drained below ``low_water``, ``resume()`` is called on the reactor.
    """

    def __init__(
        self,
        reactor: Any,
        pause: Callable[[], None],
        resume: Callable[[], None],
        high_water: int = 8 * 1024 * 1024,
        low_water: int = 2 * 1024 * 1024,
    ) -> None:
        self._reactor = reactor
        self._pause = pause
        self._resume = resume
        self._high = high_water
        self._low = low_water
        self._chunks: collections.deque[bytes] = collections.deque()
        self._pending = 0
        self._cond = threading.Condition()
        self._eof = False
        self._aborted = False
        self._paused = False
        self.total = 0

    def put(self, data: bytes) -> None:
        """On the reactor: queue ``data`` for the worker."""
        if not data:
            return
        with self._cond:
            if self._aborted:
                return
            self._chunks.append(data)
            self._pending += len(data)
            self.total += len(data)
            over = self._pending > self._high and not self._paused
            if over:
                self._paused = True
            self._cond.notify()
        if over:
            self._pause()

    def close(self) -> None:
        """On the reactor: no more data."""
        with self._cond:
            self._eof = True
            self._cond.notify()

    def abort(self) -> None:
        """Drop everything; the worker's upload to Docker fails."""
        with self._cond:
            self._aborted = True
            self._chunks.clear()
            self._pending = 0
            was_paused, self._paused = self._paused, False
            self._cond.notify()
        if was_paused:
            self._reactor.callFromThread(self._resume)

    def chunks(self) -> Iterator[bytes]:
        """In the worker thread: the bytes, as they arrive."""
        while True:
            with self._cond:
                while not self._chunks and not self._eof and not self._aborted:
                    self._cond.wait()
                if self._aborted:
                    raise OSError("the upload was aborted")
                if not self._chunks:
                    return
                data = self._chunks.popleft()
                self._pending -= len(data)
                resume = self._paused and self._pending <= self._low
                if resume:
                    self._paused = False
            if resume:
                self._reactor.callFromThread(self._resume)
            yield data


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
    stays prompt while every worker is busy with slow builds.
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
            for pool in (self.threadpool, self._probe_pool, self._background_pool):
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


# -- the facade: each method runs one blocking docker-py function on the pool --


def _iso(value: Any) -> str:
    """Docker's timestamps (epoch seconds or RFC 3339 with nanoseconds) as ISO 8601 UTC."""
    if isinstance(value, (int, float)):
        return _dt.datetime.fromtimestamp(value, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(value or "")


def _parse_time(text: str) -> _dt.datetime | None:
    if not text or text.startswith("0001-"):
        return None
    text = text.rstrip("Z")
    head, _, frac = text.partition(".")
    try:
        moment = _dt.datetime.strptime(head, "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return None
    return moment.replace(tzinfo=_dt.timezone.utc)


def human_duration(seconds: float) -> str:
    """Docker's ``units.HumanDuration`` (what ``docker ps`` prints)."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = s // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(s / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{hours // 24 // 365} years"


def status_text(state: dict[str, Any], now: _dt.datetime | None = None) -> str:
    """The ``Status`` column of ``docker ps`` from an inspect ``State``."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    status = state.get("Status", "")
    if status in ("running", "paused"):
        started = _parse_time(state.get("StartedAt", ""))
        text = "Up " + human_duration((now - started).total_seconds()) if started else "Up"
        if status == "paused":
            text += " (Paused)"
        elif state.get("Restarting"):
            text = "Restarting"
        health = (state.get("Health") or {}).get("Status")
        if health and status == "running":
            text += " (health: starting)" if health == "starting" else f" ({health})"
        return text
    if status == "exited":
        finished = _parse_time(state.get("FinishedAt", ""))
        ago = f" {human_duration((now - finished).total_seconds())} ago" if finished else ""
        return f"Exited ({state.get('ExitCode', 0)}){ago}"
    if status == "created":
        return "Created"
    if status == "restarting":
        return "Restarting"
    if status == "dead":
        return "Dead"
    if status == "removing":
        return "Removal In Progress"
    return status


def _ports_text(ports: list[dict[str, Any]]) -> str:
    parts = []
    for p in ports or []:
        private = f"{p.get('PrivatePort')}/{p.get('Type', 'tcp')}"
        if p.get("PublicPort"):
            parts.append(f"{p.get('IP', '')}:{p['PublicPort']}->{private}")
        else:
            parts.append(private)
    return ", ".join(parts)


def container_summary(c: dict[str, Any]) -> dict[str, Any]:
    """One entry of ``GET /containers`` (the seed's keys, from Docker's list)."""
    return {
        "ID": c.get("Id", ""),
        "Names": ",".join(c.get("Names") or []),
        "Image": c.get("Image", ""),
        "ImageID": c.get("ImageID", ""),
        "Command": c.get("Command", ""),
        "Created": _iso(c.get("Created")),
        "State": c.get("State", ""),
        "Status": c.get("Status", ""),
        "Ports": _ports_text(c.get("Ports") or []),
        "Labels": c.get("Labels") or {},
    }


def container_status(info: dict[str, Any]) -> dict[str, Any]:
    """``{id, name, state, status, health_status}`` from inspect."""
    state = info.get("State") or {}
    return {
        "id": info.get("Id", ""),
        "name": (info.get("Name") or "").lstrip("/"),
        "state": state.get("Status", ""),
        "status": status_text(state),
        "health_status": (state.get("Health") or {}).get("Status", "none"),
    }


def image_summary(i: dict[str, Any]) -> dict[str, Any]:
    return {
        "ID": i.get("Id", ""),
        "RepoTags": [t for t in (i.get("RepoTags") or []) if t != "<none>:<none>"],
        "Size": i.get("Size", 0),
        "Created": _iso(i.get("Created")),
    }


def _stream_errors(lines: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
    collected, error = [], None
    for line in lines:
        collected.append(line)
        if "error" in line or "errorDetail" in line:
            error = line.get("error") or (line.get("errorDetail") or {}).get("message") or "failed"
    return collected, error


class _Ops:
    """The blocking operations; each takes the docker client first."""

    @staticmethod
    def list_containers(client: Any) -> list[dict[str, Any]]:
        return [container_summary(c) for c in client.api.containers(all=True)]

    @staticmethod
    def inspect(client: Any, name: str) -> dict[str, Any]:
        return client.api.inspect_container(name)

    @staticmethod
    def run(client: Any, kwargs: dict[str, Any], policy: PathPolicy) -> dict[str, Any]:
        kwargs = dict(kwargs)
        image = kwargs.pop("image")
        command = kwargs.pop("command", None)
        try:
            container = client.containers.create(image, command, **kwargs)
        except docker.errors.ImageNotFound:
            # As `docker run` does: pull a missing image, then create.
            from plexagent.host.docker.specs import split_image

            repository, tag = split_image(image)
            client.images.pull(repository, tag=tag or "latest")
            container = client.containers.create(image, command, **kwargs)
        try:
            # A pull may have taken minutes since the volumes were checked.
            start_checked(client, container.id, policy)
        except Exception:
            # Do not leave a created-but-broken container holding the name.
            try:
                container.remove(force=True)
            except Exception:
                pass
            raise
        container.reload()
        return {"success": True, "id": container.id, "name": container.name, **container_status(container.attrs)}

    @staticmethod
    def act(client: Any, name: str, action: str, policy: PathPolicy, **kwargs: Any) -> dict[str, Any]:
        api = client.api
        if action == "start":
            name = start_checked(client, name, policy)
        elif action == "stop":
            api.stop(name, timeout=kwargs["timeout"])
        elif action == "restart":
            name = start_checked(client, name, policy, restart_timeout=kwargs.get("timeout", 10))
        elif action == "remove":
            info = api.inspect_container(name)
            api.remove_container(name, v=kwargs["volumes"], force=kwargs["force"])
            return {"success": True, "id": info["Id"], "name": info["Name"].lstrip("/"), "removed": True}
        else:  # pragma: no cover - the routes only pass the actions above
            raise ValueError(action)
        return {"success": True, **container_status(api.inspect_container(name))}

    @staticmethod
    def logs(client: Any, name: str, tail: int | str) -> str:
        raw = client.api.logs(name, stdout=True, stderr=True, tail=tail)
        return raw.decode("utf-8", "replace")

    @staticmethod
    def exec(client: Any, name: str, command: Any, user: str, workdir: str | None) -> dict[str, Any]:
        api = client.api
        exec_id = api.exec_create(name, command, stdout=True, stderr=True, user=user or "", workdir=workdir)
        output = api.exec_start(exec_id["Id"])
        exit_code = api.exec_inspect(exec_id["Id"]).get("ExitCode")
        return {"exit_code": exit_code, "output": output.decode("utf-8", "replace")}

    @staticmethod
    def inspect_all(client: Any) -> list[dict[str, Any]]:
        result = []
        for c in client.api.containers(all=True):
            try:
                result.append(client.api.inspect_container(c["Id"]))
            except docker.errors.NotFound:
                continue  # removed meanwhile
        return result

    @staticmethod
    def list_images(client: Any, prefix: str | None) -> list[dict[str, Any]]:
        images = [image_summary(i) for i in client.api.images()]
        if prefix:
            images = [i for i in images if any(t.startswith(prefix) for t in i["RepoTags"])]
        return images

    @staticmethod
    def tag(client: Any, source: str, repository: str, tag: str | None) -> dict[str, Any]:
        client.api.tag(source, repository, tag)
        target = f"{repository}:{tag}" if tag else repository
        info = client.api.inspect_image(target)
        return {"success": True, "source_image": source, "target_image": target, "id": info["Id"]}

    @staticmethod
    def cleanup(client: Any, all_unused: bool) -> dict[str, Any]:
        result = client.api.prune_images(filters={"dangling": not all_unused})
        deleted = result.get("ImagesDeleted") or []
        removed = [d.get("Deleted") for d in deleted if d.get("Deleted")]
        untagged = [d.get("Untagged") for d in deleted if d.get("Untagged")]
        return {
            "success": True,
            "removed": len(removed),
            "images_deleted": removed,
            "untagged": untagged,
            "space_reclaimed": result.get("SpaceReclaimed", 0),
        }

    @staticmethod
    def image_info(client: Any, reference: str) -> dict[str, Any]:
        info = client.api.inspect_image(reference)
        return {"id": info["Id"], "tags": info.get("RepoTags") or [], "size": info.get("Size", 0)}

    @staticmethod
    def login(client: Any, registry: str, username: str, password: str) -> dict[str, Any]:
        try:
            result = client.login(username=username, password=password, registry=registry, reauth=True)
        except docker.errors.APIError as e:
            # Whatever the engine's status, the registry said no to what the
            # client sent (address, credentials): theirs to fix, not the
            # agent API's own authentication (401) or authorisation (403).
            raise errors.InvalidInput("registry login failed", _scrub(_explanation(e), (password,))) from None
        return {"success": True, "registry": registry, "status": (result or {}).get("Status", "Login Succeeded")}


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


class DockerFacade:
    """
    Deferred-returning Docker operations on a ``DockerPool``. Every start
    of a container (run, start, restart) first checks its bind mounts
    against ``paths`` (``dockerbinds.start_checked``).
    """

    def __init__(self, pool: DockerPool, paths: PathPolicy | None = None) -> None:
        self.pool = pool
        self.paths = paths if paths is not None else PathPolicy(())
        self.container_list = ContainerListCache(pool)

    def _changes(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        # The agent's own changes show at once, before their event arrives.
        def invalidate(result: Any) -> Any:
            self.container_list.invalidate()
            return result

        return d.addBoth(invalidate)

    def ping(self) -> defer.Deferred[bool]:
        return self.pool.ping()

    def list_containers(self) -> defer.Deferred[list[dict[str, Any]]]:
        return self.container_list.get(lambda: self.pool.call(_Ops.list_containers))

    def inspect(self, name: str) -> defer.Deferred[dict[str, Any]]:
        return self.pool.call(_Ops.inspect, name)

    def status(self, name: str) -> defer.Deferred[dict[str, Any]]:
        # The status text is computed now from the (possibly cached) state.
        info = self.container_list.get(lambda: self.inspect(name), key=("inspect", name))
        return info.addCallback(container_status)

    def run(self, kwargs: dict[str, Any]) -> defer.Deferred[dict[str, Any]]:
        return self._changes(self.pool.call(_Ops.run, kwargs, self.paths, what="image"))

    def act(self, name: str, action: str, **kwargs: Any) -> defer.Deferred[dict[str, Any]]:
        return self._changes(self.pool.call(_Ops.act, name, action, self.paths, **kwargs))

    def logs(self, name: str, tail: int | str) -> defer.Deferred[str]:
        return self.pool.call(_Ops.logs, name, tail)

    def follow_logs(self, name: str, tail: int | str, on_chunk: Callable[[bytes], None]) -> Stream:
        return self.pool.stream(
            lambda client: client.api.logs(name, stdout=True, stderr=True, stream=True, follow=True, tail=tail),
            on_chunk,
        )

    def exec(self, name: str, command: Any, user: str, workdir: str | None) -> defer.Deferred[dict[str, Any]]:
        return self.pool.call(_Ops.exec, name, command, user, workdir)

    def inspect_all(self) -> defer.Deferred[list[dict[str, Any]]]:
        return self.pool.call(_Ops.inspect_all)

    def list_images(self, prefix: str | None) -> defer.Deferred[list[dict[str, Any]]]:
        return self.pool.call(_Ops.list_images, prefix, what="image")

    def tag(self, source: str, repository: str, tag: str | None) -> defer.Deferred[dict[str, Any]]:
        return self.pool.call(_Ops.tag, source, repository, tag, what="image")

    def cleanup(self, all_unused: bool) -> defer.Deferred[dict[str, Any]]:
        return self.pool.call(_Ops.cleanup, all_unused, what="image")

    def image_info(self, reference: str) -> defer.Deferred[dict[str, Any]]:
        return self.pool.call(_Ops.image_info, reference, what="image")

    def login(self, registry: str, username: str, password: str) -> defer.Deferred[dict[str, Any]]:
        return self.pool.call(_Ops.login, registry, username, password, what="registry", secrets=(password,))

    def pull(
        self, repository: str, tag: str | None, auth: dict[str, str] | None, on_line: Callable[[dict[str, Any]], None]
    ) -> Stream:
        """Pull, delivering Docker's progress lines; ``done`` fails on an error line."""
        secrets = (auth or {}).get("password", "")

        def source(client: Any) -> Iterable[Any]:
            try:
                lines = client.api.pull(repository, tag=tag, stream=True, decode=True, auth_config=auth)
            except docker.errors.APIError as e:
                # Refused before any progress line: the registry's answer.
                explanation = _scrub(_explanation(e), (secrets,))
                if 400 <= (e.status_code or 500) < 500:
                    raise engine_error(e.status_code or 500, explanation, "image") from None
                raise stream_error("pull", explanation) from None
            return _raise_on_error_line(lines, "pull", secrets)

        return self.pool.stream(source, on_line, what="image", secrets=(secrets,))

    def build(self, on_line: Callable[[dict[str, Any]], None], **kwargs: Any) -> Stream:
        """Build (``api.build`` arguments), delivering Docker's progress lines."""

        def source(client: Any) -> Iterable[Any]:
            return _raise_on_error_line(client.api.build(decode=True, rm=True, forcerm=True, **kwargs), "build", "")

        return self.pool.stream(source, on_line, what="image")

    def load(self, feed: TarFeed) -> defer.Deferred[dict[str, Any]]:
        """Stream ``feed``'s tar into ``docker load``; the loaded image names."""

        def load(client: Any) -> dict[str, Any]:
            try:
                lines, error = _stream_errors(client.api.load_image(feed.chunks()))
            except docker.errors.APIError as e:
                if (e.status_code or 500) >= 500 or e.status_code == 400:
                    raise errors.InvalidInput("docker could not load the image", _explanation(e)) from None
                raise
            if error is not None:
                raise errors.InvalidInput("docker could not load the image", error)
            loaded = []
            for line in lines:
                text = line.get("stream", "")
                for prefix in ("Loaded image: ", "Loaded image ID: "):
                    if text.startswith(prefix):
                        loaded.append(text[len(prefix):].strip())
            return {"success": True, "images": loaded, "bytes": feed.total}

        return self.pool.call(load, what="image")


def _raise_on_error_line(lines: Iterable[dict[str, Any]], kind: str, secret: str) -> Iterator[dict[str, Any]]:
    """
    Docker reports build and pull failures as a line of the stream: raise
    it, but only once Docker has ended the stream. Hanging up earlier
    cancels the build before Docker removes the failed step's container.
    """
    error = None
    for line in lines:
        if isinstance(line, dict) and ("error" in line or "errorDetail" in line):
            message = line.get("error") or (line.get("errorDetail") or {}).get("message") or "failed"
            error = error or stream_error(kind, _scrub(str(message), (secret,)))
            continue
        yield line
    if error is not None:
        raise error


def stream_error(kind: str, message: str) -> errors.PlexError:
    lowered = message.lower()
    if kind == "build":
        return errors.InvalidInput("the build failed", message)
    if any(word in lowered for word in ("unauthorized", "authentication required", "denied", "no basic auth")):
        return errors.Forbidden("the registry refused the credentials", message)
    if "not found" in lowered or "manifest unknown" in lowered:
        return errors.NotFound("image not found", message)
    return errors.UpstreamFailed("the pull failed", message)
