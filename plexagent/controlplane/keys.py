"""
The control plane's Ed25519 signing keys: the ones in force (``KeyRing``),
how they rotate, and their persistence in ``<data_dir>/signing-keys.json``.

A control plane signs every event with its current key; while a rotation
is under way (until ``transition_expires``) the previous key verifies too.
Keys arrive at enrollment, in state fetches and in ``signing_key_rotated``
events. A key that is not 32 bytes is ignored (Go's verifier would crash on
it); a set whose current key is unusable is refused whole, keeping the keys
in force, so that one bad rotation never makes every later event
unverifiable. A key may come as the 44-byte DER form of an Ed25519 public
key (its SubjectPublicKeyInfo, as plexsphere's documents show it): the last
32 bytes are the key. Where a protocol names its keys (``key_id``), an event
names the key that signed it.
"""

from __future__ import annotations

import collections
import hashlib
import os
from typing import Any, Callable

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from twisted.internet import defer, threads
from twisted.logger import Logger

from plexagent import errors
from plexagent.controlplane.gojson import GoTime, std_b64decode
from plexagent.fileio import atomic_write, decode_json, encode_json, read_stored, set_aside

log = Logger()

#: What precedes the 32 key bytes in the DER SubjectPublicKeyInfo of an Ed25519 key.
ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")


@attrs.frozen
class SigningKey:
    """One Ed25519 public key (32 raw bytes); ``key_id`` where the protocol names keys."""

    raw: bytes
    key_id: str = ""
    _public: Ed25519PublicKey = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_public", Ed25519PublicKey.from_public_bytes(self.raw))

    @classmethod
    def parse(cls, text: str, key_id: str = "") -> "SigningKey | None":
        """
        A key from standard base64 of its 32 bytes or of its 44-byte DER
        form; None for anything else.
        """
        try:
            raw = std_b64decode(text)
        except ValueError:
            return None
        if len(raw) == len(ED25519_SPKI_PREFIX) + 32 and raw.startswith(ED25519_SPKI_PREFIX):
            raw = raw[len(ED25519_SPKI_PREFIX):]
        return cls(raw, key_id) if len(raw) == 32 else None

    @property
    def fingerprint(self) -> str:
        return "sha256:" + hashlib.sha256(self.raw).hexdigest()[:16]

    @property
    def label(self) -> str:
        """How logs, metrics and the status name the key (never secret: it is public)."""
        return self.key_id or self.fingerprint

    @property
    def text(self) -> str:
        import base64

        return base64.b64encode(self.raw).decode("ascii")

    def verifies(self, signature: bytes, message: bytes) -> bool:
        try:
            self._public.verify(signature, message)
        except InvalidSignature:
            return False
        return True


@attrs.frozen
class KeySet:
    """The keys in force: ``current``, and ``previous`` until ``transition_expires_ns``."""

    current: SigningKey | None = None
    previous: SigningKey | None = None
    transition_expires_ns: int | None = None

    @classmethod
    def from_strings(cls, current: str, previous: str = "", expires: GoTime | None = None) -> "KeySet":
        """
        Keys as a control plane writes them (standard base64; "" for none).
        A key that is not base64 of 32 bytes is left out.
        """
        return cls(SigningKey.parse(current) if current else None,
                   SigningKey.parse(previous) if previous else None,
                   expires.unix_ns if expires is not None and not expires.is_zero() else None)

    @property
    def usable(self) -> bool:
        return self.current is not None

    def candidates(self, now_ns: int) -> list[SigningKey]:
        """The keys that verify at ``now_ns``: current first, then previous inside its window."""
        keys = [self.current] if self.current is not None else []
        if (self.previous is not None and self.transition_expires_ns is not None
                and now_ns < self.transition_expires_ns):
            keys.append(self.previous)
        return keys

    def by_id(self, key_id: str, now_ns: int) -> SigningKey | None:
        """
        The candidate named ``key_id`` (protocols whose events name their
        key): the current key by its id, the previous one by its id only
        inside its window. An empty id names no key.
        """
        if not key_id:
            return None
        for key in self.candidates(now_ns):
            if key.key_id == key_id:
                return key
        return None

    def to_document(self) -> dict[str, Any]:
        def one(key: SigningKey | None) -> dict[str, str] | None:
            return None if key is None else {"key": key.text, "key_id": key.key_id}

        return {"current": one(self.current), "previous": one(self.previous),
                "transition_expires_ns": self.transition_expires_ns}

    @classmethod
    def from_document(cls, doc: Any) -> "KeySet":
        """The set ``to_document`` wrote; ValueError if it is not one."""
        if not isinstance(doc, dict):
            raise ValueError("not an object")

        def one(name: str) -> SigningKey | None:
            value = doc.get(name)
            if value is None:
                return None
            if not isinstance(value, dict) or not isinstance(value.get("key"), str) \
                    or not isinstance(value.get("key_id", ""), str):
                raise ValueError(f"{name}: must be an object with a key")
            key = SigningKey.parse(value["key"], value.get("key_id", ""))
            if key is None:
                raise ValueError(f"{name}: not base64 of a 32-byte key")
            return key

        expires = doc.get("transition_expires_ns")
        if expires is not None and (not isinstance(expires, int) or isinstance(expires, bool)):
            raise ValueError("transition_expires_ns: must be an integer or null")
        keys = cls(one("current"), one("previous"), expires)
        if not keys.usable:
            raise ValueError("no current key")
        return keys


class KeyRing:
    """
    The signing keys in force, shared by the event codec's caller, state
    sync and the status. ``install`` replaces them (and persists them in a
    thread); counters say how often and from where.
    """

    FILENAME = "signing-keys.json"

    def __init__(self, data_dir: str,
                 run_in_thread: Callable[..., defer.Deferred[Any]] = threads.deferToThread) -> None:
        self.path = os.path.join(data_dir, self.FILENAME)
        self._run_in_thread = run_in_thread
        self.keys = KeySet()
        #: rotations by source ("registration", "config", "persisted", "state", "event")
        self.rotations: collections.Counter[str] = collections.Counter()
        #: key sets refused because their current key was unusable
        self.refused = 0
        self._write_lock = defer.DeferredLock()

    def load(self) -> KeySet | None:
        """The persisted keys (a small file, read at start); set aside if unusable."""
        try:
            doc = decode_json(read_stored(self.path, 64 * 1024))
            if not isinstance(doc, dict) or doc.get("format") != 1:
                raise ValueError("unknown format")
            return KeySet.from_document(doc.get("keys"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError) as e:
            set_aside(self.path, f"unusable signing keys ({e}): starting from the enrollment's key")
            return None

    def seed(self, *candidates: tuple[str, ...], fresh: bool = False) -> str | None:
        """
        The keys the agent starts with: the persisted ones, else the first
        of ``candidates`` ((source, base64 key[, key id])) that is a usable
        key. Returns the source used, or None (no key until the control
        plane sends one). ``fresh`` (a new enrollment): the candidates only.
        """
        persisted = None if fresh else self.load()
        if persisted is not None:
            self.keys = persisted
            return "persisted"
        for source, text, *key_id in candidates:
            key = SigningKey.parse(text, *key_id) if text else None
            if key is not None:
                self.install(KeySet(key), source)
                return source
        return None

    def install(self, keys: KeySet, source: str) -> bool:
        """
        Put ``keys`` in force (persisted in a thread); False, changing
        nothing, if their current key is unusable.
        """
        if not keys.usable:
            self.refused += 1
            log.warn("ignoring signing keys from {source}: the current key is not base64 of a 32-byte "
                     "Ed25519 key; the keys in force stay", source=source)
            return False
        self.keys = keys
        self.rotations[source] += 1
        assert keys.current is not None
        log.info("signing keys from {source}: current {current}, previous {previous}", source=source,
                 current=keys.current.label, previous=keys.previous.label if keys.previous else "none")
        self._persist()
        return True

    def idle(self) -> defer.Deferred[None]:
        """Fires once every write started so far has ended."""
        return self._write_lock.run(defer.succeed, None)

    def _persist(self) -> None:
        def write() -> defer.Deferred[Any]:
            data = encode_json({"format": 1, "keys": self.keys.to_document()}, indent=2)
            return self._run_in_thread(atomic_write, self.path, data)

        def failed(f: Any) -> None:
            f.trap(errors.PlexError)
            log.error("could not persist the signing keys: {details}", details=f.value.details)

        self._write_lock.run(write).addErrback(failed)

