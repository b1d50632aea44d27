"""Keyed pseudonyms for patients and visits, so no local identifier leaves the stream stage.

A pseudonym is HMAC-SHA256 under a secret key over a domain-separated, length-prefixed
encoding of (purpose, organisation, local identifier): the same patient of the same
organisation always gets the same key, a person_key can never equal an encounter_key of
the same text, and without the secret key the identifier cannot be recovered by guessing.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Final

PSEUDONYM_HEX_CHARS: Final = 32
MIN_KEY_BYTES: Final = 16

_PERSON: Final = b"medstream.person_key.v1"
_ENCOUNTER: Final = b"medstream.encounter_key.v1"
_ROW: Final = b"medstream.row_key.v1"
_LENGTH: Final = struct.Struct(">I")


def _frame(*parts: bytes) -> bytes:
    # Length-prefixing keeps ("H1", "23") and ("H12", "3") apart.
    return b"".join(_LENGTH.pack(len(part)) + part for part in parts)


class Pseudonymiser:
    """Derives person_key and encounter_key values with a secret HMAC key."""

    __slots__ = ("_base",)

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes | bytearray):
            raise TypeError("the pseudonym key must be bytes")
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"the pseudonym key must be at least {MIN_KEY_BYTES} bytes long")
        # Keyed once; each call copies the prepared HMAC state instead of re-keying.
        self._base = hmac.new(bytes(key), digestmod=hashlib.sha256)

    def _pseudonym(self, purpose: bytes, organisation_id: str, local_id: str) -> str:
        local = local_id.strip()
        if not local:
            raise ValueError("cannot pseudonymise an empty identifier")
        mac = self._base.copy()
        mac.update(_frame(purpose, organisation_id.strip().encode(), local.encode()))
        return mac.hexdigest()[:PSEUDONYM_HEX_CHARS]

    def person_key(self, organisation_id: str, local_patient_id: str) -> str:
        """Pseudonym of a patient's local id (MRN) at one organisation (outer blanks ignored)."""
        return self._pseudonym(_PERSON, organisation_id, local_patient_id)

    def encounter_key(self, organisation_id: str, visit_no: str) -> str:
        """Pseudonym of a local visit number at one organisation (outer blanks ignored)."""
        return self._pseudonym(_ENCOUNTER, organisation_id, visit_no)

    def row_key(self, organisation_id: str, table: str, row_id: str) -> str:
        """Pseudonym of a source table row's id, so later versions of the row can replace it."""
        return self._pseudonym(_ROW, organisation_id, f"{table}\x1f{row_id}")
