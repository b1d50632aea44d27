"""The ClickHouse sink: norm.*, alerts and dlq topics (plus the raw ledger) into ClickHouse.

Records are collected per partition; a flush, due by size or age, inserts the pending rows
once per table with an insert_deduplication_token derived from the topic/partition/offset
ranges it covers, and only then commits those offsets. While ClickHouse refuses, the same
flush is retried with backoff (same rows, same token) and nothing is skipped or committed.
A sink killed between insert and commit re-reads the records and re-inserts them; every
table is a ReplacingMergeTree on a natural key, so those rows collapse (query with FINAL).
An audit record is stored only when it carries the authentication code of the audit key;
any other is dead-lettered with its reason and counted in ``medstream_audit_refused``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import InterfaceError, OperationalError
from clickhouse_connect.driver.insert import InsertContext
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from medstream.audit import audit_refusal
from medstream.metrics import (
    AUDIT_REFUSED,
    DEAD_LETTERS,
    END_TO_END_SECONDS,
    HEADERS_REFUSED,
    OFFSET_GAPS,
    READY,
    RECORDS_IN,
    RECORDS_OUT,
    SINK_BATCH_ROWS,
    SINK_FAILURES,
    SINK_INSERT_SECONDS,
    labelled,
    partition_lag,
    report_consumer_lag,
)
from medstream.sealing import derive_key, seal
from medstream.settings import (
    ALERTS_TOPIC,
    DLQ_TOPIC,
    FACT_TOPICS,
    NORM_TOPICS,
    RAW_TOPICS,
    KafkaSettings,
    SinkSettings,
)
from schemas import serde
from schemas.identity import dead_letter_id
from schemas.serde import COLLECTOR_HEADER, RUN_HEADER

log = logging.getLogger("medstream.sink")

STAGE = "sink"
#: Key derivation label of the dead-letter sealing key.
DEAD_LETTER_PURPOSE = "dead-letter"
SUBJECT_BY_TABLE = {
    **serde.NORM_SUBJECT_BY_KIND,
    **serde.FACT_SUBJECT_BY_TABLE,
    "alert_history": serde.ALERT,
    "dead_letter": serde.DEAD_LETTER,
}
PROOF_TABLES = ("lineage", "raw_ledger")
LINEAGE_COLUMNS = [
    "kafka_cluster",
    "source_topic",
    "source_partition",
    "source_offset",
    "record_index",
    "record_count",
    "event_id",
    "outcome",
    "content_hash",
    "declared_update",
    "sender",
    "ingest_time",
]
# The clinical outputs: their stored rows are observed in END_TO_END_SECONDS.
LATENCY_TABLES = (
    "alert_history", "lab_result", "observation", "claim_line", "encounter", "diagnosis"
)
LEDGER_COLUMNS = [
    "kafka_cluster",
    "source_kind",
    "collector",
    "run_id",
    "source_topic",
    "source_partition",
    "source_offset",
    "ingest_time",
    "value_bytes",
]


#: What a collector or run header must look like to be stored: collector names
#: ([a-z0-9][a-z0-9_-]{0,62}) and run ids (eight hex digits) fit; anything else a raw-topic
#: writer put there is not trusted as provenance.
PROVENANCE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _header(message: Message, wanted: str) -> str:
    """A raw record's provenance header as text, e.g. its collector or run ('' when it has
    none, or when it is not a name: then counted in HEADERS_REFUSED)."""
    headers: Any = message.headers() or ()
    for name, value in headers:
        if name == wanted and isinstance(value, bytes) and value:
            text = value.decode("utf-8", "replace")
            if PROVENANCE_NAME.fullmatch(text):
                return text
            HEADERS_REFUSED.labels(wanted).inc()
            return ""
    return ""


# Fields of a normalised event that say how and when it was delivered or mapped, not what
# the source said: left out of its content fingerprint, so a redelivery or a reprocessing
# under a newer terminology version fingerprints the same.
NOT_CONTENT = frozenset({
    "ingest_time", "normalised_time", "source_topic", "source_partition", "source_offset",
    "mapping_version", "mapping_status", "loinc_code", "icd10_code", "item_code",
    "metric_code", "department_code",
})
# CDC operations and HL7 result statuses (OBX-11) by which a source declares a record an
# update, correction or withdrawal of an earlier one.
UPDATE_OPS = frozenset({"u", "d"})
UPDATE_RESULT_STATUSES = frozenset({"C", "D"})
#: The sending system kept per stored copy (lineage.sender) is cut to this many characters.
SENDER_MAX_CHARS = 64


def content_hash(record: dict[str, Any]) -> str:
    """A fingerprint of what the source said in one normalised event (see NOT_CONTENT)."""
    content = {k: v for k, v in record.items() if k not in NOT_CONTENT}
    text = json.dumps(content, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def declared_update(record: dict[str, Any]) -> bool:
    """True when the source marked the event as an update or correction of an earlier one."""
    return (
        record.get("op") in UPDATE_OPS
        or str(record.get("result_status") or "").upper() in UPDATE_RESULT_STATUSES
    )


def _ms_to_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _position(message: Message) -> tuple[str, int, int]:
    """The topic, partition and offset of a consumed record (only error events lack them)."""
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    if topic is None or partition is None or offset is None:
        raise ValueError(f"consumed message has no topic/partition/offset: {message.error()}")
    return topic, partition, offset


@dataclass
class PartitionBatch:
    """Rows collected from one partition since its last flush."""

    topic: str
    partition: int
    first_offset: int
    last_offset: int
    opened_at: float
    rows: int = 0


@dataclass
class PendingFlush:
    """Rows per table plus the partition ranges they cover; retried unchanged until stored."""

    rows_by_table: dict[str, list[list[Any]]] = field(default_factory=dict)
    ranges: list[PartitionBatch] = field(default_factory=list)
    kafka_cluster: str = ""  # offsets are reused by a restarted embedded broker

    def token(self, table: str) -> str:
        """Deduplication token: the table and the exact offset ranges of this flush."""
        spans = ",".join(
            f"{b.topic}/{b.partition}/{b.first_offset}-{b.last_offset}"
            for b in sorted(self.ranges, key=lambda b: (b.topic, b.partition))
        )
        return hashlib.sha256(f"{self.kafka_cluster}|{table}|{spans}".encode()).hexdigest()


@dataclass(frozen=True)
class SinkKeys:
    """The sink's secrets (resolved by the caller, see medstream.keys): the one sealing
    dead-letter payloads, and the audit key that authenticates audit records."""

    dead_letter_secret: bytes
    audit_key: bytes


class TableWriter:
    """Turns decoded records of one kind into rows in the column order of its table."""

    def __init__(self, table: str, registry: serde.SchemaRegistry) -> None:
        self.table = table
        self.subject = SUBJECT_BY_TABLE[table]
        self.decode = serde.AvroDeserializer(registry, self.subject)
        self.columns = [f["name"] for f in registry.latest(self.subject).definition["fields"]]

    def row(self, record: dict[str, Any]) -> list[Any]:
        """The row for one decoded record."""
        return [record[name] for name in self.columns]


#: How long a stop may take past its drain time: committing what was stored and leaving
#: the group. A broker that does not answer (gone with the `up` that started it) gets no
#: longer: the offsets stay uncommitted and the next run reads those records again.
STOP_AFTER_DRAIN_S = 10.0


class ClickHouseSink:
    """Consumes norm.*, alerts, dlq and raw.*; writes them to ClickHouse exactly once per key."""

    def __init__(
        self,
        kafka: KafkaSettings,
        settings: SinkSettings,
        client: Client,
        database: str,
        registry: serde.SchemaRegistry,
        client_lock: threading.Lock | None = None,
        include_raw_ledger: bool = True,
        *,
        keys: SinkKeys,
    ) -> None:
        self.kafka = kafka
        self.settings = settings
        self.client = client
        self.database = database
        self.client_lock = client_lock or threading.Lock()
        self.writers: dict[str, TableWriter] = {
            kafka.topic(topic): TableWriter(kind, registry) for kind, topic in NORM_TOPICS.items()
        }
        self.writers[kafka.topic(ALERTS_TOPIC)] = TableWriter("alert_history", registry)
        for table, topic in FACT_TOPICS.items():
            self.writers[kafka.topic(topic)] = TableWriter(table, registry)
        self.writers[kafka.topic(DLQ_TOPIC)] = TableWriter("dead_letter", registry)
        self.raw_kind_by_topic = (
            {kafka.topic(topic): kind for kind, topic in RAW_TOPICS.items()}
            if include_raw_ledger
            else {}
        )
        self.dead_letter_columns = self.writers[kafka.topic(DLQ_TOPIC)].columns
        self._dead_letter_key = derive_key(keys.dead_letter_secret, DEAD_LETTER_PURPOSE)
        self._audit_key = keys.audit_key
        self._audit_topic = kafka.topic(FACT_TOPICS["audit_log"])
        self._batches: dict[tuple[str, int], PartitionBatch] = {}
        self._rows: dict[str, list[list[Any]]] = {}
        self._consumer: Consumer | None = None
        self._stop = threading.Event()
        self._last_lag_check = 0.0
        #: Committed offsets of the partitions held, read when nothing was read since the
        #: assignment (for the lag gauge), and the topics the gauge holds for this sink.
        self._committed_at_assignment: dict[tuple[str, int], int] = {}
        self._lag_topics: set[str] = set()
        self.kafka_cluster = ""
        self._to_insert: queue.Queue[PendingFlush | None] = queue.Queue(maxsize=1)
        self._stored: queue.Queue[tuple[PendingFlush, BaseException | None]] = queue.Queue()
        self._in_flight = 0
        self._contexts: dict[str, InsertContext] = {}
        self._next_offset: dict[tuple[str, int], int] = {}
        self._gaps: dict[tuple[str, int, int], float] = {}
        self._reseeking: set[tuple[str, int]] = set()
        self._stop_deadline: float | None = None
        self._aborting = False
        self.left_unstored = False

    @property
    def topics(self) -> list[str]:
        """Every topic the sink reads."""
        return sorted([*self.writers, *self.raw_kind_by_topic])

    @property
    def stopping(self) -> bool:
        """True once stop() was called (or the sink is crashing)."""
        return self._stop.is_set()

    def stop(self, drain_s: float = 20.0) -> None:
        """Finish: consume until idle (at most ``drain_s``), store, commit, return.

        What cannot be stored within the drain time is left uncommitted (and
        ``left_unstored`` is set): the next run reads it again.
        """
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + drain_s
        self._stop.set()

    def run(self) -> None:
        """Consume until stop(); flush by size/age; commit only what ClickHouse accepted.

        Inserts run on a background thread so consuming and decoding go on meanwhile; at
        most one flush is being inserted and one waits, beyond that the loop waits too.
        """
        inserter = threading.Thread(target=self._insert_loop, name="clickhouse-inserter")
        inserter.start()
        try:
            self._consume()
        finally:
            while inserter.is_alive():  # it may have ended already, with a flush still queued
                try:
                    self._to_insert.put(None, timeout=0.5)
                    break
                except queue.Full:
                    continue
            inserter.join()

    def _consume(self) -> None:
        consumer = Consumer(
            self.kafka.consumer_config(
                self.settings.group_id,
                # The loop stops polling while the inserter retries an outage: stay in the
                # group for up to librdkafka's maximum (24 h) rather than 10 minutes.
                **{"enable.partition.eof": False, "max.poll.interval.ms": 86_400_000},
            )
        )
        self._consumer = consumer
        # Raw positions are only unique within one Kafka cluster (an embedded broker's
        # offsets restart at 0 with a new cluster id), so lineage and ledger rows carry it.
        self.kafka_cluster = consumer.list_topics(timeout=30).cluster_id or ""
        self.kafka.check_cluster(self.kafka_cluster)
        consumer.subscribe(
            self.topics,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        max_age = self.settings.batch_max_ms / 1000
        empty_since: float | None = None  # start of the current run of empty polls
        stop_seen = False
        try:
            # After stop() the loop goes on until the topics are idle (the producers are
            # stopped first) or the drain time is up, so a graceful stop leaves no read lag.
            while not self._stop.is_set() or not (self._idle(empty_since) or self._drain_over()):
                if self._stop.is_set() and not stop_seen:
                    stop_seen, empty_since = True, None  # idleness counts from the stop on
                messages = consumer.consume(num_messages=2000, timeout=0.05)
                # Idle means assigned and polls coming back empty for a while (not a stall
                # elsewhere in the loop, not still joining the group).
                if messages or not consumer.assignment():
                    empty_since = None
                elif empty_since is None:
                    empty_since = time.monotonic()
                self._reseeking.clear()
                for message in messages:
                    if self._in_sequence(consumer, message):
                        self._add(message)
                oldest = min((b.opened_at for b in self._batches.values()), default=None)
                if oldest is not None:
                    age = time.monotonic() - oldest
                    pending_rows = sum(b.rows for b in self._batches.values())
                    # Due by size, or by age once the inserter is free: under load batches
                    # grow while an insert runs (each insert has a fixed cost), and the age
                    # cap bounds how long a record can wait.
                    # Alerts are waited for by people: a batch holding one is handed over
                    # as soon as the inserter is free, without waiting for the batch age.
                    urgent = self._in_flight == 0 and "alert_history" in self._rows
                    if (
                        pending_rows >= self.settings.batch_max_rows
                        or (age >= max_age and self._in_flight == 0)
                        or age >= max_age * AGE_CAP_FACTOR
                        or urgent
                    ):
                        self._flush()
                self._commit_stored(wait=False)
                self._update_lag()
            self._flush_on_stop()
        except SinkStopped as exc:  # the drain time ran out while ClickHouse was failing
            self._abort()
            self.left_unstored = True
            log.error("stopped with records read but not stored (left uncommitted): %s", exc)
        except BaseException:
            self._abort()  # before close(): its revoke callback must not wait on the inserter
            raise
        finally:
            consumer.close()
            self._consumer = None

    def _flush_on_stop(self) -> None:
        """A graceful stop stores what was read, unless ClickHouse keeps failing past the drain."""
        try:
            if self._batches:
                self._flush()
            self._commit_stored(wait=True)
        except SinkStopped as exc:
            self._abort()  # nothing behind the failed flush will be reported any more
            self.left_unstored = True
            log.error("stopped with records read but not stored (left uncommitted): %s", exc)

    @staticmethod
    def _idle(empty_since: float | None) -> bool:
        return empty_since is not None and time.monotonic() - empty_since >= IDLE_AFTER_S

    def _drain_over(self) -> bool:
        return self._stop_deadline is not None and time.monotonic() > self._stop_deadline

    def _abort(self) -> None:
        """Crashing: stop the inserter's retrying and commit nothing more."""
        self._aborting = True
        self._stop_deadline = time.monotonic()
        self._stop.set()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Records of revoked partitions are stored and committed while we still own them,
        # so the next owner starts after them instead of storing them again. Not when
        # crashing: they stay uncommitted and are read again.
        if self._aborting:
            return
        if self._batches:
            self._flush()
        self._commit_stored(wait=True)

    def _in_sequence(self, consumer: Consumer, message: Message) -> bool:
        """Guard against offset jumps on tansu: re-read from the first missing offset.

        tansu has been seen to serve a later produce batch before an earlier one when two
        producers write a partition at once; a consumer that moved on would never read the
        earlier batch. A jump is re-read until it closes, and only a gap that persists for
        GAP_ACCEPT_S is accepted (and counted) as real. Apache Kafka needs no such guard,
        and there offsets are not contiguous anyway: transaction markers and aborted records
        of transactional producers take offsets a read_committed consumer never sees.
        """
        if message.error() is not None or not self.kafka.tansu:
            return True
        topic, partition, offset = _position(message)
        key = (topic, partition)
        if key in self._reseeking:
            return False  # the rest of this poll for the partition comes again after the seek
        expected = self._next_offset.get(key)
        if expected is not None and offset > expected:
            first_seen = self._gaps.setdefault((topic, partition, expected), time.monotonic())
            if time.monotonic() - first_seen < GAP_ACCEPT_S:
                consumer.seek(TopicPartition(topic, partition, expected))
                self._reseeking.add(key)
                return False
            labelled(OFFSET_GAPS, STAGE, topic).inc()
            log.warning(
                "accepted an offset gap in %s[%d]: %d..%d", topic, partition, expected, offset - 1
            )
        if expected is not None:
            if offset < expected:
                return False  # already read (a re-read after a seek can overlap)
            self._gaps.pop((topic, partition, expected), None)
        self._next_offset[key] = offset + 1
        return True

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:  # another owner may have committed since: asked again
            self._committed_at_assignment.pop((tp.topic, tp.partition), None)
        # On tansu a new assignment starts at the committed offset (or the log start): the
        # gap guard expects exactly that offset first, so even the first batch is checked.
        # Apache Kafka has no guard, and no watermark is asked for here: a partition whose
        # leader is being elected (a new topic, a broker down) would fail the assignment.
        if not self.kafka.tansu:
            READY.labels(STAGE).set(1)
            return
        for tp in consumer.committed(partitions, timeout=30):
            key = (tp.topic, tp.partition)
            start = tp.offset
            if start < 0:
                start, _ = consumer.get_watermark_offsets(tp, timeout=30)
            self._next_offset[key] = start
            for gap in [g for g in self._gaps if g[:2] == key]:
                del self._gaps[gap]
        READY.labels(STAGE).set(1)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Partitions taken away without a revoke (membership lost): nothing to commit."""
        log.warning(
            "lost %d partitions; their uncommitted records will be read again", len(partitions)
        )

    def _add(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                return
            raise KafkaException(error)
        topic, partition, offset = _position(message)
        labelled(RECORDS_IN, STAGE, topic).inc()
        key = (topic, partition)
        batch = self._batches.get(key)
        if batch is None:
            batch = PartitionBatch(topic, partition, offset, offset, time.monotonic())
            self._batches[key] = batch
        batch.last_offset = offset
        batch.rows += 1
        timestamp_ms = message.timestamp()[1]
        raw_kind = self.raw_kind_by_topic.get(topic)
        if raw_kind is not None:
            value = message.value() or b""
            self._rows.setdefault("raw_ledger", []).append(
                [
                    self.kafka_cluster, raw_kind, _header(message, COLLECTOR_HEADER),
                    _header(message, RUN_HEADER), topic, partition, offset,
                    _ms_to_datetime(timestamp_ms), len(value),
                ]
            )
            return
        writer = self.writers[topic]
        if topic == self._audit_topic:
            headers: Any = message.headers() or []
            refusal = audit_refusal(
                self._audit_key, message.key(), message.value() or b"", list(headers)
            )
            if refusal is not None:
                AUDIT_REFUSED.labels(refusal[0]).inc()
                self._dead_letter(message, timestamp_ms, "audit_unauthenticated", refusal[1])
                return
        try:
            record = writer.decode(message.value())
        except serde.SerializationError as exc:
            self._dead_letter(message, timestamp_ms, "undecodable", str(exc))
            return
        if writer.table == "dead_letter":
            self._seal(record)
        self._rows.setdefault(writer.table, []).append(writer.row(record))
        if writer.table == "dead_letter":
            self._lineage(record, "dead_letter")
        elif writer.table in serde.NORM_SUBJECT_BY_KIND:
            self._lineage(record, f"stored:{writer.table}")

    def _lineage(self, record: dict[str, Any], outcome: str) -> None:
        if outcome == "dead_letter":
            index = record["record_index"]
            count = record["record_count"]
            row = [
                self.kafka_cluster,
                record["original_topic"],
                record["original_partition"],
                record["original_offset"],
                -1 if index is None else index,
                -1 if count is None else count,
                record["dlq_id"],
                outcome,
                "",
                0,
                "",
                record["ingest_time"],
            ]
        else:
            row = [
                self.kafka_cluster,
                record["source_topic"],
                record["source_partition"],
                record["source_offset"],
                record["record_index"],
                record["record_count"],
                record["event_id"],
                outcome,
                content_hash(record),
                int(declared_update(record)),
                str(record.get("source_system") or "")[:SENDER_MAX_CHARS],
                record["ingest_time"],
            ]
        self._rows.setdefault("lineage", []).append(row)

    def _dead_letter(
        self, message: Message, timestamp_ms: int, reason_code: str, reason: str
    ) -> None:
        """A record the sink cannot decode is stored in the dead-letter table, not dropped."""
        topic, partition, offset = _position(message)
        now = datetime.now(tz=UTC)
        values = {
            "dlq_id": dead_letter_id(STAGE, topic, partition, offset, None, timestamp_ms),
            "stage": STAGE,
            "reason_code": reason_code,
            "reason": reason,
            "source_kind": None,
            "organisation_id": None,
            "original_topic": topic,
            "original_partition": partition,
            "original_offset": offset,
            "record_index": None,
            "record_count": None,
            "original_key": message.key(),
            "original_value": message.value() or b"",
            "ingest_time": _ms_to_datetime(timestamp_ms),
            "failed_time": now,
        }
        self._seal(values)
        row = [values[c] for c in self.dead_letter_columns]
        self._rows.setdefault("dead_letter", []).append(row)
        DEAD_LETTERS.labels(STAGE, reason_code).inc()
        log.warning("dead-lettered %s[%d]@%d: %s", topic, partition, offset, reason_code)

    def _seal(self, dead_letter: dict[str, Any]) -> None:
        """Seal a dead letter's original key and bytes: they hold patient identifiers.

        The payload stays recoverable for reprocessing (``medstream dlq show``) with the
        sink's secret, which ClickHouse never holds; the dead-letter id is bound in as
        associated data, so a sealed payload cannot be moved to another row unnoticed.
        """
        associated = dead_letter["dlq_id"].encode()
        dead_letter["original_value"] = seal(
            dead_letter["original_value"] or b"", self._dead_letter_key, associated
        )
        if dead_letter["original_key"] is not None:
            dead_letter["original_key"] = seal(
                dead_letter["original_key"], self._dead_letter_key, associated + b"|key"
            )

    def _flush(self) -> None:
        """Hand the collected rows to the inserter (waits while one flush is already queued)."""
        pending = PendingFlush(self._rows, list(self._batches.values()), self.kafka_cluster)
        self._rows = {}
        self._batches = {}
        while True:
            try:
                self._to_insert.put(pending, timeout=0.5)
                self._in_flight += 1
                return
            except queue.Full:
                self._commit_stored(wait=False)  # surfaces an inserter failure meanwhile

    def _insert_loop(self) -> None:
        """The inserter thread: store flushes in order; report each result to the loop."""
        while True:
            pending = self._to_insert.get()
            if pending is None:
                return
            try:
                self._store(pending)
            except BaseException as exc:  # handed to the consuming thread, which raises it
                self._stored.put((pending, exc))
                return
            self._stored.put((pending, None))

    def _commit_stored(self, wait: bool) -> None:
        """Commit the offsets of every flush the inserter finished, in order.

        With ``wait`` it returns only when nothing is in flight. A failed flush is raised
        here and nothing after it is committed.
        """
        while self._in_flight:
            try:
                pending, error = self._stored.get(timeout=0.5 if wait else 0.0)
            except queue.Empty:
                if wait:
                    continue
                return
            self._in_flight -= 1
            if error is not None:
                self._in_flight = 0  # the inserter has ended: nothing behind it will report
                raise error
            if self._consumer is None:
                raise RuntimeError("commit outside run(): there is no consumer to commit with")
            try:
                self._consumer.commit(
                    offsets=[
                        TopicPartition(b.topic, b.partition, b.last_offset + 1)
                        for b in pending.ranges
                    ],
                    asynchronous=False,
                )
            except KafkaException as exc:
                stopping = self._stop.is_set()
                if exc.args[0].code() not in MEMBERSHIP_ERRORS and not stopping:
                    raise
                # The rows are stored; the offsets stay behind and the records are read
                # again by whoever owns the partitions now (or by the next run, when the
                # broker is gone as this sink stops), collapsing on their keys.
                log.warning(
                    "commit %s (%s); the records will be read again",
                    "not possible while stopping" if stopping else "refused after a rebalance",
                    exc,
                )

    def _store(self, pending: PendingFlush) -> None:
        """Insert every table of a flush; retry with backoff until ClickHouse accepts or stop."""
        now = time.time()
        # Alerts first (people wait for them), then facts and dead letters; the proof tables
        # (lineage, raw ledger) last, so a proof row never exists for a fact not stored.
        tables = sorted(
            pending.rows_by_table, key=lambda t: (t in PROOF_TABLES, t != "alert_history")
        )
        for table in tables:
            rows = pending.rows_by_table[table]
            columns = self._columns(table)
            delay = self.settings.retry_initial_s
            refusals = 0  # consecutive failures that were not connection failures
            while True:
                started = time.perf_counter()
                try:
                    with self.client_lock:
                        context = self._insert_context(table, columns)
                        context.data = rows
                        context.settings["insert_deduplication_token"] = pending.token(table)
                        self.client.insert(context=context)
                    break
                except Exception as exc:
                    SINK_FAILURES.labels(table).inc()
                    refusals = 0 if _is_transient(exc) else refusals + 1
                    if refusals >= PERMANENT_ATTEMPTS:
                        raise SinkFailed(
                            f"ClickHouse refused {table} {refusals} times in a row with "
                            f"{type(exc).__name__} {_error_code(exc)}; nothing after it was "
                            "committed (the sink stops rather than skip a batch)"
                        ) from exc
                    if self._drain_over():
                        raise SinkStopped(f"stopped while {table} was failing") from exc
                    log.error(
                        "insert into %s failed (%s %s); retrying in %.1fs",
                        table, type(exc).__name__, _error_code(exc), delay,
                    )
                    if self._stop.is_set():  # draining: keep retrying, in short steps
                        time.sleep(min(delay, 0.5))
                    else:
                        self._stop.wait(delay)
                    delay = min(delay * 2, self.settings.retry_max_s)
            SINK_INSERT_SECONDS.labels(table).observe(time.perf_counter() - started)
            SINK_BATCH_ROWS.labels(table).observe(len(rows))
            RECORDS_OUT.labels(STAGE, table).inc(len(rows))
            if table in LATENCY_TABLES:
                ingest_index = columns.index("ingest_time")
                latency = labelled(END_TO_END_SECONDS, f"stored:{table}")
                for row in rows:
                    latency.observe(now - row[ingest_index].timestamp())

    def _insert_context(self, table: str, columns: list[str]) -> InsertContext:
        """A prepared insert per table (the table is described once, not on every insert)."""
        context = self._contexts.get(table)
        if context is None:
            context = self.client.create_insert_context(
                f"{self.database}.{table}", column_names=columns
            )
            self._contexts[table] = context
        return context

    def _columns(self, table: str) -> list[str]:
        if table == "lineage":
            return LINEAGE_COLUMNS
        if table == "raw_ledger":
            return LEDGER_COLUMNS
        if table == "dead_letter":
            return self.dead_letter_columns
        return next(w.columns for w in self.writers.values() if w.table == table)

    def _update_lag(self) -> None:
        if self._consumer is None or time.monotonic() - self._last_lag_check < 5:
            return
        self._last_lag_check = time.monotonic()
        lag_by_topic: dict[str, int] = {}
        # On Apache Kafka the high watermarks come from the fetch responses (cached): a
        # query would wait behind the connection's long-polling fetch, up to the fetch wait
        # per partition, and stall this loop for seconds. tansu answers fetches at once.
        cached = not self.kafka.tansu
        try:
            positions = self._consumer.position(self._consumer.assignment())
            # Nothing read since the assignment: the committed offset is where reading
            # starts (asked once per assignment; it changes only after something is read).
            unread = [tp for tp in positions if tp.offset < 0 and
                      (tp.topic, tp.partition) not in self._committed_at_assignment]
            if unread:
                for tp in self._consumer.committed(unread, timeout=1):
                    self._committed_at_assignment[(tp.topic, tp.partition)] = tp.offset
            for tp in positions:
                _, high = self._consumer.get_watermark_offsets(tp, timeout=1, cached=cached)
                if high < 0:
                    continue  # nothing fetched from this partition yet
                committed = self._committed_at_assignment.get((tp.topic, tp.partition))
                behind = partition_lag(
                    high, tp.offset if tp.offset >= 0 else None,
                    committed if committed is not None and committed >= 0 else None,
                )
                lag_by_topic[tp.topic] = lag_by_topic.get(tp.topic, 0) + behind
        except KafkaException as exc:
            log.debug("lag not updated this time: %s", exc)  # a gauge, retried in 5 s
            return
        report_consumer_lag(STAGE, lag_by_topic, self._lag_topics)


PERMANENT_ATTEMPTS = 3
MEMBERSHIP_ERRORS = {
    KafkaError.UNKNOWN_MEMBER_ID,
    KafkaError.ILLEGAL_GENERATION,
    KafkaError.REBALANCE_IN_PROGRESS,
}
GAP_ACCEPT_S = 5.0  # an offset jump that does not close by re-reading for this long is real
AGE_CAP_FACTOR = 5  # a batch is handed over at this multiple of batch_max_ms in any case
IDLE_AFTER_S = 1.0  # a stopping sink is drained once nothing arrived for this long


def _is_transient(exc: Exception) -> bool:
    """Connection-level failures are retried forever; ClickHouse refusing the data is not."""
    return isinstance(exc, OSError | OperationalError | InterfaceError)


def _error_code(exc: Exception) -> str:
    """ClickHouse's numeric error code only: its message may quote row values."""
    match = re.search(r"Code: (\d+)", str(exc))
    return f"(code {match.group(1)})" if match else ""


class SinkFailed(RuntimeError):
    """ClickHouse refused a flush in a way retrying cannot fix; nothing was committed."""


class SinkStopped(RuntimeError):
    """The sink was stopped while ClickHouse was refusing a flush; nothing was committed."""
