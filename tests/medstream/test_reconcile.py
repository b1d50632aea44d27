"""Integration tests of reconciliation on the real ClickHouse engine: gaps are found and named."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from clickhouse_connect.driver.client import Client

from medstream.clickhouse import PROOF_MAX_ROWS, QueryResult, run_read_only
from medstream.reconcile import check_labels, reconcile

pytestmark = pytest.mark.integration
T0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
LEDGER = ["kafka_cluster", "source_kind", "source_topic", "source_partition", "source_offset", "ingest_time", "value_bytes"]
LINEAGE = ["kafka_cluster", "source_topic", "source_partition", "source_offset", "record_index", "record_count", "event_id", "outcome", "ingest_time"]


def querier(client: Client, database: str):  # type: ignore[no-untyped-def]
    def query(sql: str) -> QueryResult:
        return run_read_only(client, sql, database, max_rows=PROOF_MAX_ROWS)

    return query


def seed(client: Client, database: str) -> None:
    """Three HL7 messages and one device packet; message 2 lost one of its 3 records."""
    client.insert(f"{database}.raw_ledger", [
        ["c1", "hl7_lab", "raw.hl7_lab", 0, 1, T0, 100],
        ["c1", "hl7_lab", "raw.hl7_lab", 0, 2, T0, 100],
        ["c1", "hl7_lab", "raw.hl7_lab", 1, 7, T0, 100],
        ["c1", "device", "raw.device", 0, 5, T0, 80],
        ["c1", "device", "raw.device", 0, 6, T0 - timedelta(days=3), 80],  # outside the range
    ], column_names=LEDGER)
    client.insert(f"{database}.lineage", [
        ["c1", "raw.hl7_lab", 0, 1, 0, 2, "e1", "stored:lab_result", T0],
        ["c1", "raw.hl7_lab", 0, 1, 1, 2, "d1", "dead_letter", T0],
        ["c1", "raw.hl7_lab", 0, 2, 0, 3, "e3", "stored:lab_result", T0],
        ["c1", "raw.hl7_lab", 0, 2, 2, 3, "e5", "stored:lab_result", T0],
        ["c1", "raw.hl7_lab", 1, 7, -1, -1, "d2", "dead_letter", T0],  # whole message dead-lettered
        ["c1", "raw.device", 0, 5, 0, 1, "e6", "stored:observation", T0],
    ], column_names=LINEAGE)


def lab_row(event_id: str) -> dict[str, object]:
    return {"event_id": event_id, "source_kind": "hl7_lab", "source_system": "LIS", "organisation_id": "H001",
            "event_time": T0, "ingest_time": T0, "normalised_time": T0, "source_topic": "raw.hl7_lab",
            "source_partition": 0, "source_offset": 1, "record_index": 0, "record_count": 1, "source_ref": "x",
            "mapping_version": "v", "person_key": "p", "order_id": "o", "local_code": "K", "local_display": "K",
            "mapping_status": "mapped"}


def test_reconcile_counts_per_source_and_names_the_gap(clickhouse: Client, database: str) -> None:
    seed(clickhouse, database)
    rows = [lab_row(e) for e in ("e1", "e3", "e5")]
    clickhouse.insert(f"{database}.lab_result", [list(r.values()) for r in rows], column_names=list(rows[0]))
    report = reconcile(querier(clickhouse, database), database, T0 - timedelta(hours=1), T0 + timedelta(hours=1))
    by_kind = {s.source_kind: s for s in report.sources}
    hl7 = by_kind["hl7_lab"]
    assert (hl7.published_messages, hl7.expected_records, hl7.normalised_records) == (3, 5, 3)
    assert (hl7.dead_lettered_records, hl7.dead_lettered_messages, hl7.unaccounted_messages) == (1, 1, 1)
    assert (by_kind["device"].published_messages, by_kind["device"].unaccounted_messages) == (1, 0)
    assert not report.ok
    assert report.gaps[0].startswith("hl7_lab: 1 of 3 raw messages")
    assert "raw.hl7_lab[0]@2: 2 of 3 records" in "\n".join(report.gaps)
    assert report.stored_events["lab_result"] == 3
    # observation e6 is in the lineage but not in its table: named too
    assert "observation: 1 events in the lineage are missing from the table" in report.gaps


def test_reconcile_reports_no_gap_when_everything_is_accounted(clickhouse: Client, database: str) -> None:
    clickhouse.insert(f"{database}.raw_ledger", [["c1", "device", "raw.device", 0, 5, T0, 80]], column_names=LEDGER)
    report = reconcile(querier(clickhouse, database), database, T0 - timedelta(hours=1), T0 + timedelta(hours=1))
    assert not report.ok and "no outcome at all" in "\n".join(report.gaps)
    clickhouse.insert(f"{database}.lineage", [["c1", "raw.device", 0, 5, -1, -1, "d", "dead_letter", T0]], column_names=LINEAGE)
    report = reconcile(querier(clickhouse, database), database, T0 - timedelta(hours=1), T0 + timedelta(hours=1))
    assert report.ok and report.gaps == []
    assert "no gap" in report.render()


def test_labels_check_finds_missing_and_duplicate_alerts(clickhouse: Client, database: str) -> None:
    rows = [lab_row("e1"), lab_row("e1"), lab_row("e2")]  # e1 written twice: collapses under FINAL
    clickhouse.insert(f"{database}.lab_result", [list(r.values()) for r in rows], column_names=list(rows[0]))
    labels = [
        {"event_id": e, "kind": "lab_result", "expect": "stored", "critical_rule": None, "duplicate_delivery": False}
        for e in ("e1", "e2", "e3")
    ]
    check = check_labels(querier(clickhouse, database), database, labels)
    assert (check.expected_events, check.stored_events, check.missing_events) == (3, 2, ["e3"])
    assert check.duplicated_events == 0 and not check.ok


def test_same_position_on_two_broker_lives_is_accounted_separately(clickhouse: Client, database: str) -> None:
    # An embedded broker restarts its offsets at 0; each start has its own cluster id.
    clickhouse.insert(f"{database}.raw_ledger", [
        ["first-life", "device", "raw.device", 0, 0, T0, 80],
        ["second-life", "device", "raw.device", 0, 0, T0, 80],
    ], column_names=LEDGER)
    clickhouse.insert(f"{database}.lineage", [
        ["first-life", "raw.device", 0, 0, 0, 1, "e1", "stored:observation", T0],
    ], column_names=LINEAGE)
    report = reconcile(querier(clickhouse, database), database, T0 - timedelta(hours=1), T0 + timedelta(hours=1))
    [device] = report.sources
    assert (device.published_messages, device.unaccounted_messages) == (2, 1)


def test_range_bounds_with_an_offset_are_converted_to_utc(clickhouse: Client, database: str) -> None:
    from datetime import timezone

    clickhouse.insert(f"{database}.raw_ledger", [["c1", "device", "raw.device", 0, 1, T0, 80]], column_names=LEDGER)
    cst = timezone(timedelta(hours=8))
    around_t0 = reconcile(  # 15:30..16:30 in UTC+8 is 07:30..08:30 UTC
        querier(clickhouse, database), database,
        datetime(2026, 11, 20, 15, 30, tzinfo=cst), datetime(2026, 11, 20, 16, 30, tzinfo=cst),
    )
    assert [s.published_messages for s in around_t0.sources] == [1]
    naive_hours_later = reconcile(
        querier(clickhouse, database), database,
        datetime(2026, 11, 20, 15, 30), datetime(2026, 11, 20, 16, 30),
    )
    assert naive_hours_later.sources == []


def test_reconcile_accounts_per_collector_including_its_own_dead_letters(
    clickhouse: Client, database: str
) -> None:
    ledger = [*LEDGER[:2], "collector", *LEDGER[2:]]
    clickhouse.insert(f"{database}.raw_ledger", [
        ["c1", "emr_cdc", "his-pg", "raw.emr_cdc", 0, 1, T0, 90],
        ["c1", "emr_cdc", "his-pg", "raw.emr_cdc", 0, 2, T0, 90],
        ["c1", "hl7_lab", "lis-mllp", "raw.hl7_lab", 0, 9, T0, 90],
        ["c1", "hl7_lab", "", "raw.hl7_lab", 0, 10, T0, 90],  # the simulator: no collector
    ], column_names=ledger)
    clickhouse.insert(f"{database}.lineage", [
        ["c1", "raw.emr_cdc", 0, 1, 0, 1, "e1", "stored:encounter", T0],
        ["c1", "raw.hl7_lab", 0, 9, 0, 1, "e2", "stored:lab_result", T0],
        ["c1", "raw.hl7_lab", 0, 10, 0, 1, "e3", "stored:lab_result", T0],
    ], column_names=LINEAGE)
    dead = ["dlq_id", "stage", "reason_code", "reason", "source_kind", "original_topic",
            "original_partition", "original_offset", "original_value", "ingest_time",
            "failed_time"]
    clickhouse.insert(f"{database}.dead_letter", [
        ["x1", "producer", "not_hl7", "no MSH", "hl7_lab", "collector/lis-mllp", 0, 1, b"?", T0, T0],
        ["x2", "producer", "not_hl7", "no MSH", "hl7_lab", "collector/lis-mllp", 0, 2, b"?", T0, T0],
    ], column_names=dead)
    report = reconcile(querier(clickhouse, database), database, T0 - timedelta(hours=1), T0 + timedelta(hours=1))
    by_name = {c.collector: c for c in report.collectors}
    assert set(by_name) == {"his-pg", "lis-mllp"}
    assert (by_name["his-pg"].published_messages, by_name["his-pg"].unaccounted_messages) == (2, 1)
    assert by_name["his-pg"].dead_lettered_at_collector == 0
    assert (by_name["lis-mllp"].published_messages, by_name["lis-mllp"].unaccounted_messages) == (1, 0)
    assert by_name["lis-mllp"].dead_lettered_at_collector == 2
    assert "raw.emr_cdc[0]@2" in "\n".join(report.gaps)
    rendered = report.render()
    assert "his-pg" in rendered and "lis-mllp" in rendered
    assert report.as_dict()["collectors"][1]["dead_lettered_at_collector"] == 2
