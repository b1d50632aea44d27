"""Integration tests of the embedded runtime: broker process, topics, runtime state, failures."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from medstream.runtime import TansuBroker, RuntimeState, contract_topics, ensure_topics
from medstream.settings import KafkaSettings, RuntimeSettings
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


def test_ensure_topics_creates_every_contract_topic_once(kafka_factory: Callable[..., KafkaSettings]) -> None:
    kafka = kafka_factory()  # the factory already created them
    assert ensure_topics(kafka) == []
    wanted = contract_topics(kafka)
    admin = AdminClient(kafka.librdkafka())
    # The broker's metadata cache learns of topics just created a moment after the
    # controller confirmed them.
    wait_for(lambda: set(wanted) <= set(admin.list_topics(timeout=10).topics), 30,
             "the new topics in the broker's metadata")
    metadata = admin.list_topics(timeout=10)
    # 4 raw, 5 norm, alerts, dlq, 4 fact topics (audit included), and 5 internal ones.
    assert len(wanted) == 20
    assert wanted[kafka.topic("audit")] == kafka.norm_partitions
    # Action outcomes: one partition per lifecycle partition.
    assert wanted[kafka.topic("alerts.outcomes")] == wanted[kafka.topic("alerts.lifecycle")]
    for name, partitions in wanted.items():
        assert len(metadata.topics[name].partitions) == partitions
    assert wanted[kafka.topic("raw.hl7_lab")] == 2 and wanted[kafka.topic("dlq")] == 1
    assert wanted[kafka.topic("mpi.identity")] == 1
    assert wanted[kafka.topic("quality.issues")] == wanted[kafka.topic("norm.encounter")]


def test_embedded_broker_starts_and_stops(tmp_path: Path) -> None:
    broker = TansuBroker(log_path=tmp_path / "broker.log").start()
    try:
        assert broker.alive()
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, broker_kind="tansu")
        assert len(ensure_topics(kafka)) == len(contract_topics(kafka)) == 20
    finally:
        broker.stop()
    assert not broker.alive()


def test_runtime_state_is_only_read_while_its_process_lives(tmp_path: Path) -> None:
    runtime = RuntimeSettings(data_dir=tmp_path)
    RuntimeState(os.getpid(), "127.0.0.1:1", "http://127.0.0.1:2/query", {}, "chdb:///x").write(runtime.runtime_file)
    state = RuntimeState.read(runtime)
    assert state is not None and state.query_url == "http://127.0.0.1:2/query"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    RuntimeState(int(dead.stdout), "127.0.0.1:1", None, {}, "chdb:///x").write(runtime.runtime_file)
    assert RuntimeState.read(runtime) is None


def test_up_exits_non_zero_with_a_clear_reason_when_a_component_cannot_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDSTREAM_", "KAFKA_", "CLICKHOUSE_"))}
    env.update(MEDSTREAM_DATA_DIR=str(tmp_path), CLICKHOUSE_URL="ftp://nowhere.invalid/")
    result = subprocess.run(
        [sys.executable, "-m", "medstream", "up", "--events", "10", "--exit-when-done"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 1
    assert "the sink did not start" in result.stdout and "sink.log" in result.stdout
    assert "CLICKHOUSE_URL must start with http://, https:// or chdb://" in (tmp_path / "sink.log").read_text()
    assert not (tmp_path / "runtime.json").exists()


@pytest.mark.parametrize("kind", ["tansu", "kafka"])
def test_children_die_with_a_killed_parent(tmp_path: Path, kind: str) -> None:
    import re
    import signal
    import time

    from tests.waiting import require_kafka

    if kind == "kafka":
        require_kafka()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDSTREAM_", "KAFKA_", "CLICKHOUSE_"))}
    env["MEDSTREAM_DATA_DIR"] = str(tmp_path)
    env["MEDSTREAM_EMBEDDED_BROKER"] = kind
    parent = subprocess.Popen(
        [sys.executable, "-m", "medstream", "broker"], env=env, stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    said = parent.stdout.readline()
    assert said.startswith(f"embedded {'Apache Kafka' if kind == 'kafka' else 'tansu broker'} on ")
    assert ("NOTHING survives a restart" in said) == (kind == "tansu")
    assert re.search(rf"KAFKA_BOOTSTRAP_SERVERS=\S+ MEDSTREAM_KAFKA_BROKER_KIND={kind}", parent.stdout.readline())
    children = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(parent.pid)], capture_output=True, text=True
    ).stdout.split()
    assert len(children) == 1
    tansu = int(children[0])
    parent.send_signal(signal.SIGKILL)  # no cleanup code runs in the parent
    parent.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and os.path.exists(f"/proc/{tansu}") and (
        open(f"/proc/{tansu}/stat").read().split()[2] != "Z"
    ):
        time.sleep(0.1)
    gone = not os.path.exists(f"/proc/{tansu}") or open(f"/proc/{tansu}/stat").read().split()[2] == "Z"
    assert gone, f"the {kind} broker outlived its killed parent"
