"""
The one interface to systemd: ``systemctl`` run through ``programs`` (the
process API), never a shell and never D-Bus from the reactor thread.

"systemd not available" (``Unavailable``) covers both a host without
``systemctl`` and one whose init system is not systemd (containers, where
``systemctl`` exists but cannot operate).
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, Sequence

from plexagent import errors
from plexagent.host import processes
from plexagent.host.programs import Programs

SYSTEMD_UNAVAILABLE = "systemd not available"

# What systemctl says when the host is not running systemd.
_NOT_UNDER_SYSTEMD = (
    "not been booted with systemd",
    "failed to connect to bus",
    "systemd is not running",
)

_PROPERTIES = "LoadState,ActiveState,SubState,UnitFileState,ActiveEnterTimestamp"


def _first_line(data: bytes) -> str:
    text = data.decode("utf-8", "replace").strip()
    return text.splitlines()[0][:500] if text else ""


def parse_properties(output: bytes) -> dict[str, str]:
    """``systemctl show``'s ``Key=Value`` lines."""
    props: dict[str, str] = {}
    for line in output.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            props[key.strip()] = value.strip()
    return props


def parse_timestamp(text: str) -> float | None:
    """systemd's ``Mon 2026-11-23 15:00:00 UTC`` (we run systemctl with TZ=UTC) as epoch seconds."""
    parts = text.split()
    if len(parts) < 3:
        return None
    try:
        moment = _dt.datetime.strptime(f"{parts[1]} {parts[2]}", "%Y-%m-%d %H:%M:%S")
    except ValueError:
        return None
    return moment.replace(tzinfo=_dt.timezone.utc).timestamp()


class Systemd:
    """``systemctl`` for unit status, restart and reload."""

    def __init__(self, programs: Programs, command: Sequence[str] = ("systemctl",)) -> None:
        self.programs = programs
        self.command = tuple(command)

    async def _systemctl(self, *args: str) -> processes.ProcessResult:
        try:
            result = await self.programs.run([*self.command, *args])
        except processes.ProcessTimedOut as e:
            raise errors.Unavailable(SYSTEMD_UNAVAILABLE, f"systemctl did not answer: {e.details}") from None
        except errors.Unavailable:
            raise errors.Unavailable(
                SYSTEMD_UNAVAILABLE, f"{self.command[0]} is not installed or not on the agent's PATH"
            ) from None
        said = (result.stderr + result.stdout).decode("utf-8", "replace").lower()
        if any(marker in said for marker in _NOT_UNDER_SYSTEMD):
            raise errors.Unavailable(SYSTEMD_UNAVAILABLE, "this host does not run systemd as its init system")
        return result

    async def available(self) -> bool:
        """Whether systemd manages this host (never fails)."""
        try:
            result = await self._systemctl("is-system-running")
        except errors.Unavailable:
            return False
        # "offline" is what systemctl answers outside a systemd-booted system.
        return result.stdout.strip() != b"offline"

    async def status(self, unit: str, now: float) -> dict[str, Any]:
        """``{active, enabled, uptime, state}`` of ``unit``; ``uptime`` in seconds at ``now``."""
        result = await self._systemctl("show", unit, f"--property={_PROPERTIES}")
        if result.exit_code != 0:
            raise errors.UpstreamFailed("systemctl failed", _first_line(result.stderr) or f"exit code {result.exit_code}")
        props = parse_properties(result.stdout)
        if props.get("LoadState") == "not-found":
            raise errors.NotFound("service not found", f"systemd has no unit named {unit}")
        active = props.get("ActiveState") in ("active", "reloading")
        uptime = 0
        since = parse_timestamp(props.get("ActiveEnterTimestamp", ""))
        if active and since is not None:
            uptime = max(0, int(now - since))
        return {
            "active": active,
            "enabled": props.get("UnitFileState", "").startswith("enabled"),
            "uptime": uptime,
            "state": props.get("ActiveState", ""),
            "sub_state": props.get("SubState", ""),
        }

    async def _act(self, verb: str, unit: str, no_block: bool = False) -> None:
        args = [verb, *(["--no-block"] if no_block else []), unit]
        result = await self._systemctl(*args)
        if result.exit_code != 0:
            message = _first_line(result.stderr) or f"exit code {result.exit_code}"
            if "not found" in message.lower() or "not loaded" in message.lower():
                raise errors.NotFound("service not found", message)
            raise errors.UpstreamFailed(f"{verb} failed", message)

    async def restart(self, unit: str, no_block: bool = False) -> None:
        await self._act("restart", unit, no_block)

    async def reload(self, unit: str) -> None:
        await self._act("reload", unit)

    async def has_unit(self, unit: str) -> bool:
        """Whether systemd knows ``unit`` (raises ``Unavailable`` without systemd)."""
        result = await self._systemctl("show", unit, "--property=LoadState")
        return result.exit_code == 0 and parse_properties(result.stdout).get("LoadState") not in (None, "not-found")
