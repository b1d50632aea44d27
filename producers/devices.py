"""Device telemetry edge collector: an MQTT gateway and an HTTP ingestion endpoint.

Bedside monitors and wearables send packets of several samples, either to the MQTT broker
(Mosquitto; one topic per device, configurable per device type) or by HTTP POST to
``/devices/{device_id}/packets`` (a JSON packet, a FHIR R4 Observation or a Bundle of
Observations). Every packet becomes one ``DevicePacket`` raw record on ``raw.device``,
exactly as :func:`streams.normalise.normalise_device_packet` expects it.

Security: every device is in the registry (config ``devices:`` or the YAML file named by
``device_registry:``) with a hash of its own credential, never the credential itself. HTTP
asks for ``Authorization: Bearer <token>``; the MQTT broker itself refuses anonymous
clients and checks passwords and topics with the password file and ACL that
:func:`write_mosquitto_auth` generates from the same registry (a device may publish only to
its own topic). Make a credential hash with :func:`hash_device_token`::

    python -c "from producers.devices import hash_device_token; print(hash_device_token('TOKEN'))"

Delivery: an HTTP packet is answered 202 only after the broker acknowledged its raw
record; an MQTT message is acknowledged (PUBACK) only then, on a persistent session, so a
packet the gateway accepted is never lost when it dies. In-flight packets are bounded: HTTP
answers 503 (all devices) or 429 (one device above its rate) with Retry-After, MQTT stops
acknowledging, so the broker stops sending (MQTT 5 receive maximum). MQTT has no 429: a
device above its rate has the excess packets dead-lettered (``rate_limited``) rather than
throttled, which would hold receive-maximum slots every device shares; beyond a budget
per device (:class:`producers.base.RefusalBudget`) refusals are counted and summarised in
one dead letter per window instead, so a flooding device cannot fill the dead-letter topic.
A packet seen again (same device and packet id, within ``dedup_window_s``) is acknowledged,
not republished.
Invalid payloads get a 400 naming the field and, like invalid MQTT messages, a dead letter;
a packet that fails unexpectedly is dead-lettered too (``internal_error``, HTTP 500).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from producers.base import (
    MAX_RECORD_BYTES,
    AsyncPublisher,
    Collector,
    CollectorConfig,
    CollectorState,
    ConfigError,
    DeliveryFailed,
    RecordTooLarge,
    RefusalBudget,
    SourceUnavailable,
    run_async,
    wall_clock_ms,
)

log = logging.getLogger("medstream.collector.devices")

#: Iterations of PBKDF2-SHA512 in credential hashes made here (stored in each hash, so
#: older hashes keep working when this changes).
PBKDF2_ITERATIONS = 20_000
#: Namespace of the "already published" packet keys in the collector state.
SEEN_NAMESPACE = "packets"
#: Samples older than this are certainly a unit mistake (seconds sent as milliseconds).
EARLIEST_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_UCUM = "http://unitsofmeasure.org"
_DEVICE_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_PBKDF2_HASH = re.compile(r"^\$7\$(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$")
_SHA256_HASH = re.compile(r"^sha256:([0-9a-f]{64})$")
_PLACEHOLDER = re.compile(r"\{([^}]*)\}")
_OBSERVATION_STATUS = ("registered", "preliminary", "final", "amended", "corrected")
_IGNORED_BUNDLE_RESOURCES = frozenset({"Device", "DeviceMetric", "Patient"})
# CONNACK refusals that say "not now" rather than "not you": the gateway is restarted.
_TRANSIENT_REFUSALS = frozenset(
    {"Server unavailable", "Server busy", "Quota exceeded", "Connection rate exceeded"}
)


# --- credentials ----------------------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _pbkdf2_hash(secret: str, iterations: int) -> str:
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", secret.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${_b64(salt)}${_b64(digest)}"


def hash_device_token(token: str, iterations: int = PBKDF2_ITERATIONS) -> str:
    """The registry credential for a device token: Mosquitto's PBKDF2-SHA512 ``$7$`` format.

    The same hash serves the HTTP bearer token and the device's MQTT password (it goes into
    the generated Mosquitto password file as is). Tokens need at least 16 characters; make
    them with ``secrets.token_urlsafe(32)``.
    """
    if len(token) < 16:
        raise ValueError("a device token needs at least 16 characters")
    return _pbkdf2_hash(token, iterations)


def verify_device_token(token: str, credential: str) -> bool:
    """True when ``token`` matches a registry credential (``$7$...`` or ``sha256:<hex>``)."""
    sha256 = _SHA256_HASH.match(credential)
    if sha256 is not None:
        hex_digest = hashlib.sha256(token.encode("utf-8")).hexdigest()
        return hmac.compare_digest(hex_digest, sha256.group(1))
    pbkdf2 = _PBKDF2_HASH.match(credential)
    if pbkdf2 is None:
        return False
    try:
        salt = base64.b64decode(pbkdf2.group(2), validate=True)
        expected = base64.b64decode(pbkdf2.group(3), validate=True)
    except binascii.Error:
        return False
    digest = hashlib.pbkdf2_hmac("sha512", token.encode("utf-8"), salt, int(pbkdf2.group(1)))
    return hmac.compare_digest(digest, expected)


# --- configuration --------------------------------------------------------------------------


class DeviceEntry(BaseModel):
    """One registered device: its type, owner, optional patient binding and credential hash."""

    model_config = ConfigDict(extra="forbid")

    device_type: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    credential: str = Field(description="hash_device_token(token) or sha256:<hex> (HTTP only)")
    organisation_id: str | None = Field(default=None, min_length=1)
    patient_ref: str | None = Field(default=None, min_length=1)

    @field_validator("credential")
    @classmethod
    def _is_a_hash(cls, value: str) -> str:
        if _PBKDF2_HASH.match(value) is None and _SHA256_HASH.match(value) is None:
            raise ValueError(
                "must be a hash, never the token itself: hash_device_token(token) from "
                "producers.devices ('$7$...') or 'sha256:<64 hex digits>' (HTTP only)"
            )
        return value

    @property
    def mqtt_capable(self) -> bool:
        """Whether the credential can go into the Mosquitto password file."""
        return _PBKDF2_HASH.match(self.credential) is not None


def _check_topic_template(template: str) -> str:
    if "+" in template or "#" in template or template.startswith("$"):
        raise ValueError(f"topic {template!r}: no MQTT wildcards or '$' topics in a template")
    placeholders = _PLACEHOLDER.findall(template)
    unknown = sorted(set(placeholders) - {"device_type", "device_id"})
    if unknown:
        raise ValueError(f"topic {template!r}: unknown placeholder {{{unknown[0]}}}")
    if placeholders.count("device_id") != 1:
        raise ValueError(f"topic {template!r}: needs {{device_id}} exactly once")
    for level in template.split("/"):
        if "{device_id}" in level and level != "{device_id}":
            raise ValueError(f"topic {template!r}: {{device_id}} must be a whole topic level")
    return template


class MqttListener(BaseModel):
    """The MQTT gateway: which broker, as which user, and the topic of each device type."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    username: str = Field(min_length=1, description="the gateway's own broker user")
    password: SecretStr = Field(description="the gateway's broker password (use ${VAR})")
    client_id: str | None = Field(
        default=None, description="persistent session id (default medstream-NAME)"
    )
    topic: str = Field(
        default="devices/{device_type}/{device_id}/telemetry",
        description="topic template of every device type without its own entry in topics",
    )
    topics: dict[str, str] = Field(default_factory=dict, description="device_type -> template")
    qos: Literal[1] = 1
    receive_maximum: int = Field(
        default=100, ge=1, le=65535, description="unacknowledged messages the broker may send"
    )
    session_expiry_s: int = Field(
        default=86_400, ge=1, description="how long the broker keeps unacknowledged messages"
    )
    keepalive_s: int = Field(default=30, ge=5)

    @field_validator("topic")
    @classmethod
    def _valid_topic(cls, value: str) -> str:
        return _check_topic_template(value)

    @field_validator("topics")
    @classmethod
    def _valid_topics(cls, value: dict[str, str]) -> dict[str, str]:
        for template in value.values():
            _check_topic_template(template)
        return value


class HttpListener(BaseModel):
    """The HTTP ingestion endpoint."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8086, ge=0, le=65535, description="0 picks a free port")
    max_body_bytes: int = Field(
        default=262_144,
        ge=256,
        le=MAX_RECORD_BYTES,
        description="larger bodies get 413 (MQTT: a dead letter); at most what Kafka accepts",
    )
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After of 503 answers")


class RateLimit(BaseModel):
    """A per-device token bucket: sustained packets per second and burst size."""

    model_config = ConfigDict(extra="forbid")

    packets_per_s: float = Field(default=20.0, gt=0)
    burst: int = Field(default=100, ge=1)


class DeviceCollectorConfig(CollectorConfig):
    """Configuration of the device collector (kind ``devices``)."""

    mqtt: MqttListener | None = None
    http: HttpListener | None = None
    devices: dict[str, DeviceEntry] = Field(default_factory=dict, description="the registry")
    device_registry: Path | None = Field(
        default=None, description="YAML file with a top-level `devices:` registry mapping"
    )
    fhir_codes: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="device_type -> 'system|code' (or 'code') -> device metric code",
    )
    fhir_units: dict[str, str] = Field(
        default_factory=dict, description="UCUM code in FHIR -> the device's own unit"
    )
    max_in_flight: int = Field(default=1000, ge=1, description="packets awaiting broker acks")
    per_device_rate: RateLimit = Field(default_factory=RateLimit)
    max_samples_per_packet: int = Field(default=1000, ge=1)
    max_clock_skew_s: int = Field(default=300, ge=0, description="how far in the future")
    dedup_window_s: int = Field(default=86_400, ge=60, description="remember packet ids")

    @model_validator(mode="after")
    def _registry_and_listeners(self) -> DeviceCollectorConfig:
        if self.mqtt is None and self.http is None:
            raise ValueError("configure at least one listener: mqtt, http or both")
        if self.device_registry is not None:
            self.devices = {**self.devices, **_read_registry(self.device_registry, self.devices)}
        if not self.devices:
            raise ValueError("the device registry is empty: no device could send anything")
        for device_id in self.devices:
            if re.match(_DEVICE_ID, device_id) is None:
                raise ValueError(
                    f"device id {device_id!r}: letters, digits, '.', '_' and '-' only "
                    "(it is an MQTT user name and a topic level)"
                )
        if self.mqtt is not None and self.mqtt.username in self.devices:
            raise ValueError(f"mqtt.username {self.mqtt.username!r} is also a device id")
        return self

    def device_organisation(self, device: DeviceEntry) -> str:
        """The organisation a device's packets belong to."""
        return device.organisation_id or self.organisation_id

    def topic_for(self, device_type: str, device_id: str) -> str:
        """The MQTT topic one device publishes to."""
        assert self.mqtt is not None
        template = self.mqtt.topics.get(device_type, self.mqtt.topic)
        return template.replace("{device_type}", device_type).replace("{device_id}", device_id)

    def subscriptions(self) -> list[str]:
        """The topic filters the gateway subscribes to (one per registered device type)."""
        types = sorted({device.device_type for device in self.devices.values()})
        return sorted({self.topic_for(device_type, "+") for device_type in types})


def _read_registry(path: Path, inline: Mapping[str, DeviceEntry]) -> dict[str, DeviceEntry]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"device_registry {path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"device_registry {path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("devices"), dict):
        raise ValueError(f"device_registry {path}: expected a top-level `devices:` mapping")
    devices: dict[str, DeviceEntry] = {}
    for device_id, entry in data["devices"].items():
        if str(device_id) in inline:
            raise ValueError(f"device_registry {path}: {device_id} is also configured inline")
        try:
            devices[str(device_id)] = DeviceEntry.model_validate(entry)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(entry)'}: {err['msg']}"
                for err in exc.errors()
            )
            raise ValueError(f"device_registry {path}: devices.{device_id}: {problems}") from None
    return devices


# --- Mosquitto authentication files ----------------------------------------------------------


@dataclass(frozen=True)
class MosquittoAuth:
    """A generated Mosquitto password file and ACL file."""

    password_file: Path
    acl_file: Path


def mosquitto_password_file(config: DeviceCollectorConfig) -> str:
    """Mosquitto password file text: the gateway user and every MQTT-capable device."""
    if config.mqtt is None:
        raise ConfigError(f"{config.name}: no mqtt listener is configured")
    gateway = _pbkdf2_hash(config.mqtt.password.get_secret_value(), PBKDF2_ITERATIONS)
    lines = [f"{config.mqtt.username}:{gateway}"]
    lines += [
        f"{device_id}:{device.credential}"
        for device_id, device in sorted(config.devices.items())
        if device.mqtt_capable
    ]
    return "\n".join(lines) + "\n"


def mosquitto_acl(config: DeviceCollectorConfig) -> str:
    """Mosquitto ACL text: the gateway may read the device topics, each device may only
    write its own topic (devices with a sha256 credential are HTTP-only and get nothing)."""
    if config.mqtt is None:
        raise ConfigError(f"{config.name}: no mqtt listener is configured")
    lines = [
        f"# generated from the device registry of collector {config.name}; do not edit",
        f"user {config.mqtt.username}",
        *(f"topic read {subscription}" for subscription in config.subscriptions()),
    ]
    for device_id, device in sorted(config.devices.items()):
        if device.mqtt_capable:
            topic = config.topic_for(device.device_type, device_id)
            lines += ["", f"user {device_id}", f"topic write {topic}"]
    return "\n".join(lines) + "\n"


def write_mosquitto_auth(config: DeviceCollectorConfig, directory: Path) -> MosquittoAuth:
    """Write ``passwd`` and ``acl`` for Mosquitto (``password_file`` / ``acl_file`` with
    ``allow_anonymous false``) into ``directory``, readable by the owner only."""
    directory.mkdir(parents=True, exist_ok=True)
    auth = MosquittoAuth(directory / "passwd", directory / "acl")
    for path, text in (
        (auth.password_file, mosquitto_password_file(config)),
        (auth.acl_file, mosquitto_acl(config)),
    ):
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
    return auth


# --- payloads -------------------------------------------------------------------------------


class PayloadError(ValueError):
    """A packet the collector does not accept; names the offending fields."""

    def __init__(
        self, problems: list[tuple[str, str]], reason_code: str = "invalid_payload"
    ) -> None:
        self.problems = problems
        self.reason_code = reason_code
        super().__init__("; ".join(f"{field}: {message}" for field, message in problems))

    def as_json(self) -> dict[str, Any]:
        """The error body sent to the device."""
        return {
            "error": self.reason_code,
            "field": self.problems[0][0],
            "message": self.problems[0][1],
            "problems": [{"field": f, "message": m} for f, m in self.problems],
        }


def _epoch_ms(value: Any) -> int:
    """Epoch milliseconds from an integer or an ISO-8601 date-time with a timezone."""
    if isinstance(value, bool):
        raise ValueError("expected epoch milliseconds or an ISO-8601 date-time")
    if isinstance(value, int):
        ms = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(
                "expected epoch milliseconds or an ISO-8601 date-time with a timezone"
            ) from None
        if moment.tzinfo is None or len(value) <= 10:
            raise ValueError("an ISO-8601 date-time needs a time and a timezone (Z or +08:00)")
        ms = (moment - _EPOCH) // timedelta(milliseconds=1)
    else:
        raise ValueError("expected epoch milliseconds or an ISO-8601 date-time")
    if ms < EARLIEST_MS:
        raise ValueError("before 2000-01-01: epoch milliseconds expected (seconds sent?)")
    return ms


EpochMs = Annotated[int, BeforeValidator(_epoch_ms)]
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=128)]
Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class JsonSample(BaseModel):
    """One sample of a JSON packet; ``time`` defaults to the packet's ``sent_time``."""

    model_config = ConfigDict(extra="forbid")

    metric: Text
    value: Finite | None
    unit: Annotated[str, StringConstraints(strip_whitespace=True, max_length=32)]
    time: EpochMs | None = None


class JsonPacket(BaseModel):
    """The device collector's own JSON packet format."""

    model_config = ConfigDict(extra="forbid")

    packet_id: Text
    device_id: Text
    sent_time: EpochMs
    patient_ref: Text | None = None
    samples: list[JsonSample] = Field(min_length=1)


class _Fhir(BaseModel):
    # FHIR resources carry many elements the collector has no use for.
    model_config = ConfigDict(extra="allow")


class FhirCoding(_Fhir):
    """A FHIR Coding."""

    system: str | None = None
    code: str | None = None


class FhirCodeableConcept(_Fhir):
    """A FHIR CodeableConcept; at least one coding."""

    coding: list[FhirCoding] = Field(min_length=1)


class FhirQuantity(_Fhir):
    """A FHIR Quantity."""

    value: Finite | None = None
    unit: str | None = None
    system: str | None = None
    code: str | None = None


class FhirIdentifier(_Fhir):
    """A FHIR Identifier."""

    system: str | None = None
    value: str | None = None


class FhirReference(_Fhir):
    """A FHIR Reference (literal or by identifier)."""

    reference: str | None = None
    identifier: FhirIdentifier | None = None


class FhirPeriod(_Fhir):
    """A FHIR Period."""

    start: EpochMs | None = None


class FhirComponent(_Fhir):
    """A FHIR Observation.component."""

    code: FhirCodeableConcept
    valueQuantity: FhirQuantity | None = None
    dataAbsentReason: FhirCodeableConcept | None = None


class FhirObservation(_Fhir):
    """The parts of a FHIR R4 Observation that make device samples."""

    resourceType: Literal["Observation"]
    id: str | None = None
    identifier: list[FhirIdentifier] = Field(default_factory=list)
    status: Literal["registered", "preliminary", "final", "amended", "corrected"]
    code: FhirCodeableConcept
    subject: FhirReference | None = None
    device: FhirReference | None = None
    effectiveDateTime: EpochMs | None = None
    effectiveInstant: EpochMs | None = None
    effectivePeriod: FhirPeriod | None = None
    issued: EpochMs | None = None
    valueQuantity: FhirQuantity | None = None
    dataAbsentReason: FhirCodeableConcept | None = None
    component: list[FhirComponent] = Field(default_factory=list)

    @property
    def effective_ms(self) -> int | None:
        """When the observation was made, if the resource says."""
        if self.effectiveDateTime is not None:
            return self.effectiveDateTime
        if self.effectiveInstant is not None:
            return self.effectiveInstant
        return self.effectivePeriod.start if self.effectivePeriod is not None else None


class FhirBundleEntry(_Fhir):
    """A FHIR Bundle.entry."""

    resource: dict[str, Any]


class FhirBundle(_Fhir):
    """A FHIR R4 Bundle of Observations (Device and Patient entries are ignored)."""

    resourceType: Literal["Bundle"]
    id: str | None = None
    identifier: FhirIdentifier | None = None
    type: Literal["collection", "batch", "transaction", "message", "history"]
    timestamp: EpochMs | None = None
    entry: list[FhirBundleEntry] = Field(min_length=1)


def _problems(exc: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    found = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"])
        where = f"{prefix}{field}" if field else prefix.rstrip(".") or "(payload)"
        found.append((where, err["msg"]))
    return found


def _validate(model: type[Any], data: Any, prefix: str = "") -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise PayloadError(_problems(exc, prefix)) from None


@dataclass(frozen=True)
class PacketSource:
    """Who sent a packet, from its credential (HTTP) or topic (MQTT), and the registry."""

    device_id: str
    device: DeviceEntry
    organisation_id: str


def _shown(value: Any) -> str:
    """A resource type as sent when it is a short name, else only its shape."""
    if isinstance(value, str) and len(value) <= 64 and value.isprintable():
        return repr(value)
    return f"a {type(value).__name__} value"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_packet(
    payload: bytes,
    source: PacketSource,
    config: DeviceCollectorConfig,
    received_ms: int,
) -> dict[str, Any]:
    """Validate a JSON packet, FHIR Observation or FHIR Bundle; returns the raw DevicePacket.

    Raises :class:`PayloadError` naming every offending field (reason ``device_mismatch``
    when the payload speaks for another device or patient than the registry allows).
    """
    try:
        document = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise PayloadError([("(payload)", "not UTF-8 text")]) from None
    except ValueError as exc:
        raise PayloadError([("(payload)", f"not valid JSON ({exc})")]) from None
    except RecursionError:  # the JSON decoder recurses once per nesting level
        raise PayloadError([("(payload)", "JSON nested too deeply")]) from None
    if not isinstance(document, dict):
        raise PayloadError([("(payload)", "expected a JSON object")])
    resource_type = document.get("resourceType")
    if resource_type is None:
        packet = _from_json(document, source)
    elif resource_type == "Observation":
        packet = _from_fhir([(_validate(FhirObservation, document), "")], None, source, config)
    elif resource_type == "Bundle":
        packet = _from_bundle(_validate(FhirBundle, document), source, config)
    else:
        raise PayloadError(
            [("resourceType", f"{_shown(resource_type)}: only Observation and Bundle are accepted")]
        )
    _check_packet(packet, source, config, received_ms)
    return packet


def _from_json(document: dict[str, Any], source: PacketSource) -> dict[str, Any]:
    parsed: JsonPacket = _validate(JsonPacket, document)
    if parsed.device_id != source.device_id:
        raise PayloadError(
            [("device_id", f"{parsed.device_id!r} is not the authenticated device")],
            "device_mismatch",
        )
    return _raw_packet(
        parsed.packet_id,
        source,
        parsed.patient_ref,
        parsed.sent_time,
        [
            {
                "metric": sample.metric,
                "value": sample.value,
                "unit": sample.unit,
                "sample_time": sample.time if sample.time is not None else parsed.sent_time,
            }
            for sample in parsed.samples
        ],
    )


def _raw_packet(
    packet_id: str,
    source: PacketSource,
    patient_ref: str | None,
    sent_time: int,
    samples: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "packet_id": packet_id,
        "device_id": source.device_id,
        "device_type": source.device.device_type,
        "organisation_id": source.organisation_id,
        "source_system": "",  # set by _check_packet from the configuration
        "patient_ref": patient_ref,
        "sent_time": sent_time,
        "samples": samples,
    }


def _from_bundle(
    bundle: FhirBundle, source: PacketSource, config: DeviceCollectorConfig
) -> dict[str, Any]:
    observations: list[tuple[FhirObservation, str]] = []
    for index, entry in enumerate(bundle.entry):
        prefix = f"entry.{index}.resource."
        kind = entry.resource.get("resourceType")
        if not isinstance(kind, str):
            raise PayloadError([(f"{prefix}resourceType", "must be a resource type name")])
        if kind in _IGNORED_BUNDLE_RESOURCES:
            continue
        if kind != "Observation":
            raise PayloadError(
                [(f"{prefix}resourceType", f"{_shown(kind)}: a packet Bundle holds Observations")]
            )
        observations.append((_validate(FhirObservation, entry.resource, prefix), prefix))
    if not observations:
        raise PayloadError([("entry", "the Bundle holds no Observation")])
    packet_id = bundle.identifier.value if bundle.identifier is not None else None
    packet_id = (packet_id or bundle.id or "").strip()
    if not packet_id:
        raise PayloadError(
            [("identifier.value", "Bundle.identifier.value or Bundle.id is the packet id")]
        )
    return _from_fhir(observations, (packet_id, bundle.timestamp), source, config)


def _from_fhir(
    observations: list[tuple[FhirObservation, str]],
    bundle: tuple[str, int | None] | None,
    source: PacketSource,
    config: DeviceCollectorConfig,
) -> dict[str, Any]:
    codes = config.fhir_codes.get(source.device.device_type, {})
    patients: set[str] = set()
    samples: list[dict[str, Any]] = []
    issued: list[int] = []
    for observation, prefix in observations:
        _check_fhir_device(observation, prefix, source)
        subject = observation.subject
        if subject is not None and subject.identifier is not None and subject.identifier.value:
            patients.add(subject.identifier.value.strip())
        sample_time = observation.effective_ms or observation.issued
        if observation.issued is not None:
            issued.append(observation.issued)
        extra_values = sorted(
            k for k in (observation.model_extra or {}) if k.startswith("value")
        )
        if extra_values:
            raise PayloadError([(f"{prefix}{extra_values[0]}", "only valueQuantity is accepted")])
        found = []
        if observation.valueQuantity is not None or (
            observation.dataAbsentReason is not None and not observation.component
        ):
            found.append((observation.code, observation.valueQuantity, prefix))
        found += [
            (component.code, component.valueQuantity, f"{prefix}component.{index}.")
            for index, component in enumerate(observation.component)
            if component.valueQuantity is not None or component.dataAbsentReason is not None
        ]
        if not found:
            raise PayloadError(
                [(f"{prefix}valueQuantity", "no valueQuantity, component or dataAbsentReason")]
            )
        for concept, quantity, where in found:
            samples.append(
                {
                    "metric": _metric(concept, codes, where),
                    "value": quantity.value if quantity is not None else None,
                    "unit": _unit(quantity, config.fhir_units),
                    "sample_time": sample_time,
                }
            )
    if len(patients) > 1:
        raise PayloadError(
            [("subject.identifier.value", "the Observations name different patients")]
        )
    if bundle is not None:
        packet_id, sent_time = bundle[0], bundle[1]
    else:
        observation = observations[0][0]
        ids = [i.value.strip() for i in observation.identifier if i.value and i.value.strip()]
        packet_id = ids[0] if ids else (observation.id or "").strip()
        if not packet_id:
            raise PayloadError(
                [("identifier.0.value", "Observation.identifier or .id is the packet id")]
            )
        sent_time = None
    times = [s["sample_time"] for s in samples if s["sample_time"] is not None]
    if sent_time is None:
        sent_time = max(issued) if issued else max(times) if times else None
    if sent_time is None:
        raise PayloadError(
            [("effectiveDateTime", "no time: give effective[x], issued or Bundle.timestamp")]
        )
    for sample in samples:
        if sample["sample_time"] is None:
            sample["sample_time"] = sent_time
    return _raw_packet(packet_id, source, patients.pop() if patients else None, sent_time, samples)


def _check_fhir_device(observation: FhirObservation, prefix: str, source: PacketSource) -> None:
    reference = observation.device
    if reference is None:
        return
    named = None
    if reference.identifier is not None and reference.identifier.value:
        named, field = reference.identifier.value.strip(), "device.identifier.value"
    elif reference.reference and reference.reference.startswith("Device/"):
        named, field = reference.reference.removeprefix("Device/"), "device.reference"
    if named is not None and named != source.device_id:
        raise PayloadError(
            [(f"{prefix}{field}", f"{named!r} is not the authenticated device")], "device_mismatch"
        )


def _metric(concept: FhirCodeableConcept, codes: Mapping[str, str], where: str) -> str:
    for coding in concept.coding:
        if coding.code:
            mapped = codes.get(f"{coding.system}|{coding.code}") or codes.get(coding.code)
            if mapped:
                return mapped
    for coding in concept.coding:
        if coding.code and coding.code.strip():
            return coding.code.strip()  # unmapped: carried as is, the normaliser flags it
    raise PayloadError([(f"{where}code.coding", "no coding with a code")])


def _unit(quantity: FhirQuantity | None, units: Mapping[str, str]) -> str:
    if quantity is None:
        return ""
    if quantity.code and quantity.system in (None, _UCUM):
        return units.get(quantity.code, quantity.code)
    return (quantity.unit or quantity.code or "").strip()


def _check_packet(
    packet: dict[str, Any], source: PacketSource, config: DeviceCollectorConfig, received_ms: int
) -> None:
    packet["source_system"] = config.source_system
    samples = packet["samples"]
    if len(samples) > config.max_samples_per_packet:
        raise PayloadError(
            [("samples", f"{len(samples)} samples, at most {config.max_samples_per_packet}")]
        )
    latest = received_ms + config.max_clock_skew_s * 1000
    problems = []
    if packet["sent_time"] > latest:
        problems.append(("sent_time", "in the future (check the device clock)"))
    for index, sample in enumerate(samples):
        if not sample["metric"]:
            problems.append((f"samples.{index}.metric", "empty"))
        if sample["sample_time"] > latest:
            problems.append((f"samples.{index}.time", "in the future (check the device clock)"))
        value = sample["value"]
        if value is not None and not math.isfinite(value):
            problems.append((f"samples.{index}.value", "not a finite number"))
    if problems:
        raise PayloadError(problems)
    bound = source.device.patient_ref
    if bound is not None:
        if packet["patient_ref"] not in (None, bound):
            raise PayloadError(
                [("patient_ref", "differs from the patient the device is bound to")],
                "device_mismatch",
            )
        packet["patient_ref"] = bound


# --- per-device rate ------------------------------------------------------------------------


class TokenBucket:
    """A token bucket: ``rate`` tokens per second up to ``burst``."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.updated = time.monotonic()

    def take(self) -> float:
        """Take one token; returns 0.0, or the seconds to wait when there is none."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


# --- the collector --------------------------------------------------------------------------


@dataclass
class _HttpAttempt:
    """What an HTTP request got as far as, for the dead letter of an unexpected failure."""

    source: PacketSource | None = None
    body: bytes = b""


class DeviceProducer(Collector[DeviceCollectorConfig]):
    """Device telemetry collector: MQTT gateway and HTTP endpoint -> ``raw.device``."""

    kind = "devices"
    source_kind = "device"
    config_model = DeviceCollectorConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Set once every configured listener accepts packets.
        self.listening = threading.Event()
        #: The bound HTTP port (useful with port 0), once listening.
        self.http_port: int | None = None
        self._topics = self._topic_patterns()
        self._buckets: dict[str, TokenBucket] = {}
        #: Devices whose last HTTP packet was refused with 429 (one dead letter per episode).
        self._http_rate_limited: set[str] = set()
        #: Bounds the dead letters a known device's refusals make (MQTT too fast, too large).
        self._refusals = RefusalBudget()
        self._verified: dict[str, bytes] = {}  # device_id -> sha256 of its verified token
        self._pending: dict[str, asyncio.Future[bool]] = {}
        self._mqtt_tasks: set[asyncio.Task[None]] = set()
        self._fatal: BaseException | None = None  # a handler died: the collector exits
        self._stopping = False
        self._newest_sent_ms: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._publisher: AsyncPublisher | None = None
        self._state: CollectorState | None = None

    # -- configuration checks ----------------------------------------------------------------

    def check(self) -> list[str]:
        """Check the MQTT broker: the gateway user may connect, anonymous clients may not."""
        config = self.config
        types = sorted({d.device_type for d in config.devices.values()})
        findings = [f"registry: {len(config.devices)} devices of types {', '.join(types)}"]
        if config.http is not None:
            findings.append(f"http: packets on {config.http.host}:{config.http.port}")
        if config.mqtt is None:
            return findings
        mqtt = config.mqtt
        where = f"MQTT broker {mqtt.host}:{mqtt.port}"
        gateway = _probe_connect(mqtt.host, mqtt.port, mqtt.username, mqtt.password)
        if gateway != "ok":
            if _unavailable(gateway):
                raise SourceUnavailable(f"{config.name}: {where}: {gateway}")
            raise ConfigError(f"{config.name}: {where} refused the gateway user: {gateway}")
        if _probe_connect(mqtt.host, mqtt.port, None, None) == "ok":
            raise ConfigError(
                f"{config.name}: {where} accepts anonymous clients; set `allow_anonymous "
                "false` with the password_file and acl_file from write_mosquitto_auth()"
            )
        findings.append(f"mqtt: {where} refuses anonymous clients; gateway user accepted")
        return findings

    # -- running -----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Serve the configured listeners until ``stop`` is set, then drain and flush."""
        run_async(self._main, stop)

    async def _main(self, stop: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._publisher = AsyncPublisher(self.publisher, self.config.max_in_flight)
        self._publisher.start()
        self._state = CollectorState(self.state_dir / "devices.sqlite")
        runner = None
        client = None
        try:
            if self.config.http is not None:
                runner = await self._start_http(self.config.http)
            if self.config.mqtt is not None:
                client = await self._start_mqtt(self.config.mqtt)
            self.metrics.ready.set(1)
            self.listening.set()
            log.info("%s: listening", self.config.name)
            await self._serve_until(stop)
        finally:
            self.metrics.ready.set(0)
            self._stopping = True
            if runner is not None:
                await runner.cleanup()  # stops accepting, waits for requests in flight
            if client is not None:
                await self._stop_mqtt(client)
            await self._refusals.dead_letter_due(
                self._publisher, self.config.name, self.config.organisation_id, final=True
            )
            unacknowledged = await self._publisher.close()
            if unacknowledged:
                log.error("%s: %d records unacknowledged at exit", self.config.name, unacknowledged)
            self._state.close()
            self.listening.clear()

    async def _serve_until(self, stop: threading.Event) -> None:
        next_prune = next_summary = 0.0
        while not stop.is_set():
            await asyncio.sleep(0.1)
            if self._fatal is not None:
                # A message left unanswered by a dead handler would stall its sender: exit
                # non-zero, and the broker sends it again to the restarted gateway.
                raise RuntimeError(
                    f"{self.config.name}: an MQTT message handler failed"
                ) from self._fatal
            if self._newest_sent_ms is not None:
                self.metrics.source_lag.set((wall_clock_ms() - self._newest_sent_ms) / 1000)
            if time.monotonic() >= next_summary:
                next_summary = time.monotonic() + 1
                assert self._publisher is not None
                await self._refusals.dead_letter_due(
                    self._publisher, self.config.name, self.config.organisation_id
                )
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + 60
                cutoff = wall_clock_ms() - self.config.dedup_window_s * 1000
                assert self._state is not None
                await asyncio.to_thread(self._state.forget_older_than, SEEN_NAMESPACE, cutoff)

    # -- shared packet path -------------------------------------------------------------------

    def _source(self, device_id: str) -> PacketSource | None:
        device = self.config.devices.get(device_id)
        if device is None:
            return None
        return PacketSource(device_id, device, self.config.device_organisation(device))

    async def _reserve(self, wait: bool) -> bool:
        assert self._publisher is not None
        while not self._publisher.try_reserve():
            if not wait or self._stopping:
                return False
            await asyncio.sleep(0.02)
        return True

    async def _publish_packet(self, record: dict[str, Any], wait: bool) -> str:
        """Publish one raw packet once: ``accepted``, ``duplicate``, ``too_large`` (no
        Kafka record can hold it), ``busy`` or ``failed``."""
        assert self._publisher is not None and self._state is not None
        assert self._loop is not None
        key = f"{record['device_id']}:{record['packet_id']}"
        earlier = self._pending.get(key)
        if earlier is not None:  # the same packet is being published right now
            return "duplicate" if await asyncio.shield(earlier) else "busy"
        # Pending before anything is awaited, so a copy arriving meanwhile waits for this
        # one instead of being published too.
        outcome: asyncio.Future[bool] = self._loop.create_future()
        self._pending[key] = outcome
        try:
            # SQLite off the event loop: its fsyncs must not stall every other packet.
            if await asyncio.to_thread(self._state.seen, SEEN_NAMESPACE, key) is not None:
                outcome.set_result(True)
                return "duplicate"
            if not await self._reserve(wait):
                return "busy"
            try:
                await self._publisher.publish(record["device_id"], record)
                await asyncio.to_thread(self._state.remember, SEEN_NAMESPACE, key)
            except RecordTooLarge:
                return "too_large"
            except DeliveryFailed:
                return "failed"
            finally:
                self._publisher.release()
            outcome.set_result(True)
        finally:
            if not outcome.done():
                outcome.set_result(False)
            del self._pending[key]
        sent = record["sent_time"]
        if self._newest_sent_ms is None or sent > self._newest_sent_ms:
            self._newest_sent_ms = sent
        self.metrics.source_lag.set((wall_clock_ms() - self._newest_sent_ms) / 1000)
        return "accepted"

    async def _dead_letter(
        self,
        reason_code: str,
        reason: str,
        payload: bytes,
        organisation_id: str,
        device_id: str | None,
        received_ms: int,
        wait: bool,
        refusal: str | None = None,
        count_failure: bool = True,
    ) -> str | None:
        """Publish a dead letter; its id, or None when there is no capacity or it failed.

        ``refusal`` tells apart refusals whose payload is not kept (see Publisher.dead_letter).
        """
        assert self._publisher is not None
        if not await self._reserve(wait):
            return None
        try:
            return await self._publisher.dead_letter(
                reason_code,
                reason,
                payload,
                organisation_id=organisation_id,
                original_key=device_id.encode() if device_id else None,
                received_ms=received_ms,
                refusal=refusal,
                count_failure=count_failure,
            )
        except DeliveryFailed:
            return None
        finally:
            self._publisher.release()

    # -- HTTP ----------------------------------------------------------------------------------

    async def _start_http(self, http: HttpListener) -> Any:
        from aiohttp import web

        app = web.Application(client_max_size=http.max_body_bytes)
        app.router.add_post("/devices/{device_id}/packets", self._http_packet)
        app.router.add_get("/health", self._http_health)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=30.0)
        await runner.setup()
        site = web.TCPSite(runner, http.host, http.port)
        await site.start()
        self.http_port = int(runner.addresses[0][1])
        log.info("%s: HTTP on %s:%d", self.config.name, http.host, self.http_port)
        return runner

    async def _http_health(self, _request: Any) -> Any:
        from aiohttp import web

        ready = self.listening.is_set() and not self._stopping
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def _authenticate(self, device_id: str, authorization: str | None) -> PacketSource | None:
        source = self._source(device_id)
        if source is None or not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        known = self._verified.get(device_id)
        if known is not None and hmac.compare_digest(known, digest):
            return source
        if not await asyncio.to_thread(verify_device_token, token, source.device.credential):
            return None
        self._verified[device_id] = digest  # PBKDF2 once per token, not once per packet
        return source

    def _bucket(self, device_id: str) -> TokenBucket:
        bucket = self._buckets.get(device_id)
        if bucket is None:
            rate = self.config.per_device_rate
            bucket = self._buckets[device_id] = TokenBucket(rate.packets_per_s, rate.burst)
        return bucket

    async def _http_packet(self, request: Any) -> Any:
        """POST /devices/{device_id}/packets; an unexpected failure is dead-lettered
        (``internal_error``) and answered 500 with a JSON body, never left to aiohttp."""
        from aiohttp import web

        received = wall_clock_ms()
        attempt = _HttpAttempt()
        try:
            return await self._http_packet_checked(request, received, attempt)
        except web.HTTPException:
            raise
        except Exception as exc:
            log.exception("%s: an HTTP packet failed unexpectedly", self.config.name)
            answer: dict[str, Any] = {
                "error": "internal_error",
                "message": "the collector failed to handle this packet; it was not accepted",
            }
            source = attempt.source
            with contextlib.suppress(Exception):
                answer["dlq_id"] = await self._dead_letter(
                    "internal_error",
                    f"the collector failed to handle this packet ({type(exc).__name__})",
                    attempt.body,
                    source.organisation_id if source else self.config.organisation_id,
                    source.device_id if source else None,
                    received,
                    wait=False,
                )
            return web.json_response(answer, status=500)

    async def _http_packet_checked(
        self, request: Any, received: int, attempt: _HttpAttempt
    ) -> Any:
        from aiohttp import web

        assert self.config.http is not None
        http = self.config.http
        retry = {"Retry-After": str(http.retry_after_s)}
        source = await self._authenticate(
            request.match_info["device_id"], request.headers.get("Authorization")
        )
        attempt.source = source
        if source is None:
            # Counted, never dead-lettered: the sender is unknown, and writing what it
            # sends would let anyone fill the dead-letter topic.
            self.metrics.failed("unauthorized").inc()
            return web.json_response(
                {"error": "unauthorized", "message": "a registered device's token is needed"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="medstream-devices"'},
            )
        wait_s = self._bucket(source.device_id).take()
        if wait_s > 0:
            return await self._http_rate_limited_answer(
                source, request.content_length, wait_s, received
            )
        self._http_rate_limited.discard(source.device_id)
        if request.content_length is not None and request.content_length > http.max_body_bytes:
            return await self._http_too_large_answer(source, request.content_length, received)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return await self._http_too_large_answer(source, None, received)
        attempt.body = body
        self.metrics.read.inc()
        try:
            record = parse_packet(body, source, self.config, received)
        except PayloadError as error:
            dlq_id = await self._dead_letter(
                error.reason_code,
                str(error),
                body,
                source.organisation_id,
                source.device_id,
                received,
                wait=False,
            )
            if dlq_id is None:
                return web.json_response({"error": "busy"}, status=503, headers=retry)
            log.info("%s: packet from %s dead-lettered (%s)", self.config.name,
                     source.device_id, error.reason_code)
            return web.json_response({**error.as_json(), "dlq_id": dlq_id}, status=400)
        outcome = await self._publish_packet(record, wait=False)
        if outcome == "accepted":
            body_out = {"status": "accepted", "packet_id": record["packet_id"],
                        "samples": len(record["samples"])}
            return web.json_response(body_out, status=202)
        if outcome == "duplicate":
            return web.json_response(
                {"status": "duplicate", "packet_id": record["packet_id"]}, status=200
            )
        if outcome == "too_large":
            reason = "the packet's raw record is larger than a Kafka record may be"
            dlq_id = await self._dead_letter(
                "record_too_large", reason, body, source.organisation_id, source.device_id,
                received, wait=False,
            )
            if dlq_id is None:
                return web.json_response({"error": "busy"}, status=503, headers=retry)
            return web.json_response(
                {"error": "record_too_large", "message": f"{reason}; send fewer samples",
                 "dlq_id": dlq_id},
                status=413,
            )
        message = "collector busy" if outcome == "busy" else "broker did not acknowledge"
        return web.json_response({"error": outcome, "message": message}, status=503, headers=retry)

    async def _http_too_large_answer(
        self, source: PacketSource, size: int | None, received: int
    ) -> Any:
        """413, and a dead letter of the refusal (device, size; never the oversized body).

        The device is authenticated, so the refusal is recorded for reconcile and operators;
        the body is not kept: it is over the limit that bounds what the collector stores.
        """
        from aiohttp import web

        assert self.config.http is not None
        limit = self.config.http.max_body_bytes
        self.metrics.failed("payload_too_large").inc()
        sent = f"{size} bytes" if size is not None else f"more than {limit} bytes"
        reason = (
            f"HTTP packet of {sent} refused with 413: larger than http.max_body_bytes "
            f"({limit}); the body is not kept"
        )
        dlq_id = None
        if self._refusals.admit(
            source.device_id, "payload_too_large", received, source.organisation_id
        ):
            dlq_id = await self._dead_letter(
                "payload_too_large", reason, b"", source.organisation_id, source.device_id,
                received, wait=False, refusal=f"{source.device_id}@{received}:{sent}",
                count_failure=False,  # counted above, with the refusals not kept
            )
        return web.json_response(
            {"error": "payload_too_large", "message": f"at most {limit} bytes",
             "dlq_id": dlq_id},
            status=413,
        )

    async def _http_rate_limited_answer(
        self, source: PacketSource, size: int | None, wait_s: float, received: int
    ) -> Any:
        """429, and a dead letter when a device starts being refused.

        The device is told to retry (Retry-After), so each refused packet is not lost; one
        dead letter per episode (until a packet of the device is let through again) tells
        operators and reconcile that it was held back, while a device that keeps sending
        too fast cannot fill the dead-letter topic at the rate the limit exists to cap.
        """
        from aiohttp import web

        self.metrics.failed("rate_limited").inc()
        answer: dict[str, Any] = {
            "error": "rate_limited", "message": "this device sends faster than allowed",
        }
        new_episode = source.device_id not in self._http_rate_limited
        self._http_rate_limited.add(source.device_id)
        # One dead letter per episode, and episodes within the refusal budget too.
        if new_episode and self._refusals.admit(
            source.device_id, "rate_limited", received, source.organisation_id
        ):
            rate = self.config.per_device_rate
            sent = f"{size} bytes" if size is not None else "a body of unknown length"
            answer["dlq_id"] = await self._dead_letter(
                "rate_limited",
                f"HTTP packets refused with 429 from this one ({sent}) on: the device sends "
                f"faster than per_device_rate ({rate.packets_per_s:g} packets/s, burst "
                f"{rate.burst}); it was told to retry, and the bodies are not kept",
                b"", source.organisation_id, source.device_id, received, wait=False,
                refusal=f"{source.device_id}@{received}", count_failure=False,
            )
        return web.json_response(
            answer, status=429, headers={"Retry-After": str(max(1, math.ceil(wait_s)))}
        )

    # -- MQTT ----------------------------------------------------------------------------------

    def _topic_patterns(self) -> list[re.Pattern[str]]:
        if self.config.mqtt is None:
            return []
        patterns = []
        for subscription in self.config.subscriptions():
            levels = [
                "(?P<device_id>[^/]+)" if level == "+" else re.escape(level)
                for level in subscription.split("/")
            ]
            patterns.append(re.compile("^" + "/".join(levels) + "$"))
        return patterns

    def _source_for_topic(self, topic: str) -> PacketSource | None:
        for pattern in self._topics:
            match = pattern.match(topic)
            if match is None:
                continue
            source = self._source(match.group("device_id"))
            if source is not None and self.config.topic_for(
                source.device.device_type, source.device_id
            ) == topic:
                return source
        return None

    async def _start_mqtt(self, mqtt: MqttListener) -> Any:
        import paho.mqtt.client as paho
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties
        from paho.mqtt.subscribeoptions import SubscribeOptions

        loop = asyncio.get_running_loop()
        connected: asyncio.Future[str] = loop.create_future()
        subscriptions = self.config.subscriptions()

        def settle(result: str) -> None:
            if not connected.done():
                connected.set_result(result)

        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=mqtt.client_id or f"medstream-{self.config.name}",
            protocol=paho.MQTTv5,
            manual_ack=True,
        )
        client.username_pw_set(mqtt.username, mqtt.password.get_secret_value())
        client.reconnect_delay_set(1, 30)

        def on_connect(c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if reason.is_failure:
                log.error("%s: MQTT broker refused the gateway: %s", self.config.name, reason)
                loop.call_soon_threadsafe(settle, f"refused: {reason}")
                return
            c.subscribe([(s, SubscribeOptions(qos=mqtt.qos)) for s in subscriptions])

        def on_subscribe(_c: Any, _u: Any, _mid: Any, reasons: Any, _p: Any) -> None:
            denied = [s for s, r in zip(subscriptions, reasons, strict=False) if r.is_failure]
            result = f"subscription refused for {', '.join(denied)}" if denied else "ok"
            loop.call_soon_threadsafe(settle, result)

        def on_message(_c: Any, _u: Any, message: Any) -> None:
            loop.call_soon_threadsafe(self._spawn_mqtt, client, message)

        def on_disconnect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if not self._stopping:
                log.warning("%s: MQTT connection lost (%s); reconnecting", self.config.name,
                            reason)

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        client.on_disconnect = on_disconnect
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = mqtt.session_expiry_s
        properties.ReceiveMaximum = mqtt.receive_maximum
        where = f"MQTT broker {mqtt.host}:{mqtt.port}"
        try:
            await asyncio.to_thread(
                client.connect, mqtt.host, mqtt.port, mqtt.keepalive_s, clean_start=False,
                properties=properties,
            )
        except OSError as exc:
            raise SourceUnavailable(f"{self.config.name}: cannot reach {where} ({exc})") from None
        client.loop_start()
        try:
            result = await asyncio.wait_for(connected, 15.0)
        except TimeoutError:
            result = "no answer within 15 s"
        if result != "ok":
            client.loop_stop()
            if _unavailable(result):
                raise SourceUnavailable(f"{self.config.name}: {where}: {result}")
            raise ConfigError(f"{self.config.name}: {where}: {result}")
        log.info("%s: MQTT gateway subscribed to %d topics", self.config.name, len(subscriptions))
        return client

    def _spawn_mqtt(self, client: Any, message: Any) -> None:
        task = asyncio.get_running_loop().create_task(self._mqtt_message(client, message))
        self._mqtt_tasks.add(task)
        task.add_done_callback(self._mqtt_task_done)

    def _mqtt_task_done(self, task: asyncio.Task[None]) -> None:
        self._mqtt_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self._fatal is None:
            self._fatal = task.exception()  # _serve_until raises it: exit non-zero

    async def _mqtt_message(self, client: Any, message: Any) -> None:
        """Handle one MQTT message; acknowledge it only once its outcome is durable.

        An unexpected failure is dead-lettered (``internal_error``) and acknowledged after
        that; should even that fail, the task dies and the collector exits non-zero.
        """
        if self._stopping:
            return  # not acknowledged: the broker sends it again to the next session
        received = wall_clock_ms()
        payload = bytes(message.payload)
        source: PacketSource | None = None
        try:
            source = self._source_for_topic(message.topic)
            if source is None:
                settled = await self._mqtt_dead_letter(
                    "unknown_topic", "no registered device publishes to this topic", payload,
                    self.config.organisation_id, None, received,
                )
            else:
                self.metrics.read.inc()
                settled = await self._mqtt_packet(source, payload, received)
        except Exception as exc:
            log.exception("%s: an MQTT message failed unexpectedly", self.config.name)
            settled = await self._mqtt_dead_letter(
                "internal_error",
                f"the collector failed to handle this message ({type(exc).__name__})",
                payload,
                source.organisation_id if source else self.config.organisation_id,
                source.device_id if source else None,
                received,
            )
        if settled:
            client.ack(message.mid, message.qos)

    async def _mqtt_dead_letter(
        self,
        reason_code: str,
        reason: str,
        payload: bytes,
        organisation_id: str,
        device_id: str | None,
        received: int,
    ) -> bool:
        delay = 0.1
        while not self._stopping:
            dlq_id = await self._dead_letter(
                reason_code, reason, payload, organisation_id, device_id, received, wait=True
            )
            if dlq_id is not None:
                log.info("%s: MQTT message dead-lettered (%s)", self.config.name, reason_code)
                return True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        return False

    async def _mqtt_packet(self, source: PacketSource, payload: bytes, received: int) -> bool:
        if self._bucket(source.device_id).take() > 0:
            # MQTT has no 429. Throttling here would hold one of the broker's shared
            # receive-maximum slots and stall every other device, so the excess packet is
            # dead-lettered (and acknowledged once the dead letter is durable); beyond the
            # refusal budget it is only counted, and summarised in one dead letter.
            if not self._refusals.admit(
                source.device_id, "rate_limited", received, source.organisation_id
            ):
                self.metrics.failed("rate_limited").inc()
                return True
            rate = self.config.per_device_rate
            return await self._mqtt_dead_letter(
                "rate_limited",
                f"device sends faster than {rate.packets_per_s:g} packets/s "
                f"(burst {rate.burst})",
                payload, source.organisation_id, source.device_id, received,
            )
        http_limit = self.config.http.max_body_bytes if self.config.http else 262_144
        try:
            if len(payload) > http_limit:
                raise PayloadError(
                    [("(payload)", f"{len(payload)} bytes, at most {http_limit}")],
                    "payload_too_large",
                )
            record = parse_packet(payload, source, self.config, received)
        except PayloadError as error:
            return await self._mqtt_dead_letter(
                error.reason_code, str(error), payload, source.organisation_id,
                source.device_id, received,
            )
        delay = 0.1
        while not self._stopping:
            outcome = await self._publish_packet(record, wait=True)
            if outcome in ("accepted", "duplicate"):
                return True
            if outcome == "too_large":
                return await self._mqtt_dead_letter(
                    "record_too_large",
                    "the packet's raw record is larger than a Kafka record may be",
                    payload, source.organisation_id, source.device_id, received,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        return False

    async def _stop_mqtt(self, client: Any) -> None:
        if self._mqtt_tasks:
            await asyncio.wait(set(self._mqtt_tasks), timeout=30.0)
        client.disconnect()
        await asyncio.to_thread(client.loop_stop)


def _unavailable(outcome: str) -> bool:
    """Whether a connection outcome means the broker cannot be reached right now."""
    if outcome.startswith(("cannot connect", "no answer")):
        return True
    return outcome.removeprefix("refused: ") in _TRANSIENT_REFUSALS


def _probe_connect(
    host: str, port: int, username: str | None, password: SecretStr | None, timeout: float = 5.0
) -> str:
    """Connect once to an MQTT broker: ``ok`` or why the connection was refused."""
    import paho.mqtt.client as paho

    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2,
        client_id=f"medstream-check-{uuid.uuid4().hex[:8]}",
        protocol=paho.MQTTv5,
        reconnect_on_failure=False,
    )
    if username is not None:
        client.username_pw_set(username, password.get_secret_value() if password else None)
    answered = threading.Event()
    result = ["no answer"]

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        result[0] = "ok" if not reason.is_failure else str(reason)
        answered.set()

    client.on_connect = on_connect
    try:
        client.connect(host, port, keepalive=10)
    except OSError as exc:
        return f"cannot connect ({exc})"
    client.loop_start()
    answered.wait(timeout)
    client.disconnect()
    client.loop_stop()
    return result[0]
