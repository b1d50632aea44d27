"""End-to-end: stream workers killed with SIGKILL and started again, on Apache Kafka and on
tansu. The worker that was not killed keeps running through every rebalance (no Faust
``ConsistencyError`` over a changelog it read further than the broker reports), and every
record's outcome comes out. A restarted worker with nothing new to read reports a consumer
lag of 0 instead of the partitions' high watermarks.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from confluent_kafka import KafkaException

from medstream.keys import ensure_data_dir_secrets
from medstream.metrics import CONSUMER_LAG, serve_metrics
from medstream.reconcile import read_labels
from medstream.runtime import free_port
from medstream.settings import DLQ_TOPIC, NORM_TOPICS, RAW_TOPICS, KafkaSettings
from schemas import serde
from sinks.clickhouse import ClickHouseSink
from tests.kafka_helpers import consume
from tests.sinks.test_clickhouse import REGISTRY, committed_total, lab_result, make_sink, produce
from tests.waiting import require_kafka, wait_for

pytestmark = pytest.mark.e2e
READY_SAMPLE = 'medstream_ready{component="streams"}'


def _broker_factory(request: pytest.FixtureRequest, kind: str) -> Callable[..., KafkaSettings]:
    if kind == "kafka":
        require_kafka()
        factory: Callable[..., KafkaSettings] = request.getfixturevalue("kafka_factory")
        return factory
    return request.getfixturevalue("tansu_kafka_factory")


class Pipeline:
    """Stream workers and the simulator as child processes on one test's topics."""

    def __init__(self, kafka: KafkaSettings, tmp_path: Path, started: list[Any]) -> None:
        self.kafka = kafka
        self.tmp_path = tmp_path
        self.started = started
        data_dir = tmp_path / "data"
        data_dir.mkdir()
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("MEDSTREAM_", "KAFKA_", "CLICKHOUSE_"))}
        self.env.update(
            MEDSTREAM_DATA_DIR=str(data_dir),
            KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap_servers,
            MEDSTREAM_KAFKA_BROKER_KIND=kafka.broker_kind,
            MEDSTREAM_KAFKA_TOPIC_PREFIX=kafka.topic_prefix,
            MEDSTREAM_KAFKA_RAW_PARTITIONS=str(kafka.raw_partitions),
            MEDSTREAM_KAFKA_NORM_PARTITIONS=str(kafka.norm_partitions),
            # Changelog topics are named after the app id, not the topic prefix.
            MEDSTREAM_STREAMS_APP_ID=f"recovery-{uuid.uuid4().hex[:8]}",
            PYTHONUNBUFFERED="1",
        )
        ensure_data_dir_secrets(data_dir)
        self.log_path = tmp_path / "components.log"
        self.log = self.log_path.open("w")

    def start(self, *args: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-m", "medstream", *args], env=self.env, text=True,
            stdout=self.log, stderr=self.log,
        )
        self.started.append(process)
        return process

    def worker(self, metrics_port: int | None = None) -> subprocess.Popen[str]:
        extra = () if metrics_port is None else ("--metrics-port", str(metrics_port))
        return self.start("streams", *extra)

    def kill(self, worker: subprocess.Popen[str]) -> None:
        worker.send_signal(signal.SIGKILL)
        assert worker.wait(timeout=30) == -signal.SIGKILL

    def warnings(self) -> list[str]:
        """The kinds of line of the components' log at WARNING level or above (numbers
        aside), each once with how often it came, without the routine ones of every
        rebalance and burst (heartbeats during a rebalance, a full producer buffer): one
        warning of the stall watch is not drowned by a recovery's repeated ones."""
        self.log.flush()
        routine = ("Heartbeat failed", "producer buffer full")
        kinds: dict[str, list[Any]] = {}
        for line in self.log_path.read_text().splitlines():
            level = re.search(r"\[(WARNING|ERROR|CRITICAL)\]\s*", line)
            if level is None or any(text in line for text in routine):
                continue
            text = f"[{level.group(1)}] {line[level.end():]}"
            kinds.setdefault(re.sub(r"\d+(?:\.\d+)?", "N", text), [text, 0])[1] += 1
        return [f"{count}x {first}" for first, count in kinds.values()]

    def crashes(self) -> list[str]:
        """Lines of the components' log naming a crash of a worker or its table recovery."""
        self.log.flush()
        return [
            line for line in self.log_path.read_text().splitlines()
            if "ConsistencyError" in line or "We experienced a crash" in line
        ]


def scrape(port: int) -> dict[str, float]:
    """Every sample of a component's /metrics ({} while it does not answer yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return {}
    samples = {}
    for line in text.splitlines():
        match = re.match(r"^(\S+) (\S+)$", line)
        if match and not line.startswith("#"):
            samples[match.group(1)] = float(match.group(2))
    return samples


def outcomes(kafka: KafkaSettings, expected: int) -> tuple[set[tuple[str, str]], set[str]]:
    """The (norm topic, event id) of every normalised event and the dlq ids of every
    dead letter of the normalise stage on the test's topics."""
    records = consume(kafka, [*NORM_TOPICS.values(), DLQ_TOPIC], expected, timeout_s=30)
    events = {
        (record.topic.removeprefix(kafka.topic_prefix), record.value["event_id"])
        for record in records if record.topic != kafka.topic(DLQ_TOPIC)
    }
    letters = {
        record.value["dlq_id"] for record in records
        if record.topic == kafka.topic(DLQ_TOPIC) and record.value["stage"] == "normalise"
    }
    return events, letters


@pytest.mark.parametrize("kind", ["kafka", "tansu"])
def test_the_healthy_worker_survives_when_the_other_is_killed_and_restarted(
    kind: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    processes: list[subprocess.Popen[str]],
) -> None:
    kafka = _broker_factory(request, kind)()
    pipeline = Pipeline(kafka, tmp_path, processes)
    labels = tmp_path / "labels.jsonl"
    healthy, victim = pipeline.worker(), pipeline.worker()
    simulator = pipeline.start(
        # 20 s of records: the kill must come mid-run also when the workers are slow to
        # join (a loaded machine), else the test proves nothing and says so.
        "simulate", "--events", "3000", "--rate", "150", "--seed", "16",
        "--labels", str(labels),
    )
    # Killed while records flow: the healthy worker takes over its partitions and reads
    # their changelogs (on tansu past the end offset the broker reports, before the fix).
    wait_for(
        lambda: len(consume(kafka, [NORM_TOPICS["observation"]], 200, 10, 0.2)) >= 200,
        120, "the workers to be under way", 1.0,
    )
    assert simulator.poll() is None, "the simulator finished before the kill: not mid-run"
    pipeline.kill(victim)
    restarted = pipeline.worker()
    assert simulator.wait(timeout=180) == 0
    ground = read_labels(labels)
    expected_events = {
        (NORM_TOPICS[line["kind"]], line["event_id"]) for line in ground
        if line["expect"] == "stored" and not line["duplicate_delivery"]
    }
    expected_letters = sum(1 for line in ground if line["expect"] == "dead_letter")
    found: tuple[set[tuple[str, str]], set[str]] = (set(), set())

    def everything_out() -> bool:
        nonlocal found
        found = outcomes(kafka, len(expected_events) + expected_letters)
        return expected_events <= found[0] and len(found[1]) >= expected_letters

    try:
        wait_for(everything_out, 180, "every record's outcome", 2.0)
    except AssertionError:
        missing = expected_events - found[0]
        by_topic = {topic: sum(1 for t, _ in missing if t == topic) for topic, _ in missing}
        raise AssertionError(
            f"{len(missing)} of {len(expected_events)} events {by_topic} and "
            f"{expected_letters - len(found[1])} of {expected_letters} dead letters never came "
            f"out after 180 s; the workers' warnings:\n" + "\n".join(pipeline.warnings()[:60])
        ) from None
    # Quiet now: the next rebalances find changelogs without new writes since the last
    # recovery read them, where the end offset tansu reports stopped the worker before.
    for _ in range(2):
        pipeline.kill(restarted)
        port = free_port()
        restarted = pipeline.worker(port)
        # Ready once its partitions are assigned and their tables recovered, which is when
        # the healthy worker has gone through the same rebalance.
        wait_for(lambda port=port: scrape(port).get(READY_SAMPLE) == 1.0,
                 120, "the restarted worker to be ready", 0.5)
        assert healthy.poll() is None, f"the healthy worker died: {pipeline.crashes()[-3:]}"
    assert pipeline.crashes() == []
    events, letters = found
    assert len(expected_events) > 1000 and expected_letters > 0
    assert expected_events <= events, f"{len(expected_events - events)} events never came out"
    assert len(letters) == expected_letters


def lag_samples(samples: dict[str, float], stage: str) -> dict[str, float]:
    """The consumer-lag gauge of ``stage`` by topic, from scraped samples."""
    found = {}
    for name, value in samples.items():
        match = re.match(r'^medstream_consumer_lag\{stage="([^"]+)",topic="([^"]+)"\}$', name)
        if match and match.group(1) == stage:
            found[match.group(2)] = value
    return found


def test_a_restarted_worker_with_nothing_new_to_read_reports_no_lag(
    tmp_path: Path, kafka_factory: Callable[..., KafkaSettings],
    processes: list[subprocess.Popen[str]],
) -> None:
    kafka = kafka_factory()
    pipeline = Pipeline(kafka, tmp_path, processes)
    port = free_port()
    worker = pipeline.worker(port)
    assert pipeline.start("simulate", "--events", "400", "--rate", "0", "--seed", "3").wait(
        timeout=120) == 0
    raw_topics = {kafka.topic(name) for name in RAW_TOPICS.values()}
    # Processed: every raw topic's lag reported as 0.
    wait_for(lambda: set(lag_samples(scrape(port), "normalise")) == raw_topics
             and not any(lag_samples(scrape(port), "normalise").values()),
             120, "the worker to process every record", 1.0)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0
    # Restarted with nothing new: the lag comes from the committed offsets (it read the
    # partitions' high watermarks, over 400 here, before).
    port = free_port()
    pipeline.worker(port)
    wait_for(lambda: set(lag_samples(scrape(port), "normalise")) == raw_topics, 120,
             "the restarted worker to report its lag", 0.5)
    reports = []
    for _ in range(3):
        reports.append(lag_samples(scrape(port), "normalise"))
        time.sleep(1.5)  # the next report (every 1 s): the gauge must stay at 0, not a condition
    assert all(report == dict.fromkeys(raw_topics, 0.0) for report in reports), reports


def test_a_restarted_sink_with_nothing_new_to_read_reports_no_lag(
    kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, database: str
) -> None:
    kafka = kafka_factory()
    topic = kafka.topic(NORM_TOPICS["lab_result"])
    encode_lab = serde.AvroSerializer(REGISTRY, serde.LAB_RESULT)
    produce(kafka, [(topic, b"pk%d" % i, encode_lab(lab_result(0, i))) for i in range(60)])
    group = f"sink-lag-{uuid.uuid4().hex[:6]}"
    port = serve_metrics(0)

    def run_sink() -> tuple[ClickHouseSink, threading.Thread]:
        sink = make_sink(kafka, clickhouse, database, group)
        thread = threading.Thread(target=sink.run, daemon=True)
        thread.start()
        return sink, thread

    def stored() -> int:
        try:
            return committed_total(kafka, group, topic, 2)
        except KafkaException:
            return -1  # the group's coordinator is not known yet

    sink, thread = run_sink()
    wait_for(lambda: stored() == 60, 60, "the 60 records stored", 0.5)
    wait_for(lambda: lag_samples(scrape(port), "sink").get(topic) == 0.0, 30, "lag 0")
    sink.stop()
    thread.join(timeout=60)
    # Restarted with nothing new: reported from the committed offsets, 0 (it was 60).
    CONSUMER_LAG.remove("sink", topic)
    sink, thread = run_sink()
    try:
        wait_for(lambda: topic in lag_samples(scrape(port), "sink"), 30, "a lag report", 0.5)
        assert lag_samples(scrape(port), "sink")[topic] == 0.0
    finally:
        sink.stop()
        thread.join(timeout=60)
