"""End-to-end on a three-node Apache Kafka cluster (KRaft, loopback): replication factor 3,
min.insync.replicas 2, acks=all. One node is killed with SIGKILL mid-run; every event the
simulator got acknowledged is stored exactly once, reconcile finds no gap, and the pipeline
keeps running to the end."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from medstream.kafka_broker import KafkaCluster
from medstream.reconcile import read_labels
from tests.e2e.test_pipeline import env_for, medstream
from tests.waiting import require_kafka

pytestmark = pytest.mark.e2e


def test_the_pipeline_loses_nothing_when_a_broker_is_killed(tmp_path: Path) -> None:
    require_kafka()
    cluster = KafkaCluster(tmp_path / "cluster", size=3)
    data_dir, labels = tmp_path / "data", tmp_path / "labels.jsonl"
    env = env_for(
        data_dir,
        KAFKA_BOOTSTRAP_SERVERS=cluster.bootstrap_servers,
        MEDSTREAM_KAFKA_REPLICATION_FACTOR="3",
    )
    output: list[str] = []
    metadata = None
    up: subprocess.Popen[str] | None = None
    try:
        cluster.start()
        up = subprocess.Popen(
            medstream("up", "--no-console", "--events", "6000", "--rate", "400",
                      "--exit-when-done", "--labels", str(labels)),
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        assert up.stdout is not None
        # Kill a node once the simulator has been publishing for a few seconds.
        for line in up.stdout:
            output.append(line)
            if line.startswith("running:"):
                break
        time.sleep(5)
        cluster.nodes[1].kill()
        output.extend(up.stdout)
        assert up.wait(timeout=420) == 0, "".join(output[-60:])
        admin = AdminClient({"bootstrap.servers": cluster.nodes[0].bootstrap_servers})
        metadata = admin.list_topics("raw.hl7_lab", timeout=10)
    finally:
        if up is not None and up.poll() is None:
            up.kill()
        cluster.stop()
    text = "".join(output)
    assert "no gap: every published record is stored or dead-lettered" in text, text[-3000:]
    # Every medstream topic had three replicas.
    assert metadata is not None
    assert all(len(p.replicas) == 3 for p in metadata.topics["raw.hl7_lab"].partitions.values())

    env.pop("KAFKA_BOOTSTRAP_SERVERS")  # the cluster is gone; reconcile reads ClickHouse
    result = subprocess.run(
        medstream("reconcile", "--labels", str(labels), "--json"),
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    truth = report["labels"]
    ground = read_labels(labels)
    firsts = [line for line in ground if not line["duplicate_delivery"]]
    expected = sum(1 for line in firsts if line["expect"] == "stored")
    assert truth["expected_events"] == expected >= 5000
    assert truth["stored_events"] == truth["expected_events"]
    assert truth["missing_events"] == [] and truth["duplicated_events"] == 0
    assert truth["found_dead_letters"] == truth["expected_dead_letters"] > 0
    assert truth["found_alerts"] == truth["expected_alerts"] and truth["unexpected_alerts"] == 0
    assert report["ok"] and report["gaps"] == []
