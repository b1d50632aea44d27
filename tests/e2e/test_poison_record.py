"""End-to-end: a real Faust worker on the real Kafka broker survives a poison record.

The worker runs ``medstream streams`` with one named fake bug injected (the alert lifecycle
fails for findings about subject ``BUG|...``): that input is dead-lettered as
``internal_error`` and the next input of the same partition opens its alert, while the
worker keeps running (before, the agent crashed the worker on every re-read).
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Producer

from medstream.settings import ALERTS_TOPIC, DLQ_TOPIC, LIFECYCLE_TOPIC, KafkaSettings
from schemas import serde
from streams.detect import LifecycleInputs
from streams.findings import Finding
from tests.e2e.test_worker_recovery import Pipeline
from tests.kafka_helpers import consume
from tests.waiting import require_kafka

pytestmark = pytest.mark.e2e

#: The worker with a fake bug in the alert lifecycle, for findings about BUG|... only.
WORKER_WITH_A_FAKE_BUG = """
from streams.alert_lifecycle import AlertLifecycle

real_on_finding = AlertLifecycle.on_finding

def on_finding_with_a_fake_bug(self, finding, state, now_ms):
    if finding.subject.startswith("BUG|"):
        raise RuntimeError("a fake bug for one finding")
    return real_on_finding(self, finding, state, now_ms)

AlertLifecycle.on_finding = on_finding_with_a_fake_bug
from medstream.cli import app
app(prog_name="medstream", args=["streams"])
"""


def finding(subject: str) -> Finding:
    return Finding(
        rule_id="critical_value.potassium", rule_version="r1", severity="critical",
        organisation_id="H001", subject=subject, event_time_ms=int(time.time() * 1000),
        triggering_event_ids=(f"lab-{uuid.uuid4().hex[:8]}",),
        explanation="Potassium 7.4 mmol/L above critical high 6.2", person_key="c" * 32,
    )


def test_a_worker_dead_letters_a_poison_record_and_processes_the_next(
    tmp_path: Path,
    kafka_factory: Callable[..., KafkaSettings],
    processes: list[subprocess.Popen[str]],
) -> None:
    require_kafka()
    kafka = kafka_factory()
    pipeline = Pipeline(kafka, tmp_path, processes)
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER_WITH_A_FAKE_BUG], env=pipeline.env, text=True,
        stdout=pipeline.log, stderr=pipeline.log,
    )
    processes.append(worker)
    inputs = LifecycleInputs(kafka, serde.ManifestRegistry())
    now_ms = int(time.time() * 1000)
    poisoned = inputs.finding(finding("BUG|poison"), now_ms)
    following = inputs.finding(finding("OK|next"), now_ms)
    producer = Producer(kafka.librdkafka(acks="all"))
    for output in (poisoned, following):  # one partition: the next record waits behind it
        producer.produce(output.topic, key=output.key, value=output.value, partition=0)
    assert producer.flush(30) == 0
    records = consume(kafka, [DLQ_TOPIC, ALERTS_TOPIC], 2, timeout_s=180)
    assert worker.poll() is None, f"the worker died: {pipeline.log_path.read_text()[-3000:]}"
    [dead] = [r.value for r in records if r.topic == kafka.topic(DLQ_TOPIC)]
    [alert] = [r.value for r in records if r.topic == kafka.topic(ALERTS_TOPIC)]
    assert (dead["stage"], dead["reason_code"]) == ("lifecycle", "internal_error")
    assert (dead["original_topic"], dead["original_partition"], dead["original_offset"]) == (
        kafka.topic(LIFECYCLE_TOPIC), 0, 0
    )
    assert dead["original_value"] == poisoned.value and dead["original_key"] == poisoned.key
    assert "RuntimeError in <string>:on_finding_with_a_fake_bug" in dead["reason"]
    assert (alert["subject"], alert["action"]) == ("OK|next", "opened")
    pipeline.log.flush()
    assert "a fake bug for one finding" not in pipeline.log_path.read_text()  # no message


#: The worker with a fake bug that every finding about BUG|... hits.
WORKER_WITH_A_FAKE_BUG_EVERYWHERE = WORKER_WITH_A_FAKE_BUG.replace(
    "a fake bug for one finding", "a fake bug for every BUG finding"
)


def test_a_bug_every_record_hits_stops_the_worker_and_loses_nothing(
    tmp_path: Path,
    kafka_factory: Callable[..., KafkaSettings],
    processes: list[subprocess.Popen[str]],
) -> None:
    """20 records in a row failing stop the worker (exit 71) before the 20th is committed;
    the fixed worker then processes it and every later one: none is skipped or lost.
    (Second review H1: the worker raised, Faust stopped gracefully and committed the record
    that tripped the breaker, so it never got an outcome.)"""
    require_kafka()
    kafka = kafka_factory()
    pipeline = Pipeline(kafka, tmp_path, processes)
    buggy = subprocess.Popen(
        [sys.executable, "-c", WORKER_WITH_A_FAKE_BUG_EVERYWHERE], env=pipeline.env, text=True,
        stdout=pipeline.log, stderr=pipeline.log,
    )
    processes.append(buggy)
    inputs = LifecycleInputs(kafka, serde.ManifestRegistry())
    now_ms = int(time.time() * 1000)
    subjects = [f"BUG|{n}" for n in range(24)] + ["OK|1", "OK|2"]
    producer = Producer(kafka.librdkafka(acks="all"))
    for subject in subjects:  # one partition, in this order
        output = inputs.finding(finding(subject), now_ms)
        producer.produce(output.topic, key=output.key, value=output.value, partition=0)
    assert producer.flush(30) == 0
    assert buggy.wait(timeout=180) == 71, pipeline.log_path.read_text()[-3000:]
    pipeline.log.flush()
    log = pipeline.log_path.read_text()
    assert "20 records in a row of" in log and "without committing that record" in log

    fixed = pipeline.worker()  # the bug fixed: the same topics, group and offsets
    records = consume(kafka, [DLQ_TOPIC, ALERTS_TOPIC], len(subjects), timeout_s=180,
                      settle_s=3.0)
    assert fixed.poll() is None, f"the worker died: {pipeline.log_path.read_text()[-3000:]}"
    dead = [r.value for r in records if r.topic == kafka.topic(DLQ_TOPIC)]
    opened = {
        r.value["subject"] for r in records
        if r.topic == kafka.topic(ALERTS_TOPIC) and r.value["action"] == "opened"
    }
    # The 19 before the breaker tripped were dead-lettered, never the 20th (offset 19): it
    # and every later record were processed by the fixed worker. The process ended before
    # Faust committed the dead-lettered ones too, so the fixed worker may have processed
    # those again (at least once): each has its dead letter, its alert, or both.
    # Dead letters still in the producer's buffer when the process ended were not sent
    # either: those records too were read again. Each of the first 19 has its dead letter,
    # its alert or both; none from offset 19 on was dead-lettered.
    dead_offsets = {d["original_offset"] for d in dead}
    assert dead_offsets <= set(range(19)) and len(dead_offsets) == len(dead)
    assert {d["reason_code"] for d in dead} == {"internal_error"}
    assert set(subjects[19:]) <= opened <= set(subjects)
    assert all(n in dead_offsets or f"BUG|{n}" in opened for n in range(19))
