"""Test helpers: read back what a collector published to the real broker."""

from __future__ import annotations

import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from medstream.settings import DLQ_TOPIC, RAW_TOPICS, KafkaSettings
from schemas.serde import AvroDeserializer, ManifestRegistry


@dataclass
class Published:
    """One record read back from a topic, decoded."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    headers: dict[str, bytes]
    value: dict[str, Any]


def consume(
    kafka: KafkaSettings,
    topics: list[str],
    expected: int,
    timeout_s: float = 20.0,
    settle_s: float = 0.5,
) -> list[Published]:
    """Read contract topics (names without prefix) until ``expected`` records arrived and no
    more came for ``settle_s`` (so extra records are seen too), or the timeout passed."""
    decode = AvroDeserializer(ManifestRegistry())
    consumer = Consumer(kafka.consumer_config(f"test-read-{uuid.uuid4().hex[:8]}"))
    names = [kafka.topic(t) for t in topics]
    # Every partition from its start, without joining a group (a join on the embedded
    # broker takes about half the session timeout); a topic not created yet is subscribed.
    existing = consumer.list_topics(timeout=10).topics
    if all(name in existing and existing[name].error is None for name in names):
        consumer.assign(
            [
                TopicPartition(name, partition, OFFSET_BEGINNING)
                for name in names
                for partition in existing[name].partitions
            ]
        )
    else:
        consumer.subscribe(names)
    records: list[Published] = []
    deadline = time.monotonic() + timeout_s
    quiet_since: float | None = None
    try:
        while time.monotonic() < deadline:
            message = consumer.poll(0.1)
            if message is None:
                # Quiet counts only once partitions are held (a subscribe waits for a join).
                if len(records) >= expected and consumer.assignment():
                    quiet_since = quiet_since or time.monotonic()
                    if time.monotonic() - quiet_since >= settle_s:
                        break
                continue
            if message.error() is not None:
                if message.error().code() == KafkaError._PARTITION_EOF:
                    continue
                raise AssertionError(f"consume error: {message.error()}")
            quiet_since = None
            records.append(
                Published(
                    message.topic(),
                    message.partition(),
                    message.offset(),
                    message.key(),
                    dict(message.headers() or []),
                    decode(message.value()),
                )
            )
    finally:
        consumer.close()
    return records


def raw_topic(source_kind: str) -> str:
    """The contract name of a source kind's raw topic."""
    return RAW_TOPICS[source_kind]


DLQ = DLQ_TOPIC


def collector_env(kafka: KafkaSettings, data_dir: Path) -> dict[str, str]:
    """Environment for a `medstream collect` subprocess on this test's broker and topics."""
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "MEDSTREAM_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
        "MEDSTREAM_DATA_DIR": str(data_dir),
    }


def collect_command(kind: str, config: Path, *extra: str) -> list[str]:
    """The `medstream collect KIND --config FILE ...` command line, as an operator runs it."""
    return [sys.executable, "-m", "medstream", "collect", kind, "--config", str(config), *extra]
