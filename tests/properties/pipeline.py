"""The stage side of a property: decode a raw record and normalise it as the stream stage
does, with the shipped terminology (loaded once) and a test-only pseudonym key."""

from __future__ import annotations

from functools import cache
from typing import Any

from schemas import serde
from streams.model import NormalisedEvent, RawContext, RecordRejected
from streams.normalise import normalise
from streams.pseudonym import Pseudonymiser
from streams.terminology import Terminology, load_terminology

NOW_MS = 1_793_700_005_000
REGISTRY = serde.ManifestRegistry()


@cache
def terminology() -> Terminology:
    """The shipped terminology, loaded once per test process."""
    return load_terminology()


@cache
def encoder(source_kind: str) -> serde.AvroSerializer:
    """The raw record serialiser of a source kind."""
    return serde.AvroSerializer(REGISTRY, serde.RAW_SUBJECT_BY_KIND[source_kind])


@cache
def decoder(source_kind: str) -> serde.AvroDeserializer:
    """The raw record deserialiser of a source kind (as the stage holds one)."""
    return serde.AvroDeserializer(REGISTRY, serde.RAW_SUBJECT_BY_KIND[source_kind])


def stage_outcomes(source_kind: str, raw: dict[str, Any]) -> list[Any]:
    """Normalise one decoded raw record; every outcome is an event or a rejection."""
    ctx = RawContext(f"raw.{source_kind}", 0, 7, NOW_MS - 5_000)
    outcomes = normalise(
        source_kind, raw, ctx, terminology(), Pseudonymiser(b"test-only-key-0123456789abcdef"),
        NOW_MS,
    )
    for outcome in outcomes:
        assert isinstance(outcome, NormalisedEvent | RecordRejected), outcome
        if isinstance(outcome, RecordRejected):
            assert outcome.reason_code and outcome.reason, outcome
        else:
            encoded = serde.AvroSerializer(REGISTRY, serde.NORM_SUBJECT_BY_KIND[outcome.kind])(
                outcome.value
            )
            assert encoded[:1] == b"\x00"
    return outcomes


def round_trip(source_kind: str, record: dict[str, Any]) -> dict[str, Any]:
    """Encode a raw record as a collector publishes it and decode it as the stage reads it."""
    return decoder(source_kind)(encoder(source_kind)(record))
