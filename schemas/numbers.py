"""How a clinical number written by a source is read (part of the contract every stage shares).

An edge collector decides with it whether to accept a message (an MLLP sender is answered AE
for a value nobody can read) and the normalise stage reads the same text with it, so a
message acknowledged at the edge is never rejected later for its numbers. Decimal commas
(``7,5``) are read where they are unambiguous; ``1,234`` could be a thousands separator or a
decimal comma and is refused rather than guessed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Final

_POINT_DECIMAL: Final = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
# One decimal comma, no point: "7,5", "-0,25", ",5". "1,234" also reads as one thousand two
# hundred and thirty-four, so those are ambiguous ("0,125" and "1234,567" are not).
_COMMA_DECIMAL: Final = re.compile(r"([+-]?\d*),(\d+)")
_COMPARATOR: Final = re.compile(r"\s*(<=|>=|<|>|=)\s*(.+?)\s*")


class UnreadableNumber(ValueError):
    """A text that should be a number and is not one anybody can read for certain."""


class AmbiguousNumber(UnreadableNumber):
    """A number that reads two ways (``1,234``: 1.234 or 1234): refused rather than guessed."""


@dataclass(frozen=True, slots=True)
class Censored:
    """A value reported only as a bound, such as ``<0.5`` or ``>=7``."""

    comparator: str
    bound: float


def parse_decimal(text: str) -> float:
    """The finite number a source wrote, with a decimal point or an unambiguous comma.

    Raises UnreadableNumber with a reason that does not repeat the text (a value may
    identify a patient when it is not a number at all).
    """
    stripped = text.strip()
    if _POINT_DECIMAL.fullmatch(stripped):
        number = float(stripped)
    else:
        comma = _COMMA_DECIMAL.fullmatch(stripped)
        if comma is None:
            raise UnreadableNumber(
                f"the value ({_text_shape(stripped)}) is not a decimal number"
            )
        whole, fraction = comma.groups()
        sign, digits = (whole[0], whole[1:]) if whole[:1] in ("+", "-") else ("", whole)
        # Only "d,ddd", "dd,ddd" and "ddd,ddd" (no leading zero) read as thousands groups.
        if len(fraction) == 3 and 1 <= len(digits) <= 3 and not digits.startswith("0"):
            raise AmbiguousNumber(
                "a number with one comma followed by three digits is ambiguous (decimal "
                "comma or thousands separator); send it with a decimal point"
            )
        number = float(f"{sign}{digits or '0'}.{fraction}")
    if not math.isfinite(number):
        raise UnreadableNumber("a non-finite number is not a measured value")
    return number


def read_decimal(text: str) -> float | None:
    """:func:`parse_decimal`, or None when the text cannot be read."""
    try:
        return parse_decimal(text)
    except UnreadableNumber:
        return None


def parse_censored(text: str) -> Censored | None:
    """A value sent with a comparator (``<0.5``, ``> 7,5``; ``=5`` is exact and comes back
    with an empty comparator), or None when the text is not one."""
    match = _COMPARATOR.fullmatch(text)
    if match is None:
        return None
    bound = read_decimal(match.group(2))
    comparator = "" if match.group(1) == "=" else match.group(1)
    return None if bound is None else Censored(comparator, bound)


def ambiguity(text: str) -> str | None:
    """Why a number that reads two ways is refused (``1,234``), or None for any other text."""
    try:
        parse_decimal(text)
    except AmbiguousNumber as exc:
        return str(exc)
    except UnreadableNumber:
        pass
    return None


def is_readable_number(text: str) -> bool:
    """True when a value sent as a number reads as one, plain or with a comparator."""
    return read_decimal(text) is not None or parse_censored(text) is not None


_NON_FINITE: Final = frozenset(
    {"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"}
)


def describe_value(text: str) -> str:
    """What a value is, without repeating it (a value that is not a number may identify a
    patient): ``empty``, ``a number``, ``a non-finite number``, ``a number with a
    comparator`` or ``text of N characters``."""
    stripped = text.strip()
    if not stripped:
        return "empty"
    if read_decimal(stripped) is not None:
        return "a number"
    if stripped.lower() in _NON_FINITE:
        return "a non-finite number"
    if parse_censored(stripped) is not None:
        return "a number with a comparator"
    return _text_shape(stripped)


def _text_shape(text: str) -> str:
    if not text:
        return "empty"
    return f"text of {len(text)} character{'s' if len(text) > 1 else ''}"
