"""Test helpers: the real alert lifecycle stage on the real broker, without Faust.

:class:`LifecycleWorker` reads ``alerts.lifecycle`` and applies every input with
``streams.detect.LifecycleStage`` (the code the Faust agent calls) to a state it keeps in
memory, and publishes the outputs (alert snapshots, action outcomes) as the agent does.
``forget()`` empties that state: a worker restarted on a broker that kept nothing.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from clickhouse_connect.driver.client import Client
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from medstream.runtime import deliver_one
from medstream.settings import ALERTS_TOPIC, LIFECYCLE_TOPIC, KafkaSettings
from schemas import serde
from sinks.clickhouse import TableWriter
from streams.detect import LifecycleInputs, LifecycleStage
from streams.findings import DictState, Finding
from tests.waiting import wait_for

PERSON = "c" * 32


class LifecycleWorker:
    """The alert lifecycle over the real broker in a thread (see the module docstring)."""

    def __init__(self, kafka: KafkaSettings, registry: serde.SchemaRegistry) -> None:
        self.kafka = kafka
        self.stage = LifecycleStage(kafka, registry)
        self.state = DictState()
        self.decode_alert = serde.AvroDeserializer(registry, serde.ALERT)
        #: Every alert snapshot published, decoded, in order.
        self.alerts: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lifecycle", daemon=True)
        self._ready = threading.Event()

    def __enter__(self) -> LifecycleWorker:
        self._thread.start()
        assert self._ready.wait(30), "the lifecycle worker did not start"
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def forget(self) -> None:
        """Lose every alert (a restart on a broker that kept no changelog)."""
        self.state.values.clear()

    def _run(self) -> None:
        topic = self.kafka.topic(LIFECYCLE_TOPIC)
        consumer = Consumer(self.kafka.consumer_config(f"test-lifecycle-{uuid.uuid4().hex[:8]}"))
        producer = Producer(self.kafka.librdkafka(acks="all"))
        try:
            partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
            self._ready.set()
            while not self._stop.is_set():
                message = consumer.poll(0.1)
                if message is None or message.error():
                    continue
                outputs = self.stage.handle(message.value(), self.state, int(time.time() * 1000))
                for output in outputs:
                    if output.topic == self.kafka.topic(ALERTS_TOPIC):
                        self.alerts.append(self.decode_alert(output.value))
                    producer.produce(output.topic, key=output.key, value=output.value)
                producer.flush(10)
        finally:
            consumer.close()


def open_alert(
    kafka: KafkaSettings, worker: LifecycleWorker, organisation: str = "H001"
) -> dict[str, Any]:
    """Send a critical potassium finding through the broker; the snapshot that opened it."""
    finding = Finding(
        rule_id="critical_value.potassium", rule_version="r1", severity="critical",
        organisation_id=organisation, subject=f"{PERSON}|{organisation}|2823-3",
        event_time_ms=int(time.time() * 1000) - 60_000,
        triggering_event_ids=(f"lab-{uuid.uuid4().hex[:8]}",),
        explanation="Potassium 7.4 mmol/L above critical high 6.2", person_key=PERSON,
        analyte_code="2823-3", value=7.4, unit="mmol/L",
    )
    output = LifecycleInputs(kafka, serde.ManifestRegistry()).finding(
        finding, int(time.time() * 1000)
    )
    assert deliver_one(kafka, output.topic, output.key, output.value) is None

    def opened() -> list[dict[str, Any]]:
        return [a for a in worker.alerts if a["subject"] == finding.subject]

    wait_for(opened, 30, "the lifecycle to open the alert")
    return opened()[0]


def store_alert(clickhouse: Client, database: str, snapshot: dict[str, Any]) -> None:
    """Store an alert snapshot as the sink does (alert_history, hence alert_current)."""
    writer = TableWriter("alert_history", serde.ManifestRegistry())
    clickhouse.insert(
        f"{database}.alert_history", [writer.row(snapshot)], column_names=writer.columns
    )
