"""Plain data types passed between the normalise functions and the thin Faust agents.

A raw record becomes a list of outcomes: one :class:`NormalisedEvent` per clinical fact
it holds, or a :class:`RecordRejected` for each part (or the whole) that could not be
used, which the agent turns into a dead-letter record.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, Final

from pydantic import AfterValidator

from schemas.serde import NORM_SUBJECT_BY_KIND

#: Normalised event kind -> Avro subject (record name) of its latest schema.
SUBJECT_BY_KIND: Final[dict[str, str]] = NORM_SUBJECT_BY_KIND

#: The bounded set of reason codes a rejection may carry (the dead-letter reason_code).
REASON_CODES: Final[frozenset[str]] = frozenset(
    {"undecodable", "invalid_message", "invalid_record", "unmapped_table", "quality_error",
     "internal_error"}
)

_EPOCH_DATE: Final = date(1970, 1, 1)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS: Final = timedelta(milliseconds=1)


@dataclass(frozen=True, slots=True)
class RawContext:
    """Where a raw record came from: its Kafka position and record timestamp (= ingest time)."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int

    @classmethod
    def of(cls, message: Any) -> RawContext:
        """The position of a consumed Kafka message (Faust's, timestamp in seconds)."""
        return cls(
            message.topic, message.partition, message.offset, int(message.timestamp * 1000)
        )


@dataclass(frozen=True, slots=True)
class NormalisedEvent:
    """One standardised clinical event, ready to be Avro-encoded with its kind's latest schema.

    ``value`` holds every field of the schema; timestamps are int epoch milliseconds and
    Avro ``date`` fields are :class:`datetime.date`. ``key`` is the norm-topic partition
    key: the person_key, else the encounter_key, else ``organisation_id|source_ref``.
    ``historic`` marks an event a CDC snapshot read (already in the source before the
    collector started): stored like any other, but it raises no alert as if it were new.
    """

    kind: str
    key: str
    value: dict[str, Any]
    historic: bool = False


@dataclass(frozen=True, slots=True)
class RecordRejected:
    """A raw message (record_index None) or one record of it that could not be normalised.

    ``reason`` names the segment, field or column and the class of the bad value, never
    the value itself when it could identify a patient.
    """

    record_index: int | None
    record_count: int | None
    reason_code: str
    reason: str
    organisation_id: str | None = None


Outcome = NormalisedEvent | RecordRejected


def epoch_ms(value: datetime | int) -> int:
    """Epoch milliseconds of a decoded Avro timestamp-millis (aware datetime) or an int."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("naive datetime: timestamp-millis values must be timezone-aware")
        # Integer arithmetic: float timestamps can be off by one millisecond.
        return (value - _EPOCH) // _ONE_MS
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an aware datetime or int epoch ms, got {type(value).__name__}")
    return value


def as_date(value: date | int) -> date:
    """A decoded Avro ``date`` as datetime.date (decoders may also hand over int days)."""
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected a date or int days, got {type(value).__name__}")
    return _EPOCH_DATE + timedelta(days=value)


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


#: A text field of a rules or dictionary file that must not be empty or blank.
NonBlank = Annotated[str, AfterValidator(_not_blank)]
