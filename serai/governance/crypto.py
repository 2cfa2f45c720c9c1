"""Encryption at rest of stored content (stored completions), with AES-256-GCM.

The keys come from the settings (`secret_key`, or `secret_key_file`), newest first: new content
is sealed with the first, and every ciphertext carries the id of its key, so content sealed
before a rotation still opens as long as its key stays listed. A key's id is a short hash of it:
nothing about the key can be learnt from it, and no one has to name keys by hand.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
NONCE_BYTES = 12


class ContentKeyError(ValueError):
    """A configured key is unusable (not base64, not 256 bits); the server refuses to start."""


@dataclass(frozen=True, slots=True)
class Sealed:
    key_id: str
    data: bytes  # nonce + ciphertext + GCM tag


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"serai content key\0" + key).hexdigest()[:16]


def parse_keys(text: str, *, source: str) -> list[bytes]:
    """Base64 keys separated by commas or new lines, newest first."""
    keys = []
    for part in text.replace("\n", ",").split(","):
        if not part.strip():
            continue
        try:
            key = base64.b64decode(part.strip(), validate=True)
        except binascii.Error:
            raise ContentKeyError(f"{source}: a key is not base64 (make one with "
                                  "`openssl rand -base64 32`)") from None
        if len(key) != KEY_BYTES:
            raise ContentKeyError(f"{source}: a key is {len(key)} bytes; AES-256 keys are "
                                  f"{KEY_BYTES} bytes (`openssl rand -base64 32`)")
        keys.append(key)
    return keys


class ContentKeys:
    """The keys content is sealed with (the first) and opened with (any of them)."""

    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ContentKeyError("no content key given")
        self._current = (key_id(keys[0]), AESGCM(keys[0]))
        self._by_id = {key_id(k): AESGCM(k) for k in keys}

    @classmethod
    def configured(cls, secret_key: str | None, secret_key_file: Path | None) -> ContentKeys | None:
        """The keys the settings give, or None when there are none (storing is refused)."""
        keys: list[bytes] = []
        if secret_key:
            keys += parse_keys(secret_key, source="SERAI_SECRET_KEY")
        if secret_key_file is not None:
            try:
                text = secret_key_file.expanduser().read_text()
            except OSError as exc:
                raise ContentKeyError(f"SERAI_SECRET_KEY_FILE {secret_key_file}: "
                                      f"{exc.strerror}") from None
            keys += parse_keys(text, source=f"SERAI_SECRET_KEY_FILE {secret_key_file}")
        return cls(keys) if keys else None

    def seal(self, plaintext: bytes, *, context: bytes) -> Sealed:
        """Encrypt with the newest key; `context` (what the content belongs to) is
        authenticated, so a ciphertext moved to another row does not open."""
        nonce = os.urandom(NONCE_BYTES)
        kid, aead = self._current
        return Sealed(kid, nonce + aead.encrypt(nonce, plaintext, context))

    def open(self, sealed: Sealed, *, context: bytes) -> bytes:
        aead = self._by_id.get(sealed.key_id)
        if aead is None:
            raise ContentKeyError(f"content sealed with key {sealed.key_id}, which is no longer "
                                  "configured")
        try:
            return aead.decrypt(sealed.data[:NONCE_BYTES], sealed.data[NONCE_BYTES:], context)
        except InvalidTag:
            raise ContentKeyError(f"content sealed with key {sealed.key_id} does not "
                                  "authenticate") from None
