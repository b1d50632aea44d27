"""Shared hypothesis strategies: valid samples mutated the ways real feeds break.

A mutation is one of: a flipped byte, a truncation, an inserted delimiter or separator, a
deleted or repeated slice, a replaced token (empty, very long, a huge or non-finite number,
wrong type, invalid UTF-8, control characters, a lone surrogate) and fully random bytes.
All generated data is synthetic.
"""

from __future__ import annotations

from datetime import timedelta

from hypothesis import settings
from hypothesis import strategies as st

#: Tokens that break parsers: empty, huge, non-finite, wrong types, bad encodings.
NASTY_TEXT: tuple[str, ...] = (
    "",
    " ",
    "NaN",
    "nan",
    "Infinity",
    "-inf",
    "1e309",
    "-1e309",
    "9" * 40,
    "-" + "9" * 30,
    "1" * 5000,
    "0x1F",
    "1,234",
    "7,5",
    "true",
    "null",
    "[]",
    "{}",
    "\x00",
    "\x7f\x1b[2J",
    "\ufeff",
    "\u202e",
    "患者",
    "\U0001f600",
    "A" * 70_000,
    "2026-13-45T25:61:61",
    "0000-00-00",
    "9999-12-31T23:59:59-23:59",
    "0001-01-01T00:00:00+14:00",
    "19700101",
)
NASTY_BYTES: tuple[bytes, ...] = (
    b"\xff\xfe",
    b"\xc3\x28",
    b"\xed\xa0\x80",  # an encoded lone surrogate: not UTF-8
    b"\x80",
    b"\x00\x00\x00\x00",
    b"\x0b",
    b"\x1c\r",
    b"\r\n",
)


def bounded(examples: int, deadline_s: float = 2.0) -> settings:
    """Settings of one property: ``examples`` examples (ten times as many under the
    properties-long profile) and a per-example deadline."""
    factor = 10 if settings.default.max_examples >= 1000 else 1
    return settings(max_examples=examples * factor, deadline=timedelta(seconds=deadline_s))


@st.composite
def mutated(
    draw: st.DrawFn,
    sample: bytes,
    separators: bytes = b"",
    max_mutations: int = 4,
) -> bytes:
    """``sample`` with 1..``max_mutations`` mutations (separators: the format's delimiters)."""
    data = bytearray(sample)
    for _ in range(draw(st.integers(1, max_mutations))):
        kind = draw(
            st.sampled_from(
                ["flip", "truncate", "separator", "delete", "repeat", "token", "bytes", "random"]
            )
        )
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and data:
            index = min(at, len(data) - 1)
            data[index] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[at:]
        elif kind == "separator" and separators:
            sep = draw(st.sampled_from(sorted(set(separators))))
            data[at:at] = bytes([sep]) * draw(st.integers(1, 3))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 40))]
        elif kind == "repeat":
            data[at:at] = data[at : at + draw(st.integers(1, 200))] * draw(st.integers(1, 5))
        elif kind == "token":
            token = draw(st.sampled_from(NASTY_TEXT)).encode("utf-8")
            data[at : at + draw(st.integers(0, 12))] = token
        elif kind == "bytes":
            data[at:at] = draw(st.sampled_from(NASTY_BYTES))
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


def random_text(max_size: int = 400) -> st.SearchStrategy[str]:
    """Any unicode text, lone surrogates included."""
    return st.text(st.characters(exclude_categories=()), max_size=max_size)
