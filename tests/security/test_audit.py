"""Attacks on the audit trail through the embedded broker, which takes records from anyone
who can reach it: a forged audit record, one altered in flight, and one written with another
key are dead-lettered by the real sink with their reason and counted, never stored in
audit_log; what the console's own trail writes is stored."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from confluent_kafka import Producer

from medstream.audit import AUDIT_MAC_HEADER, AuditTrail, audit_event, audit_mac
from medstream.metrics import AUDIT_REFUSED
from medstream.settings import FACT_TOPICS, KafkaSettings
from schemas import serde
from tests.security.harness import KEYS, stored_audit
from tests.sinks.test_clickhouse import unseal_dead_letter
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


def _forged(actor: str) -> tuple[bytes, bytes]:
    """A well-formed audit record (Avro, right schema) nobody with the key wrote."""
    event = audit_event(actor=actor, actor_role="admin", channel="console", action="sign_in",
                        outcome="ok", client_address="203.0.113.9")
    value = serde.AvroSerializer(serde.ManifestRegistry(), serde.AUDIT_EVENT)(event)
    return event["audit_id"].encode(), value


def _produce(
    kafka: KafkaSettings, records: list[tuple[bytes, bytes, list[tuple[str, bytes]]]]
) -> None:
    producer = Producer(kafka.producer_config())
    failures: list[str] = []
    for key, value, headers in records:
        producer.produce(kafka.topic(FACT_TOPICS["audit_log"]), key=key, value=value,
                         headers=headers, on_delivery=lambda e, _m: e and failures.append(str(e)))
    producer.flush(30)
    assert not failures


def _refused(reason: str) -> float:
    return AUDIT_REFUSED.labels(reason)._value.get()  # type: ignore[attr-defined,no-any-return]


def test_forged_and_altered_audit_records_are_dead_lettered_not_stored(
    kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, database: str,
) -> None:
    kafka = kafka_factory()
    before = {reason: _refused(reason) for reason in ("no_code", "wrong_code")}
    no_code_key, no_code = _forged("forger.no_code")
    other_key_key, other_key = _forged("forger.other_key")
    altered_key, genuine = _forged("mon.east")
    genuine_code = audit_mac(KEYS.audit_key, altered_key, genuine)
    altered = genuine.replace(b"mon.east", b"adm.east")  # same length: still valid Avro
    with stored_audit(kafka, clickhouse, database) as lock:
        _produce(kafka, [
            (no_code_key, no_code, []),
            (other_key_key, other_key,
             [(AUDIT_MAC_HEADER, audit_mac(b"x" * 32, other_key_key, other_key))]),
            (altered_key, altered, [(AUDIT_MAC_HEADER, genuine_code)]),
        ])
        trail = AuditTrail(kafka, serde.ManifestRegistry(), key=KEYS.audit_key)
        trail.record(actor="mon.east", actor_role="monitor", channel="console",
                     action="sign_in", outcome="ok", client_address="10.0.0.1")
        trail.close()

        def stored() -> list[tuple[Any, ...]]:
            with lock:
                return [tuple(r) for r in clickhouse.query(
                    f"SELECT actor, client_address FROM {database}.audit_log").result_rows]

        def dead_letters() -> list[tuple[Any, ...]]:
            with lock:
                return [tuple(r) for r in clickhouse.query(
                    "SELECT stage, reason_code, reason, original_topic, hex(original_value), "
                    f"dlq_id FROM {database}.dead_letter").result_rows]

        wait_for(lambda: len(dead_letters()) == 3 and len(stored()) == 1, what="stored and refused")
    assert stored() == [("mon.east", "10.0.0.1")]  # only the trail's own record
    rows = dead_letters()
    assert {(r[0], r[1], r[3]) for r in rows} == {
        ("sink", "audit_unauthenticated", kafka.topic(FACT_TOPICS["audit_log"]))
    }
    # The refused bytes are kept (sealed) for an investigation, exactly as they came.
    reasons = {unseal_dead_letter(r[4], r[5]): r[2] for r in rows}
    assert set(reasons) == {no_code, other_key, altered}
    assert f"no {AUDIT_MAC_HEADER} header" in reasons[no_code]
    assert "does not match" in reasons[other_key] and "does not match" in reasons[altered]
    assert _refused("no_code") - before["no_code"] == 1
    assert _refused("wrong_code") - before["wrong_code"] == 2


def test_an_audit_trail_on_kafka_needs_the_key(kafka_factory: Callable[..., KafkaSettings]) -> None:
    with pytest.raises(ValueError, match="MEDSTREAM_AUDIT_KEY"):
        AuditTrail(kafka_factory(), serde.ManifestRegistry())


def test_the_code_binds_the_key_and_the_value() -> None:
    key = b"k" * 32
    code = audit_mac(key, b"id-1", b"value")
    assert code == audit_mac(key, b"id-1", b"value") and len(code) == 32
    # Bytes cannot move between the record key and the value, nor the key change.
    assert code != audit_mac(key, b"id-1v", b"alue")
    assert code != audit_mac(b"j" * 32, b"id-1", b"value")
