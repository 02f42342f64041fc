"""
The agent's logs.

Structured logs: one JSON object a line, for journald and log shippers.
Use it as twistd's initial observer::

    twistd -n --pidfile= --logger=plexagent.logs.json_observer plexagent --config FILE

Each line has ``time``, ``level``, ``namespace``, ``message`` and, for
requests, ``request_id``, ``listener``, ``method``, ``route``, ``status``
and ``duration_ms``; a failure adds ``error`` and ``traceback``. Only fields
named here are copied from an event, so a value attached to an event for
another purpose never reaches the log.

Without ``--logger``, twistd's text log is kept, with each failure on one
line (``message: Type: text``); its traceback is written only for
debug-level events (``OneLineFailures``).
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import IO, Any

from twisted.logger import ILogObserver, LogLevel, formatEvent
from twisted.python.failure import Failure
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


def describe(error: Failure | BaseException) -> str:
    """
    A failure as one line, ``Type: message`` (never a Failure's repr):
    twisted.web's wrappers (ResponseFailed and kin) are unwrapped into the
    failures they carry.
    """
    value = error.value if isinstance(error, Failure) else error
    reasons = getattr(value, "reasons", None)
    if isinstance(reasons, list) and reasons:
        return "; ".join(dict.fromkeys(describe(reason) for reason in reasons))
    name = type(value).__name__
    text = " ".join(str(value).split())
    return f"{name}: {text}" if text else name


@implementer(ILogObserver)
class OneLineFailures:
    """
    Passes events on to a text observer, with each failure rendered as one
    line, ``message: Type: text``, instead of a traceback (kept for
    debug-level events).
    """

    def __init__(self, observer: Any) -> None:
        self.observer = observer

    def __call__(self, event: dict[str, Any]) -> None:
        failure = event.get("log_failure")
        legacy = failure is None and bool(event.get("isError")) and isinstance(event.get("failure"), Failure)
        if legacy:
            # twisted.python.log.err: its text already holds the traceback.
            failure = event["failure"]
        if failure is None or event.get("log_level") == LogLevel.debug:
            self.observer(event)
            return
        line = dict(event)
        line.pop("log_failure", None)
        message = (event.get("why") or "Unhandled Error") if legacy else formatEvent(event)
        message = " ".join(str(message).split()).rstrip(":")
        line["log_format"] = "{plexagent_message}: {plexagent_error}" if message else "{plexagent_error}"
        line["plexagent_message"] = message
        line["plexagent_error"] = describe(failure)
        self.observer(line)
