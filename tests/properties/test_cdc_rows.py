"""Property tests of CDC row mapping (producers/table_mapping.py, the PostgreSQL text
reader of producers/postgres_cdc.py) with values of unexpected Python types: Decimal
(non-finite, huge exponents), bytes, naive and aware datetimes, nested containers, None,
huge ints, non-finite floats, text that is not valid Unicode (all identifiers synthetic).

The contract: a row image maps to text fields that make a schema-valid EmrRowChange the
stage can normalise, or map_row raises UnmappableRow with a reason naming the table and
column (the collector dead-letters it); never another exception.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import example, given
from hypothesis import strategies as st
from pymysql.constants import FIELD_TYPE

from producers.mariadb_cdc import MariaDbCdcProducer
from producers.postgres_cdc import parse_text_value
from producers.table_mapping import TableMapping, UnmappableRow, map_row
from tests.properties.pipeline import NOW_MS, round_trip, stage_outcomes
from tests.properties.strategies import NASTY_TEXT, bounded, random_text

LAB = TableMapping.model_validate(
    {
        "source": "public.his_lab",
        "target": "lab_result",
        "columns": {
            "result_id": "rid", "order_id": "oid", "patient_mrn": "mrn", "test_code": "code",
            "result_value": "value", "unit": "unit", "result_time": "at",
        },
    }
)
GOOD_ROW: dict[str, object] = {
    "rid": "R-1", "oid": "O-1", "mrn": "SYNTH-MRN-0001", "code": "K", "value": Decimal("4.1"),
    "unit": "mmol/L", "at": datetime(2026, 11, 3, 8, 0, tzinfo=timezone(timedelta(hours=8))),
}


def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"k": [value]}
    return value


class Opaque:
    """A driver value of a type nobody registered."""


class Deep:
    """Stands for a container nested ``depth`` levels (built in the test: printing the
    value itself would overflow the example printer's stack)."""

    def __init__(self, depth: int) -> None:
        self.depth = depth

    def __repr__(self) -> str:
        return f"Deep({self.depth})"


ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**4000, max_value=10**4400),
    st.floats(),
    st.decimals(),
    st.sampled_from([Decimal("NaN"), Decimal("-Infinity"), Decimal("1E+5000"), Decimal("1E-90")]),
    st.binary(max_size=40),
    st.datetimes(),
    st.datetimes(timezones=st.just(UTC)),
    st.dates(),
    st.times(),
    st.timedeltas(),
    st.uuids(),
    random_text(60),
    st.sampled_from(NASTY_TEXT),
    st.lists(st.one_of(st.integers(), st.floats(), random_text(10)), max_size=4),
    st.dictionaries(random_text(5), st.one_of(st.none(), st.floats(), random_text(5)), max_size=3),
    st.frozensets(st.integers(), max_size=3),
    st.builds(Opaque),
    st.integers(1, 3000).map(Deep),
)


def emr_record(after: dict[str, str | None]) -> dict[str, Any]:
    """The raw EmrRowChange a CDC collector publishes for an insert."""
    return {
        "message_id": f"his:0/{uuid.uuid4().int % 10**9}", "organisation_id": "H001",
        "source_system": "his", "op": "c", "table": LAB.target, "before": None, "after": after,
        "source_position": "0/1", "position_seq": 1, "transaction_id": 7,
        "commit_time": NOW_MS, "captured_time": NOW_MS,
    }


@bounded(500)
@given(column=st.sampled_from(sorted(GOOD_ROW)), value=ODD_VALUES, drop=st.booleans())
# Bugs: text with a lone surrogate (alone, or inside a list or dict) was mapped and then
# failed Avro encoding in the collector (a crash, no dead letter); a dict holding NaN was
# rendered as "NaN" JSON; a deeply nested value raised RecursionError.
@example(column="value", value="4.1\ud800", drop=False)
# Bug (stage): a unit that is a bare UCUM annotation ("{ratio}", "{}") crashed normalise
# with AttributeError (the unit library returned a parser token), stopping the worker.
@example(column="unit", value="{ratio}", drop=False)
@example(column="unit", value={}, drop=False)
# Bug (stage): a unit that is a huge number ("3" and 400 digits) crashed normalise with
# OverflowError in the unit conversion.
@example(column="unit", value=3 * 10**400, drop=False)
# Bug (stage): a unit of 5001 digits took the UCUM parser over six seconds per record.
@example(column="unit", value=Decimal("1E+5000"), drop=False)
@example(column="value", value={"a": float("nan")}, drop=False)
@example(column="value", value=Deep(5000), drop=False)
@example(column="value", value=["\udfff"], drop=False)
def test_every_row_maps_to_a_valid_record_or_is_refused_with_its_column(
    column: str, value: object, drop: bool
) -> None:
    row = dict(GOOD_ROW)
    if isinstance(value, Deep):
        value = nested(value.depth)
    if drop:
        del row[column]
    else:
        row[column] = value
    try:
        image = map_row(LAB, row)
    except UnmappableRow as exc:
        assert exc.reason_code in ("schema_changed", "unrenderable_value")
        assert LAB.source in exc.reason and column in exc.reason
        return
    assert all(v is None or isinstance(v, str) for v in image.values())
    decoded = round_trip("emr_cdc", emr_record(image))
    assert decoded["after"] == image
    stage_outcomes("emr_cdc", decoded)


PG_TYPES = [16, 20, 21, 23, 26, 700, 701, 1700, 1082, 1114, 1184, 25, 1043]


@bounded(400)
@given(
    type_oid=st.sampled_from(PG_TYPES),
    text=st.one_of(
        st.none(), random_text(40), st.sampled_from(NASTY_TEXT),
        st.sampled_from(["infinity", "-infinity", "NaN", "294276-12-31 23:59:59+00",
                         "0044-03-15 BC", "2026-11-03 08:00:00.123456+08", "1e400", "t", "f"]),
    ),
)
# Bug: decimal.InvalidOperation (not a ValueError) escaped the collector's handler.
@example(type_oid=1700, text="not a number")
def test_postgres_text_values_parse_or_raise_value_error(type_oid: int, text: str | None) -> None:
    """What _map catches is ValueError: any other exception would stop the collector."""
    try:
        value = parse_text_value(text, type_oid, ZoneInfo("Asia/Shanghai"))
    except ValueError:
        return
    assert value is None or isinstance(
        value, str | int | float | bool | Decimal | date | datetime | time
    )
    try:
        image = map_row(LAB, {**GOOD_ROW, "value": value})
    except UnmappableRow:
        return
    round_trip("emr_cdc", emr_record(image))


# --- MariaDB: a binlog or snapshot value made canonical, then mapped --------------------------


def mariadb_collector() -> MariaDbCdcProducer:
    """A collector with only what _canonical reads (its source time zone): no connection."""
    collector = MariaDbCdcProducer.__new__(MariaDbCdcProducer)
    collector._zone = ZoneInfo("Asia/Shanghai")
    return collector


MARIADB_TYPES = [
    FIELD_TYPE.TIMESTAMP, 17, FIELD_TYPE.DATETIME, 18, FIELD_TYPE.BIT, FIELD_TYPE.FLOAT,
    FIELD_TYPE.DOUBLE, FIELD_TYPE.NEWDECIMAL, FIELD_TYPE.TIME, FIELD_TYPE.VAR_STRING,
    FIELD_TYPE.BLOB, FIELD_TYPE.JSON, FIELD_TYPE.LONGLONG,
]


@bounded(400)
@given(field_type=st.sampled_from(MARIADB_TYPES), value=ODD_VALUES)
# Bug: a FLOAT value beyond the float32 range raised OverflowError out of float32_text.
@example(field_type=FIELD_TYPE.FLOAT, value=1e39)
@example(field_type=FIELD_TYPE.FLOAT, value=float("nan"))
@example(field_type=FIELD_TYPE.TIME, value=timedelta.max)
def test_mariadb_values_are_canonical_then_mapped_or_refused(
    field_type: int, value: object
) -> None:
    if isinstance(value, Deep):
        value = nested(value.depth)
    canonical = mariadb_collector()._canonical(value, field_type)
    try:
        image = map_row(LAB, {**GOOD_ROW, "value": canonical})
    except UnmappableRow as exc:
        assert exc.reason_code == "unrenderable_value" and "value" in exc.reason
        return
    round_trip("emr_cdc", emr_record(image))
