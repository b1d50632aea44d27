"""The shared HIS-table -> medstream-table mapping: validation, type families, rendering."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from producers.base import ConfigError
from producers.table_mapping import (
    TARGET_FIELDS,
    TableMapping,
    UnmappableRow,
    map_row,
    render_value,
    type_family_mysql,
    type_family_postgres,
    validate_mappings,
)
from streams.normalise import _EMR_TABLES

VISIT_COLUMNS = {
    "visit_no": "visit_no",
    "patient_mrn": "mrn",
    "visit_type": "vtype",
    "dept_code": "dept",
    "admit_time": "admitted",
    "birth_date": "dob",
}


def _visit(**overrides: Any) -> TableMapping:
    data: dict[str, Any] = {
        "source": "public.his_visit",
        "target": "patient_visit",
        "columns": dict(VISIT_COLUMNS),
    }
    data.update(overrides)
    return TableMapping.model_validate(data)


CATALOG = {
    "public.his_visit": {
        "visit_no": "text",
        "mrn": "text",
        "vtype": "text",
        "dept": "text",
        "admitted": "timestamp",
        "dob": "date",
        "bed": "integer",
        "fee": "decimal",
    }
}


def test_every_target_table_has_a_normaliser_and_required_fields() -> None:
    assert set(TARGET_FIELDS) == set(_EMR_TABLES)
    for fields in TARGET_FIELDS.values():
        assert any(spec.required for spec in fields.values())
        assert {spec.type_family for spec in fields.values()} <= {
            "text",
            "integer",
            "decimal",
            "timestamp",
            "date",
        }


def test_mapping_model_rejects_unknown_targets_fields_and_missing_required() -> None:
    with pytest.raises(ValidationError, match="unknown target table 'visits'"):
        _visit(target="visits")
    with pytest.raises(ValidationError, match="patient_visit has no field ward_no"):
        _visit(columns={**VISIT_COLUMNS, "ward_no": "ward"})
    required = dict(VISIT_COLUMNS)
    del required["admit_time"], required["dept_code"]
    with pytest.raises(ValidationError, match="required patient_visit field dept_code, admit_time"):
        _visit(columns=required)
    with pytest.raises(ValidationError, match="must be qualified as schema.table"):
        _visit(source="his_visit")
    with pytest.raises(ValidationError, match="extra"):
        TableMapping.model_validate(
            {"source": "a.b", "target": "patient_visit", "columns": VISIT_COLUMNS, "key": "x"}
        )
    mapping = _visit()
    assert (mapping.schema_name, mapping.table_name) == ("public", "his_visit")


def test_validate_mappings_accepts_a_fitting_catalog() -> None:
    validate_mappings([_visit()], CATALOG)
    # A text field takes any column type (it is rendered as text).
    validate_mappings([_visit(columns={**VISIT_COLUMNS, "patient_mrn": "bed"})], CATALOG)


def test_validate_mappings_lists_every_problem() -> None:
    broken = _visit(columns={**VISIT_COLUMNS, "dept_code": "department", "admit_time": "bed"})
    missing_table = _visit(source="public.gone")
    with pytest.raises(ConfigError) as info:
        validate_mappings([broken, missing_table], CATALOG)
    message = str(info.value)
    assert (
        "public.his_visit has no column department (mapped to patient_visit.dept_code)" in message
    )
    assert (
        "type mismatch: public.his_visit.bed is integer but patient_visit.admit_time needs "
        "timestamp" in message
    )
    assert "unknown table public.gone (mapped to patient_visit)" in message
    with pytest.raises(ConfigError, match="dob is decimal but patient_visit.birth_date needs date"):
        catalog = {"public.his_visit": {**CATALOG["public.his_visit"], "dob": "decimal"}}
        validate_mappings([_visit()], catalog)


def test_decimal_fields_accept_integer_columns() -> None:
    from producers.table_mapping import _ACCEPTS

    assert "integer" in _ACCEPTS["decimal"] and "decimal" not in _ACCEPTS["integer"]


@pytest.mark.parametrize(
    ("data_type", "family"),
    [
        ("integer", "integer"),
        ("bigint", "integer"),
        ("numeric", "decimal"),
        ("double precision", "decimal"),
        ("timestamp with time zone", "timestamp"),
        ("timestamp without time zone", "timestamp"),
        ("date", "date"),
        ("character varying", "text"),
        ("text", "text"),
        ("boolean", "boolean"),
        ("jsonb", "jsonb"),
    ],
)
def test_type_family_postgres(data_type: str, family: str) -> None:
    assert type_family_postgres(data_type) == family


@pytest.mark.parametrize(
    ("data_type", "family"),
    [
        ("int", "integer"),
        ("TINYINT", "integer"),
        ("bigint unsigned", "integer"),
        ("decimal", "decimal"),
        ("double", "decimal"),
        ("datetime", "timestamp"),
        ("timestamp", "timestamp"),
        ("date", "date"),
        ("varchar", "text"),
        ("enum", "text"),
        ("time", "time"),
        ("blob", "blob"),
    ],
)
def test_type_family_mysql(data_type: str, family: str) -> None:
    assert type_family_mysql(data_type) == family


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, None),
        ("Ünïcode 测试", "Ünïcode 测试"),
        (True, "true"),
        (42, "42"),
        (Decimal("1E+2"), "100"),
        (Decimal("4.50"), "4.50"),
        (0.1, "0.1"),
        (
            datetime(2024, 3, 1, 10, 3, 4, tzinfo=timezone(timedelta(hours=8))),
            "2024-03-01T10:03:04+08:00",
        ),
        (datetime(2024, 3, 1, 2, 3, 4, 500000, tzinfo=UTC), "2024-03-01T02:03:04.500000+00:00"),
        (date(1980, 2, 29), "1980-02-29"),
        (time(7, 30), "07:30:00"),
        (b"bytes", "bytes"),
        (uuid.UUID(int=1), "00000000-0000-0000-0000-000000000001"),
        ({"b", "a"}, "a,b"),
        ({"k": [1, 2]}, '{"k": [1, 2]}'),
    ],
)
def test_render_value(value: object, text: str | None) -> None:
    assert render_value(value) == text


def test_render_value_rejects_without_quoting_the_value() -> None:
    with pytest.raises(ValueError, match="not UTF-8") as info:
        render_value(b"\xff\xfePATIENT")
    assert "PATIENT" not in str(info.value)
    with pytest.raises(ValueError, match="non-finite"):
        render_value(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        render_value(Decimal("NaN"))
    with pytest.raises(TypeError, match="a object value"):
        render_value(object())


def test_map_row_renames_renders_and_ignores_unmapped_columns() -> None:
    row = {
        "visit_no": "V1",
        "mrn": "MRN-TEST-1",
        "vtype": "I",
        "dept": "CARD",
        "admitted": datetime(2024, 3, 1, 2, 3, 4, tzinfo=UTC),
        "dob": date(1980, 2, 29),
        "bed": 7,  # unmapped
    }
    assert map_row(_visit(), row) == {
        "visit_no": "V1",
        "patient_mrn": "MRN-TEST-1",
        "visit_type": "I",
        "dept_code": "CARD",
        "admit_time": "2024-03-01T02:03:04+00:00",
        "birth_date": "1980-02-29",
    }


def test_map_row_names_missing_columns_and_unrenderable_values() -> None:
    row = {"visit_no": "V1", "mrn": None, "vtype": "I", "admitted": None}
    with pytest.raises(UnmappableRow) as info:
        map_row(_visit(), row)
    assert info.value.reason_code == "schema_changed"
    assert "public.his_visit has no column dept, dob any more" in info.value.reason
    full = {**row, "dept": "CARD", "dob": b"\xff"}
    with pytest.raises(UnmappableRow) as info:
        map_row(_visit(), full)
    assert info.value.reason_code == "unrenderable_value"
    assert "public.his_visit.dob (mapped to patient_visit.birth_date)" in info.value.reason
