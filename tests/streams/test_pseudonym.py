"""Keyed pseudonyms: deterministic, keyed, domain-separated, never the identifier itself."""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest

from streams.pseudonym import Pseudonymiser

KEY = b"test-only-pseudonym-key-0123456789"


def _expected(purpose: bytes, organisation_id: str, local_id: str, key: bytes = KEY) -> str:
    framed = b"".join(
        struct.pack(">I", len(part)) + part
        for part in (purpose, organisation_id.encode(), local_id.encode())
    )
    return hmac.new(key, framed, hashlib.sha256).hexdigest()[:32]


def test_person_key_is_hmac_sha256_of_the_framed_identifier() -> None:
    key = Pseudonymiser(KEY).person_key("H001", "MRN-FICT-0042")
    assert key == _expected(b"medstream.person_key.v1", "H001", "MRN-FICT-0042")
    assert len(key) == 32
    assert int(key, 16) >= 0  # lowercase hex
    assert key == key.lower()
    assert "MRN-FICT-0042" not in key


def test_encounter_key_uses_its_own_domain() -> None:
    pseudonymiser = Pseudonymiser(KEY)
    encounter = pseudonymiser.encounter_key("H001", "V-0001")
    assert encounter == _expected(b"medstream.encounter_key.v1", "H001", "V-0001")
    assert encounter != pseudonymiser.person_key("H001", "V-0001")


def test_row_key_is_per_table_and_its_own_domain() -> None:
    pseudonymiser = Pseudonymiser(KEY)
    row = pseudonymiser.row_key("H001", "visit_diagnosis", "D-17")
    assert row == _expected(b"medstream.row_key.v1", "H001", "visit_diagnosis\x1fD-17")
    assert row != pseudonymiser.row_key("H001", "other_table", "D-17")
    assert row != pseudonymiser.encounter_key("H001", "visit_diagnosis\x1fD-17")


def test_same_input_same_key_and_surrounding_blanks_ignored() -> None:
    first = Pseudonymiser(KEY)
    second = Pseudonymiser(bytes(KEY))
    assert first.person_key("H001", "MRN-1") == second.person_key("H001", "MRN-1")
    assert first.person_key("H001", "  MRN-1 ") == first.person_key("H001", "MRN-1")


def test_organisation_and_key_change_the_pseudonym() -> None:
    pseudonymiser = Pseudonymiser(KEY)
    assert pseudonymiser.person_key("H001", "MRN-1") != pseudonymiser.person_key("H002", "MRN-1")
    other = Pseudonymiser(b"another-test-only-key-9876543210")
    assert other.person_key("H001", "MRN-1") != pseudonymiser.person_key("H001", "MRN-1")


def test_parts_cannot_be_shifted_between_organisation_and_identifier() -> None:
    pseudonymiser = Pseudonymiser(KEY)
    assert pseudonymiser.person_key("H1", "23") != pseudonymiser.person_key("H12", "3")


def test_case_of_the_identifier_matters() -> None:
    pseudonymiser = Pseudonymiser(KEY)
    assert pseudonymiser.person_key("H001", "ab1") != pseudonymiser.person_key("H001", "AB1")


@pytest.mark.parametrize("key", [b"", b"short-key"])
def test_short_keys_are_refused(key: bytes) -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Pseudonymiser(key)


def test_text_key_is_refused() -> None:
    with pytest.raises(TypeError, match="bytes"):
        Pseudonymiser("a-text-key-that-is-long-enough")  # type: ignore[arg-type]


@pytest.mark.parametrize("local_id", ["", "   "])
def test_empty_identifier_is_refused(local_id: str) -> None:
    with pytest.raises(ValueError, match="empty identifier"):
        Pseudonymiser(KEY).person_key("H001", local_id)
