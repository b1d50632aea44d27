"""Integration test: the simulator publishes to the real broker; labels only for acked messages."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Consumer

from medstream.settings import RAW_TOPICS, KafkaSettings
from medstream.simulator import RegionSimulator, SimulatorProducer
from schemas import serde

pytestmark = pytest.mark.integration


def test_every_acknowledged_message_is_on_its_raw_topic_and_labelled(
    kafka_factory: Callable[..., KafkaSettings], tmp_path: Path
) -> None:
    kafka = kafka_factory()
    labels = tmp_path / "labels.jsonl"
    report = SimulatorProducer(
        kafka, serde.ManifestRegistry(), RegionSimulator(5), labels_path=labels
    ).run(3000)
    assert report.delivery_failures == 0
    assert report.total_records >= 3000
    assert report.duplicates > 0 and report.malformed > 0

    consumer = Consumer(kafka.consumer_config(f"check-{kafka.topic_prefix}"))
    consumer.subscribe([kafka.topic(t) for t in RAW_TOPICS.values()])
    seen: dict[str, int] = {}
    keys: set[bytes] = set()
    deadline = time.monotonic() + 60
    while sum(seen.values()) < report.total_messages and time.monotonic() < deadline:
        for message in consumer.consume(500, 0.2):
            assert message.error() is None
            topic, key = message.topic(), message.key()
            assert topic is not None and key is not None
            kind = topic.removeprefix(kafka.topic_prefix).removeprefix("raw.")
            seen[kind] = seen.get(kind, 0) + 1
            keys.add(key)
    consumer.close()
    assert seen == {k: v for k, v in report.messages.items() if v}
    # Patient keys are "organisation:MRN", device packets are keyed by device id.
    organisations = {b"H001", b"H002", b"H003", b"H004"}
    assert all(key.split(b":")[0].split(b"-")[0] in organisations for key in keys)

    lines = [json.loads(line) for line in labels.read_text().splitlines()]
    assert len(lines) == report.labels_written
    assert sum(1 for line in lines if line["expect"] == "anomaly") == report.anomalies
    firsts = [line for line in lines if not line["duplicate_delivery"]]
    records = sum(
        1 for line in firsts
        if line["record_index"] is not None or line["expect"] == "dead_letter"
    )
    assert records == report.total_records
