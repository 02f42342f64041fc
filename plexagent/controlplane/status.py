"""
The agent's control-plane status (``GET /plexagent/status`` on the Unix
socket, ``plexagent status``): which protocol, node and signing keys are in
use, and how the link is doing. Nothing in it is secret: ids, public-key
fingerprints, times, counts, and the URL without credentials.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from plexagent.node.reports import rfc3339


def public_url(url: str) -> str:
    """``url`` without any user or password in it."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _time(seconds: float | None) -> str | None:
    return rfc3339(seconds) if seconds is not None else None


def status_document(config: Any, link: Any, version: str) -> dict[str, Any]:
    """The status of an agent with ``config`` and control-plane ``link`` (None when standalone)."""
    cp = config.control_plane
    doc: dict[str, Any] = {
        "agent_version": version,
        "control_plane": {"configured": bool(cp.url), "url": public_url(cp.url), "protocol": cp.protocol},
    }
    if link is None:
        doc["identity"] = {"state": "standalone", "node_id": None, "source": None, "enrolled_at": None, "error": None}
        return doc
    identity = link.identity
    enrollment = link.enrollment
    doc["identity"] = {
        "state": link.identity_state,
        "node_id": identity.node_id if identity is not None else None,
        "source": identity.source if identity is not None else None,
        "enrolled_at": (identity.enrolled_at or None) if identity is not None else None,
        "error": link.identity_error,
    }
    if enrollment is not None:
        doc["identity"]["enrollment_attempts"] = dict(enrollment.attempts)
    if link.reenrollments or link.node_key_rotations:
        doc["identity"]["reenrollments"] = link.reenrollments
        doc["identity"]["node_key_rotations"] = link.node_key_rotations
    keys = link.ring.keys
    doc["signing_keys"] = {
        "current": keys.current.label if keys.current is not None else None,
        "previous": keys.previous.label if keys.previous is not None else None,
        "previous_until": _time(keys.transition_expires_ns / 1e9) if keys.transition_expires_ns is not None
        and keys.previous is not None else None,
        "rotations": sum(link.ring.rotations.values()),
        "refused": link.ring.refused,
    }
    sync, stream, heartbeat, outbox = link.sync, link.stream, link.heartbeat, link.outbox
    doc["state"] = {
        "last_fetch": _time(sync.last_success) if sync is not None else None,
        "fetch_failures": sync.failures if sync is not None else 0,
    }
    if stream is None:
        stream_state = "off" if not cp.events else "not started"
    else:
        stream_state = ("stopped until restart" if stream.given_up else "connected" if stream.connected
                        else "reconnecting" if stream.started else "not started")
    doc["events"] = {
        "stream": stream_state,
        "last_event": _time(stream.last_event_at) if stream is not None else None,
        "applied": sum(stream.applied.values()) if stream is not None else 0,
        "dropped": {reason.value: n for reason, n in sorted(stream.dropped.items(), key=lambda i: i[0].value)}
        if stream is not None else {},
    }
    doc["heartbeat"] = {
        "last_success": _time(heartbeat.last_success) if heartbeat is not None else None,
        "failures": heartbeat.failures if heartbeat is not None else 0,
    }
    doc["auth_failures"] = dict(link.auth_failures)
    doc["reports"] = {
        # Before the node has an identity nothing is sent, so nothing is counted.
        "pending": outbox.depth if outbox is not None else None,
        "refused": outbox.refused if outbox is not None else 0,
    }
    return doc
