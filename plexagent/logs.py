"""
Structured logs: one JSON object a line, for journald and log shippers.

Use it as twistd's initial observer::

    twistd -n --pidfile= --logger=plexagent.logs.json_observer plexagent --config FILE

Each line has ``time``, ``level``, ``namespace``, ``message`` and, for
requests, ``request_id``, ``listener``, ``method``, ``route``, ``status``
and ``duration_ms``. Only fields named here are copied from an event, so a
value attached to an event for another purpose never reaches the log.
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import IO, Any

from twisted.logger import ILogObserver, formatEvent
from zope.interface import implementer

#: Event fields that become JSON fields (besides time, level, namespace, message).
FIELDS = ("request_id", "listener", "method", "route", "status", "duration_ms", "system")


@implementer(ILogObserver)
class JSONLineObserver:
    """Writes each event as one JSON line to ``out``."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def __call__(self, event: dict[str, Any]) -> None:
        when = event.get("log_time")
        record: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(when, datetime.timezone.utc).isoformat(timespec="milliseconds")
            if when is not None
            else None,
            "level": getattr(event.get("log_level"), "name", "info"),
            "namespace": event.get("log_namespace", ""),
            "message": formatEvent(event),
        }
        for field in FIELDS:
            if field in event:
                record[field] = event[field]
        failure = event.get("log_failure")
        if failure is not None:
            record["error"] = failure.getErrorMessage()
            record["traceback"] = failure.getTraceback()
        try:
            self._out.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
            self._out.flush()
        except (OSError, ValueError):
            pass


def json_observer() -> JSONLineObserver:
    """The factory twistd's ``--logger`` calls: JSON lines on standard output."""
    return JSONLineObserver(sys.stdout)
