"""Integration tests of reconciliation on the real ClickHouse engine: gaps are found and named."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from confluent_kafka import Consumer, Producer, TopicPartition

from medstream import cli
from medstream.clickhouse import PROOF_MAX_ROWS, QueryResult, run_read_only
from medstream.reconcile import check_labels, reconcile
from medstream.settings import RAW_TOPICS, KafkaSettings
from medstream.simulator import RegionSimulator, SimulatorProducer
from schemas import serde
from tests.cli_helpers import cli_on_database
from tests.sinks.test_clickhouse import count, make_sink, produce, running
from tests.waiting import wait_for

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


def one_record_dead_lettered(client: Client, database: str, kind: str, dlq_id: str) -> None:
    """The sink's view of one raw record (offset 5 of raw.KIND) that was dead-lettered."""
    client.insert(f"{database}.raw_ledger", [["c1", kind, f"raw.{kind}", 0, 5, T0, 80]],
                  column_names=LEDGER)
    client.insert(f"{database}.lineage",
                  [["c1", f"raw.{kind}", 0, 5, -1, -1, dlq_id, "dead_letter", T0]],
                  column_names=LINEAGE)


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


def dead_lettered_by_a_bug(clickhouse: Client, database: str) -> None:
    """One raw hl7_lab record whose outcome is a dead letter of reason internal_error."""
    one_record_dead_lettered(clickhouse, database, "hl7_lab", "d5")
    clickhouse.insert(f"{database}.dead_letter", [
        ["d5", "normalise", "internal_error", "internal error: ValueError in normalise.py:x",
         "hl7_lab", "raw.hl7_lab", 0, 5, b"?", T0, T0],
    ], column_names=["dlq_id", "stage", "reason_code", "reason", "source_kind",
                     "original_topic", "original_partition", "original_offset",
                     "original_value", "ingest_time", "failed_time"])


def test_records_a_bug_dead_lettered_fail_the_reconciliation_but_not_the_drain(
    clickhouse: Client, database: str
) -> None:
    # Second review H2: internal_error dead letters counted as accounted for, so a feed a
    # bug dead-lettered whole passed as "no gap", and `up` said it stopped cleanly.
    dead_lettered_by_a_bug(clickhouse, database)
    report = reconcile(querier(clickhouse, database), database, T0 - timedelta(hours=1),
                       T0 + timedelta(hours=1))
    assert report.gaps == [] and report.drained  # every record has its outcome ...
    assert not report.ok and report.internal_errors == {"normalise": 1}  # ... one is a bug's
    assert report.as_dict()["ok"] is False
    assert report.as_dict()["internal_errors"] == {"normalise": 1}
    assert "INTERNAL ERRORS: 1 records were dead-lettered because processing them hit a bug " \
           "(normalise 1; reason_code internal_error)" in report.render()


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


# --- independent of the sink: the broker's offsets and the publishers' own counters ----------


def _sink_view_consistent(clickhouse: Client, database: str) -> None:
    """Every ledger row accounted for (dead-lettered whole): the sink's own view says no gap."""
    clickhouse.command(
        f"INSERT INTO {database}.lineage (kafka_cluster, source_topic, source_partition, "
        "source_offset, record_index, record_count, event_id, outcome, ingest_time) "
        "SELECT kafka_cluster, source_topic, source_partition, source_offset, -1, -1, "
        f"concat('d', toString(source_offset)), 'dead_letter', ingest_time FROM {database}.raw_ledger"
    )


def _forget(clickhouse: Client, database: str, topic: str, partition: int, low: int, high: int) -> None:
    """The records [low, high] never reached the ledger (as when a killed sink's broker died)."""
    where = f"source_topic = '{topic}' AND source_partition = {partition} AND source_offset BETWEEN {low} AND {high}"
    for table in ("raw_ledger", "lineage"):
        clickhouse.command(f"ALTER TABLE {database}.{table} DELETE WHERE {where} SETTINGS mutations_sync = 2")


def test_reconcile_names_the_offset_ranges_that_never_reached_the_ledger(
    kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, database: str, tmp_path: Path
) -> None:
    kafka = kafka_factory()
    counters = tmp_path / "published" / "simulator.sqlite"
    published = SimulatorProducer(
        kafka, serde.ManifestRegistry(), RegionSimulator(5, anomaly_rate=0.0, run_id="r1"),
        published=counters,
    ).run(400)
    lab = kafka.topic(RAW_TOPICS["hl7_lab"])
    transactional = not kafka.tansu
    if transactional:  # committed transactions leave control markers on offsets of their own
        producer = Producer(kafka.producer_config(**{"transactional.id": f"{kafka.topic_prefix}tx"}))
        producer.init_transactions(30)
        for _ in range(2):
            producer.begin_transaction()
            producer.produce(lab, value=b"in a transaction", partition=1)
            producer.commit_transaction(30)
    in_ledger = published.total_messages + (2 if transactional else 0)
    with running(make_sink(kafka, clickhouse, database, "sink-r")):
        wait_for(lambda: count(clickhouse, f"SELECT count() FROM {database}.raw_ledger") == in_ledger,
                 what="the ledger")
    _sink_view_consistent(clickhouse, database)
    _forget(clickhouse, database, lab, 0, 5, 16)
    # Published after the sink stopped: on the broker, not read by the sink yet.
    produce(kafka, [(lab, b"one-partition", b"late-%d" % i) for i in range(3)])
    query = querier(clickhouse, database)
    now = datetime.now(tz=UTC)
    since, until = now - timedelta(hours=1), now + timedelta(minutes=5)

    # The sink's own view cannot see the loss: ledger and lineage agree with each other.
    assert reconcile(query, database, since, until).ok

    report = reconcile(query, database, since, until, kafka=kafka, sink_group="sink-r",
                       counter_files=[counters])
    assert not report.ok
    lost = [r for r in report.missing_ranges if not r.pending]
    assert {(r.evidence, r.topic, r.partition, r.first_offset, r.last_offset, r.records) for r in lost} == {
        ("broker", lab, 0, 5, 16, 12), ("publisher simulator run r1", lab, 0, 5, 16, 12),
    }
    [late] = [r for r in report.missing_ranges if r.pending]
    assert (late.evidence, late.records) == ("broker", 3)
    by_partition = {(b.topic, b.partition): b for b in report.broker}
    assert by_partition[(lab, 0)].missing == 12
    # Control markers of the transactions are offsets without records: never a gap.
    assert sum(b.missing for b in report.broker) == 12
    assert sum(b.pending for b in report.broker) == 3
    [simulator] = report.published
    assert (simulator.publisher, simulator.run_id) == ("simulator", "r1")
    assert (simulator.acknowledged, simulator.missing) == (published.total_messages, 12)
    assert simulator.in_ledger == published.total_messages - 12
    text = report.render()
    assert f"offsets 5..16 of {lab}[0] never reached the ledger (12 records; broker)" in text
    assert f"offsets 5..16 of {lab}[0] never reached the ledger (12 records; publisher simulator run r1)" in text
    assert "broker: 12 records never reached the ledger" in report.gaps
    assert "are not in the ledger yet" in text
    # Not read yet is a lag, said apart: it alone would not fail the reconciliation.
    assert report.pending_records == 3 and not report.settled
    assert report.not_read_yet[0] == "broker: not read yet: 3 records (the sink has not read them)"
    assert not any("not read yet" in gap for gap in report.gaps)
    body = report.as_dict()
    assert set(body["evidence"]) >= {"sources", "broker", "published", "conflicts"}
    assert body["missing_ranges_total"] == 3

    # The broker forgot everything (or cannot be reached): the counters still tell the loss.
    counted_only = reconcile(query, database, since, until, counter_files=[counters])
    assert not counted_only.ok and counted_only.broker == []
    assert [(p.acknowledged, p.missing) for p in counted_only.published] == [(published.total_messages, 12)]
    assert "publisher simulator run r1: 12 records never reached the ledger" in counted_only.gaps

    # A damaged counter file is a gap in the proof, said with its path; the others count.
    damaged = tmp_path / "published" / "collector-lis.sqlite"
    damaged.write_bytes(b"not a database" * 100)
    with_damage = reconcile(query, database, since, until, counter_files=[counters, damaged])
    assert [(p.acknowledged, p.missing) for p in with_damage.published] == [
        (published.total_messages, 12)
    ]
    assert any(gap.startswith(f"publishers' counter {damaged} could not be read (DatabaseError")
               for gap in with_damage.gaps)


# --- the ground truth of one run, with another run in the same database ---------------------


def test_labels_of_one_run_are_checked_against_that_run_only(clickhouse: Client, database: str) -> None:
    def labels(run: str) -> list[dict[str, object]]:
        return [
            {"run_id": run, "event_id": f"{run}-e1", "kind": "lab_result", "expect": "stored",
             "critical_rule": "critical_value.potassium", "duplicate_delivery": False},
            {"run_id": run, "event_id": f"{run}-e2", "kind": "lab_result", "expect": "stored",
             "critical_rule": None, "duplicate_delivery": False},
            {"run_id": run, "event_id": None, "kind": None, "expect": "dead_letter",
             "critical_rule": None, "duplicate_delivery": False},
        ]

    ledger = [*LEDGER[:2], "run_id", *LEDGER[2:]]
    for offset, run in ((0, "a"), (1, "b")):  # one malformed raw record per run, dead-lettered
        clickhouse.insert(f"{database}.raw_ledger", [["c1", "hl7_lab", run, "raw.hl7_lab", 0, offset, T0, 9]],
                          column_names=ledger)
        clickhouse.insert(f"{database}.lineage", [["c1", "raw.hl7_lab", 0, offset, -1, -1, f"dlq-{run}", "dead_letter", T0]],
                          column_names=LINEAGE)
        clickhouse.insert(f"{database}.dead_letter", [[f"dlq-{run}", "normalise", "undecodable", "x", "hl7_lab",
                                                       "raw.hl7_lab", 0, offset, b"?", T0, T0]],
                          column_names=["dlq_id", "stage", "reason_code", "reason", "source_kind", "original_topic",
                                        "original_partition", "original_offset", "original_value", "ingest_time",
                                        "failed_time"])
    rows = [lab_row(e) for e in ("a-e1", "a-e2", "b-e1", "b-e2")]
    clickhouse.insert(f"{database}.lab_result", [list(r.values()) for r in rows], column_names=list(rows[0]))
    alert_columns = ["alert_id", "rule_id", "rule_version", "severity", "organisation_id", "person_key",
                     "event_time", "ingest_time", "detected_time", "triggering_event_ids", "explanation",
                     "source_topic", "source_partition", "source_offset", "mapping_version", "action",
                     "transition_id", "updated_time"]
    # Run b raised its expected alert and a false one; run a its expected one.
    alerts = [[f"al-{e}", "critical_value.potassium", "r1", "critical", "H001", "p", T0, T0, T0, [e], "x",
               "raw.hl7_lab", 0, 1, "v", "opened", f"t-{e}", T0] for e in ("a-e1", "b-e1", "b-e2")]
    clickhouse.insert(f"{database}.alert_history", alerts, column_names=alert_columns)

    check = check_labels(querier(clickhouse, database), database, labels("a"), T0 - timedelta(hours=1))
    assert check.run_ids == ["a"]
    assert (check.expected_events, check.stored_events, check.duplicated_events) == (2, 2, 0)
    assert (check.expected_dead_letters, check.found_dead_letters) == (1, 1)
    assert (check.expected_alerts, check.found_alerts, check.unexpected_alerts) == (1, 1, 0)
    assert check.ok
    # Run b's own check still sees its false alert.
    other = check_labels(querier(clickhouse, database), database, labels("b"), T0 - timedelta(hours=1))
    assert (other.found_dead_letters, other.found_alerts, other.unexpected_alerts) == (1, 1, 1)


def test_records_the_sink_has_not_read_yet_are_a_lag_not_a_gap(
    kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, database: str
) -> None:
    kafka = kafka_factory()
    lab = kafka.topic(RAW_TOPICS["hl7_lab"])
    produce(kafka, [(lab, b"one-partition", b"early-%d" % i) for i in range(4)])
    with running(make_sink(kafka, clickhouse, database, "sink-lag")):
        wait_for(lambda: count(clickhouse, f"SELECT count() FROM {database}.raw_ledger") == 4,
                 what="the ledger")
    _sink_view_consistent(clickhouse, database)
    produce(kafka, [(lab, b"one-partition", b"late-%d" % i) for i in range(5)])  # the sink lags
    now = datetime.now(tz=UTC)
    report = reconcile(querier(clickhouse, database), database, now - timedelta(hours=1),
                       now + timedelta(minutes=5), kafka=kafka, sink_group="sink-lag")
    assert report.ok, report.gaps
    assert (report.pending_records, report.settled) == (5, False)
    assert report.not_read_yet[0] == "broker: not read yet: 5 records (the sink has not read them)"
    assert sum(b.in_ledger for b in report.broker) == 4
    assert "NOT READ YET by the sink" in report.render()
    assert report.as_dict()["ok"] is True


def test_offsets_the_re_read_could_not_reach_are_unverified_and_fail_the_reconciliation(
    tansu_kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, database: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import medstream.reconcile as reconcile_module

    kafka = tansu_kafka_factory()
    lab = kafka.topic(RAW_TOPICS["hl7_lab"])
    now = datetime.now(tz=UTC)
    # Records from before the window: read past (on tansu the whole log is re-read),
    # never counted; with a budget of 5 the rest of the log cannot be checked.
    earlier = int((now - timedelta(hours=3)).timestamp() * 1000)
    producer = Producer(kafka.producer_config())
    for index in range(40):
        producer.produce(lab, value=b"old-%d" % index, partition=index % 2, timestamp=earlier)
    assert producer.flush(30) == 0
    monkeypatch.setattr(reconcile_module, "MAX_RECHECKED", 5)
    report = reconcile(querier(clickhouse, database), database, now - timedelta(hours=1),
                       now + timedelta(minutes=5), kafka=kafka)
    assert not report.ok
    assert any(
        gap.startswith(f"unverified: {lab}[") and gap.endswith(
            "..19 not checked: the re-read budget of 5 records is used up")
        for gap in report.gaps
    ), report.gaps
    assert report.missing_ranges == []


def test_a_labels_kind_that_is_not_a_stored_table_is_refused_before_any_query() -> None:
    def query(sql: str) -> QueryResult:
        raise AssertionError(f"queried despite a bad labels file: {sql}")

    labels = [{"run_id": "r1", "event_id": "e1", "kind": "lab_result FINAL; SELECT 1 --",
               "expect": "stored", "duplicate_delivery": False}]
    with pytest.raises(ValueError, match=r"has kind 'lab_result FINAL; SELECT 1 --', not a table "
                                         r"medstream stores events in \(lab_result, observation"):
        check_labels(query, "db", labels)


# --- the command: its exit code, its JSON's "ok" and its last line agree ------------------


@pytest.fixture
def run_reconcile(
    clickhouse: Client, database: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Callable[..., Any]:
    """Invoke `medstream reconcile` in-process on the test's database; no `up` runs."""
    monkeypatch.setenv("MEDSTREAM_DATA_DIR", str(tmp_path / "data"))
    return cli_on_database(clickhouse, database, monkeypatch, "reconcile")


def test_failed_labels_make_the_json_not_ok_and_the_exit_code_1(
    run_reconcile: Callable[..., Any], clickhouse: Client, database: str, tmp_path: Path
) -> None:
    # The pipeline's own counts hold (one device packet, dead-lettered); the labels expect
    # two lab results and one of them is not stored.
    one_record_dead_lettered(clickhouse, database, "device", "d")
    stored = lab_row("e1")
    clickhouse.insert(f"{database}.lab_result", [list(stored.values())], column_names=list(stored))
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(
        json.dumps({"event_id": e, "kind": "lab_result", "expect": "stored", "critical_rule": None,
                    "duplicate_delivery": False}) + "\n" for e in ("e1", "e2")))
    window = ["--since", (T0 - timedelta(hours=1)).isoformat(),
              "--until", (T0 + timedelta(hours=1)).isoformat(), "--no-broker"]
    missing = "ground truth: 1 of 2 labelled events not stored (e.g. e2)"

    as_json = run_reconcile(*window, "--labels", str(labels), "--json")
    assert as_json.exit_code == 1, as_json.output
    body = json.loads(as_json.stdout)
    assert (body["ok"], body["gaps"], body["strict"]) == (False, [], False)
    assert body["failures"] == [missing]
    assert (body["labels"]["ok"], body["labels"]["missing_events"]) == (False, ["e2"])
    assert body["labels"]["failures"] == [missing.removeprefix("ground truth: ")]
    text = run_reconcile(*window, "--labels", str(labels))
    assert text.exit_code == 1
    assert "no gap: every published record is stored or dead-lettered" in text.stdout
    assert text.stdout.splitlines()[-1] == f"FAILED: {missing}"

    labels.write_text(labels.read_text().splitlines()[0] + "\n")  # e1 only: it is stored
    passed = run_reconcile(*window, "--labels", str(labels), "--json")
    assert passed.exit_code == 0, passed.output
    body = json.loads(passed.stdout)
    assert (body["ok"], body["failures"], body["labels"]["ok"], body["labels"]["failures"]) == (
        True, [], True, []
    )
    text = run_reconcile(*window, "--labels", str(labels))
    assert text.exit_code == 0 and text.stdout.splitlines()[-1] == "ok"


def test_the_command_fails_on_records_a_bug_dead_lettered(
    run_reconcile: Callable[..., Any], clickhouse: Client, database: str
) -> None:
    # Review 5 M2: the report was not ok but the command said "ok" and exited 0.
    dead_lettered_by_a_bug(clickhouse, database)
    window = ["--since", (T0 - timedelta(hours=1)).isoformat(),
              "--until", (T0 + timedelta(hours=1)).isoformat(), "--no-broker"]
    failure = "1 records dead-lettered as internal errors (a bug met them)"
    text = run_reconcile(*window)
    assert text.exit_code == 1, text.output
    assert "INTERNAL ERRORS: 1 records were dead-lettered" in text.stdout
    assert text.stdout.splitlines()[-1] == f"FAILED: {failure}"
    body = json.loads(run_reconcile(*window, "--json").stdout)
    assert (body["ok"], body["failures"], body["internal_errors"]) == (
        False, [failure], {"normalise": 1})


def test_strict_fails_on_records_the_sink_has_not_read_and_passes_once_they_are_in(
    run_reconcile: Callable[..., Any], kafka_factory: Callable[..., KafkaSettings],
    clickhouse: Client, database: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    kafka = kafka_factory()
    monkeypatch.setattr(cli, "_reachable_kafka", lambda: kafka)
    group = f"{kafka.topic_prefix}sink"
    monkeypatch.setenv("MEDSTREAM_SINK_GROUP_ID", group)
    device = kafka.topic(RAW_TOPICS["device"])
    produce(kafka, [(device, b"one-partition", b"packet-%d" % i) for i in range(3)])
    # The sink group has committed offset 0 everywhere: all three are a lag, not a loss.
    consumer = Consumer(kafka.consumer_config(group))
    try:
        partitions = consumer.list_topics(device, timeout=30).topics[device].partitions
        consumer.commit(offsets=[TopicPartition(device, p, 0) for p in partitions],
                        asynchronous=False)
    finally:
        consumer.close()

    lenient = run_reconcile("--json")
    assert lenient.exit_code == 0, lenient.output
    body = json.loads(lenient.stdout)
    assert (body["ok"], body["gaps"], body["failures"]) == (True, [], [])
    assert body["not_read_yet"][0] == "broker: not read yet: 3 records (the sink has not read them)"
    strict = run_reconcile("--strict", "--json")
    assert strict.exit_code == 1, strict.output
    body = json.loads(strict.stdout)
    assert (body["ok"], body["strict"], body["gaps"]) == (False, True, [])
    assert body["failures"] == ["--strict: 3 records not read yet by the sink"]
    text = run_reconcile("--strict")
    assert text.exit_code == 1
    assert text.stdout.splitlines()[-1] == "FAILED: --strict: 3 records not read yet by the sink"

    # The sink stored them (each dead-lettered): settled, so --strict passes too.
    [partition] = [b["partition"] for b in body["broker"]["partitions"]
                   if b["topic"] == device and b["pending"]]
    cluster, now = body["broker"]["kafka_cluster"], datetime.now(tz=UTC)
    offsets = range(3)
    clickhouse.insert(f"{database}.raw_ledger",
                      [[cluster, "device", device, partition, o, now, 8] for o in offsets],
                      column_names=LEDGER)
    clickhouse.insert(f"{database}.lineage",
                      [[cluster, device, partition, o, -1, -1, f"d{o}", "dead_letter", now]
                       for o in offsets],
                      column_names=LINEAGE)
    settled = run_reconcile("--strict", "--json")
    assert settled.exit_code == 0, settled.output
    body = json.loads(settled.stdout)
    assert (body["ok"], body["failures"], body["not_read_yet"]) == (True, [], [])
    text = run_reconcile("--strict")
    assert text.exit_code == 0 and text.stdout.splitlines()[-1] == "ok"
