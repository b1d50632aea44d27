"""Authenticated encryption of payloads that must not be stored in clear (dead-letter bytes).

A dead-letter record keeps the original raw bytes so an operator can reprocess them, but those
bytes are full of direct identifiers (names, ID numbers, phone numbers, MRNs). They are
stored sealed: AES-256-GCM under a key derived from one configured secret, in this layout::

    version (1 byte, 0x01) | key id (4 bytes) | nonce (12 bytes) | ciphertext + GCM tag (16 bytes)

The key id is the first 4 bytes of SHA-256 of the key: it is not secret (a 4-byte hash of a
256-bit key reveals nothing usable) and lets :func:`unseal` tell "wrong key" apart from
"altered payload". The version byte and key id are authenticated together with the caller's
associated data, so none of them can be changed without :func:`unseal` noticing.
"""

from __future__ import annotations

import hashlib
import os
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

#: The only layout version this code writes and reads.
SEALED_FORMAT_VERSION: Final = 1
KEY_BYTES: Final = 32
KEY_ID_BYTES: Final = 4
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
HEADER_BYTES: Final = 1 + KEY_ID_BYTES + NONCE_BYTES
#: A sealed empty payload: header and tag, no ciphertext.
MIN_SEALED_BYTES: Final = HEADER_BYTES + TAG_BYTES
#: Shortest secret :func:`derive_key` accepts (128 bits of entropy at the very least).
MIN_SECRET_BYTES: Final = 16

# Domain separation: keys derived here can never equal keys another part of the product
# derives from the same secret with a different label.
_HKDF_INFO_PREFIX: Final = b"medstream.sealing.v1|"


class SealingError(ValueError):
    """A payload cannot be sealed or unsealed: bad key, truncated or altered input, unknown format.

    Messages name sizes, versions and key ids only, never any byte of the payload.
    """


def key_id(key: bytes) -> bytes:
    """The 4-byte identifier of a key (start of its SHA-256), stored in every sealed payload."""
    return hashlib.sha256(key).digest()[:KEY_ID_BYTES]


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes | bytearray):
        raise SealingError(f"the sealing key must be bytes, not {type(key).__name__}")
    if len(key) != KEY_BYTES:
        raise SealingError(
            f"the sealing key must be {KEY_BYTES} bytes (AES-256), got {len(key)}; "
            "use derive_key() to make one from a configured secret"
        )


def derive_key(secret: bytes, purpose: str) -> bytes:
    """A 32-byte key for one purpose (e.g. ``"dead-letter"``) from one secret (HKDF-SHA256).

    Different purposes give unrelated keys, so a single secret in the settings can protect
    several kinds of payload without one key unlocking another's.
    """
    if not isinstance(secret, bytes | bytearray):
        raise SealingError(f"the secret must be bytes, not {type(secret).__name__}")
    if len(secret) < MIN_SECRET_BYTES:
        raise SealingError(
            f"the secret must be at least {MIN_SECRET_BYTES} bytes long, got {len(secret)}"
        )
    if not purpose.strip():
        raise SealingError("the key purpose must not be empty")
    # No salt: the secret is already a high-entropy key, where RFC 5869 (section 3.1) allows
    # omitting it; the purpose goes into ``info``, which is what separates the keys.
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_BYTES,
        salt=None,
        info=_HKDF_INFO_PREFIX + purpose.encode("utf-8"),
    )
    return hkdf.derive(bytes(secret))


def seal(plaintext: bytes, key: bytes, associated: bytes = b"") -> bytes:
    """Encrypt and authenticate ``plaintext`` under a 32-byte key, with a fresh random nonce.

    ``associated`` is authenticated but not stored (e.g. the dead-letter id): unsealing needs
    the same value, so a sealed payload cannot be moved to another row unnoticed.
    """
    _check_key(key)
    if not isinstance(plaintext, bytes | bytearray):
        raise SealingError(f"the payload must be bytes, not {type(plaintext).__name__}")
    header = bytes([SEALED_FORMAT_VERSION]) + key_id(bytes(key))
    # 96-bit random nonces: safe for far more than 2**32 payloads per key (NIST SP 800-38D 8.3).
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = AESGCM(bytes(key)).encrypt(nonce, bytes(plaintext), header + associated)
    return header + nonce + ciphertext


def unseal(sealed: bytes, key: bytes, associated: bytes = b"") -> bytes:
    """The plaintext of a payload made by :func:`seal`; raises SealingError saying what is wrong."""
    _check_key(key)
    if not isinstance(sealed, bytes | bytearray):
        raise SealingError(f"the sealed payload must be bytes, not {type(sealed).__name__}")
    sealed = bytes(sealed)
    if not sealed:
        raise SealingError(
            f"the sealed payload is truncated: 0 bytes, at least {MIN_SEALED_BYTES} are needed"
        )
    version = sealed[0]
    if version != SEALED_FORMAT_VERSION:
        raise SealingError(
            f"unknown sealed format version {version:#04x} "
            f"(this code reads version {SEALED_FORMAT_VERSION:#04x})"
        )
    if len(sealed) < MIN_SEALED_BYTES:
        raise SealingError(
            f"the sealed payload is truncated: {len(sealed)} bytes, "
            f"at least {MIN_SEALED_BYTES} are needed"
        )
    stored_key_id = sealed[1 : 1 + KEY_ID_BYTES]
    given_key_id = key_id(bytes(key))
    if stored_key_id != given_key_id:
        raise SealingError(
            f"wrong key: the payload was sealed with key id {stored_key_id.hex()}, "
            f"the key given has id {given_key_id.hex()}"
        )
    header = sealed[: 1 + KEY_ID_BYTES]
    nonce = sealed[1 + KEY_ID_BYTES : HEADER_BYTES]
    try:
        return AESGCM(bytes(key)).decrypt(nonce, sealed[HEADER_BYTES:], header + associated)
    except InvalidTag:
        raise SealingError(
            "authentication failed: the sealed payload was altered or truncated, "
            "or the associated data differs from the data it was sealed with"
        ) from None
