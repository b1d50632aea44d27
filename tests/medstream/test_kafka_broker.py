"""Apache Kafka run by medstream: jars, errors naming the fix, restarts that keep the data,
the embedded-broker choice, and a three-node KRaft cluster surviving kill -9 of a node."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from medstream import kafka_broker
from medstream.kafka_broker import KafkaCluster, KafkaNode, KafkaUnavailable
from medstream.runtime import EmbeddedRuntimeError, choose_embedded_broker
from medstream.settings import KafkaSettings
from tests.waiting import require_kafka

pytestmark = pytest.mark.integration


@pytest.fixture
def kafka_here() -> None:
    """Apache Kafka must be startable here (CI), else the test is skipped."""
    require_kafka()


def produce(bootstrap: str, topic: str, count: int, **conf: object) -> list[tuple[int, int]]:
    """Send ``count`` records (acks=all, idempotent); the (partition, offset) of each ack."""
    producer = Producer(
        {"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True, **conf}
    )
    acked: list[tuple[int, int]] = []
    errors: list[str] = []

    def delivered(error: KafkaError | None, message: object) -> None:
        if error is not None:
            errors.append(str(error))
        else:
            acked.append((message.partition(), message.offset()))  # type: ignore[attr-defined]

    for index in range(count):
        key = b"k%d" % (index % 5)
        producer.produce(topic, key=key, value=b"v%d" % index, on_delivery=delivered)
        producer.poll(0)
    assert producer.flush(60) == 0
    assert errors == []
    return acked


def read_values(bootstrap: str, topic: str, partitions: int, expected: int) -> list[bytes]:
    """Every record of ``topic`` from the start (assigned, no group)."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "reader", "enable.auto.commit": False,
         "isolation.level": "read_committed"}
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    values: list[bytes] = []
    deadline = time.monotonic() + 30
    while len(values) < expected and time.monotonic() < deadline:
        message = consumer.poll(0.2)
        if message is not None and message.error() is None:
            values.append(message.value())
    time.sleep(0.5)
    while (message := consumer.poll(0.2)) is not None:
        if message.error() is None:
            values.append(message.value())
    consumer.close()
    return values


def create_topic(bootstrap: str, topic: str, partitions: int, replicas: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, partitions, replicas)])[topic].result(30)


def test_missing_jars_and_java_give_errors_naming_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDSTREAM_KAFKA_CACHE", str(tmp_path / "empty-cache"))
    reason = kafka_broker.available()
    assert reason is not None and "make kafka" in reason and "jars are not in" in reason
    with pytest.raises(KafkaUnavailable, match="make kafka"):
        KafkaNode(tmp_path / "node").start()
    # auto falls back to tansu and says that nothing survives; kafka refuses. No Java
    # here, so nothing is fetched on demand either.
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk"))
    monkeypatch.setenv("PATH", str(tmp_path))
    reason = kafka_broker.available()
    assert reason is not None and "Java is not installed" in reason
    said: list[str] = []
    assert choose_embedded_broker("auto", said.append) == "tansu"
    assert len(said) == 1 and "keeps NOTHING across restarts" in said[0]
    with pytest.raises(KafkaUnavailable, match="Java is not installed"):
        choose_embedded_broker("kafka", said.append)
    assert choose_embedded_broker("tansu", said.append) == "tansu" and len(said) == 1


def test_a_java_older_than_17_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in java that prints what Java 11 prints (Kafka 4 needs 17).
    home = tmp_path / "jdk11"
    (home / "bin").mkdir(parents=True)
    java = home / "bin" / "java"
    java.write_text('#!/bin/sh\necho \'openjdk version "11.0.22" 2024-01-16\' >&2\n')
    java.chmod(0o755)
    monkeypatch.setenv("JAVA_HOME", str(home))
    assert kafka_broker.java_version(str(java)) == 11
    reason = kafka_broker.available()
    assert reason is not None and "is Java 11; Apache Kafka 4 needs Java 17 or newer" in reason
    said: list[str] = []
    assert choose_embedded_broker("auto", said.append) == "tansu"
    assert "keeps NOTHING across restarts" in said[-1]


def test_a_missing_pom_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSTREAM_KAFKA_POM", str(tmp_path / "nowhere.xml"))
    reason = kafka_broker.available()
    assert reason is not None and "nowhere.xml is missing" in reason
    assert "MEDSTREAM_EMBEDDED_BROKER=tansu" in reason


def test_the_jars_are_fetched_with_progress_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kafka_here: None
) -> None:
    # Maven's own repository is warm after `make kafka`, so this copies without the network.
    monkeypatch.setenv("MEDSTREAM_KAFKA_CACHE", str(tmp_path / "cache"))
    said: list[str] = []
    libs = kafka_broker.fetch_jars(said.append)
    version = kafka_broker.kafka_version()
    assert libs == tmp_path / "cache" / version / "libs"
    assert (libs / f"kafka_2.13-{version}.jar").is_file()
    assert (libs / f"kafka-clients-{version}.jar").is_file()
    assert said[0].startswith(f"fetching Apache Kafka {version} from Maven Central")
    assert said[-1].startswith(f"Apache Kafka {version}: ")
    assert kafka_broker.available() is None
    assert kafka_broker.fetch_jars(said.append) == libs  # present: nothing fetched again
    assert len([line for line in said if line.startswith("fetching")]) == 1


def test_a_node_keeps_topics_records_and_offsets_across_a_restart(
    tmp_path: Path, kafka_here: None
) -> None:
    node = KafkaNode(tmp_path / "kafka").start()
    try:
        # A second node on the same directory (a second `up`, or `broker` beside `up`) is
        # refused before it touches the running node's files.
        with pytest.raises(EmbeddedRuntimeError, match="another medstream process runs"):
            KafkaNode(tmp_path / "kafka").start()
        assert node.alive()
        assert node.formatted and (tmp_path / "kafka" / "logs" / "meta.properties").is_file()
        # Raw messages with patient identifiers live here: readable by the owner only.
        assert (tmp_path / "kafka").stat().st_mode & 0o777 == 0o700
        create_topic(node.bootstrap_servers, "raw.test", 2, 1)
        produce(node.bootstrap_servers, "raw.test", 50)
        consumer = Consumer(
            {"bootstrap.servers": node.bootstrap_servers, "group.id": "keeper",
             "enable.auto.commit": False}
        )
        consumer.commit(offsets=[TopicPartition("raw.test", 0, 7)], asynchronous=False)
        consumer.close()
        cluster_id = AdminClient({"bootstrap.servers": node.bootstrap_servers}).list_topics(
            timeout=10
        ).cluster_id
    finally:
        node.stop()
    assert not node.alive() and cluster_id == node.cluster_id

    again = KafkaNode(tmp_path / "kafka").start()  # new ports, same storage
    try:
        admin = AdminClient({"bootstrap.servers": again.bootstrap_servers})
        assert admin.list_topics(timeout=10).cluster_id == cluster_id
        assert sorted(read_values(again.bootstrap_servers, "raw.test", 2, 50)) == sorted(
            b"v%d" % i for i in range(50)
        )
        consumer = Consumer(
            {"bootstrap.servers": again.bootstrap_servers, "group.id": "keeper",
             "enable.auto.commit": False}
        )
        committed = consumer.committed([TopicPartition("raw.test", 0)], timeout=10)
        consumer.close()
        assert committed[0].offset == 7
        assert "ERROR" not in again.log_path.read_text()
    finally:
        again.stop()


def test_medstream_broker_runs_apache_kafka_and_says_its_data_survives(
    tmp_path: Path, kafka_here: None
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDSTREAM_", "KAFKA_"))}
    env.update(MEDSTREAM_DATA_DIR=str(tmp_path), MEDSTREAM_EMBEDDED_BROKER="kafka")
    process = subprocess.Popen(
        [sys.executable, "-m", "medstream", "broker"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        second = process.stdout.readline()
        assert first.startswith("embedded Apache Kafka on 127.0.0.1:")
        assert "(data kept across restarts)" in first
        assert "MEDSTREAM_KAFKA_BROKER_KIND=kafka" in second
        bootstrap = second.split()[0].split("=", 1)[1]
        topics = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics
        assert "raw.hl7_lab" in topics and len(topics["raw.hl7_lab"].partitions) == 4
        assert (tmp_path / "kafka" / "logs" / "meta.properties").is_file()
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0
    # The broker stopped with it: nothing listens on its port any more.
    host, port = bootstrap.rsplit(":", 1)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=2).close()


def test_a_three_node_cluster_keeps_every_acknowledged_record_through_a_kill_9(
    tmp_path: Path, kafka_here: None
) -> None:
    """Replication 3, min.insync.replicas 2, acks=all: a node killed mid-run loses nothing
    that was acknowledged, and producing goes on on the other two."""
    cluster = KafkaCluster(tmp_path / "cluster", size=3)
    try:
        cluster.start()
        topic = f"raw.cluster-{uuid.uuid4().hex[:6]}"
        create_topic(cluster.bootstrap_servers, topic, 3, 3)
        metadata = AdminClient({"bootstrap.servers": cluster.bootstrap_servers}).list_topics(
            topic, timeout=10
        )
        assert all(len(p.replicas) == 3 for p in metadata.topics[topic].partitions.values())
        acked = produce(cluster.bootstrap_servers, topic, 300)
        cluster.nodes[0].kill()
        acked += produce(cluster.bootstrap_servers.split(",", 1)[1], topic, 300)
        assert len(acked) == 600
        survivors = ",".join(n.bootstrap_servers for n in cluster.nodes[1:])
        values = read_values(survivors, topic, 3, 600)
        assert sorted(values) == sorted([b"v%d" % i for i in range(300)] * 2)
    finally:
        cluster.stop()


def test_kafka_settings_follow_the_broker_kind() -> None:
    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:1")
    assert (kafka.session_timeout, kafka.fetch_wait) == (10000, 500)
    assert kafka.consumer_config("g")["session.timeout.ms"] == 10000
    tansu = KafkaSettings(bootstrap_servers="127.0.0.1:1", broker_kind="tansu")
    assert (tansu.session_timeout, tansu.heartbeat_interval, tansu.fetch_wait) == (3000, 500, 20)
    chosen = KafkaSettings(
        bootstrap_servers="127.0.0.1:1", session_timeout_ms=7000, fetch_wait_max_ms=50
    )
    assert (chosen.session_timeout, chosen.fetch_wait) == (7000, 50)
    # A tansu broker taken for Kafka (only its address copied) is refused by name.
    with pytest.raises(ValueError, match="MEDSTREAM_KAFKA_BROKER_KIND=tansu"):
        kafka.check_cluster("medstream-0123456789ab")
    kafka.check_cluster("q1Jx3vUQTTaxAMlLwW5Xxg")
    tansu.check_cluster("medstream-0123456789ab")


def test_a_consumer_with_the_default_settings_joins_a_group_on_the_session_broker(
    kafka_factory: Callable[..., KafkaSettings],
) -> None:
    """Apache Kafka refuses sessions under group.min.session.timeout.ms (6 s by default): the
    3 s tansu needed made every join fail there with INVALID_SESSION_TIMEOUT."""
    kafka = kafka_factory()
    consumer = Consumer(kafka.consumer_config(f"join-{uuid.uuid4().hex[:6]}"))
    errors: list[str] = []
    consumer.subscribe(
        [kafka.topic("raw.hl7_lab")], on_assign=lambda _c, _p: None
    )
    try:
        deadline = time.monotonic() + 20
        while not consumer.assignment() and time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is not None and message.error() is not None:
                errors.append(str(message.error()))
                break
    finally:
        consumer.close()
    assert errors == []
    assert time.monotonic() < deadline, "no partitions assigned within 20 s"


def test_cluster_ids_never_start_with_a_dash() -> None:
    # One id in 64 would: kafka-storage then read it as an option and refused to format.
    ids = [kafka_broker.random_cluster_id() for _ in range(3000)]
    assert not any(i.startswith("-") for i in ids)
    assert all(len(i) == 22 for i in ids) and len(set(ids)) == 3000
