"""
The journal of container replaces, ``<node.data_dir>/container-replace.json``:
each replace (or rollback) in progress with the last step it reached, and,
for each container name, the configuration it had before its last replace
(what ``/containers/<n>/rollback`` goes back to).

Every step is written durably (``fileio.atomic_write``) before the agent
goes on to the next Docker call, so a restarted agent knows where an
interrupted replace stopped. The file is read back as strictly as client
input: a journal that cannot be loaded is set aside
(``fileio.set_aside``) and the agent starts without it.
"""

from __future__ import annotations

import os
import re
from typing import Any

import attrs
from twisted.logger import Logger

from plexagent import errors
from plexagent.fileio import atomic_write, decode_json, encode_json, ensure_private_dir, set_aside

log = Logger()

JOURNAL_FILE = "container-replace.json"

#: The steps of a replace, in order; ``rolling_back`` when it failed.
#: Until ``healthy`` is written a restarted agent rolls back; from then on
#: it completes.
PHASES = ("prepared", "aside", "created", "old_stopped", "new_started", "healthy", "rolling_back")
FORWARD = ("healthy",)

_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,254}")
_ID = re.compile(r"[0-9a-f]{64}")
_TOKEN = re.compile(r"[0-9a-f]{32}")
_IMAGE_ID = re.compile(r"sha256:[0-9a-f]{64}")


def _check(condition: bool, why: str) -> None:
    if not condition:
        raise ValueError(why)


def _body(value: Any, where: str) -> dict[str, Any]:
    _check(isinstance(value, dict) and isinstance(value.get("config"), dict)
           and isinstance(value["config"].get("Image"), str) and isinstance(value.get("networks"), list),
           f"{where} is not a container configuration")
    return value


@attrs.define
class ReplaceRecord:
    """One replace or rollback in progress."""

    token: str
    name: str
    kind: str  # "replace" or "rollback"
    phase: str
    old_id: str
    old_running: bool
    old_restart_policy: dict[str, Any]
    old_image: str
    old_image_id: str
    new_image: str
    #: the body the new container is created from (``recreate.checked``)
    new_body: dict[str, Any]
    #: the old container's configuration: the rollback target once it succeeded
    previous_body: dict[str, Any]
    stop_timeout: int
    health_timeout: float
    started: float
    new_id: str | None = None
    reason: str | None = None

    @property
    def aside_name(self) -> str:
        """The old container's name while the new one holds ``name``."""
        return f"{self.name}.plexagent-old-{self.token[:8]}"

    def to_record(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_record(cls, record: Any) -> "ReplaceRecord":
        _check(isinstance(record, dict), "an entry is not an object")
        fields = {f.name for f in attrs.fields(cls)}
        _check(set(record) == fields, f"an entry's fields are not {sorted(fields)}")
        _check(isinstance(record["token"], str) and bool(_TOKEN.fullmatch(record["token"])), "bad token")
        _check(isinstance(record["name"], str) and bool(_NAME.fullmatch(record["name"])), "bad container name")
        _check(record["kind"] in ("replace", "rollback"), "bad kind")
        _check(record["phase"] in PHASES, "bad phase")
        for field in ("old_id", "new_id"):
            value = record[field]
            _check((value is None and field == "new_id") or (isinstance(value, str) and bool(_ID.fullmatch(value))),
                   f"bad {field}")
        _check(isinstance(record["old_running"], bool), "bad old_running")
        _check(isinstance(record["old_restart_policy"], dict), "bad old_restart_policy")
        for field in ("old_image", "new_image"):
            _check(isinstance(record[field], str) and 0 < len(record[field]) <= 1024, f"bad {field}")
        _check(isinstance(record["old_image_id"], str) and bool(_IMAGE_ID.fullmatch(record["old_image_id"])),
               "bad old_image_id")
        _body(record["new_body"], "new_body")
        _body(record["previous_body"], "previous_body")
        _check(isinstance(record["stop_timeout"], int) and not isinstance(record["stop_timeout"], bool)
               and 0 <= record["stop_timeout"] <= 3600, "bad stop_timeout")
        for field in ("health_timeout", "started"):
            _check(isinstance(record[field], (int, float)) and not isinstance(record[field], bool)
                   and record[field] >= 0, f"bad {field}")
        _check(record["reason"] is None or isinstance(record["reason"], str), "bad reason")
        return cls(**record)


@attrs.define
class RollbackTarget:
    """What a container was before its last replace."""

    body: dict[str, Any]
    image: str
    image_id: str
    #: the container the replace made (the one a rollback replaces)
    container_id: str
    replaced_at: float

    @classmethod
    def from_record(cls, record: Any) -> "RollbackTarget":
        _check(isinstance(record, dict) and set(record) == {f.name for f in attrs.fields(cls)},
               "a rollback target's fields are wrong")
        _body(record["body"], "body")
        _check(isinstance(record["image"], str) and 0 < len(record["image"]) <= 1024, "bad image")
        _check(isinstance(record["image_id"], str) and bool(_IMAGE_ID.fullmatch(record["image_id"])), "bad image_id")
        _check(isinstance(record["container_id"], str) and bool(_ID.fullmatch(record["container_id"])),
               "bad container_id")
        _check(isinstance(record["replaced_at"], (int, float)) and not isinstance(record["replaced_at"], bool),
               "bad replaced_at")
        return cls(**record)


class ReplaceJournal:
    """The replaces in progress and the rollback targets, by container name, kept durably."""

    def __init__(self, data_dir: str) -> None:
        self.data_dir = data_dir
        self.path = os.path.join(data_dir, JOURNAL_FILE)
        #: container name -> its replace in progress
        self.active: dict[str, ReplaceRecord] = {}
        #: container name -> what it was before its last replace
        self.history: dict[str, RollbackTarget] = {}

    def load(self) -> None:
        """Read the journal back (at start); one that cannot be loaded is set aside."""
        self.active, self.history = {}, {}
        try:
            with open(self.path, "rb") as f:
                document = decode_json(f.read())
            _check(isinstance(document, dict) and document.get("version") == 1
                   and set(document) == {"version", "active", "history"}, "not a version 1 replace journal")
            _check(isinstance(document["active"], list) and isinstance(document["history"], dict),
                   "active must be a list and history an object")
            active = {}
            for entry in document["active"]:
                record = ReplaceRecord.from_record(entry)
                _check(record.name not in active, f"two replaces of {record.name}")
                active[record.name] = record
            history = {}
            for name, entry in document["history"].items():
                _check(bool(_NAME.fullmatch(name)), "bad container name in history")
                history[name] = RollbackTarget.from_record(entry)
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, RecursionError) as e:
            set_aside(self.path, f"cannot read the container replace journal ({e}); replaces it held are "
                                 "neither completed nor rolled back: check the containers it names")
            return
        self.active, self.history = active, history

    def save(self, step: str) -> None:
        """Write the journal durably; ``step`` names what it records (the replace's phase, or ``finished``)."""
        document = {
            "version": 1,
            "active": [record.to_record() for record in self.active.values()],
            "history": {name: attrs.asdict(target) for name, target in sorted(self.history.items())},
        }
        ensure_private_dir(self.data_dir)
        atomic_write(self.path, encode_json(document, indent=1, sort_keys=True))

    def begin(self, record: ReplaceRecord) -> None:
        if record.name in self.active:
            raise errors.Conflict("a replace is in progress",
                                  f"container {record.name} is being replaced or rolled back; wait for it to end")
        self.active[record.name] = record
        try:
            self.save(record.phase)
        except errors.PlexError:
            del self.active[record.name]
            raise

    def record(self, record: ReplaceRecord, phase: str) -> None:
        """Durably note that ``record`` reached ``phase``."""
        record.phase = phase
        self.save(phase)

    def finish(self, record: ReplaceRecord, target: RollbackTarget | None) -> None:
        """The replace ended: forget it, and keep ``target`` (when it succeeded) for a rollback."""
        active, history = dict(self.active), dict(self.history)
        self.active.pop(record.name, None)
        if target is not None:
            self.history[record.name] = target
        try:
            self.save("finished")
        except errors.PlexError:
            # Not on disk: as far as anyone can tell it is not finished.
            self.active, self.history = active, history
            raise
