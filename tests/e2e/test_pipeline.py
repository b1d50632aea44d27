"""End-to-end: the whole pipeline as a user runs it, every event counted against ground truth.

Each test runs the real CLI in child processes (real tansu broker, real Faust workers, real
sink owning a real chdb engine) and proves with the simulator's labels that every good
event is stored exactly once, every malformed record is dead-lettered with its reason and
every injected critical value raised exactly one alert.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from medstream.clickhouse import PROOF_MAX_ROWS, QueryResult
from medstream.query_endpoint import query_via_gateway, read_query_token
from medstream.reconcile import check_labels, read_labels, reconcile
from medstream.runtime import free_port, wait_for_port
from tests.waiting import require_kafka, wait_for

pytestmark = pytest.mark.e2e


def medstream(*args: str) -> list[str]:
    return [sys.executable, "-m", "medstream", *args]


def env_for(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDSTREAM_", "KAFKA_", "CLICKHOUSE_"))}
    env.update(MEDSTREAM_DATA_DIR=str(data_dir), MEDSTREAM_STATUS_INTERVAL_S="1", **extra)
    return env


def test_up_runs_everything_and_every_event_is_accounted_for(tmp_path: Path) -> None:
    data_dir, labels = tmp_path / "data", tmp_path / "labels.jsonl"
    up = subprocess.run(
        medstream("up", "--no-console", "--events", "10000", "--rate", "2500", "--exit-when-done", "--labels", str(labels)),
        env=env_for(data_dir),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    assert "no gap: every published record is stored or dead-lettered" in up.stdout
    assert re.search(r"normalise +\d+ msg/s", up.stdout), "no live status line printed"
    assert "stopped cleanly" in up.stdout
    assert not (data_dir / "runtime.json").exists()
    # A fresh data directory is owner-only and got its own random keys (none is published).
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    keys = sorted(p.name for p in (data_dir / "keys").iterdir())
    assert keys == ["audit.key", "dead-letter.key", "pseudonym.key"], keys
    assert {stat.S_IMODE(p.stat().st_mode) for p in (data_dir / "keys").iterdir()} == {0o600}
    assert all(f"created a random key, {data_dir / 'keys' / k}" in up.stdout for k in keys)

    result = subprocess.run(
        medstream("reconcile", "--labels", str(labels), "--json"),
        env=env_for(data_dir),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    truth = report["labels"]
    ground = read_labels(labels)
    firsts = [line for line in ground if not line["duplicate_delivery"]]
    assert truth["expected_events"] == sum(1 for line in firsts if line["expect"] == "stored") >= 9000
    assert truth["stored_events"] == truth["expected_events"]
    assert truth["missing_events"] == [] and truth["duplicated_events"] == 0
    assert truth["expected_dead_letters"] == sum(1 for line in ground if line["expect"] == "dead_letter") > 0
    assert truth["found_dead_letters"] == truth["expected_dead_letters"]
    assert truth["expected_alerts"] == sum(1 for line in firsts if line["critical_rule"]) > 0
    assert truth["found_alerts"] == truth["expected_alerts"] and truth["unexpected_alerts"] == 0
    assert any(line["duplicate_delivery"] for line in ground), "simulator injected no duplicates"
    assert report["ok"] and report["gaps"] == []

    # Every malformed record is in the dead-letter table with its reason.
    dead = subprocess.run(
        medstream("sql", "SELECT reason_code, count() AS n FROM medstream.dead_letter FINAL "
                  "GROUP BY reason_code ORDER BY reason_code", "--format", "json"),
        env=env_for(data_dir), capture_output=True, text=True, timeout=120,
    )
    assert dead.returncode == 0, dead.stderr
    by_reason = {row["reason_code"]: int(row["n"]) for row in json.loads(dead.stdout)}
    expected_reasons: dict[str, int] = {}
    for line in ground:
        if line["expect"] == "dead_letter":
            expected_reasons[line["reason_code"]] = expected_reasons.get(line["reason_code"], 0) + 1
    assert by_reason == expected_reasons

    refused = subprocess.run(
        medstream("sql", "DROP TABLE medstream.lab_result"),
        env=env_for(data_dir), capture_output=True, text=True, timeout=120,
    )
    assert refused.returncode == 1 and "read-only select" in refused.stderr.lower()






def test_sink_killed_mid_run_and_restarted_still_stores_exactly_once(
    tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    data_dir, labels, report = tmp_path / "data", tmp_path / "labels.jsonl", tmp_path / "report.json"
    data_dir.mkdir()
    log = open(tmp_path / "components.log", "w")  # noqa: SIM115
    broker = subprocess.Popen(
        medstream("broker"), env=env_for(data_dir), stdout=subprocess.PIPE, stderr=log, text=True
    )
    processes.append(broker)
    assert broker.stdout is not None
    said = broker.stdout.readline()
    assert said.startswith("embedded "), said  # which broker, and whether its data survives
    bootstrap = re.search(
        r"KAFKA_BOOTSTRAP_SERVERS=(\S+) MEDSTREAM_KAFKA_BROKER_KIND=(\w+)", broker.stdout.readline()
    )
    assert bootstrap, "broker did not print its address"
    env = env_for(
        data_dir, KAFKA_BOOTSTRAP_SERVERS=bootstrap.group(1), MEDSTREAM_KAFKA_BROKER_KIND=bootstrap.group(2)
    )

    def start_sink() -> tuple[subprocess.Popen[str], str]:
        port = free_port()
        sink = subprocess.Popen(
            medstream("sink", "--query-port", str(port)), env=env, stdout=log, stderr=log, text=True
        )
        processes.append(sink)
        wait_for_port(port, 120, sink)  # type: ignore[arg-type]
        return sink, f"http://127.0.0.1:{port}/query"

    sink, gateway = start_sink()
    processes.append(subprocess.Popen(medstream("streams"), env=env, stdout=log, stderr=log, text=True))
    simulator = subprocess.Popen(
        medstream("simulate", "--events", "8000", "--rate", "500", "--seed", "3",
                  "--labels", str(labels), "--report", str(report)),
        env=env, stdout=log, stderr=log, text=True,
    )
    processes.append(simulator)

    def stored(url: str) -> int:
        token = read_query_token(data_dir / "query.token")  # each sink start writes its own
        counted = query_via_gateway(url, "SELECT count() FROM medstream.lab_result", token=token)
        return int(counted.rows[0][0])

    wait_for(lambda: stored(gateway) > 300, 120, "first rows stored")
    assert simulator.poll() is None, "the simulator finished before the crash: not mid-run"
    sink.send_signal(signal.SIGKILL)  # no flush, no commit: a crash
    sink.wait(timeout=30)
    assert sink.returncode == -signal.SIGKILL
    sink, gateway = start_sink()  # same engine directory: the lock died with the process
    assert simulator.wait(timeout=180) == 0
    published = json.loads(report.read_text())["messages"]

    def query(sql: str) -> QueryResult:
        token = read_query_token(data_dir / "query.token")
        return query_via_gateway(gateway, sql, max_rows=PROOF_MAX_ROWS, token=token)

    from datetime import timedelta

    since = datetime.now(tz=UTC) - timedelta(hours=1)

    def settled() -> bool:
        result = reconcile(query, "medstream", since, datetime.now(tz=UTC))
        return result.ok and sum(s.published_messages for s in result.sources) == published

    wait_for(settled, 120, "pipeline to drain after the sink restart")
    ground = read_labels(labels)
    # Alerts take one more hop (findings -> alert lifecycle -> alerts) than the events.
    wait_for(
        lambda: check_labels(query, "medstream", ground).found_alerts
        >= check_labels(query, "medstream", ground).expected_alerts,
        60,
        "alerts to pass the lifecycle",
    )
    truth = check_labels(query, "medstream", ground)
    assert truth.missing_events == []
    assert truth.stored_events == truth.expected_events > 7000
    assert truth.duplicated_events == 0
    assert truth.found_dead_letters == truth.expected_dead_letters
    assert truth.found_alerts == truth.expected_alerts and truth.unexpected_alerts == 0


def test_sql_and_reconcile_work_while_up_runs_and_ctrl_c_stops_cleanly(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    up = subprocess.Popen(
        medstream("up", "--rate", "300"),  # endless, as `make run`
        env=env_for(data_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group, as in a terminal
    )
    try:
        wait_for(lambda: (data_dir / "runtime.json").exists(), 120, "runtime.json")

        def stored() -> int:
            result = subprocess.run(
                medstream("sql", "SELECT count() AS n FROM medstream.observation", "--format", "json"),
                env=env_for(data_dir), capture_output=True, text=True, timeout=60,
            )
            assert result.returncode == 0, result.stderr  # no "Cannot lock file": the gateway answered
            return int(json.loads(result.stdout)[0]["n"])

        wait_for(lambda: stored() > 50, 120, "observations while running")
        table = subprocess.run(
            medstream("sql", "SELECT organisation_id, count() AS n FROM medstream.observation GROUP BY 1 ORDER BY 1"),
            env=env_for(data_dir), capture_output=True, text=True, timeout=60,
        )
        assert table.returncode == 0
        assert table.stdout.splitlines()[0].split("|")[0].strip() == "organisation_id"
        body = [line for line in table.stdout.splitlines()[2:] if re.match(r"^H00[1-4] +\| +\d+ *$", line)]
        rows = re.search(r"\((\d+) rows?\)", table.stdout)
        assert rows and body and len(body) == int(rows.group(1))
        settled = subprocess.run(
            medstream("reconcile", "--json"), env=env_for(data_dir), capture_output=True, text=True, timeout=60
        )
        assert "in flight and not counted" in settled.stderr
        now = datetime.now(tz=UTC).isoformat()
        assert_metric_labels_are_bounded(json.loads((data_dir / "runtime.json").read_text())["metrics"])
        live = subprocess.run(
            medstream("reconcile", "--json", "--until", now),
            env=env_for(data_dir), capture_output=True, text=True, timeout=60,
        )
        assert live.returncode in (0, 1)  # up to `now`, records in flight may show as gaps
        assert {s["source_kind"] for s in json.loads(live.stdout)["sources"]} >= {"device", "hl7_lab"}
    finally:
        # Ctrl-C in a terminal signals the whole foreground process group at once.
        os.killpg(up.pid, signal.SIGINT)
        output, _ = up.communicate(timeout=150)
    assert up.returncode == 0, output[-3000:]
    assert "stopped cleanly" in output and "killing" not in output
    assert not (data_dir / "runtime.json").exists()


@pytest.mark.parametrize("broker", ["kafka", "tansu"])
def test_a_second_run_on_the_same_data_dir_adds_to_the_first(tmp_path: Path, broker: str) -> None:
    # `make run` twice. Apache Kafka keeps its data under the data directory: the second run
    # resumes the same cluster, its offsets continue and nothing is read twice. tansu starts
    # empty (offsets from 0 again, a new cluster id) while ClickHouse keeps the first run's
    # data; nothing may collide or be mistaken for a gap.
    if broker == "kafka":
        require_kafka()
    data_dir = tmp_path / "data"
    env = env_for(data_dir, MEDSTREAM_EMBEDDED_BROKER=broker)

    def sql(statement: str) -> list[dict[str, str]]:
        result = subprocess.run(
            medstream("sql", statement, "--format", "json"),
            env=env, capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def run(seed: str) -> int:
        up = subprocess.run(
            medstream("up", "--no-console", "--events", "1500", "--rate", "1500", "--seed", seed,
                      "--exit-when-done"),
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        survives = "(data kept across restarts)" if broker == "kafka" else "NOTHING survives a restart"
        assert survives in up.stdout
        return int(sql("SELECT count() AS n FROM medstream.lab_result FINAL")[0]["n"])

    ledger = "SELECT kafka_cluster AS c, min(source_offset) AS lo, max(source_offset) AS hi, " \
        "count() AS n FROM medstream.raw_ledger WHERE source_topic = 'raw.hl7_lab' " \
        "AND source_partition = 0 GROUP BY c ORDER BY lo"
    first = run("101")
    [after_first] = sql(ledger)
    second = run("202")
    assert first > 300 and second > first * 1.6
    clusters = sql(ledger)
    if broker == "kafka":
        # One cluster; the second run's raw offsets continue after the first's, and every
        # offset is in the ledger once (nothing read again from the start).
        assert len(clusters) == 1 and clusters[0]["c"] == after_first["c"]
        assert int(clusters[0]["lo"]) == 0
        assert int(clusters[0]["n"]) == int(clusters[0]["hi"]) + 1 > int(after_first["hi"]) + 1
    else:
        # Two clusters (a new id per start), each with offsets from 0.
        assert len(clusters) == 2 and [int(c["lo"]) for c in clusters] == [0, 0]
    whole = subprocess.run(
        medstream("reconcile", "--json"), env=env, capture_output=True, text=True, timeout=120
    )
    assert whole.returncode == 0, whole.stdout
    report = json.loads(whole.stdout)
    assert report["gaps"] == []
    assert report["stored_events"]["lab_result"] == second


def assert_metric_labels_are_bounded(endpoints: dict[str, str]) -> None:
    """Every label value of every medstream metric comes from a fixed set: no identifiers."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from medstream.settings import (
        ACTION_OUTCOMES_TOPIC,
        ALERTS_TOPIC,
        DLQ_TOPIC,
        FACT_TOPICS,
        FEED_ACTIVITY_TOPIC,
        IDENTITY_TOPIC,
        LIFECYCLE_TOPIC,
        NORM_TOPICS,
        RAW_TOPICS,
        SYNDROMIC_TOPIC,
    )
    from streams.model import REASON_CODES
    from streams.quality import CATEGORIES, EVENT_KINDS, QUALITY_SEVERITIES
    from streams.terminology import SYSTEMS

    tables = {*NORM_TOPICS, *FACT_TOPICS, "alert_history", "dead_letter", "lineage", "raw_ledger"}
    topics = {
        *RAW_TOPICS.values(), *NORM_TOPICS.values(), *FACT_TOPICS.values(), ALERTS_TOPIC,
        DLQ_TOPIC, LIFECYCLE_TOPIC, IDENTITY_TOPIC, SYNDROMIC_TOPIC, FEED_ACTIVITY_TOPIC,
        ACTION_OUTCOMES_TOPIC,
    }
    allowed = {
        "stage": {"simulator", "normalise", "sink", "detect", "lifecycle", "mpi",
                  *(f"stored:{t}" for t in tables)},
        "topic": {*topics, *tables},
        "table": tables,
        "reason_code": set(REASON_CODES),
        # medstream_ready's components, and the process names of `up`'s restart counter.
        "component": {"streams", "sink", "simulator", "console", "broker",
                      *(f"streams-{n}" for n in range(8))},
        "action": {"opened", "updated", "acknowledged", "escalated", "resolved",
                   "link", "merge", "unmerge", "review"},
        "event_kind": set(EVENT_KINDS),
        "category": set(CATEGORIES),
        "severity": set(QUALITY_SEVERITIES),
        "code_system": set(SYSTEMS),
        "method": {"national_id", "organisation_mrn", "probabilistic", "manual"},
        "rules": {"terminology", "critical_values", "news2", "claims", "devices", "feeds",
                  "syndromic", "syndromic-forward", "quality", "mpi", "alert_lifecycle"},
        "outcome": {"loaded", "refused"},
    }
    # Rule ids come from the rules files: a family prefix and a name, never data values.
    rule_id = re.compile(r"(critical_value|news2|device|claims|feed|syndromic)\.[a-z0-9_.]+")
    publisher = re.compile(r"simulator|collector-[a-z0-9][a-z0-9_-]{0,62}")
    seen = 0
    for url in endpoints.values():
        with urllib.request.urlopen(url, timeout=5) as response:
            families = text_string_to_metric_families(response.read().decode())
        for family in families:
            if not family.name.startswith("medstream_"):
                continue
            for sample in family.samples:
                for label, value in sample.labels.items():
                    if label == "le":
                        continue
                    if label == "rule_id":
                        assert rule_id.fullmatch(value), (family.name, value)
                    elif label == "publisher":  # the simulator or a collector's config name
                        assert publisher.fullmatch(value), (family.name, value)
                    else:
                        assert value in allowed[label], (family.name, label, value)
                    seen += 1
    assert seen > 20
    assert "up" in endpoints  # `up`'s own endpoint (component restarts) is scraped too

