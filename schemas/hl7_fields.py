"""How an HL7 v2 field and timestamp are read (shared by the MLLP collector and the normalise
stage, so a message the collector acknowledges is never rejected later for a field the
collector could have checked)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import Final

import hl7
from hl7.util import unescape

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
