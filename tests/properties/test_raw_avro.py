"""Property tests of raw-record decoding (schemas/serde.py) as the normalise stage does it:
Confluent-framed Avro (magic byte 0, schema id, body) and bytes without the magic byte,
random and mutated.

The contract: the deserialiser returns a record of the subject's schema, which the stage
normalises into events or rejections, or it raises SerializationError naming the subject
(the stage dead-letters it as ``undecodable``); never another exception, never a hang.
"""

from __future__ import annotations

import struct
import time
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from producers.table_mapping import TARGET_FIELDS
from schemas import serde
from tests.properties.pipeline import NOW_MS, REGISTRY, decoder, encoder, stage_outcomes
from tests.properties.strategies import NASTY_TEXT, bounded, mutated

SAMPLES: dict[str, dict] = {
    "hl7_lab": {
        "message_control_id": "LAB-1", "organisation_id": "H001", "source_system": "LIS",
        "message_type": "ORU^R01", "received_time": NOW_MS,
        "payload": "MSH|^~\\&|LIS|FAC1|MEDSTREAM|REGION|20261103081500+0800||ORU^R01|LAB-1|P|"
        "2.5.1\r"
        "PID|1||SYNTH-MRN-1^^^H001^MR\rOBR|1|||K\rOBX|1|NM|K^Potassium^L||4.1|mmol/L||||F\r",
    },
    "device": {
        "packet_id": "p-1", "device_id": "MON-A-0001", "device_type": "monitor-a",
        "organisation_id": "H001", "source_system": "gw", "patient_ref": "SYNTH-MRN-1",
        "sent_time": NOW_MS,
        "samples": [{"metric": "HR", "value": 72.0, "unit": "bpm", "sample_time": NOW_MS}],
    },
    "claim": {
        "claim_id": "C-1", "payer_id": "P001", "organisation_id": "H001",
        "source_system": "claims", "submitted_time": NOW_MS, "patient_id_number": None,
        "patient_local_id": "SYNTH-MRN-1", "encounter_ref": None, "diagnosis_codes": ["I10"],
        "lines": [{"line_no": 1, "item_code": "D001", "item_display": "Synthetic item",
                   "quantity": 1.0, "unit_price": 2.0, "amount": 2.0,
                   "service_date": __import__("datetime").date(2026, 3, 1)}],
    },
    "emr_cdc": {
        "message_id": "his:0/1", "organisation_id": "H001", "source_system": "his", "op": "c",
        "table": "lab_result", "before": None,
        "after": {"result_id": "R1", "order_id": "O1", "test_code": "K", "result_value": "4.1",
                  "result_time": "2026-11-03T08:00:00+08:00", "patient_mrn": "SYNTH-MRN-1"},
        "source_position": "0/1", "position_seq": 1, "transaction_id": 7,
        "commit_time": NOW_MS, "captured_time": NOW_MS,
    },
}
KINDS = sorted(SAMPLES)


def framed(kind: str) -> bytes:
    return encoder(kind)(SAMPLES[kind])


def records() -> st.SearchStrategy[tuple[str, bytes]]:
    """(source kind, bytes): mutated framed records, bodies without the magic byte, other
    schema ids, and random bytes."""
    kind = st.sampled_from(KINDS)
    return st.one_of(
        kind.flatmap(lambda k: st.tuples(st.just(k), mutated(framed(k), b"\x00\x02\x80\xff"))),
        kind.map(lambda k: (k, framed(k)[5:])),  # the body alone: no magic byte, no id
        st.tuples(kind, st.integers(0, 2**32 - 1)).map(
            lambda pair: (pair[0], struct.pack(">bI", 0, pair[1]) + framed(pair[0])[5:])
        ),
        st.tuples(kind, st.binary(max_size=200)),
        st.tuples(kind, st.binary(max_size=200).map(lambda b: b"\x00" + b)),
    )


def decode_as_the_stage_does(kind: str, data: bytes) -> None:
    started = time.monotonic()
    try:
        raw = decoder(kind)(data)
    except serde.SerializationError as exc:
        assert exc.schema == serde.RAW_SUBJECT_BY_KIND[kind]
        assert str(exc)
        return
    finally:
        assert time.monotonic() - started < 1.0, "decoding must not hang"
    # A decoded record is of the subject's schema: it encodes again.
    serde.AvroSerializer(REGISTRY, serde.RAW_SUBJECT_BY_KIND[kind])(raw)
    stage_outcomes(kind, raw)


@bounded(600)
@given(record=records())
@example(record=("device", framed("device")))
# A huge array block count with nothing behind it must not make the reader loop.
@example(record=("claim", framed("claim")[:-60] + b"\xfe\xff\xff\xff\xff\xff\xff\xff\x7f"))
@example(record=("hl7_lab", b"\x00\x00\x00\x00"))
@example(record=("hl7_lab", b""))
def test_every_raw_record_decodes_to_its_schema_or_is_refused(record: tuple[str, bytes]) -> None:
    decode_as_the_stage_does(*record)


@bounded(100)
@given(kind=st.sampled_from(KINDS), data=st.binary(max_size=200))
def test_none_and_bytes_without_magic_byte_are_refused_with_the_subject(
    kind: str, data: bytes
) -> None:
    for value in (None, b"\x01" + data, b"\x7f" + data):
        try:
            decoder(kind)(value)
        except serde.SerializationError as exc:
            assert serde.RAW_SUBJECT_BY_KIND[kind] in str(exc)
        else:
            raise AssertionError("bytes without the magic byte were decoded")


# --- any schema-valid raw record: the normalise entry must not fail ------------------------------

#: Field name -> plausible values, so generated records reach deep into the normalisers.
HINTS: dict[str, list[str]] = {
    "organisation_id": ["H001", "H002", ""],
    "device_type": ["monitor-a", "wearable-w", "unknown"],
    "metric": ["HR", "SPO2", "TEMP", "NIBP_SYS", "RR", ""],
    "unit": ["bpm", "/min", "%", "[degF]", "Cel", "{ratio}", "{}", "mmHg", ""],
    "table": sorted(TARGET_FIELDS) + ["unknown_table"],
    "message_type": ["ORU^R01", "ADT^A01", "ADT^A03", "ADT^A08", "ORM^O01", ""],
    "item_code": ["D001", "X", ""],
    "patient_id_number": ["990000197001010018", "99000019700101001X", "1"],
}
TIME_TEXT = ["2026-11-03T08:00:00+08:00", "2026-11-03 08:00:00", "2026-11-03", "24:00", ""]
MAP_VALUES = st.one_of(
    st.none(), st.sampled_from(TIME_TEXT + list(NASTY_TEXT[:25])), st.text(max_size=20),
    st.floats().map(repr), st.sampled_from(["I", "O", "E", "F", "H", "L", "adm", "K", "NA"]),
)
MS = st.integers(-62_135_596_800_000, 253_402_300_799_000)  # the years 1 to 9999


def strategy_for(avro_type: Any, name: str = "") -> st.SearchStrategy[Any]:
    """Values of an Avro type (as a decoded record holds them), biased by field name."""
    if isinstance(avro_type, list):
        return st.one_of([strategy_for(t, name) for t in avro_type])
    if isinstance(avro_type, dict):
        kind, logical = avro_type["type"], avro_type.get("logicalType")
        if logical == "timestamp-millis":
            return st.one_of(MS, st.just(NOW_MS))
        if logical == "date":
            return st.dates()
        if kind == "record":
            return st.fixed_dictionaries(
                {f["name"]: strategy_for(f["type"], f["name"]) for f in avro_type["fields"]}
            )
        if kind == "array":
            return st.lists(strategy_for(avro_type["items"], name), max_size=4)
        if kind == "map":
            keys = st.one_of(
                st.sampled_from(sorted({f for t in TARGET_FIELDS.values() for f in t})),
                st.text(max_size=8),
            )
            return st.dictionaries(keys, MAP_VALUES, max_size=14)
        if kind == "enum":
            return st.sampled_from(avro_type["symbols"])
        return strategy_for(kind, name)
    if avro_type == "string":
        if name == "payload":
            return st.sampled_from([s["payload"] for s in [SAMPLES["hl7_lab"]]]).flatmap(
                lambda text: mutated(text.encode(), b"|^~\\&\r").map(
                    lambda b: b.decode("utf-8", "replace")
                )
            )
        hinted = st.sampled_from(HINTS[name]) if name in HINTS else st.nothing()
        return st.one_of(hinted, st.text(max_size=30), st.sampled_from(NASTY_TEXT[:25]))
    if avro_type in ("int", "long"):
        bound = 2**31 - 1 if avro_type == "int" else 2**63 - 1
        return st.integers(-bound - 1, bound)
    if avro_type in ("double", "float"):
        return st.floats()
    if avro_type == "boolean":
        return st.booleans()
    if avro_type == "null":
        return st.none()
    raise AssertionError(f"no strategy for {avro_type!r}")


def raw_records() -> st.SearchStrategy[tuple[str, dict[str, Any]]]:
    return st.sampled_from(KINDS).flatmap(
        lambda kind: st.tuples(
            st.just(kind),
            strategy_for(REGISTRY.latest(serde.RAW_SUBJECT_BY_KIND[kind]).definition),
        )
    )


@bounded(300)
@given(record=raw_records())
def test_any_schema_valid_raw_record_is_normalised_or_rejected(
    record: tuple[str, dict[str, Any]],
) -> None:
    kind, value = record
    decode_as_the_stage_does(kind, encoder(kind)(value))
