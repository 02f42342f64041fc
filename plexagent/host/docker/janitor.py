"""
Disk hygiene: ``ImageHygiene`` (disk usage and image cleanups that never
remove what the agent's other parts use) and ``AutoCleanup`` (the
``[docker.cleanup]`` service that runs a cleanup when Docker's data root
fills past a threshold).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from plexagent.host.docker.cleanup import CleanupOptions, run_cleanup
from plexagent.host.docker.disk import data_root, disk_usage

log = Logger()

#: ``() -> {image reference or ID: why it must stay}``
Protection = Callable[[], dict[str, str]]


class ImageHygiene:
    """
    Disk usage and image cleanups on the Docker pool. Each cleanup keeps
    the images any container uses and those the ``protections`` name
    (the cron jobs' images, the rollback targets of replaced containers).
    """

    def __init__(self, pool: Any, protections: list[Protection] | None = None) -> None:
        self.pool = pool
        self.protections: list[Protection] = list(protections or [])

    def disk_usage(self) -> defer.Deferred[dict[str, Any]]:
        return self.pool.call(disk_usage, what="image")

    def data_root(self) -> defer.Deferred[dict[str, Any]]:
        return self.pool.call(data_root, what="image")

    def protected(self) -> dict[str, str]:
        """Every reference or ID the protections name now, with why."""
        found: dict[str, str] = {}
        for protection in self.protections:
            for reference, why in protection().items():
                found.setdefault(reference, why)
        return found

    def cleanup(self, options: CleanupOptions, background: bool = False) -> defer.Deferred[dict[str, Any]]:
        """Plan and (unless ``options.dry_run``) run a cleanup; what it removed and kept."""
        call = self.pool.background_call if background else self.pool.call
        return call(run_cleanup, options, self.protected(), what="image")


class AutoCleanup(service.Service):
    """
    Every ``interval`` seconds (on ``clock``; the first check once the
    reactor runs), measure the file system of Docker's data root; when it
    is at least ``threshold_percent`` full, run ``options``' cleanup. Each
    run is logged and counted (``runs``, ``images_removed``,
    ``bytes_reclaimed``, ``failures``).
    """

    def __init__(self, hygiene: ImageHygiene, clock: Any, threshold_percent: float, interval: float,
                 options: CleanupOptions) -> None:
        self.setName("image-cleanup")
        self.hygiene = hygiene
        self.clock = clock
        self.threshold_percent = threshold_percent
        self.interval = interval
        self.options = options
        self.runs = 0
        self.images_removed = 0
        self.bytes_reclaimed = 0
        self.failures = 0
        self.checks = 0
        self._loop: task.LoopingCall | None = None
        self._timer: Any = None
        self._unseen_warned = False
        #: Deferreds fired after each check (tests)
        self._waiting: list[defer.Deferred[None]] = []

    def startService(self) -> None:
        super().startService()
        # Once the reactor runs: a start that fails later leaves no call behind.
        self._timer = self.clock.callLater(0, self._start_loop)

    def _start_loop(self) -> None:
        self._timer = None
        self._loop = task.LoopingCall(lambda: defer.ensureDeferred(self.check()))
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    def stopService(self) -> Any:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def next_check(self) -> defer.Deferred[None]:
        """Fires once the next check (and its run, if any) has ended."""
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(d)
        return d

    async def check(self) -> None:
        """Measure the data root and clean up when it is over the threshold; never fails."""
        try:
            await self._check()
        finally:
            self.checks += 1
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    async def _check(self) -> None:
        try:
            usage = await self.hygiene.data_root()
        except Exception as e:  # noqa: BLE001 - Docker unreachable or failing: try at the next interval
            log.warn("automatic image cleanup: cannot measure Docker's data root: {why}", why=_why(e))
            return
        if not usage.get("available"):
            if not self._unseen_warned:
                self._unseen_warned = True
                log.warn("automatic image cleanup cannot run: {reason}", reason=usage.get("reason"))
            return
        percent = float(usage["percent"])
        if percent < self.threshold_percent:
            return
        self.runs += 1
        try:
            result = await self.hygiene.cleanup(self.options, background=True)
        except Exception as e:  # noqa: BLE001 - counted and logged; the next interval tries again
            self.failures += 1
            log.error("automatic image cleanup failed ({path} {percent}% full): {why}",
                      path=usage["path"], percent=percent, why=_why(e))
            return
        self.images_removed += int(result.get("removed", 0))
        self.bytes_reclaimed += int(result.get("space_reclaimed", 0))
        log.info(
            "automatic image cleanup: {path} was {percent}% full (threshold {threshold}%): removed {removed} "
            "images, untagged {untagged} references, reclaimed {reclaimed} bytes, kept {skipped} in use",
            path=usage["path"], percent=percent, threshold=self.threshold_percent, removed=result.get("removed", 0),
            untagged=len(result.get("untagged", [])), reclaimed=result.get("space_reclaimed", 0),
            skipped=len(result.get("skipped", [])),
        )


def _why(error: Exception) -> str:
    message = getattr(error, "message", None) or str(error) or type(error).__name__
    details = getattr(error, "details", None)
    return f"{message}: {details}" if details else message
