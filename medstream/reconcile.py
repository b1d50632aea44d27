"""Reconciliation: account for every raw record published in a time range, and name any gap.

The sink's own view, in ClickHouse and written by the sink from Kafka itself:
- raw_ledger: one row per record the sink read from a raw.* topic;
- lineage: one row per outcome of one record of one raw message (a stored event or a
  dead letter), carrying the raw position, the message's record count and a fingerprint of
  the stored event's content;
- the fact tables: what analysts query.
A raw message is accounted for when it was dead-lettered whole, or when each of its
records has a stored event or a dead letter. Stored events of the lineage must also be
present in their fact table.

The ledger cannot show what the sink never read, so what entered is also counted from
sources independent of the sink, and every offset range of a raw topic that never reached
the ledger is named:
- the broker's offsets of the raw topics, while the broker still holds them (the range's
  offsets per partition; offsets missing from the ledger are read again, read_committed, so
  transaction markers are not taken for records);
- the publishers' own counters (:mod:`medstream.published`): every position the broker
  acknowledged to the simulator or a collector, kept on disk, so a broker that forgot
  everything (tansu keeps its log in memory) still leaves the count.
An event id stored again with other content, which the source did not declare an update, is
a conflict (two different records under one id); they are counted with example ids.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from medstream.clickhouse import QueryResult
from medstream.published import AckedRange, read_published
from medstream.settings import RAW_TOPICS, KafkaSettings

Querier = Callable[[str], QueryResult]

# Fact tables whose rows keep their event id. In the state tables a later version of the
# same source row replaces an earlier one, so an older version's event id legitimately
# disappears; their stored events are proven by the lineage.
EVENT_TABLES = ("lab_result", "observation", "claim_line")
# Lineage rows carry the raw record's ingest time, the same value as its ledger row; the
# slack only guards the window's edges.
SLACK = timedelta(seconds=1)
STATE_TABLES = ("encounter", "diagnosis")
#: At most this many ranges are named in the text report (all of them in --json, up to
#: MAX_RANGES_LISTED), and this many conflicting event ids are given as examples.
RANGES_IN_TEXT = 20
MAX_RANGES_LISTED = 1000
CONFLICT_EXAMPLES = 10
#: Offsets missing from the ledger are re-read from the broker up to this many in total, to
#: tell records from transaction markers; ranges beyond it are named as unverified.
MAX_RECHECKED = 500_000
#: The most time the broker check spends re-reading; ranges left then are unverified.
REREAD_TIMEOUT_S = 120.0
#: Where each part of the report comes from (printed, and given in --json).
EVIDENCE = {
    "sources": "the sink's own view: raw_ledger (what the sink read from the raw topics) "
    "joined with lineage (what it stored or dead-lettered for each record)",
    "collectors": "raw_ledger per medstream-collector header, plus the dead letters the "
    "collectors wrote themselves (stage producer)",
    "stored_events": "lineage outcomes stored:TABLE, checked against the fact tables",
    "broker": "the broker's offsets of the raw topics in the range (independent of the "
    "sink); offsets missing from raw_ledger re-read read_committed, so transaction markers "
    "are not counted",
    "published": "the publishers' own counters (one file per simulator or collector, "
    "written on every broker acknowledgement; independent of the sink and the broker)",
    "conflicts": "lineage content fingerprints, each stored copy against the one before it: "
    "one event id stored with different content that its source did not declare an update",
    "foreign_updates": "lineage senders: a declared update from another sending system than "
    "the copy it replaced",
}


def _ts(value: datetime) -> str:
    """A ClickHouse UTC literal; a naive datetime is taken as UTC."""
    utc = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    return f"toDateTime64('{utc.strftime('%Y-%m-%d %H:%M:%S.%f')[:-3]}', 3, 'UTC')"


@dataclass
class SourceCounts:
    """Counts for one source kind in the range."""

    source_kind: str
    published_messages: int = 0
    expected_records: int = 0
    normalised_records: int = 0
    dead_lettered_records: int = 0
    dead_lettered_messages: int = 0
    unaccounted_messages: int = 0


@dataclass
class CollectorCounts:
    """Counts for one edge collector in the range (raw records it published, and what it
    dead-lettered itself because the source sent input it could not accept)."""

    collector: str
    source_kind: str
    published_messages: int = 0
    unaccounted_messages: int = 0
    dead_lettered_at_collector: int = 0


@dataclass
class MissingRange:
    """Offsets of one raw partition that never reached the sink's ledger.

    ``evidence`` says who vouches that they entered: ``broker`` or ``publisher NAME run
    ID``. ``pending`` ranges lie at or after the sink group's committed offset: the sink has
    not read them yet (a stopped or lagging sink), as opposed to ranges it went past.
    """

    evidence: str
    kafka_cluster: str
    topic: str
    partition: int
    first_offset: int
    last_offset: int
    records: int
    pending: bool = False

    def describe(self) -> str:
        """e.g. 'offsets 120..131 of raw.hl7_lab[2] never reached the ledger (12 records)'."""
        state = (
            "are not in the ledger yet: the sink has not read them"
            if self.pending
            else "never reached the ledger"
        )
        records = f"{self.records} record{'s' if self.records != 1 else ''}"
        return (
            f"offsets {self.first_offset}..{self.last_offset} of {self.topic}"
            f"[{self.partition}] {state} ({records}; {self.evidence})"
        )


@dataclass
class BrokerCounts:
    """One raw partition as the broker holds it for the range: offsets [first, end)."""

    topic: str
    partition: int
    first_offset: int
    end_offset: int
    in_ledger: int = 0
    missing: int = 0
    pending: int = 0


@dataclass
class PublishedCounts:
    """One publisher run's acknowledged records in the range, against the ledger."""

    publisher: str
    run_id: str
    acknowledged: int = 0
    in_ledger: int = 0
    missing: int = 0
    pending: int = 0


@dataclass
class ReconcileReport:
    """The result of one reconciliation (see :data:`EVIDENCE` for each part's source)."""

    since: datetime
    until: datetime
    sources: list[SourceCounts] = field(default_factory=list)
    collectors: list[CollectorCounts] = field(default_factory=list)
    stored_events: dict[str, int] = field(default_factory=dict)
    gaps: list[str] = field(default_factory=list)
    broker_cluster: str | None = None
    broker: list[BrokerCounts] = field(default_factory=list)
    published: list[PublishedCounts] = field(default_factory=list)
    missing_ranges: list[MissingRange] = field(default_factory=list)
    #: What the sink has not read yet (a lag, not a loss): lines; ``ok`` does not look at it.
    not_read_yet: list[str] = field(default_factory=list)
    conflicts: int = 0
    conflict_examples: list[str] = field(default_factory=list)
    #: Declared updates from another sending system than the copy they replaced.
    foreign_updates: int = 0
    foreign_update_examples: list[str] = field(default_factory=list)
    #: Records dead-lettered because processing them hit a bug (reason_code
    #: internal_error), per stage: none of their rules ran, so alerts may be missing.
    internal_errors: dict[str, int] = field(default_factory=dict)
    #: Publishers' counter files that could not be read (each also a gap).
    unreadable_counters: list[str] = field(default_factory=list)
    #: What was checked independently of the sink, or why it could not be.
    independent: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is unaccounted for and no record met a bug: records the sink
        has not read yet are not a gap (they are in :attr:`not_read_yet`), offsets that
        could not be checked are, and so are :attr:`internal_errors`."""
        return not self.gaps and not self.internal_errors

    @property
    def drained(self) -> bool:
        """Every accepted record has its outcome and nothing is left to read (records a bug
        dead-lettered have theirs: a pipeline can drain and still not be :attr:`ok`)."""
        return not self.gaps and self.pending_records == 0

    @property
    def pending_records(self) -> int:
        """Records on the broker past the sink group's committed offset (a lag)."""
        return sum(r.records for r in self.missing_ranges if r.pending)

    @property
    def settled(self) -> bool:
        """``ok`` and nothing left for the sink to read: every accepted record is in."""
        return self.ok and self.pending_records == 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``evidence`` says where each part comes from."""
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "ok": self.ok,
            "evidence": EVIDENCE,
            "independent_checks": self.independent,
            "sources": [s.__dict__ for s in self.sources],
            "collectors": [c.__dict__ for c in self.collectors],
            "stored_events": self.stored_events,
            "broker": {
                "kafka_cluster": self.broker_cluster,
                "partitions": [asdict(b) for b in self.broker],
            },
            "published": [asdict(p) for p in self.published],
            "missing_ranges": [asdict(r) for r in self.missing_ranges[:MAX_RANGES_LISTED]],
            "missing_ranges_total": len(self.missing_ranges),
            "conflicts": {"count": self.conflicts, "example_event_ids": self.conflict_examples},
            "internal_errors": self.internal_errors,
            "foreign_updates": {
                "count": self.foreign_updates, "example_event_ids": self.foreign_update_examples
            },
            "gaps": self.gaps,
            "not_read_yet": self.not_read_yet,
        }

    def render(self) -> str:
        """A readable table plus the gaps."""
        header = (
            f"{'source':<10} {'published':>9} {'records':>8} {'normalised':>10} "
            f"{'dead-lettered':>13} {'unaccounted':>11}"
        )
        lines = [f"reconcile {self.since.isoformat()} .. {self.until.isoformat()}", header]
        for s in self.sources:
            dlq = f"{s.dead_lettered_records}+{s.dead_lettered_messages}m"
            lines.append(
                f"{s.source_kind:<10} {s.published_messages:>9} {s.expected_records:>8} "
                f"{s.normalised_records:>10} {dlq:>13} {s.unaccounted_messages:>11}"
            )
        if self.collectors:
            lines.append(
                f"{'collector':<24} {'kind':<8} {'published':>9} {'unaccounted':>11} "
                f"{'dead-lettered at collector':>26}"
            )
            for c in self.collectors:
                lines.append(
                    f"{c.collector:<24} {c.source_kind:<8} {c.published_messages:>9} "
                    f"{c.unaccounted_messages:>11} {c.dead_lettered_at_collector:>26}"
                )
        stored = ", ".join(f"{t}={n}" for t, n in sorted(self.stored_events.items()))
        lines.append(f"stored (distinct events): {stored or 'none'}")
        lines.append("(the rows above are the sink's own view: raw_ledger and lineage)")
        if self.broker:
            lines.append(
                f"broker offsets (cluster {self.broker_cluster}; independent of the sink):"
            )
            lines.append(
                f"  {'partition':<28} {'offsets':>19} {'in ledger':>9} {'missing':>7} "
                f"{'not read yet':>12}"
            )
            for b in self.broker:
                where = f"{b.topic}[{b.partition}]"
                span = f"{b.first_offset}..{b.end_offset}"
                lines.append(
                    f"  {where:<28} {span:>19} {b.in_ledger:>9} {b.missing:>7} {b.pending:>12}"
                )
        if self.published:
            lines.append("publishers' own counters (acknowledged by the broker, kept on disk):")
            lines.append(
                f"  {'publisher':<24} {'run':<10} {'acknowledged':>12} {'in ledger':>9} "
                f"{'missing':>7} {'not read yet':>12}"
            )
            for p in self.published:
                lines.append(
                    f"  {p.publisher:<24} {p.run_id:<10} {p.acknowledged:>12} {p.in_ledger:>9} "
                    f"{p.missing:>7} {p.pending:>12}"
                )
        lines.extend(f"independent check: {note}" for note in self.independent)
        lines.append(f"conflicting event ids (same id, other content, not an update): "
                     f"{self.conflicts}")
        lines.append(f"updates from another sending system than the copy they replaced: "
                     f"{self.foreign_updates}")
        if self.not_read_yet:
            lines.append("NOT READ YET by the sink (a lag, not a loss; --strict counts it):")
            lines.extend(f"  - {line}" for line in self.not_read_yet)
        if self.internal_errors:
            by_stage = ", ".join(f"{stage} {n}" for stage, n in self.internal_errors.items())
            lines.append(
                f"INTERNAL ERRORS: {sum(self.internal_errors.values())} records were "
                f"dead-lettered because processing them hit a bug ({by_stage}; reason_code "
                "internal_error): none of their rules ran, so alerts may be missing. The "
                "worker log has the traceback; after the fix, `medstream dlq replay "
                "--reason-code internal_error` publishes them again"
            )
        if self.gaps:
            lines.append("GAPS:")
            lines.extend(f"  - {gap}" for gap in self.gaps)
        else:
            lines.append("no gap: every published record is stored or dead-lettered")
        return "\n".join(lines)


def reconcile(
    query: Querier,
    database: str,
    since: datetime,
    until: datetime,
    *,
    kafka: KafkaSettings | None = None,
    sink_group: str | None = None,
    counter_files: Iterable[Path] = (),
) -> ReconcileReport:
    """Count per source and stage for raw records ingested in [since, until) and find gaps.

    With ``kafka`` the raw topics' offsets on the broker are held against the ledger (and
    with ``sink_group`` ranges the sink has not read yet are told apart); with
    ``published`` (counter files, see :func:`medstream.published.published_files`) the
    publishers' own counts are. Without either, only the sink's own view is checked.
    """
    report = ReconcileReport(since, until)
    where = f"l.ingest_time >= {_ts(since)} AND l.ingest_time < {_ts(until)}"
    accounting = f"""
        SELECT kafka_cluster, source_topic, source_partition, source_offset,
               max(record_index = -1 AND outcome = 'dead_letter') AS whole_dlq,
               max(record_count) AS expected,
               uniqExactIf(record_index, record_index >= 0) AS covered,
               uniqExactIf(record_index, record_index >= 0 AND outcome != 'dead_letter')
                   AS normalised,
               uniqExactIf(record_index, record_index >= 0 AND outcome = 'dead_letter')
                   AS dead_lettered
        FROM {database}.lineage
        WHERE ingest_time >= {_ts(since - SLACK)} AND ingest_time < {_ts(until + SLACK)}
        GROUP BY kafka_cluster, source_topic, source_partition, source_offset"""
    rows = query(
        f"""
        SELECT l.source_kind,
               count() AS published,
               sumIf(a.expected, a.whole_dlq = 0) AS expected_records,
               sum(a.normalised) AS normalised,
               sum(a.dead_lettered) AS dead_lettered,
               countIf(a.whole_dlq = 1) AS dead_lettered_messages,
               countIf(a.whole_dlq = 0 AND (a.expected <= 0 OR a.covered < a.expected))
                   AS unaccounted
        FROM {database}.raw_ledger AS l FINAL
        LEFT JOIN ({accounting}) AS a
          USING (kafka_cluster, source_topic, source_partition, source_offset)
        WHERE {where}
        GROUP BY l.source_kind ORDER BY l.source_kind"""
    ).rows
    for kind, published, expected, normalised, dead_lettered, dlq_messages, unaccounted in rows:
        counts = SourceCounts(
            str(kind), int(published), int(expected), int(normalised), int(dead_lettered),
            int(dlq_messages), int(unaccounted),
        )
        report.sources.append(counts)
    if any(s.unaccounted_messages for s in report.sources):
        examples = query(
            f"""
            SELECT l.source_topic, l.source_partition, l.source_offset, a.covered, a.expected
            FROM {database}.raw_ledger AS l FINAL
            LEFT JOIN ({accounting}) AS a
              USING (kafka_cluster, source_topic, source_partition, source_offset)
            WHERE {where} AND a.whole_dlq = 0 AND (a.expected <= 0 OR a.covered < a.expected)
            ORDER BY l.ingest_time LIMIT 10"""
        ).rows
        for s in report.sources:
            if s.unaccounted_messages:
                report.gaps.append(
                    f"{s.source_kind}: {s.unaccounted_messages} of {s.published_messages} raw "
                    "messages have records that are neither stored nor dead-lettered"
                )
        for topic, partition, offset, covered, expected in examples:
            if int(expected) <= 0:
                state = "no outcome at all"
            else:
                state = f"{covered} of {expected} records"
            report.gaps.append(f"  e.g. {topic}[{partition}]@{offset}: {state}")
    lineage_where = f"ingest_time >= {_ts(since)} AND ingest_time < {_ts(until)}"
    report.collectors = _collector_counts(query, database, accounting, where, lineage_where)
    for table in (*EVENT_TABLES, *STATE_TABLES):
        stored = query(
            f"SELECT uniqExact(event_id) FROM {database}.lineage "
            f"WHERE outcome = 'stored:{table}' AND {lineage_where}"
        ).rows[0][0]
        report.stored_events[table] = int(stored)
        if table not in EVENT_TABLES or not stored:
            continue
        missing = query(
            f"""SELECT count() FROM (
                  SELECT DISTINCT event_id FROM {database}.lineage
                  WHERE outcome = 'stored:{table}' AND {lineage_where})
                WHERE event_id NOT IN (SELECT event_id FROM {database}.{table})"""
        ).rows[0][0]
        if missing:
            report.gaps.append(
                f"{table}: {missing} events in the lineage are missing from the table"
            )
    sink_dlq = query(
        f"SELECT count() FROM {database}.dead_letter FINAL "
        f"WHERE stage = 'sink' AND {lineage_where}"
    ).rows[0][0]
    if sink_dlq:
        report.gaps.append(
            f"sink: {sink_dlq} normalised records could not be decoded and were dead-lettered "
            "at the sink (see dead_letter where stage = 'sink')"
        )
    report.internal_errors = {
        str(stage): int(n)
        for stage, n in query(
            f"SELECT stage, count() FROM {database}.dead_letter FINAL "
            f"WHERE reason_code = 'internal_error' AND {lineage_where} GROUP BY stage "
            "ORDER BY stage"
        ).rows
    }
    _find_conflicts(query, database, lineage_where, report)
    committed: dict[tuple[str, int], int] = {}
    if kafka is not None:
        committed = _check_broker(query, database, kafka, sink_group, report)
    _check_published(query, database, list(counter_files), committed, report)
    _name_missing_ranges(report)
    return report


def _find_conflicts(query: Querier, database: str, lineage_where: str, report: ReconcileReport
                    ) -> None:
    """Each stored copy of an event judged against the copy before it (in arrival order):
    a conflict is other content that the source did not declare an update; a foreign
    update is a declared update (OBX-11 C/D, CDC u/d) from another sending system than the
    copy it replaced. One declared correction does not excuse any later copy."""
    rows = query(
        f"""
        SELECT event_id,
               countIf(changed AND declared_update = 0) AS undeclared,
               countIf(changed AND declared_update = 1 AND sender != ''
                       AND previous_sender != '' AND sender != previous_sender) AS foreign
        FROM (
            SELECT event_id, declared_update, sender,
                   content_hash != lagInFrame(content_hash, 1, content_hash) OVER copies
                       AS changed,
                   lagInFrame(sender, 1, sender) OVER copies AS previous_sender
            FROM {database}.lineage
            WHERE startsWith(outcome, 'stored:') AND content_hash != ''
              AND event_id IN (SELECT event_id FROM {database}.lineage
                               WHERE startsWith(outcome, 'stored:') AND {lineage_where})
            WINDOW copies AS (PARTITION BY event_id
                              ORDER BY ingest_time, kafka_cluster, source_topic,
                                       source_partition, source_offset
                              ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
        )
        GROUP BY event_id
        HAVING undeclared > 0 OR foreign > 0
        ORDER BY event_id"""
    ).rows
    conflicting = [str(row[0]) for row in rows if int(row[1])]
    foreign = [str(row[0]) for row in rows if int(row[2])]
    report.conflicts = len(conflicting)
    report.conflict_examples = conflicting[:CONFLICT_EXAMPLES]
    report.foreign_updates = len(foreign)
    report.foreign_update_examples = foreign[:CONFLICT_EXAMPLES]
    if conflicting:
        report.gaps.append(
            f"conflicts: {len(conflicting)} event ids were stored again with different "
            "content that the source did not declare an update (the later copy replaced the "
            f"earlier); e.g. {', '.join(report.conflict_examples)}"
        )
    if foreign:
        report.gaps.append(
            f"foreign updates: {len(foreign)} event ids were replaced by a declared update "
            "(HL7 result status C/D, CDC update/delete) from another sending system than the "
            f"copy it replaced; check with the senders; e.g. "
            f"{', '.join(report.foreign_update_examples)}"
        )


Partition = tuple[str, str, int]  # kafka cluster, topic, partition


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _ledger_islands(
    query: Querier, database: str, bounds: dict[Partition, tuple[int, int]]
) -> dict[Partition, list[tuple[int, int]]]:
    """The runs of consecutive offsets the ledger holds within each partition's bounds."""
    if not bounds:
        return {}
    conditions = " OR ".join(
        f"(kafka_cluster = {_quote(cluster)} AND source_topic = {_quote(topic)} "
        f"AND source_partition = {partition} AND source_offset BETWEEN {low} AND {high})"
        for (cluster, topic, partition), (low, high) in sorted(bounds.items())
    )
    rows = query(
        f"""
        SELECT kafka_cluster, source_topic, source_partition, min(source_offset),
               max(source_offset)
        FROM (
            SELECT kafka_cluster, source_topic, source_partition, source_offset,
                   source_offset - toInt64(row_number() OVER (
                       PARTITION BY kafka_cluster, source_topic, source_partition
                       ORDER BY source_offset)) AS island
            FROM (SELECT DISTINCT kafka_cluster, source_topic, source_partition, source_offset
                  FROM {database}.raw_ledger WHERE {conditions}))
        GROUP BY kafka_cluster, source_topic, source_partition, island
        ORDER BY kafka_cluster, source_topic, source_partition, min(source_offset)"""
    ).rows
    islands: dict[Partition, list[tuple[int, int]]] = {}
    for cluster, topic, partition, low, high in rows:
        islands.setdefault((str(cluster), str(topic), int(partition)), []).append(
            (int(low), int(high))
        )
    return islands


def _outside(first: int, last: int, islands: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The sub-ranges of [first, last] not covered by the (sorted) islands."""
    missing, cursor = [], first
    for low, high in islands:
        if high < cursor:
            continue
        if low > last:
            break
        if low > cursor:
            missing.append((cursor, low - 1))
        cursor = max(cursor, high + 1)
    if cursor <= last:
        missing.append((cursor, last))
    return missing


def _split_pending(
    first: int, last: int, committed: int | None
) -> list[tuple[int, int, bool]]:
    """[first, last] split at the sink group's committed offset: (first, last, pending)."""
    if committed is None or committed > last:
        return [(first, last, False)]
    if committed <= first:
        return [(first, last, True)]
    return [(first, committed - 1, False), (committed, last, True)]


def _check_broker(
    query: Querier,
    database: str,
    kafka: KafkaSettings,
    sink_group: str | None,
    report: ReconcileReport,
) -> dict[tuple[str, int], int]:
    """Hold the raw topics' offsets in the range against the ledger; returns the sink
    group's committed offsets per (topic, partition) (empty without ``sink_group``)."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    from medstream.offsets import ReadUnfinished, committed_offsets

    consumer = Consumer(
        kafka.consumer_config(
            f"medstream-reconcile-{id(report)}", **{"enable.partition.eof": True}
        )
    )
    try:
        metadata = consumer.list_topics(timeout=10)
        cluster = metadata.cluster_id or ""
        partitions: list[TopicPartition] = []
        for kind in RAW_TOPICS.values():
            topic = kafka.topic(kind)
            if topic in metadata.topics:
                partitions.extend(
                    TopicPartition(topic, p) for p in sorted(metadata.topics[topic].partitions)
                )
        spans = (
            _whole_logs(kafka, consumer, partitions) if kafka.tansu
            else _offsets_in_range(consumer, partitions, report.since, report.until)
        )
        committed = (
            committed_offsets(
                kafka, sink_group, [(tp.topic, tp.partition) for tp in partitions], 10
            )
            if sink_group is not None else {}
        )
        islands = _ledger_islands(
            query, database,
            {(cluster, t, p): (first, end - 1) for (t, p), (first, end) in spans.items()
             if end > first},
        )
        reread = Reread(consumer, report.since, report.until)
        for (topic, partition), (first, end) in sorted(spans.items()):
            key = (cluster, topic, partition)
            held = [
                (max(low, first), min(high, end - 1))
                for low, high in islands.get(key, []) if high >= first and low < end
            ]
            counts = BrokerCounts(topic, partition, first, end)
            counts.in_ledger = sum(high - low + 1 for low, high in held)
            report.broker.append(counts)
            candidates = _outside(first, end - 1, held) if end > first else []
            for low, high in candidates:
                for run_low, run_high in reread.records(topic, partition, low, high):
                    group_offset = committed.get((topic, partition))
                    for a, b, pending in _split_pending(run_low, run_high, group_offset):
                        report.missing_ranges.append(
                            MissingRange("broker", cluster, topic, partition, a, b, b - a + 1,
                                         pending)
                        )
                        if pending:
                            counts.pending += b - a + 1
                        else:
                            counts.missing += b - a + 1
        report.broker_cluster = cluster
        report.gaps.extend(f"unverified: {line}" for line in reread.unchecked)
        report.independent.append(
            f"broker: offsets of {len(partitions)} raw partitions in cluster {cluster} checked"
            + (f"; {len(reread.unchecked)} range(s) could not be checked (unverified)"
               if reread.unchecked else "")
        )
        return committed
    except KafkaException as exc:
        report.independent.append(f"broker: not checked, the broker did not answer ({exc})")
        return {}
    except ReadUnfinished as exc:
        report.gaps.append(f"unverified: broker offsets not checked: {exc}")
        return {}
    finally:
        consumer.close()


def _whole_logs(
    kafka: KafkaSettings, consumer: Any, partitions: list[Any]
) -> dict[tuple[str, int], tuple[int, int]]:
    """On tansu, whose lookups by timestamp are not record offsets: per partition its whole
    log [low watermark, true end) (the end read from the log, see
    :func:`medstream.offsets.tansu_log_ends`); records outside the range are left out as
    they are re-read. ReadUnfinished when the end of a log cannot be read."""
    from medstream.offsets import tansu_log_ends

    lows, reported = {}, {}
    for tp in partitions:
        key = (tp.topic, tp.partition)
        lows[key], reported[key] = consumer.get_watermark_offsets(tp, timeout=10)
    ends = tansu_log_ends(kafka, reported, 10)
    return {key: (lows[key], max(ends[key], lows[key])) for key in lows}


def _offsets_in_range(
    consumer: Any, partitions: list[Any], since: datetime, until: datetime
) -> dict[tuple[str, int], tuple[int, int]]:
    """Per partition the offsets [first, end) of records timestamped in [since, until)."""
    from confluent_kafka import TopicPartition

    def at(moment: datetime) -> dict[tuple[str, int], int]:
        ms = int(moment.timestamp() * 1000)
        found = consumer.offsets_for_times(
            [TopicPartition(tp.topic, tp.partition, ms) for tp in partitions], timeout=10
        )
        return {(tp.topic, tp.partition): tp.offset for tp in found}

    starts, ends = at(since), at(until)
    spans: dict[tuple[str, int], tuple[int, int]] = {}
    for tp in partitions:
        key = (tp.topic, tp.partition)
        low, high = consumer.get_watermark_offsets(tp, timeout=10)
        # No record at or after the moment: the range starts (ends) at the high watermark.
        first = starts[key] if starts[key] >= 0 else high
        end = ends[key] if ends[key] >= 0 else high
        spans[key] = (max(first, low), max(min(end, high), low))
    return spans


class Reread:
    """Re-reads offsets missing from the ledger to find which hold records in the window
    (read_committed: transaction markers and aborted records are skipped).

    A range is read up to the record past its end or to the end of the log (the broker's
    end-of-partition event), never to a quiet moment. At most MAX_RECHECKED records are
    read and REREAD_TIMEOUT_S spent in all; ranges left unread then are named in
    ``unchecked`` (they make the reconciliation fail as unverified).
    """

    def __init__(self, consumer: Any, since: datetime, until: datetime) -> None:
        self.consumer = consumer  # with enable.partition.eof
        self.since_ms = int(since.timestamp() * 1000)
        self.until_ms = int(until.timestamp() * 1000)
        self.budget = MAX_RECHECKED
        self.deadline = time.monotonic() + REREAD_TIMEOUT_S
        self.unchecked: list[str] = []

    def _exhausted(self, topic: str, partition: int, low: int, high: int) -> bool:
        """True (and the range named as unchecked) once the budget or the time is used up."""
        if self.budget > 0 and time.monotonic() < self.deadline:
            return False
        why = (
            f"the re-read budget of {MAX_RECHECKED:,} records is used up"
            if self.budget <= 0 else f"the re-read time of {REREAD_TIMEOUT_S:.0f}s is used up"
        )
        self.unchecked.append(f"{topic}[{partition}] offsets {low}..{high} not checked: {why}")
        return True

    def records(self, topic: str, partition: int, low: int, high: int) -> list[tuple[int, int]]:
        """The runs of offsets in [low, high] that hold records timestamped in the window."""
        from confluent_kafka import KafkaError, TopicPartition

        runs: list[tuple[int, int]] = []
        position, at_end = low, False
        self.consumer.assign([TopicPartition(topic, partition, low)])
        try:
            while position <= high and not at_end:
                if self._exhausted(topic, partition, position, high):
                    break
                for message in self.consumer.consume(num_messages=1000, timeout=0.2):
                    error = message.error()
                    if error is not None:
                        at_end = at_end or error.code() == KafkaError._PARTITION_EOF
                        continue
                    offset = message.offset()
                    if offset < position:
                        continue
                    position = offset + 1
                    self.budget -= 1
                    if offset > high:
                        break
                    if not self.since_ms <= message.timestamp()[1] < self.until_ms:
                        continue
                    if runs and runs[-1][1] == offset - 1:
                        runs[-1] = (runs[-1][0], offset)
                    else:
                        runs.append((offset, offset))
        finally:
            self.consumer.unassign()
        return runs


def _check_published(
    query: Querier,
    database: str,
    paths: list[Path],
    committed: dict[tuple[str, int], int],
    report: ReconcileReport,
) -> None:
    """Hold the publishers' own acknowledged ranges in the window against the ledger."""
    if not paths:
        report.independent.append("publishers' counters: none found (no counter file)")
        return
    since_ms = int(report.since.timestamp() * 1000)
    until_ms = int(report.until.timestamp() * 1000)
    ranges: list[AckedRange] = []
    for path in paths:
        try:
            ranges.extend(read_published([path], since_ms, until_ms))
        except sqlite3.Error as exc:
            report.unreadable_counters.append(str(path))
            report.gaps.append(
                f"publishers' counter {path} could not be read ({type(exc).__name__}: {exc}): "
                "what that publisher had acknowledged is not checked"
            )
    bounds: dict[Partition, tuple[int, int]] = {}
    for r in ranges:
        key = (r.kafka_cluster, r.topic, r.partition)
        low, high = bounds.get(key, (r.first_offset, r.last_offset))
        bounds[key] = (min(low, r.first_offset), max(high, r.last_offset))
    islands = _ledger_islands(query, database, bounds)
    by_run: dict[tuple[str, str], PublishedCounts] = {}
    for r in ranges:
        counts = by_run.setdefault((r.publisher, r.run_id), PublishedCounts(r.publisher, r.run_id))
        counts.acknowledged += r.records
        key = (r.kafka_cluster, r.topic, r.partition)
        # Pending only on the broker the sink group reads now.
        group_offset = (
            committed.get((r.topic, r.partition))
            if r.kafka_cluster == report.broker_cluster
            else None
        )
        for low, high in _outside(r.first_offset, r.last_offset, islands.get(key, [])):
            for a, b, pending in _split_pending(low, high, group_offset):
                report.missing_ranges.append(
                    MissingRange(f"publisher {r.publisher} run {r.run_id}", r.kafka_cluster,
                                 r.topic, r.partition, a, b, b - a + 1, pending)
                )
                if pending:
                    counts.pending += b - a + 1
                else:
                    counts.missing += b - a + 1
        counts.in_ledger = counts.acknowledged - counts.missing - counts.pending
    report.published = [by_run[key] for key in sorted(by_run)]
    report.independent.append(
        f"publishers' counters: {len(paths)} file(s), {len(report.published)} run(s) with "
        "acknowledgements in the range"
    )


def _name_missing_ranges(report: ReconcileReport) -> None:
    """One line per source of evidence with its count, then the ranges (bounded): ranges the
    sink went past are gaps, ranges it has not read yet are said apart (not a gap)."""
    totals: dict[tuple[str, bool], int] = {}
    for r in report.missing_ranges:
        totals[(r.evidence, r.pending)] = totals.get((r.evidence, r.pending), 0) + r.records
    for pending, lines in ((False, report.gaps), (True, report.not_read_yet)):
        ranges = [r for r in report.missing_ranges if r.pending == pending]
        for (evidence, is_pending), records in sorted(totals.items()):
            if is_pending == pending:
                lines.append(
                    f"{evidence}: not read yet: {records} records (the sink has not read them)"
                    if pending else f"{evidence}: {records} records never reached the ledger"
                )
        lines.extend(f"  {r.describe()}" for r in ranges[:RANGES_IN_TEXT])
        if len(ranges) > RANGES_IN_TEXT:
            lines.append(
                f"  ... and {len(ranges) - RANGES_IN_TEXT} more ranges (see --json)"
            )


def _collector_counts(
    query: Querier, database: str, accounting: str, where: str, dlq_where: str
) -> list[CollectorCounts]:
    """Per edge collector: raw records published (from the ledger's collector header) and
    accounted for, plus the dead letters the collector wrote itself (stage ``producer``)."""
    counts: dict[tuple[str, str], CollectorCounts] = {}
    for name, kind, published, unaccounted in query(
        f"""
        SELECT l.collector, l.source_kind, count(),
               countIf(a.whole_dlq = 0 AND (a.expected <= 0 OR a.covered < a.expected))
        FROM {database}.raw_ledger AS l FINAL
        LEFT JOIN ({accounting}) AS a
          USING (kafka_cluster, source_topic, source_partition, source_offset)
        WHERE {where} AND l.collector != ''
        GROUP BY l.collector, l.source_kind"""
    ).rows:
        counts[(str(name), str(kind))] = CollectorCounts(
            str(name), str(kind), int(published), int(unaccounted)
        )
    prefix = "collector/"
    for origin, kind, dead in query(
        f"""
        SELECT original_topic, ifNull(source_kind, ''), count()
        FROM {database}.dead_letter FINAL
        WHERE stage = 'producer' AND startsWith(original_topic, '{prefix}') AND {dlq_where}
        GROUP BY original_topic, source_kind"""
    ).rows:
        key = (str(origin)[len(prefix):], str(kind))
        entry = counts.setdefault(key, CollectorCounts(*key))
        entry.dead_lettered_at_collector = int(dead)
    return [counts[key] for key in sorted(counts)]


@dataclass
class LabelCheck:
    """Comparison of what ClickHouse holds with the simulator's ground truth."""

    expected_events: int
    stored_events: int
    missing_events: list[str]
    duplicated_events: int
    expected_dead_letters: int
    found_dead_letters: int
    expected_alerts: int
    found_alerts: int
    unexpected_alerts: int
    run_ids: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is lost, doubled or wrongly alerted."""
        return (
            not self.missing_events
            and self.duplicated_events == 0
            and self.found_dead_letters == self.expected_dead_letters
            and self.found_alerts == self.expected_alerts
            and self.unexpected_alerts == 0
        )


def read_labels(path: Path) -> list[dict[str, Any]]:
    """The simulator's ground-truth lines."""
    with path.open() as handle:
        return [json.loads(line) for line in handle if line.strip()]


def label_run_ids(labels: list[dict[str, Any]]) -> list[str]:
    """The simulator runs the labels describe (none for labels written before run ids)."""
    return sorted({str(label["run_id"]) for label in labels if label.get("run_id")})


def label_event_ids(labels: list[dict[str, Any]]) -> set[str]:
    """Every event id the labels name (records and the events of anomalies)."""
    ids = {str(label["event_id"]) for label in labels if label.get("event_id")}
    for label in labels:
        ids.update(str(e) for e in label.get("event_ids") or ())
    return ids


def _stored_table(label: dict[str, Any]) -> str:
    """The table a label's ``kind`` names, checked against the tables medstream stores
    events in (the name goes into SQL); ValueError naming the label otherwise."""
    kind = label.get("kind")
    if kind not in (*EVENT_TABLES, *STATE_TABLES):
        raise ValueError(
            f"labels file: event {str(label.get('event_id'))[:64]!r} has kind "
            f"{str(kind)[:64]!r}, not a table medstream stores events in "
            f"({', '.join((*EVENT_TABLES, *STATE_TABLES))}): is it a simulator labels file?"
        )
    return str(kind)


def check_labels(
    query: Querier, database: str, labels: list[dict[str, Any]], since: datetime | None = None
) -> LabelCheck:
    """Every expected event stored exactly once, every expected dead letter and alert present.

    Scoped to the run the labels describe: stored events by the labels' event ids (which
    carry the run), dead letters by the run id the raw ledger keeps for their raw record,
    alerts by their triggering events. Labels without a run id (older files) fall back to
    ``since`` (the run's start), which keeps dead letters and alerts of earlier runs in the
    same database out of the counts.
    """
    run_ids = label_run_ids(labels)
    window = f" AND ingest_time >= {_ts(since)}" if since is not None else ""
    firsts = [label for label in labels if not label.get("duplicate_delivery")]
    expected_by_table: dict[str, set[str]] = {}
    for label in firsts:
        if label["expect"] == "stored":
            expected_by_table.setdefault(_stored_table(label), set()).add(label["event_id"])
    missing: list[str] = []
    stored = duplicated = 0
    for table, expected_ids in expected_by_table.items():
        found = {
            row[0]: int(row[1])
            for row in query(
                f"SELECT event_id, count() FROM {database}.{table} FINAL GROUP BY event_id"
            ).rows
        } if table in EVENT_TABLES else {
            row[0]: 1
            for row in query(
                f"SELECT DISTINCT event_id FROM {database}.lineage WHERE outcome = 'stored:{table}'"
            ).rows
        }
        stored += len(expected_ids & found.keys())
        missing.extend(sorted(expected_ids - found.keys()))
        duplicated += sum(n - 1 for e, n in found.items() if n > 1 and e in expected_ids)
    # Each delivery of a malformed message is its own dead letter (its raw position differs).
    expected_dlq = sum(1 for label in labels if label["expect"] == "dead_letter")
    runs = ", ".join(_quote(r) for r in run_ids)
    # Records of the run in the ledger tie dead letters to it; a ledger without them (a sink
    # without the raw ledger, rows from before run ids) leaves only the time window.
    ledger_knows_run = bool(run_ids) and int(
        query(f"SELECT count() FROM {database}.raw_ledger WHERE run_id IN ({runs})").rows[0][0]
    ) > 0
    if ledger_knows_run:
        dlq_sql = f"""
            SELECT uniqExact(event_id) FROM {database}.lineage
            WHERE outcome = 'dead_letter'
              AND (kafka_cluster, source_topic, source_partition, source_offset) IN (
                  SELECT kafka_cluster, source_topic, source_partition, source_offset
                  FROM {database}.raw_ledger WHERE run_id IN ({runs}))
              AND event_id IN (SELECT dlq_id FROM {database}.dead_letter
                               WHERE stage = 'normalise')"""
    else:
        dlq_sql = (
            f"SELECT count() FROM {database}.dead_letter FINAL WHERE stage = 'normalise'{window}"
        )
    found_dlq = int(query(dlq_sql).rows[0][0])
    expected_alert_events = {
        label["event_id"] for label in firsts if label.get("critical_rule")
    }
    # The labels name critical values only; other rule families are scored by `evaluate`.
    # An alert's first finding opened it: its opening snapshot names the triggering event.
    alert_rows = query(
        f"SELECT arrayJoin(triggering_event_ids), count() FROM {database}.alert_history FINAL "
        f"WHERE action = 'opened' AND rule_id LIKE 'critical_value.%'"
        f"{'' if run_ids else window} GROUP BY 1"
    ).rows
    alerted = {row[0]: int(row[1]) for row in alert_rows}
    if run_ids:  # alerts raised by this run's events only
        run_events = label_event_ids(labels)
        alerted = {e: n for e, n in alerted.items() if e in run_events}
    return LabelCheck(
        expected_events=sum(len(v) for v in expected_by_table.values()),
        stored_events=stored,
        missing_events=missing,
        duplicated_events=duplicated,
        expected_dead_letters=expected_dlq,
        found_dead_letters=found_dlq,
        expected_alerts=len(expected_alert_events),
        found_alerts=sum(1 for e in expected_alert_events if alerted.get(e) == 1),
        unexpected_alerts=sum(1 for e in alerted if e not in expected_alert_events)
        + sum(n - 1 for n in alerted.values() if n > 1),
        run_ids=run_ids,
    )
