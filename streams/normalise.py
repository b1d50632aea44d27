"""Pure normalisation: one decoded raw record -> standardised clinical events or rejections.

Each source kind has one function (EMR row change, HL7 ORU^R01 lab message, device packet,
claim) that maps local codes with the terminology dictionary, replaces patient and visit
identifiers by keyed pseudonyms, drops direct identifiers (names, ID numbers) and stamps
every event with its lineage. Nothing here touches Kafka, so a Faust agent only has to
iterate, call :func:`normalise` and route the outcomes.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timezone
from typing import Any, Final

import hl7
import hl7.containers
import hl7.util
from hl7.exceptions import ParseException

from schemas.hl7_fields import (
    ENCOUNTER_CLASS,
    AdtVisit,
    Hl7FieldProblem,
    message_clock,
    read_adt_visit,
)
from schemas.hl7_fields import hl7_field as _field
from schemas.hl7_fields import hl7_field_text as _field_text
from schemas.hl7_fields import hl7_time as _hl7_time
from schemas.identity import dead_letter_id, event_id
from schemas.numbers import ambiguity, parse_censored, read_decimal
from schemas.numbers import describe_value as _value_class
from streams.model import (
    NormalisedEvent,
    Outcome,
    RawContext,
    RecordRejected,
    as_date,
    epoch_ms,
)
from streams.pseudonym import Pseudonymiser
from streams.terminology import Terminology, UnitMapping

SOURCE_KINDS: Final = ("emr_cdc", "hl7_lab", "device", "claim")

_MS_PER_DAY: Final = 86_400_000
_EPOCH_ORDINAL: Final = date(1970, 1, 1).toordinal()
_RANGE: Final = re.compile(
    r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*-\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*"
)
_BOUND: Final = re.compile(r"\s*([<>]=?)\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*")
_TABLE_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,63}")
_MESSAGE_TYPE: Final = re.compile(r"[A-Z]{3}(?:\^[A-Z]\d{2})?")
_SEGMENT_BREAKS: Final = re.compile(r"[\r\n]+")

_ENCOUNTER_CLASS: Final = ENCOUNTER_CLASS
_DIAGNOSIS_TYPE: Final = {"A": "admission", "D": "discharge", "O": "other"}
_SEX: Final = frozenset({"M", "F", "U"})
# SPM-24 specimen condition (HL7 table 0493, plus the CLT spelling some LIS use).
_SPECIMEN_CONDITION: Final = {
    "HEM": "haemolysed",
    "CLT": "clotted",
    "CLOT": "clotted",
    "CON": "contaminated",
    "AUT": "autolysed",
}


class _RedactHl7LogRecords(logging.Filter):
    """python-hl7 logs the raw text of fields it cannot unescape: keep the event, drop the text."""

    def filter(self, record: logging.LogRecord) -> bool:
        summary = str(record.msg).split("[", 1)[0].strip(" ,")
        record.msg = f"python-hl7: {summary} (field content redacted by medstream)"
        record.args = None
        record.exc_info = None
        record.exc_text = None
        return True


def _redact_hl7_library_logs() -> None:
    # The library names its loggers by source file path.
    for module in (hl7.util, hl7.containers):
        logger = logging.getLogger(module.__file__)
        if not any(isinstance(f, _RedactHl7LogRecords) for f in logger.filters):
            logger.addFilter(_RedactHl7LogRecords())


_redact_hl7_library_logs()


class _Invalid(Exception):
    """One record cannot be used; the message is the readable, identifier-free reason."""


# --- small helpers ------------------------------------------------------------------------


def _lineage(
    source_kind: str,
    source_system: str,
    organisation_id: str,
    source_ref: str,
    record_index: int,
    record_count: int,
    event_time: int,
    person_key: str | None,
    ctx: RawContext,
    mapping_version: str,
    now_ms: int,
) -> dict[str, Any]:
    return {
        "event_id": event_id(source_kind, organisation_id, source_ref, record_index),
        "source_kind": source_kind,
        "source_system": source_system,
        "organisation_id": organisation_id,
        "event_time": event_time,
        "ingest_time": ctx.timestamp_ms,
        "normalised_time": now_ms,
        "source_topic": ctx.topic,
        "source_partition": ctx.partition,
        "source_offset": ctx.offset,
        "record_index": record_index,
        "record_count": record_count,
        "source_ref": source_ref,
        "mapping_version": mapping_version,
        "person_key": person_key,
    }


def _fallback_key(organisation_id: str, source_ref: str) -> str:
    # Without a person the records of one source message still share a partition.
    return f"{organisation_id}|{source_ref}"


def _convert(value: float, sent_unit: str, mapping: UnitMapping) -> tuple[float | None, str | None]:
    standard = mapping.to_standard(value, sent_unit)
    return (standard, mapping.unit) if standard is not None else (None, None)


_Standardised = tuple[float | None, str | None, str, float | None, float | None]


def _standardise(
    numeric: float | None,
    sent_unit: str,
    mapping: UnitMapping,
    reference: tuple[float | None, float | None],
) -> _Standardised:
    """A mapped lab test's value, unit, mapping status and reference range in its standard
    unit (as value, unit, mapping_status, reference_low, reference_high). A unit the map
    cannot convert leaves value and range unset and the status ``unit_unmapped``."""
    if numeric is None and not mapping.converts(sent_unit):
        return None, None, ("mapped" if not sent_unit else "unit_unmapped"), None, None
    if numeric is not None:
        value, unit = _convert(numeric, sent_unit, mapping)
    else:
        value, unit = None, mapping.unit
    low, high = reference
    return (
        value,
        unit,
        "mapped" if unit is not None else "unit_unmapped",
        None if low is None else mapping.to_standard(low, sent_unit),
        None if high is None else mapping.to_standard(high, sent_unit),
    )


# --- EMR row changes (CDC) ----------------------------------------------------------------


_Row = Mapping[str, str | None]


def _optional(row: _Row, column: str) -> str | None:
    text = row.get(column)
    if text is None or not text.strip():
        return None
    return text.strip()


def _required(row: _Row, table: str, column: str) -> str:
    text = _optional(row, column)
    if text is None:
        raise _Invalid(f"{table}.{column} is missing")
    return text


def _timestamp_ms(text: str, table: str, column: str) -> int:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise _Invalid(
            f"{table}.{column} is not an ISO-8601 timestamp (value is {_value_class(text)})"
        ) from None
    if moment.tzinfo is None:
        raise _Invalid(f"{table}.{column} has no UTC offset (ISO-8601 with offset expected)")
    return epoch_ms(moment)


def _optional_timestamp_ms(row: _Row, table: str, column: str) -> int | None:
    text = _optional(row, column)
    return None if text is None else _timestamp_ms(text, table, column)


def _coded(text: str, table: str, column: str, allowed: Mapping[str, str] | frozenset[str]) -> str:
    code = text.upper()
    if code not in allowed:
        choices = ", ".join(sorted(allowed))
        raise _Invalid(f"{table}.{column} is not one of {choices} (value is {_value_class(text)})")
    return code


def _encounter(
    raw: Mapping[str, Any],
    row: _Row,
    organisation_id: str,
    ctx: RawContext,
    terminology: Terminology,
    pseudonymiser: Pseudonymiser,
    now_ms: int,
) -> NormalisedEvent:
    table = "patient_visit"
    visit_no = _required(row, table, "visit_no")
    visit_type = _coded(_required(row, table, "visit_type"), table, "visit_type", _ENCOUNTER_CLASS)
    department_local = _required(row, table, "dept_code")
    admit_time = _timestamp_ms(_required(row, table, "admit_time"), table, "admit_time")
    discharge_time = _optional_timestamp_ms(row, table, "discharge_time")
    deceased_time = _optional_timestamp_ms(row, table, "death_time")
    sex_text = _optional(row, "sex")
    sex = None if sex_text is None else _coded(sex_text, table, "sex", _SEX)
    birth_year: int | None = None
    birth_date = _optional(row, "birth_date")
    if birth_date is not None:
        try:
            birth_year = date.fromisoformat(birth_date).year
        except ValueError:
            raise _Invalid(
                f"{table}.birth_date is not a YYYY-MM-DD date (value is {_value_class(birth_date)})"
            ) from None
    op = raw["op"]
    event_time = epoch_ms(raw["commit_time"]) if op == "d" else admit_time
    department_code = terminology.department(organisation_id, department_local)
    value, person_key, encounter_key = _emr_event(
        raw, row, organisation_id, visit_no, event_time, ctx, terminology, pseudonymiser, now_ms
    )
    value.update(
        op=op,
        is_deleted=op == "d",
        version=raw["position_seq"],
        encounter_class=_ENCOUNTER_CLASS[visit_type],
        department_code=department_code,
        department_local=department_local,
        admit_time=admit_time,
        discharge_time=discharge_time,
        birth_year=birth_year,
        sex=sex,
        mapping_status="mapped" if department_code is not None else "unmapped",
        deceased_time=deceased_time,
    )
    return NormalisedEvent("encounter", person_key or encounter_key, value)


def _emr_event(
    raw: Mapping[str, Any],
    row: _Row,
    organisation_id: str,
    visit_no: str,
    event_time: int,
    ctx: RawContext,
    terminology: Terminology,
    pseudonymiser: Pseudonymiser,
    now_ms: int,
) -> tuple[dict[str, Any], str | None, str]:
    """Lineage, person_key and encounter_key shared by the visit events of an EMR row change."""
    value, person_key = _emr_lineage(
        raw, row, organisation_id, event_time, ctx, terminology, pseudonymiser, now_ms
    )
    encounter_key = pseudonymiser.encounter_key(organisation_id, visit_no)
    value["encounter_key"] = encounter_key
    return value, person_key, encounter_key


def _emr_lineage(
    raw: Mapping[str, Any],
    row: _Row,
    organisation_id: str,
    event_time: int,
    ctx: RawContext,
    terminology: Terminology,
    pseudonymiser: Pseudonymiser,
    now_ms: int,
) -> tuple[dict[str, Any], str | None]:
    """Lineage and person_key of the one event an EMR row change becomes."""
    mrn = _optional(row, "patient_mrn")
    person_key = pseudonymiser.person_key(organisation_id, mrn) if mrn else None
    value = _lineage(
        "emr_cdc",
        raw["source_system"],
        organisation_id,
        raw["message_id"],
        0,
        1,
        event_time,
        person_key,
        ctx,
        terminology.version,
        now_ms,
    )
    return value, person_key


def _diagnosis(
    raw: Mapping[str, Any],
    row: _Row,
    organisation_id: str,
    ctx: RawContext,
    terminology: Terminology,
    pseudonymiser: Pseudonymiser,
    now_ms: int,
) -> NormalisedEvent:
    table = "visit_diagnosis"
    op = raw["op"]
    visit_no = _required(row, table, "visit_no")
    diag_id = _required(row, table, "diag_id")
    local_code = _required(row, table, "diag_code")
    diagnosis_type = _coded(_required(row, table, "diag_type"), table, "diag_type", _DIAGNOSIS_TYPE)
    if op == "d":
        # A deleted diagnosis happened at the commit; its own time need not be readable.
        event_time = epoch_ms(raw["commit_time"])
    else:
        event_time = _timestamp_ms(_required(row, table, "diag_time"), table, "diag_time")
    icd10_code = terminology.diagnosis(organisation_id, local_code)
    value, person_key, encounter_key = _emr_event(
        raw, row, organisation_id, visit_no, event_time, ctx, terminology, pseudonymiser, now_ms
    )
    value.update(
        diagnosis_key=pseudonymiser.row_key(organisation_id, table, diag_id),
        op=op,
        is_deleted=op == "d",
        version=raw["position_seq"],
        icd10_code=icd10_code,
        local_code=local_code,
        local_display=_optional(row, "diag_name") or "",
        diagnosis_type=_DIAGNOSIS_TYPE[diagnosis_type],
        mapping_status="mapped" if icd10_code is not None else "unmapped",
    )
    return NormalisedEvent("diagnosis", person_key or encounter_key, value)


def _emr_lab_result(
    raw: Mapping[str, Any],
    row: _Row,
    organisation_id: str,
    ctx: RawContext,
    terminology: Terminology,
    pseudonymiser: Pseudonymiser,
    now_ms: int,
) -> NormalisedEvent:
    """A HIS lab-result row -> one LabResult, mapped and converted like an HL7 OBX.

    Each row change is one result report: an update is a corrected report, a delete
    withdraws the result (``result_status`` D, the HL7 OBX-11 code for a deleted result)
    at the commit time. A delete may carry the key only (default replica identity): the
    withdrawal is then tied to the row by a keyed pseudonym of its result_id in place of
    the unknown order id. Snapshot rows (op r) are ``historic``: stored, raising no alert.
    """
    table = "lab_result"
    op = raw["op"]
    result_id = _required(row, table, "result_id")
    if op == "d":
        # A withdrawal happens at the commit; the before image may hold only the key.
        row_ref = "result:" + pseudonymiser.row_key(organisation_id, table, result_id)
        order_id = _optional(row, "order_id") or row_ref
        local_code = _optional(row, "test_code") or ""
        event_time = epoch_ms(raw["commit_time"])
    else:
        order_id = _required(row, table, "order_id")
        local_code = _required(row, table, "test_code")
        event_time = _timestamp_ms(_required(row, table, "result_time"), table, "result_time")
    sent = _optional(row, "result_value") or ""
    sent_unit = _optional(row, "unit") or ""
    numeric: float | None = read_decimal(sent) if sent else None
    value_text: str | None = None
    if numeric is None and sent:
        # Text, or a censored value such as "<5", is kept as sent.
        value_text = sent.replace(" ", "") if parse_censored(sent) is not None else sent

    mapping = terminology.lab(organisation_id, local_code)
    value: float | None = None
    unit: str | None = None
    reference_low: float | None = None
    reference_high: float | None = None
    if mapping is None:
        mapping_status = "unmapped"
    else:
        reference = _parse_reference_range(_optional(row, "reference_range") or "")
        value, unit, mapping_status, reference_low, reference_high = _standardise(
            numeric, sent_unit, mapping, reference
        )
    if numeric is not None and value is None:
        value_text = sent  # kept as sent when it cannot be standardised

    record, person_key = _emr_lineage(
        raw, row, organisation_id, event_time, ctx, terminology, pseudonymiser, now_ms
    )
    record.update(
        order_id=order_id,
        loinc_code=mapping.code if mapping is not None else None,
        local_code=local_code,
        local_display=_optional(row, "test_name") or "",
        value=value,
        value_text=value_text,
        unit=unit,
        original_value=sent or None,
        original_unit=sent_unit or None,
        abnormal_flag=_optional(row, "abnormal_flag"),
        result_status="D" if op == "d" else _optional(row, "result_status"),
        specimen_status=_optional(row, "specimen_status"),
        mapping_status=mapping_status,
        reference_low=reference_low,
        reference_high=reference_high,
    )
    key = person_key or _fallback_key(organisation_id, order_id)
    # A snapshot row (op r) was in the HIS before the collector started: no alert as if new.
    return NormalisedEvent("lab_result", key, record, historic=op == "r")


def raises_critical_alerts(event: NormalisedEvent) -> bool:
    """Whether the normalise stage should run critical-value detection on this event."""
    return event.kind == "lab_result" and not event.historic


_EmrBuilder = Callable[
    [
        Mapping[str, Any],
        _Row,
        str,
        RawContext,
        Terminology,
        Pseudonymiser,
        int,
    ],
    NormalisedEvent,
]
_EMR_TABLES: Final[dict[str, _EmrBuilder]] = {
    "patient_visit": _encounter,
    "visit_diagnosis": _diagnosis,
    "lab_result": _emr_lab_result,
}


def normalise_emr_row_change(
    raw: Mapping[str, Any],
    ctx: RawContext,
    terminology: Terminology,
    pseudonymiser: Pseudonymiser,
    now_ms: int,
) -> list[Outcome]:
    """One EMR row change (EmrRowChange) -> one Encounter, Diagnosis or LabResult, or a rejection.

    Deletes are read from the ``before`` image and keep the event time of the commit; the
    source position sequence becomes the row version, so the highest version wins downstream.
    """
    organisation_id = raw["organisation_id"]
    table = raw["table"]
    builder = _EMR_TABLES.get(table)
    if builder is None:
        shown = table if _TABLE_NAME.fullmatch(table or "") else f"({_value_class(table)})"
        return [
            RecordRejected(
                None,
                1,
                "unmapped_table",
                f"table {shown} has no normalised event kind "
                f"(known tables: {', '.join(sorted(_EMR_TABLES))})",
                organisation_id,
            )
        ]
    image = "before" if raw["op"] == "d" else "after"
    row = raw.get(image)
    if row is None:
        return [
            RecordRejected(
                0,
                1,
                "invalid_record",
                f"{table}: op {raw['op']} without a {image} row image",
                organisation_id,
            )
        ]
    try:
        event = builder(raw, row, organisation_id, ctx, terminology, pseudonymiser, now_ms)
    except _Invalid as exc:
        return [RecordRejected(0, 1, "invalid_record", str(exc), organisation_id)]
    return [event]


# --- HL7 v2 messages: ORU^R01 lab results --------------------------------------------------


def _specimen_status(spm: hl7.Segment) -> str | None:
    if len(spm) <= 24:
        return None
    repetitions = max(1, len(spm[24]))
    for repeat in range(1, repetitions + 1):
        code = _field(spm, 24, 1, repeat).upper()
        if code:
            return _SPECIMEN_CONDITION.get(code, code.lower())
    return None


def _medical_record_number(pid: hl7.Segment | None) -> str | None:
    """The PID-3 repetition whose identifier type (component 5) is MR, else an untyped one.

    Senders of the v2.3 era put their internal patient id in PID-3 without a type code;
    typed identifiers other than MR (national id, SSN) are never used.
    """
    if pid is None or len(pid) <= 3:
        return None
    untyped: str | None = None
    for repeat in range(1, max(1, len(pid[3])) + 1):
        identifier_type = _field(pid, 3, 5, repeat).upper()
        if identifier_type == "MR":
            return _field(pid, 3, 1, repeat) or None
        if not identifier_type and untyped is None:
            untyped = _field(pid, 3, 1, repeat) or None
    return untyped


_HL7_RANGE: Final = re.compile(
    r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*[-_]\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*"
)
# A reference range followed by its unit ("<9 mcg/dL", "3.5-5.3 mmol/L").
_HL7_RANGE_WITH_UNIT: Final = re.compile(r"(.*?\d\.?)\s*[A-Za-z%/\[\]*µ][^\s]*\s*")
# A comparator with a number where OBX-2 says NM ("<5", ">= 100"): kept as text.
_CODED_VALUE_TYPES: Final = frozenset({"CE", "CWE", "CNE", "CF"})
_LOINC_SYSTEMS: Final = frozenset({"LN", "LOINC"})

#: HL7 v2 message types :func:`normalise_hl7_message` turns into events.
HL7_MESSAGE_TYPES: Final = (
    "ORU^R01",
    "ADT^A01",
    "ADT^A02",
    "ADT^A03",
    "ADT^A04",
    "ADT^A08",
)
# ADT trigger event -> encounter op: admit/register create the visit, the rest update it.
_ADT_OP: Final = {"A01": "c", "A04": "c", "A02": "u", "A03": "u", "A08": "u"}
# Triggers whose message is itself the admission: the event time stands in for PV1-44.


_COMMA_NUMBER: Final = re.compile(r"\d*,\d+")


def _with_decimal_points(text: str) -> str:
    """A range written with decimal commas ("3,5-5,3") in decimal points; unchanged when it
    has a point already, and "" when a comma is ambiguous ("1,000"): no range beats a guess."""
    if "," not in text or "." in text:
        return text
    if any(read_decimal(number) is None for number in _COMMA_NUMBER.findall(text)):
        return ""
    return text.replace(",", ".")


def _parse_reference_range(text: str) -> tuple[float | None, float | None]:
    """OBX-7 as (low, high): "3.5-5.3", "3,5-5,3", "70_105", "<9", ">=60", optionally with a
    unit."""
    text = _with_decimal_points(text)
    for candidate in (text, None):
        if candidate is None:
            with_unit = _HL7_RANGE_WITH_UNIT.fullmatch(text)
            if with_unit is None:
                break
            candidate = with_unit.group(1)
        match = _HL7_RANGE.fullmatch(candidate)
        if match:
            return float(match.group(1)), float(match.group(2))
        match = _BOUND.fullmatch(candidate)
        if match:
            bound = float(match.group(2))
            return (None, bound) if match.group(1).startswith("<") else (bound, None)
    return None, None


@dataclass(frozen=True, slots=True)
class _Hl7Message:
    """The parts of one parsed HL7 message that every event of it shares."""

    organisation_id: str
    control_id: str
    source_system: str
    default_tz: timezone
    message_time: datetime | None
    message_time_text: str


@dataclass(frozen=True, slots=True)
class _Observation:
    """One OBX with the order (OBR), patient and specimen condition it belongs to."""

    obx: hl7.Segment
    obr: hl7.Segment | None
    person_key: str | None
    specimen_status: str | None


def _observation_time(obx: hl7.Segment, obr: hl7.Segment | None, msg: _Hl7Message) -> int:
    candidates = [("OBX-14", _field(obx, 14))]
    if obr is not None:
        candidates.append(("OBR-7", _field(obr, 7)))
    for name, text in candidates:
        if text:
            moment = _hl7_time(text, msg.default_tz)
            if moment is None:
                raise _Invalid(f"{name} is not an HL7 timestamp (value is {_value_class(text)})")
            return epoch_ms(moment)
    if msg.message_time_text:
        if msg.message_time is None:
            raise _Invalid(
                f"MSH-7 is not an HL7 timestamp (value is {_value_class(msg.message_time_text)})"
            )
        return epoch_ms(msg.message_time)
    raise _Invalid("no observation time: OBX-14, OBR-7 and MSH-7 are all empty")


def _coded_text(obx: hl7.Segment) -> str | None:
    """A coded OBX-5 (CE/CWE/CNE) as readable text: its text, original text, else its code."""
    for component in (2, 9, 5, 1):
        text = _field(obx, 5, component)
        if text:
            return text
    return None


def _lab_result(
    observation: _Observation,
    msg: _Hl7Message,
    record_index: int,
    record_count: int,
    ctx: RawContext,
    terminology: Terminology,
    now_ms: int,
) -> NormalisedEvent:
    obx, obr = observation.obx, observation.obr
    organisation_id = msg.organisation_id
    local_code = _field(obx, 3, 1)
    if not local_code:
        raise _Invalid("OBX-3 observation identifier is empty")
    local_display = _field(obx, 3, 2)
    coding_system = _field(obx, 3, 3).upper()

    # Which standard code: the dictionary first, the sender's own LOINC (OBX-3.3 or the
    # alternate triplet OBX-3.4-6 marked LN) otherwise.
    # A sender's LOINC counts only when it is well formed and catalogued (known_loinc):
    # "K^Kalium^LN" is a local code in the wrong coding system, not LOINC "K", so it is
    # looked up as a local code, and is unmapped (on the worklist) when that fails too.
    loinc: str | None = None
    mapping: UnitMapping | None
    if coding_system in _LOINC_SYSTEMS and terminology.known_loinc(local_code):
        loinc = local_code
        mapping = terminology.lab_by_loinc(organisation_id, loinc)
    else:
        mapping = terminology.lab(organisation_id, local_code)
        loinc = mapping.code if mapping is not None else None
        alternate = _field(obx, 3, 4)
        if (
            loinc is None
            and _field(obx, 3, 6).upper() in _LOINC_SYSTEMS
            and terminology.known_loinc(alternate)
        ):
            loinc = alternate
            mapping = terminology.lab_by_loinc(organisation_id, loinc)

    value_type = _field(obx, 2).upper()
    sent = _field_text(obx, 5)
    sent_unit = _field(obx, 6, 1) or _field(obx, 6, 2)
    numeric: float | None = None
    numeric_text = ""
    value_text: str | None = None
    if value_type == "NM" or (not value_type and read_decimal(sent) is not None):
        if sent:
            if (number := read_decimal(sent)) is not None:
                numeric, numeric_text = number, sent
            elif parse_censored(sent) is not None:
                # "<5" sent as NM: a censored value, kept as text like an SN comparator.
                value_text = sent.replace(" ", "")
            else:
                doubt = ambiguity(sent)
                raise _Invalid(
                    f"OBX-5 value is ambiguous: {doubt}"
                    if doubt
                    else f"OBX-5 value is {_value_class(sent)}, not a number, but OBX-2 value "
                    "type is NM"
                )
    elif value_type == "SN":
        comparator, first, separator, second = (_field(obx, 5, c) for c in (1, 2, 3, 4))
        number = read_decimal(first)
        if comparator in ("", "=") and not separator and not second and number is not None:
            numeric, numeric_text = number, first
        else:
            value_text = f"{comparator}{first}{separator}{second}" or None
    elif value_type in _CODED_VALUE_TYPES:
        value_text = _coded_text(obx)
    else:
        value_text = sent or None

    value: float | None = None
    unit: str | None = None
    reference_low, reference_high = _parse_reference_range(_field_text(obx, 7))
    if loinc is None:
        mapping_status = "unmapped"
        reference_low = reference_high = None
    elif mapping is None:
        # The sender coded the test in LOINC and there is no dictionary entry to check the
        # unit against: keep value and unit as sent.
        mapping_status = "mapped"
        value, unit = numeric, (sent_unit or None)
    else:
        value, unit, mapping_status, reference_low, reference_high = _standardise(
            numeric, sent_unit, mapping, (reference_low, reference_high)
        )
    if numeric is not None and value is None:
        value_text = numeric_text  # kept as sent when it cannot be standardised

    value_record = _lineage(
        "hl7_lab",
        msg.source_system,
        organisation_id,
        msg.control_id,
        record_index,
        record_count,
        _observation_time(obx, obr, msg),
        observation.person_key,
        ctx,
        terminology.version,
        now_ms,
    )
    order_id = ""
    if obr is not None:
        order_id = _field(obr, 3) or _field(obr, 2)
    value_record.update(
        order_id=order_id,
        loinc_code=loinc,
        local_code=local_code,
        local_display=local_display,
        value=value,
        value_text=value_text,
        unit=unit,
        original_value=sent or None,
        original_unit=sent_unit or None,
        abnormal_flag=_field(obx, 8) or None,
        result_status=_field(obx, 11) or None,
        specimen_status=observation.specimen_status,
        mapping_status=mapping_status,
        reference_low=reference_low,
        reference_high=reference_high,
    )
    key = observation.person_key or _fallback_key(organisation_id, msg.control_id)
    return NormalisedEvent("lab_result", key, value_record)


def _lab_results(
    segments: list[hl7.Segment],
    msg: _Hl7Message,
    ctx: RawContext,
    terminology: Terminology,
    pseudonymiser: Pseudonymiser,
    now_ms: int,
) -> list[Outcome]:
    """ORU^R01: one LabResult per OBX, each with its own patient (PID), order and specimen."""
    organisation_id = msg.organisation_id
    found: list[tuple[hl7.Segment, hl7.Segment | None, str | None, int]] = []
    specimen_by_order: dict[int, str] = {}
    person_key: str | None = None
    obr: hl7.Segment | None = None
    order = 0
    for segment in segments:
        name = str(segment[0]) if len(segment) else ""
        if name == "OBX":
            found.append((segment, obr, person_key, order))
        elif name == "OBR":
            obr = segment
            order += 1
        elif name == "PID":
            # ORU^R01 repeats PATIENT_RESULT: each PID starts the results of one patient.
            mrn = _medical_record_number(segment)
            person_key = pseudonymiser.person_key(organisation_id, mrn) if mrn else None
            obr = None
        elif name == "SPM" and order not in specimen_by_order:
            status = _specimen_status(segment)
            if status is not None:
                specimen_by_order[order] = status
    count = len(found)
    if not count:
        return [
            RecordRejected(
                None, 0, "invalid_message", "ORU^R01 message has no OBX segment", organisation_id
            )
        ]
    outcomes: list[Outcome] = []
    for index, (obx, parent, person, group) in enumerate(found):
        observation = _Observation(obx, parent, person, specimen_by_order.get(group))
        try:
            outcomes.append(_lab_result(observation, msg, index, count, ctx, terminology, now_ms))
        except _Invalid as exc:
            outcomes.append(
                RecordRejected(
                    index, count, "invalid_record", f"OBX[{index}]: {exc}", organisation_id
                )
            )
    return outcomes


# --- HL7 v2 ADT: admission, transfer, discharge, update -> Encounter -------------------------


def _birth_year(pid: hl7.Segment | None) -> int | None:
    # Only the year is kept; an unreadable birth date does not make the visit unusable.
    text = _field(pid, 7) if pid is not None else ""
    moment = _hl7_time(text, UTC) if text else None
    return moment.year if moment is not None else None


def _administrative_sex(pid: hl7.Segment | None) -> str | None:
    code = _field(pid, 8).upper() if pid is not None else ""
    if not code:
        return None
    return code if code in _SEX else "U"  # O, A, N (HL7 table 0001) have no own class here


def _deceased_time(pid: hl7.Segment, pv1: hl7.Segment, visit: AdtVisit) -> int | None:
    """PID-29 death date/time; else the discharge time when PID-30 says Y or PV1-36 is 20.

    HL7 table 0112 code 20 is "Expired": the visit ended with the patient's death.
    """
    if visit.death_time is not None:
        return epoch_ms(visit.death_time)
    if (_field(pid, 30).upper() == "Y" or _field(pv1, 36) == "20") and visit.discharge_time:
        return epoch_ms(visit.discharge_time)
    return None


def _adt_encounter(
    trigger: str,
    segments: list[hl7.Segment],
    msg: _Hl7Message,
    raw: Mapping[str, Any],
    ctx: RawContext,
    terminology: Terminology,
    pseudonymiser: Pseudonymiser,
    now_ms: int,
) -> NormalisedEvent:
    """ADT^A01/A02/A03/A04/A08 -> one Encounter state whose version is the message time."""
    try:
        visit = read_adt_visit(trigger, segments, msg.message_time, msg.default_tz)
    except Hl7FieldProblem as exc:
        raise _Invalid(exc.reason) from None
    pid, pv1 = visit.pid, visit.pv1
    organisation_id = msg.organisation_id
    visit_no = visit.visit_no
    department_local = visit.department_local
    admit_time = epoch_ms(visit.admit_time)
    discharge_time = epoch_ms(visit.discharge_time) if visit.discharge_time else None
    # Later messages about the same visit must win: the message time orders them.
    version = (
        epoch_ms(msg.message_time)
        if msg.message_time is not None
        else epoch_ms(raw["received_time"])
    )

    mrn = _medical_record_number(pid)
    person_key = pseudonymiser.person_key(organisation_id, mrn) if mrn else None
    encounter_key = pseudonymiser.encounter_key(organisation_id, visit_no)
    department_code = terminology.department(organisation_id, department_local)
    value = _lineage(
        "hl7_lab",
        msg.source_system,
        organisation_id,
        msg.control_id,
        0,
        1,
        admit_time,
        person_key,
        ctx,
        terminology.version,
        now_ms,
    )
    value.update(
        encounter_key=encounter_key,
        op=_ADT_OP[trigger],
        is_deleted=False,
        version=version,
        encounter_class=visit.encounter_class,
        department_code=department_code,
        department_local=department_local,
        admit_time=admit_time,
        discharge_time=discharge_time,
        birth_year=_birth_year(pid),
        sex=_administrative_sex(pid),
        mapping_status="mapped" if department_code is not None else "unmapped",
        deceased_time=_deceased_time(pid, pv1, visit),
    )
    return NormalisedEvent("encounter", person_key or encounter_key, value)


def normalise_hl7_message(
    raw: Mapping[str, Any],
    ctx: RawContext,
    terminology: Terminology,
    pseudonymiser: Pseudonymiser,
    now_ms: int,
) -> list[Outcome]:
    """One HL7 v2 message (Hl7Message) -> events, parsed once.

    ORU^R01 gives one LabResult per OBX; ADT^A01/A02/A03/A04/A08 gives one Encounter.
    The organisation is the one the collector resolved (``organisation_id`` of the raw
    record), not MSH-4, which holds whatever name or OID the sender uses. A message that
    cannot be used at all is rejected whole (``invalid_message``); an OBX that cannot be
    used is rejected alone (``invalid_record``) and the others still count.
    """
    organisation_id = raw["organisation_id"]

    def reject_message(reason: str, record_count: int | None = None) -> list[Outcome]:
        return [RecordRejected(None, record_count, "invalid_message", reason, organisation_id)]

    # MLLP framing bytes and any line-ending convention are tolerated; HL7 separates by CR.
    text = _SEGMENT_BREAKS.sub("\r", raw["payload"].strip(" \t\r\n\x0b\x1c"))
    if not text.startswith("MSH"):
        return reject_message("payload does not start with an MSH segment")
    if len(text) < 8:
        return reject_message("MSH segment is truncated (no encoding characters)")
    try:
        message = hl7.parse(text)
    except (ParseException, ValueError, IndexError, AssertionError) as exc:
        # The library's messages can quote segment text: only the error class is kept.
        return reject_message(f"payload is not parseable HL7 v2 ({type(exc).__name__})")

    segments = list(message)
    headers = [s for s in segments if len(s) and str(s[0]) == "MSH"]
    if not headers:  # cannot happen for a payload starting with MSH; kept as a guard
        return reject_message("payload does not start with an MSH segment")
    if len(headers) > 1:
        return reject_message(
            f"payload holds {len(headers)} MSH segments; one message per record is expected"
        )
    msh = headers[0]
    message_type = (_field(msh, 9, 1).upper(), _field(msh, 9, 2).upper())
    shown = "^".join(message_type).strip("^")
    if shown not in HL7_MESSAGE_TYPES:
        if not shown:
            return reject_message("MSH-9 message type is empty")
        if not _MESSAGE_TYPE.fullmatch(shown):
            shown = f"({_value_class(shown)})"
        return reject_message(
            f"message type {shown} is not supported (supported: {', '.join(HL7_MESSAGE_TYPES)})"
        )
    control_id = _field(msh, 10) or raw["message_control_id"].strip()
    if not control_id:
        return reject_message("MSH-10 message control id is empty")

    message_time_text = _field(msh, 7)
    # Times without an offset are in the sender's zone, i.e. the zone of MSH-7 (else UTC).
    message_time, default_tz = message_clock(message_time_text)
    msg = _Hl7Message(
        organisation_id=organisation_id,
        control_id=control_id,
        source_system=raw["source_system"],
        default_tz=default_tz,
        message_time=message_time,
        message_time_text=message_time_text,
    )
    if message_type[0] == "ORU":
        return _lab_results(segments, msg, ctx, terminology, pseudonymiser, now_ms)
    try:
        event = _adt_encounter(
            message_type[1], segments, msg, raw, ctx, terminology, pseudonymiser, now_ms
        )
    except _Invalid as exc:
        return [RecordRejected(0, 1, "invalid_record", str(exc), organisation_id)]
    return [event]


# --- device telemetry ---------------------------------------------------------------------


def normalise_device_packet(
    raw: Mapping[str, Any],
    ctx: RawContext,
    terminology: Terminology,
    pseudonymiser: Pseudonymiser,
    now_ms: int,
) -> list[Outcome]:
    """One device packet (DevicePacket) -> one Observation per sample, in standard units.

    A packet without samples is dead-lettered whole: it carries no observation, and every
    raw message must end stored or dead-lettered so that reconciliation can account for it.
    """
    organisation_id = raw["organisation_id"]
    device_type = raw["device_type"]
    source_ref = f"{raw['device_id']}:{raw['packet_id']}"
    patient_ref = (raw.get("patient_ref") or "").strip()
    person_key = pseudonymiser.person_key(organisation_id, patient_ref) if patient_ref else None
    key = person_key or _fallback_key(organisation_id, source_ref)
    samples = raw["samples"]
    count = len(samples)
    if not count:
        reason = "device packet has no samples"
        return [RecordRejected(None, 0, "invalid_message", reason, organisation_id)]
    outcomes: list[Outcome] = []
    for index, sample in enumerate(samples):
        metric = sample["metric"].strip()
        sent = sample["value"]
        sent_unit = sample["unit"].strip()
        if not metric:
            outcomes.append(
                RecordRejected(
                    index,
                    count,
                    "invalid_record",
                    f"samples[{index}].metric is empty",
                    organisation_id,
                )
            )
            continue
        if sent is not None and not math.isfinite(sent):
            outcomes.append(
                RecordRejected(
                    index,
                    count,
                    "invalid_record",
                    f"samples[{index}].value is a non-finite number (NaN or infinity)",
                    organisation_id,
                )
            )
            continue
        mapping = terminology.device_metric(organisation_id, device_type, metric)
        value: float | None = None
        unit: str | None = None
        if mapping is None:
            mapping_status = "unmapped"
        elif not mapping.converts(sent_unit):
            mapping_status = "unit_unmapped"
        else:
            mapping_status = "mapped"
            unit = mapping.unit
            if sent is not None:
                value = mapping.to_standard(float(sent), sent_unit)
        record = _lineage(
            "device",
            raw["source_system"],
            organisation_id,
            source_ref,
            index,
            count,
            epoch_ms(sample["sample_time"]),
            person_key,
            ctx,
            terminology.version,
            now_ms,
        )
        record.update(
            device_id=raw["device_id"],
            device_type=device_type,
            metric_code=mapping.code if mapping is not None else None,
            local_code=metric,
            value=value,
            unit=unit,
            original_unit=sent_unit,
            mapping_status=mapping_status,
        )
        outcomes.append(NormalisedEvent("observation", key, record))
    return outcomes


# --- insurance claims ---------------------------------------------------------------------

_AMOUNT_FIELDS: Final = ("quantity", "unit_price", "amount")


def normalise_claim(
    raw: Mapping[str, Any],
    ctx: RawContext,
    terminology: Terminology,
    pseudonymiser: Pseudonymiser,
    now_ms: int,
) -> list[Outcome]:
    """One claim (Claim) -> one ClaimLine per line, with item and diagnosis codes mapped.

    mapping_status is "unmapped" when the item code is unknown, "partial" when the item is
    mapped but a diagnosis code is not (that code is kept as sent), else "mapped".
    """
    organisation_id = raw["organisation_id"]
    source_ref = f"{raw['payer_id']}:{raw['claim_id']}"
    lines = raw["lines"]
    if not lines:
        return [RecordRejected(None, 0, "invalid_message", "claim has no lines", organisation_id)]
    patient = raw["patient_local_id"].strip()
    person_key = pseudonymiser.person_key(organisation_id, patient) if patient else None
    encounter_ref = (raw.get("encounter_ref") or "").strip()
    encounter_key = (
        pseudonymiser.encounter_key(organisation_id, encounter_ref) if encounter_ref else None
    )
    key = person_key or _fallback_key(organisation_id, source_ref)
    diagnosis_codes: list[str] = []
    diagnoses_mapped = True
    for local in raw["diagnosis_codes"]:
        icd10 = terminology.diagnosis(organisation_id, local)
        diagnoses_mapped = diagnoses_mapped and icd10 is not None
        diagnosis_codes.append(icd10 if icd10 is not None else local)
    count = len(lines)
    outcomes: list[Outcome] = []
    for index, line in enumerate(lines):
        problem = None
        for name in _AMOUNT_FIELDS:
            amount = line[name]
            if not math.isfinite(amount):
                problem = f"lines[{index}].{name} is a non-finite number"
            elif amount < 0:
                problem = f"lines[{index}].{name} is negative"
            if problem:
                break
        if problem:
            outcomes.append(
                RecordRejected(index, count, "invalid_record", problem, organisation_id)
            )
            continue
        item_code = terminology.claim_item(organisation_id, line["item_code"])
        if item_code is None:
            mapping_status = "unmapped"
        else:
            mapping_status = "mapped" if diagnoses_mapped else "partial"
        service_date = as_date(line["service_date"])
        event_time = (service_date.toordinal() - _EPOCH_ORDINAL) * _MS_PER_DAY
        record = _lineage(
            "claim",
            raw["source_system"],
            organisation_id,
            source_ref,
            index,
            count,
            event_time,
            person_key,
            ctx,
            terminology.version,
            now_ms,
        )
        record.update(
            claim_id=raw["claim_id"],
            payer_id=raw["payer_id"],
            line_no=line["line_no"],
            item_code=item_code,
            local_item_code=line["item_code"],
            item_display=line["item_display"],
            quantity=float(line["quantity"]),
            unit_price=float(line["unit_price"]),
            amount=float(line["amount"]),
            service_date=service_date,
            diagnosis_codes=list(diagnosis_codes),
            mapping_status=mapping_status,
            encounter_key=encounter_key,
        )
        outcomes.append(NormalisedEvent("claim_line", key, record))
    return outcomes


# --- dispatch and dead letters ------------------------------------------------------------

_Normaliser = Callable[
    [Mapping[str, Any], RawContext, Terminology, Pseudonymiser, int], list[Outcome]
]
_NORMALISERS: Final[dict[str, _Normaliser]] = {
    "emr_cdc": normalise_emr_row_change,
    "hl7_lab": normalise_hl7_message,
    "device": normalise_device_packet,
    "claim": normalise_claim,
}


def normalise(
    source_kind: str,
    raw: dict[str, Any],
    ctx: RawContext,
    terminology: Terminology,
    pseudonymiser: Pseudonymiser,
    now_ms: int,
) -> list[Outcome]:
    """Normalise one decoded raw record of ``source_kind`` (emr_cdc, hl7_lab, device, claim).

    Returns the events and rejections in record order. An unknown source kind is a wiring
    error of the caller and raises ValueError.
    """
    normaliser = _NORMALISERS.get(source_kind)
    if normaliser is None:
        raise ValueError(f"unknown source kind {source_kind!r}; expected one of {SOURCE_KINDS}")
    return normaliser(raw, ctx, terminology, pseudonymiser, now_ms)


def dead_letter_record(
    stage: str,
    ctx: RawContext,
    key: bytes | None,
    value: bytes,
    rejected: RecordRejected,
    source_kind: str | None,
    now_ms: int,
) -> dict[str, Any]:
    """A complete DeadLetter record for a rejection, carrying the original key and value bytes."""
    return {
        "dlq_id": dead_letter_id(
            stage, ctx.topic, ctx.partition, ctx.offset, rejected.record_index, ctx.timestamp_ms
        ),
        "stage": stage,
        "reason_code": rejected.reason_code,
        "reason": rejected.reason,
        "source_kind": source_kind,
        "organisation_id": rejected.organisation_id,
        "original_topic": ctx.topic,
        "original_partition": ctx.partition,
        "original_offset": ctx.offset,
        "record_index": rejected.record_index,
        "record_count": rejected.record_count,
        "original_key": key,
        "original_value": value,
        "ingest_time": ctx.timestamp_ms,
        "failed_time": now_ms,
    }
