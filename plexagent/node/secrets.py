"""
The node secret key (NSK) and AES-256-GCM decryption of secret values.

Plaintext exists only in memory for the duration of one request: it is never
logged, written, cached or put in an exception message.
"""

from __future__ import annotations

import base64
import binascii

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from plexagent.config import ConfigError


class DecryptionFailed(Exception):
    """Any failure to decrypt; deliberately without detail."""

    def __init__(self) -> None:
        super().__init__("decryption failed")


def parse_node_secret_key(text: str, key: str = "node.secret_key_file") -> bytes:
    """Decode the NSK file's content: standard base64 of exactly 32 bytes."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{key}: is not standard base64") from None
    if len(raw) != 32:
        raise ConfigError(f"{key}: must hold 32 bytes (base64, 44 characters), got {len(raw)} bytes")
    return raw


class SecretBox:
    """Decrypts control-plane secret values with the node secret key."""

    def __init__(self, nsk: bytes) -> None:
        self._aead = AESGCM(nsk)

    def __repr__(self) -> str:
        return "<SecretBox>"

    def decrypt(self, ciphertext_b64: object, nonce_b64: object) -> bytes:
        try:
            if not isinstance(ciphertext_b64, str) or not isinstance(nonce_b64, str):
                raise ValueError
            ciphertext = base64.b64decode(ciphertext_b64, validate=True)
            nonce = base64.b64decode(nonce_b64, validate=True)
            if len(nonce) != 12:
                raise ValueError
            return self._aead.decrypt(nonce, ciphertext, None)
        except (InvalidTag, ValueError, binascii.Error, TypeError, OverflowError):
            raise DecryptionFailed() from None

    def encrypt(self, plaintext: bytes, nonce: bytes) -> tuple[str, str]:
        """Encrypt (used by the simulator and tests): (ciphertext_b64, nonce_b64)."""
        ct = self._aead.encrypt(nonce, plaintext, None)
        return base64.b64encode(ct).decode("ascii"), base64.b64encode(nonce).decode("ascii")
