"""Property test of the device collector's MQTT path: random and mutated payloads published
through the real Mosquitto (with the generated password file and ACL) to the real broker
(all devices, credentials and patients synthetic).

The contract: every message a device publishes ends as a raw DevicePacket or as a dead
letter whose reason code and reason say why (MQTT has no answer to carry it), the message
is acknowledged either way, and the collector keeps taking the next valid packet.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import example, given

from medstream.settings import KafkaSettings
from producers.base import MAX_DEAD_LETTER_BYTES
from producers.devices import DeviceCollectorConfig, DeviceProducer, PayloadError, parse_packet
from schemas.serde import ManifestRegistry
from tests.kafka_helpers import DLQ, consume, raw_topic
from tests.producers.test_devices import (
    TOKENS,
    json_packet,
    mosquitto,  # noqa: F401 (the fixture, used by name)
    mqtt_config,
    mqtt_publish,
    running,
    source,
)
from tests.properties.strategies import bounded
from tests.properties.test_devices import DEVICE, UNHASHABLE_TYPE, payloads

TOPIC = f"devices/monitor-a/{DEVICE}/telemetry"


def expected_refusal(payload: bytes, config: DeviceCollectorConfig) -> str | None:
    """The reason code the collector must dead-letter a payload with, or None if valid."""
    limit = config.http.max_body_bytes if config.http else 262_144
    if len(payload) > limit:
        return "payload_too_large"
    try:
        parse_packet(payload, source(config, DEVICE), config, int(time.time() * 1000))
    except PayloadError as error:
        return error.reason_code
    return None


@pytest.mark.integration
def test_mqtt_refuses_every_bad_payload_with_a_dead_letter_and_keeps_taking_packets(
    kafka_factory: Callable[..., KafkaSettings],
    tmp_path: Path,
    mosquitto: Callable[[DeviceCollectorConfig], int],  # noqa: F811
) -> None:
    kafka = kafka_factory()
    config = mqtt_config(tmp_path, per_device_rate={"packets_per_s": 10_000, "burst": 10_000})
    port = mosquitto(config)
    collector = DeviceProducer(config, kafka, ManifestRegistry())
    refused: list[tuple[str, bytes]] = []  # (reason code, payload as kept)
    valid_ids: list[str] = []
    counter = iter(range(1_000_000))
    with running(collector):

        @bounded(25, deadline_s=20)
        @given(payload=payloads())
        @example(payload=UNHASHABLE_TYPE)
        @example(payload=b"\xff\xfe not json")
        @example(payload=b"[" * 5000 + b"]" * 5000)  # over max_body_bytes
        def publish_bad_then_valid(payload: bytes) -> None:
            reason_code = expected_refusal(payload, config)
            assert mqtt_publish(port, DEVICE, TOKENS[DEVICE], TOPIC, payload) == "ok"
            if reason_code is not None:
                refused.append((reason_code, payload[:MAX_DEAD_LETTER_BYTES]))
            packet_id = f"valid-{next(counter):05d}"
            valid = json_packet(DEVICE, packet_id, int(time.time() * 1000) - 1000)
            assert mqtt_publish(port, DEVICE, TOKENS[DEVICE], TOPIC, json.dumps(valid).encode()) \
                == "ok"
            valid_ids.append(packet_id)

        publish_bad_then_valid()
        dead = consume(kafka, [DLQ], len(refused), timeout_s=30)
        published = consume(kafka, [raw_topic("device")], len(valid_ids), timeout_s=30)
    assert refused, "the examples must include refused payloads"
    assert len(dead) == len(refused)
    assert {(d.value["reason_code"], d.value["original_value"]) for d in dead} == set(refused)
    assert all(d.value["reason"] and d.value["original_key"] == DEVICE.encode() for d in dead)
    assert all(d.value["stage"] == "producer" and d.value["source_kind"] == "device"
               for d in dead)
    assert set(valid_ids) <= {r.value["packet_id"] for r in published}
