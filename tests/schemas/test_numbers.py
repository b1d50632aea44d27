"""How a clinical number written by a source is read (collectors and normalise alike)."""

from __future__ import annotations

import pytest

from schemas.numbers import (
    AmbiguousNumber,
    Censored,
    UnreadableNumber,
    ambiguity,
    is_readable_number,
    parse_censored,
    parse_decimal,
    read_decimal,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7.8", 7.8), (" 7.8 ", 7.8), ("-0.5", -0.5), (".5", 0.5), ("7.", 7.0), ("+3", 3.0),
        ("7,5", 7.5), ("-0,25", -0.25), (",5", 0.5), ("12,3456", 12.3456), ("0,001", 0.001),
        ("1,5", 1.5), ("1234,567", 1234.567),
    ],
)
def test_point_and_unambiguous_comma_decimals_are_read(text: str, expected: float) -> None:
    assert parse_decimal(text) == expected


@pytest.mark.parametrize("text", ["1,000", "12,500", "-3,141"])
def test_one_comma_and_three_digits_is_ambiguous(text: str) -> None:
    with pytest.raises(AmbiguousNumber, match="send it with a decimal point"):
        parse_decimal(text)
    assert ambiguity(text) is not None and read_decimal(text) is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "the value (empty) is not a decimal number"),
        ("abc", "the value (text of 3 characters) is not a decimal number"),
        ("1.234,5", "the value (text of 7 characters) is not a decimal number"),
        ("1,2,3", "the value (text of 5 characters) is not a decimal number"),
        ("1e999", "the value (text of 5 characters) is not a decimal number"),
        ("nan", "the value (text of 3 characters) is not a decimal number"),
    ],
)
def test_unreadable_numbers_name_their_shape_not_their_text(text: str, reason: str) -> None:
    with pytest.raises(UnreadableNumber) as raised:
        parse_decimal(text)
    assert str(raised.value) == reason
    assert ambiguity(text) is None


def test_a_huge_number_is_not_a_measured_value() -> None:
    with pytest.raises(UnreadableNumber, match="non-finite"):
        parse_decimal("9" * 400)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<0.5", Censored("<", 0.5)), ("> 7,5", Censored(">", 7.5)), (">=7", Censored(">=", 7.0)),
        ("<= 2", Censored("<=", 2.0)), ("=5", Censored("", 5.0)), ("<abc", None), ("5", None),
        ("<1,000", None),
    ],
)
def test_censored_values(text: str, expected: Censored | None) -> None:
    assert parse_censored(text) == expected
    assert is_readable_number(text) == (expected is not None or read_decimal(text) is not None)
