"""Deterministic identities shared by every stage (part of the contract, like the .avsc files).

An event id depends only on what the source said (kind, organisation, native reference,
record index), never on the Kafka offset, so a redelivered source message yields the same
event ids and is collapsed downstream.
"""

from __future__ import annotations

import hashlib
from typing import Final


def event_id(source_kind: str, organisation_id: str, source_ref: str, record_index: int) -> str:
    """The id of the record_index-th clinical event of one source message."""
    text = f"{source_kind}|{organisation_id}|{source_ref}|{record_index}"
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def dead_letter_id(
    stage: str,
    topic: str,
    partition: int,
    offset: int,
    record_index: int | None,
    original_timestamp_ms: int,
) -> str:
    """The id of a dead-letter record: one per stage, original record and record index.

    The original record's timestamp is part of it because a position alone is not unique
    over time: an embedded broker restarts its offsets at 0.
    """
    index = "" if record_index is None else record_index
    text = f"{stage}|{topic}|{partition}|{offset}|{original_timestamp_ms}|{index}"
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def alert_id(rule_id: str, triggering_event_id: str) -> str:
    """The id of an alert: one per rule and triggering event, so reprocessing cannot double it."""
    return hashlib.blake2b(f"{rule_id}|{triggering_event_id}".encode(), digest_size=16).hexdigest()


_ID_WEIGHTS: Final = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK: Final = "10X98765432"


def national_id_check_digit(first17: str) -> str:
    """ISO 7064 MOD 11-2 check character of the first 17 digits of a national ID number."""
    total = sum(int(digit) * weight for digit, weight in zip(first17, _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11]


def national_id_is_valid(id_number: str) -> bool:
    """True when an 18-character national ID number has 17 digits and a correct check digit."""
    return (
        len(id_number) == 18
        and id_number[:17].isdigit()
        and national_id_check_digit(id_number[:17]) == id_number[17]
    )
