"""Integration tests: the sink keeps the evidence of a conflicting re-send (an event id stored
again with other content) and the run of each raw record; reconcile reports conflicts."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from clickhouse_connect.driver.client import Client
from confluent_kafka import Producer

from medstream.clickhouse import PROOF_MAX_ROWS, QueryResult, run_read_only
from medstream.reconcile import reconcile
from medstream.settings import NORM_TOPICS, RAW_TOPICS, KafkaSettings
from schemas import serde
from schemas.serde import COLLECTOR_HEADER, RUN_HEADER
from sinks.clickhouse import content_hash, declared_update
from tests.sinks.test_clickhouse import REGISTRY, count, lab_result, make_sink, produce, running
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


def test_content_hash_ignores_delivery_fields_and_sees_content() -> None:
    first = lab_result(0, 100)
    redelivered = {**first, "source_offset": 900, "ingest_time": 1, "normalised_time": 2,
                   "mapping_version": "test-2"}
    other_patient = {**first, "person_key": "someone-else", "value": 7.5}
    assert content_hash(first) == content_hash(redelivered)
    assert content_hash(first) != content_hash(other_patient)
    assert not declared_update(first)
    assert declared_update({**first, "result_status": "C"})  # an HL7 correction
    assert declared_update({"op": "u"}) and not declared_update({"op": "c"})


def test_a_conflicting_re_send_is_kept_as_evidence_and_reported(
    kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, database: str
) -> None:
    kafka = kafka_factory()
    encode = serde.AvroSerializer(REGISTRY, serde.LAB_RESULT)
    topic = kafka.topic(NORM_TOPICS["lab_result"])
    same = lab_result(0, 100)
    conflicting = lab_result(0, 101)  # another message ...
    conflicting["event_id"] = same["event_id"]  # ... under the same id: a reused id
    corrected = lab_result(0, 102)
    corrected_again = {**corrected, "source_offset": 103, "value": 4.4, "result_status": "C"}
    records = [same, {**same, "source_offset": 200}, conflicting, corrected, corrected_again]
    produce(kafka, [(topic, b"pk", encode(r)) for r in records])
    raw = Producer(kafka.producer_config())
    raw.produce(kafka.topic(RAW_TOPICS["hl7_lab"]), value=b"raw",
                headers=[(COLLECTOR_HEADER, b"lis-mllp"), (RUN_HEADER, b"ab12cd34")])
    assert raw.flush(30) == 0

    with running(make_sink(kafka, clickhouse, database, "sink-conflicts")):
        wait_for(lambda: count(clickhouse, f"SELECT count() FROM {database}.lineage") == 5,
                 what="lineage")
        wait_for(lambda: count(clickhouse, f"SELECT count() FROM {database}.raw_ledger") == 1,
                 what="ledger")

    hashes = clickhouse.query(
        f"SELECT event_id, uniqExact(content_hash), max(declared_update) FROM {database}.lineage "
        "GROUP BY event_id ORDER BY event_id"
    ).result_rows
    assert sorted(hashes) == sorted([(same["event_id"], 2, 0), (corrected["event_id"], 2, 1)])
    assert clickhouse.query(
        f"SELECT collector, run_id FROM {database}.raw_ledger"
    ).result_rows == [("lis-mllp", "ab12cd34")]

    def query(sql: str) -> QueryResult:
        return run_read_only(clickhouse, sql, database, max_rows=PROOF_MAX_ROWS)

    now = datetime.fromtimestamp(same["ingest_time"] / 1000, UTC)
    report = reconcile(query, database, now - timedelta(hours=1), now + timedelta(hours=1))
    # The identical redelivery and the declared correction are not conflicts; the reuse is.
    assert (report.conflicts, report.conflict_examples) == (1, [same["event_id"]])
    assert any(gap.startswith("conflicts: 1 event ids") for gap in report.gaps)
    assert report.as_dict()["conflicts"] == {"count": 1, "example_event_ids": [same["event_id"]]}
    assert "conflicting event ids (same id, other content, not an update): 1" in report.render()


def test_each_copy_is_judged_against_the_one_before_and_foreign_updates_are_reported(
    kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, database: str
) -> None:
    # Review finding M11: one copy declared a correction (OBX-11=C), after which every
    # later copy of that id passed as an update; and a correction from any sender that
    # reached the listener replaced a result without a word.
    kafka = kafka_factory()
    encode = serde.AvroSerializer(REGISTRY, serde.LAB_RESULT)
    topic = kafka.topic(NORM_TOPICS["lab_result"])
    first = lab_result(0, 300)
    corrected = {**first, "source_offset": 301, "value": 4.4, "result_status": "C"}
    then_silently_changed = {**first, "source_offset": 302, "value": 6.9, "result_status": "F"}
    other = lab_result(0, 310)
    foreign_correction = {**other, "source_offset": 311, "value": 2.1, "result_status": "C",
                          "source_system": "ELSEWHERE"}
    own = lab_result(0, 320)
    own_correction = {**own, "source_offset": 321, "value": 5.0, "result_status": "C"}
    records = [first, corrected, then_silently_changed, other, foreign_correction, own,
               own_correction, {**own_correction, "source_offset": 322}]  # a redelivery
    produce(kafka, [(topic, b"pk", encode(r)) for r in records])

    with running(make_sink(kafka, clickhouse, database, "sink-copy-by-copy")):
        wait_for(lambda: count(clickhouse, f"SELECT count() FROM {database}.lineage") == 8,
                 what="lineage")
    assert sorted(clickhouse.query(
        f"SELECT source_offset, sender FROM {database}.lineage ORDER BY source_offset"
    ).result_rows) == [(300, "LIS"), (301, "LIS"), (302, "LIS"), (310, "LIS"),
                       (311, "ELSEWHERE"), (320, "LIS"), (321, "LIS"), (322, "LIS")]

    def query(sql: str) -> QueryResult:
        return run_read_only(clickhouse, sql, database, max_rows=PROOF_MAX_ROWS)

    now = datetime.fromtimestamp(first["ingest_time"] / 1000, UTC)
    report = reconcile(query, database, now - timedelta(hours=1), now + timedelta(hours=1))
    assert (report.conflicts, report.conflict_examples) == (1, [first["event_id"]])
    assert (report.foreign_updates, report.foreign_update_examples) == (1, [other["event_id"]])
    assert any(gap.startswith("foreign updates: 1 event ids") for gap in report.gaps)
    assert not report.ok
    assert report.as_dict()["foreign_updates"] == {
        "count": 1, "example_event_ids": [other["event_id"]]
    }
    assert "updates from another sending system than the copy they replaced: 1" in (
        report.render()
    )
