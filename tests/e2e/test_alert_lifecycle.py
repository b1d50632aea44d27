"""End-to-end: an alert opened before `medstream up` is restarted can be acknowledged after
it, on tansu (memory only: the lifecycle is rebuilt from ClickHouse) and on Apache Kafka
(its changelog survives); every CLI action ends with the lifecycle's real outcome, and the
audit log records the request and that outcome."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from medstream.runtime import free_port, wait_for_port
from tests.e2e.test_console import admission, potassium, send
from tests.e2e.test_pipeline import env_for, medstream
from tests.waiting import require_kafka, wait_for

pytestmark = pytest.mark.e2e


class Pipeline:
    """`medstream up` with an MLLP collector, started and stopped like an operator does."""

    def __init__(self, tmp_path: Path, broker: str) -> None:
        self.data_dir = tmp_path / "data"
        self.env = env_for(self.data_dir, MEDSTREAM_EMBEDDED_BROKER=broker)
        self.mllp_port = free_port()
        self.collector = tmp_path / "mllp.yaml"
        self.collector.write_text(
            "kind: mllp\nname: lab-mllp\norganisation_id: H001\nsource_system: LIS-MLLP\n"
            f"host: 127.0.0.1\nport: {self.mllp_port}\nfacilities:\n  LAB-EAST: H001\n"
        )
        self.process: subprocess.Popen[str] | None = None

    def up(self) -> None:
        self.process = subprocess.Popen(
            medstream("up", "--collector", str(self.collector), "--no-console"),
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )
        wait_for(lambda: (self.data_dir / "runtime.json").exists(), 180, "runtime.json")
        wait_for_port(self.mllp_port, 60)

    def down(self) -> str:
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)
        try:
            output, _ = self.process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            output, _ = self.process.communicate()
        self.process = None
        assert "stopped cleanly" in output, output[-3000:]
        return output

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(medstream(*args), env=self.env, capture_output=True, text=True,
                              timeout=120)

    def sql(self, query: str) -> list[dict[str, Any]]:
        result = self.run("sql", query, "--format", "json")
        assert result.returncode == 0, result.stderr
        rows: list[dict[str, Any]] = json.loads(result.stdout or "[]")
        return rows


@pytest.mark.parametrize("broker", ["tansu", "kafka"])
def test_an_alert_opened_before_a_restart_is_acknowledged_after_it(
    tmp_path: Path, broker: str
) -> None:
    if broker == "kafka":
        require_kafka()
    pipeline = Pipeline(tmp_path, broker)
    pipeline.up()
    try:
        assert send(pipeline.mllp_port, admission("LAB-EAST", "SYNTH-E-0001", "ADT-E1")) == "AA"
        assert send(pipeline.mllp_port, potassium("LAB-EAST", "SYNTH-E-0001", "ORU-E1", "K",
                                                  "7.4", "mmol/L")) == "AA"
        current = "SELECT alert_id, status, actor FROM medstream.alert_current FINAL"
        wait_for(lambda: pipeline.sql(current), 60, "the alert in ClickHouse")
        [opened] = pipeline.sql(current)
        alert_id = opened["alert_id"]
        assert opened["status"] == "open"
        pipeline.down()

        pipeline.up()
        started = time.monotonic()
        ack = pipeline.run("alerts", "ack", alert_id, "--by", "mon.east", "--note",
                           "called ward")
        assert ack.returncode == 0, ack.stdout + ack.stderr
        assert ack.stdout.strip() == (
            f"alert {alert_id} is acknowledged (acknowledge applied) (by mon.east)"
        )
        assert time.monotonic() - started < 20  # an answer, not a 30 s wait
        wait_for(lambda: pipeline.sql(current)[0]["status"] == "acknowledged", 60,
                 "the acknowledgement in ClickHouse")
        assert pipeline.sql(current) == [
            {"alert_id": alert_id, "status": "acknowledged", "actor": "mon.east"}
        ]
        # Offering it again by hand is safe (the lifecycle keeps what it knows: unit-tested).
        restored = pipeline.run("alerts", "restore")
        assert restored.returncode == 0, restored.stderr
        assert restored.stdout.startswith("1 unresolved alerts offered to the alert lifecycle")
        again = pipeline.run("alerts", "ack", alert_id, "--by", "mon.west")
        assert again.returncode == 1
        assert again.stderr.strip() == (
            f"error: acknowledge refused: alert {alert_id} is already acknowledged"
        )

        def audited() -> list[tuple[str, str, str]]:
            audit = pipeline.run("audit", "--json", "--action", "alert_acknowledge")
            assert audit.returncode == 0, audit.stderr
            return sorted((a["outcome"], a["actor"], a["detail"]) for a in json.loads(audit.stdout))

        # Audit records reach ClickHouse through the broker and the sink: wait for all three.
        wait_for(lambda: len(audited()) >= 3, 30, "the three audit rows of the actions")
        rows = audited()
        assert rows == [
            ("ok", "mon.east", "called ward"),
            ("refused", "mon.west",
             f"acknowledge refused: alert {alert_id} is already acknowledged"),
            ("requested", "mon.east", "called ward"),
        ]
        if broker == "kafka":
            resolve_while_no_worker_runs(pipeline, alert_id)
    finally:
        if pipeline.process is not None:
            output = pipeline.down()
    assert "alert lifecycle: 1 unresolved alerts offered from ClickHouse" in output


def resolve_while_no_worker_runs(pipeline: Pipeline, alert_id: str) -> None:
    """With only the (durable) broker running, `alerts resolve` says at once that nothing
    confirmed it (exit 3), and the queued action is applied when the workers run again."""
    pipeline.down()
    broker = subprocess.Popen(medstream("broker"), env=pipeline.env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        assert broker.stdout is not None
        broker.stdout.readline()
        address = broker.stdout.readline().split()[0].split("=", 1)[1]
        started = time.monotonic()
        unanswered = subprocess.run(
            medstream("alerts", "resolve", alert_id, "--by", "mon.east", "--wait", "2"),
            env={**pipeline.env, "KAFKA_BOOTSTRAP_SERVERS": address,
                 "MEDSTREAM_KAFKA_BROKER_KIND": "kafka"},
            capture_output=True, text=True, timeout=120,
        )
        assert unanswered.returncode == 3, unanswered.stdout + unanswered.stderr
        assert unanswered.stderr.splitlines()[-1].startswith(
            f"error: resolve of alert {alert_id} not confirmed: no answer from the stream "
            "workers within 2 s; the action is queued"
        )
        assert time.monotonic() - started < 60
    finally:
        broker.send_signal(signal.SIGTERM)
        broker.wait(60)
    pipeline.up()
    current = ("SELECT status, actor FROM medstream.alert_current FINAL "
               f"WHERE alert_id = '{alert_id}'")
    wait_for(lambda: pipeline.sql(current) == [{"status": "resolved", "actor": "mon.east"}], 90,
             "the queued resolve applied once the workers ran")
    audit = pipeline.run("audit", "--json", "--action", "alert_resolve")
    # Sent but not answered in time is "unconfirmed", not "failed": it was applied later.
    assert sorted(a["outcome"] for a in json.loads(audit.stdout)) == ["requested", "unconfirmed"]
