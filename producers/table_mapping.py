"""Which HIS table and column becomes which medstream EMR table and field, shared by CDC collectors.

A hospital database names its tables and columns its own way; the normaliser
(``streams/normalise.py``) understands a fixed set of target tables (``patient_visit``,
``visit_diagnosis``, ``lab_result``) with fixed field names and text formats. A
:class:`TableMapping` per source table says which source column fills which target field;
:func:`validate_mappings` checks the mappings against the live catalog before a collector
starts (unknown table, missing column, type mismatch, all at once), and :func:`map_row`
turns one source row image into the target row image with canonical text values
(:func:`render_value`: timestamps ISO 8601 with offset, dates ``YYYY-MM-DD``).
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Mapping
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Final, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from producers.base import ConfigError


class FieldSpec(NamedTuple):
    """A target field: the type family its source column must have, and whether it is needed."""

    type_family: str
    required: bool = False


#: Type families of source columns (and of target fields).
TYPE_FAMILIES: Final = ("text", "integer", "decimal", "timestamp", "date")

#: Target table -> field -> spec. Field names and formats are those the normaliser reads.
TARGET_FIELDS: Final[dict[str, dict[str, FieldSpec]]] = {
    "patient_visit": {
        "visit_no": FieldSpec("text", True),
        "patient_mrn": FieldSpec("text"),
        "patient_name": FieldSpec("text"),
        "id_number": FieldSpec("text"),
        "phone": FieldSpec("text"),
        "birth_date": FieldSpec("date"),
        "sex": FieldSpec("text"),
        "visit_type": FieldSpec("text", True),
        "dept_code": FieldSpec("text", True),
        "admit_time": FieldSpec("timestamp", True),
        "discharge_time": FieldSpec("timestamp"),
        "death_time": FieldSpec("timestamp"),
    },
    "visit_diagnosis": {
        "diag_id": FieldSpec("text", True),
        "visit_no": FieldSpec("text", True),
        "patient_mrn": FieldSpec("text"),
        "diag_code": FieldSpec("text", True),
        "diag_name": FieldSpec("text"),
        "diag_type": FieldSpec("text", True),
        "diag_time": FieldSpec("timestamp", True),
    },
    "lab_result": {
        "result_id": FieldSpec("text", True),
        "order_id": FieldSpec("text", True),
        "visit_no": FieldSpec("text"),
        "patient_mrn": FieldSpec("text"),
        "test_code": FieldSpec("text", True),
        "test_name": FieldSpec("text"),
        "result_value": FieldSpec("text"),
        "unit": FieldSpec("text"),
        "reference_range": FieldSpec("text"),
        "abnormal_flag": FieldSpec("text"),
        "result_status": FieldSpec("text"),
        "specimen_status": FieldSpec("text"),
        "result_time": FieldSpec("timestamp", True),
    },
}

# Source column families a target field family accepts. Every value renders as text, so a
# text field takes any column; a number field takes only numbers, a time only times.
_ACCEPTS: Final[dict[str, frozenset[str]]] = {
    "text": frozenset(),  # empty: anything
    "integer": frozenset({"integer"}),
    "decimal": frozenset({"integer", "decimal"}),
    "timestamp": frozenset({"timestamp"}),
    "date": frozenset({"date"}),
}

_SOURCE_NAME: Final = re.compile(r"[^.\s]+\.[^.\s]+")


class TableMapping(BaseModel):
    """One source table mapped to one target table: ``columns`` is target field -> source column.

    Source columns not named here are ignored; required target fields must be mapped.
    """

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description='source table: "schema.table" (MariaDB: "database.table")')
    target: str = Field(description="medstream target table: " + ", ".join(TARGET_FIELDS))
    columns: dict[str, str] = Field(min_length=1, description="target field -> source column")

    @model_validator(mode="after")
    def _known_target(self) -> TableMapping:
        if not _SOURCE_NAME.fullmatch(self.source):
            raise ValueError(f"source {self.source!r} must be qualified as schema.table")
        fields = TARGET_FIELDS.get(self.target)
        if fields is None:
            raise ValueError(
                f"{self.source}: unknown target table {self.target!r} "
                f"(known: {', '.join(sorted(TARGET_FIELDS))})"
            )
        unknown = sorted(set(self.columns) - set(fields))
        if unknown:
            raise ValueError(
                f"{self.source}: {self.target} has no field {', '.join(unknown)} "
                f"(fields: {', '.join(fields)})"
            )
        missing = [n for n, spec in fields.items() if spec.required and n not in self.columns]
        if missing:
            raise ValueError(
                f"{self.source}: required {self.target} field {', '.join(missing)} is not mapped"
            )
        empty = sorted(name for name, column in self.columns.items() if not column.strip())
        if empty:
            raise ValueError(f"{self.source}: field {', '.join(empty)} maps to an empty column")
        return self

    @property
    def schema_name(self) -> str:
        """The schema (PostgreSQL) or database (MariaDB) part of ``source``."""
        return self.source.split(".", 1)[0]

    @property
    def table_name(self) -> str:
        """The table part of ``source``."""
        return self.source.split(".", 1)[1]


def validate_mappings(mappings: list[TableMapping], catalog: dict[str, dict[str, str]]) -> None:
    """Check mappings against the live catalog (source table -> column -> type family).

    Raises :class:`ConfigError` listing every problem: unknown table, missing column, a
    column whose type family the target field does not accept.
    """
    problems: list[str] = []
    for mapping in mappings:
        columns = catalog.get(mapping.source)
        if columns is None:
            problems.append(
                f"unknown table {mapping.source} (mapped to {mapping.target}): "
                "it does not exist or is not visible to the collector's user"
            )
            continue
        fields = TARGET_FIELDS[mapping.target]
        for target_field, column in mapping.columns.items():
            family = columns.get(column)
            where = f"{mapping.target}.{target_field}"
            if family is None:
                problems.append(f"{mapping.source} has no column {column} (mapped to {where})")
                continue
            wanted = fields[target_field].type_family
            accepted = _ACCEPTS[wanted]
            if accepted and family not in accepted:
                problems.append(
                    f"type mismatch: {mapping.source}.{column} is {family} "
                    f"but {where} needs {wanted}"
                )
    if problems:
        raise ConfigError("table mapping does not fit the source: " + "; ".join(problems))


_POSTGRES_FAMILIES: Final = {
    "smallint": "integer",
    "integer": "integer",
    "bigint": "integer",
    "numeric": "decimal",
    "decimal": "decimal",
    "real": "decimal",
    "double precision": "decimal",
    "timestamp with time zone": "timestamp",
    "timestamp without time zone": "timestamp",
    "date": "date",
    "text": "text",
    "character varying": "text",
    "character": "text",
    "name": "text",
    "uuid": "text",
    "citext": "text",
    "USER-DEFINED": "text",  # enums and domains over text in practice
}


def type_family_postgres(data_type: str) -> str:
    """The type family of an ``information_schema.columns.data_type`` value of PostgreSQL.

    Types outside the five families (boolean, time, interval, json, bytea, arrays) give
    their own name, which only a text field accepts.
    """
    return _POSTGRES_FAMILIES.get(data_type, data_type.lower())


_MYSQL_FAMILIES: Final = {
    "tinyint": "integer",
    "smallint": "integer",
    "mediumint": "integer",
    "int": "integer",
    "integer": "integer",
    "bigint": "integer",
    "year": "integer",
    "decimal": "decimal",
    "numeric": "decimal",
    "float": "decimal",
    "double": "decimal",
    "real": "decimal",
    "datetime": "timestamp",
    "timestamp": "timestamp",
    "date": "date",
    "char": "text",
    "varchar": "text",
    "tinytext": "text",
    "text": "text",
    "mediumtext": "text",
    "longtext": "text",
    "enum": "text",
    "set": "text",
    "uuid": "text",
}


def type_family_mysql(data_type: str) -> str:
    """The type family of an ``information_schema.COLUMNS.DATA_TYPE`` value of MySQL/MariaDB.

    Other types (time, json, blob, binary, bit) give their own name; only text fields take them.
    """
    name = data_type.strip().lower().split("(", 1)[0].split(" ", 1)[0]
    return _MYSQL_FAMILIES.get(name, name)


def render_value(value: object) -> str | None:
    """A driver's Python value as canonical text: what the normaliser reads.

    Aware datetimes are ISO 8601 with their offset; naive ones carry none (a collector
    attaches the source's time zone first); dates are ``YYYY-MM-DD``; decimals are written
    without exponent. Raises TypeError for values of no known type and ValueError for
    bytes that are not UTF-8, text with lone surrogates, non-finite numbers and containers
    nested too deeply (the value itself is never quoted).
    """
    if value is None:
        return None
    if isinstance(value, str):
        return _unicode(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError("a non-finite decimal cannot be rendered")
        return format(value, "f")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("a non-finite float cannot be rendered")
        return repr(value)
    if isinstance(value, datetime | date | time):  # datetime before date: it is one
        return value.isoformat()
    if isinstance(value, timedelta):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("bytes that are not UTF-8 text cannot be rendered") from None
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, set | frozenset):
        return _unicode(",".join(sorted(str(v) for v in value)))
    if isinstance(value, dict | list):
        try:
            text = json.dumps(
                value, sort_keys=True, ensure_ascii=False, default=str, allow_nan=False
            )
        except RecursionError:
            raise ValueError("a value nested too deeply cannot be rendered") from None
        except ValueError:  # json's own message repeats the value
            raise ValueError("a non-finite number inside a JSON value cannot be rendered") from None
        return _unicode(text)
    raise TypeError(f"a {type(value).__name__} value cannot be rendered as text")


def _unicode(text: str) -> str:
    """Text every reader can encode: lone surrogates (from a driver's error handler) are not."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text that is not valid Unicode cannot be rendered") from None
    return text


class UnmappableRow(ValueError):
    """A source row image cannot be mapped; ``reason`` names table and column, never values."""

    def __init__(self, reason_code: str, reason: str) -> None:
        super().__init__(reason)
        self.reason_code = reason_code
        self.reason = reason


def map_row(mapping: TableMapping, row: Mapping[str, object]) -> dict[str, str | None]:
    """A source row image (column -> driver value) as the target image (field -> text).

    Raises :class:`UnmappableRow` with reason code ``schema_changed`` when a mapped column is
    absent from the image, or ``unrenderable_value`` when a value has no text form.
    """
    missing = [column for column in mapping.columns.values() if column not in row]
    if missing:
        names = ", ".join(dict.fromkeys(missing))
        raise UnmappableRow(
            "schema_changed",
            f"{mapping.source} has no column {names} any more (mapped to {mapping.target}); "
            "the source table was altered",
        )
    image: dict[str, str | None] = {}
    for target_field, column in mapping.columns.items():
        try:
            image[target_field] = render_value(row[column])
        except (TypeError, ValueError) as exc:
            raise UnmappableRow(
                "unrenderable_value",
                f"{mapping.source}.{column} (mapped to {mapping.target}.{target_field}): {exc}",
            ) from None
    return image
