"""
The node's identity: the key pair it enrolls with, and (``IdentityStore``)
the identity a control plane issued, kept in ``<data_dir>/identity.json``.
"""

from __future__ import annotations

import base64

import attrs
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat


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

    @property
    def public_b64(self) -> str:
        raw = self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return base64.b64encode(raw).decode("ascii")

    @property
    def private_b64(self) -> str:
        raw = self.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return base64.b64encode(raw).decode("ascii")
