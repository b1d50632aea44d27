"""The data dictionary: every field of every Avro contract, as rows of ClickHouse's
``data_dictionary`` table (subject, version, schema id, the table it lands in, field, type,
sensitivity, meaning). Written after the migrations by the sink and `medstream migrate`, so
analysts read the contracts the running code uses, never a hand-kept copy."""

from __future__ import annotations

from typing import Any

from clickhouse_connect.driver.client import Client

from schemas import serde

#: Record kinds whose records land in a ClickHouse table of the same name.
_TABLE_BY_SUBJECT = {
    **{subject: kind for kind, subject in serde.NORM_SUBJECT_BY_KIND.items()},
    **{subject: table for table, subject in serde.FACT_SUBJECT_BY_TABLE.items()},
    serde.ALERT: "alert_history",
    serde.DEAD_LETTER: "dead_letter",
}
COLUMNS = [
    "subject", "version", "schema_id", "record_kind", "clickhouse_table", "field", "type",
    "sensitivity", "meaning",
]


def type_text(avro_type: Any) -> str:
    """An Avro type as an analyst reads it: ``string``, ``long (timestamp-millis)``,
    ``null | double``, ``array of string``, ``record``."""
    if isinstance(avro_type, list):
        return " | ".join(type_text(t) for t in avro_type)
    if isinstance(avro_type, dict):
        if "logicalType" in avro_type:
            return f"{avro_type['type']} ({avro_type['logicalType']})"
        if avro_type["type"] == "array":
            return f"array of {type_text(avro_type['items'])}"
        if avro_type["type"] == "enum":
            return "enum (" + ", ".join(avro_type["symbols"]) + ")"
        return str(avro_type["type"])
    return str(avro_type)


def dictionary_rows(registry: serde.ManifestRegistry) -> list[list[Any]]:
    """One row per field (nested record fields dotted) of every version of every subject."""
    rows: list[list[Any]] = []
    for subject in registry.subjects():
        for version in registry.versions(subject):
            definition = version.definition
            head = [
                subject, version.version, version.schema_id,
                str(definition.get("medstream_kind", "")), _TABLE_BY_SUBJECT.get(subject, ""),
            ]
            rows.extend(
                [*head, name, type_text(field["type"]), field.get("sensitivity", ""),
                 field.get("doc", "")]
                for name, field in serde.record_fields(definition)
            )
    return rows


def refresh_data_dictionary(
    client: Client, database: str, registry: serde.ManifestRegistry | None = None
) -> int:
    """Write the current contracts' fields to ``data_dictionary``; returns the row count.

    The table is a ReplacingMergeTree keyed by (subject, version, field): writing it again
    replaces rows, it never duplicates them (read it with FINAL).
    """
    rows = dictionary_rows(registry or serde.ManifestRegistry())
    client.insert(f"{database}.data_dictionary", rows, column_names=COLUMNS)
    return len(rows)
