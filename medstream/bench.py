"""`medstream bench`: the raw baseline and the full pipeline, measured in one invocation.

(a) Baseline: the clinical events the pipeline would produce, Avro-encoded straight to
    norm topics while a plain confluent-kafka loop consumes them and inserts them into the
    same ClickHouse tables (a child process: it owns its own embedded engine).
(b) Pipeline at full speed: the simulator publishes raw source messages unthrottled through
    broker -> Faust -> sink -> ClickHouse; sustained rate = stored events / (last stored -
    first published).
(c) Pipeline at half the sustained rate of (b): p50/p99 event-to-queryable (raw publication
    to row stored) and event-to-alert (raw publication to alert stored).
(d) Idle: the pipeline running without traffic for ``idle_s`` seconds; the CPU each process
    (broker, sink, workers) used, as a share of one core.
Every run is reconciled against the simulator's ground truth; any loss or duplicate fails.
All four run on one broker: MEDSTREAM_EMBEDDED_BROKER (or ``--broker``), printed first.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medstream.clickhouse import QueryResult
from medstream.settings import (
    BrokerKind,
    ClickHouseSettings,
    KafkaSettings,
    ProcessingGuarantee,
    RuntimeSettings,
    StreamSettings,
)

Out = Callable[[str], None]
FACT_TABLES = ("lab_result", "observation", "claim_line", "diagnosis", "encounter")


class BenchRefused(RuntimeError):
    """The bench cannot run as asked (exactly_once on tansu); the message names the fix."""


def _pipeline_run(
    events: int,
    rate: float,
    streams: StreamSettings,
    seed: int,
    out: Out,
    workdir: Path,
    broker: BrokerKind,
) -> dict[str, Any]:
    """One `medstream up --exit-when-done` run; returns its figures, measured in ClickHouse."""
    from medstream.reconcile import check_labels, read_labels
    from medstream.supervisor import Supervisor

    data_dir = workdir / f"pipeline-{int(rate)}"
    labels = data_dir / "labels.jsonl"
    figures: dict[str, Any] = {}

    def measure(query: Callable[[str], QueryResult]) -> None:
        database = ClickHouseSettings().database
        union = " UNION ALL ".join(
            f"SELECT ingest_time, stored_time FROM {database}.{t}" for t in FACT_TABLES
        )
        row = query(
            f"""SELECT count(), min(ingest_time), max(stored_time),
                       quantile(0.5)(dateDiff('millisecond', ingest_time, stored_time)),
                       quantile(0.99)(dateDiff('millisecond', ingest_time, stored_time))
                FROM ({union})"""
        ).rows[0]
        alert = query(
            f"""SELECT count(),
                       quantile(0.5)(dateDiff('millisecond', ingest_time, stored_time)),
                       quantile(0.99)(dateDiff('millisecond', ingest_time, stored_time)),
                       quantile(0.99)(dateDiff('millisecond', ingest_time, detected_time))
                FROM {database}.alert_history FINAL
                WHERE action = 'opened' AND rule_id LIKE 'critical_value.%'"""
        ).rows[0]
        first, last = _as_epoch(row[1]), _as_epoch(row[2])
        check = check_labels(query, database, read_labels(labels))
        figures.update(
            stored_rows=int(row[0]),
            seconds=round(last - first, 3),
            events_per_s=round(check.stored_events / max(last - first, 1e-3), 1),
            queryable_p50_ms=float(row[3]),
            queryable_p99_ms=float(row[4]),
            alerts=int(alert[0]),
            alert_p50_ms=float(alert[1]),
            alert_p99_ms=float(alert[2]),
            alert_detected_p99_ms=float(alert[3]),
            expected_events=check.expected_events,
            stored_events=check.stored_events,
            missing_events=len(check.missing_events),
            duplicated_events=check.duplicated_events,
            dead_letters=f"{check.found_dead_letters}/{check.expected_dead_letters}",
            expected_alerts=check.expected_alerts,
            found_alerts=check.found_alerts,
            unexpected_alerts=check.unexpected_alerts,
            ok=check.ok,
        )

    supervisor = Supervisor(
        KafkaSettings(bootstrap_servers=""),
        ClickHouseSettings(url=""),
        RuntimeSettings(data_dir=data_dir, status_interval_s=2.0, embedded_broker=broker),
        streams,
        out=lambda line: out(f"  {line}"),
        on_drained=measure,
    )
    code = supervisor.run(events, rate, seed, labels, exit_when_done=True)
    if code != 0 or not figures:
        figures.setdefault("ok", False)
        figures["exit_code"] = code
    return figures


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _idle_run(
    streams: StreamSettings, idle_s: float, out: Out, workdir: Path, broker: BrokerKind
) -> dict[str, Any]:
    """(d): `up` without a simulator; each process's CPU over ``idle_s`` quiet seconds."""
    from medstream.supervisor import Supervisor

    supervisor = Supervisor(
        KafkaSettings(bootstrap_servers=""),
        ClickHouseSettings(url=""),
        RuntimeSettings(data_dir=workdir / "idle", status_interval_s=5.0, embedded_broker=broker),
        streams,
        out=lambda line: out(f"  {line}"),
        simulate=False,
    )
    share: dict[str, float] = {}

    def sample() -> None:
        # The supervisor runs in the main thread (it installs signal handlers); this one
        # measures and then asks it to stop.
        try:
            deadline = time.monotonic() + 180
            while not supervisor.runtime.runtime_file.exists():  # written once all are ready
                if time.monotonic() > deadline:
                    return
                time.sleep(0.2)
            time.sleep(5)  # let start-up work (group joins, table recovery) finish
            pids = {c.name: c.process.pid for c in supervisor.children if c.process}
            if supervisor.broker is not None and supervisor.broker.process is not None:
                pids["broker"] = supervisor.broker.process.pid
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            time.sleep(idle_s)
            after = {name: cpu_seconds(pid) for name, pid in pids.items()}
            share.update(
                {name: round((after[name] - before[name]) / idle_s * 100, 1) for name in pids}
            )
        finally:
            supervisor.request_stop()

    sampler = threading.Thread(target=sample, name="idle-cpu", daemon=True)
    sampler.start()
    code = supervisor.run(0, 0, 1, None, exit_when_done=False)
    sampler.join(30)
    if not share:
        return {"ok": False, "exit_code": code}
    return {"seconds": idle_s, "cpu_percent_of_a_core": share, "ok": True}


def _as_epoch(value: Any) -> float:
    if isinstance(value, str):
        from datetime import UTC, datetime

        parsed = datetime.fromisoformat(value)
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    return float(value.timestamp())


def run_bench(
    events: int,
    workers: int,
    out: Out = print,
    seed: int = 11,
    keep_data: bool = False,
    broker: str = "",
    idle_s: float = 30.0,
    guarantee: ProcessingGuarantee | None = None,
) -> dict[str, Any]:
    """Run (a) to (d); print and return the figures and the verdict.

    ``broker`` is auto, kafka or tansu (empty: MEDSTREAM_EMBEDDED_BROKER). The brokers,
    engines and logs live in a temporary directory, removed at the end unless
    ``keep_data`` (then its path is printed for inspection).
    """
    from medstream.runtime import choose_embedded_broker

    kind = choose_embedded_broker(broker or RuntimeSettings().embedded_broker, out)
    streams = StreamSettings(workers=workers)
    if guarantee:
        streams = StreamSettings(workers=workers, processing_guarantee=guarantee)
    try:
        streams.check_broker(KafkaSettings(broker_kind=kind))
    except ValueError as exc:
        raise BenchRefused(str(exc)) from exc
    workdir = Path(tempfile.mkdtemp(prefix="medstream-bench-"))
    try:
        return _run_bench(events, streams, out, seed, workdir, kind, idle_s)
    finally:
        if keep_data:
            out(f"data kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def broker_name(kind: str) -> str:
    """The broker a bench ran on, for people."""
    if kind == "kafka":
        from medstream.kafka_broker import kafka_version

        return f"Apache Kafka {kafka_version()} (KRaft, one node, embedded)"
    return "tansu (memory storage, embedded)"


def _run_bench(
    events: int,
    streams: StreamSettings,
    out: Out,
    seed: int,
    workdir: Path,
    broker: BrokerKind,
    idle_s: float,
) -> dict[str, Any]:
    workers, guarantee = streams.workers, streams.processing_guarantee
    out(f"bench: {events} clinical records per run, {workers} Faust workers, work dir {workdir}")
    out(f"broker: {broker_name(broker)}; processing guarantee: {guarantee}")
    out("(a) baseline: pre-normalised events -> plain confluent-kafka loop -> ClickHouse")
    child = subprocess.run(
        [sys.executable, "-m", "medstream.bench_baseline", str(events), str(seed), str(workdir),
         broker],
        capture_output=True,
        text=True,
    )
    if child.returncode != 0:
        raise RuntimeError(f"the baseline run failed:\n{child.stderr[-3000:]}")
    baseline = json.loads(child.stdout.strip().splitlines()[-1])
    out(
        f"    {baseline['events_per_s']:.0f} events/s"
        f" ({baseline['events']} events in {baseline['seconds']} s)"
    )
    out("(b) pipeline, simulator unthrottled")
    full = _pipeline_run(events, 0, streams, seed, out, workdir, broker)
    out(f"    {full.get('events_per_s', 0):.0f} events/s; ok={full.get('ok')}")
    half_rate = max(50.0, full.get("events_per_s", 100.0) / 2)
    out(f"(c) pipeline at half the sustained rate ({half_rate:.0f} records/s) for latency")
    half_events = int(min(events, half_rate * 30))
    half = _pipeline_run(half_events, half_rate, streams, seed + 1, out, workdir, broker)
    idle: dict[str, Any] = {"ok": True}
    if idle_s > 0:
        out(f"(d) idle: the pipeline without traffic for {idle_s:.0f} s")
        idle = _idle_run(streams, idle_s, out, workdir, broker)
    baseline_rate = baseline["events_per_s"]
    ratio = full.get("events_per_s", 0) / baseline_rate if baseline_rate else 0
    alert_p99 = half.get("alert_p99_ms")
    passed = {
        "throughput_ratio": ratio >= 0.5,
        "event_to_alert_p99_ms": alert_p99 is not None and alert_p99 <= 1000,
    }
    result = {
        "broker": broker,
        "processing_guarantee": guarantee,
        "events": events,
        "workers": workers,
        "baseline": baseline,
        "pipeline_full_rate": full,
        "pipeline_half_rate": half,
        "throughput_ratio": round(ratio, 3),
        "event_to_queryable_p50_ms": half.get("queryable_p50_ms"),
        "event_to_queryable_p99_ms": half.get("queryable_p99_ms"),
        "event_to_alert_p50_ms": half.get("alert_p50_ms"),
        "event_to_alert_p99_ms": half.get("alert_p99_ms"),
        "idle": idle,
        "targets": {"throughput_ratio": ">= 0.5", "event_to_alert_p99_ms": "<= 1000"},
        "verdicts": {name: "PASS" if ok else "MISS" for name, ok in passed.items()},
        "ok": bool(full.get("ok")) and bool(half.get("ok")) and bool(idle.get("ok")),
    }
    verdicts = result["verdicts"]
    out("")
    out(f"baseline           {baseline['events_per_s']:>10.0f} events/s")
    out(f"pipeline           {full.get('events_per_s', 0):>10.0f} events/s")
    out(f"ratio              {ratio:>10.3f}   (target >= 0.5: {verdicts['throughput_ratio']})")
    out(
        f"event->queryable   p50 {half.get('queryable_p50_ms')} ms,"
        f" p99 {half.get('queryable_p99_ms')} ms   at {half_rate:.0f}/s"
    )
    out(
        f"event->alert       p50 {half.get('alert_p50_ms')} ms, p99 {alert_p99} ms"
        f"   (target p99 <= 1000 ms: {verdicts['event_to_alert_p99_ms']})"
    )
    if "cpu_percent_of_a_core" in idle:
        shares = ", ".join(f"{k} {v}%" for k, v in sorted(idle["cpu_percent_of_a_core"].items()))
        out(f"idle CPU ({idle_s:.0f} s)    {shares} of a core")
    verdict = (
        "OK: nothing lost or duplicated" if result["ok"] else "FAILED: see the run figures above"
    )
    out(f"reconciliation     {verdict}")
    out(f"broker             {broker_name(broker)}; {guarantee}")
    return result
