"""End-to-end on Apache Kafka: two stream workers, one killed with SIGKILL mid-run and
started again, under each processing guarantee. Read ``read_committed`` (as the sink and
every downstream reader does), norm.* and alerts carry every expected event under both;
under exactly_once each event and alert transition exactly once, while at_least_once
shows the duplicates the same check finds (collapsed by event id in ClickHouse).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition

from medstream.reconcile import read_labels
from medstream.settings import ALERTS_TOPIC, NORM_TOPICS
from schemas.serde import AvroDeserializer, ManifestRegistry
from tests.e2e.test_pipeline import env_for, medstream
from tests.waiting import require_kafka, wait_for

pytestmark = pytest.mark.e2e


def read_topics(
    bootstrap: str, topics: list[str], isolation: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(topic, decoded value) of every record of ``topics`` visible at ``isolation``."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"exactly-once-check-{isolation}-{time.monotonic_ns()}",
        "enable.auto.commit": False,
        "isolation.level": isolation,
    })
    decode = AvroDeserializer(ManifestRegistry())
    try:
        metadata = consumer.list_topics(timeout=10)
        partitions = [
            TopicPartition(topic, p, 0)
            for topic in topics
            for p in metadata.topics[topic].partitions
        ]
        consumer.assign(partitions)
        ends = {
            (tp.topic, tp.partition): consumer.get_watermark_offsets(tp, timeout=10)[1]
            for tp in partitions
        }
        done: set[tuple[str, int]] = {tp for tp, end in ends.items() if end == 0}
        deadline = time.monotonic() + 120
        while len(done) < len(ends) and time.monotonic() < deadline:
            for message in consumer.consume(500, timeout=1.0):
                if message.error():
                    continue
                yield message.topic(), decode(message.value())
            # Control records (commit and abort markers) take offsets no record has.
            for tp in consumer.position(partitions):
                if tp.offset >= ends[(tp.topic, tp.partition)]:
                    done.add((tp.topic, tp.partition))
        assert len(done) == len(ends), f"could not read to the end of {sorted(set(ends) - done)}"
    finally:
        consumer.close()


def committed_count(bootstrap: str, topic: str) -> int:
    """Offsets written to ``topic`` so far (records and transaction markers); 0 while its
    partitions have no leader yet."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "exactly-once-watch"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions
        )
    except KafkaException:
        return 0
    finally:
        consumer.close()


def output_copies(
    bootstrap: str, isolation: str
) -> tuple[Counter[tuple[Any, ...]], Counter[str], set[str]]:
    """How often each normalised event (by its source position) and each alert transition
    appears on the topics at ``isolation``, and the events that opened an alert."""
    events: Counter[tuple[Any, ...]] = Counter()
    transitions: Counter[str] = Counter()
    alerted: set[str] = set()
    for topic, value in read_topics(bootstrap, [*NORM_TOPICS.values(), ALERTS_TOPIC], isolation):
        if topic == ALERTS_TOPIC:
            transitions[value["transition_id"]] += 1
            if value["action"] == "opened":
                alerted.update(value["triggering_event_ids"])
        else:
            events[(
                topic, value["event_id"], value["source_topic"], value["source_partition"],
                value["source_offset"], value["record_index"],
            )] += 1
    return events, transitions, alerted


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_a_worker_killed_mid_run_loses_nothing_and_duplicates_nothing_under_exactly_once(
    tmp_path: Path, guarantee: str, processes: list[subprocess.Popen[str]]
) -> None:
    require_kafka()
    data_dir, labels = tmp_path / "data", tmp_path / "labels.jsonl"
    data_dir.mkdir()
    log = open(tmp_path / "components.log", "w")  # noqa: SIM115
    started = processes  # stopped by the fixture, also when the test times out

    def start(*args: str, env: dict[str, str], **kwargs: Any) -> subprocess.Popen[str]:
        process = subprocess.Popen(medstream(*args), env=env, text=True, **kwargs)
        started.append(process)
        return process

    try:
        broker = start(
            "broker", env=env_for(data_dir, MEDSTREAM_EMBEDDED_BROKER="kafka"),
            stdout=subprocess.PIPE, stderr=log,
        )
        assert broker.stdout is not None
        assert broker.stdout.readline().startswith("embedded Apache Kafka")
        address = re.search(r"KAFKA_BOOTSTRAP_SERVERS=(\S+)", broker.stdout.readline())
        assert address, "broker did not print its address"
        bootstrap = address.group(1)
        env = env_for(
            data_dir,
            KAFKA_BOOTSTRAP_SERVERS=bootstrap,
            MEDSTREAM_KAFKA_BROKER_KIND="kafka",
            MEDSTREAM_STREAMS_PROCESSING_GUARANTEE=guarantee,
        )
        workers = [start("streams", env=env, stdout=log, stderr=log) for _ in range(2)]
        simulator = start(
            "simulate", "--events", "9000", "--rate", "300", "--seed", "5",
            "--labels", str(labels), env=env, stdout=log, stderr=log,
        )
        # Kill a worker while records flow through it: its open transaction dies with it.
        wait_for(lambda: committed_count(bootstrap, NORM_TOPICS["observation"]) > 1000, 120,
                 "the workers to be under way", 0.5)
        assert simulator.poll() is None, "the simulator finished before the kill: not mid-run"
        workers[0].send_signal(signal.SIGKILL)
        assert workers[0].wait(timeout=30) == -signal.SIGKILL
        workers.append(start("streams", env=env, stdout=log, stderr=log))
        assert simulator.wait(timeout=120) == 0
        ground = read_labels(labels)
        expected = {
            (NORM_TOPICS[label["kind"]], label["event_id"])
            for label in ground
            if label["expect"] == "stored" and not label["duplicate_delivery"]
        }
        expected_alerts = {
            label["event_id"] for label in ground
            if label["critical_rule"] and not label["duplicate_delivery"]
        }
        copies: tuple[Counter[tuple[Any, ...]], Counter[str], set[str]] = (
            Counter(), Counter(), set()
        )

        def everything_out() -> bool:
            nonlocal copies
            copies = output_copies(bootstrap, "read_committed")
            return (expected <= {(key[0], key[1]) for key in copies[0]}
                    and expected_alerts <= copies[2])

        try:
            wait_for(everything_out, 120, "every expected event on norm.* read_committed", 2.0)
        except AssertionError:
            missing = expected - {(key[0], key[1]) for key in copies[0]}
            raise AssertionError(
                f"{len(missing)} of {len(expected)} events never came out (e.g. "
                f"{sorted(missing)[:3]}); {len(expected_alerts - copies[2])} of "
                f"{len(expected_alerts)} critical values never opened an alert"
            ) from None
        assert all(w.poll() is None for w in workers[1:]), "a healthy worker died"
    finally:
        log.close()

    events, transitions, _ = copies
    assert len(expected) > 8000 and len(expected_alerts) > 5
    twice = sum(n - 1 for n in events.values() if n > 1)
    transitions_twice = sum(n - 1 for n in transitions.values() if n > 1)
    print(json.dumps({"guarantee": guarantee, "events": len(events), "events_twice": twice,
                      "transitions": len(transitions), "transitions_twice": transitions_twice}))
    if guarantee == "exactly_once":
        assert twice == 0 and transitions_twice == 0
    else:
        # The records processed since the killed worker's last commit are processed again.
        assert twice > 0
