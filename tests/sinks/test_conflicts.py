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
