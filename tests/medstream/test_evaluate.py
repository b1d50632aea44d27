"""Integration tests of `medstream evaluate` on the real ClickHouse engine: alerts in
alert_history are matched to simulator labels and scored per rule."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from medstream.clickhouse import PROOF_MAX_ROWS, QueryResult, run_read_only
from medstream.evaluate import (
    LabelsError,
    OpenedAlert,
    evaluate,
    fetch_opened_alerts,
    load_labels,
    parse_labels,
    percentile,
    score,
)
from tests.cli_helpers import cli_on_database

pytestmark = pytest.mark.integration
T0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
T0_MS = int(T0.timestamp() * 1000)
ALERT_COLUMNS = [
    "alert_id", "rule_id", "organisation_id", "subject", "triggering_event_ids", "action",
    "transition_id", "updated_time", "detected_time", "ingest_time", "event_time",
]


def querier(client: Client, database: str) -> Callable[[str], QueryResult]:
    def query(sql: str) -> QueryResult:
        return run_read_only(client, sql, database, max_rows=PROOF_MAX_ROWS)

    return query


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def alert(
    alert_id: str,
    rule_id: str,
    opened_s: float,
    *,
    subject: str = "",
    events: tuple[str, ...] = (),
    organisation: str = "H001",
    action: str = "opened",
    detected_s: float | None = None,
    ingest_s: float | None = None,
) -> list[Any]:
    """One alert_history row; times are seconds after T0."""
    detected = at(opened_s if detected_s is None else detected_s)
    ingest = at(opened_s if ingest_s is None else ingest_s)
    return [
        alert_id, rule_id, organisation, subject, list(events), action,
        f"{alert_id}:{action}:{opened_s}", at(opened_s), detected, ingest, ingest,
    ]


def insert(client: Client, database: str, rows: list[list[Any]]) -> None:
    client.insert(f"{database}.alert_history", rows, column_names=ALERT_COLUMNS)


def record_label(event_id: str, rule: str | None = "critical_value.potassium",
                 duplicate: bool = False) -> dict[str, Any]:
    return {"source_kind": "hl7_lab", "organisation_id": "H001", "event_id": event_id,
            "kind": "lab_result", "expect": "stored", "critical_rule": rule,
            "duplicate_delivery": duplicate}


def anomaly_label(rule: str, subject: str | None, detectable_s: float,
                  events: tuple[str, ...] = (), statistical: bool = False,
                  organisation: str = "H001") -> dict[str, Any]:
    return {"expect": "anomaly", "rule_id": rule, "organisation_id": organisation,
            "subject": subject, "event_ids": list(events), "statistical": statistical,
            "detectable_from_ms": T0_MS + int(detectable_s * 1000), "note": "injected"}


def write_labels(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_record_labels_match_by_event_id_and_count_fp_and_fn(
    clickhouse: Client, database: str
) -> None:
    insert(clickhouse, database, [
        alert("a1", "critical_value.potassium", 12, events=("e1",), detected_s=10, ingest_s=8.5),
        # a second alert raised by the same record: the label wanted exactly one
        alert("a2", "critical_value.potassium", 20, events=("e1",)),
        # a2 opened again by a reprocessed finding (another transition id): counted once
        alert("a2", "critical_value.potassium", 25, events=("e1",)),
        alert("a3", "critical_value.potassium", 30, events=("e9",)),  # no label at all
        alert("a1", "critical_value.potassium", 40, events=("e1",), action="updated"),
    ])
    labels = parse_labels([
        record_label("e1"), record_label("e2"),  # e2 was never alerted
        record_label("e1", duplicate=True),  # a redelivery expects nothing more
        record_label("e3", rule=None),
    ])
    assert [sorted(label.event_ids) for label in labels] == [["e1"], ["e2"]]
    report = evaluate(querier(clickhouse, database), database, labels)
    [potassium] = report.rules
    assert (potassium.labels, potassium.alerts, potassium.true_positives) == (2, 3, 1)
    assert potassium.precision == pytest.approx(1 / 3) and potassium.recall == 0.5
    assert potassium.delays_s == [1.5]  # detected_time - ingest_time of a1
    assert potassium.false_positive_alert_ids == ["a2", "a3"]
    assert potassium.missed == ["line 2 event e2"]
    assert potassium.meets_target is False and not report.ok
    assert report.failures == [
        "critical_value.potassium: recall 0.500 (target 1.00), precision 0.333 (target >= 0.95)"
    ]


def test_anomaly_labels_match_by_subject_once_detectable(clickhouse: Client, database: str) -> None:
    insert(clickhouse, database, [
        alert("early", "device.silence", 90, subject="dev-1"),  # before detectable - tolerance
        alert("within-tolerance", "device.silence", 99, subject="dev-1"),
        alert("other-org", "device.silence", 130, subject="dev-2", organisation="H002"),
        alert("late", "device.silence", 160, subject="dev-2"),
        alert("by-events", "syndromic.ili", 500, subject="H001|ili", events=("x1", "x7")),
    ])
    labels = parse_labels([
        anomaly_label("device.silence", "dev-1", 100),
        anomaly_label("device.silence", "dev-2", 120),
        # event ids decide even though the subject differs
        anomaly_label("syndromic.ili", "H001|other", 440, events=("x7",), statistical=True),
    ])
    report = evaluate(querier(clickhouse, database), database, labels)
    by_rule = {r.rule_id: r for r in report.rules}
    silence, ili = by_rule["device.silence"], by_rule["syndromic.ili"]
    assert (silence.labels, silence.alerts, silence.true_positives) == (2, 4, 2)
    assert sorted(silence.false_positive_alert_ids) == ["early", "other-org"]
    assert silence.delays_s == [-1.0, 40.0]  # opened minus detectable_from
    assert (ili.true_positives, ili.delays_s, ili.statistical) == (1, [60.0], True)
    assert ili.meets_target is None  # statistical rules are reported, not judged
    assert silence.meets_target is False  # precision 0.5
    columns, rows = report.table()
    table = {row[0]: dict(zip(columns, row, strict=True)) for row in rows}
    assert table["syndromic.ili"]["stat"] == "yes" and table["syndromic.ili"]["target"] == "-"
    assert (table["device.silence"]["precision"], table["device.silence"]["recall"]) == (
        "0.500", "1.000"
    )
    assert table["device.silence"]["target"] == "MISSED"


def test_each_alert_matches_at_most_one_label_greedily_by_time() -> None:
    labels = parse_labels([
        anomaly_label("feed.silence", "lis", 100),
        anomaly_label("feed.silence", "lis", 50),
    ])
    alerts = [
        _opened("a-late", "feed.silence", "lis", 300),
        _opened("a-early", "feed.silence", "lis", 60),
    ]
    report = score(labels, alerts)
    [feed] = report.rules
    # the earlier-detectable label (line 2) takes the earlier alert
    assert sorted(feed.delays_s) == [10.0, 200.0]
    assert (feed.true_positives, feed.false_positive_alert_ids, feed.meets_target) == (2, [], True)


def test_delay_percentiles_interpolate_linearly() -> None:
    assert percentile([float(v) for v in range(1, 101)], 50) == pytest.approx(50.5)
    assert percentile([float(v) for v in range(1, 101)], 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0 and percentile([], 50) is None
    delays = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    labels = parse_labels([anomaly_label("news2.urgent", f"p{d}", 0) for d in delays])
    alerts = [_opened(f"a{d}", "news2.urgent", f"p{d}", d) for d in delays]
    [news2] = score(labels, alerts).rules
    body = news2.as_dict()
    assert (body["delay_median_s"], body["delay_p99_s"]) == (5.5, 9.91)


def test_window_keeps_alerts_and_anomaly_labels_inside_it(
    clickhouse: Client, database: str
) -> None:
    insert(clickhouse, database, [
        alert("old-run", "claims.exact_duplicate", -3600, subject="c1"),
        alert("in", "claims.exact_duplicate", 100, subject="c1"),
        alert("after", "claims.exact_duplicate", 7200, subject="c1"),
    ])
    query = querier(clickhouse, database)
    assert [a.alert_id for a in fetch_opened_alerts(query, database, at(0), at(3600))] == ["in"]
    labels = parse_labels([
        anomaly_label("claims.exact_duplicate", "c1", 90),
        anomaly_label("claims.exact_duplicate", "c1", 7000),  # after --until: left out
    ])
    explicit = evaluate(query, database, labels, at(0), at(3600))
    [claims] = explicit.rules
    assert (claims.labels, claims.alerts, claims.true_positives) == (1, 1, 1)
    assert explicit.labels_outside_window == 1 and explicit.ok
    # default since: earliest detectable_from (90 s) minus the 5-minute margin
    default = evaluate(query, database, labels)
    assert default.since == at(90) - timedelta(minutes=5)
    [claims] = default.rules
    assert (claims.labels, claims.alerts, claims.true_positives) == (2, 2, 2)
    assert "old-run" not in claims.false_positive_alert_ids


def test_default_since_uses_alerts_of_labelled_records(clickhouse: Client, database: str) -> None:
    insert(clickhouse, database, [
        alert("other", "critical_value.sodium", -1000, events=("z",)),
        alert("k", "critical_value.potassium", 0, events=("e1",)),
    ])
    report = evaluate(querier(clickhouse, database), database, parse_labels([record_label("e1")]))
    assert report.since == T0 - timedelta(minutes=5)
    assert [r.rule_id for r in report.rules] == ["critical_value.potassium"] and report.ok


def test_labels_file_errors_name_the_line(tmp_path: Path) -> None:
    with pytest.raises(LabelsError, match="does not exist"):
        load_labels(tmp_path / "nope.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"expect": "stored"}\n{not json\n')
    with pytest.raises(LabelsError, match="line 2 is not JSON"):
        load_labels(tmp_path / "bad.jsonl")
    broken = anomaly_label("device.silence", "d", 0)
    del broken["detectable_from_ms"]
    write_labels(tmp_path / "field.jsonl", [record_label("e1"), broken])
    with pytest.raises(LabelsError, match="line 2: anomaly label field 'detectable_from_ms'"):
        load_labels(tmp_path / "field.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(LabelsError, match="is empty"):
        load_labels(tmp_path / "empty.jsonl")


@pytest.fixture
def run_cli(
    clickhouse: Client, database: str, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Any]:
    """Invoke `medstream evaluate` in-process on the test's database."""
    return cli_on_database(clickhouse, database, monkeypatch, "evaluate")


def test_cli_exit_codes_and_table(
    run_cli: Callable[..., Any], clickhouse: Client, database: str, tmp_path: Path
) -> None:
    insert(clickhouse, database, [
        alert("k1", "critical_value.potassium", 5, events=("e1",), detected_s=5, ingest_s=4),
        alert("s1", "syndromic.ili", 50, subject="H001|ili"),
    ])
    good = write_labels(tmp_path / "good.jsonl", [
        record_label("e1"),
        anomaly_label("syndromic.ili", "H001|ili", 20, statistical=True),
        anomaly_label("syndromic.gi", "H001|gi", 30, statistical=True),  # missed, not judged
    ])
    result = run_cli("--labels", str(good))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    potassium = next(line for line in lines if line.startswith("critical_value.potassium"))
    assert [cell.strip() for cell in potassium.split("|")] == [
        "critical_value.potassium", "", "1", "1", "1", "1.000", "1.000", "1.0", "1.0", "ok"
    ]
    gi = next(line for line in lines if line.startswith("syndromic.gi"))
    assert [cell.strip() for cell in gi.split("|")][1:] == [
        "yes", "1", "0", "0", "-", "0.000", "-", "-", "-"
    ]
    assert "need recall 1.0 and precision >= 0.95" in result.stdout
    missed = write_labels(tmp_path / "missed.jsonl", [record_label("e1"), record_label("e2")])
    result = run_cli("--labels", str(missed), "--since", "2026-11-20T07:00:00")
    assert result.exit_code == 1
    assert "critical_value.potassium: recall 0.500" in result.stdout
    assert run_cli("--labels", str(tmp_path / "absent.jsonl")).exit_code == 2
    (tmp_path / "bad.jsonl").write_text("[1, 2\n")
    bad = run_cli("--labels", str(tmp_path / "bad.jsonl"))
    assert bad.exit_code == 2 and "line 1 is not JSON" in bad.stderr
    assert run_cli("--labels", str(good), "--since", "yesterday").exit_code == 2


def test_cli_json_report_shape(
    run_cli: Callable[..., Any], clickhouse: Client, database: str, tmp_path: Path
) -> None:
    insert(clickhouse, database, [
        alert("d1", "device.silence", 70, subject="dev-9"),
        alert("d2", "device.silence", 80, subject="dev-8"),
    ])
    labels = write_labels(tmp_path / "labels.jsonl", [anomaly_label("device.silence", "dev-9", 60)])
    result = run_cli(
        "--labels", str(labels), "--json",
        "--since", "2026-11-20T08:00:00", "--until", "2026-11-20T09:00:00+00:00",
    )
    assert result.exit_code == 1  # precision 0.5 < 0.95
    body = json.loads(result.stdout)
    assert set(body) == {
        "since", "until", "ok", "targets", "labels_outside_window", "rules", "failures"
    }
    assert (body["since"], body["until"], body["ok"]) == (
        "2026-11-20T08:00:00+00:00", "2026-11-20T09:00:00+00:00", False
    )
    assert body["targets"]["recall"] == 1.0 and body["targets"]["precision"] == 0.95
    assert "device.silence" in body["targets"]["deterministic_rules"]
    assert body["rules"] == [{
        "rule_id": "device.silence", "statistical": False, "deterministic": True,
        "labels": 1, "alerts": 2, "true_positives": 1, "false_positives": 1,
        "false_negatives": 0, "precision": 0.5, "recall": 1.0, "delay_median_s": 10.0,
        "delay_p99_s": 10.0, "meets_target": False, "missed": [],
        "false_positive_alert_ids": ["d2"],
    }]
    assert body["failures"] == [
        "device.silence: recall 1.000 (target 1.00), precision 0.500 (target >= 0.95)"
    ]


def _opened(alert_id: str, rule_id: str, subject: str, opened_s: float) -> OpenedAlert:
    ms = T0_MS + int(opened_s * 1000)
    return OpenedAlert(alert_id, rule_id, "H001", subject, frozenset(), ms, ms, ms)


def test_labels_of_one_run_are_scored_against_that_run_s_alerts_only(
    run_cli: Callable[..., Any], clickhouse: Client, database: str, tmp_path: Path
) -> None:
    # Two runs in one database at the same time: each raised its critical alert, run b also
    # a false one and a silence alert triggered by its own last packet.
    insert(clickhouse, database, [
        alert("ka", "critical_value.potassium", 5, events=("a-e1",)),
        alert("kb", "critical_value.potassium", 6, events=("b-e1",)),
        alert("kb-false", "critical_value.potassium", 7, events=("b-e2",)),
        alert("sb", "device.silence", 8, subject="dev-1", events=("b-e3",)),
    ])

    def labels(run: str) -> Path:
        lines = [{**record_label(f"{run}-e1"), "run_id": run},
                 *({**record_label(f"{run}-e{i}", rule=None), "run_id": run} for i in (2, 3))]
        return write_labels(tmp_path / f"{run}.jsonl", lines)

    run_a = json.loads(run_cli("--labels", str(labels("a")), "--json").stdout)
    assert run_a["ok"] and run_a["failures"] == []
    [potassium] = run_a["rules"]
    assert (potassium["labels"], potassium["alerts"], potassium["true_positives"]) == (1, 1, 1)
    run_b = json.loads(run_cli("--labels", str(labels("b")), "--json").stdout)
    by_rule = {rule["rule_id"]: rule for rule in run_b["rules"]}
    assert by_rule["critical_value.potassium"]["false_positive_alert_ids"] == ["kb-false"]
    assert by_rule["device.silence"]["alerts"] == 1
    # Labels without a run id (written before run ids) still see every alert in the window.
    unscoped = write_labels(tmp_path / "old.jsonl", [record_label("a-e1")])
    old = json.loads(run_cli("--labels", str(unscoped), "--json").stdout)
    assert {r["rule_id"]: r["alerts"] for r in old["rules"]} == {
        "critical_value.potassium": 3, "device.silence": 1
    }
