"""Prometheus metrics shared by every long-running component; labels are bounded sets only.

Label values are stage names, topic names, table names, rule ids and reason codes: never
a patient, device or message identifier.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECORDS_IN = Counter(
    "medstream_records_in", "Records consumed by a stage", ["stage", "topic"]
)
RECORDS_OUT = Counter(
    "medstream_records_out", "Records produced or stored by a stage", ["stage", "topic"]
)
DEAD_LETTERS = Counter(
    "medstream_dead_letters", "Records dead-lettered, by stage and reason", ["stage", "reason_code"]
)
INTERNAL_ERRORS = Counter(
    "medstream_internal_errors",
    "Records a stage could not process because of a bug (each dead-lettered as "
    "internal_error instead of crashing the worker), by stage",
    ["stage"],
)
AUDIT_REFUSED = Counter(
    "medstream_audit_refused",
    "Audit records the sink refused to store (dead-lettered): no authentication code, or a "
    "wrong one (forged, altered, or written with another audit key)",
    ["reason"],
)
HEADERS_REFUSED = Counter(
    "medstream_sink_headers_refused",
    "Raw records whose collector or run header the sink stored as '' because it was not a "
    "name ([A-Za-z0-9_.-]{1,64}): written by something that is not a medstream publisher",
    ["header"],
)
ALERTS = Counter("medstream_alerts", "Alerts raised, by rule", ["rule_id"])
FINDINGS = Counter(
    "medstream_findings", "Rule findings handed to the alert lifecycle, by rule", ["rule_id"]
)
ALERT_TRANSITIONS = Counter(
    "medstream_alert_transitions",
    "Alert lifecycle transitions (opened, updated, acknowledged, escalated, resolved)",
    ["action"],
)
QUALITY_ISSUES = Counter(
    "medstream_quality_issues",
    "Data quality rules broken, by event kind, category and severity",
    ["event_kind", "category", "severity"],
)
UNMAPPED_CODES = Counter(
    "medstream_unmapped_codes", "Local codes the terminology could not map", ["code_system"]
)
CRITICAL_UNREADABLE = Counter(
    "medstream_critical_values_unreadable",
    "Results of an analyte with a critical-value rule that could not be checked against it "
    "(each raises a critical_value.unreadable alert), by the analyte's rule",
    ["rule_id"],
)
PERSON_LINKS = Counter(
    "medstream_person_links", "Master patient index decisions, by action and method",
    ["action", "method"],
)
IDENTITY_REFUSED = Counter(
    "medstream_identity_observations_refused",
    "Identity observations the patient index could not place, by reason",
    ["reason"],
)
RULES_RELOADS = Counter(
    "medstream_rules_reloads",
    "Rules or dictionary files reloaded (loaded) or refused as invalid (refused)",
    ["rules", "outcome"],
)
PROCESSING_SECONDS = Histogram(
    "medstream_processing_seconds",
    "Time a stage spends on one input record",
    ["stage"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5),
)
END_TO_END_SECONDS = Histogram(
    "medstream_end_to_end_seconds",
    "From raw publication (ingest time) to the point a stage finished with the event",
    ["stage"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
SINK_BATCH_ROWS = Histogram(
    "medstream_sink_batch_rows",
    "Rows per ClickHouse insert",
    ["table"],
    buckets=(1, 10, 100, 500, 1000, 5000, 10000, 50000),
)
SINK_INSERT_SECONDS = Histogram(
    "medstream_sink_insert_seconds",
    "Duration of one ClickHouse insert",
    ["table"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 5),
)
SINK_FAILURES = Counter(
    "medstream_sink_insert_failures", "Failed ClickHouse inserts (retried)", ["table"]
)
OFFSET_GAPS = Counter(
    "medstream_offset_gaps",
    "Offset jumps in a partition that did not close when re-read (accepted as real)",
    ["stage", "topic"],
)
CONSUMER_LAG = Gauge(
    "medstream_consumer_lag",
    "Records behind the high watermark of the partitions a component holds: high watermark "
    "- the next offset to process (the committed one while nothing was read since the "
    "assignment); tansu under-counts by up to one produce batch",
    ["stage", "topic"],
)
STALLED_PARTITIONS = Counter(
    "medstream_stalled_partitions",
    "Partitions a stream worker held but did not finish for 20 s (records not fetched, or a "
    "committed offset stuck behind records fetched), then read again from their committed "
    "offset (streams.stall_watch); stage is streams",
    ["stage", "topic"],
)
TABLE_STATE_REPLAYS = Counter(
    "medstream_table_state_replays",
    "Changelog partitions a stream worker replayed from the start because it had read them "
    "further than they now reach (records lost from the changelog)",
    ["topic"],
)

COLLECTOR_READ = Counter(
    "medstream_collector_records_read",
    "Source-native units (row changes, messages, packets, claims) a collector read",
    ["collector"],
)
COLLECTOR_PUBLISHED = Counter(
    "medstream_collector_records_published",
    "Raw records a collector published and the broker acknowledged",
    ["collector"],
)
COLLECTOR_FAILED = Counter(
    "medstream_collector_records_failed",
    "Source units a collector rejected (dead-lettered) or could not deliver, by reason",
    ["collector", "reason_code"],
)
PUBLISHED_COUNTER_FAILURES = Counter(
    "medstream_published_counter_write_failures",
    "Failed writes of a publisher's own acknowledgement counter (medstream.published); the "
    "acknowledgements stay pending and their source positions uncommitted",
    ["publisher"],
)
COLLECTOR_SOURCE_LAG = Gauge(
    "medstream_collector_source_lag_seconds",
    "Age of the newest source change a collector has read (now - source commit/send time)",
    ["collector"],
)

COMPONENT_RESTARTS = Counter(
    "medstream_component_restarts",
    "Components `medstream up` started again after they died (stream workers, the sink, "
    "collectors, the console, the embedded broker), by component name",
    ["component"],
)


READY = Gauge(
    "medstream_ready",
    "1 once the component has joined its consumer group and has its partitions",
    ["component"],
)
TIMERS_QUIET = Gauge(
    "medstream_timers_stopped",
    "1 once a stream worker was asked to stop making timer output (by `up` before its last "
    "drain) and no tick is under way",
)


def partition_lag(high_watermark: int, next_offset: int | None, committed: int | None) -> int:
    """Records of one partition not processed yet: its high watermark minus the next offset
    to process, which is the committed offset while nothing was read since the assignment
    (then a partition processed to its end has lag 0, not its whole length)."""
    start = max(offset for offset in (next_offset, committed, 0) if offset is not None)
    return max(0, high_watermark - start)


@dataclass(frozen=True)
class PartitionPosition:
    """Where a component stands in one partition it holds, for the lag gauge: the high
    watermark (None until the broker told it), the next offset after the last record read
    since the assignment, the committed offset, and how many records it read that are not
    processed yet (a stream worker's in-memory buffers hold thousands)."""

    topic: str
    high_watermark: int | None
    next_offset: int | None = None
    committed: int | None = None
    unprocessed: int = 0


def topic_lags(positions: Iterable[PartitionPosition]) -> dict[str, int]:
    """Lag per topic summed over the partitions held; a topic of which one partition's high
    watermark is not known yet is left out (unknown, never counted as 0 behind)."""
    lags: dict[str, int] = {}
    unknown: set[str] = set()
    for position in positions:
        high = position.high_watermark
        if high is None or high < 0:  # aiokafka: None until fetched; -1 for "no offset"
            unknown.add(position.topic)
            continue
        behind = partition_lag(high, position.next_offset, position.committed)
        behind += position.unprocessed
        lags[position.topic] = lags.get(position.topic, 0) + behind
    return {topic: lag for topic, lag in lags.items() if topic not in unknown}


def report_consumer_lag(stage: str, lag_by_topic: dict[str, int], reported: set[str]) -> None:
    """Set the lag gauge of ``stage`` per topic; topics of which the component holds no
    partition any more (in ``reported`` from the last time) leave the gauge."""
    for topic in reported - lag_by_topic.keys():
        try:
            CONSUMER_LAG.remove(stage, topic)
        except KeyError:
            pass  # never set
    for topic, lag in lag_by_topic.items():
        CONSUMER_LAG.labels(stage, topic).set(lag)
    reported.clear()
    reported.update(lag_by_topic)


@cache
def labelled(metric: Any, *labels: str) -> Any:
    """The child of a metric for these label values, looked up once (hot paths call this
    per record; ``metric.labels(...)`` takes a lock and builds a key every time)."""
    return metric.labels(*labels)


def serve_metrics(port: int, host: str = "127.0.0.1") -> int:
    """Start the /metrics HTTP endpoint on ``host`` (port 0 picks a free one); returns the port.

    Loopback by default (the embedded runtime); a deployment sets MEDSTREAM_METRICS_HOST to
    0.0.0.0 so that Prometheus and probes reach it from outside the container.
    """
    server, _ = start_http_server(port, addr=host)
    return int(server.server_port)
