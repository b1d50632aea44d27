"""The one Avro serialisation module every stage uses: Confluent wire format, cached schemas.

Wire format: magic byte 0, a 4-byte big-endian schema id, then the Avro binary body.
Schema ids come from the committed manifest (``schemas/manifest.json``) by default, or
from a Confluent-compatible schema registry when SCHEMA_REGISTRY_URL is set. Serialisers
are plain callables ``(value, ctx) -> bytes`` and back, separate from transport, and
raise :class:`SerializationError` naming the schema and the field at fault.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import fastavro
from fastavro.validation import validate

SCHEMA_DIR = Path(__file__).resolve().parent
MANIFEST_PATH = SCHEMA_DIR / "manifest.json"
MAGIC = 0
_HEADER = struct.Struct(">bI")

SENSITIVITY_LEVELS = (
    "direct_identifier",
    "quasi_identifier",
    "pseudonym",
    "clinical",
    "operational",
)

# Short names used by the stages; each maps to a fully qualified Avro record name.
RAW_EMR_ROW_CHANGE = "medstream.raw.EmrRowChange"
RAW_HL7_MESSAGE = "medstream.raw.Hl7Message"
RAW_DEVICE_PACKET = "medstream.raw.DevicePacket"
RAW_CLAIM = "medstream.raw.Claim"
ENCOUNTER = "medstream.norm.Encounter"
DIAGNOSIS = "medstream.norm.Diagnosis"
LAB_RESULT = "medstream.norm.LabResult"
OBSERVATION = "medstream.norm.Observation"
CLAIM_LINE = "medstream.norm.ClaimLine"
ALERT = "medstream.alert.Alert"
DEAD_LETTER = "medstream.dlq.DeadLetter"
LIFECYCLE_INPUT = "medstream.detect.LifecycleInput"
FEED_ACTIVITY = "medstream.detect.FeedActivity"
ALERT_ACTION_OUTCOME = "medstream.detect.AlertActionOutcome"
QUALITY_ISSUE = "medstream.quality.QualityIssue"
IDENTITY_OBSERVATION = "medstream.mpi.IdentityObservation"
PERSON_LINK = "medstream.mpi.PersonLink"
UNMAPPED_CODE = "medstream.terminology.UnmappedCode"
AUDIT_EVENT = "medstream.audit.AuditEvent"

#: Kafka header on a raw record naming the edge collector that published it (part of the
#: contract: the sink's raw ledger records it, so reconciliation can account per collector).
COLLECTOR_HEADER = "medstream-collector"
#: Kafka header on a raw record naming the publisher run (a simulator run, a collector
#: process) that published it; the raw ledger records it, so a run's ground truth can be
#: checked against that run's rows only.
RUN_HEADER = "medstream-run"

#: Source kind -> subject of its raw message (one raw topic per kind).
RAW_SUBJECT_BY_KIND = {
    "emr_cdc": RAW_EMR_ROW_CHANGE,
    "hl7_lab": RAW_HL7_MESSAGE,
    "device": RAW_DEVICE_PACKET,
    "claim": RAW_CLAIM,
}
#: Normalised event kind -> subject (one norm topic and one ClickHouse table per kind).
NORM_SUBJECT_BY_KIND = {
    "encounter": ENCOUNTER,
    "diagnosis": DIAGNOSIS,
    "lab_result": LAB_RESULT,
    "observation": OBSERVATION,
    "claim_line": CLAIM_LINE,
}

#: Derived fact table -> subject (one topic and one ClickHouse table per fact).
FACT_SUBJECT_BY_TABLE = {
    "quality_issue": QUALITY_ISSUE,
    "person_link": PERSON_LINK,
    "terminology_unmapped": UNMAPPED_CODE,
    "audit_log": AUDIT_EVENT,
}


class SerializationError(ValueError):
    """A record could not be encoded or decoded; names the schema and field at fault."""

    def __init__(self, schema: str, reason: str, field: str | None = None) -> None:
        self.schema = schema
        self.field = field
        self.reason = reason
        where = f"{schema}.{field}" if field else schema
        super().__init__(f"{where}: {reason}")


class RegistryUnavailable(ConnectionError):
    """The schema registry could not be asked (unreachable, or it answered with an error of
    its own): not the record's fault, so the record must not be dead-lettered for it.

    A ConnectionError, hence an OSError: what the stages let through to restart the worker.
    """


@dataclass(frozen=True)
class SchemaVersion:
    """One version of one record schema, as listed in the manifest."""

    subject: str
    version: int
    schema_id: int
    definition: dict[str, Any]

    @cached_property
    def parsed(self) -> Any:
        """The fastavro-parsed schema, parsed once per version."""
        return fastavro.parse_schema(self.definition)


class SchemaRegistry(Protocol):
    """Resolves a subject to its latest schema id and an id back to its schema."""

    def latest(self, subject: str) -> SchemaVersion: ...

    def by_id(self, schema_id: int) -> SchemaVersion: ...


class ManifestRegistry:
    """The embedded registry: schemas/ files with ids from the committed manifest."""

    def __init__(self, manifest_path: Path = MANIFEST_PATH) -> None:
        manifest = json.loads(manifest_path.read_text())
        self._by_subject: dict[str, list[SchemaVersion]] = {}
        self._by_id: dict[int, SchemaVersion] = {}
        for subject, versions in manifest["subjects"].items():
            for entry in versions:
                definition = json.loads((manifest_path.parent / entry["file"]).read_text())
                version = SchemaVersion(subject, entry["version"], entry["id"], definition)
                self._by_subject.setdefault(subject, []).append(version)
                if version.schema_id in self._by_id:
                    raise ValueError(f"schema id {version.schema_id} is used twice in the manifest")
                self._by_id[version.schema_id] = version
        for versions in self._by_subject.values():
            versions.sort(key=lambda v: v.version)

    def subjects(self) -> list[str]:
        """Every subject in the manifest."""
        return sorted(self._by_subject)

    def versions(self, subject: str) -> list[SchemaVersion]:
        """All versions of a subject, oldest first."""
        try:
            return list(self._by_subject[subject])
        except KeyError:
            raise SerializationError(
                subject, "unknown subject (not in schemas/manifest.json)"
            ) from None

    def latest(self, subject: str) -> SchemaVersion:
        return self.versions(subject)[-1]

    def by_id(self, schema_id: int) -> SchemaVersion:
        try:
            return self._by_id[schema_id]
        except KeyError:
            raise SerializationError("?", f"unknown schema id {schema_id}") from None


class ConfluentRegistry:
    """A Confluent-compatible HTTP registry (or its mock:// client in tests).

    The subjects are registered from the schemas/ files on first use, so the ids are the
    registry's own; record-name subjects are used because one record travels on many topics.
    """

    def __init__(self, url: str, local: ManifestRegistry | None = None) -> None:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        self._client = SchemaRegistryClient.new_client({"url": url})
        self._local = local or ManifestRegistry()
        self._latest: dict[str, SchemaVersion] = {}
        self._by_id: dict[int, SchemaVersion] = {}

    def latest(self, subject: str) -> SchemaVersion:
        cached = self._latest.get(subject)
        if cached is None:
            from confluent_kafka.schema_registry import Schema

            local = self._local.latest(subject)
            schema_id = self._client.register_schema(
                subject, Schema(json.dumps(local.definition), "AVRO")
            )
            cached = SchemaVersion(subject, local.version, schema_id, local.definition)
            self._latest[subject] = cached
            self._by_id[schema_id] = cached
        return cached

    def by_id(self, schema_id: int) -> SchemaVersion:
        cached = self._by_id.get(schema_id)
        if cached is None:
            try:
                registered = self._client.get_schema(schema_id)
            except Exception as exc:  # the registry client's and its HTTP library's errors
                if getattr(exc, "http_status_code", None) == 404:  # an unknown id: bad input
                    raise SerializationError(
                        "?", f"schema id {schema_id} not in the registry: {exc}"
                    ) from exc
                raise RegistryUnavailable(
                    f"the schema registry could not be asked for schema id {schema_id} "
                    f"({type(exc).__name__}: {exc}); check SCHEMA_REGISTRY_URL"
                ) from exc
            if registered.schema_str is None:
                raise SerializationError("?", f"schema id {schema_id} has no schema text")
            definition = json.loads(registered.schema_str)
            subject = f"{definition.get('namespace', '')}.{definition['name']}".lstrip(".")
            cached = SchemaVersion(subject, 0, schema_id, definition)
            self._by_id[schema_id] = cached
        return cached


def registry_from_url(url: str) -> SchemaRegistry:
    """The registry for a SCHEMA_REGISTRY_URL value (empty = the committed manifest)."""
    return ConfluentRegistry(url) if url else ManifestRegistry()


def describe_value(value: Any) -> str:
    """A value's shape without its content: errors and logs must never carry patient data."""
    if value is None or isinstance(value, bool | int | float):
        return type(value).__name__
    try:
        return f"{type(value).__name__} of length {len(value)}"
    except TypeError:
        return type(value).__name__


def _type_name(avro_type: Any) -> str:
    if isinstance(avro_type, list):
        return "|".join(_type_name(t) for t in avro_type)
    if isinstance(avro_type, dict):
        return str(avro_type.get("logicalType") or avro_type.get("name") or avro_type["type"])
    return str(avro_type).rsplit(".", 1)[-1]


def _field_at_fault(record: Any, parsed: Any) -> tuple[str | None, str]:
    """Find the first invalid field of a record, for an error that names it (not its value)."""
    if not isinstance(record, dict):
        return None, f"expected a record (dict), got {type(record).__name__}"
    for field in parsed["fields"]:
        name = field["name"]
        if name not in record and "default" not in field:
            return name, "required field is missing"
        if name in record:
            try:
                validate(record[name], field["type"], raise_errors=True)
            except Exception:  # ValidationError or fastavro's plain errors: both echo the value
                expected = _type_name(field["type"])
                return name, f"{describe_value(record[name])} does not match type {expected}"
    return None, "record does not match the schema"


class AvroSerializer:
    """Encodes a dict as Confluent-framed Avro with the subject's latest schema."""

    def __init__(self, registry: SchemaRegistry, subject: str) -> None:
        self.subject = subject
        self._version = registry.latest(subject)
        self._parsed = self._version.parsed
        self._header = _HEADER.pack(MAGIC, self._version.schema_id)

    def __call__(self, value: dict[str, Any], ctx: Any = None) -> bytes:
        buffer = io.BytesIO()
        buffer.write(self._header)
        try:
            fastavro.schemaless_writer(buffer, self._parsed, value)
        except Exception as exc:
            field, reason = _field_at_fault(value, self._parsed)
            # The reason names the field and the value's shape; the value itself may be
            # patient data, so neither it nor fastavro's message (which repeats it) is kept.
            reason = f"{reason} ({type(exc).__name__})"
            raise SerializationError(self.subject, reason, field) from exc
        return buffer.getvalue()


class AvroDeserializer:
    """Decodes Confluent-framed Avro written with any registered version into the reader schema.

    With ``subject`` set, records written with older versions are resolved into that
    subject's latest version (Avro schema resolution); records of another subject are
    refused, so a record on the wrong topic is a clear error, not a silent mix-up.
    """

    def __init__(self, registry: SchemaRegistry, subject: str | None = None) -> None:
        self.subject = subject
        self._registry = registry
        self._reader = registry.latest(subject) if subject else None
        self._plans: dict[int, tuple[Any, Any]] = {}  # schema id -> (writer, reader or None)

    def __call__(self, data: bytes | None, ctx: Any = None) -> dict[str, Any]:
        expected = self.subject or "?"
        if data is None:
            raise SerializationError(expected, "record value is empty (null)")
        if len(data) < _HEADER.size or data[0] != MAGIC:
            raise SerializationError(
                expected, "not Confluent-framed Avro (missing magic byte 0 and schema id)"
            )
        _, schema_id = _HEADER.unpack_from(data)
        plan = self._plans.get(schema_id)
        if plan is None:
            try:
                version = self._registry.by_id(schema_id)
            except SerializationError as exc:
                raise SerializationError(expected, exc.reason) from exc
            if self._reader is not None and version.subject != self._reader.subject:
                raise SerializationError(
                    expected, f"record was written as {version.subject} (schema id {schema_id})"
                )
            # Schema resolution only when the writer's version differs from the reader's:
            # resolving a schema against itself costs as much as the decoding.
            reader = self._reader
            resolve = reader is not None and reader.schema_id != schema_id
            plan = (version.parsed, reader.parsed if resolve and reader else None)
            self._plans[schema_id] = plan
        try:
            writer, reader = plan
            record = fastavro.schemaless_reader(io.BytesIO(data[_HEADER.size :]), writer, reader)
        except Exception as exc:
            raise SerializationError(
                expected, f"undecodable Avro body for schema id {schema_id}: {exc}"
            ) from exc
        if not isinstance(record, dict):
            raise SerializationError(
                expected, f"schema id {schema_id} decodes to {type(record).__name__}, not a record"
            )
        return record


def record_fields(
    definition: dict[str, Any], prefix: str = ""
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(dotted name, field definition) of every field of a record schema, nested records'
    fields (also those of arrays of records) following their parent field."""
    for field in definition["fields"]:
        name = prefix + field["name"]
        yield name, field
        nested = field["type"]
        if isinstance(nested, dict) and nested.get("type") == "array":
            nested = nested["items"]
        if isinstance(nested, dict) and nested.get("type") == "record":
            yield from record_fields(nested, name + ".")


def field_sensitivity(definition: dict[str, Any]) -> dict[str, str]:
    """Field name -> sensitivity tag of a record schema (nested records included, dotted)."""
    return {name: field.get("sensitivity", "") for name, field in record_fields(definition)}
