"""
The node's identity: the key pair it enrolls with, and (``IdentityStore``)
the identity a control plane issued, kept in ``<data_dir>/identity.json``.
"""

from __future__ import annotations

import base64
import os
from typing import Any, Callable

import attrs
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from twisted.internet import defer, threads

from plexagent.fileio import atomic_write, decode_json, encode_json, ensure_private_dir, read_stored, set_aside


@attrs.frozen(eq=False)
class NodeKeyPair:
    """The node's own X25519 key pair (plexd's WireGuard key); only the public half leaves the node."""

    private: X25519PrivateKey = attrs.field(repr=False)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NodeKeyPair) and other.private_b64 == self.private_b64

    def __hash__(self) -> int:
        return hash(self.public_b64)

    @classmethod
    def generate(cls) -> "NodeKeyPair":
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_private_b64(cls, text: str) -> "NodeKeyPair":
        """The pair of a stored private key (standard base64 of 32 bytes); ValueError if it is not one."""
        raw = base64.b64decode(text, validate=True)
        if len(raw) != 32:
            raise ValueError("the private key must be 32 bytes")
        return cls(X25519PrivateKey.from_private_bytes(raw))

    @classmethod
    def from_document(cls, doc: Any) -> "NodeKeyPair | None":
        """The pair an identity document keeps (``private_key``), None if it keeps none; ValueError if unusable."""
        if doc.get("private_key") is None:
            return None
        try:
            return cls.from_private_b64(str(doc["private_key"]))
        except ValueError:
            raise ValueError("private_key: must be standard base64 of 32 bytes") from None

    def document(self) -> dict[str, str]:
        """The members an identity document keeps the pair in."""
        return {"private_key": self.private_b64, "public_key": self.public_b64}

    @property
    def public_b64(self) -> str:
        raw = self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return base64.b64encode(raw).decode("ascii")

    @property
    def private_b64(self) -> str:
        raw = self.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return base64.b64encode(raw).decode("ascii")


class IdentityMismatch(ValueError):
    """identity.json holds an identity the configuration cannot use (another protocol)."""


class IdentityStore:
    """
    The enrolled identity in ``<data_dir>/identity.json`` (0600 in a 0700
    directory, replaced atomically). What cannot be used is set aside (the
    node then enrolls again); an identity of another protocol is kept and
    refused (``IdentityMismatch``): enrolling again would make a second node.
    """

    FILENAME = "identity.json"

    def __init__(self, data_dir: str, protocol: Any,
                 run_in_thread: Callable[..., defer.Deferred[Any]] = threads.deferToThread) -> None:
        self.data_dir = data_dir
        self.path = os.path.join(data_dir, self.FILENAME)
        self.protocol = protocol
        self._run_in_thread = run_in_thread

    def load(self) -> Any:
        """The stored Identity (a small file, read at start), or None."""
        try:
            doc = decode_json(read_stored(self.path, 64 * 1024))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError) as e:
            set_aside(self.path, f"unusable identity ({e}): the node enrolls again if it has a bootstrap token")
            return None
        if not isinstance(doc, dict) or doc.get("format") != 1:
            set_aside(self.path, "unusable identity (not format 1): the node enrolls again if it has a bootstrap token")
            return None
        if doc.get("protocol") != self.protocol.name:
            raise IdentityMismatch(
                f"{self.path} was made for protocol {doc.get('protocol')!r}, not {self.protocol.name!r}: run "
                f"`plexagent deregister` or set control_plane.protocol")
        try:
            return self.protocol.identity_from_document(doc)
        except ValueError as e:
            set_aside(self.path, f"unusable identity ({e}): the node enrolls again if it has a bootstrap token")
            return None

    def save(self, identity: Any) -> defer.Deferred[None]:
        """Write ``identity`` durably (in a thread)."""
        data = encode_json(self.protocol.identity_document(identity), indent=2)

        def write() -> None:
            ensure_private_dir(self.data_dir)
            atomic_write(self.path, data)

        return self._run_in_thread(write)

    def remove(self) -> bool:
        """Forget the identity (blocking: for the command line); False if there was none."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return False
        return True
