"""Normalisation of each raw source kind into standardised, pseudonymised, lineage-tagged events.

All patients, visits and messages below are fictional.
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest

from schemas import serde
from schemas.identity import dead_letter_id, event_id
from streams.model import SUBJECT_BY_KIND, NormalisedEvent, RawContext, RecordRejected
from streams.normalise import dead_letter_record
from streams.normalise import normalise as normalise_outcomes
from streams.pseudonym import Pseudonymiser
from streams.terminology import Terminology

NOW_MS = 1_793_700_005_000
CST = timezone(timedelta(hours=8))

# Fictional identifiers: every output is scanned for them.
PATIENT_NAME = "TESTPATIENT^ALPHA"
PATIENT_SURNAME = "TESTPATIENT"
MRN = "MRN-FICT-0042"
NATIONAL_ID = "990000200001010018"
IDENTIFIERS = (PATIENT_SURNAME, "ALPHA", MRN, NATIONAL_ID)

_REGISTRY = serde.ManifestRegistry()
_ENCODERS = {kind: serde.AvroSerializer(_REGISTRY, s) for kind, s in SUBJECT_BY_KIND.items()}
_DECODERS = {kind: serde.AvroDeserializer(_REGISTRY, s) for kind, s in SUBJECT_BY_KIND.items()}


def normalise(
    source_kind: str,
    raw: dict[str, Any],
    ctx: RawContext,
    terminology: Terminology,
    pseudonymiser: Pseudonymiser,
    now_ms: int,
) -> list[Any]:
    """The outcomes, typed loosely so that assertions can read ``.value`` directly."""
    return normalise_outcomes(source_kind, raw, ctx, terminology, pseudonymiser, now_ms)


def ms(
    year: int, month: int, day: int, hour: int, minute: int, second: int = 0, tz: timezone = CST
) -> int:
    """Epoch ms of a wall-clock time (China Standard Time unless told)."""
    return int(datetime(year, month, day, hour, minute, second, tzinfo=tz).timestamp() * 1000)


def events(outcomes: list[Any]) -> list[NormalisedEvent]:
    return [o for o in outcomes if isinstance(o, NormalisedEvent)]


def rejections(outcomes: list[Any]) -> list[RecordRejected]:
    return [o for o in outcomes if isinstance(o, RecordRejected)]


def assert_encodes(outcomes: list[Any]) -> None:
    """Every event is a complete record of its kind's latest schema (encode and decode back)."""
    for event in events(outcomes):
        schema_fields = {
            f["name"] for f in _REGISTRY.latest(SUBJECT_BY_KIND[event.kind]).definition["fields"]
        }
        assert set(event.value) == schema_fields, event.kind
        decoded = _DECODERS[event.kind](_ENCODERS[event.kind](event.value))
        assert decoded["event_id"] == event.value["event_id"]


def assert_no_identifiers(outcomes: list[Any]) -> None:
    text = repr(outcomes)
    for identifier in IDENTIFIERS:
        assert identifier not in text


# --- HL7 ORU^R01 ------------------------------------------------------------------------------


def spm(condition: str) -> str:
    return "SPM|" + "|".join(["1", *([""] * 22), condition])


MSH = "MSH|^~\\&|LIS|H001|MEDSTREAM|REGION|20261103081500+0800||ORU^R01^ORU_R01|LAB-0001|P|2.5.1"
PID = f"PID|1||{MRN}^^^H001^MR~{NATIONAL_ID}^^^CHN^NI||{PATIENT_NAME}||19700101|F"
OBR = "OBR|1|PL-77|FO-1001|PANEL^Chemistry panel^L|||20261103080000+0800"
PANEL = [
    MSH,
    PID,
    OBR,
    "OBX|1|NM|K^Potassium^L||6.9|mmol/L|3.5-5.3|HH|||F|||20261103080500+0800",
    "OBX|2|NM|GLU^Glucose^L||180|mg/dL|70-110|H|||F",
    "OBX|3|NM|2951-2^Sodium^LN||141|mmol/L|137-145|N|||F",
    "OBX|4|NM|HGB^Hemoglobin^L||abc|g/dL|12-16||||F",
    "OBX|5|ST|COMMENT^Lab comment^L||See note||||||F",
    spm("HEM^Haemolysed"),
]


def hl7_raw(
    segments: list[str], separator: str = "\r", control_id: str = "LAB-0001"
) -> dict[str, Any]:
    return {
        "message_control_id": control_id,
        "organisation_id": "H001",
        "source_system": "lis-mllp",
        "message_type": "ORU^R01",
        "received_time": datetime(2026, 11, 3, 0, 15, 2, tzinfo=UTC),
        "payload": separator.join(segments) + separator,
    }


@pytest.fixture
def panel(ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser) -> list[Any]:
    return normalise("hl7_lab", hl7_raw(PANEL), ctx, terminology, pseudonymiser, NOW_MS)


def test_panel_yields_one_outcome_per_obx_in_order(panel: list[Any]) -> None:
    assert len(panel) == 5
    assert [type(o).__name__ for o in panel] == [
        "NormalisedEvent",
        "NormalisedEvent",
        "NormalisedEvent",
        "RecordRejected",
        "NormalisedEvent",
    ]
    assert [e.value["record_index"] for e in events(panel)] == [0, 1, 2, 4]
    assert {e.value["record_count"] for e in events(panel)} == {5}
    assert {e.kind for e in events(panel)} == {"lab_result"}


def test_local_code_mapped_to_loinc(panel: list[Any], pseudonymiser: Pseudonymiser) -> None:
    potassium = panel[0].value
    assert potassium["loinc_code"] == "2823-3"
    assert (potassium["local_code"], potassium["local_display"]) == ("K", "Potassium")
    assert (potassium["value"], potassium["unit"]) == (6.9, "mmol/L")
    assert (potassium["original_value"], potassium["original_unit"]) == ("6.9", "mmol/L")
    assert potassium["value_text"] is None
    assert (potassium["reference_low"], potassium["reference_high"]) == (3.5, 5.3)
    assert (potassium["abnormal_flag"], potassium["result_status"]) == ("HH", "F")
    assert potassium["mapping_status"] == "mapped"
    assert potassium["order_id"] == "FO-1001"
    assert potassium["event_time"] == ms(2026, 11, 3, 8, 5)  # OBX-14
    assert potassium["person_key"] == pseudonymiser.person_key("H001", MRN)
    assert panel[0].key == potassium["person_key"]


def test_glucose_converted_from_mg_dl_to_mmol_l(panel: list[Any]) -> None:
    glucose = panel[1].value
    assert glucose["loinc_code"] == "2345-7"
    assert (glucose["value"], glucose["unit"]) == (9.99, "mmol/L")  # 180 x 0.0555
    assert (glucose["original_value"], glucose["original_unit"]) == ("180", "mg/dL")
    assert (glucose["reference_low"], glucose["reference_high"]) == (3.885, 6.105)
    assert glucose["event_time"] == ms(2026, 11, 3, 8, 0)  # no OBX-14: OBR-7


def test_ln_coded_obx_uses_the_code_as_loinc(panel: list[Any]) -> None:
    sodium = panel[2].value
    assert (sodium["loinc_code"], sodium["local_code"]) == ("2951-2", "2951-2")
    assert (sodium["value"], sodium["unit"], sodium["mapping_status"]) == (
        141.0,
        "mmol/L",
        "mapped",
    )


def test_non_numeric_nm_value_rejects_only_that_obx(panel: list[Any]) -> None:
    rejected = panel[3]
    assert rejected == RecordRejected(
        record_index=3,
        record_count=5,
        reason_code="invalid_record",
        reason="OBX[3]: OBX-5 value is text of 3 characters, not a number, "
        "but OBX-2 value type is NM",
        organisation_id="H001",
    )


def test_unmapped_text_result_is_kept_as_sent(panel: list[Any]) -> None:
    comment = panel[4].value
    assert comment["loinc_code"] is None
    assert comment["mapping_status"] == "unmapped"
    assert (comment["value"], comment["unit"]) == (None, None)
    assert (comment["value_text"], comment["original_value"]) == ("See note", "See note")
    assert comment["original_unit"] is None


def test_haemolysed_specimen_applies_to_every_obx(panel: list[Any]) -> None:
    assert {e.value["specimen_status"] for e in events(panel)} == {"haemolysed"}


def test_lineage_and_identity(panel: list[Any], ctx: RawContext, terminology: Terminology) -> None:
    for event in events(panel):
        value = event.value
        assert value["event_id"] == event_id("hl7_lab", "H001", "LAB-0001", value["record_index"])
        assert (value["source_kind"], value["source_system"]) == ("hl7_lab", "lis-mllp")
        assert (value["organisation_id"], value["source_ref"]) == ("H001", "LAB-0001")
        assert (value["source_topic"], value["source_partition"], value["source_offset"]) == (
            "raw.hl7_lab",
            3,
            4711,
        )
        assert value["ingest_time"] == ctx.timestamp_ms
        assert value["normalised_time"] == NOW_MS
        assert value["mapping_version"] == terminology.version == "test-2026.1"


def test_event_ids_do_not_depend_on_the_kafka_position(
    panel: list[Any], terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    elsewhere = RawContext("raw.hl7_lab", 0, 1, 1_793_800_000_000)
    again = normalise("hl7_lab", hl7_raw(PANEL), elsewhere, terminology, pseudonymiser, NOW_MS + 9)
    assert [e.value["event_id"] for e in events(again)] == [
        e.value["event_id"] for e in events(panel)
    ]
    assert len({e.value["event_id"] for e in events(panel)}) == 4


def test_panel_records_encode_and_hold_no_identifiers(panel: list[Any]) -> None:
    assert_encodes(panel)
    assert_no_identifiers(panel)


@pytest.mark.parametrize("separator", ["\n", "\r\n"])
def test_other_line_endings_give_the_same_result(
    separator: str,
    panel: list[Any],
    ctx: RawContext,
    terminology: Terminology,
    pseudonymiser: Pseudonymiser,
) -> None:
    outcomes = normalise(
        "hl7_lab", hl7_raw(PANEL, separator), ctx, terminology, pseudonymiser, NOW_MS
    )
    assert outcomes == panel


def test_mllp_framing_is_tolerated(
    panel: list[Any], ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    raw = hl7_raw(PANEL)
    raw["payload"] = "\x0b" + raw["payload"] + "\x1c\r"
    assert normalise("hl7_lab", raw, ctx, terminology, pseudonymiser, NOW_MS) == panel


def run_hl7(
    segments: list[str], ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> list[Any]:
    return normalise("hl7_lab", hl7_raw(segments), ctx, terminology, pseudonymiser, NOW_MS)


@pytest.mark.parametrize(
    ("segments", "reason"),
    [
        (
            [PID, OBR, "OBX|1|NM|K^Potassium^L||4.1|mmol/L"],
            "payload does not start with an MSH segment",
        ),
        ([], "payload does not start with an MSH segment"),
        (
            [MSH.replace("ORU^R01^ORU_R01", "ORM^O01^ORM_O01"), PID],
            "message type ORM^O01 is not supported "
            "(supported: ORU^R01, ADT^A01, ADT^A02, ADT^A03, ADT^A04, ADT^A08)",
        ),
        ([MSH.replace("ORU^R01^ORU_R01", ""), PID], "MSH-9 message type is empty"),
        ([MSH, PID, OBR], "ORU^R01 message has no OBX segment"),
        (
            [
                MSH,
                PID,
                OBR,
                "OBX|1|NM|K^Potassium^L||4.1|mmol/L",
                MSH.replace("LAB-0001", "LAB-0002"),
            ],
            "payload holds 2 MSH segments; one message per record is expected",
        ),
    ],
)
def test_unusable_messages_are_rejected_whole(
    segments: list[str],
    reason: str,
    ctx: RawContext,
    terminology: Terminology,
    pseudonymiser: Pseudonymiser,
) -> None:
    outcomes = run_hl7(segments, ctx, terminology, pseudonymiser)
    assert len(outcomes) == 1
    rejected = outcomes[0]
    assert isinstance(rejected, RecordRejected)
    assert (rejected.record_index, rejected.reason_code, rejected.reason) == (
        None,
        "invalid_message",
        reason,
    )
    assert rejected.organisation_id == "H001"
    assert_no_identifiers(outcomes)


def test_missing_control_id_falls_back_to_the_collector_then_rejects(
    ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    segments = [MSH.replace("LAB-0001", ""), PID, OBR, "OBX|1|NM|K^Potassium^L||4.1|mmol/L"]
    [event] = normalise(
        "hl7_lab", hl7_raw(segments, control_id="COLL-9"), ctx, terminology, pseudonymiser, NOW_MS
    )
    assert isinstance(event, NormalisedEvent)
    assert event.value["source_ref"] == "COLL-9"
    [rejected] = normalise(
        "hl7_lab", hl7_raw(segments, control_id=""), ctx, terminology, pseudonymiser, NOW_MS
    )
    assert isinstance(rejected, RecordRejected)
    assert rejected.reason == "MSH-10 message control id is empty"


def test_unit_neither_local_nor_standard_is_unit_unmapped(
    ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    [event] = run_hl7(
        [MSH, PID, OBR, "OBX|1|NM|K^Potassium^L||27|mg/dL|14-20"], ctx, terminology, pseudonymiser
    )
    value = event.value
    assert value["mapping_status"] == "unit_unmapped"
    assert value["loinc_code"] == "2823-3"
    assert (value["value"], value["unit"]) == (None, None)
    assert (value["original_value"], value["original_unit"], value["value_text"]) == (
        "27",
        "mg/dL",
        "27",
    )
    assert (value["reference_low"], value["reference_high"]) == (None, None)
    assert_encodes([event])


def test_unknown_local_code_never_blocks(
    ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    [event] = run_hl7(
        [MSH, PID, OBR, "OBX|1|NM|ALT^Alanine aminotransferase^L||35|U/L|7-40"],
        ctx,
        terminology,
        pseudonymiser,
    )
    value = event.value
    assert (value["loinc_code"], value["mapping_status"]) == (None, "unmapped")
    assert (value["value"], value["unit"]) == (None, None)
    assert (value["value_text"], value["original_value"], value["original_unit"]) == (
        "35",
        "35",
        "U/L",
    )


def test_unknown_organisation_is_unmapped_not_rejected(
    ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    # The organisation is the one the collector resolved, not whatever MSH-4 (H001) says.
    raw = hl7_raw([MSH, PID, OBR, "OBX|1|NM|K^Potassium^L||4.1|mmol/L"])
    raw["organisation_id"] = "H777"
    [event] = normalise("hl7_lab", raw, ctx, terminology, pseudonymiser, NOW_MS)
    assert event.value["organisation_id"] == "H777"
    assert event.value["mapping_status"] == "unmapped"
    assert event.value["person_key"] == pseudonymiser.person_key("H777", MRN)


def test_ln_code_without_dictionary_entry_keeps_value_and_unit(
    ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    [event] = run_hl7(
        [MSH, PID, OBR, "OBX|1|NM|1742-6^ALT^LN||35|U/L|7-40"], ctx, terminology, pseudonymiser
    )
    value = event.value
    assert (value["loinc_code"], value["mapping_status"]) == ("1742-6", "mapped")
    assert (value["value"], value["unit"]) == (35.0, "U/L")
    assert (value["reference_low"], value["reference_high"]) == (7.0, 40.0)


def test_alternate_ln_triplet_is_used_when_the_local_code_is_unknown(
    ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    [event] = run_hl7(
        [MSH, PID, OBR, "OBX|1|NM|XGLU^Glucose^L^2345-7^Glucose^LN||90|mg/dL"],
        ctx,
        terminology,
        pseudonymiser,
    )
    value = event.value
    assert (value["local_code"], value["loinc_code"]) == ("XGLU", "2345-7")
    assert (value["value"], value["unit"]) == (4.995, "mmol/L")


def test_clotted_specimen_and_sn_values(
    ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    segments = [
        MSH,
        PID,
        OBR,
        "OBX|1|SN|NA^Sodium^L||^139|mmol/L",
        "OBX|2|SN|K^Potassium^L||<^1.0|mmol/L",
        spm("CLT^Clotted"),
    ]
    first, second = run_hl7(segments, ctx, terminology, pseudonymiser)
    assert (first.value["value"], first.value["unit"], first.value["value_text"]) == (
        139.0,
        "mmol/L",
        None,
    )
    assert (second.value["value"], second.value["value_text"]) == (None, "<1.0")
    assert second.value["unit"] == "mmol/L"
    assert {first.value["specimen_status"], second.value["specimen_status"]} == {"clotted"}


def test_times_without_offset_take_the_offset_of_msh_7(
    ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    [event] = run_hl7(
        [MSH, PID, OBR, "OBX|1|NM|K^Potassium^L||4.1|mmol/L||||||||202611030730"],
        ctx,
        terminology,
        pseudonymiser,
    )
    assert event.value["event_time"] == ms(2026, 11, 3, 7, 30)


def test_msh_7_is_the_last_fallback_for_the_observation_time(
    ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    [event] = run_hl7(
        [MSH, PID, "OBR|1||FO-2", "OBX|1|NM|K^Potassium^L||4.1|mmol/L"],
        ctx,
        terminology,
        pseudonymiser,
    )
    assert event.value["event_time"] == ms(2026, 11, 3, 8, 15)
    assert event.value["order_id"] == "FO-2"


def test_bad_observation_time_rejects_the_record(
    ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    segments = [
        MSH,
        PID,
        OBR,
        "OBX|1|NM|K^Potassium^L||4.1|mmol/L||||||||2026-11-03",
        "OBX|2|NM|NA^Sodium^L||140|mmol/L",
    ]
    rejected, sodium = run_hl7(segments, ctx, terminology, pseudonymiser)
    assert rejected == RecordRejected(
        0,
        2,
        "invalid_record",
        "OBX[0]: OBX-14 is not an HL7 timestamp (value is text of 10 characters)",
        "H001",
    )
    assert isinstance(sodium, NormalisedEvent)
    assert sodium.value["record_index"] == 1


def test_no_patient_means_no_person_key(
    ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    pid_without_mrn = f"PID|1||{NATIONAL_ID}^^^CHN^NI||{PATIENT_NAME}"
    [event] = run_hl7(
        [MSH, pid_without_mrn, OBR, "OBX|1|NM|K^Potassium^L||4.1|mmol/L"],
        ctx,
        terminology,
        pseudonymiser,
    )
    assert event.value["person_key"] is None
    assert event.key == "H001|LAB-0001"
    assert_no_identifiers([event])


def test_escaped_text_is_unescaped(
    ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    [event] = run_hl7(
        [MSH, PID, OBR, "OBX|1|ST|NOTE^Note^L||A\\T\\B"], ctx, terminology, pseudonymiser
    )
    assert event.value["value_text"] == "A&B"


# --- EMR row changes -----------------------------------------------------------------------


def visit_row(**overrides: str | None) -> dict[str, str | None]:
    row: dict[str, str | None] = {
        "visit_no": "V-0001",
        "patient_mrn": MRN,
        "patient_name": PATIENT_SURNAME + " ALPHA",
        "id_number": NATIONAL_ID,
        "birth_date": "1970-01-01",
        "sex": "F",
        "visit_type": "I",
        "dept_code": "NK",
        "admit_time": "2026-11-02T09:30:00+08:00",
        "discharge_time": None,
    }
    row.update(overrides)
    return row


def emr_raw(table: str, op: str, row: dict[str, str | None]) -> dict[str, Any]:
    return {
        "message_id": "his-db:0/16B3748:0",
        "organisation_id": "H001",
        "source_system": "his-db",
        "op": op,
        "table": table,
        "before": row if op in ("u", "d") else None,
        "after": None if op == "d" else row,
        "source_position": "0/16B3748",
        "position_seq": 23_808_840,
        "transaction_id": 771,
        "commit_time": datetime(2026, 11, 2, 1, 31, tzinfo=UTC),
        "captured_time": datetime(2026, 11, 2, 1, 31, 1, tzinfo=UTC),
    }


@pytest.fixture
def emr_ctx() -> RawContext:
    return RawContext("raw.emr_cdc", 1, 99, 1_793_600_000_000)


def test_patient_visit_becomes_an_encounter(
    emr_ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    outcomes = normalise(
        "emr_cdc",
        emr_raw("patient_visit", "c", visit_row()),
        emr_ctx,
        terminology,
        pseudonymiser,
        NOW_MS,
    )
    [event] = outcomes
    assert event.kind == "encounter"
    value = event.value
    assert value["encounter_key"] == pseudonymiser.encounter_key("H001", "V-0001")
    assert value["person_key"] == pseudonymiser.person_key("H001", MRN) == event.key
    assert (value["op"], value["is_deleted"], value["version"]) == ("c", False, 23_808_840)
    assert (value["encounter_class"], value["department_local"], value["department_code"]) == (
        "inpatient",
        "NK",
        "03",
    )
    assert value["admit_time"] == value["event_time"] == ms(2026, 11, 2, 9, 30)
    assert value["discharge_time"] is None
    assert (value["birth_year"], value["sex"], value["mapping_status"]) == (1970, "F", "mapped")
    assert (value["source_ref"], value["record_index"], value["record_count"]) == (
        "his-db:0/16B3748:0",
        0,
        1,
    )
    assert value["event_id"] == event_id("emr_cdc", "H001", "his-db:0/16B3748:0", 0)
    assert (value["source_topic"], value["source_offset"]) == ("raw.emr_cdc", 99)
    assert_encodes(outcomes)
    assert_no_identifiers(outcomes)
    assert "1970-01-01" not in repr(outcomes)  # only the birth year leaves


def test_discharge_and_unmapped_department(
    emr_ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    row = visit_row(
        dept_code="XX",
        visit_type="e",
        discharge_time="2026-11-05T10:00:00Z",
        birth_date=None,
        sex=None,
    )
    [event] = normalise(
        "emr_cdc", emr_raw("patient_visit", "u", row), emr_ctx, terminology, pseudonymiser, NOW_MS
    )
    value = event.value
    assert (value["department_code"], value["mapping_status"]) == (None, "unmapped")
    assert value["encounter_class"] == "emergency"
    assert value["discharge_time"] == ms(2026, 11, 5, 10, 0, tz=UTC)
    assert (value["birth_year"], value["sex"]) == (None, None)
    assert_encodes([event])


def test_delete_uses_the_before_image_and_commit_time(
    emr_ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    [event] = normalise(
        "emr_cdc",
        emr_raw("patient_visit", "d", visit_row()),
        emr_ctx,
        terminology,
        pseudonymiser,
        NOW_MS,
    )
    value = event.value
    assert (value["op"], value["is_deleted"]) == ("d", True)
    assert value["event_time"] == ms(2026, 11, 2, 1, 31, tz=UTC)
    assert value["admit_time"] == ms(2026, 11, 2, 9, 30)
    assert_encodes([event])


def test_visit_without_patient_is_keyed_by_encounter(
    emr_ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    [event] = normalise(
        "emr_cdc",
        emr_raw("patient_visit", "c", visit_row(patient_mrn=None)),
        emr_ctx,
        terminology,
        pseudonymiser,
        NOW_MS,
    )
    assert event.value["person_key"] is None
    assert event.key == event.value["encounter_key"]


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"visit_no": None}, "patient_visit.visit_no is missing"),
        ({"visit_no": "  "}, "patient_visit.visit_no is missing"),
        (
            {"admit_time": "yesterday"},
            "patient_visit.admit_time is not an ISO-8601 timestamp (value is text of 9 characters)",
        ),
        (
            {"admit_time": "2026-11-02T09:30:00"},
            "patient_visit.admit_time has no UTC offset (ISO-8601 with offset expected)",
        ),
        (
            {"discharge_time": "2026-13-40T00:00:00+08:00"},
            "patient_visit.discharge_time is not an ISO-8601 timestamp "
            "(value is text of 25 characters)",
        ),
        (
            {"visit_type": "Z"},
            "patient_visit.visit_type is not one of E, I, O (value is text of 1 character)",
        ),
        (
            {"birth_date": "01/01/1970"},
            "patient_visit.birth_date is not a YYYY-MM-DD date (value is text of 10 characters)",
        ),
        ({"dept_code": None}, "patient_visit.dept_code is missing"),
    ],
)
def test_invalid_visit_rows_are_rejected_without_identifiers(
    overrides: dict[str, str | None],
    reason: str,
    emr_ctx: RawContext,
    terminology: Terminology,
    pseudonymiser: Pseudonymiser,
) -> None:
    outcomes = normalise(
        "emr_cdc",
        emr_raw("patient_visit", "c", visit_row(**overrides)),
        emr_ctx,
        terminology,
        pseudonymiser,
        NOW_MS,
    )
    assert outcomes == [RecordRejected(0, 1, "invalid_record", reason, "H001")]
    assert_no_identifiers(outcomes)


def test_unknown_table_rejects_the_message(
    emr_ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    outcomes = normalise(
        "emr_cdc",
        emr_raw("patient_allergy", "c", {"id": "1"}),
        emr_ctx,
        terminology,
        pseudonymiser,
        NOW_MS,
    )
    assert outcomes == [
        RecordRejected(
            None,
            1,
            "unmapped_table",
            "table patient_allergy has no normalised event kind "
            "(known tables: lab_result, patient_visit, visit_diagnosis)",
            "H001",
        )
    ]


def test_row_image_missing_is_rejected(
    emr_ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    raw = emr_raw("patient_visit", "d", visit_row())
    raw["before"] = None
    assert normalise("emr_cdc", raw, emr_ctx, terminology, pseudonymiser, NOW_MS) == [
        RecordRejected(
            0, 1, "invalid_record", "patient_visit: op d without a before row image", "H001"
        )
    ]


def diagnosis_row(**overrides: str | None) -> dict[str, str | None]:
    row: dict[str, str | None] = {
        "diag_id": "D-9",
        "visit_no": "V-0001",
        "patient_mrn": MRN,
        "diag_code": "GX01",
        "diag_name": "Type 2 diabetes (local)",
        "diag_type": "D",
        "diag_time": "2026-11-04T16:00:00+08:00",
    }
    row.update(overrides)
    return row


def test_visit_diagnosis_becomes_a_diagnosis(
    emr_ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    outcomes = normalise(
        "emr_cdc",
        emr_raw("visit_diagnosis", "r", diagnosis_row()),
        emr_ctx,
        terminology,
        pseudonymiser,
        NOW_MS,
    )
    [event] = outcomes
    value = event.value
    assert event.kind == "diagnosis"
    assert (value["icd10_code"], value["local_code"], value["local_display"]) == (
        "E11.9",
        "GX01",
        "Type 2 diabetes (local)",
    )
    assert (value["diagnosis_type"], value["mapping_status"]) == ("discharge", "mapped")
    assert value["event_time"] == ms(2026, 11, 4, 16, 0)
    assert value["encounter_key"] == pseudonymiser.encounter_key("H001", "V-0001")
    assert (value["op"], value["is_deleted"]) == ("r", False)
    assert_encodes(outcomes)
    assert_no_identifiers(outcomes)


def test_unmapped_diagnosis_and_delete(
    emr_ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    row = diagnosis_row(diag_code="LOCAL-77", diag_type="a", diag_time=None)
    [event] = normalise(
        "emr_cdc", emr_raw("visit_diagnosis", "d", row), emr_ctx, terminology, pseudonymiser, NOW_MS
    )
    value = event.value
    assert (value["icd10_code"], value["mapping_status"]) == (None, "unmapped")
    assert (value["diagnosis_type"], value["is_deleted"]) == ("admission", True)
    assert value["event_time"] == ms(2026, 11, 2, 1, 31, tz=UTC)
    # The delete carries the same row key as the create, so it replaces it downstream.
    [created] = normalise(
        "emr_cdc", emr_raw("visit_diagnosis", "c", diagnosis_row(diag_code="LOCAL-77")),
        emr_ctx, terminology, pseudonymiser, NOW_MS,
    )
    assert value["diagnosis_key"] == created.value["diagnosis_key"]
    assert value["diagnosis_key"] == pseudonymiser.row_key("H001", "visit_diagnosis", row["diag_id"])
    assert_encodes([event])


def test_diagnosis_without_time_is_rejected_unless_deleted(
    emr_ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    outcomes = normalise(
        "emr_cdc",
        emr_raw("visit_diagnosis", "c", diagnosis_row(diag_time=None)),
        emr_ctx,
        terminology,
        pseudonymiser,
        NOW_MS,
    )
    assert outcomes == [
        RecordRejected(0, 1, "invalid_record", "visit_diagnosis.diag_time is missing", "H001")
    ]


# --- devices ---------------------------------------------------------------------------------


def device_raw(samples: list[dict[str, Any]], patient_ref: str | None = MRN) -> dict[str, Any]:
    return {
        "packet_id": "P-1",
        "device_id": "DEV-1",
        "device_type": "monitor-a",
        "organisation_id": "H001",
        "source_system": "iot-gw",
        "patient_ref": patient_ref,
        "sent_time": datetime(2026, 11, 3, 0, 0, 5, tzinfo=UTC),
        "samples": samples,
    }


def sample(metric: str, value: float | None, unit: str, second: int = 0) -> dict[str, Any]:
    return {
        "metric": metric,
        "value": value,
        "unit": unit,
        "sample_time": datetime(2026, 11, 3, 0, 0, second, tzinfo=UTC),
    }


def test_device_samples_become_observations(
    terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    ctx = RawContext("raw.device", 0, 5, 1_793_700_000_000)
    raw = device_raw(
        [
            sample("HR", 72.0, "bpm", 0),
            sample("TEMP", 98.6, "[degF]", 1),
            sample("SPO2", 97.0, "%", 2),
            sample("HR", 70.0, "beats", 3),
            sample("HR", math.nan, "bpm", 4),
            sample("HR", None, "bpm", 5),
        ]
    )
    outcomes = normalise("device", raw, ctx, terminology, pseudonymiser, NOW_MS)
    assert len(outcomes) == 6
    hr, temp, spo2, odd_unit, nan, empty = outcomes
    person_key = pseudonymiser.person_key("H001", MRN)
    assert hr.kind == "observation" and hr.key == person_key
    assert (hr.value["metric_code"], hr.value["value"], hr.value["unit"]) == (
        "8867-4",
        72.0,
        "/min",
    )
    assert (hr.value["original_unit"], hr.value["mapping_status"]) == ("bpm", "mapped")
    assert (hr.value["device_id"], hr.value["device_type"], hr.value["local_code"]) == (
        "DEV-1",
        "monitor-a",
        "HR",
    )
    assert hr.value["source_ref"] == "DEV-1:P-1"
    assert hr.value["event_id"] == event_id("device", "H001", "DEV-1:P-1", 0)
    assert hr.value["event_time"] == ms(2026, 11, 3, 0, 0, 0, tz=UTC)
    assert (temp.value["metric_code"], temp.value["value"], temp.value["unit"]) == (
        "8310-5",
        37.0,
        "Cel",
    )
    assert (spo2.value["metric_code"], spo2.value["value"], spo2.value["unit"]) == (
        None,
        None,
        None,
    )
    assert (spo2.value["mapping_status"], spo2.value["original_unit"]) == ("unmapped", "%")
    assert (odd_unit.value["metric_code"], odd_unit.value["mapping_status"]) == (
        "8867-4",
        "unit_unmapped",
    )
    assert (odd_unit.value["value"], odd_unit.value["unit"]) == (None, None)
    assert nan == RecordRejected(
        4, 6, "invalid_record", "samples[4].value is a non-finite number (NaN or infinity)", "H001"
    )
    assert (empty.value["value"], empty.value["unit"], empty.value["mapping_status"]) == (
        None,
        "/min",
        "mapped",
    )
    assert [o.value["record_count"] for o in events(outcomes)] == [6] * 5
    assert_encodes(outcomes)
    assert_no_identifiers(outcomes)


def test_device_without_patient(terminology: Terminology, pseudonymiser: Pseudonymiser) -> None:
    ctx = RawContext("raw.device", 0, 6, 1_793_700_000_000)
    [event] = normalise(
        "device",
        device_raw([sample("HR", 60.0, "bpm")], patient_ref=None),
        ctx,
        terminology,
        pseudonymiser,
        NOW_MS,
    )
    assert event.value["person_key"] is None
    assert event.key == "H001|DEV-1:P-1"


def test_empty_packet_is_dead_lettered_whole_so_it_is_accounted_for(
    terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    ctx = RawContext("raw.device", 0, 7, 1_793_700_000_000)
    assert normalise("device", device_raw([]), ctx, terminology, pseudonymiser, NOW_MS) == [
        RecordRejected(None, 0, "invalid_message", "device packet has no samples", "H001")
    ]


# --- claims ------------------------------------------------------------------------------------


def claim_line(
    line_no: int, item: str, quantity: float = 2.0, price: float = 10.5, amount: float = 21.0
) -> dict[str, Any]:
    return {
        "line_no": line_no,
        "item_code": item,
        "item_display": f"item {item}",
        "quantity": quantity,
        "unit_price": price,
        "amount": amount,
        "service_date": date(2026, 11, 1),
    }


def claim_raw(lines: list[dict[str, Any]], diagnoses: list[str]) -> dict[str, Any]:
    return {
        "claim_id": "CL-500",
        "payer_id": "PAYER-A",
        "organisation_id": "H001",
        "source_system": "claims-feed",
        "submitted_time": datetime(2026, 11, 2, tzinfo=UTC),
        "patient_id_number": NATIONAL_ID,
        "patient_local_id": MRN,
        "encounter_ref": "V-0001",
        "diagnosis_codes": diagnoses,
        "lines": lines,
    }


def test_claim_lines(terminology: Terminology, pseudonymiser: Pseudonymiser) -> None:
    ctx = RawContext("raw.claim", 2, 8, 1_793_700_000_000)
    raw = claim_raw(
        [claim_line(1, "D001"), claim_line(2, "X999"), claim_line(3, "D001", amount=-21.0)],
        ["GX01", "J11.1"],
    )
    outcomes = normalise("claim", raw, ctx, terminology, pseudonymiser, NOW_MS)
    mapped, unmapped, negative = outcomes
    assert mapped.kind == "claim_line"
    assert mapped.key == pseudonymiser.person_key("H001", MRN) == mapped.value["person_key"]
    assert (mapped.value["item_code"], mapped.value["local_item_code"]) == ("C09AA05", "D001")
    assert mapped.value["diagnosis_codes"] == ["E11.9", "J11.1"]
    assert mapped.value["mapping_status"] == "mapped"
    assert (mapped.value["quantity"], mapped.value["unit_price"], mapped.value["amount"]) == (
        2.0,
        10.5,
        21.0,
    )
    assert mapped.value["service_date"] == date(2026, 11, 1)
    assert mapped.value["event_time"] == ms(2026, 11, 1, 0, 0, tz=UTC)
    assert (mapped.value["claim_id"], mapped.value["payer_id"], mapped.value["line_no"]) == (
        "CL-500",
        "PAYER-A",
        1,
    )
    assert mapped.value["source_ref"] == "PAYER-A:CL-500"
    assert mapped.value["event_id"] == event_id("claim", "H001", "PAYER-A:CL-500", 0)
    assert (unmapped.value["item_code"], unmapped.value["mapping_status"]) == (None, "unmapped")
    assert negative == RecordRejected(2, 3, "invalid_record", "lines[2].amount is negative", "H001")
    assert_encodes(outcomes)
    assert_no_identifiers(outcomes)


def test_claim_with_an_unmapped_diagnosis_is_partial(
    terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    ctx = RawContext("raw.claim", 2, 9, 1_793_700_000_000)
    [line] = normalise(
        "claim",
        claim_raw([claim_line(1, "D001")], ["GX01", "LOCAL-5"]),
        ctx,
        terminology,
        pseudonymiser,
        NOW_MS,
    )
    assert line.value["diagnosis_codes"] == ["E11.9", "LOCAL-5"]
    assert line.value["mapping_status"] == "partial"


def test_claim_without_lines_is_rejected(
    terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    ctx = RawContext("raw.claim", 2, 10, 1_793_700_000_000)
    assert normalise("claim", claim_raw([], []), ctx, terminology, pseudonymiser, NOW_MS) == [
        RecordRejected(None, 0, "invalid_message", "claim has no lines", "H001")
    ]


@pytest.mark.parametrize("field", ["quantity", "unit_price"])
def test_negative_quantity_or_price_is_rejected(
    field: str, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    ctx = RawContext("raw.claim", 2, 11, 1_793_700_000_000)
    line = claim_line(1, "D001")
    line[field] = -1.0
    assert normalise("claim", claim_raw([line], []), ctx, terminology, pseudonymiser, NOW_MS) == [
        RecordRejected(0, 1, "invalid_record", f"lines[0].{field} is negative", "H001")
    ]


# --- dispatch and dead letters -------------------------------------------------------------


def test_unknown_source_kind_is_a_wiring_error(
    ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    with pytest.raises(ValueError, match="unknown source kind 'fax'"):
        normalise("fax", {}, ctx, terminology, pseudonymiser, NOW_MS)


def test_dead_letter_record_is_complete_and_encodes(panel: list[Any], ctx: RawContext) -> None:
    rejected = panel[3]
    original = b"\x00\x00\x00\x00\x66original-bytes"
    record = dead_letter_record(
        "normalise", ctx, b"key-bytes", original, rejected, "hl7_lab", NOW_MS
    )
    assert record == {
        "dlq_id": dead_letter_id("normalise", "raw.hl7_lab", 3, 4711, 3, ctx.timestamp_ms),
        "stage": "normalise",
        "reason_code": "invalid_record",
        "reason": rejected.reason,
        "source_kind": "hl7_lab",
        "organisation_id": "H001",
        "original_topic": "raw.hl7_lab",
        "original_partition": 3,
        "original_offset": 4711,
        "record_index": 3,
        "record_count": 5,
        "original_key": b"key-bytes",
        "original_value": original,
        "ingest_time": ctx.timestamp_ms,
        "failed_time": NOW_MS,
    }
    encoded = serde.AvroSerializer(_REGISTRY, serde.DEAD_LETTER)(record)
    decoded = serde.AvroDeserializer(_REGISTRY, serde.DEAD_LETTER)(encoded)
    assert decoded["original_value"] == original


def test_whole_message_dead_letter_has_no_record_index(ctx: RawContext) -> None:
    rejected = RecordRejected(None, None, "undecodable", "not Confluent-framed Avro")
    record = dead_letter_record("normalise", ctx, None, b"junk", rejected, None, NOW_MS)
    assert (record["record_index"], record["record_count"], record["original_key"]) == (
        None,
        None,
        None,
    )
    assert record["dlq_id"] == dead_letter_id("normalise", "raw.hl7_lab", 3, 4711, None, ctx.timestamp_ms)
    serde.AvroSerializer(_REGISTRY, serde.DEAD_LETTER)(record)


# --- robustness of HL7 handling ------------------------------------------------------------


def test_blank_lines_between_segments_are_ignored(
    panel: list[Any], ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    outcomes = normalise(
        "hl7_lab", hl7_raw(PANEL, "\r\n\r\n"), ctx, terminology, pseudonymiser, NOW_MS
    )
    assert outcomes == panel


def test_garbled_message_type_is_described_not_repeated(
    ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    segments = [MSH.replace("ORU^R01^ORU_R01", MRN), PID, OBR]
    [rejected] = run_hl7(segments, ctx, terminology, pseudonymiser)
    assert rejected.reason == (
        "message type (text of 13 characters) is not supported "
        "(supported: ORU^R01, ADT^A01, ADT^A02, ADT^A03, ADT^A04, ADT^A08)"
    )
    assert_no_identifiers([rejected])


def test_impossible_utc_offset_rejects_the_record(
    ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    obx = "OBX|1|NM|K^Potassium^L||4.1|mmol/L||||||||202611030730+9900"
    [rejected] = run_hl7([MSH, PID, OBR, obx], ctx, terminology, pseudonymiser)
    assert rejected == RecordRejected(
        0,
        1,
        "invalid_record",
        "OBX[0]: OBX-14 is not an HL7 timestamp (value is text of 17 characters)",
        "H001",
    )


def test_unmapped_structured_numeric_keeps_the_number_as_text(
    ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    [event] = run_hl7(
        [MSH, PID, OBR, "OBX|1|SN|ZZ^Unknown^L||^12.5|U/L"], ctx, terminology, pseudonymiser
    )
    value = event.value
    assert (value["mapping_status"], value["value"], value["value_text"]) == (
        "unmapped",
        None,
        "12.5",
    )
    assert value["original_value"] == "^12.5"


@pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning")
def test_library_warnings_never_carry_field_content(
    caplog: pytest.LogCaptureFixture,
    ctx: RawContext,
    terminology: Terminology,
    pseudonymiser: Pseudonymiser,
) -> None:
    # A doubled escape character makes python-hl7 log the field it could not unescape.
    pid = f"PID|1||{MRN}^^^H001^MR||{PATIENT_SURNAME}\\\\X^ALPHA"
    obx = f"OBX|1|ST|NOTE^Note^L||{PATIENT_SURNAME}\\\\note"
    with caplog.at_level("DEBUG"):
        outcomes = run_hl7([MSH, pid, OBR, obx], ctx, terminology, pseudonymiser)
    assert len(outcomes) == 1
    assert caplog.records, "the library should have warned about the empty escape sequence"
    for record in caplog.records:
        assert PATIENT_SURNAME not in record.getMessage()
        assert "redacted" in record.getMessage()


# --- issue 15: units, decimal commas and senders' LOINC codes --------------------------------


@pytest.mark.parametrize("unit", ["mEq/L", "meq/L", "MEQ/L", "mmol/l"])
def test_potassium_in_any_spelling_of_its_unit_is_standardised(
    unit: str, ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    """Issue 15: potassium 7.8 mEq/L was stored with value NULL and unit_unmapped."""
    for code in ("K^Potassium^L", "2823-3^Potassium^LN"):
        [event] = run_hl7(
            [MSH, PID, OBR, f"OBX|1|NM|{code}||7.8|{unit}|3.5-5.3|HH|||F"],
            ctx, terminology, pseudonymiser,
        )
        value = event.value
        assert (value["loinc_code"], value["mapping_status"]) == ("2823-3", "mapped")
        assert (value["value"], value["unit"]) == (7.8, "mmol/L")
        assert (value["reference_low"], value["reference_high"]) == (3.5, 5.3)
        assert (value["original_value"], value["original_unit"]) == ("7.8", unit)


def test_a_unit_the_library_cannot_convert_stays_unit_unmapped(
    ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    [event] = run_hl7(
        [MSH, PID, OBR, "OBX|1|NM|K^Potassium^L||7.8|U/L|||||F"], ctx, terminology, pseudonymiser
    )
    value = event.value
    assert (value["mapping_status"], value["value"], value["value_text"]) == (
        "unit_unmapped", None, "7.8"
    )


@pytest.mark.parametrize(("sent", "expected"), [("7,5", 7.5), ("0,25", 0.25), ("12,3456", 12.3456)])
def test_a_decimal_comma_is_read(
    sent: str, expected: float, ctx: RawContext, terminology: Terminology,
    pseudonymiser: Pseudonymiser,
) -> None:
    [event] = run_hl7(
        [MSH, PID, OBR, f"OBX|1|NM|K^Potassium^L||{sent}|mmol/L|||||F"],
        ctx, terminology, pseudonymiser,
    )
    assert (event.value["value"], event.value["original_value"]) == (expected, sent)


def test_an_ambiguous_comma_is_rejected_with_its_reason(
    ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    [rejected] = run_hl7(
        [MSH, PID, OBR, "OBX|1|NM|K^Potassium^L||1,000|mmol/L|||||F"],
        ctx, terminology, pseudonymiser,
    )
    assert isinstance(rejected, RecordRejected)
    assert rejected.reason == (
        "OBX[0]: OBX-5 value is ambiguous: a number with one comma followed by three digits is "
        "ambiguous (decimal comma or thousands separator); send it with a decimal point"
    )


@pytest.mark.parametrize(
    "obx3",
    [
        "KX^Kalium^LN",  # a code sent as if it were LOINC, which no map knows
        "2823-4^Potassium^LN",  # wrong check digit
        "99999-7^Unknown^LN",  # well formed, check digit right, not in the catalogue
        "XK^Kalium^L^K^Kalium^LN",  # the same, in the alternate triplet
    ],
)
def test_a_senders_loinc_code_is_checked_before_it_counts_as_mapped(
    obx3: str, ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    """Issue 15: "K^Kalium^LN" was stored as loinc_code 'K', mapped. A code that is not a
    catalogued LOINC is read as a local code, unmapped when the dictionary lacks it too."""
    [event] = run_hl7(
        [MSH, PID, OBR, f"OBX|1|NM|{obx3}||7.8|mmol/L|||||F"], ctx, terminology, pseudonymiser
    )
    value = event.value
    assert (value["loinc_code"], value["mapping_status"]) == (None, "unmapped")
    assert value["local_code"] == obx3.split("^")[0]
    assert value["value"] is None and value["value_text"] == "7.8"

