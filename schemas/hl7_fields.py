"""How an HL7 v2 field and timestamp are read (shared by the MLLP collector and the normalise
stage, so a message the collector acknowledges is never rejected later for a field the
collector could have checked)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from functools import lru_cache
from typing import Final

import hl7
from hl7.util import unescape

from schemas.numbers import describe_value

_MAX_UTC_OFFSET: Final = timedelta(hours=14)
_HL7_TS: Final = re.compile(
    r"(\d{4})(\d{2})(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,4}))?)?)?)?"
    r"(?:([+-])(\d{2})(\d{2}))?"
)


def hl7_field(segment: hl7.Segment, field: int, component: int = 1, repeat: int = 1) -> str:
    """One component of a segment (its first sub-component), unescaped; "" when absent.

    Walks python-hl7's parse tree (Field -> Repetition -> Component) directly with the
    same results as ``Segment.extract_field``, without building an accessor per call.
    """
    if field >= len(segment):
        return ""
    repetitions = segment[field]
    if repeat > len(repetitions):
        return ""
    part = repetitions[repeat - 1]
    if isinstance(part, str):
        if component != 1:
            return ""
    else:
        if component > len(part):
            return ""
        part = part[component - 1]
        if not isinstance(part, str):
            part = part[0] if len(part) else ""
    if segment.esc in part:
        part = unescape(segment, part)
    return str(part).strip()


def hl7_field_text(segment: hl7.Segment, field: int) -> str:
    """A whole field as sent (repetitions and components kept), unescaped; "" when absent."""
    if field >= len(segment):
        return ""
    return str(unescape(segment, str(segment[field]))).strip()


@lru_cache(maxsize=64)
def _offset(sign: str, hours: str, minutes: str) -> timezone | None:
    """A fixed UTC offset, or None when it is not a real one (beyond +/-14:00)."""
    delta = timedelta(hours=int(hours), minutes=int(minutes))
    if int(minutes) >= 60 or delta > _MAX_UTC_OFFSET:
        return None
    return timezone(-delta if sign == "-" else delta)


def hl7_time(text: str, default_tz: timezone) -> datetime | None:
    """An HL7 DTM (YYYYMMDD[HH[MM[SS[.S]]]][+/-ZZZZ]); None when it is not one."""
    match = _HL7_TS.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, sign, tz_h, tz_m = match.groups()
    tz = _offset(sign, tz_h, tz_m) if sign else default_tz
    if tz is None:
        return None
    try:
        return datetime(
            int(year),
            int(month),
            int(day),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            int((fraction or "0").ljust(6, "0")[:6]),
            tzinfo=tz,
        )
    except ValueError:
        return None


def message_clock(msh7: str) -> tuple[datetime | None, timezone]:
    """MSH-7 read, and the zone of times sent without an offset: MSH-7's own, else UTC."""
    message_time = hl7_time(msh7, UTC) if msh7 else None
    if message_time is not None and isinstance(message_time.tzinfo, timezone):
        return message_time, message_time.tzinfo
    return message_time, UTC


# --- ADT visits: the fields an Encounter needs, checked by the collector and the stage alike ---

#: PV1-2 patient class -> encounter class.
ENCOUNTER_CLASS: Final = {"I": "inpatient", "O": "outpatient", "E": "emergency"}
#: Triggers whose message is itself the admission: the event time stands in for PV1-44.
ADT_ADMITS: Final = frozenset({"A01", "A04"})
_PATIENT_CLASS: Final = re.compile(r"[A-Z]{1,2}")


class Hl7FieldProblem(ValueError):
    """A field that makes a message unusable: a reason without the value, the HL7 error
    code (table 0357: 101 required field missing, 102 data type error, 103 table value not
    found) and the location for ERR-2 (segment^sequence^field)."""

    def __init__(self, reason: str, code: str, location: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.location = location


@dataclass(frozen=True)
class AdtVisit:
    """What an ADT message says about the visit, times already read."""

    pid: hl7.Segment
    pv1: hl7.Segment
    visit_no: str
    encounter_class: str
    department_local: str
    admit_time: datetime
    discharge_time: datetime | None
    death_time: datetime | None


def _field_time(
    segment: hl7.Segment, name: str, field: int, default_tz: timezone
) -> datetime | None:
    """An optional timestamp field; a present but unreadable one is a problem."""
    text = hl7_field(segment, field)
    if not text:
        return None
    moment = hl7_time(text, default_tz)
    if moment is None:
        reason = f"{name}-{field} is not an HL7 timestamp (value is {describe_value(text)})"
        raise Hl7FieldProblem(reason, "102", f"{name}^1^{field}")
    return moment


def adt_event_time(
    evn: hl7.Segment | None, message_time: datetime | None, default_tz: timezone
) -> datetime | None:
    """When the ADT event happened: EVN-6 (occurred), EVN-2 (recorded), else MSH-7."""
    if evn is not None:
        for field in (6, 2):
            moment = _field_time(evn, "EVN", field, default_tz)
            if moment is not None:
                return moment
    return message_time


def read_adt_visit(
    trigger: str,
    segments: Iterable[hl7.Segment],
    message_time: datetime | None,
    default_tz: timezone,
) -> AdtVisit:
    """The visit of an ADT^A01/A02/A03/A04/A08 message; raises :class:`Hl7FieldProblem`.

    The MLLP collector calls it to answer AE instead of AA for a message the normalise
    stage would refuse, and the stage to build the Encounter: one reading, one verdict.
    """
    message_type = f"ADT^{trigger}"
    first: dict[str, hl7.Segment] = {}
    for segment in segments:
        first.setdefault(str(segment[0]) if len(segment) else "", segment)
    pid, pv1, evn = first.get("PID"), first.get("PV1"), first.get("EVN")
    for name, segment in (("PID", pid), ("PV1", pv1)):
        if segment is None:
            raise Hl7FieldProblem(f"{message_type} message has no {name} segment", "100", name)
    assert pid is not None and pv1 is not None
    # PV1-19 visit number; PID-18 account number when the sender keys visits by account.
    visit_no = hl7_field(pv1, 19) or hl7_field(pid, 18)
    if not visit_no:
        raise Hl7FieldProblem(
            "no visit number: PV1-19 visit number and PID-18 account number are empty",
            "101", "PV1^1^19",
        )
    patient_class = hl7_field(pv1, 2).upper()
    if patient_class not in ENCOUNTER_CLASS:
        shown = patient_class if _PATIENT_CLASS.fullmatch(patient_class) else "empty"
        if patient_class and shown == "empty":
            shown = describe_value(patient_class)
        choices = ", ".join(sorted(ENCOUNTER_CLASS))
        raise Hl7FieldProblem(
            f"PV1-2 patient class is not one of {choices} (value is {shown})",
            "103" if patient_class else "101", "PV1^1^2",
        )
    department_local = hl7_field(pv1, 3) or hl7_field(pv1, 10)
    if not department_local:
        raise Hl7FieldProblem(
            "no department: PV1-3 assigned location and PV1-10 hospital service are empty",
            "101", "PV1^1^3",
        )
    event_time = adt_event_time(evn, message_time, default_tz)
    admit_time = _field_time(pv1, "PV1", 44, default_tz)
    if admit_time is None:
        if trigger not in ADT_ADMITS or event_time is None:
            # An update without the admission time would overwrite the stored one.
            raise Hl7FieldProblem(
                f"PV1-44 admit date/time is empty ({message_type} needs it)", "101", "PV1^1^44"
            )
        admit_time = event_time
    discharge_time = _field_time(pv1, "PV1", 45, default_tz)
    if discharge_time is None and trigger == "A03":
        discharge_time = event_time
        if discharge_time is None:
            raise Hl7FieldProblem(
                "ADT^A03 without a discharge time: PV1-45, EVN and MSH-7 are empty",
                "101", "PV1^1^45",
            )
    death_time = _field_time(pid, "PID", 29, default_tz)
    return AdtVisit(
        pid, pv1, visit_no, ENCOUNTER_CLASS[patient_class], department_local, admit_time,
        discharge_time, death_time,
    )
