"""The device collector: payload parsing, credentials, the real HTTP endpoint, the real
Mosquitto broker (started here with the generated password file and ACL) and the real
Kafka broker. All devices, tokens and patients are synthetic."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import KafkaError, KafkaException, Producer
from pydantic import ValidationError

from medstream.metrics import COLLECTOR_FAILED, labelled
from medstream.runtime import free_port
from medstream.settings import KafkaSettings
from producers import collector_class
from producers.base import (
    MAX_DEAD_LETTER_BYTES,
    MAX_RECORD_BYTES,
    CollectorState,
    ConfigError,
    RefusalBudget,
    SourceUnavailable,
    load_config,
)
from producers.devices import (
    DeviceCollectorConfig,
    DeviceProducer,
    PacketSource,
    PayloadError,
    hash_device_token,
    mosquitto_acl,
    mosquitto_password_file,
    parse_packet,
    verify_device_token,
    write_mosquitto_auth,
)
from schemas.serde import RAW_SUBJECT_BY_KIND, AvroDeserializer, AvroSerializer, ManifestRegistry
from tests.kafka_helpers import DLQ, consume, raw_topic
from tests.waiting import wait_for

MOSQUITTO = "/usr/sbin/mosquitto"
NOW_MS = 1_793_700_000_000  # 2026-11-03T...Z, a fixed "receive" time for pure tests
GATEWAY_PASSWORD = "gateway-password-synthetic-0001"
TOKENS = {
    "MON-A-0001": "token-monitor-a-0001-synthetic",
    "MON-B-0001": "token-monitor-b-0001-synthetic",
    "WB-0001": "token-wristband-0001-synthetic",
    "OX-0001": "token-oximeter-0001-synthetic",
}
HASHES = {
    device_id: hash_device_token(token, iterations=1000)
    for device_id, token in TOKENS.items()
    if device_id != "OX-0001"
}
HASHES["OX-0001"] = "sha256:" + hashlib.sha256(TOKENS["OX-0001"].encode()).hexdigest()
FHIR_CODES = {
    "monitor-a": {
        "http://loinc.org|8867-4": "HR",
        "http://loinc.org|59408-5": "SPO2",
        "http://loinc.org|8480-6": "NIBP_SYS",
        "http://loinc.org|8310-5": "TEMP",
        "urn:iso:std:iso:11073:10101|150456": "SPO2",
    }
}
SOURCE_REQUIRED = os.environ.get("MEDSTREAM_REQUIRE_SOURCES") == "1"


def registry() -> dict[str, Any]:
    return {
        "MON-A-0001": {"device_type": "monitor-a", "credential": HASHES["MON-A-0001"]},
        "MON-B-0001": {
            "device_type": "monitor-b",
            "organisation_id": "H002",
            "credential": HASHES["MON-B-0001"],
        },
        "WB-0001": {
            "device_type": "wearable-w",
            "organisation_id": "H002",
            "patient_ref": "TEST-MRN-0001",
            "credential": HASHES["WB-0001"],
        },
        "OX-0001": {"device_type": "oximeter-o", "credential": HASHES["OX-0001"]},
    }


def make_config(tmp_path: Path, **overrides: Any) -> DeviceCollectorConfig:
    data: dict[str, Any] = {
        "kind": "devices",
        "name": f"dev-{uuid.uuid4().hex[:6]}",
        "organisation_id": "H001",
        "source_system": "h001-iot-gw",
        "state_dir": str(tmp_path / "state"),
        "http": {"host": "127.0.0.1", "port": 0, "max_body_bytes": 4096},
        "devices": registry(),
        "fhir_codes": FHIR_CODES,
    }
    data.update(overrides)
    return DeviceCollectorConfig.model_validate(data)


def source(config: DeviceCollectorConfig, device_id: str) -> PacketSource:
    device = config.devices[device_id]
    return PacketSource(device_id, device, config.device_organisation(device))


def json_packet(device_id: str, packet_id: str, sent: int = NOW_MS - 1000, **extra: Any) -> dict:
    return {
        "packet_id": packet_id,
        "device_id": device_id,
        "sent_time": sent,
        "samples": [
            {"metric": "HR", "value": 72, "unit": "bpm", "time": sent - 15_000},
            {"metric": "SPO2", "value": 97.0, "unit": "%"},
            {"metric": "NIBP_SYS", "value": None, "unit": "mmHg"},
        ],
        **extra,
    }


def fhir_observation(obs_id: str, device_id: str = "MON-A-0001") -> dict[str, Any]:
    """A blood-pressure-style panel with a heart rate and an SpO2 component (MDC coded)."""
    return {
        "resourceType": "Observation",
        "id": obs_id,
        "identifier": [{"system": "urn:test:packet", "value": f"pkt-{obs_id}"}],
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "85353-1"}]},
        "subject": {"identifier": {"system": "urn:test:mrn", "value": "TEST-MRN-0042"}},
        "device": {"reference": f"Device/{device_id}"},
        "effectiveDateTime": "2026-11-03T08:00:00Z",
        "issued": "2026-11-03T08:00:05Z",
        "component": [
            {
                "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                "valueQuantity": {"value": 64, "unit": "beats/min",
                                  "system": "http://unitsofmeasure.org", "code": "/min"},
            },
            {
                "code": {"coding": [{"system": "urn:iso:std:iso:11073:10101",
                                     "code": "150456"}]},
                "valueQuantity": {"value": 98, "unit": "%",
                                  "system": "http://unitsofmeasure.org", "code": "%"},
            },
        ],
    }


def fhir_bundle(bundle_id: str, device_id: str = "MON-A-0001") -> dict[str, Any]:
    temperature = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5"}]},
        "device": {"identifier": {"value": device_id}},
        "effectiveDateTime": "2026-11-03T08:01:00+08:00",
        "valueQuantity": {"value": 37.2, "system": "http://unitsofmeasure.org", "code": "Cel"},
    }
    unmapped = {
        "resourceType": "Observation",
        "status": "preliminary",
        "code": {"coding": [{"system": "http://loinc.org", "code": "9279-1"}]},
        "effectiveDateTime": "2026-11-03T08:01:00+08:00",
        "dataAbsentReason": {"coding": [{"code": "not-performed"}]},
    }
    return {
        "resourceType": "Bundle",
        "id": f"id-{bundle_id}",
        "identifier": {"value": bundle_id},
        "type": "collection",
        "timestamp": "2026-11-03T08:01:30+08:00",
        "entry": [
            {"resource": {"resourceType": "Device", "id": device_id}},
            {"resource": temperature},
            {"resource": unmapped},
        ],
    }


def iso_ms(text: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(text).timestamp() * 1000)


# --- pure tests ---------------------------------------------------------------------------


def test_token_hashes_verify_and_match_mosquitto_passwd(tmp_path: Path) -> None:
    credential = hash_device_token("a-synthetic-device-token")
    assert credential.startswith("$7$")
    assert verify_device_token("a-synthetic-device-token", credential)
    assert not verify_device_token("another-synthetic-token", credential)
    assert verify_device_token(TOKENS["OX-0001"], HASHES["OX-0001"])
    assert not verify_device_token("x" * 20, HASHES["OX-0001"])
    with pytest.raises(ValueError, match="16 characters"):
        hash_device_token("short")
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd not installed: cannot compare with Mosquitto's own hash")
    passwd = tmp_path / "passwd"
    subprocess.run([tool, "-c", "-b", str(passwd), "someone", "their-synthetic-pw"], check=True)
    theirs = passwd.read_text().strip().split(":", 1)[1]
    assert verify_device_token("their-synthetic-pw", theirs)
    assert not verify_device_token("their-synthetic-px", theirs)


def test_config_refuses_plain_tokens_bad_topics_and_no_listener(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must be a hash"):
        make_config(tmp_path, devices={"D1": {"device_type": "monitor-a", "credential": "abc"}})
    with pytest.raises(ValueError, match="needs \\{device_id\\} exactly once"):
        make_config(tmp_path, mqtt={"username": "gw", "password": "pw", "topic": "devices/all"})
    with pytest.raises(ValueError, match="wildcards"):
        make_config(tmp_path, mqtt={"username": "gw", "password": "pw", "topic": "d/+/{device_id}"})
    with pytest.raises(ValueError, match="at least one listener"):
        make_config(tmp_path, http=None)
    with pytest.raises(ValueError, match="letters, digits"):
        make_config(tmp_path, devices={"a/b": registry()["MON-A-0001"]})


def test_registry_file_is_read_and_errors_name_it(tmp_path: Path) -> None:
    path = tmp_path / "devices.yaml"
    path.write_text(yaml.safe_dump({"devices": {"MON-A-0002": registry()["MON-A-0001"]}}))
    config = make_config(tmp_path, device_registry=str(path))
    assert set(config.devices) == {"MON-A-0001", "MON-B-0001", "WB-0001", "OX-0001", "MON-A-0002"}
    path.write_text(yaml.safe_dump({"devices": {"X1": {"device_type": "monitor-a"}}}))
    with pytest.raises(ValueError, match=r"devices\.yaml: devices\.X1: credential"):
        make_config(tmp_path, device_registry=str(path))


def test_example_config_loads_through_the_cli_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    assert collector_class("devices") is DeviceProducer
    example = Path(__file__).parents[2] / "deploy" / "collectors" / "devices.example.yaml"
    monkeypatch.setenv("MEDSTREAM_DEVICE_GATEWAY_PASSWORD", "example-only")
    config = load_config(example, DeviceCollectorConfig)
    assert config.kind == "devices" and config.mqtt is not None and config.http is not None
    assert config.subscriptions()


def test_generated_password_file_and_acl(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        mqtt={
            "username": "gateway",
            "password": GATEWAY_PASSWORD,
            "topics": {"monitor-b": "ward/beta/{device_id}/vitals"},
        },
    )
    assert config.subscriptions() == [
        "devices/monitor-a/+/telemetry",
        "devices/oximeter-o/+/telemetry",
        "devices/wearable-w/+/telemetry",
        "ward/beta/+/vitals",
    ]
    passwd = dict(line.split(":", 1) for line in mosquitto_password_file(config).splitlines())
    assert set(passwd) == {"gateway", "MON-A-0001", "MON-B-0001", "WB-0001"}  # OX: HTTP only
    assert verify_device_token(GATEWAY_PASSWORD, passwd["gateway"])
    assert passwd["MON-A-0001"] == HASHES["MON-A-0001"]
    acl = mosquitto_acl(config)
    assert "user gateway\ntopic read devices/monitor-a/+/telemetry\n" in acl
    assert "user MON-B-0001\ntopic write ward/beta/MON-B-0001/vitals\n" in acl
    assert "OX-0001" not in acl
    auth = write_mosquitto_auth(config, tmp_path / "auth")
    assert auth.password_file.stat().st_mode & 0o077 == 0


def test_json_packet_becomes_the_raw_record(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    body = json.dumps(json_packet("MON-A-0001", "p-1", patient_ref="TEST-MRN-0007")).encode()
    record = parse_packet(body, source(config, "MON-A-0001"), config, NOW_MS)
    sent = NOW_MS - 1000
    assert record == {
        "packet_id": "p-1",
        "device_id": "MON-A-0001",
        "device_type": "monitor-a",
        "organisation_id": "H001",
        "source_system": "h001-iot-gw",
        "patient_ref": "TEST-MRN-0007",
        "sent_time": sent,
        "samples": [
            {"metric": "HR", "value": 72.0, "unit": "bpm", "sample_time": sent - 15_000},
            {"metric": "SPO2", "value": 97.0, "unit": "%", "sample_time": sent},
            {"metric": "NIBP_SYS", "value": None, "unit": "mmHg", "sample_time": sent},
        ],
    }
    bound = parse_packet(
        json.dumps(json_packet("WB-0001", "w-1", sent_time="2026-11-03T08:00:00+08:00")).encode(),
        source(config, "WB-0001"),
        config,
        NOW_MS,
    )
    assert bound["organisation_id"] == "H002" and bound["patient_ref"] == "TEST-MRN-0001"
    assert bound["sent_time"] == iso_ms("2026-11-03T08:00:00+08:00")


def test_fhir_observation_and_bundle_become_raw_records(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    src = source(config, "MON-A-0001")
    record = parse_packet(json.dumps(fhir_observation("o1")).encode(), src, config, NOW_MS)
    effective = iso_ms("2026-11-03T08:00:00+00:00")
    assert record["packet_id"] == "pkt-o1"
    assert record["patient_ref"] == "TEST-MRN-0042"
    assert record["sent_time"] == iso_ms("2026-11-03T08:00:05+00:00")
    assert record["samples"] == [
        {"metric": "HR", "value": 64.0, "unit": "/min", "sample_time": effective},
        {"metric": "SPO2", "value": 98.0, "unit": "%", "sample_time": effective},
    ]
    bundle = parse_packet(json.dumps(fhir_bundle("b1")).encode(), src, config, NOW_MS)
    sample_time = iso_ms("2026-11-03T08:01:00+08:00")
    assert bundle["packet_id"] == "b1"
    assert bundle["patient_ref"] is None
    assert bundle["sent_time"] == iso_ms("2026-11-03T08:01:30+08:00")
    assert bundle["samples"] == [
        {"metric": "TEMP", "value": 37.2, "unit": "Cel", "sample_time": sample_time},
        {"metric": "9279-1", "value": None, "unit": "", "sample_time": sample_time},
    ]


def test_raw_records_fit_the_avro_contract_and_the_normaliser(tmp_path: Path) -> None:
    from streams.model import RawContext
    from streams.normalise import normalise
    from streams.pseudonym import Pseudonymiser
    from streams.terminology import load_terminology

    config = make_config(tmp_path)
    src = source(config, "MON-A-0001")
    subject = RAW_SUBJECT_BY_KIND["device"]
    encode = AvroSerializer(ManifestRegistry(), subject)
    decode = AvroDeserializer(ManifestRegistry(), subject)
    terminology = load_terminology()
    pseudonymiser = Pseudonymiser(b"test-only-pseudonym-key-0123456789")
    for body in (json_packet("MON-A-0001", "n-1"), fhir_observation("n-2")):
        record = parse_packet(json.dumps(body).encode(), src, config, NOW_MS)
        raw = decode(encode(record))
        ctx = RawContext("raw.device", 0, 1, NOW_MS)
        outcomes = normalise("device", raw, ctx, terminology, pseudonymiser, NOW_MS)
        assert len(outcomes) == len(record["samples"])
        statuses = [o.value["mapping_status"] for o in outcomes]  # type: ignore[union-attr]
        assert statuses == ["mapped"] * len(outcomes)


@pytest.mark.parametrize(
    ("mutate", "field", "reason"),
    [
        (lambda p: p.pop("samples"), "samples", "invalid_payload"),
        (lambda p: p.update(samples=[]), "samples", "invalid_payload"),
        (lambda p: p["samples"][1].update(value="high"), "samples.1.value", "invalid_payload"),
        (lambda p: p["samples"][0].update(metric=" "), "samples.0.metric", "invalid_payload"),
        (lambda p: p.update(sent_time=1_793_700_000), "sent_time", "invalid_payload"),
        (lambda p: p.update(sent_time="2026-11-03T08:00:00"), "sent_time", "invalid_payload"),
        (lambda p: p.update(sent_time=NOW_MS + 3_600_000), "sent_time", "invalid_payload"),
        (lambda p: p.update(colour="red"), "colour", "invalid_payload"),
        (lambda p: p.update(device_id="MON-A-9999"), "device_id", "device_mismatch"),
    ],
)
def test_invalid_json_packets_name_the_field(
    tmp_path: Path, mutate: Callable[[dict], Any], field: str, reason: str
) -> None:
    config = make_config(tmp_path)
    packet = json_packet("MON-A-0001", "bad-1")
    mutate(packet)
    with pytest.raises(PayloadError) as info:
        parse_packet(json.dumps(packet).encode(), source(config, "MON-A-0001"), config, NOW_MS)
    assert info.value.reason_code == reason
    assert info.value.as_json()["field"] == field


def test_invalid_bytes_and_fhir_are_rejected_with_their_field(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    src = source(config, "MON-A-0001")

    def field_of(body: bytes) -> str:
        with pytest.raises(PayloadError) as info:
            parse_packet(body, src, config, NOW_MS)
        return str(info.value.as_json()["field"])

    assert field_of(b"\xff\xfe") == "(payload)"
    assert field_of(b'{"packet_id": NaN}') == "(payload)"
    assert field_of(b"[1, 2]") == "(payload)"
    assert field_of(b'{"resourceType": "Patient"}') == "resourceType"
    observation = fhir_observation("o9")
    observation["status"] = "entered-in-error"
    assert field_of(json.dumps(observation).encode()) == "status"
    observation = fhir_observation("o9")
    observation["component"][1]["valueQuantity"]["value"] = "98"
    assert field_of(json.dumps(observation).encode()) == "component.1.valueQuantity.value"
    bundle = fhir_bundle("b9")
    bundle["entry"][1]["resource"]["effectiveDateTime"] = "yesterday"
    assert field_of(json.dumps(bundle).encode()) == "entry.1.resource.effectiveDateTime"
    bundle = fhir_bundle("b9", device_id="MON-B-0001")
    assert field_of(json.dumps(bundle).encode()) == "entry.1.resource.device.identifier.value"
    wristband = json_packet("WB-0001", "w-2", patient_ref="TEST-MRN-0999")
    with pytest.raises(PayloadError, match="bound") as info:
        parse_packet(json.dumps(wristband).encode(), source(config, "WB-0001"), config, NOW_MS)
    assert info.value.reason_code == "device_mismatch"


# --- helpers for the real things ----------------------------------------------------------




def post(
    port: int, device_id: str, body: Any, token: str | None = None, timeout: float = 20.0
) -> tuple[int, dict[str, str], dict[str, Any]]:
    """POST a packet; returns status, headers and the JSON answer."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", f"/devices/{device_id}/packets", data, headers)
        response = connection.getresponse()
        answer = response.read()
        return response.status, dict(response.getheaders()), json.loads(answer or b"{}")
    finally:
        connection.close()




@contextmanager
def running(collector: DeviceProducer) -> Iterator[DeviceProducer]:
    """Run a collector in a thread until the block ends; re-raise what it raised."""
    stop = threading.Event()
    failure: list[BaseException] = []

    def target() -> None:
        try:
            collector.run(stop)
        except BaseException as exc:  # handed to the test thread
            failure.append(exc)

    thread = threading.Thread(target=target, name="device-collector", daemon=True)
    thread.start()
    wait_for(lambda: collector.listening.is_set() or bool(failure) or not thread.is_alive(),
             what="the collector to listen")
    if failure:
        raise failure[0]
    try:
        yield collector
    finally:
        stop.set()
        thread.join(60)
        assert not thread.is_alive(), "collector did not stop"
    if failure:
        raise failure[0]


def published_packets(kafka: KafkaSettings, expected: int) -> dict[str, dict[str, Any]]:
    records = consume(kafka, [raw_topic("device")], expected)
    packets = {r.value["packet_id"]: r.value for r in records}
    assert len(records) == len(packets) == expected, sorted(packets)
    return packets


def ms(value: Any) -> int:
    """Epoch ms of a decoded timestamp-millis value."""
    return value if isinstance(value, int) else int(value.timestamp() * 1000)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Callable[[DeviceCollectorConfig], int]]:
    """Factory: start the real Mosquitto binary on the config's port with the password file
    and ACL generated from its registry, anonymous clients refused."""
    if not os.path.exists(MOSQUITTO):
        if SOURCE_REQUIRED:
            pytest.fail(f"{MOSQUITTO} is missing and MEDSTREAM_REQUIRE_SOURCES=1")
        pytest.skip(f"{MOSQUITTO} is not installed")
    processes: list[subprocess.Popen[bytes]] = []

    def start(config: DeviceCollectorConfig) -> int:
        assert config.mqtt is not None
        directory = tmp_path / f"mosquitto-{len(processes)}"
        auth = write_mosquitto_auth(config, directory)
        lines = [
            f"listener {config.mqtt.port} 127.0.0.1",
            "allow_anonymous false",
            f"password_file {auth.password_file}",
            f"acl_file {auth.acl_file}",
            "persistence false",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to user mosquitto and cannot read tmp
        conf = directory / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        log = (directory / "mosquitto.log").open("wb")
        process = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=log)
        processes.append(process)

        def accepting() -> bool:
            assert process.poll() is None, (directory / "mosquitto.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", config.mqtt.port), 0.2).close()  # type: ignore[union-attr]
                return True
            except OSError:
                return False

        wait_for(accepting, 10, "mosquitto to listen")
        return config.mqtt.port

    yield start
    for process in processes:
        process.terminate()
        process.wait(10)


def mqtt_config(tmp_path: Path, **overrides: Any) -> DeviceCollectorConfig:
    return make_config(
        tmp_path,
        mqtt={
            "port": free_port(),
            "username": "gateway",
            "password": GATEWAY_PASSWORD,
            "topics": {"monitor-b": "ward/beta/{device_id}/vitals"},
        },
        **overrides,
    )


def mqtt_publish(
    port: int, username: str | None, password: str | None, topic: str, payload: bytes
) -> str:
    """Publish one QoS 1 message as a device: ``ok``, ``refused: ...`` or the PUBACK reason."""
    import paho.mqtt.client as paho

    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2,
        client_id=f"test-{uuid.uuid4().hex[:8]}",
        protocol=paho.MQTTv5,
        reconnect_on_failure=False,
    )
    if username is not None:
        client.username_pw_set(username, password)
    connected = threading.Event()
    published = threading.Event()
    result: dict[str, str] = {}

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        result["connect"] = "ok" if not reason.is_failure else f"refused: {reason}"
        connected.set()

    def on_publish(_c: Any, _u: Any, _mid: Any, reason: Any, _p: Any) -> None:
        result["publish"] = "ok" if not reason.is_failure else str(reason)
        published.set()

    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect("127.0.0.1", port, keepalive=10)
    client.loop_start()
    try:
        assert connected.wait(10), "no CONNACK"
        if result["connect"] != "ok":
            return result["connect"]
        client.publish(topic, payload, qos=1)
        assert published.wait(10), "no PUBACK"
        return result["publish"]
    finally:
        client.disconnect()
        client.loop_stop()


class GatedProducer:
    """A real producer whose delivery reports wait until the gate opens (a stalled broker)."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self._inner = Producer(kafka.producer_config())
        self.gate = threading.Event()

    def list_topics(self, *args: Any, **kwargs: Any) -> Any:  # the counter asks the cluster id
        return self._inner.list_topics(*args, **kwargs)

    def produce(self, *args: Any, **kwargs: Any) -> None:
        self._inner.produce(*args, **kwargs)

    def poll(self, timeout: float = 0.0) -> int:
        if not self.gate.is_set():
            time.sleep(timeout)
            return 0
        return int(self._inner.poll(timeout))

    def flush(self, timeout: float = 30.0) -> int:
        self.gate.set()
        return int(self._inner.flush(timeout))

    def __len__(self) -> int:
        return len(self._inner)

    def __bool__(self) -> bool:  # RawPublisher tests `producer or Producer(...)`
        return True


# --- HTTP against the real broker ---------------------------------------------------------


@pytest.mark.integration
def test_http_json_and_fhir_packets_are_published_once_with_all_samples(
    kafka_factory: Callable[..., KafkaSettings], tmp_path: Path
) -> None:
    kafka = kafka_factory()
    config = make_config(tmp_path)
    collector = DeviceProducer(config, kafka, ManifestRegistry())
    now = int(time.time() * 1000)
    with running(collector):
        port = collector.http_port
        assert port is not None
        status, _, answer = post(port, "MON-A-0001", json_packet("MON-A-0001", "h-1", now),
                                 TOKENS["MON-A-0001"])
        assert (status, answer["samples"]) == (202, 3)
        status, _, _ = post(port, "MON-A-0001", fhir_observation("h-2"), TOKENS["MON-A-0001"])
        assert status == 202
        status, _, answer = post(port, "MON-A-0001", fhir_bundle("h-3"), TOKENS["MON-A-0001"])
        assert (status, answer["samples"]) == (202, 2)
        status, _, _ = post(port, "OX-0001", json_packet("OX-0001", "h-4", now),
                            TOKENS["OX-0001"])  # sha256 credential
        assert status == 202
        status, _, answer = post(port, "MON-A-0001", json_packet("MON-A-0001", "h-1", now),
                                 TOKENS["MON-A-0001"])
        assert (status, answer["status"]) == (200, "duplicate")
        packets = published_packets(kafka, 4)
        assert collector.metrics.read._value.get() == 5
        assert 0 <= collector.metrics.source_lag._value.get() < 60
    first = packets["h-1"]
    assert (first["device_id"], first["device_type"], first["organisation_id"]) == (
        "MON-A-0001", "monitor-a", "H001"
    )
    assert first["source_system"] == "h001-iot-gw" and ms(first["sent_time"]) == now
    assert [(s["metric"], s["value"], s["unit"]) for s in first["samples"]] == [
        ("HR", 72.0, "bpm"), ("SPO2", 97.0, "%"), ("NIBP_SYS", None, "mmHg")
    ]
    assert [s["metric"] for s in packets["pkt-h-2"]["samples"]] == ["HR", "SPO2"]
    assert packets["pkt-h-2"]["patient_ref"] == "TEST-MRN-0042"
    assert [s["metric"] for s in packets["h-3"]["samples"]] == ["TEMP", "9279-1"]
    assert packets["h-4"]["device_type"] == "oximeter-o"


@pytest.mark.integration
def test_http_refuses_missing_wrong_and_foreign_tokens(
    kafka_factory: Callable[..., KafkaSettings], tmp_path: Path
) -> None:
    kafka = kafka_factory()
    collector = DeviceProducer(make_config(tmp_path), kafka, ManifestRegistry())
    packet = json_packet("MON-A-0001", "u-1", int(time.time() * 1000))
    unauthorized = collector.metrics.failed("unauthorized")
    before = unauthorized._value.get()
    with running(collector):
        port = collector.http_port
        assert port is not None
        for token in (None, "wrong-token-synthetic-000", TOKENS["MON-B-0001"]):
            status, headers, answer = post(port, "MON-A-0001", packet, token)
            assert (status, answer["error"]) == (401, "unauthorized")
            assert headers["WWW-Authenticate"].startswith("Bearer")
        status, _, _ = post(port, "NOT-REGISTERED", packet, TOKENS["MON-A-0001"])
        assert status == 401
        assert consume(kafka, [raw_topic("device"), DLQ], 0, timeout_s=2) == []
    assert unauthorized._value.get() - before == 4


@pytest.mark.integration
def test_http_invalid_payload_is_400_and_a_dead_letter(
    kafka_factory: Callable[..., KafkaSettings], tmp_path: Path
) -> None:
    kafka = kafka_factory()
    collector = DeviceProducer(make_config(tmp_path), kafka, ManifestRegistry())
    bad = json_packet("MON-A-0001", "bad-1", int(time.time() * 1000))
    bad["samples"][1]["value"] = "ninety-seven"
    body = json.dumps(bad).encode()
    with running(collector):
        port = collector.http_port
        assert port is not None
        status, _, answer = post(port, "MON-A-0001", body, TOKENS["MON-A-0001"])
        assert status == 400
        assert (answer["error"], answer["field"]) == ("invalid_payload", "samples.1.value")
        mismatch = json_packet("MON-B-0001", "bad-2", int(time.time() * 1000))
        status, _, second = post(port, "MON-A-0001", mismatch, TOKENS["MON-A-0001"])
        assert (status, second["error"]) == (400, "device_mismatch")
        dead = consume(kafka, [DLQ], 2)
    assert consume(kafka, [raw_topic("device")], 0, timeout_s=1) == []
    by_id = {d.value["dlq_id"]: d.value for d in dead}
    assert len(by_id) == 2
    first = by_id[answer["dlq_id"]]
    assert (first["reason_code"], first["stage"], first["source_kind"]) == (
        "invalid_payload", "producer", "device"
    )
    assert "samples.1.value" in first["reason"]
    assert first["original_value"] == body and first["original_key"] == b"MON-A-0001"
    assert first["organisation_id"] == "H001"
    assert by_id[second["dlq_id"]]["reason_code"] == "device_mismatch"


@pytest.mark.integration
def test_http_oversize_body_is_413_and_a_fast_device_gets_429(
    kafka_factory: Callable[..., KafkaSettings], tmp_path: Path
) -> None:
    kafka = kafka_factory()
    config = make_config(tmp_path, per_device_rate={"packets_per_s": 0.05, "burst": 2})
    collector = DeviceProducer(config, kafka, ManifestRegistry())
    now = int(time.time() * 1000)
    huge = json_packet("MON-A-0001", "big-1", now)
    huge["samples"] *= 200
    assert len(json.dumps(huge)) > 4096
    with running(collector):
        port = collector.http_port
        assert port is not None
        status, _, too_large = post(port, "MON-A-0001", huge, TOKENS["MON-A-0001"])
        assert (status, too_large["error"]) == (413, "payload_too_large")
        status, _, _ = post(port, "MON-A-0001", json_packet("MON-A-0001", "r-1", now),
                            TOKENS["MON-A-0001"])
        assert status == 202  # the burst of 2 is used up by the two requests so far
        status, headers, answer = post(port, "MON-A-0001", json_packet("MON-A-0001", "r-2", now),
                                       TOKENS["MON-A-0001"])
        assert (status, answer.get("error")) == (429, "rate_limited"), (status, answer)
        assert int(headers["Retry-After"]) >= 1
        # Refused again in the same episode: answered, but no second dead letter.
        status, _, again = post(port, "MON-A-0001", json_packet("MON-A-0001", "r-2", now),
                                TOKENS["MON-A-0001"])
        assert status == 429 and "dlq_id" not in again
        status, _, _ = post(port, "MON-B-0001", json_packet("MON-B-0001", "r-3", now),
                            TOKENS["MON-B-0001"])
        assert status == 202  # the limit is per device
        packets = published_packets(kafka, 2)
        dead = consume(kafka, [DLQ], 2)
    assert set(packets) == {"r-1", "r-3"}
    by_id = {d.value["dlq_id"]: d.value for d in dead}
    assert set(by_id) == {too_large["dlq_id"], answer["dlq_id"]}
    oversize, limited = by_id[too_large["dlq_id"]], by_id[answer["dlq_id"]]
    # A record of each refusal of an authenticated device, without the body.
    assert (oversize["reason_code"], oversize["original_key"]) == (
        "payload_too_large", b"MON-A-0001"
    )
    assert f"{len(json.dumps(huge))} bytes" in oversize["reason"]
    assert "http.max_body_bytes (4096)" in oversize["reason"]
    assert (limited["reason_code"], limited["original_key"]) == ("rate_limited", b"MON-A-0001")
    assert "per_device_rate (0.05 packets/s, burst 2)" in limited["reason"]
    assert oversize["original_value"] == b"" and limited["original_value"] == b""
    assert oversize["organisation_id"] == limited["organisation_id"] == "H001"


@pytest.mark.integration
def test_http_back_pressure_answers_503_and_loses_no_accepted_packet(
    kafka_factory: Callable[..., KafkaSettings], tmp_path: Path
) -> None:
    kafka = kafka_factory()
    producer = GatedProducer(kafka)
    config = make_config(tmp_path, max_in_flight=1)
    collector = DeviceProducer(config, kafka, ManifestRegistry(), producer=producer)
    now = int(time.time() * 1000)
    token = TOKENS["MON-A-0001"]
    with running(collector), ThreadPoolExecutor(4) as pool:
        port = collector.http_port
        assert port is not None
        first = pool.submit(post, port, "MON-A-0001", json_packet("MON-A-0001", "bp-1", now),
                            token)
        wait_for(lambda: first.done() or (
            collector._publisher is not None and collector._publisher.in_flight == 1),
                 what="the first packet to be in flight")
        assert not first.done(), first.result()
        status, headers, answer = post(port, "MON-A-0001",
                                       json_packet("MON-A-0001", "bp-2", now), token)
        assert (status, answer["error"], headers["Retry-After"]) == (503, "busy", "1")
        assert not first.done()  # not answered before the broker acknowledged
        duplicate = pool.submit(post, port, "MON-A-0001",
                                json_packet("MON-A-0001", "bp-1", now), token)
        time.sleep(0.3)
        assert not duplicate.done()  # waits for the copy in flight
        producer.gate.set()
        assert first.result(20)[0] == 202
        assert duplicate.result(20)[:1] == (200,)
        status, _, _ = post(port, "MON-A-0001", json_packet("MON-A-0001", "bp-2", now), token)
        assert status == 202  # the retry after Retry-After
        parallel = [
            pool.submit(post, port, "MON-B-0001", json_packet("MON-B-0001", f"par-{n}", now),
                        TOKENS["MON-B-0001"])
            for n in range(12)
        ]
        outcomes = [future.result(20)[0] for future in parallel]
        assert set(outcomes) <= {202, 503}
        accepted = {f"par-{n}" for n, code in enumerate(outcomes) if code == 202}
        packets = published_packets(kafka, 2 + len(accepted))
    assert set(packets) == {"bp-1", "bp-2"} | accepted


# --- MQTT against the real Mosquitto and the real broker ------------------------------------


@pytest.mark.integration
def test_mqtt_packets_of_two_device_types_arrive_and_the_broker_refuses_strangers(
    kafka_factory: Callable[..., KafkaSettings],
    tmp_path: Path,
    mosquitto: Callable[[DeviceCollectorConfig], int],
) -> None:
    kafka = kafka_factory()
    config = mqtt_config(tmp_path)
    port = mosquitto(config)
    collector = DeviceProducer(config, kafka, ManifestRegistry())
    assert any("refuses anonymous" in finding for finding in collector.check())
    now = int(time.time() * 1000)
    topic_a = "devices/monitor-a/MON-A-0001/telemetry"
    topic_b = "ward/beta/MON-B-0001/vitals"
    with running(collector):
        # no anonymous publishing, no wrong passwords, no publishing as another device
        anonymous = mqtt_publish(port, None, None, topic_a, b"{}")
        assert anonymous.startswith("refused")
        wrong = mqtt_publish(port, "MON-A-0001", "wrong-password-synthetic", topic_a, b"{}")
        assert wrong.startswith("refused")
        forged = json.dumps(json_packet("MON-A-0001", "forged-1", now)).encode()
        foreign = mqtt_publish(port, "MON-B-0001", TOKENS["MON-B-0001"], topic_a, forged)
        assert foreign == "Not authorized"  # MQTT 5 PUBACK reason; the message is dropped
        assert mqtt_publish(port, "OX-0001", TOKENS["OX-0001"], topic_a, forged).startswith(
            "refused"
        )  # HTTP-only credential
        sent_a = json.dumps(json_packet("MON-A-0001", "m-1", now)).encode()
        packet_b = json_packet("MON-B-0001", "m-2", now)
        packet_b["samples"] = [{"metric": "TEMPF", "value": 98.6, "unit": "degF"}]
        assert mqtt_publish(port, "MON-A-0001", TOKENS["MON-A-0001"], topic_a, sent_a) == "ok"
        assert mqtt_publish(
            port, "MON-B-0001", TOKENS["MON-B-0001"], topic_b, json.dumps(packet_b).encode()
        ) == "ok"
        packets = published_packets(kafka, 2)
    assert set(packets) == {"m-1", "m-2"}
    assert packets["m-1"]["device_type"] == "monitor-a"
    assert len(packets["m-1"]["samples"]) == 3
    assert (packets["m-2"]["device_type"], packets["m-2"]["organisation_id"]) == (
        "monitor-b", "H002"
    )
    assert [(s["metric"], s["value"], s["unit"]) for s in packets["m-2"]["samples"]] == [
        ("TEMPF", 98.6, "degF")
    ]
    assert consume(kafka, [DLQ], 0, timeout_s=1) == []


@pytest.mark.integration
def test_mqtt_invalid_payload_becomes_a_dead_letter(
    kafka_factory: Callable[..., KafkaSettings],
    tmp_path: Path,
    mosquitto: Callable[[DeviceCollectorConfig], int],
) -> None:
    kafka = kafka_factory()
    config = mqtt_config(tmp_path)
    port = mosquitto(config)
    collector = DeviceProducer(config, kafka, ManifestRegistry())
    invalid = collector.metrics.failed("invalid_payload")
    before = invalid._value.get()
    topic = "devices/wearable-w/WB-0001/telemetry"
    with running(collector):
        assert mqtt_publish(port, "WB-0001", TOKENS["WB-0001"], topic, b"not json") == "ok"
        mismatch = json.dumps(json_packet("MON-A-0001", "x-1", int(time.time() * 1000)))
        assert mqtt_publish(port, "WB-0001", TOKENS["WB-0001"], topic, mismatch.encode()) == "ok"
        dead = consume(kafka, [DLQ], 2)
    assert sorted(d.value["reason_code"] for d in dead) == ["device_mismatch", "invalid_payload"]
    assert {d.value["original_key"] for d in dead} == {b"WB-0001"}
    assert {d.value["organisation_id"] for d in dead} == {"H002"}
    assert b"not json" in {d.value["original_value"] for d in dead}
    assert invalid._value.get() - before == 1
    assert consume(kafka, [raw_topic("device")], 0, timeout_s=1) == []


@pytest.mark.integration
def test_subprocess_collector_gets_packets_sent_while_the_gateway_was_down(
    kafka_factory: Callable[..., KafkaSettings],
    tmp_path: Path,
    mosquitto: Callable[[DeviceCollectorConfig], int],
) -> None:
    """`python -m medstream collect devices`: MQTT messages published while no gateway ran
    are waiting in the persistent session and arrive; HTTP works alongside."""
    kafka = kafka_factory()
    config = mqtt_config(tmp_path, http={"host": "127.0.0.1", "port": free_port()})
    port = mosquitto(config)
    now = int(time.time() * 1000)
    topic = "devices/monitor-a/MON-A-0001/telemetry"
    token = TOKENS["MON-A-0001"]
    with running(DeviceProducer(config, kafka, ManifestRegistry())):
        payload = json.dumps(json_packet("MON-A-0001", "s-1", now)).encode()
        assert mqtt_publish(port, "MON-A-0001", token, topic, payload) == "ok"
        published_packets(kafka, 1)
    # the gateway is down: the broker keeps these for its session
    for packet_id in ("s-2", "s-3"):
        payload = json.dumps(json_packet("MON-A-0001", packet_id, now)).encode()
        assert mqtt_publish(port, "MON-A-0001", token, topic, payload) == "ok"
    data = config.model_dump(mode="json")
    data["mqtt"]["password"] = "${TEST_DEVICE_GATEWAY_PASSWORD}"
    path = tmp_path / "devices.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "MEDSTREAM_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
        "MEDSTREAM_DATA_DIR": str(tmp_path / "data"),
        "TEST_DEVICE_GATEWAY_PASSWORD": GATEWAY_PASSWORD,
    }
    log_path = tmp_path / "collector.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "medstream", "collect", "devices", "--config", str(path)],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2],
        )
    try:
        http_port = config.http.port  # type: ignore[union-attr]

        def healthy() -> bool:
            assert process.poll() is None, log_path.read_text()
            try:
                connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=1)
                connection.request("GET", "/health")
                return connection.getresponse().status == 200
            except OSError:
                return False

        wait_for(healthy, 30, "the collector subprocess to be ready")
        status, _, _ = post(http_port, "MON-A-0001", fhir_bundle("s-4"), token)
        assert status == 202
        packets = published_packets(kafka, 4)  # s-1 from before, s-2 and s-3 waited, s-4
        assert set(packets) == {"s-1", "s-2", "s-3", "s-4"}
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
    assert code == 0, log_path.read_text()
    text = log_path.read_text()
    assert "TEST-MRN" not in text and token not in text  # no patient ids or secrets logged


@pytest.mark.integration
def test_mqtt_message_the_gateway_held_when_killed_is_delivered_after_restart(
    kafka_factory: Callable[..., KafkaSettings],
    tmp_path: Path,
    mosquitto: Callable[[DeviceCollectorConfig], int],
) -> None:
    """A gateway that cannot reach Kafka holds the message unacknowledged; after kill -9 the
    broker sends it again to the next gateway session, which publishes it exactly once."""
    kafka = kafka_factory()
    config = mqtt_config(tmp_path)
    port = mosquitto(config)
    data = config.model_dump(mode="json")
    data["mqtt"]["password"] = GATEWAY_PASSWORD
    path = tmp_path / "devices.yaml"
    path.write_text(yaml.safe_dump(data))
    metrics_port = free_port()
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",  # nothing listens: no acks
        "MEDSTREAM_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
        "MEDSTREAM_DATA_DIR": str(tmp_path / "data"),
    }
    log_path = tmp_path / "collector.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "medstream", "collect", "devices", "--config", str(path),
             "--metrics-port", str(metrics_port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2],
        )
    read_line = f'medstream_collector_records_read_total{{collector="{config.name}"}}'

    ready_line = f'medstream_ready{{component="collector-{config.name}"}}'

    def metric(line_start: str) -> float:
        assert process.poll() is None, log_path.read_text()
        try:
            connection = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=1)
            connection.request("GET", "/metrics")
            text = connection.getresponse().read().decode()
        except OSError:
            return -1.0
        found = [line.split()[-1] for line in text.splitlines() if line.startswith(line_start)]
        return float(found[0]) if found else 0.0

    topic = "devices/monitor-a/MON-A-0001/telemetry"
    payload = json.dumps(json_packet("MON-A-0001", "held-1", int(time.time() * 1000))).encode()
    try:
        wait_for(lambda: metric(ready_line) == 1.0, 30, "the collector subprocess to be ready")
        assert mqtt_publish(port, "MON-A-0001", TOKENS["MON-A-0001"], topic, payload) == "ok"
        wait_for(lambda: metric(read_line) == 1.0, 30, "the gateway to read the packet")
    finally:
        process.kill()
        process.wait(10)
    with running(DeviceProducer(config, kafka, ManifestRegistry())):
        packets = published_packets(kafka, 1)
    assert set(packets) == {"held-1"}


@pytest.mark.integration
def test_check_refuses_a_broker_that_allows_anonymous_clients(
    kafka_factory: Callable[..., KafkaSettings], tmp_path: Path
) -> None:
    """The machine's own Mosquitto on 1883 allows anonymous clients in development setups;
    check() must refuse to run against such a broker (skipped if it is not reachable)."""
    try:
        socket.create_connection(("127.0.0.1", 1883), 1).close()
    except OSError:
        if SOURCE_REQUIRED:
            pytest.fail("Mosquitto on 127.0.0.1:1883 is unreachable")
        pytest.skip("Mosquitto on 127.0.0.1:1883 is unreachable")
    from producers.devices import _probe_connect

    if _probe_connect("127.0.0.1", 1883, None, None) != "ok":
        pytest.skip("the local Mosquitto already refuses anonymous clients")
    config = make_config(
        tmp_path, mqtt={"port": 1883, "username": "gateway", "password": GATEWAY_PASSWORD}
    )
    with pytest.raises(ConfigError, match="accepts anonymous clients"):
        DeviceProducer(config, kafka_factory(), ManifestRegistry()).check()


# --- poison input, limits, rates and availability ---------------------------------------------


def test_http_body_limit_cannot_pass_the_kafka_record_limit(tmp_path: Path) -> None:
    assert make_config(tmp_path, http={"max_body_bytes": MAX_RECORD_BYTES}).http is not None
    with pytest.raises(ValidationError, match="max_body_bytes"):
        make_config(tmp_path, http={"max_body_bytes": 1_048_576})


def test_deeply_nested_json_is_a_payload_error_not_a_recursion_error(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(PayloadError, match="nested too deeply") as caught:
        parse_packet(deep, source(config, "MON-A-0001"), config, NOW_MS)
    assert caught.value.reason_code == "invalid_payload"


class _SlowLookupState(CollectorState):
    """Collector state whose packet-id lookup blocks for a while (a busy disk)."""

    def seen(self, namespace: str, key: str) -> str | None:
        time.sleep(0.3)
        return super().seen(namespace, key)


class _RecordingPublisher:
    """The AsyncPublisher surface the packet path uses, recording what was published."""

    def __init__(self, max_in_flight: int) -> None:
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.published: list[str] = []

    def try_reserve(self, count: int = 1) -> bool:
        if self.in_flight + count > self.max_in_flight:
            return False
        self.in_flight += count
        return True

    def release(self, count: int = 1) -> None:
        self.in_flight -= count

    async def publish(self, _key: str, record: dict[str, Any]) -> None:
        await asyncio.sleep(0.01)
        self.published.append(record["packet_id"])


def _offline_collector(
    tmp_path: Path, publisher: _RecordingPublisher, state: CollectorState
) -> DeviceProducer:
    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:1")
    collector = DeviceProducer(make_config(tmp_path), kafka, ManifestRegistry())
    collector._publisher = publisher  # type: ignore[assignment]
    collector._state = state
    return collector


def _record(config: DeviceCollectorConfig, packet_id: str) -> dict[str, Any]:
    body = json.dumps(json_packet("MON-A-0001", packet_id)).encode()
    return parse_packet(body, source(config, "MON-A-0001"), config, NOW_MS)


def test_packet_id_lookup_never_blocks_the_event_loop(tmp_path: Path) -> None:
    publisher = _RecordingPublisher(10)
    state = _SlowLookupState(tmp_path / "devices.sqlite")
    collector = _offline_collector(tmp_path, publisher, state)
    gaps: list[float] = []

    async def heartbeat(done: asyncio.Event) -> None:
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.01)
            gaps.append(time.monotonic() - last)
            last = time.monotonic()

    async def main() -> list[str]:
        collector._loop = asyncio.get_running_loop()
        done = asyncio.Event()
        beat = asyncio.create_task(heartbeat(done))
        outcomes = await asyncio.gather(
            collector._publish_packet(_record(collector.config, "slow-1"), wait=False),
            collector._publish_packet(_record(collector.config, "slow-2"), wait=False),
        )
        done.set()
        await beat
        return list(outcomes)

    outcomes = asyncio.run(main())
    state.close()
    assert outcomes == ["accepted", "accepted"]
    assert sorted(publisher.published) == ["slow-1", "slow-2"]
    assert max(gaps) < 0.2, f"the event loop stalled for {max(gaps):.2f} s"


def test_a_copy_arriving_while_the_first_waits_for_capacity_is_published_once(
    tmp_path: Path,
) -> None:
    publisher = _RecordingPublisher(1)
    state = CollectorState(tmp_path / "devices.sqlite")
    collector = _offline_collector(tmp_path, publisher, state)

    async def main() -> list[str]:
        collector._loop = asyncio.get_running_loop()
        assert publisher.try_reserve()  # the collector is at capacity for now
        record = _record(collector.config, "copy-1")
        first = asyncio.create_task(collector._publish_packet(dict(record), wait=True))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(collector._publish_packet(dict(record), wait=True))
        await asyncio.sleep(0.05)
        publisher.release()
        return list(await asyncio.gather(first, second))

    outcomes = asyncio.run(main())
    state.close()
    assert publisher.published == ["copy-1"]
    assert sorted(outcomes) == ["accepted", "duplicate"]


def test_an_unreachable_mqtt_broker_is_source_unavailable_not_a_config_error(
    tmp_path: Path,
) -> None:
    config = make_config(
        tmp_path,
        mqtt={"port": free_port(), "username": "gateway", "password": GATEWAY_PASSWORD},
    )
    collector = DeviceProducer(
        config, KafkaSettings(bootstrap_servers="127.0.0.1:1"), ManifestRegistry()
    )
    with pytest.raises(SourceUnavailable, match="cannot connect"):
        collector.check()
    with pytest.raises(SourceUnavailable, match="cannot reach MQTT broker"):
        with running(collector):
            pass


class _RawTooLargeProducer:
    """A real producer that refuses raw device records as Kafka does an oversize record."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self._inner = Producer(kafka.producer_config())

    def list_topics(self, *args: Any, **kwargs: Any) -> Any:  # the counter asks the cluster id
        return self._inner.list_topics(*args, **kwargs)

    def produce(self, topic: str, *args: Any, **kwargs: Any) -> None:
        if topic.endswith(raw_topic("device")):
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        self._inner.produce(topic, *args, **kwargs)

    def poll(self, timeout: float = 0.0) -> int:
        return int(self._inner.poll(timeout))

    def flush(self, timeout: float = 30.0) -> int:
        return int(self._inner.flush(timeout))

    def __len__(self) -> int:
        return len(self._inner)


@pytest.mark.integration
def test_http_poison_packets_get_json_answers_and_dead_letters(
    kafka_factory: Callable[..., KafkaSettings],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kafka = kafka_factory()
    config = make_config(tmp_path, http={"host": "127.0.0.1", "port": 0, "max_body_bytes": 262_144})
    collector = DeviceProducer(
        config, kafka, ManifestRegistry(), producer=_RawTooLargeProducer(kafka)
    )
    real_parse = parse_packet

    def parse_or_fail(payload: bytes, *args: Any) -> dict[str, Any]:
        if b"explode" in payload:
            raise RuntimeError("a bug")
        return real_parse(payload, *args)

    monkeypatch.setattr("producers.devices.parse_packet", parse_or_fail)
    now = int(time.time() * 1000)
    deep = b"[" * 50_000 + b"]" * 50_000
    with running(collector):
        port = collector.http_port
        assert port is not None
        token = TOKENS["MON-A-0001"]
        status, _, nested = post(port, "MON-A-0001", deep, token)
        assert (status, nested["error"]) == (400, "invalid_payload")
        assert "nested too deeply" in nested["message"]
        status, _, failed = post(port, "MON-A-0001", b'{"explode": 1}', token)
        assert (status, failed["error"]) == (500, "internal_error")
        status, _, large = post(port, "MON-A-0001", json_packet("MON-A-0001", "tl-1", now), token)
        assert (status, large["error"]) == (413, "record_too_large")
        dead = {d.value["dlq_id"]: d.value for d in consume(kafka, [DLQ], 3)}
    assert len(dead) == 3
    assert dead[nested["dlq_id"]]["original_value"] == deep
    assert dead[failed["dlq_id"]]["reason_code"] == "internal_error"
    assert dead[failed["dlq_id"]]["original_value"] == b'{"explode": 1}'
    assert dead[large["dlq_id"]]["reason_code"] == "record_too_large"


@pytest.mark.integration
def test_a_flooding_device_cannot_fill_the_dead_letter_topic(
    kafka_factory: Callable[..., KafkaSettings],
    tmp_path: Path,
    mosquitto: Callable[[DeviceCollectorConfig], int],
) -> None:
    # Review finding L15: every MQTT packet over the device's rate was dead-lettered with
    # its payload, so one device could fill the topic at the rate the limit exists to cap.
    kafka = kafka_factory()
    config = mqtt_config(tmp_path, per_device_rate={"packets_per_s": 0.01, "burst": 1})
    port = mosquitto(config)
    rate_limited = labelled(COLLECTOR_FAILED, config.name, "rate_limited")
    before = rate_limited._value.get()
    topic = "devices/wearable-w/WB-0001/telemetry"
    now = int(time.time() * 1000)
    collector = DeviceProducer(config, kafka, ManifestRegistry())
    collector._refusals = RefusalBudget(in_full=2, window_s=600.0)
    with running(collector):
        for n in range(9):  # one in the burst, then eight over the rate
            packet = json.dumps(json_packet("WB-0001", f"fl-{n}", now)).encode()
            assert mqtt_publish(port, "WB-0001", TOKENS["WB-0001"], topic, packet) == "ok"
        assert set(published_packets(kafka, 1)) == {"fl-0"}
        wait_for(lambda: rate_limited._value.get() - before == 8, 20, "eight refusals counted")
        wait_for(lambda: not collector._mqtt_tasks, 10, "every message to be settled")
    # Stopped: the window's held refusals were summarised in one dead letter.
    dead = [d.value for d in consume(kafka, [DLQ], 3, timeout_s=20, settle_s=2.0)]
    assert len(dead) == 3
    full = [d for d in dead if d["original_value"]]
    assert sorted(json.loads(d["original_value"])["packet_id"] for d in full) == ["fl-1", "fl-2"]
    [summary] = [d for d in dead if not d["original_value"]]
    assert (summary["reason_code"], summary["original_key"]) == ("rate_limited", b"WB-0001")
    assert summary["reason"].startswith("6 more refusals (rate_limited) of this sender")
    assert rate_limited._value.get() - before == 8  # each refusal once, the summary not again


@pytest.mark.integration
def test_mqtt_poison_and_excess_packets_are_dead_lettered_and_acknowledged(
    kafka_factory: Callable[..., KafkaSettings],
    tmp_path: Path,
    mosquitto: Callable[[DeviceCollectorConfig], int],
) -> None:
    kafka = kafka_factory()
    config = mqtt_config(tmp_path, per_device_rate={"packets_per_s": 0.01, "burst": 4})
    port = mosquitto(config)
    rate_limited = labelled(COLLECTOR_FAILED, config.name, "rate_limited")
    topic = "devices/wearable-w/WB-0001/telemetry"
    other = "devices/monitor-a/MON-A-0001/telemetry"
    now = int(time.time() * 1000)
    deep = b"[" * 2000 + b"]" * 2000  # within max_body_bytes, too deep for json.loads
    big = b"x" * 1_200_000
    collector = DeviceProducer(config, kafka, ManifestRegistry())
    with running(collector):
        for payload in (deep, big):
            assert mqtt_publish(port, "WB-0001", TOKENS["WB-0001"], topic, payload) == "ok"
        for n in range(4):  # two left in the burst: two published, two over the rate
            packet = json.dumps(json_packet("WB-0001", f"wb-{n}", now)).encode()
            assert mqtt_publish(port, "WB-0001", TOKENS["WB-0001"], topic, packet) == "ok"
        # Another device is not held up by the one over its rate.
        packet = json.dumps(json_packet("MON-A-0001", "ma-1", now)).encode()
        assert mqtt_publish(port, "MON-A-0001", TOKENS["MON-A-0001"], other, packet) == "ok"
        packets = published_packets(kafka, 3)
        dead = consume(kafka, [DLQ], 4)
        wait_for(lambda: not collector._mqtt_tasks, 10, "every message to be settled")
    assert set(packets) == {"wb-0", "wb-1", "ma-1"}
    reasons = sorted(d.value["reason_code"] for d in dead)
    assert reasons == ["invalid_payload", "payload_too_large", "rate_limited", "rate_limited"]
    assert rate_limited._value.get() == 2
    [too_large] = [d.value for d in dead if d.value["reason_code"] == "payload_too_large"]
    assert too_large["original_value"] == big[:MAX_DEAD_LETTER_BYTES]
    # Every message was acknowledged: a new session of the gateway gets none of them again.
    again = DeviceProducer(config, kafka, ManifestRegistry())
    with running(again):
        time.sleep(2)
    assert len(consume(kafka, [DLQ], 4, timeout_s=20)) == 4
    assert len(consume(kafka, [raw_topic("device")], 3, timeout_s=20)) == 3
