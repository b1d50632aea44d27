"""The benchmark baseline (run as its own process: it owns an embedded ClickHouse engine).

The same clinical events the pipeline produces are Avro-encoded straight onto norm topics
while a plain confluent-kafka loop decodes them and inserts them into the same ClickHouse
tables in 10k-row / 200 ms batches. Prints one JSON line of figures.
Usage: python -m medstream.bench_baseline EVENTS SEED WORKDIR [kafka|tansu]
"""

from __future__ import annotations

import json
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer

from medstream.clickhouse import connect, migrate
from medstream.runtime import Broker, TansuBroker, ensure_topics
from medstream.settings import NORM_TOPICS, BrokerKind, KafkaSettings
from schemas import serde
from streams.critical_values import DEFAULT_CRITICAL_RULES_PATH, load_critical_value_rules
from streams.model import RawContext
from streams.pseudonym import Pseudonymiser
from streams.stage import NormaliseStage, SuppressionState
from streams.terminology import DEFAULT_TERMINOLOGY_PATH, load_terminology

BATCH_ROWS = 10000
BATCH_SECONDS = 0.2


def prepare_events(
    kafka: KafkaSettings, events: int, seed: int
) -> list[tuple[str, bytes | None, bytes]]:
    """The norm records the pipeline would publish for this seed (simulated, then normalised)."""
    from medstream.simulator import RegionSimulator

    registry = serde.ManifestRegistry()
    stage = NormaliseStage(
        kafka,
        registry,
        load_terminology(DEFAULT_TERMINOLOGY_PATH),
        Pseudonymiser(secrets.token_bytes(32)),  # a throughput baseline: any key will do
        load_critical_value_rules(DEFAULT_CRITICAL_RULES_PATH),
    )
    encoders = {
        kind: serde.AvroSerializer(registry, subject)
        for kind, subject in serde.RAW_SUBJECT_BY_KIND.items()
    }
    suppression = SuppressionState.in_memory()
    norm_topics = {kafka.topic(t) for t in NORM_TOPICS.values()}
    prepared: list[tuple[str, bytes | None, bytes]] = []
    offset = 0
    for message in RegionSimulator(seed).messages(events):
        value = (
            message.value
            if isinstance(message.value, bytes)
            else encoders[message.source_kind](message.value)
        )
        ctx = RawContext(f"raw.{message.source_kind}", 0, offset, int(time.time() * 1000))
        offset += 1
        for output in stage.handle(message.source_kind, ctx, message.key, value, suppression):
            if output.topic in norm_topics:
                prepared.append((output.topic, output.key, output.value))
    return prepared


def main(
    events: int, seed: int, workdir: Path, broker_kind: BrokerKind = "tansu"
) -> dict[str, Any]:
    """Run the baseline on a broker of ``broker_kind`` and return its figures."""
    broker: Broker
    if broker_kind == "kafka":
        from medstream.kafka_broker import KafkaNode

        broker = KafkaNode(workdir / "baseline-kafka").start()
    else:
        broker = TansuBroker(log_path=workdir / "baseline-broker.log").start()
    try:
        kafka = KafkaSettings(
            bootstrap_servers=broker.bootstrap_servers,
            topic_prefix="baseline.",
            broker_kind=broker.kind,
        )
        ensure_topics(kafka)
        prepared = prepare_events(kafka, events, seed)
        client = connect(f"chdb://{workdir / 'baseline-clickhouse'}")
        migrate(client, "medstream")
        registry = serde.ManifestRegistry()
        by_topic: dict[str, tuple[str, serde.AvroDeserializer, list[str]]] = {}
        for kind, topic in NORM_TOPICS.items():
            subject = serde.NORM_SUBJECT_BY_KIND[kind]
            columns = [f["name"] for f in registry.latest(subject).definition["fields"]]
            decoder = serde.AvroDeserializer(registry, subject)
            by_topic[kafka.topic(topic)] = (kind, decoder, columns)

        def produce() -> None:
            producer = Producer(kafka.producer_config())
            for topic, key, value in prepared:
                while True:
                    try:
                        producer.produce(topic, value=value, key=key)
                        break
                    except BufferError:
                        producer.poll(0.01)
                producer.poll(0)
            producer.flush()

        consumer = Consumer(kafka.consumer_config("baseline"))
        consumer.subscribe(list(by_topic))
        started = time.perf_counter()
        producer_thread = threading.Thread(target=produce)
        producer_thread.start()
        stored = 0
        rows: dict[str, list[list[Any]]] = {}
        pending = 0
        opened = time.perf_counter()
        while stored < len(prepared):
            for message in consumer.consume(num_messages=2000, timeout=0.05):
                source_topic = message.topic()
                if message.error() or source_topic is None:  # only error events lack a topic
                    raise RuntimeError(str(message.error()))
                kind, decode, columns = by_topic[source_topic]
                record = decode(message.value())
                rows.setdefault(kind, []).append([record[c] for c in columns])
                pending += 1
            if pending and (pending >= BATCH_ROWS or time.perf_counter() - opened >= BATCH_SECONDS):
                for kind, table_rows in rows.items():
                    columns = by_topic[kafka.topic(NORM_TOPICS[kind])][2]
                    client.insert(f"medstream.{kind}", table_rows, column_names=columns)
                consumer.commit(asynchronous=False)
                stored += pending
                rows, pending, opened = {}, 0, time.perf_counter()
        elapsed = time.perf_counter() - started
        producer_thread.join()
        consumer.close()
        in_table = sum(
            int(client.query(f"SELECT count() FROM medstream.{kind}").result_rows[0][0])
            for kind in NORM_TOPICS
        )
        client.close()
        return {
            "events": len(prepared),
            "stored": in_table,
            "seconds": round(elapsed, 3),
            "events_per_s": round(len(prepared) / elapsed, 1),
        }
    finally:
        broker.stop()


if __name__ == "__main__":
    wanted = sys.argv[4] if len(sys.argv) > 4 else "tansu"
    if wanted not in ("kafka", "tansu"):
        sys.exit(f"broker must be kafka or tansu, not {wanted!r}")
    kind: BrokerKind = "kafka" if wanted == "kafka" else "tansu"
    figures = main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), kind)
    print(json.dumps(figures))
