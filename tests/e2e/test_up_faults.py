"""End-to-end: `medstream up` under faults, on embedded Apache Kafka (real processes).

A stream worker or the sink killed with SIGKILL is restarted (the status line and `up`'s
own metrics count it; its lag shows as unknown meanwhile) and every labelled event is still
stored exactly once; a graceful
stop with a backlog it cannot drain in time exits non-zero and names how much is left, and
the next `up` on the same data directory stores it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from medstream.backlog import measure_backlog, pipeline_groups
from medstream.clickhouse import PROOF_MAX_ROWS, QueryResult
from medstream.query_endpoint import query_via_gateway, read_query_token
from medstream.reconcile import check_labels, read_labels
from medstream.settings import KafkaSettings
from tests.e2e.test_pipeline import env_for, medstream
from tests.waiting import require_kafka, wait_for

pytestmark = pytest.mark.e2e


class RunningUp:
    """A `medstream up` child whose output is collected line by line as it comes."""

    def __init__(self, args: list[str], env: dict[str, str], data_dir: Path) -> None:
        self.data_dir = data_dir
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            medstream("up", *args), env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def said(self, pattern: str) -> re.Match[str] | None:
        """The first output line matching ``pattern``."""
        for line in list(self.lines):
            found = re.search(pattern, line)
            if found:
                return found
        return None

    def state(self) -> dict[str, object]:
        return json.loads((self.data_dir / "runtime.json").read_text())  # type: ignore[no-any-return]

    def wait(self, timeout_s: float) -> int:
        code = self.process.wait(timeout=timeout_s)
        self._reader.join(timeout=10)
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


@pytest.fixture
def ups() -> Iterator[list[RunningUp]]:
    """Every `up` a test starts; killed with its process group if still running at the end."""
    started: list[RunningUp] = []
    yield started
    for up in started:
        up.stop()


def restarts_metric(url: str) -> dict[str, float]:
    """medstream_component_restarts_total by component, from `up`'s own /metrics."""
    with urllib.request.urlopen(url, timeout=5) as response:
        families = text_string_to_metric_families(response.read().decode())
    return {
        sample.labels["component"]: sample.value
        for family in families
        if family.name == "medstream_component_restarts"
        for sample in family.samples
        if sample.name == "medstream_component_restarts_total"
    }


def labels_verdict(data_dir: Path, labels: Path) -> dict[str, object]:
    result = subprocess.run(
        medstream("reconcile", "--labels", str(labels), "--json"),
        env=env_for(data_dir), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)["labels"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("component", ["streams-0", "sink", "broker"])
def test_a_killed_worker_sink_or_broker_is_restarted_and_every_event_is_stored_once(
    tmp_path: Path, ups: list[RunningUp], component: str
) -> None:
    require_kafka()
    data_dir, labels = tmp_path / "data", tmp_path / "labels.jsonl"
    up = RunningUp(
        ["--no-console", "--events", "3000", "--rate", "300", "--seed", "16",
         "--labels", str(labels), "--exit-when-done"],
        env_for(data_dir, MEDSTREAM_EMBEDDED_BROKER="kafka"), data_dir,
    )
    ups.append(up)
    wait_for(lambda: up.said(r"published ([1-9]\d{2,})") is not None, 120, "events flowing")
    state = up.state()
    pids = state["pids"]
    assert isinstance(pids, dict) and {"broker", "sink", "streams-0", "simulator"} <= set(pids)
    metrics = state["metrics"]
    assert isinstance(metrics, dict)
    assert restarts_metric(metrics["up"])[component] == 0
    os.kill(pids[component], signal.SIGKILL)

    restarted_line = (
        r"the embedded broker runs again on" if component == "broker"
        else rf"{component} restarted \(restart 1\)"
    )
    wait_for(lambda: up.said(restarted_line), 90, f"{component} restarted")
    wait_for(lambda: up.said(rf"restarts .*{component}=1"), 30, "the restart in the status line")
    assert restarts_metric(metrics["up"])[component] == 1
    restarted = up.state()["pids"]
    assert isinstance(restarted, dict) and restarted[component] != pids[component]
    if component != "broker":
        assert restarted["broker"] == pids["broker"]  # the broker was never stopped
    else:  # on the same address: every client reconnects by itself
        assert up.state()["bootstrap_servers"] == state["bootstrap_servers"]

    assert up.wait(timeout_s=240) == 0, up.output[-3000:]
    assert "no gap: every published record is stored or dead-lettered" in up.output
    assert "stopped cleanly" in up.output
    # The status line: the lag unknown while the component was away (never a figure), no
    # negative rate from its counters starting again, and the simulator's own final count.
    if component != "broker":
        assert up.said(rf"lag \? \([^)]*\b{component} (restarting|starting|not ready)"), (
            up.output[-3000:]
        )
    assert not up.said(r" -\d+ (msg|rec|rows)/s"), up.output[-3000:]
    status = [line for line in up.lines if re.match(r"\[\d\d:\d\d:\d\d\] simulator", line)]
    final = re.search(r"published (\d+)", status[-1])
    report = json.loads((data_dir / "simulator-report.json").read_text())
    assert final is not None and int(final.group(1)) == report["messages"], status[-1]
    truth = labels_verdict(data_dir, labels)
    assert truth["missing_events"] == [] and truth["duplicated_events"] == 0, truth
    assert truth["stored_events"] == truth["expected_events"] > 2500
    assert truth["found_alerts"] == truth["expected_alerts"] and truth["unexpected_alerts"] == 0
    assert truth["found_dead_letters"] == truth["expected_dead_letters"]


def test_a_stop_that_cannot_drain_says_what_is_left_and_the_next_up_stores_it(
    tmp_path: Path, ups: list[RunningUp]
) -> None:
    require_kafka()
    data_dir, labels = tmp_path / "data", tmp_path / "labels.jsonl"
    env = env_for(data_dir, MEDSTREAM_EMBEDDED_BROKER="kafka")
    up = RunningUp(
        ["--no-console", "--events", "3000", "--rate", "500", "--seed", "61",
         "--labels", str(labels), "--drain-timeout", "2"],
        env, data_dir,
    )
    ups.append(up)
    wait_for(lambda: up.said(r"published ([1-9]\d{2,})") is not None, 120, "events flowing")
    worker = up.state()["pids"]["streams-0"]  # type: ignore[index]
    # A worker that falls behind: frozen, the raw records it has not normalised pile up.
    os.kill(worker, signal.SIGSTOP)
    try:
        # The simulator publishes everything (its report is written at the end) meanwhile.
        wait_for((data_dir / "simulator-report.json").exists, 60, "the simulator to finish")
        os.killpg(up.process.pid, signal.SIGTERM)  # a graceful stop
        wait_for(lambda: up.said(r"draining: [\d,]+ records still to store \(raw [\d,]+"), 60,
                 "the drain progress line")
        wait_for(lambda: up.said(r"drain timeout \(2s"), 60, "the drain to give up")
    finally:
        os.kill(worker, signal.SIGCONT)  # it gets the pending SIGTERM now
    code = up.wait(timeout_s=180)
    assert code == 1, up.output[-3000:]
    left = up.said(r"stopped with ([\d,]+) accepted records NOT stored \(raw ([\d,]+)")
    assert left, up.output[-3000:]
    assert int(left.group(2).replace(",", "")) > 0
    assert "Apache Kafka keeps them under" in up.output and "stopped cleanly" not in up.output
    ground = read_labels(labels)
    assert len(ground) > 500

    # The next `up` on the same data directory, without the simulator, stores the rest.
    again = RunningUp(["--no-console", "--no-simulate"], env, data_dir)
    ups.append(again)
    wait_for(lambda: (data_dir / "runtime.json").exists(), 120, "runtime.json")
    url = again.state()["query_url"]
    assert isinstance(url, str)

    def query(sql: str) -> QueryResult:
        token = read_query_token(data_dir / "query.token")
        return query_via_gateway(url, sql, max_rows=PROOF_MAX_ROWS, token=token)

    def stored_once() -> bool:
        truth = check_labels(query, "medstream", ground)
        return truth.ok
    wait_for(stored_once, 120, "the backlog stored by the next run", interval_s=1.0)
    truth = check_labels(query, "medstream", ground)
    assert truth.stored_events == truth.expected_events > 500 and truth.duplicated_events == 0
    kafka = KafkaSettings(bootstrap_servers=str(again.state()["bootstrap_servers"]),
                          broker_kind="kafka")
    groups = pipeline_groups(kafka, "medstream-streams", "medstream-sink")
    # Every group commits what it finished, the stream workers too: a worker restarted on
    # partly processed partitions once stopped committing one of them for good.
    wait_for(lambda: measure_backlog(kafka, groups).total == 0, 30,
             "every group to commit what it finished", interval_s=1.0)
    os.killpg(again.process.pid, signal.SIGTERM)
    assert again.wait(timeout_s=180) == 0, again.output[-3000:]
    assert "stopped cleanly" in again.output
