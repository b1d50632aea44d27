"""Unit tests of the contracts: wire format, schema evolution, errors, sensitivity tags."""

from __future__ import annotations

import io
import json
import struct
import uuid
from datetime import date, datetime

import fastavro
import pytest
from fastavro.utils import generate_many

from schemas import serde

REGISTRY = serde.ManifestRegistry()


@pytest.mark.parametrize("subject", REGISTRY.subjects())
def test_every_version_reads_records_written_with_its_previous_versions(subject: str) -> None:
    versions = REGISTRY.versions(subject)
    for newer_index, reader in enumerate(versions):
        for writer in versions[: newer_index + 1]:
            for record in generate_many(writer.parsed, 5):
                framed = struct.pack(">bI", 0, writer.schema_id) + _body(writer, record)
                decoded = serde.AvroDeserializer(_FixedReader(reader), subject)(framed)
                writer_fields = {f["name"] for f in writer.definition["fields"]}
                for f in reader.definition["fields"]:
                    if f["name"] in writer_fields:
                        assert _plain(decoded[f["name"]]) == _plain(record[f["name"]])
                    else:
                        assert decoded[f["name"]] == f["default"]


class _FixedReader:
    """A registry whose latest version of the subject is `reader` (to test each step)."""

    def __init__(self, reader: serde.SchemaVersion) -> None:
        self.reader = reader

    def latest(self, subject: str) -> serde.SchemaVersion:
        return self.reader

    def by_id(self, schema_id: int) -> serde.SchemaVersion:
        return REGISTRY.by_id(schema_id)


def _body(version: serde.SchemaVersion, record: dict) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, version.parsed, record)
    return buffer.getvalue()


def _plain(value: object) -> object:
    """Logical types come back as datetime/date: compare them as the numbers written."""
    if isinstance(value, datetime):
        return round(value.timestamp() * 1000)
    if isinstance(value, date):
        return (value - date(1970, 1, 1)).days
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def test_lab_result_v2_adds_reference_limits_with_null_default() -> None:
    v1, v2 = REGISTRY.versions(serde.LAB_RESULT)
    assert (v1.version, v2.version) == (1, 2)
    added = {f["name"] for f in v2.definition["fields"]} - {f["name"] for f in v1.definition["fields"]}
    assert added == {"reference_low", "reference_high"}
    record = generate_many(v1.parsed, 1).__next__()
    decoded = serde.AvroDeserializer(REGISTRY, serde.LAB_RESULT)(
        struct.pack(">bI", 0, v1.schema_id) + _body(v1, record)
    )
    assert decoded["reference_low"] is None and decoded["event_id"] == record["event_id"]


def test_wire_format_is_magic_byte_schema_id_then_avro_body() -> None:
    record = next(generate_many(REGISTRY.latest(serde.ALERT).parsed, 1))
    encoded = serde.AvroSerializer(REGISTRY, serde.ALERT)(record)
    assert encoded[0] == 0
    assert struct.unpack(">I", encoded[1:5])[0] == REGISTRY.latest(serde.ALERT).schema_id == 302
    assert serde.AvroDeserializer(REGISTRY, serde.ALERT)(encoded)["alert_id"] == record["alert_id"]


def test_encoding_error_names_schema_and_field() -> None:
    record = next(generate_many(REGISTRY.latest(serde.OBSERVATION).parsed, 1))
    record["value"] = "not a number"
    with pytest.raises(serde.SerializationError) as caught:
        serde.AvroSerializer(REGISTRY, serde.OBSERVATION)(record)
    assert caught.value.schema == serde.OBSERVATION
    assert caught.value.field == "value"
    assert str(caught.value).startswith("medstream.norm.Observation.value:")
    assert "str of length 12 does not match type null|double" in str(caught.value)


def test_encoding_errors_never_repeat_the_value() -> None:
    # A fictional identifier in the wrong place must not reach the exception text (logs).
    record = next(generate_many(REGISTRY.latest(serde.RAW_EMR_ROW_CHANGE).parsed, 1))
    record["after"] = {"patient_name": "TESTPATIENT^ALPHA", "id_number": 990000200001010018}
    with pytest.raises(serde.SerializationError) as caught:
        serde.AvroSerializer(REGISTRY, serde.RAW_EMR_ROW_CHANGE)(record)
    text = str(caught.value)
    assert caught.value.field == "after" and "dict of length 2" in text
    assert "TESTPATIENT" not in text and "990000200001010018" not in text


def test_decoding_refuses_unframed_bytes_and_records_of_another_subject() -> None:
    decode = serde.AvroDeserializer(REGISTRY, serde.LAB_RESULT)
    with pytest.raises(serde.SerializationError, match="not Confluent-framed"):
        decode(b"garbage")
    alert = serde.AvroSerializer(REGISTRY, serde.ALERT)(
        next(generate_many(REGISTRY.latest(serde.ALERT).parsed, 1))
    )
    with pytest.raises(serde.SerializationError, match="written as medstream.alert.Alert"):
        decode(alert)
    with pytest.raises(serde.SerializationError, match="unknown schema id 9999"):
        decode(struct.pack(">bI", 0, 9999) + b"\x00")
    truncated = serde.AvroSerializer(REGISTRY, serde.ALERT)(
        next(generate_many(REGISTRY.latest(serde.ALERT).parsed, 1))
    )[:8]
    with pytest.raises(serde.SerializationError, match="undecodable Avro body"):
        serde.AvroDeserializer(REGISTRY, serde.ALERT)(truncated)


def test_confluent_registry_mock_assigns_its_own_ids_and_round_trips() -> None:
    registry = serde.ConfluentRegistry(f"mock://{uuid.uuid4().hex}")
    record = next(generate_many(REGISTRY.latest(serde.CLAIM_LINE).parsed, 1))
    encoded = serde.AvroSerializer(registry, serde.CLAIM_LINE)(record)
    schema_id = struct.unpack(">I", encoded[1:5])[0]
    assert schema_id == registry.latest(serde.CLAIM_LINE).schema_id
    decoded = serde.AvroDeserializer(registry, serde.CLAIM_LINE)(encoded)
    assert (decoded["claim_id"], decoded["line_no"]) == (record["claim_id"], record["line_no"])
    assert registry.by_id(schema_id).subject == serde.CLAIM_LINE


def test_manifest_ids_are_unique_and_versions_contiguous() -> None:
    manifest = json.loads(serde.MANIFEST_PATH.read_text())
    ids = [v["id"] for versions in manifest["subjects"].values() for v in versions]
    assert len(ids) == len(set(ids))
    for versions in manifest["subjects"].values():
        assert [v["version"] for v in versions] == list(range(1, len(versions) + 1))


def test_every_field_has_a_known_sensitivity_tag() -> None:
    for subject in REGISTRY.subjects():
        for version in REGISTRY.versions(subject):
            tags = serde.field_sensitivity(version.definition)
            assert tags, subject
            unknown = {name: tag for name, tag in tags.items() if tag not in serde.SENSITIVITY_LEVELS}
            assert not unknown, (subject, unknown)


def test_direct_identifiers_exist_only_in_raw_and_dead_letter_contracts() -> None:
    for subject in REGISTRY.subjects():
        tags = serde.field_sensitivity(REGISTRY.latest(subject).definition)
        direct = sorted(name for name, tag in tags.items() if tag == "direct_identifier")
        if subject.startswith(("medstream.norm.", "medstream.alert.")):
            assert direct == [], subject
    raw_hl7 = serde.field_sensitivity(REGISTRY.latest(serde.RAW_HL7_MESSAGE).definition)
    assert raw_hl7["payload"] == "direct_identifier"
    assert serde.field_sensitivity(REGISTRY.latest(serde.LAB_RESULT).definition)["person_key"] == "pseudonym"


def test_an_unknown_schema_id_is_bad_input_but_an_unreachable_registry_is_not() -> None:
    """A record naming an id the registry does not hold is the record's fault (dead letter);
    a registry that cannot be asked is not, and must not turn records into dead letters."""
    from medstream.runtime import free_port

    known = serde.ConfluentRegistry(f"mock://{uuid.uuid4().hex}")
    with pytest.raises(serde.SerializationError, match="schema id 424242 not in the registry"):
        known.by_id(424_242)
    unreachable = serde.ConfluentRegistry(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(serde.RegistryUnavailable, match="schema id 424242") as raised:
        unreachable.by_id(424_242)
    assert not isinstance(raised.value, serde.SerializationError)
    assert isinstance(raised.value, OSError)  # what the stages treat as not the record's fault
