"""
The node state cache (metadata, data entries, secret index) and its
persistence under ``node.data_dir``.

A NodeState is an immutable snapshot; the cache swaps whole snapshots, so a
reader never sees half of one state and half of another.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import attrs
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from plexagent import errors
from plexagent.fileio import (
    Unencodable,
    atomic_write,
    decode_json,
    encode_json,
    ensure_private_dir,
    read_stored,
    set_aside,
)

log = Logger()

#: The most state.json may hold (the control plane's answers are bounded alike).
STATE_MAX_BYTES = 256 << 20


class InvalidState(ValueError):
    """A state document from the control plane or the disk has a bad shape."""


def _check_entry(entry: Any, where: str) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise InvalidState(f"{where}: must be an object")
    key = entry.get("key")
    if not isinstance(key, str) or not key:
        raise InvalidState(f"{where}.key: must be a non-empty string")
    version = entry.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise InvalidState(f"{where}.version: must be an integer")
    return entry


def parse_data_entries(raw: Any) -> dict[str, dict[str, Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, list):
        raise InvalidState("data: must be a list")
    out = {}
    for i, entry in enumerate(raw):
        entry = _check_entry(entry, f"data[{i}]")
        content_type = entry.get("content_type", "")
        updated_at = entry.get("updated_at", "")
        if not isinstance(content_type, str) or not isinstance(updated_at, str):
            raise InvalidState(f"data[{i}]: content_type and updated_at must be strings")
        out[entry["key"]] = {
            "key": entry["key"],
            "content_type": content_type,
            "payload": entry.get("payload"),
            "version": entry["version"],
            "updated_at": updated_at,
        }
    return out


def parse_secret_refs(raw: Any) -> dict[str, int]:
    if raw is None:
        return {}
    if not isinstance(raw, list):
        raise InvalidState("secret_refs: must be a list")
    out = {}
    for i, ref in enumerate(raw):
        ref = _check_entry(ref, f"secret_refs[{i}]")
        out[ref["key"]] = ref["version"]
    return out


def parse_metadata(raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidState("metadata: must be an object")
    for key, value in raw.items():
        if not isinstance(value, str):
            raise InvalidState(f"metadata.{key}: must be a string")
    return dict(raw)


@attrs.frozen
class NodeState:
    """One consistent snapshot of what the control plane says about the node."""

    metadata: Mapping[str, str] = attrs.field(factory=dict)
    data: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    secret_refs: Mapping[str, int] = attrs.field(factory=dict)

    @classmethod
    def from_document(cls, doc: Any) -> "NodeState":
        """Parse a control-plane state document; unknown fields are ignored."""
        if not isinstance(doc, dict):
            raise InvalidState("state: must be an object")
        return cls(
            metadata=parse_metadata(doc.get("metadata")),
            data=parse_data_entries(doc.get("data")),
            secret_refs=parse_secret_refs(doc.get("secret_refs")),
        )

    def to_document(self) -> dict[str, Any]:
        return {
            "metadata": dict(self.metadata),
            "data": [dict(self.data[k]) for k in sorted(self.data)],
            "secret_refs": [
                {"key": k, "version": self.secret_refs[k]} for k in sorted(self.secret_refs)
            ],
        }

    def data_summaries(self) -> list[dict[str, Any]]:
        return [
            {"key": k, "version": e["version"], "content_type": e["content_type"]}
            for k, e in sorted(self.data.items())
        ]

    def secret_summaries(self) -> list[dict[str, Any]]:
        return [{"key": k, "version": v} for k, v in sorted(self.secret_refs.items())]


class StateCache:
    """
    The current NodeState, served from memory and persisted to
    ``<data_dir>/state.json`` (0600, in a 0700 directory).

    ``replace`` swaps the snapshot at once and writes it in a thread;
    ``update`` replaces only some parts (as events do).
    """

    FILENAME = "state.json"

    def __init__(
        self,
        data_dir: str,
        run_in_thread: Callable[..., defer.Deferred[Any]] = threads.deferToThread,
    ) -> None:
        self._dir = data_dir
        self._path = os.path.join(data_dir, self.FILENAME)
        self._run_in_thread = run_in_thread
        self.current = NodeState()
        #: ``current`` as written to disk (encoded once, when it is set)
        self._encoded = b""
        self._write_lock = defer.DeferredLock()
        self._listeners: list[Callable[[NodeState], None]] = []

    def load(self) -> None:
        """
        Load the persisted snapshot (at start; a missing file is empty
        state). One that cannot be loaded is set aside: the control plane is
        the source of truth, and the next fetch fills the cache again.
        """
        ensure_private_dir(self._dir)
        self.current = NodeState()
        self._encoded = encode_json(self.current.to_document())
        try:
            state = NodeState.from_document(decode_json(read_stored(self._path, STATE_MAX_BYTES)))
            self._encoded = encode_json(state.to_document())
            self.current = state
        except FileNotFoundError:
            pass
        except (OSError, ValueError, RecursionError) as e:
            set_aside(self._path, f"unreadable state cache ({e}): empty until the next fetch from the control plane")

    def subscribe(self, listener: Callable[[NodeState], None]) -> None:
        self._listeners.append(listener)

    def replace(self, state: NodeState) -> defer.Deferred[None]:
        """
        Serve ``state`` from now on and persist it durably. A state that
        cannot be stored or served as JSON (NaN, a lone surrogate) is
        ``InvalidState``, and the cache keeps the state it had.
        """
        try:
            encoded = encode_json(state.to_document())
        except Unencodable as e:
            where = e.where.removeprefix("value.")
            raise InvalidState(f"{where}: {e.why}") from None
        self.current = state
        self._encoded = encoded
        for listener in self._listeners:
            listener(state)
        return self._persist()

    def update(self, **changes: Any) -> defer.Deferred[None]:
        return self.replace(attrs.evolve(self.current, **changes))

    def idle(self) -> defer.Deferred[None]:
        """Fires once every write started so far has ended (for a clean stop)."""
        return self._write_lock.run(defer.succeed, None)

    def _persist(self) -> defer.Deferred[None]:
        def write() -> defer.Deferred[None]:
            # Write the snapshot that is current when the write starts:
            # concurrent replaces coalesce into the newest one.
            return self._run_in_thread(atomic_write, self._path, self._encoded)

        written = self._write_lock.run(write)

        def failed(f: Any) -> None:
            f.trap(errors.PlexError)
            log.error("could not persist node state: {details}", details=f.value.details)

        written.addErrback(failed)
        # What callers get may be cancelled (a fetch cancelled at stop is
        # chained to it); the write must not be: cancelling the thread's
        # Deferred would release the lock while the thread still writes, and
        # the next write (or the stop) would not wait for it.
        result: defer.Deferred[None] = defer.Deferred()

        def done(outcome: Any) -> None:
            if result.called:
                return  # cancelled meanwhile
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(None)

        written.addBoth(done)
        return result
