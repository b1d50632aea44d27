"""EMR (CDC) lab-result rows -> LabResult events, like HL7 OBX results.

A HIS lab-result table mapped to the ``lab_result`` target (see producers/table_mapping.py)
arrives as EmrRowChange records with the target field names. All identifiers are fictional.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from schemas import serde
from schemas.identity import event_id
from streams.model import SUBJECT_BY_KIND, NormalisedEvent, RawContext, RecordRejected
from streams.normalise import normalise
from streams.pseudonym import Pseudonymiser
from streams.terminology import Terminology

MRN = "MRN-FICT-0077"
NOW_MS = 1_793_700_005_000
_REGISTRY = serde.ManifestRegistry()
CTX = RawContext("raw.emr_cdc", 1, 123, 1_793_600_000_000)


def lab_row(**overrides: str | None) -> dict[str, str | None]:
    row: dict[str, str | None] = {
        "result_id": "R-0001",
        "order_id": "ORD-0001",
        "visit_no": "V-0001",
        "patient_mrn": MRN,
        "test_code": "GLU",
        "test_name": "Glucose (fasting)",
        "result_value": "90",
        "unit": "mg/dL",
        "reference_range": "70-110",
        "abnormal_flag": "N",
        "result_status": "F",
        "specimen_status": None,
        "result_time": "2026-11-02T08:15:00+08:00",
    }
    row.update(overrides)
    return row


def raw(op: str, row: dict[str, str | None]) -> dict[str, Any]:
    return {
        "message_id": "his-pg:0/2A0B1C8",
        "organisation_id": "H001",
        "source_system": "his-pg",
        "op": op,
        "table": "lab_result",
        "before": row if op == "d" else None,
        "after": None if op == "d" else row,
        "source_position": "0/2A0B200",
        "position_seq": 0x2A0B1C8,
        "transaction_id": 901,
        "commit_time": datetime(2026, 11, 2, 0, 20, tzinfo=UTC),
        "captured_time": datetime(2026, 11, 2, 0, 20, 1, tzinfo=UTC),
    }


def run(
    op: str, row: dict[str, str | None], terminology: Terminology, pseudonymiser: Pseudonymiser
) -> list[Any]:
    return list(normalise("emr_cdc", raw(op, row), CTX, terminology, pseudonymiser, NOW_MS))


def encodes(event: NormalisedEvent) -> dict[str, Any]:
    subject = SUBJECT_BY_KIND[event.kind]
    fields = {f["name"] for f in _REGISTRY.latest(subject).definition["fields"]}
    assert set(event.value) == fields
    decoded: dict[str, Any] = serde.AvroDeserializer(_REGISTRY, subject)(
        serde.AvroSerializer(_REGISTRY, subject)(event.value)
    )
    return decoded


@pytest.mark.parametrize("op", ["c", "r", "u"])
def test_lab_row_becomes_a_converted_lab_result(
    op: str, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    [event] = run(op, lab_row(), terminology, pseudonymiser)
    assert isinstance(event, NormalisedEvent) and event.kind == "lab_result"
    value = event.value
    assert value["loinc_code"] == "2345-7"
    assert value["value"] == pytest.approx(90 * 0.0555)
    assert value["unit"] == "mmol/L"
    assert (value["original_value"], value["original_unit"]) == ("90", "mg/dL")
    assert value["reference_low"] == pytest.approx(70 * 0.0555)
    assert value["reference_high"] == pytest.approx(110 * 0.0555)
    assert (value["local_code"], value["local_display"]) == ("GLU", "Glucose (fasting)")
    assert (value["order_id"], value["abnormal_flag"], value["result_status"]) == (
        "ORD-0001",
        "N",
        "F",
    )
    assert value["mapping_status"] == "mapped"
    assert value["event_time"] == int(datetime(2026, 11, 2, 0, 15, tzinfo=UTC).timestamp() * 1000)
    assert value["person_key"] == pseudonymiser.person_key("H001", MRN) == event.key
    assert value["source_kind"] == "emr_cdc" and value["source_ref"] == "his-pg:0/2A0B1C8"
    assert value["event_id"] == event_id("emr_cdc", "H001", "his-pg:0/2A0B1C8", 0)
    assert (value["source_topic"], value["source_offset"]) == ("raw.emr_cdc", 123)
    decoded = encodes(event)
    assert decoded["order_id"] == "ORD-0001"
    assert MRN not in repr(event.value)


def test_deleted_lab_row_withdraws_the_result(
    terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    [event] = run("d", lab_row(), terminology, pseudonymiser)
    assert event.value["result_status"] == "D"
    assert event.value["value"] == pytest.approx(90 * 0.0555)


def test_text_censored_and_unmapped_values(
    terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    [text] = run("c", lab_row(result_value="positive", unit=None), terminology, pseudonymiser)
    assert (text.value["value"], text.value["value_text"]) == (None, "positive")
    [censored] = run("c", lab_row(result_value="< 5"), terminology, pseudonymiser)
    assert (censored.value["value"], censored.value["value_text"]) == (None, "<5")
    [unmapped] = run("c", lab_row(test_code="LAC", unit="mmol/L"), terminology, pseudonymiser)
    assert unmapped.value["mapping_status"] == "unmapped"
    assert unmapped.value["loinc_code"] is None and unmapped.value["value"] is None
    assert unmapped.value["value_text"] == "90"
    assert unmapped.value["reference_low"] is None
    [bad_unit] = run("c", lab_row(unit="furlong"), terminology, pseudonymiser)
    assert bad_unit.value["mapping_status"] == "unit_unmapped"
    assert (bad_unit.value["value"], bad_unit.value["value_text"]) == (None, "90")
    [no_mrn] = run("c", lab_row(patient_mrn=None), terminology, pseudonymiser)
    assert no_mrn.value["person_key"] is None and no_mrn.key == "H001|ORD-0001"
    for outcome in (text, censored, unmapped, bad_unit, no_mrn):
        encodes(outcome)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"order_id": None}, "lab_result.order_id is missing"),
        ({"test_code": " "}, "lab_result.test_code is missing"),
        ({"result_id": None}, "lab_result.result_id is missing"),
        ({"result_time": "2026-11-02 08:15"}, "lab_result.result_time has no UTC offset"),
        ({"result_time": "yesterday"}, "lab_result.result_time is not an ISO-8601 timestamp"),
    ],
)
def test_unusable_lab_rows_are_rejected_with_the_reason(
    overrides: dict[str, str | None],
    reason: str,
    terminology: Terminology,
    pseudonymiser: Pseudonymiser,
) -> None:
    [rejected] = run("c", lab_row(**overrides), terminology, pseudonymiser)
    assert isinstance(rejected, RecordRejected)
    assert rejected.reason_code == "invalid_record"
    assert reason in rejected.reason
    assert MRN not in rejected.reason


def test_snapshot_lab_rows_are_historic_and_raise_no_alerts(
    terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    from streams.normalise import raises_critical_alerts

    [snapshot] = run("r", lab_row(result_value="900"), terminology, pseudonymiser)
    [created] = run("c", lab_row(result_value="900"), terminology, pseudonymiser)
    assert not raises_critical_alerts(snapshot)
    assert raises_critical_alerts(created)
    assert encodes(snapshot)["value"] == pytest.approx(900 * 0.0555)


def test_key_only_delete_withdraws_the_row_at_commit_time(
    terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    key_only = {field: None for field in lab_row()} | {"result_id": "R-0001"}
    [first] = run("d", key_only, terminology, pseudonymiser)
    [again] = run("d", key_only, terminology, pseudonymiser)
    assert isinstance(first, NormalisedEvent)
    assert first.value["result_status"] == "D"
    assert first.value["event_time"] == int(
        datetime(2026, 11, 2, 0, 20, tzinfo=UTC).timestamp() * 1000
    )
    row_key = pseudonymiser.row_key("H001", "lab_result", "R-0001")
    assert first.value["order_id"] == f"result:{row_key}"
    assert (first.key, first.value) == (again.key, again.value)
    assert "R-0001" not in repr(first.value)
    encodes(first)


def test_a_row_with_a_decimal_comma_and_milliequivalents_is_read(
    terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    """Issue 15: a HIS row writes potassium 7,8 mEq/L; it is 7.8 mmol/L, not NULL."""
    row = lab_row(test_code="K", test_name="Kalium", result_value="7,8", unit="mEq/L",
                  reference_range="3,5-5,3")
    [event] = run("c", row, terminology, pseudonymiser)
    value = event.value
    assert (value["value"], value["unit"], value["mapping_status"]) == (7.8, "mmol/L", "mapped")
    assert value["value_text"] is None and value["original_value"] == "7,8"
    assert (value["reference_low"], value["reference_high"]) == (3.5, 5.3)
    [ambiguous] = run("c", dict(row, reference_range="1,000-2,000"), terminology, pseudonymiser)
    assert (ambiguous.value["reference_low"], ambiguous.value["reference_high"]) == (None, None)
