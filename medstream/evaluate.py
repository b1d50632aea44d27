"""Detection quality: precision, recall and detection delay per alert rule against ground truth.

The simulator's labels file (JSONL, see :func:`medstream.reconcile.read_labels`) says which
alerts a run must raise:

- a record line with ``critical_rule`` set and ``duplicate_delivery`` false: that record's
  ``event_id`` must raise exactly one alert of rule ``critical_rule``;
- an anomaly line (``"expect": "anomaly"``): one alert of ``rule_id`` must open for the
  injected anomaly, whose events are ``event_ids`` and which a detector can see from
  ``detectable_from_ms`` on.

What was raised is ClickHouse's ``alert_history``: an alert counts once, by its earliest
``opened`` row. Matching, one label to at most one alert and back, in two greedy passes so
that the strongest evidence wins: first every label takes the earliest-opened free alert of
its rule whose ``triggering_event_ids`` share an event id with the label; then each anomaly
label left, in order of ``detectable_from_ms``, takes the earliest-opened free alert of its
rule, organisation and subject that opened at or after ``detectable_from_ms`` minus
:data:`SUBJECT_TOLERANCE_MS`. Alerts left over are false positives of their rule.

Labels that name their simulator run (``run_id``) are scored against that run's alerts only:
an alert whose triggering events all belong to other runs (or to collectors) is left out,
so a second run in the same database neither adds false positives nor steals matches.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr, ValidationError

from medstream.clickhouse import QueryResult

Querier = Callable[[str], QueryResult]

#: Rules whose verdict follows from the data alone: every labelled case must be found.
DETERMINISTIC_RULES: Final = (
    "critical_value.*",
    "news2.*",
    "claims.exact_duplicate",
    "claims.near_duplicate",
    "device.silence",
    "feed.silence",
)
RECALL_TARGET: Final = 1.0
PRECISION_TARGET: Final = 0.95
#: An alert may open this much before ``detectable_from_ms`` and still match by subject: the
#: simulator stamps that time from its own clock, the lifecycle from the worker's.
SUBJECT_TOLERANCE_MS: Final = 2_000
#: The default window starts this long before the earliest time the labels imply.
DEFAULT_MARGIN: Final = timedelta(minutes=5)
#: At most this many missed labels and false-positive alert ids are listed per rule.
EXAMPLES_PER_RULE: Final = 10


class LabelsError(ValueError):
    """The labels file is missing, not JSON lines, or has a line of the wrong shape."""


@dataclass(frozen=True, slots=True)
class ExpectedAlert:
    """One alert the ground truth requires (a record's critical value or an injected anomaly).

    ``detectable_from_ms`` is None for record labels: their delay is measured on the alert
    alone (detected_time minus ingest_time).
    """

    rule_id: str
    organisation_id: str | None
    subject: str | None
    event_ids: frozenset[str]
    statistical: bool
    detectable_from_ms: int | None
    line_no: int

    @property
    def kind(self) -> Literal["record", "anomaly"]:
        """Record labels carry no detection time; anomaly labels do."""
        return "record" if self.detectable_from_ms is None else "anomaly"

    def describe(self) -> str:
        """A short pseudonymous description for reports (line, subject or event id)."""
        if self.subject is not None:
            return f"line {self.line_no} subject {self.subject}"
        first = min(self.event_ids) if self.event_ids else "-"
        return f"line {self.line_no} event {first}"


@dataclass(frozen=True, slots=True)
class OpenedAlert:
    """An alert as its opening row in ``alert_history`` shows it (times in epoch ms)."""

    alert_id: str
    rule_id: str
    organisation_id: str
    subject: str
    triggering_event_ids: frozenset[str]
    opened_ms: int
    detected_ms: int
    ingest_ms: int


class _AnomalyLine(BaseModel):
    """The fields of an anomaly label that evaluation relies on; other fields are kept free."""

    model_config = ConfigDict(extra="allow")

    rule_id: StrictStr
    organisation_id: StrictStr | None = None
    subject: StrictStr | None
    event_ids: list[StrictStr]
    statistical: StrictBool
    detectable_from_ms: StrictInt


def parse_labels(lines: Iterable[dict[str, Any]]) -> list[ExpectedAlert]:
    """The expected alerts among the simulator's label lines (line numbers count from 1)."""
    expected: list[ExpectedAlert] = []
    for line_no, label in enumerate(lines, start=1):
        if not isinstance(label, dict):
            raise LabelsError(f"line {line_no}: expected a JSON object")
        if label.get("expect") == "anomaly":
            try:
                anomaly = _AnomalyLine.model_validate(label)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(part) for part in first["loc"])
                raise LabelsError(
                    f"line {line_no}: anomaly label field {where!r}: {first['msg']}"
                ) from None
            if not anomaly.rule_id.strip():
                raise LabelsError(f"line {line_no}: anomaly label field 'rule_id' is empty")
            if not anomaly.event_ids and anomaly.subject is None:
                raise LabelsError(
                    f"line {line_no}: anomaly label needs event_ids or a subject to be matched"
                )
            expected.append(
                ExpectedAlert(
                    anomaly.rule_id, anomaly.organisation_id, anomaly.subject,
                    frozenset(anomaly.event_ids), anomaly.statistical,
                    anomaly.detectable_from_ms, line_no,
                )
            )
            continue
        rule = label.get("critical_rule")
        if rule is None or label.get("duplicate_delivery"):
            continue  # a redelivery expects no second alert; other lines expect none at all
        event_id = label.get("event_id")
        if not isinstance(rule, str) or not isinstance(event_id, str):
            raise LabelsError(
                f"line {line_no}: a record label with critical_rule needs string "
                "'critical_rule' and 'event_id'"
            )
        organisation = label.get("organisation_id")
        expected.append(
            ExpectedAlert(
                rule, organisation if isinstance(organisation, str) else None, None,
                frozenset([event_id]), False, None, line_no,
            )
        )
    return expected


def load_labels(path: Path) -> list[ExpectedAlert]:
    """Read and validate a labels file; :class:`LabelsError` names the file and line."""
    if not path.is_file():
        raise LabelsError(f"labels file {path} does not exist or is not a file")
    lines: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for line_no, text in enumerate(handle, start=1):
            if not text.strip():
                lines.append({})  # keeps line numbers true; an empty object expects nothing
                continue
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError as exc:
                raise LabelsError(f"{path}: line {line_no} is not JSON: {exc.msg}") from None
    if not any(lines):
        raise LabelsError(f"labels file {path} is empty")
    try:
        return parse_labels(lines)
    except LabelsError as exc:
        raise LabelsError(f"{path}: {exc}") from None


def load_run_scope(path: Path) -> frozenset[str] | None:
    """The event ids of the run(s) a labels file describes; None for labels without a run id
    (then every alert in the window is scored)."""
    from medstream.reconcile import label_event_ids, label_run_ids, read_labels

    try:
        lines = read_labels(path)
    except (OSError, json.JSONDecodeError) as exc:
        raise LabelsError(f"{path}: cannot read the labels ({exc})") from None
    if not label_run_ids(lines):
        return None
    return frozenset(label_event_ids(lines))


def in_scope(alert: OpenedAlert, scope: frozenset[str] | None) -> bool:
    """An alert belongs to the labelled run when one of its triggering events does (an
    alert naming no event cannot be tied to a run and is kept)."""
    return scope is None or not alert.triggering_event_ids or bool(
        alert.triggering_event_ids & scope
    )


def fetch_opened_alerts(
    query: Querier, database: str, since: datetime | None, until: datetime | None
) -> list[OpenedAlert]:
    """Every alert by its earliest ``opened`` row, opened in [since, until) (bounds optional)."""
    bounds = []
    if since is not None:
        bounds.append(f"opened_ms >= {_ms(since)}")
    if until is not None:
        bounds.append(f"opened_ms < {_ms(until)}")
    where = f"WHERE {' AND '.join(bounds)}" if bounds else ""
    # A redelivered transition collapses under FINAL; a reprocessed alert that was opened twice
    # (two transition ids) still counts once, by its first opening.
    rows = query(
        f"""
        SELECT * FROM (
            SELECT alert_id, rule_id, organisation_id, subject, triggering_event_ids,
                   toUnixTimestamp64Milli(updated_time) AS opened_ms,
                   toUnixTimestamp64Milli(detected_time) AS detected_ms,
                   toUnixTimestamp64Milli(ingest_time) AS ingest_ms
            FROM {database}.alert_history FINAL
            WHERE action = 'opened'
            ORDER BY alert_id, opened_ms
            LIMIT 1 BY alert_id)
        {where}
        ORDER BY opened_ms, alert_id"""
    ).rows
    return [
        OpenedAlert(
            str(alert_id), str(rule_id), str(organisation), str(subject), frozenset(triggering),
            int(opened), int(detected), int(ingest),
        )
        for alert_id, rule_id, organisation, subject, triggering, opened, detected, ingest in rows
    ]


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def is_deterministic(rule_id: str) -> bool:
    """True for rules held to recall 1.0 and precision >= 0.95 (:data:`DETERMINISTIC_RULES`)."""
    return any(
        rule_id.startswith(pattern[:-1]) if pattern.endswith("*") else rule_id == pattern
        for pattern in DETERMINISTIC_RULES
    )


@dataclass
class RuleScore:
    """Labels, alerts and matches of one rule in the window."""

    rule_id: str
    statistical: bool = False
    labels: int = 0
    alerts: int = 0
    true_positives: int = 0
    delays_s: list[float] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)
    false_positive_alert_ids: list[str] = field(default_factory=list)

    @property
    def deterministic(self) -> bool:
        """Whether the rule is held to the deterministic targets."""
        return is_deterministic(self.rule_id)

    @property
    def precision(self) -> float | None:
        """True positives over alerts; None without alerts."""
        return self.true_positives / self.alerts if self.alerts else None

    @property
    def recall(self) -> float | None:
        """True positives over labels; None without labels."""
        return self.true_positives / self.labels if self.labels else None

    @property
    def meets_target(self) -> bool | None:
        """None when not judged (not deterministic, or neither labels nor alerts)."""
        if not self.deterministic or (self.labels == 0 and self.alerts == 0):
            return None
        recall_ok = self.recall is None or self.recall >= RECALL_TARGET
        precision_ok = self.precision is None or self.precision >= PRECISION_TARGET
        return recall_ok and precision_ok

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (delays in seconds, rounded to milliseconds)."""
        return {
            "rule_id": self.rule_id,
            "statistical": self.statistical,
            "deterministic": self.deterministic,
            "labels": self.labels,
            "alerts": self.alerts,
            "true_positives": self.true_positives,
            "false_positives": self.alerts - self.true_positives,
            "false_negatives": self.labels - self.true_positives,
            "precision": self.precision,
            "recall": self.recall,
            "delay_median_s": _round(percentile(self.delays_s, 50)),
            "delay_p99_s": _round(percentile(self.delays_s, 99)),
            "meets_target": self.meets_target,
            "missed": self.missed[:EXAMPLES_PER_RULE],
            "false_positive_alert_ids": self.false_positive_alert_ids[:EXAMPLES_PER_RULE],
        }


@dataclass
class EvaluationReport:
    """Per-rule scores of one window, and whether the deterministic rules met their targets."""

    since: datetime | None
    until: datetime | None
    rules: list[RuleScore] = field(default_factory=list)
    labels_outside_window: int = 0

    @property
    def failures(self) -> list[str]:
        """One readable line per deterministic rule that missed its target."""
        return [
            f"{r.rule_id}: recall {_fmt(r.recall)} (target {RECALL_TARGET:.2f}), precision "
            f"{_fmt(r.precision)} (target >= {PRECISION_TARGET:.2f})"
            for r in self.rules
            if r.meets_target is False
        ]

    @property
    def ok(self) -> bool:
        """True when no judged deterministic rule missed its target."""
        return not self.failures

    def table(self) -> tuple[list[str], list[list[Any]]]:
        """Columns and rows of the per-rule table (`render_table` in the CLI prints them)."""
        columns = [
            "rule", "stat", "labels", "alerts", "TP", "precision", "recall",
            "delay p50 s", "delay p99 s", "target",
        ]
        rows: list[list[Any]] = []
        for r in self.rules:
            verdict = {None: "-", True: "ok", False: "MISSED"}[r.meets_target]
            rows.append([
                r.rule_id, "yes" if r.statistical else "", r.labels, r.alerts, r.true_positives,
                _fmt(r.precision), _fmt(r.recall), _fmt(percentile(r.delays_s, 50), 1),
                _fmt(percentile(r.delays_s, 99), 1), verdict,
            ])
        return columns, rows

    def summary_lines(self) -> list[str]:
        """The window, the targets and the failures, to print around the table."""
        window = f"{_iso(self.since) or 'beginning'} .. {_iso(self.until) or 'now'}"
        lines = [
            f"evaluate {window}",
            f"targets: deterministic rules ({', '.join(DETERMINISTIC_RULES)}) need recall "
            f"{RECALL_TARGET:.1f} and precision >= {PRECISION_TARGET:.2f}; other rules are "
            "reported, not judged; a rule with no labels and no alerts is not judged",
        ]
        if self.labels_outside_window:
            lines.append(
                f"({self.labels_outside_window} anomaly labels detectable outside the window "
                "were left out)"
            )
        if self.failures:
            lines.append("MISSED TARGETS:")
            lines.extend(f"  - {failure}" for failure in self.failures)
            for r in self.rules:
                if r.meets_target is False and r.missed:
                    lines.append(f"    {r.rule_id} missed: {'; '.join(r.missed[:3])}")
        else:
            lines.append("every judged deterministic rule met its target")
        return lines

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "since": _iso(self.since),
            "until": _iso(self.until),
            "ok": self.ok,
            "targets": {
                "deterministic_rules": list(DETERMINISTIC_RULES),
                "recall": RECALL_TARGET,
                "precision": PRECISION_TARGET,
            },
            "labels_outside_window": self.labels_outside_window,
            "rules": [r.as_dict() for r in self.rules],
            "failures": self.failures,
        }


def default_since(
    expected: list[ExpectedAlert], alerts: list[OpenedAlert], margin: timedelta = DEFAULT_MARGIN
) -> datetime | None:
    """The window's start implied by the labels: their earliest time minus ``margin``.

    Anomaly labels carry ``detectable_from_ms``; record labels carry no time, so the first
    opening of an alert triggered by a labelled record stands in for theirs. None when the
    labels imply no time (nothing labelled was alerted and there is no anomaly label).
    """
    times = [e.detectable_from_ms for e in expected if e.detectable_from_ms is not None]
    record_ids = frozenset().union(*(e.event_ids for e in expected if e.kind == "record"))
    times.extend(a.opened_ms for a in alerts if a.triggering_event_ids & record_ids)
    if not times:
        return None
    return datetime.fromtimestamp(min(times) / 1000, UTC) - margin


def score(
    expected: list[ExpectedAlert],
    alerts: list[OpenedAlert],
    since: datetime | None = None,
    until: datetime | None = None,
    tolerance_ms: int = SUBJECT_TOLERANCE_MS,
) -> EvaluationReport:
    """Match labels to alerts (see the module docstring) and score each rule.

    Alerts are kept when they opened in [since, until); anomaly labels when they became
    detectable in it. Record labels carry no time and are always kept.
    """
    since_ms = _ms(since) if since is not None else None
    until_ms = _ms(until) if until is not None else None
    report = EvaluationReport(since, until)
    in_window = [a for a in alerts if _within(a.opened_ms, since_ms, until_ms)]
    labels = [
        e for e in expected
        if e.detectable_from_ms is None or _within(e.detectable_from_ms, since_ms, until_ms)
    ]
    report.labels_outside_window = len(expected) - len(labels)
    by_rule: dict[str, RuleScore] = {}
    for label in labels:
        rule = by_rule.setdefault(label.rule_id, RuleScore(label.rule_id))
        rule.labels += 1
        rule.statistical = rule.statistical or label.statistical
    for alert in in_window:
        by_rule.setdefault(alert.rule_id, RuleScore(alert.rule_id)).alerts += 1
    matches = _match(labels, in_window, tolerance_ms)
    for label in labels:
        rule = by_rule[label.rule_id]
        matched = matches.get(label.line_no)
        if matched is None:
            rule.missed.append(label.describe())
            continue
        rule.true_positives += 1
        rule.delays_s.append(_delay_s(label, matched))
    matched_ids = {a.alert_id for a in matches.values()}
    for alert in in_window:
        if alert.alert_id not in matched_ids:
            by_rule[alert.rule_id].false_positive_alert_ids.append(alert.alert_id)
    report.rules = [by_rule[rule_id] for rule_id in sorted(by_rule)]
    return report


def evaluate(
    query: Querier,
    database: str,
    expected: list[ExpectedAlert],
    since: datetime | None = None,
    until: datetime | None = None,
    margin: timedelta = DEFAULT_MARGIN,
    scope: frozenset[str] | None = None,
) -> EvaluationReport:
    """Score the alerts in ClickHouse against the labels; ``since`` defaults to
    :func:`default_since`, ``until`` to no bound; ``scope`` (see :func:`load_run_scope`)
    keeps the alerts of the labelled run only."""
    alerts = [a for a in fetch_opened_alerts(query, database, since, until) if in_scope(a, scope)]
    if since is None:
        since = default_since(expected, alerts, margin)
    return score(expected, alerts, since, until)


def _match(
    labels: list[ExpectedAlert], alerts: list[OpenedAlert], tolerance_ms: int
) -> dict[int, OpenedAlert]:
    """Label line number -> its alert; greedy, event ids first, then subject and time.

    Alerts are indexed by event id and by (rule, subject) so that a run with thousands of
    labels and alerts is not a product of both.
    """
    by_event: dict[str, list[OpenedAlert]] = {}
    by_subject: dict[tuple[str, str], list[OpenedAlert]] = {}
    for alert in sorted(alerts, key=lambda a: (a.opened_ms, a.alert_id)):
        for event_id in alert.triggering_event_ids:
            by_event.setdefault(event_id, []).append(alert)
        by_subject.setdefault((alert.rule_id, alert.subject), []).append(alert)
    taken: set[str] = set()
    matches: dict[int, OpenedAlert] = {}
    ordered = sorted(labels, key=lambda e: (e.detectable_from_ms or 0, e.line_no))
    for label in ordered:
        candidates = [
            alert
            for event_id in label.event_ids
            for alert in by_event.get(event_id, [])
            if alert.rule_id == label.rule_id and alert.alert_id not in taken
        ]
        if candidates:
            first = min(candidates, key=lambda a: (a.opened_ms, a.alert_id))
            matches[label.line_no] = first
            taken.add(first.alert_id)
    for label in ordered:
        if label.line_no in matches or label.subject is None:
            continue
        earliest = (label.detectable_from_ms or 0) - tolerance_ms
        for alert in by_subject.get((label.rule_id, label.subject), []):
            if (
                alert.alert_id not in taken
                and alert.opened_ms >= earliest
                and label.organisation_id in (None, alert.organisation_id)
            ):
                matches[label.line_no] = alert
                taken.add(alert.alert_id)
                break
    return matches


def _delay_s(label: ExpectedAlert, alert: OpenedAlert) -> float:
    """Anomalies: opening minus detectable-from; records: the alert's detection minus ingest."""
    if label.detectable_from_ms is not None:
        return (alert.opened_ms - label.detectable_from_ms) / 1000
    return (alert.detected_ms - alert.ingest_ms) / 1000


def _within(ms: int, since_ms: int | None, until_ms: int | None) -> bool:
    return (since_ms is None or ms >= since_ms) and (until_ms is None or ms < until_ms)


def _ms(value: datetime) -> int:
    """Epoch milliseconds; a naive datetime is taken as UTC."""
    aware = value if value.tzinfo else value.replace(tzinfo=UTC)
    return round(aware.timestamp() * 1000)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
