"""
Service control (seed "Service Control"): status and restart of the units
named in ``agent_api.allowed_services``, through ``systemd.Systemd``.

Restarting the agent's own unit is deferred until the answer has gone out:
``restart`` returns at once and asks systemd only after ``answered`` fires
and ``self_restart_delay`` has passed on the injected clock.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from twisted.internet import defer
from twisted.logger import Logger

from plexagent import errors
from plexagent.host.systemd import Systemd

log = Logger()

_UNIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9:_.@-]{0,255}")


class ServiceControl:
    """Allowed units only; everything else is ``Forbidden``."""

    def __init__(
        self,
        systemd: Systemd,
        allowed: Sequence[str],
        agent_service: str,
        clock: Any,
        self_restart_delay: float = 1.0,
    ) -> None:
        self.systemd = systemd
        self.allowed = tuple(allowed)
        self.agent_service = agent_service
        self.clock = clock
        self.self_restart_delay = self_restart_delay
        #: fires when the last scheduled restart of the agent itself was asked for
        self.self_restart: defer.Deferred[None] | None = None

    def check(self, name: str) -> str:
        if not _UNIT_NAME.fullmatch(name) or name not in self.allowed:
            raise errors.Forbidden(
                "service not allowed", f"only these services can be controlled: {', '.join(self.allowed)}"
            )
        return name

    async def status(self, name: str) -> dict[str, Any]:
        self.check(name)
        state = await self.systemd.status(name, self.clock.seconds())
        return {"service": name, **state}

    async def restart(self, name: str, answered: defer.Deferred[Any] | None = None) -> dict[str, Any]:
        """Restart ``name``; for the agent's own unit, only after ``answered``."""
        self.check(name)
        if name == self.agent_service:
            # Fail now (503/404) rather than promise a restart that cannot happen.
            await self.systemd.status(name, self.clock.seconds())
            self._schedule_self_restart(answered)
            return {
                "success": True,
                "service": name,
                "restarting": True,
                "message": "the agent restarts once this answer has been sent",
            }
        await self.systemd.restart(name)
        state = await self.systemd.status(name, self.clock.seconds())
        return {"success": True, "service": name, **state}

    def _schedule_self_restart(self, answered: defer.Deferred[Any] | None) -> None:
        done: defer.Deferred[None] = defer.Deferred()
        self.self_restart = done

        def ask(_: Any = None) -> None:
            d = defer.ensureDeferred(self.systemd.restart(self.agent_service, no_block=True))
            d.addErrback(lambda f: log.failure("restarting {unit} failed", f, unit=self.agent_service))
            d.addBoth(lambda _: done.callback(None))

        def later(_: Any = None) -> None:
            self.clock.callLater(self.self_restart_delay, ask)

        if answered is None:
            later()
        else:
            # Whether the answer was delivered or the client went away.
            answered.addBoth(later)
