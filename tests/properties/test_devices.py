"""Property tests of the device collector's packet parsing (JSON, FHIR Observation, FHIR
Bundle) and of its real HTTP endpoint, with random and mutated payloads (all devices,
tokens and patients synthetic).

The contract: a packet is accepted as a schema-valid raw DevicePacket that the stage can
read, or refused with a PayloadError naming the field (HTTP 4xx with a JSON reason and a
dead letter); never an unhandled exception or a 5xx, and the endpoint keeps accepting the
next valid packet.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from medstream.settings import KafkaSettings
from producers.devices import DeviceProducer, PayloadError, parse_packet
from schemas.serde import ManifestRegistry
from streams.model import RecordRejected
from tests.kafka_helpers import DLQ, consume, raw_topic
from tests.producers.test_devices import (
    NOW_MS,
    TOKENS,
    fhir_bundle,
    fhir_observation,
    json_packet,
    make_config,
    post,
    running,
    source,
)
from tests.properties.pipeline import round_trip, stage_outcomes
from tests.properties.strategies import NASTY_TEXT, bounded, mutated

JSON_DELIMITERS = b'{}[]:,"\\'
DEVICE = "MON-A-0001"


def samples() -> list[bytes]:
    """Valid payloads of every accepted shape."""
    return [
        json.dumps(json_packet(DEVICE, "p-1")).encode(),
        json.dumps(fhir_observation("o-1")).encode(),
        json.dumps(fhir_bundle("b-1")).encode(),
    ]


#: JSON values of the wrong type, out of range or malformed, put in place of a valid one.
ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(NASTY_TEXT),
    st.text(max_size=40),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


def _paths(document: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(document, dict):
        for key, value in document.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            found += _paths(value, (*prefix, index))
    return found


@st.composite
def retyped(draw: st.DrawFn) -> bytes:
    """A valid payload with one value replaced by a value of another type or range."""
    document = json.loads(draw(st.sampled_from(samples())))
    path = draw(st.sampled_from(_paths(document)))
    target = document
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = draw(ODD_VALUES)
    return json.dumps(target if not path else document).encode()


#: Regression input: a Bundle entry whose resourceType is a list.
UNHASHABLE_TYPE = samples()[2].replace(b'"resourceType": "Device"', b'"resourceType": []')


def payloads() -> st.SearchStrategy[bytes]:
    return st.one_of(
        retyped(),
        st.sampled_from(samples()).flatmap(lambda s: mutated(s, JSON_DELIMITERS)),
        st.binary(max_size=200),
    )


@bounded(500)
@given(payload=payloads())
@example(payload=samples()[0])
# Bug: a Bundle entry whose resourceType was not a string (a list, an object) raised
# TypeError (unhashable), answered 500 internal_error instead of 400 naming the field.
@example(payload=UNHASHABLE_TYPE)
@example(payload=samples()[0].replace(b'"p-1"', b'"\\ud800"'))
@example(payload=samples()[0].replace(b'"HR"', b'"H\\udfffR"'))
@example(payload=samples()[1].replace(b'"final"', b'"final", "valueString": 1e400'))
@example(payload=samples()[0].replace(b'"value": 72', b'"value": 1e400'))
@example(payload=samples()[0].replace(b'"value": 72', b'"value": ' + b"9" * 5000))
@example(payload=b"[" * 100_000 + b"]" * 100_000)
def test_every_payload_is_a_valid_packet_or_a_named_refusal(payload: bytes) -> None:
    config = make_config(Path("/nonexistent"))
    try:
        record = parse_packet(payload, source(config, DEVICE), config, NOW_MS)
    except PayloadError as error:
        assert error.problems and all(field and message for field, message in error.problems)
        body = error.as_json()
        assert body["error"] in ("invalid_payload", "device_mismatch")
        json.dumps(body)  # the answer to the device must serialise
        return
    decoded = round_trip("device", record)
    assert decoded["device_id"] == DEVICE
    assert len(decoded["samples"]) == len(record["samples"]) >= 1
    refused = [o for o in stage_outcomes("device", decoded) if isinstance(o, RecordRejected)]
    assert not refused, f"accepted with 202, then refused by the stage: {refused}"


# --- the real HTTP endpoint ------------------------------------------------------------------


@pytest.mark.integration
def test_http_endpoint_refuses_every_bad_packet_clearly_and_keeps_serving(
    kafka_factory: Callable[..., KafkaSettings], tmp_path: Path
) -> None:
    kafka = kafka_factory()
    config = make_config(
        tmp_path,
        per_device_rate={"packets_per_s": 10_000, "burst": 10_000},
        http={"host": "127.0.0.1", "port": 0, "max_body_bytes": 65_536},
    )
    collector = DeviceProducer(config, kafka, ManifestRegistry())
    refused: list[str] = []
    valid_ids: list[str] = []
    counter = iter(range(1_000_000))
    with running(collector):
        port = collector.http_port
        assert port is not None

        @bounded(60, deadline_s=20)
        @given(payload=payloads())
        @example(payload=UNHASHABLE_TYPE)  # was a 500 internal_error
        def post_bad_then_valid(payload: bytes) -> None:
            status, _, answer = post(port, DEVICE, payload, TOKENS[DEVICE])
            assert status in (200, 202, 400, 413), (status, answer)
            if status >= 400:
                assert answer["error"] and answer.get("message"), answer
                refused.append(answer["dlq_id"])
            packet_id = f"valid-{next(counter):05d}"
            valid = json_packet(DEVICE, packet_id, int(time.time() * 1000) - 1000)
            status, _, answer = post(port, DEVICE, valid, TOKENS[DEVICE])
            assert (status, answer["status"]) == (202, "accepted"), answer
            valid_ids.append(packet_id)

        post_bad_then_valid()
        dead = consume(kafka, [DLQ], len(refused), timeout_s=20)
        published = consume(kafka, [raw_topic("device")], len(valid_ids), timeout_s=20)
    assert {d.value["dlq_id"] for d in dead} == set(refused)
    assert all(d.value["reason"] for d in dead)
    assert set(valid_ids) <= {r.value["packet_id"] for r in published}
