"""Reconciliation: account for every raw record published in a time range, and name any gap.

Sources of truth, all in ClickHouse and written by the sink from Kafka itself:
- raw_ledger: one row per record seen on a raw.* topic (what was published);
- lineage: one row per outcome of one record of one raw message (a stored event or a
  dead letter), carrying the raw position and the message's record count;
- the fact tables: what analysts query.
A raw message is accounted for when it was dead-lettered whole, or when each of its
records has a stored event or a dead letter. Stored events of the lineage must also be
present in their fact table.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from medstream.clickhouse import QueryResult

Querier = Callable[[str], QueryResult]

# Fact tables whose rows keep their event id. In the state tables a later version of the
# same source row replaces an earlier one, so an older version's event id legitimately
# disappears; their stored events are proven by the lineage.
EVENT_TABLES = ("lab_result", "observation", "claim_line")
# Lineage rows carry the raw record's ingest time, the same value as its ledger row; the
# slack only guards the window's edges.
SLACK = timedelta(seconds=1)
STATE_TABLES = ("encounter", "diagnosis")


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
class ReconcileReport:
    """The result of one reconciliation."""

    since: datetime
    until: datetime
    sources: list[SourceCounts] = field(default_factory=list)
    collectors: list[CollectorCounts] = field(default_factory=list)
    stored_events: dict[str, int] = field(default_factory=dict)
    gaps: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is unaccounted for."""
        return not self.gaps

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "ok": self.ok,
            "sources": [s.__dict__ for s in self.sources],
            "collectors": [c.__dict__ for c in self.collectors],
            "stored_events": self.stored_events,
            "gaps": self.gaps,
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
        if self.gaps:
            lines.append("GAPS:")
            lines.extend(f"  - {gap}" for gap in self.gaps)
        else:
            lines.append("no gap: every published record is stored or dead-lettered")
        return "\n".join(lines)


def reconcile(query: Querier, database: str, since: datetime, until: datetime) -> ReconcileReport:
    """Count per source and stage for raw records ingested in [since, until) and find gaps."""
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
    return report


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


def check_labels(
    query: Querier, database: str, labels: list[dict[str, Any]], since: datetime | None = None
) -> LabelCheck:
    """Every expected event stored exactly once, every expected dead letter and alert present.

    ``since`` (the run's start) keeps dead letters and alerts of earlier runs in the same
    database out of the counts.
    """
    window = f" AND ingest_time >= {_ts(since)}" if since is not None else ""
    firsts = [label for label in labels if not label.get("duplicate_delivery")]
    expected_by_table: dict[str, set[str]] = {}
    for label in firsts:
        if label["expect"] == "stored":
            expected_by_table.setdefault(label["kind"], set()).add(label["event_id"])
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
        duplicated += sum(n - 1 for n in found.values() if n > 1)
    # Each delivery of a malformed message is its own dead letter (its raw position differs).
    expected_dlq = sum(1 for label in labels if label["expect"] == "dead_letter")
    found_dlq = int(
        query(
            f"SELECT count() FROM {database}.dead_letter FINAL WHERE stage = 'normalise'{window}"
        ).rows[0][0]
    )
    expected_alert_events = {
        label["event_id"] for label in firsts if label.get("critical_rule")
    }
    # The labels name critical values only; other rule families are scored by `evaluate`.
    # An alert's first finding opened it: its opening snapshot names the triggering event.
    alert_rows = query(
        f"SELECT arrayJoin(triggering_event_ids), count() FROM {database}.alert_history FINAL "
        f"WHERE action = 'opened' AND rule_id LIKE 'critical_value.%'{window} GROUP BY 1"
    ).rows
    alerted = {row[0]: int(row[1]) for row in alert_rows}
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
    )
