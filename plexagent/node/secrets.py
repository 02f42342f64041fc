"""
The node secret key (NSK) and AES-256-GCM decryption of secret values
(12-byte nonce, tag appended, no associated data, standard base64).

Plaintext exists only in memory for the duration of one request: it is never
logged, written, cached or put in an exception message.
"""

from __future__ import annotations

import base64
import binascii

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from plexagent.config import ConfigError
from plexagent.controlplane.gojson import std_b64decode


class DecryptionFailed(Exception):
    """Any failure to decrypt; deliberately without detail."""

    def __init__(self) -> None:
        super().__init__("decryption failed")


def aes_key_from_nsk(text: str) -> bytes | None:
    """
    The AES-256 key a node secret key gives: its own 32 bytes (plexd uses
    the string's bytes as they are), else the 32 bytes its standard base64
    decodes to; None for anything else. No 32-character text is base64 of
    32 bytes, so the two forms never overlap.
    """
    raw = text.encode("utf-8")
    if len(raw) == 32:
        return raw
    try:
        decoded = std_b64decode(text)
    except ValueError:
        return None
    return decoded if len(decoded) == 32 else None


def parse_node_secret_key(text: str, key: str = "node.secret_key_file") -> bytes:
    """The AES key in an NSK file's content (surrounding whitespace ignored); ConfigError naming ``key``."""
    text = text.strip()
    aes_key = aes_key_from_nsk(text)
    if aes_key is None:
        raise ConfigError(f"{key}: must hold the 32-character node secret key or standard base64 of 32 bytes "
                          f"(44 characters); got {len(text.encode('utf-8'))} bytes")
    return aes_key


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
            # Go's StdEncoding: padding required, CR and LF skipped.
            ciphertext = std_b64decode(ciphertext_b64)
            nonce = std_b64decode(nonce_b64)
            if len(nonce) != 12:
                raise ValueError
            return self._aead.decrypt(nonce, ciphertext, None)
        except (InvalidTag, ValueError, binascii.Error, TypeError, OverflowError):
            raise DecryptionFailed() from None

    def decrypt_raw(self, blob: bytes) -> bytes:
        """A secret sent as raw bytes: the 12-byte nonce, then the ciphertext with its 16-byte tag."""
        if len(blob) < 12 + 16:
            raise DecryptionFailed()
        try:
            return self._aead.decrypt(blob[:12], blob[12:], None)
        except (InvalidTag, ValueError, OverflowError):
            raise DecryptionFailed() from None

    def encrypt_raw(self, plaintext: bytes, nonce: bytes) -> bytes:
        """The raw form ``decrypt_raw`` reads (used by the simulator and tests)."""
        return nonce + self._aead.encrypt(nonce, plaintext, None)

    def encrypt(self, plaintext: bytes, nonce: bytes) -> tuple[str, str]:
        """Encrypt (used by the simulator and tests): (ciphertext_b64, nonce_b64)."""
        ct = self._aead.encrypt(nonce, plaintext, None)
        return base64.b64encode(ct).decode("ascii"), base64.b64encode(nonce).decode("ascii")
