"""
Docker's documents as the seed's summaries: container and image lists,
status texts as ``docker ps`` prints them, times in ISO 8601.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, Iterable

from twisted.logger import Logger

log = Logger()


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


def stream_errors(lines: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
    collected, error = [], None
    for line in lines:
        collected.append(line)
        if "error" in line or "errorDetail" in line:
            error = line.get("error") or (line.get("errorDetail") or {}).get("message") or "failed"
    return collected, error
