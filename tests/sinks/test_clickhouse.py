"""Integration tests of the ClickHouse sink against the real broker (Apache Kafka; tansu for its
own guard) and the real chdb engine."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from confluent_kafka import Consumer, Producer, TopicPartition

from medstream.sealing import derive_key, unseal
from medstream.settings import (
    ALERTS_TOPIC,
    DLQ_TOPIC,
    NORM_TOPICS,
    RAW_TOPICS,
    KafkaSettings,
    SinkSettings,
)
from schemas import serde
from schemas.identity import alert_id, dead_letter_id, event_id
from sinks.clickhouse import (
    DEAD_LETTER_PURPOSE,
    STOP_AFTER_DRAIN_S,
    ClickHouseSink,
    SinkKeys,
)
from tests.waiting import wait_for

pytestmark = pytest.mark.integration
REGISTRY = serde.ManifestRegistry()
#: The sink's secrets in these tests (test-only values, never a deployment's).
KEYS = SinkKeys(b"test-only-dead-letter-secret-0123456789", b"test-only-audit-key-0123456789abcdef")
NOW_MS = 1795000000000


def lab_result(index: int, raw_offset: int, record_count: int = 1) -> dict[str, Any]:
    """A complete, fictional LabResult record."""
    return {
        "event_id": event_id("hl7_lab", "H001", f"CTRL{raw_offset}", index),
        "source_kind": "hl7_lab",
        "source_system": "LIS",
        "organisation_id": "H001",
        "event_time": NOW_MS - 60000,
        "ingest_time": NOW_MS,
        "normalised_time": NOW_MS + 5,
        "source_topic": "raw.hl7_lab",
        "source_partition": 0,
        "source_offset": raw_offset,
        "record_index": index,
        "record_count": record_count,
        "source_ref": f"CTRL{raw_offset}",
        "mapping_version": "test-1",
        "person_key": f"pk{raw_offset % 7}",
        "order_id": f"ORD{raw_offset}",
        "loinc_code": "2823-3",
        "local_code": "K",
        "local_display": "Potassium",
        "value": 4.0 + index / 10,
        "value_text": None,
        "unit": "mmol/L",
        "original_value": str(4.0 + index / 10),
        "original_unit": "mmol/L",
        "abnormal_flag": "N",
        "result_status": "F",
        "specimen_status": None,
        "mapping_status": "mapped",
        "reference_low": 3.5,
        "reference_high": 5.3,
    }


def produce(kafka: KafkaSettings, records: list[tuple[str, bytes | None, bytes]]) -> None:
    producer = Producer(kafka.producer_config())
    failures: list[str] = []
    for topic, key, value in records:
        producer.produce(
            topic, key=key, value=value, on_delivery=lambda err, _m: err and failures.append(str(err))
        )
    producer.flush(30)
    assert not failures




@contextmanager
def running(sink: ClickHouseSink) -> Iterator[ClickHouseSink]:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            sink.run()
        except BaseException as exc:  # surfaced to the test below
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        sink.stop()
        thread.join(30)
        assert not thread.is_alive(), "sink did not stop"
        assert not errors, errors


def count(client: Client, sql: str) -> int:
    return int(client.query(sql).result_rows[0][0])


def committed(kafka: KafkaSettings, group: str, topic: str, partitions: int) -> list[int]:
    consumer = Consumer(kafka.consumer_config(group))
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return [tp.offset for tp in tps]
    finally:
        consumer.close()


def committed_total(kafka: KafkaSettings, group: str, topic: str, partitions: int) -> int:
    """Records covered by the group's committed offsets (-1001 = nothing committed)."""
    return sum(max(o, 0) for o in committed(kafka, group, topic, partitions))


def critical_alert(triggering_event_id: str) -> dict[str, Any]:
    return {
        "alert_id": alert_id("critical_value.potassium", triggering_event_id),
        "rule_id": "critical_value.potassium",
        "rule_version": "r1",
        "severity": "critical",
        "organisation_id": "H001",
        "person_key": "pk1",
        "event_time": NOW_MS,
        "ingest_time": NOW_MS,
        "detected_time": NOW_MS + 10,
        "triggering_event_ids": [triggering_event_id],
        "analyte_code": "2823-3",
        "value": 6.9,
        "unit": "mmol/L",
        "explanation": "Potassium 6.9 mmol/L above critical high 6.2",
        "source_topic": "raw.hl7_lab",
        "source_partition": 0,
        "source_offset": 100,
        "mapping_version": "test-1",
    }


def make_sink(kafka: KafkaSettings, client: Any, database: str, group: str) -> ClickHouseSink:
    return ClickHouseSink(
        kafka, SinkSettings(group_id=group, batch_max_ms=100, retry_initial_s=0.05), client, database, REGISTRY,
        keys=KEYS,
    )


def test_sink_stores_every_kind_with_lineage_and_ledger(
    kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, database: str
) -> None:
    kafka = kafka_factory()
    encode_lab = serde.AvroSerializer(REGISTRY, serde.LAB_RESULT)
    encode_alert = serde.AvroSerializer(REGISTRY, serde.ALERT)
    encode_dlq = serde.AvroSerializer(REGISTRY, serde.DEAD_LETTER)
    labs = [lab_result(i % 3, 100 + i // 3, record_count=3) for i in range(30)]
    alert = critical_alert(labs[0]["event_id"])
    dead = {
        "dlq_id": dead_letter_id("normalise", "raw.hl7_lab", 1, 7, None, NOW_MS),
        "stage": "normalise",
        "reason_code": "undecodable",
        "reason": "medstream.raw.Hl7Message: not Confluent-framed Avro",
        "source_kind": "hl7_lab",
        "organisation_id": None,
        "original_topic": "raw.hl7_lab",
        "original_partition": 1,
        "original_offset": 7,
        "record_index": None,
        "record_count": None,
        "original_key": b"H001:x",
        "original_value": b"\x07garbage",
        "ingest_time": NOW_MS,
        "failed_time": NOW_MS + 3,
    }
    records = [(kafka.topic(NORM_TOPICS["lab_result"]), b"pk", encode_lab(r)) for r in labs]
    records.append((kafka.topic(ALERTS_TOPIC), b"pk1", encode_alert(alert)))
    records.append((kafka.topic(DLQ_TOPIC), b"H001:x", encode_dlq(dead)))
    records += [(kafka.topic(RAW_TOPICS["hl7_lab"]), b"k", b"raw-bytes-%d" % i) for i in range(5)]
    produce(kafka, records)

    with running(make_sink(kafka, clickhouse, database, "sink-a")):
        wait_for(lambda: count(clickhouse, f"SELECT count() FROM {database}.lab_result") == 30, what="labs")
        wait_for(lambda: count(clickhouse, f"SELECT count() FROM {database}.raw_ledger") == 5, what="ledger")
        wait_for(lambda: count(clickhouse, f"SELECT count() FROM {database}.dead_letter") == 1, what="dlq")

    row = clickhouse.query(
        f"SELECT value, unit, loinc_code, person_key, source_offset, record_index, record_count "
        f"FROM {database}.lab_result WHERE event_id = '{labs[4]['event_id']}'"
    ).result_rows
    assert row == [(4.1, "mmol/L", "2823-3", labs[4]["person_key"], 101, 1, 3)]
    assert clickhouse.query(f"SELECT explanation, triggering_event_ids FROM {database}.alert").result_rows == [
        (alert["explanation"], [labs[0]["event_id"]])
    ]
    dlq = clickhouse.query(
        f"SELECT reason_code, original_offset, record_index, dlq_id, hex(original_value), "
        f"hex(original_key) FROM {database}.dead_letter"
    ).result_rows
    [(reason_code, offset, index, dlq_id, sealed_value, sealed_key)] = dlq
    assert (reason_code, offset, index) == ("undecodable", 7, None)
    # The payload is stored sealed (it holds identifiers); the sink's secret opens it.
    assert b"garbage" not in bytes.fromhex(sealed_value) and b"H001" not in bytes.fromhex(sealed_key)
    assert unseal_dead_letter(sealed_value, dlq_id) == b"\x07garbage"
    assert unseal_dead_letter(sealed_key, dlq_id, b"|key") == b"H001:x"
    lineage = clickhouse.query(
        f"SELECT outcome, count(), uniqExact(source_offset) FROM {database}.lineage GROUP BY outcome ORDER BY outcome"
    ).result_rows
    assert lineage == [("dead_letter", 1, 1), ("stored:lab_result", 30, 10)]
    ledger = clickhouse.query(
        f"SELECT source_kind, sum(value_bytes) FROM {database}.raw_ledger GROUP BY source_kind"
    ).result_rows
    assert ledger == [("hl7_lab", sum(len(b"raw-bytes-%d" % i) for i in range(5)))]
    # every partition is committed right after its last stored record
    assert committed_total(kafka, "sink-a", kafka.topic(NORM_TOPICS["lab_result"]), 2) == 30


class RefusingClient:
    """Fault injection around the real engine: refuses the first `failures` inserts."""

    def __init__(self, client: Client, failures: int) -> None:
        self.client = client
        self.remaining = failures
        self.refused = 0

    def create_insert_context(self, *args: Any, **kwargs: Any) -> Any:
        return self.client.create_insert_context(*args, **kwargs)

    def insert(self, *args: Any, **kwargs: Any) -> Any:
        if self.remaining > 0:
            self.remaining -= 1
            self.refused += 1
            raise ConnectionError("ClickHouse unavailable (injected)")
        return self.client.insert(*args, **kwargs)


def test_sink_retries_while_clickhouse_refuses_and_commits_only_after(
    kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, database: str
) -> None:
    kafka = kafka_factory()
    encode_lab = serde.AvroSerializer(REGISTRY, serde.LAB_RESULT)
    topic = kafka.topic(NORM_TOPICS["lab_result"])
    produce(kafka, [(topic, b"pk%d" % i, encode_lab(lab_result(0, i))) for i in range(20)])
    refusing = RefusingClient(clickhouse, failures=4)
    sink = make_sink(kafka, refusing, database, "sink-b")
    with running(sink):
        wait_for(lambda: refusing.refused >= 2, what="first refusals")
        assert committed(kafka, "sink-b", topic, 2) == [-1001, -1001]  # nothing committed yet
        wait_for(lambda: count(clickhouse, f"SELECT count() FROM {database}.lab_result") == 20, what="rows")
        wait_for(lambda: committed_total(kafka, "sink-b", topic, 2) == 20, what="commit")
    assert refusing.refused == 4
    assert count(clickhouse, f"SELECT count() FROM {database}.lab_result") == 20
    assert count(clickhouse, f"SELECT uniqExact(event_id) FROM {database}.lab_result") == 20


def test_records_read_again_after_a_crash_collapse_to_one_copy(
    kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, database: str
) -> None:
    kafka = kafka_factory()
    encode_lab = serde.AvroSerializer(REGISTRY, serde.LAB_RESULT)
    topic = kafka.topic(NORM_TOPICS["lab_result"])
    produce(kafka, [(topic, b"pk%d" % i, encode_lab(lab_result(0, i))) for i in range(40)])
    with running(make_sink(kafka, clickhouse, database, "sink-c")):
        wait_for(lambda: count(clickhouse, f"SELECT count() FROM {database}.lab_result") == 40, what="first pass")
    # A sink that died after inserting but before committing reads everything again: a new
    # group has no committed offsets, which is the same situation for every record.
    produce(kafka, [(topic, b"pk%d" % i, encode_lab(lab_result(0, i))) for i in range(40, 50)])
    with running(make_sink(kafka, clickhouse, database, "sink-c-restarted")):
        wait_for(
            lambda: count(clickhouse, f"SELECT count() FROM {database}.lineage") >= 90, what="second pass"
        )
    assert count(clickhouse, f"SELECT count() FROM {database}.lab_result FINAL") == 50
    assert count(clickhouse, f"SELECT count() FROM {database}.lineage FINAL") == 50


def test_undecodable_norm_record_is_dead_lettered_by_the_sink(
    kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, database: str
) -> None:
    kafka = kafka_factory()
    encode_lab = serde.AvroSerializer(REGISTRY, serde.LAB_RESULT)
    topic = kafka.topic(NORM_TOPICS["lab_result"])
    produce(kafka, [(topic, b"a", b"not avro at all"), (topic, b"a", encode_lab(lab_result(0, 1)))])
    with running(make_sink(kafka, clickhouse, database, "sink-d")):
        wait_for(lambda: count(clickhouse, f"SELECT count() FROM {database}.dead_letter") == 1, what="dlq")
        wait_for(lambda: count(clickhouse, f"SELECT count() FROM {database}.lab_result") == 1, what="lab")
    stage, reason_code, reason, sealed, dlq_id = clickhouse.query(
        f"SELECT stage, reason_code, reason, hex(original_value), dlq_id FROM {database}.dead_letter"
    ).result_rows[0]
    assert (stage, reason_code) == ("sink", "undecodable")
    assert unseal_dead_letter(sealed, dlq_id) == b"not avro at all"
    assert "medstream.norm.LabResult" in reason and "magic byte" in reason


def unseal_dead_letter(sealed_hex: str, dlq_id: str, suffix: bytes = b"") -> bytes:
    """A sealed dead-letter column (read as hex) opened with the tests' sink secret."""
    key = derive_key(KEYS.dead_letter_secret, DEAD_LETTER_PURPOSE)
    return unseal(bytes.fromhex(sealed_hex), key, dlq_id.encode() + suffix)


class RejectingClient:
    """Fault injection: ClickHouse refuses the data itself (not a connection failure)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.attempts = 0

    def create_insert_context(self, *args: Any, **kwargs: Any) -> Any:
        return self.client.create_insert_context(*args, **kwargs)

    def insert(self, *args: Any, **kwargs: Any) -> Any:
        from clickhouse_connect.driver.exceptions import DatabaseError

        self.attempts += 1
        raise DatabaseError("Code: 252. DB::Exception: Too many partitions for single INSERT block")


def test_a_batch_clickhouse_refuses_for_good_stops_the_sink_without_committing(
    kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, database: str
) -> None:
    from sinks.clickhouse import PERMANENT_ATTEMPTS, SinkFailed

    kafka = kafka_factory()
    encode_lab = serde.AvroSerializer(REGISTRY, serde.LAB_RESULT)
    topic = kafka.topic(NORM_TOPICS["lab_result"])
    produce(kafka, [(topic, b"pk%d" % i, encode_lab(lab_result(0, i))) for i in range(5)])
    rejecting = RejectingClient(clickhouse)
    sink = make_sink(kafka, rejecting, database, "sink-e")
    with pytest.raises(SinkFailed, match=r"refused lab_result 3 times in a row with DatabaseError \(code 252\)"):
        sink.run()
    assert rejecting.attempts == PERMANENT_ATTEMPTS
    assert committed_total(kafka, "sink-e", topic, 2) == 0


def test_graceful_stop_drains_what_is_already_in_kafka(
    kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, database: str
) -> None:
    kafka = kafka_factory()
    encode_lab = serde.AvroSerializer(REGISTRY, serde.LAB_RESULT)
    topic = kafka.topic(NORM_TOPICS["lab_result"])
    produce(kafka, [(topic, b"pk%d" % i, encode_lab(lab_result(0, i))) for i in range(3000)])
    sink = make_sink(kafka, clickhouse, database, "sink-f")
    sink.stop()  # asked to stop before it even started: it still drains and stores it all
    sink.run()
    assert not sink.left_unstored
    assert count(clickhouse, f"SELECT count() FROM {database}.lab_result") == 3000
    assert committed_total(kafka, "sink-f", topic, 2) == 3000


class StandInMessage:
    """Stand-in for a confluent-kafka Message: tansu's out-of-order batch visibility (a
    later produce batch served before an earlier one) cannot be triggered on demand."""

    def __init__(self, topic: str, partition: int, offset: int) -> None:
        self._position = (topic, partition, offset)

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self._position[0]

    def partition(self) -> int:
        return self._position[1]

    def offset(self) -> int:
        return self._position[2]


class SeekRecorder:
    """Stand-in for the consumer's seek(), committed() and watermarks, recording seeks."""

    def __init__(self, committed: dict[int, int] | None = None) -> None:
        self.seeks: list[tuple[str, int, int]] = []
        self.committed_offsets = committed or {}

    def seek(self, tp: TopicPartition) -> None:
        self.seeks.append((tp.topic, tp.partition, tp.offset))

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        return [
            TopicPartition(tp.topic, tp.partition, self.committed_offsets.get(tp.partition, -1001))
            for tp in partitions
        ]

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float) -> tuple[int, int]:
        return 0, 1000


def test_an_offset_jump_is_re_read_until_it_closes_on_tansu(
    tansu_kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sinks.clickhouse as sink_module

    sink = make_sink(tansu_kafka_factory(), clickhouse, database, "sink-g")
    consumer = SeekRecorder()

    def poll(*offsets: int, partition: int = 0) -> list[bool]:
        sink._reseeking.clear()
        return [sink._in_sequence(consumer, StandInMessage("t", partition, o)) for o in offsets]  # type: ignore[arg-type]

    assert poll(5, 6, 7) == [True, True, True]
    assert poll(10, 11) == [False, False]  # 8 and 9 are missing: re-read from 8
    assert consumer.seeks == [("t", 0, 8)]
    assert poll(8, 9, 10, 11) == [True, True, True, True]  # the earlier batch arrived
    assert poll(11, 12, partition=0) == [False, True]  # overlap after a re-read is dropped
    assert poll(3, partition=1) == [True]  # partitions are independent

    monkeypatch.setattr(sink_module, "GAP_ACCEPT_S", 0.0)
    assert poll(20) == [True]  # a gap that does not close is finally accepted
    assert len(consumer.seeks) == 1


def test_transactional_writes_are_stored_at_once_and_aborted_ones_never(
    kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, database: str
) -> None:
    """On Apache Kafka, transaction markers take offsets a read_committed consumer never
    sees: the sink must not treat them as gaps to wait for (the tansu guard waited 5 s per
    transaction), and records of an aborted transaction are never stored."""
    kafka = kafka_factory()
    if kafka.tansu:
        pytest.skip("tansu shows aborted transactions to read_committed consumers")
    encode_lab = serde.AvroSerializer(REGISTRY, serde.LAB_RESULT)
    topic = kafka.topic(NORM_TOPICS["lab_result"])
    producer = Producer(kafka.producer_config(**{"transactional.id": f"tx-{topic}"}))
    producer.init_transactions(30)
    for batch in range(4):
        producer.begin_transaction()
        for i in range(10):
            raw_offset = batch * 10 + i
            producer.produce(topic, key=b"pk1", value=encode_lab(lab_result(0, raw_offset)), partition=0)
        # Sent before the transaction ends, so the aborted records really are in the log
        # (and librdkafka does not abort while their partition is being added: a fatal
        # INVALID_TXN_STATE from Kafka 4.1 once in CI).
        producer.flush(30)
        if batch == 2:
            producer.abort_transaction(30)
        else:
            producer.commit_transaction(30)
    sink = make_sink(kafka, clickhouse, database, "sink-tx")
    started = time.monotonic()
    with running(sink):
        wait_for(
            lambda: count(clickhouse, f"SELECT count() FROM {database}.lab_result") >= 30,
            20,
            "the three committed transactions stored",
        )
        elapsed = time.monotonic() - started
        time.sleep(0.5)
    stored = clickhouse.query(f"SELECT source_offset FROM {database}.lab_result ORDER BY 1").result_rows
    assert [row[0] for row in stored] == [o for o in range(40) if not 20 <= o < 30]
    # Three commit markers and an abort marker sit between the batches: no 5 s wait each.
    assert elapsed < 5, f"stored after {elapsed:.1f} s"


def test_a_crash_while_clickhouse_is_down_exits_instead_of_hanging(
    kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, database: str
) -> None:
    kafka = kafka_factory()
    encode_lab = serde.AvroSerializer(REGISTRY, serde.LAB_RESULT)
    topic = kafka.topic(NORM_TOPICS["lab_result"])
    produce(kafka, [(topic, b"pk%d" % i, encode_lab(lab_result(0, i))) for i in range(50)])
    down = RefusingClient(clickhouse, failures=10**9)  # unreachable for good

    class CrashingSink(ClickHouseSink):
        """Fault injection: the consuming loop fails once the inserter is retrying."""

        def _update_lag(self) -> None:
            if down.refused >= 2:
                raise RuntimeError("injected crash in the consuming loop")

    sink = CrashingSink(
        kafka, SinkSettings(group_id="sink-h", batch_max_ms=50, retry_initial_s=0.05), down, database, REGISTRY,
        keys=KEYS,
    )
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: _capture(sink.run, errors), daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the sink hung waiting for its inserter"
    assert [str(e) for e in errors] == ["injected crash in the consuming loop"]
    assert committed_total(kafka, "sink-h", topic, 2) == 0


def _capture(target: Callable[[], None], errors: list[BaseException]) -> None:
    try:
        target()
    except BaseException as exc:
        errors.append(exc)


def test_the_first_record_after_an_assignment_is_checked_too_on_tansu(
    tansu_kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, database: str
) -> None:
    sink = make_sink(tansu_kafka_factory(), clickhouse, database, "sink-i")
    consumer = SeekRecorder(committed={2: 100})
    sink._on_assign(consumer, [TopicPartition("t", 2), TopicPartition("t", 3)])  # type: ignore[arg-type]
    sink._reseeking.clear()
    assert not sink._in_sequence(consumer, StandInMessage("t", 2, 105))  # type: ignore[arg-type]
    assert not sink._in_sequence(consumer, StandInMessage("t", 3, 4))  # type: ignore[arg-type]
    assert consumer.seeks == [("t", 2, 100), ("t", 3, 0)]  # committed offset; log start


def test_stop_during_an_outage_ends_with_records_left_unstored_not_a_hang(
    kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, database: str
) -> None:
    kafka = kafka_factory()
    encode_lab = serde.AvroSerializer(REGISTRY, serde.LAB_RESULT)
    topic = kafka.topic(NORM_TOPICS["lab_result"])
    produce(kafka, [(topic, b"pk%d" % i, encode_lab(lab_result(0, i))) for i in range(100)])
    down = RefusingClient(clickhouse, failures=10**9)
    sink = ClickHouseSink(
        kafka, SinkSettings(group_id="sink-j", batch_max_ms=20, batch_max_rows=50, retry_initial_s=0.05),
        down, database, REGISTRY, keys=KEYS,
    )
    thread = threading.Thread(target=sink.run, daemon=True)
    thread.start()
    wait_for(lambda: down.refused >= 2, what="the first flush stuck in the outage")
    produce(kafka, [(topic, b"pk%d" % i, encode_lab(lab_result(0, i))) for i in range(100, 200)])
    # one flush being retried, one queued behind it
    wait_for(lambda: sink._in_flight >= 2, what="a second flush queued behind it")
    sink.stop(drain_s=2.0)
    thread.join(30)
    assert not thread.is_alive(), "the sink hung at stop"
    assert sink.left_unstored
    assert committed_total(kafka, "sink-j", topic, 2) == 0


class SlowClient:
    """Fault injection: every insert takes 0.6 s (a loaded ClickHouse)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def create_insert_context(self, *args: Any, **kwargs: Any) -> Any:
        return self.client.create_insert_context(*args, **kwargs)

    def insert(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(0.6)
        return self.client.insert(*args, **kwargs)


def test_a_drain_that_stalls_on_slow_inserts_still_reads_everything(
    kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, database: str
) -> None:
    kafka = kafka_factory()
    encode_lab = serde.AvroSerializer(REGISTRY, serde.LAB_RESULT)
    topic = kafka.topic(NORM_TOPICS["lab_result"])
    produce(kafka, [(topic, b"pk%d" % i, encode_lab(lab_result(0, i))) for i in range(10000)])
    sink = ClickHouseSink(  # flushes of ~1000 rows queue up behind >1 s inserts: the loop stalls
        kafka, SinkSettings(group_id="sink-k", batch_max_ms=100, batch_max_rows=1000),
        SlowClient(clickhouse), database, REGISTRY, keys=KEYS,
    )
    sink.stop(drain_s=120.0)  # stop at once: only the drain reads the backlog
    sink.run()
    assert not sink.left_unstored
    assert committed_total(kafka, "sink-k", topic, 2) == 10000
    assert count(clickhouse, f"SELECT count() FROM {database}.lab_result") == 10000



def _ledger_of_raw_records(
    kafka: KafkaSettings, clickhouse: Client, database: str, group: str,
    headers: list[list[tuple[str, bytes]]], columns: str,
) -> list[tuple[object, ...]]:
    """Raw records with these headers, stored by a sink: their ledger rows (``columns``)."""
    topic = kafka.topic(RAW_TOPICS["emr_cdc"])
    producer = Producer(kafka.producer_config())
    for index, record_headers in enumerate(headers):
        producer.produce(topic, key=b"a", value=b"row-%d" % index, headers=record_headers)
    assert producer.flush(30) == 0
    with running(make_sink(kafka, clickhouse, database, group)):
        wait_for(lambda: count(clickhouse, f"SELECT count() FROM {database}.raw_ledger")
                 == len(headers))
    return list(clickhouse.query(
        f"SELECT source_offset, {columns} FROM {database}.raw_ledger ORDER BY 1"
    ).result_rows)


def test_raw_ledger_names_the_collector_from_the_record_header(
    kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, database: str
) -> None:
    rows = _ledger_of_raw_records(
        kafka_factory(), clickhouse, database, "sink-ledger",
        [[("medstream-collector", b"his-pg")], [("other", b"x")], []], "collector, source_kind",
    )
    assert rows == [(0, "his-pg", "emr_cdc"), (1, "", "emr_cdc"), (2, "", "emr_cdc")]


def test_provenance_headers_that_are_not_names_are_stored_empty_and_counted(
    kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, database: str
) -> None:
    from medstream.metrics import HEADERS_REFUSED

    def refused(header: str) -> float:
        return float(HEADERS_REFUSED.labels(header)._value.get())  # type: ignore[attr-defined]

    before = refused("medstream-run"), refused("medstream-collector")
    forged = [
        [("medstream-collector", b"his-pg"), ("medstream-run", b"a1b2c3d4")],
        [("medstream-collector", b"x" * 65), ("medstream-run", b"r1' OR '1'='1")],
        [("medstream-collector", b"his pg"), ("medstream-run", "r\u00e9".encode())],
        [("medstream-collector", b""), ("medstream-run", b"ok.run_1-2")],
    ]
    rows = _ledger_of_raw_records(
        kafka_factory(), clickhouse, database, "sink-headers", forged, "collector, run_id"
    )
    assert rows == [(0, "his-pg", "a1b2c3d4"), (1, "", ""), (2, "", ""), (3, "", "ok.run_1-2")]
    # An empty header is no header: only the three that were not names are counted.
    after = refused("medstream-run"), refused("medstream-collector")
    assert (after[0] - before[0], after[1] - before[1]) == (2, 2)


def test_an_alert_is_stored_without_waiting_for_the_batch_age(
    kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, database: str
) -> None:
    kafka = kafka_factory()
    sink = ClickHouseSink(
        kafka, SinkSettings(group_id="sink-urgent", batch_max_ms=8000), clickhouse, database,
        REGISTRY, keys=KEYS,
    )
    encode_lab = serde.AvroSerializer(REGISTRY, serde.LAB_RESULT)
    encode_alert = serde.AvroSerializer(REGISTRY, serde.ALERT)
    lab = lab_result(0, 500)
    with running(sink):
        time.sleep(3)  # joined the group
        produce(kafka, [(kafka.topic(NORM_TOPICS["lab_result"]), b"pk", encode_lab(lab))])
        time.sleep(2)
        # A lab result alone waits for the batch age (8 s) ...
        assert count(clickhouse, f"SELECT count() FROM {database}.lab_result") == 0
        produce(kafka, [(kafka.topic(ALERTS_TOPIC), b"pk1",
                         encode_alert(critical_alert(lab["event_id"])))])
        sent = time.monotonic()
        # ... an alert is handed over as soon as the inserter is free.
        wait_for(lambda: count(clickhouse, f"SELECT count() FROM {database}.alert_history") == 1,
                 5, "the alert stored")
        assert time.monotonic() - sent < 3


def test_a_sink_whose_broker_died_stops_within_its_drain_time_keeping_what_it_read(
    clickhouse: Client, database: str, tmp_path: Path
) -> None:
    """An orphaned sink (its `up` and broker gone) is sent SIGTERM: it must not retry the
    dead broker for ever. What it read is stored; offsets it cannot commit are read again
    by the next run (the inserts are idempotent)."""
    from medstream.runtime import TansuBroker, ensure_topics

    broker = TansuBroker(log_path=tmp_path / "broker.log").start()
    try:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, broker_kind="tansu",
                              topic_prefix="orphan.", raw_partitions=1, norm_partitions=1)
        ensure_topics(kafka)
        # Batches wait for their age (a minute): read, held, neither stored nor committed.
        sink = ClickHouseSink(
            kafka, SinkSettings(group_id="sink-orphan", batch_max_ms=60_000), clickhouse,
            database, REGISTRY, keys=KEYS,
        )
        finished = threading.Event()
        thread = threading.Thread(target=lambda: (sink.run(), finished.set()), daemon=True)
        thread.start()
        raw = kafka.topic(RAW_TOPICS["emr_cdc"])
        produce(kafka, [(raw, b"k", b"row-%d" % i) for i in range(5)])
        wait_for(lambda: sum(b.rows for b in list(sink._batches.values())) == 5, what="reading")
    finally:
        broker.stop()
    started = time.monotonic()
    sink.stop(drain_s=3.0)
    thread.join(timeout=180)
    took = time.monotonic() - started
    assert finished.is_set() and took < 3.0 + STOP_AFTER_DRAIN_S + 2.0, took
    assert count(clickhouse, f"SELECT count() FROM {database}.raw_ledger") == 5
    assert sink.left_unstored is False


def test_an_orphaned_sink_process_exits_on_sigterm_when_its_broker_is_gone(tmp_path: Path) -> None:
    """`medstream sink` as `up` starts it; its broker is killed, then it gets the SIGTERM
    that die_with_parent sends when `up` dies: it exits within its stop time."""
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    from medstream.cli import SINK_STOP_DRAIN_S
    from medstream.runtime import TansuBroker, ensure_topics, free_port

    broker = TansuBroker(log_path=tmp_path / "broker.log").start()
    metrics = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MEDSTREAM_", "KAFKA_", "CLICKHOUSE_"))}
    env.update(MEDSTREAM_DATA_DIR=str(tmp_path), KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers,
               MEDSTREAM_KAFKA_BROKER_KIND="tansu", MEDSTREAM_SINK_BATCH_MAX_MS="60000",
               MEDSTREAM_SINK_DEAD_LETTER_SECRET=KEYS.dead_letter_secret.decode(),
               MEDSTREAM_AUDIT_KEY=KEYS.audit_key.decode())
    log = (tmp_path / "sink.log").open("wb")
    sink = subprocess.Popen(
        [sys.executable, "-m", "medstream", "sink", "--metrics-port", str(metrics)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        try:
            kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, broker_kind="tansu")
            ensure_topics(kafka)

            def sink_says(line: str) -> bool:
                try:
                    url = f"http://127.0.0.1:{metrics}/metrics"
                    with urllib.request.urlopen(url, timeout=2) as answer:
                        return line in answer.read().decode()
                except OSError:
                    return False

            wait_for(lambda: sink_says('medstream_ready{component="sink"} 1.0')
                     or sink.poll() is not None, timeout_s=120, what="the sink's partitions")
            raw = kafka.topic(RAW_TOPICS["emr_cdc"])
            produce(kafka, [(raw, b"k", b"row-%d" % i) for i in range(5)])
            wait_for(lambda: sink_says(
                f'medstream_records_in_total{{stage="sink",topic="{raw}"}} 5.0'
            ), what="the sink reading")
        finally:
            broker.stop()
        started = time.monotonic()
        sink.send_signal(signal.SIGTERM)
        code = sink.wait(timeout=SINK_STOP_DRAIN_S + STOP_AFTER_DRAIN_S + 10)
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()
        log.close()
    took = time.monotonic() - started
    output = (tmp_path / "sink.log").read_text()
    assert code == 0, output[-3000:]
    assert took < SINK_STOP_DRAIN_S + STOP_AFTER_DRAIN_S, took
    assert "the records will be read again" in output
