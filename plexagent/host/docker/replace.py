"""
Replace a container by one made from another image, and roll back by
itself when the new one is not healthy (``POST /containers/<n>/replace``,
``/rollback``).

The steps, each journaled (``replacejournal``) before the next Docker call:

1. ``prepared``: the old container's configuration is read, the new
   image pulled if missing, the new container's body made (binds checked).
2. ``aside``: the old container loses its restart policy (so Docker does
   not start it again) and is renamed ``<name>.plexagent-old-<token>``.
3. ``created``: the new container is created under the name.
4. ``old_stopped``, 5. ``new_started``: old stopped, then new started
   (they cannot publish the same host port at once: this is not
   zero-downtime).
6. ``healthy``: its Docker health check says healthy, or, without one, it
   kept running without a restart for ``docker.replace_stable_time``.
   Then the old container is removed (its image stays: the rollback
   target) and the journal keeps the old configuration for a rollback.

Not healthy within ``health_timeout`` (or any failure before step 6): the
new container is removed, the old one gets its name and restart policy
back and is started again if it ran; the answer is a 409 with the new
container's last log lines.

Why the old container is renamed aside and the new one created under the
name (rather than the new one under a temporary name, renamed at the
end): the new container has its name, and so its DNS name on its
networks, from its first start, during the health check too; and if the
agent never comes back, what Docker restarts after a reboot is the new
container under the right name (the old one has no restart policy).
Crash safety does not depend on names: the journal holds the old
container's ID (a rename keeps it) and the new one carries the replace's
token as a label, so a restarted agent finds both whatever they are
called. Until ``healthy`` is journaled it rolls back; from then on it
completes. Each step may run twice. Either way the name ends on exactly
one container, running.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from plexagent import errors
from plexagent.host.docker import replaceops as ops
from plexagent.host.docker.replacejournal import FORWARD, ReplaceJournal, ReplaceRecord, RollbackTarget
from plexagent.host.files.paths import PathPolicy

log = Logger()


class _Unhealthy(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _why(error: BaseException) -> str:
    if isinstance(error, errors.PlexError):
        return error.message + (f": {error.details}" if isinstance(error.details, str) and error.details else "")
    return str(error) or type(error).__name__


class Replacer(service.Service):
    """
    Container replaces and rollbacks, one at a time per container name,
    journaled in ``journal``; at start, the replaces a previous run left
    unfinished are completed or rolled back (retried while Docker does not
    answer, every ``retry`` seconds doubling up to ``max_retry``).
    """

    def __init__(self, pool: Any, journal: ReplaceJournal, policy: PathPolicy, clock: Any,
                 stable_time: float = 10.0, poll_interval: float = 0.25, retry: float = 1.0,
                 max_retry: float = 30.0, on_change: Any = None) -> None:
        self.setName("container-replace")
        self.pool = pool
        self.journal = journal
        self.policy = policy
        self.clock = clock
        self.stable_time = stable_time
        self.poll_interval = poll_interval
        self.retry = retry
        self.max_retry = max_retry
        self._delay = retry
        self._on_change = on_change or (lambda: None)
        #: container name -> what is being done to it (replace, rollback, recovery)
        self.busy: dict[str, str] = {}
        self._timer: Any = None
        self._pauses: set[defer.Deferred[None]] = set()
        self._recovered: list[defer.Deferred[None]] = []

    # -- service -----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.journal.load()
        if self.journal.active:
            for name in self.journal.active:
                self.busy[name] = "recovery"
            self._timer = self.clock.callLater(0, self._recover_all)

    def stopService(self) -> Any:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for d in list(self._pauses):
            d.cancel()

    def recovered(self) -> defer.Deferred[None]:
        """Fires once no unfinished replace of an earlier run is left."""
        if not self.journal.active:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._recovered.append(d)
        return d

    def protected(self) -> dict[str, str]:
        """The images cleanups must keep: rollback targets and the images of replaces in progress."""
        found = {target.image_id: f"kept for the rollback of container {name}"
                 for name, target in self.journal.history.items()}
        for name, record in self.journal.active.items():
            found.setdefault(record.old_image_id, f"used by the replace of container {name}")
            found.setdefault(record.new_image, f"used by the replace of container {name}")
        return found

    # -- the operations ------------------------------------------------------

    async def replace(self, ref: str, image: str, environment: dict[str, str] | None,
                      health_timeout: float, stop_timeout: int) -> dict[str, Any]:
        """Replace container ``ref`` by one made from ``image``; see the module's docstring."""
        return await self._run("replace", ref, image, environment, health_timeout, stop_timeout)

    async def rollback(self, ref: str, health_timeout: float, stop_timeout: int) -> dict[str, Any]:
        """Go back to the configuration and image container ``ref`` had before its last replace."""
        return await self._run("rollback", ref, None, None, health_timeout, stop_timeout)

    async def _run(self, kind: str, ref: str, image: str | None, environment: dict[str, str] | None,
                   health_timeout: float, stop_timeout: int) -> dict[str, Any]:
        info = await self.pool.call(lambda client: client.api.inspect_container(ref))
        name = str(info["Name"]).lstrip("/")
        if name in self.busy:
            raise errors.Conflict("a replace is in progress",
                                  f"container {name} is in a {self.busy[name]} already; wait for it to end")
        self.busy[name] = kind
        try:
            target = None
            if kind == "rollback":
                target = self.journal.history.get(name)
                if target is None:
                    raise errors.Conflict("nothing to roll back",
                                          f"container {name} has not been replaced by this agent")
            token = uuid.uuid4().hex
            plan = await self.pool.call(ops.prepare, info["Id"], image, target, environment, self.policy, token,
                                        what="image")
            if not plan["health_check"] and health_timeout < self.stable_time:
                raise errors.InvalidInput(
                    "invalid health_timeout",
                    f"the new container has no health check: it must run {self.stable_time:g} s without a restart "
                    f"(docker.replace_stable_time), so health_timeout must be at least that",
                )
            old = plan["info"]
            record = ReplaceRecord(
                token=token, name=name, kind=kind, phase="prepared", old_id=old["Id"], old_running=plan["running"],
                old_restart_policy=(old.get("HostConfig") or {}).get("RestartPolicy") or {"Name": "no"},
                old_image=plan["old_image"], old_image_id=old["Image"], new_image=plan["new_image"],
                new_body=plan["new_body"], previous_body=plan["previous_body"], stop_timeout=stop_timeout,
                health_timeout=health_timeout, started=self.clock.seconds(),
            )
            return await self._execute(record, plan["new_image_id"])
        finally:
            if self.busy.get(name) == kind:
                self.busy.pop(name)

    async def _step(self, fn: Any, *args: Any) -> Any:
        try:
            return await self.pool.call(fn, *args)
        finally:
            self._on_change()

    async def _execute(self, record: ReplaceRecord, new_image_id: str) -> dict[str, Any]:
        journal = self.journal
        journal.begin(record)
        started = False
        try:
            await self._step(ops.set_aside, record)
            journal.record(record, "aside")
            record.new_id = await self._step(ops.create, record)
            journal.record(record, "created")
            await self._step(ops.stop, record.old_id, record.stop_timeout)
            journal.record(record, "old_stopped")
            started = True
            first = await self._step(ops.start, record.new_id, self.policy)
            journal.record(record, "new_started")
            health = await self._wait_healthy(record, first)
        except (errors.PlexError, _Unhealthy) as e:
            reason = e.reason if isinstance(e, _Unhealthy) else _why(e)
            if isinstance(e, (errors.Unavailable, errors.StorageError, errors.StorageFull)):
                # Docker or the journal failed: the background recovery finishes it.
                raise self._interrupted(record, reason) from None
            try:
                logs = await self._roll_back(record, reason)
            except errors.PlexError as failure:
                raise self._interrupted(record, f"{reason}; rolling back failed too: {_why(failure)}") from None
            if not started and isinstance(e, errors.PlexError):
                raise
            raise errors.Conflict(
                f"{record.kind} failed: the new container was not healthy",
                {"reason": reason, "logs": logs, "container": record.name, "restored": record.old_id,
                 "image": record.new_image},
            ) from None
        target = RollbackTarget(body=record.previous_body, image=record.old_image, image_id=record.old_image_id,
                                container_id=record.new_id, replaced_at=time.time())
        try:
            journal.record(record, "healthy")
            await self._step(ops.remove, record.old_id, False)
            journal.finish(record, target)
        except errors.PlexError as e:
            # The new container is healthy: what is left is done by the recovery.
            raise self._interrupted(record, _why(e)) from None
        log.info("container {name}: {kind} to {image} done, {new} is {health}; {old} removed",
                 name=record.name, kind=record.kind, image=record.new_image, new=record.new_id[:12], health=health,
                 old=record.old_id[:12])
        return {
            "success": True,
            "name": record.name,
            "id": record.new_id,
            "image": record.new_image,
            "image_id": new_image_id,
            "health": health,
            "previous": {"id": record.old_id, "image": record.old_image, "image_id": record.old_image_id},
        }

    def _interrupted(self, record: ReplaceRecord, reason: str) -> errors.PlexError:
        self._retry_later(record.name)
        then = "completes it" if record.phase in FORWARD else "rolls it back"
        return errors.Unavailable(
            f"{record.kind} interrupted",
            f"{reason}; the agent {then} as soon as Docker and its data directory allow, and the container's "
            "name is busy until then",
        )

    async def _roll_back(self, record: ReplaceRecord, reason: str) -> str:
        record.reason = reason
        self.journal.record(record, "rolling_back")
        try:
            logs = await self.pool.call(ops.last_logs, record)
        except errors.PlexError:
            logs = ""
        outcome = await self._step(ops.undo, record, self.policy)
        self.journal.finish(record, None)
        log.warn("container {name}: {kind} to {image} rolled back ({reason}); {outcome}",
                 name=record.name, kind=record.kind, image=record.new_image, reason=reason, outcome=outcome)
        return logs

    async def _pause(self) -> None:
        d = task.deferLater(self.clock, self.poll_interval, lambda: None)
        self._pauses.add(d)
        try:
            await d
        finally:
            self._pauses.discard(d)

    async def _wait_healthy(self, record: ReplaceRecord, first: dict[str, Any]) -> str:
        """"healthy" (its health check) or "running" (no health check, stable); ``_Unhealthy`` otherwise."""
        assert record.new_id is not None
        began = self.clock.seconds()
        deadline = began + record.health_timeout
        restarts = None
        while True:
            state = await self.pool.call(ops.state, record.new_id)
            if restarts is None:
                restarts = state.get("RestartCount", 0)
            if state.get("Restarting") or state.get("RestartCount", 0) != restarts:
                raise _Unhealthy("it restarted (its process exited)")
            if not state.get("Running"):
                raise _Unhealthy(f"it exited with code {state.get('ExitCode')}"
                                 + (" (out of memory)" if state.get("OOMKilled") else ""))
            health = state.get("Health")
            if health is not None:
                status = health.get("Status")
                if status == "healthy":
                    return "healthy"
                if status == "unhealthy":
                    last = (health.get("Log") or [{}])[-1]
                    raise _Unhealthy(f"its health check failed: {str(last.get('Output', '')).strip()[:500]}")
            elif self.clock.seconds() - began >= self.stable_time:
                return "running"
            if self.clock.seconds() >= deadline:
                what = "its health check did not pass" if health is not None else "it did not run long enough"
                raise _Unhealthy(f"{what} within {record.health_timeout:g} s (health_timeout)")
            await self._pause()

    # -- recovery ------------------------------------------------------------

    def _retry_later(self, name: str) -> None:
        self.busy[name] = "recovery"
        if self.running and (self._timer is None or not self._timer.active()):
            delay, self._delay = self._delay, min(self._delay * 2, self.max_retry)
            self._timer = self.clock.callLater(delay, self._recover_all)

    def _recover_all(self) -> None:
        self._timer = None
        defer.ensureDeferred(self._recover_each())

    async def _recover_each(self) -> None:
        failed = False
        for name, record in list(self.journal.active.items()):
            try:
                outcome = await self._recover(record)
            except Exception as e:  # noqa: BLE001 - logged; retried while it fails
                failed = True
                log.warn("container {name}: cannot finish the {kind} interrupted at {phase} yet: {why}",
                         name=name, kind=record.kind, phase=record.phase, why=_why(e))
                continue
            self.busy.pop(name, None)
            log.warn("container {name}: the {kind} interrupted at {phase} was {outcome}",
                     name=name, kind=record.kind, phase=record.phase, outcome=outcome)
        if failed:
            if self.running:
                delay, self._delay = self._delay, min(self._delay * 2, self.max_retry)
                self._timer = self.clock.callLater(delay, self._recover_all)
            return
        self._delay = self.retry
        waiting, self._recovered = self._recovered, []
        for d in waiting:
            d.callback(None)

    async def _recover(self, record: ReplaceRecord) -> str:
        if record.phase in FORWARD:
            if await self._step(ops.complete, record, self.policy):
                assert record.new_id is not None
                target = RollbackTarget(body=record.previous_body, image=record.old_image,
                                        image_id=record.old_image_id, container_id=record.new_id,
                                        replaced_at=time.time())
                self.journal.finish(record, target)
                return f"completed: {record.new_id[:12]} runs {record.new_image}"
        outcome = await self._step(ops.undo, record, self.policy)
        self.journal.finish(record, None)
        return f"rolled back: {outcome}"
