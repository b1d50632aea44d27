"""Normalisation of HL7 v2 messages shaped like published real-world examples.

The files in ``tests/streams/hl7/`` recreate the structure of the HL7 v2.5.1 normative
examples (chapter 3 ADT^A01, chapter 7 ORU^R01) and of the CDC/APHL ELR 2.5.1
implementation guide examples (LOINC/UCUM coded, several OBR/OBX groups, SPM), plus one
inpatient visit's ADT sequence. Every patient, identifier and address in them is
synthetic. They are stored with LF line ends for reading and sent with CR, as on the wire.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from schemas.identity import event_id
from streams.model import RawContext, RecordRejected
from streams.pseudonym import Pseudonymiser
from streams.terminology import Terminology

from .test_normalise import NOW_MS, assert_encodes, events, normalise

HL7_DIR = Path(__file__).parent / "hl7"
CST = timezone(timedelta(hours=8))
MST = timezone(timedelta(hours=-7))
RECEIVED = datetime(2026, 11, 6, 12, 0, tzinfo=UTC)

# Synthetic identifiers in the files: no output may carry them.
IDENTIFIERS = (
    "TESTPATIENT",
    "TESTMAIDEN",
    "SYN-MRN-",
    "SYN-PID-",
    "SYN-ELR-",
    "SYN-ACCT-",
    "SYN-VISIT-",
    "999-00-",
    "Synthetic Street",
    "SYNTHETIC",
)


def ms(year: int, month: int, day: int, hour: int, minute: int, tz: timezone = CST) -> int:
    return int(datetime(year, month, day, hour, minute, tzinfo=tz).timestamp() * 1000)


def message(name: str) -> str:
    return (HL7_DIR / name).read_text(encoding="utf-8").replace("\n", "\r")


def raw(name: str, organisation_id: str = "H001") -> dict[str, Any]:
    text = message(name)
    msh = text.split("\r", 1)[0].split("|")
    return {
        "message_control_id": msh[9],
        "organisation_id": organisation_id,
        "source_system": msh[2].split("^")[0],
        "message_type": "^".join(msh[8].split("^")[:2]),
        "received_time": RECEIVED,
        "payload": text,
    }


def run(
    name: str, ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> list[Any]:
    outcomes = normalise("hl7_lab", raw(name), ctx, terminology, pseudonymiser, NOW_MS)
    assert_encodes(outcomes)
    text = repr(outcomes)
    for identifier in IDENTIFIERS:
        assert identifier not in text
    return outcomes


def fields(event: Any, *names: str) -> tuple[Any, ...]:
    return tuple(event.value[name] for name in names)


LAB = (
    "loinc_code",
    "local_code",
    "value",
    "value_text",
    "unit",
    "original_value",
    "original_unit",
    "reference_low",
    "reference_high",
    "abnormal_flag",
    "result_status",
    "mapping_status",
)


# --- HL7 v2.5.1 normative examples --------------------------------------------------------


def test_normative_adt_a01(
    ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    [event] = run("adt_a01_v251_normative.hl7", ctx, terminology, pseudonymiser)
    assert event.kind == "encounter"
    value = event.value
    # No PV1-19 in the example: the PID-18 account number identifies the visit.
    assert value["encounter_key"] == pseudonymiser.encounter_key("H001", "SYN-ACCT-5001")
    assert value["person_key"] == pseudonymiser.person_key("H001", "SYN-MRN-1001")
    assert event.key == value["person_key"]
    assert fields(value_event := event, "op", "is_deleted", "encounter_class") == (
        "c",
        False,
        "inpatient",
    )
    assert value_event.value["department_local"] == "2000"  # PV1-3 point of care
    assert (value["department_code"], value["mapping_status"]) == (None, "unmapped")
    # No PV1-44: an A01 is the admission, so EVN-2 (no offset: UTC, as MSH-7) stands in.
    assert value["admit_time"] == value["event_time"] == ms(2007, 8, 18, 11, 23, tz=UTC)
    assert value["discharge_time"] is None
    assert value["version"] == ms(1988, 8, 18, 11, 26, tz=UTC)  # MSH-7, as in the example
    assert (value["birth_year"], value["sex"]) == (1961, "M")
    assert (value["source_ref"], value["source_system"]) == ("MSG00001", "ADT1")
    assert value["event_id"] == event_id("hl7_lab", "H001", "MSG00001", 0)
    assert (value["record_index"], value["record_count"]) == (0, 1)


def test_normative_oru_r01_glucose(
    ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    [event] = run("oru_r01_v251_normative.hl7", ctx, terminology, pseudonymiser)
    value = event.value
    # OBX-3 names a LOINC code but not the LN coding system, and H001 has no map for it.
    assert fields(event, *LAB) == (
        None,
        "1554-5",
        None,
        "182",  # SN "^182": a plain number, kept as text because it cannot be standardised
        None,
        "^182",
        "mg/dl",
        None,
        None,
        "H",
        "F",
        "unmapped",
    )
    assert value["local_display"] == "GLUCOSE"
    assert value["order_id"] == "1045813"  # OBR-3 filler order number
    assert value["event_time"] == ms(2002, 2, 15, 7, 30, tz=UTC)  # OBR-7
    # PID-3 without an identifier type (v2.3 style) is the patient's internal id.
    assert value["person_key"] == pseudonymiser.person_key("H001", "SYN-PID-4444")
    assert value["specimen_status"] is None


def test_normative_oru_with_the_glucose_code_mapped_converts_value_and_range(
    ctx: RawContext, pseudonymiser: Pseudonymiser
) -> None:
    from streams.terminology import terminology_from_dict

    mapped = terminology_from_dict(
        {
            "version": "t-1",
            "organisations": {
                "H001": {
                    "lab": {
                        "1554-5": {
                            "loinc": "1554-5",
                            "display": "Glucose post 12h fast",
                            "unit": "mmol/L",
                            "local_unit": "mg/dl",
                            "factor": 0.0555,
                        }
                    }
                }
            },
        }
    )
    [event] = normalise(
        "hl7_lab", raw("oru_r01_v251_normative.hl7"), ctx, mapped, pseudonymiser, NOW_MS
    )
    value = event.value
    assert (value["loinc_code"], value["unit"], value["mapping_status"]) == (
        "1554-5",
        "mmol/L",
        "mapped",
    )
    assert value["value"] == pytest.approx(182 * 0.0555)
    # "70_105" as written in the normative example.
    assert value["reference_low"] == pytest.approx(70 * 0.0555)
    assert value["reference_high"] == pytest.approx(105 * 0.0555)
    assert value["value_text"] is None


# --- CDC/APHL ELR 2.5.1 examples ----------------------------------------------------------


def test_elr_blood_lead(
    ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    [event] = run("elr_251_lead.hl7", ctx, terminology, pseudonymiser)
    assert fields(event, *LAB) == (
        "10368-9",
        "10368-9",
        50.0,
        None,
        "ug/dL",  # UCUM, as sent: no dictionary entry for this LOINC code
        "50",
        "ug/dL",
        None,
        9.0,  # "<9 ug/dL"
        "H",
        "F",
        "mapped",
    )
    value = event.value
    assert value["local_display"] == "Lead BldC-mCnc"
    assert value["order_id"] == "9700123"
    assert value["event_time"] == ms(2008, 8, 15, 10, 30, tz=MST)  # OBX-14 with its offset
    # PID-3 holds an MR and an SS identifier: only the MR is used.
    assert value["person_key"] == pseudonymiser.person_key("H001", "SYN-ELR-3636")
    assert (value["source_ref"], value["source_system"]) == ("1234567890", "Lab1")


def test_elr_panel_and_culture(
    ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    outcomes = run("elr_251_panel_and_culture.hl7", ctx, terminology, pseudonymiser)
    assert len(outcomes) == 8
    assert not [o for o in outcomes if isinstance(o, RecordRejected)]
    found = events(outcomes)
    assert [e.value["record_index"] for e in found] == list(range(8))
    assert {e.value["record_count"] for e in found} == {8}
    assert {e.kind for e in found} == {"lab_result"}
    assert len({e.value["event_id"] for e in found}) == 8
    person_key = pseudonymiser.person_key("H001", "SYN-MRN-2002")
    assert {e.value["person_key"] for e in found} == {person_key}
    assert {e.key for e in found} == {person_key}

    glucose, potassium, haemoglobin, cholesterol, titer, comment, organism, count = found
    # Local code mapped by the dictionary (the alternate LN triplet agrees), mg/dL -> mmol/L.
    assert fields(glucose, *LAB) == (
        "2345-7", "GLU", pytest.approx(6.993), None, "mmol/L", "126", "mg/dL",
        pytest.approx(3.885), pytest.approx(5.4945), "H", "F", "mapped",
    )  # fmt: skip
    # SN with a comparator: no numeric value, the text and the unit are kept.
    assert fields(potassium, *LAB) == (
        "2823-3", "2823-3", None, "<2.0", "mmol/L", "<^2.0", "mmol/L",
        3.5, 5.1, "LL", "F", "mapped",
    )  # fmt: skip
    assert fields(haemoglobin, *LAB) == (
        "718-7", "HGB", 132.0, None, "g/L", "13.2", "g/dL", 120.0, 160.0, "N", "F", "mapped",
    )  # fmt: skip
    # A local code nobody mapped yet is kept, unmapped, with the value as sent.
    assert fields(cholesterol, *LAB) == (
        None, "XCHOL", None, "180", None, "180", "mg/dL", None, None, "N", "F", "unmapped",
    )  # fmt: skip
    # SN ratio (titer).
    assert fields(titer, *LAB) == (
        "31147-2", "31147-2", None, "1:64", None, "^1^:^64", None, None, None, "A", "F",
        "mapped",
    )  # fmt: skip
    assert fields(comment, "loinc_code", "value", "value_text", "unit") == (
        "8251-1",
        None,
        "Specimen received at room temperature",
        None,
    )
    # Coded (CWE) result: the organism's name as text, the SNOMED CT code kept as sent.
    assert fields(organism, *LAB) == (
        "625-4", "625-4", None, "Salmonella", None, "27268008^Salmonella^SCT^^^^20080731",
        None, None, None, "A", "F", "mapped",
    )  # fmt: skip
    assert fields(count, "value", "value_text", "unit", "result_status") == (
        None,
        ">100000",
        "{CFU}/mL",
        "P",
    )

    # Two orders, each with its own filler number, time and specimen (SPM-24 of order 1).
    first_order = [glucose, potassium, haemoglobin, cholesterol, titer, comment]
    assert {e.value["order_id"] for e in first_order} == {"FIL-100"}
    assert {e.value["order_id"] for e in (organism, count)} == {"FIL-101"}
    assert {e.value["specimen_status"] for e in first_order} == {"haemolysed"}
    assert {e.value["specimen_status"] for e in (organism, count)} == {None}
    assert {e.value["event_time"] for e in first_order} == {ms(2026, 11, 3, 7, 15)}
    assert {e.value["event_time"] for e in (organism, count)} == {ms(2026, 11, 1, 10, 0)}


def test_two_patients_in_one_oru_keep_their_own_person_key(
    ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    lead = message("elr_251_lead.hl7").rstrip("\r").split("\r")
    second_pid = "PID|2||SYN-MRN-9999^^^MPI^MR||TESTPATIENT^OTHER||19900101|F"
    obr, obx = lead[4], lead[5].replace("||50|", "||7|")
    payload = "\r".join([*lead[:6], second_pid, obr, obx]) + "\r"
    record = raw("elr_251_lead.hl7") | {"payload": payload}
    first, second = normalise("hl7_lab", record, ctx, terminology, pseudonymiser, NOW_MS)
    assert first.value["person_key"] == pseudonymiser.person_key("H001", "SYN-ELR-3636")
    assert second.value["person_key"] == pseudonymiser.person_key("H001", "SYN-MRN-9999")
    assert (first.value["value"], second.value["value"]) == (50.0, 7.0)


# --- one inpatient visit, admission to discharge ------------------------------------------

VISIT = (
    "visit_a01_admit.hl7",
    "visit_a02_transfer.hl7",
    "visit_a08_update.hl7",
    "visit_a03_discharge.hl7",
)


def test_visit_sequence_updates_one_encounter_with_increasing_versions(
    ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    states = []
    for name in VISIT:
        [event] = run(name, ctx, terminology, pseudonymiser)
        assert event.kind == "encounter"
        states.append(event.value)
    encounter_key = pseudonymiser.encounter_key("H001", "SYN-VISIT-7001")
    assert {s["encounter_key"] for s in states} == {encounter_key}
    assert {s["person_key"] for s in states} == {pseudonymiser.person_key("H001", "SYN-MRN-3003")}
    assert [s["op"] for s in states] == ["c", "u", "u", "u"]
    assert [s["version"] for s in states] == [
        ms(2026, 11, 2, 9, 31),
        ms(2026, 11, 3, 14, 5),
        ms(2026, 11, 4, 8, 15),
        ms(2026, 11, 5, 11, 2),
    ]
    assert [(s["department_local"], s["department_code"]) for s in states] == [
        ("NK", "03"),
        ("EM", "07"),
        ("EM", "07"),
        ("EM", "07"),
    ]
    assert {s["admit_time"] for s in states} == {ms(2026, 11, 2, 9, 30)}  # PV1-44
    assert [s["discharge_time"] for s in states] == [None, None, None, ms(2026, 11, 5, 11, 0)]
    assert {s["encounter_class"] for s in states} == {"inpatient"}
    assert {(s["birth_year"], s["sex"]) for s in states} == {(1955, "F")}
    assert {s["mapping_status"] for s in states} == {"mapped"}
    assert len({s["event_id"] for s in states}) == 4


def test_emergency_registration_a04(
    ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    [event] = run("adt_a04_emergency.hl7", ctx, terminology, pseudonymiser)
    value = event.value
    assert fields(event, "op", "encounter_class", "department_local", "department_code") == (
        "c",
        "emergency",
        "EM",
        "07",
    )
    assert value["admit_time"] == ms(2026, 11, 6, 2, 30)  # no PV1-44: EVN-2
    assert value["sex"] == "U"  # "X" is not an administrative sex class here
    assert value["birth_year"] == 2001


def test_update_without_admit_time_is_rejected_not_guessed(
    ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    text = message("visit_a08_update.hl7").replace("|20261102093000+0800", "")
    record = raw("visit_a08_update.hl7") | {"payload": text}
    [rejected] = normalise("hl7_lab", record, ctx, terminology, pseudonymiser, NOW_MS)
    assert rejected == RecordRejected(
        0, 1, "invalid_record", "PV1-44 admit date/time is empty (ADT^A08 needs it)", "H001"
    )


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (("|SYN-VISIT-7001", ""), "no visit number: PV1-19 visit number and PID-18 account "
         "number are empty"),
        (("PV1|1|I|", "PV1|1|Z|"), "PV1-2 patient class is not one of E, I, O (value is Z)"),
        (("PV1|1|I|", "PV1|1||"), "PV1-2 patient class is not one of E, I, O (value is empty)"),
        (("|20261102093000+0800", "|2026-11-02"),
         "PV1-44 is not an HL7 timestamp (value is text of 10 characters)"),
    ],
)  # fmt: skip
def test_unusable_adt_is_rejected_with_a_reason(
    change: tuple[str, str],
    reason: str,
    ctx: RawContext,
    terminology: Terminology,
    pseudonymiser: Pseudonymiser,
) -> None:
    text = "\r".join(
        segment.replace(*change) if segment.startswith("PV1|") else segment
        for segment in message("visit_a01_admit.hl7").split("\r")
    )
    record = raw("visit_a01_admit.hl7") | {"payload": text}
    [rejected] = normalise("hl7_lab", record, ctx, terminology, pseudonymiser, NOW_MS)
    assert isinstance(rejected, RecordRejected)
    assert (rejected.reason_code, rejected.reason) == ("invalid_record", reason)


def test_adt_without_msh_7_takes_the_received_time_as_version(
    ctx: RawContext, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    text = message("visit_a02_transfer.hl7").replace("|20261103140500+0800||ADT", "|||ADT")
    record = raw("visit_a02_transfer.hl7") | {"payload": text}
    [event] = normalise("hl7_lab", record, ctx, terminology, pseudonymiser, NOW_MS)
    assert event.value["version"] == int(RECEIVED.timestamp() * 1000)
