"""The normalise stage's identity path: demographics -> keyed tokens -> master patient index,
and free texts scrubbed of the record's own identifiers (no broker)."""

from __future__ import annotations

from typing import Any

from medstream.settings import KafkaSettings
from schemas import serde
from streams.critical_values import DEFAULT_CRITICAL_RULES_PATH, load_critical_value_rules
from streams.detect import PatientIndexStage
from streams.findings import DictState
from streams.identity import patient_identities
from streams.model import RawContext
from streams.mpi import national_id_check_digit
from streams.pseudonym import Pseudonymiser
from streams.stage import NormaliseStage, SuppressionState
from streams.terminology import Terminology

from .test_normalise import hl7_raw

REGISTRY = serde.ManifestRegistry()
KAFKA = KafkaSettings(bootstrap_servers="unused:9092", topic_prefix="t.")
NOW_MS = 1_793_700_005_000
#: Where the identity observations of these tests sit on mpi.identity.
IDENTITY_AT = RawContext("t.mpi.identity", 0, 7, NOW_MS)
# A fictional person: area code 990101 does not exist; the check digit is valid.
NID = "99010119800214002" + national_id_check_digit("99010119800214002")
PHONE = "13900001111"


def oru(organisation: str, mrn: str, control_id: str, note: str = "4.2") -> dict[str, Any]:
    segments = [
        f"MSH|^~\\&|LIS|{organisation}|MEDSTREAM|REGION|20261103081500+0800||ORU^R01|{control_id}|P|2.5.1",
        f"PID|1||{mrn}^^^{organisation}^MR~{NID}^^^CHN^NI||FICTUS^XIAOMING||19800214|M|||||{PHONE}",
        "OBR|1|PL-1|FO-1|PANEL^Chemistry^L|||20261103080000+0800",
        f"OBX|1|ST|NOTE^Comment^L||{note}||||||F",
    ]
    raw = hl7_raw(segments, control_id=control_id)
    raw["organisation_id"] = organisation
    return raw


def stage(terminology: Terminology, pseudonymiser: Pseudonymiser) -> NormaliseStage:
    return NormaliseStage(
        KAFKA, REGISTRY, terminology, pseudonymiser,
        load_critical_value_rules(DEFAULT_CRITICAL_RULES_PATH), identity_key=b"i" * 32,
    )


def two_hospital_identities(normalise: NormaliseStage) -> list[bytes]:
    """The identity observations of one person's lab messages at H001 (MRN-A) and H002
    (MRN-B), both with the same national ID."""
    encode = serde.AvroSerializer(REGISTRY, serde.RAW_HL7_MESSAGE)
    identities = []
    for offset, (organisation, mrn) in enumerate((("H001", "MRN-A"), ("H002", "MRN-B"))):
        outputs = normalise.handle(
            "hl7_lab", RawContext("t.raw.hl7_lab", 0, offset, NOW_MS), b"k",
            encode(oru(organisation, mrn, f"C-{offset}")), SuppressionState.in_memory(), NOW_MS,
        )
        [identity] = [o.value for o in outputs if o.topic == "t.mpi.identity"]
        identities.append(identity)
    return identities


def test_pid_demographics_are_read_in_clear_only_inside_the_stage(
    pseudonymiser: Pseudonymiser,
) -> None:
    [identity] = patient_identities("hl7_lab", oru("H001", "MRN-FICT-7", "C-1"), pseudonymiser)
    assert (identity.mrn, identity.national_id, identity.phone) == ("MRN-FICT-7", NID, PHONE)
    assert (identity.name, identity.birth_date, identity.sex) == ("FICTUS^XIAOMING", "1980-02-14", "M")
    assert identity.record_key == pseudonymiser.person_key("H001", "MRN-FICT-7")


def test_free_text_is_scrubbed_and_the_index_gets_tokens_once(
    terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    normalise = stage(terminology, pseudonymiser)
    note = f"called Xiaoming Fictus on {PHONE}, ID {NID}, MRN-FICT-7"
    encode = serde.AvroSerializer(REGISTRY, serde.RAW_HL7_MESSAGE)
    raw = encode(oru("H001", "MRN-FICT-7", "C-2", note))
    outputs = normalise.handle(
        "hl7_lab", RawContext("t.raw.hl7_lab", 0, 1, NOW_MS), b"k", raw,
        SuppressionState.in_memory(), NOW_MS,
    )
    by_topic = {o.topic: o for o in outputs}
    lab = serde.AvroDeserializer(REGISTRY, serde.LAB_RESULT)(by_topic["t.norm.lab_result"].value)
    assert lab["value_text"] == "called [NAME] on [PHONE], ID [ID], [ID]"
    identity_bytes = by_topic["t.mpi.identity"].value
    for clear in (NID, PHONE, "FICTUS", "XIAOMING", "MRN-FICT-7"):
        assert clear.encode() not in identity_bytes
        assert clear not in repr(lab)
    token = serde.AvroDeserializer(REGISTRY, serde.IDENTITY_OBSERVATION)(identity_bytes)
    assert token["nid_status"] == "valid" and token["birth_date"] == "1980-02-14"
    assert token["record_key"] == lab["person_key"] and token["event_id"] == lab["event_id"]
    # The same demographics again: nothing new for the index.
    again = normalise.handle(
        "hl7_lab", RawContext("t.raw.hl7_lab", 0, 2, NOW_MS), b"k", encode(oru("H001", "MRN-FICT-7", "C-3")),
        SuppressionState.in_memory(), NOW_MS,
    )
    assert "t.norm.lab_result" in [o.topic for o in again]
    assert "t.mpi.identity" not in [o.topic for o in again]


def test_one_person_at_two_hospitals_is_linked_by_national_id(
    terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    index = PatientIndexStage(KAFKA, REGISTRY, b"p" * 32)
    decode_link = serde.AvroDeserializer(REGISTRY, serde.PERSON_LINK)
    state = DictState()
    links = []
    for identity in two_hospital_identities(stage(terminology, pseudonymiser)):
        decided = index.handle(identity, state, NOW_MS, IDENTITY_AT)
        links += [decode_link(o.value) for o in decided]
    assert [(link["action"], link["method"]) for link in links][-1] == ("link", "national_id")
    persons = {link["record_key"]: link["person_key"] for link in links}
    assert persons == {
        pseudonymiser.person_key("H001", "MRN-A"): persons[pseudonymiser.person_key("H001", "MRN-A")],
        pseudonymiser.person_key("H002", "MRN-B"): persons[pseudonymiser.person_key("H001", "MRN-A")],
    }
    # The person key is a pseudonym: neither the ID nor either record key.
    assert NID not in repr(links) and len(set(persons.values())) == 1


def test_emr_rows_claims_and_packets_name_their_patient_record(
    pseudonymiser: Pseudonymiser,
) -> None:
    row = {"patient_mrn": " P0001 ", "patient_name": "费测试", "id_number": NID,
           "birth_date": "1980-02-14", "sex": "M"}
    [emr] = patient_identities(
        "emr_cdc", {"organisation_id": "H001", "after": row, "before": None}, pseudonymiser
    )
    assert (emr.mrn, emr.name, emr.national_id, emr.phone) == ("P0001", "费测试", NID, None)
    assert emr.record_key == pseudonymiser.person_key("H001", "P0001")
    [claim] = patient_identities(
        "claim", {"organisation_id": "H002", "patient_local_id": "9", "patient_id_number": NID},
        pseudonymiser,
    )
    assert (claim.mrn, claim.national_id, claim.name) == ("9", NID, None)
    assert patient_identities("claim", {"organisation_id": "H002", "patient_local_id": " "},
                              pseudonymiser) == []
    [device] = patient_identities(
        "device", {"organisation_id": "H001", "patient_ref": "P0002"}, pseudonymiser
    )
    assert device.mrn == "P0002" and device.name is None


def test_a_steward_command_splits_a_record_out_of_its_person(
    terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    normalise = stage(terminology, pseudonymiser)
    index = PatientIndexStage(KAFKA, REGISTRY, b"p" * 32)
    encode = serde.AvroSerializer(REGISTRY, serde.RAW_HL7_MESSAGE)
    encode_identity = serde.AvroSerializer(REGISTRY, serde.IDENTITY_OBSERVATION)
    decode_link = serde.AvroDeserializer(REGISTRY, serde.PERSON_LINK)
    state = DictState()
    for offset, (organisation, mrn) in enumerate((("H001", "MRN-A"), ("H002", "MRN-B"))):
        outputs = normalise.handle(
            "hl7_lab", RawContext("t.raw.hl7_lab", 0, offset, NOW_MS), b"k",
            encode(oru(organisation, mrn, f"C-{offset}")), SuppressionState.in_memory(), NOW_MS,
        )
        for output in outputs:
            if output.topic == "t.mpi.identity":
                index.handle(output.value, state, NOW_MS, IDENTITY_AT)
    record_b = pseudonymiser.person_key("H002", "MRN-B")
    command = encode_identity({
        "record_key": record_b, "organisation_id": "H002", "event_id": "manual-1",
        "event_time": NOW_MS, "nid_status": "absent", "command": "unmerge",
        "actor": "steward.test", "reason": "two patients under one ID (typo at registration)",
    })
    decided = index.handle(command, state, NOW_MS + 1000, IDENTITY_AT)
    [split] = [decode_link(o.value) for o in decided]
    assert (split["action"], split["method"], split["record_key"]) == ("unmerge", "manual", record_b)
    assert split["previous_person_key"] and split["person_key"] != split["previous_person_key"]
    assert "steward.test" in split["explanation"] and "typo at registration" in split["explanation"]
    # An unknown record: refused with a dead letter naming the record, nothing linked.
    unknown = encode_identity({
        "record_key": "f" * 32, "organisation_id": "H002", "event_id": "manual-2",
        "event_time": NOW_MS, "nid_status": "absent", "command": "unmerge",
    })
    before = dict(state.values)
    [refused] = index.handle(unknown, state, NOW_MS, IDENTITY_AT)
    letter = serde.AvroDeserializer(REGISTRY, serde.DEAD_LETTER)(refused.value)
    assert refused.topic == "t.dlq" and letter["reason_code"] == "index_state"
    assert f"record {'f' * 32} is not in the patient index" in letter["reason"]
    assert letter["original_value"] == unknown and state.values == before


def test_an_observation_the_index_cannot_place_is_dead_lettered_and_replays_once_repaired(
    terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    index = PatientIndexStage(KAFKA, REGISTRY, b"p" * 32)
    decode_link = serde.AvroDeserializer(REGISTRY, serde.PERSON_LINK)
    decode_letter = serde.AvroDeserializer(REGISTRY, serde.DEAD_LETTER)
    state = DictState()
    identities = two_hospital_identities(stage(terminology, pseudonymiser))
    decided = index.handle(identities[0], state, NOW_MS, IDENTITY_AT)
    [first] = [decode_link(o.value) for o in decided]
    # The person the national ID points at is gone (a changelog batch lost on recovery).
    person = state.values.pop(f"mpi.person|{first['person_key']}")
    before = {key: dict(value) if isinstance(value, dict) else value
              for key, value in state.values.items()}
    at = RawContext("t.mpi.identity", 0, 8, NOW_MS)
    [refused] = index.handle(identities[1], state, NOW_MS, at, b"key-b")
    letter = decode_letter(refused.value)
    assert refused.topic == "t.dlq" and refused.key == b"key-b"
    assert (letter["stage"], letter["reason_code"]) == ("mpi", "index_state")
    assert letter["reason"] == (
        "the patient index could not place this observation: KeyError: person "
        f"{first['person_key']} is missing from the patient index state"
    )
    assert (letter["original_topic"], letter["original_partition"], letter["original_offset"]) == (
        "t.mpi.identity", 0, 8)
    assert letter["original_value"] == identities[1] and letter["original_key"] == b"key-b"
    # Nothing of the refused observation was applied, not even what it changed in place.
    assert state.values == before
    # Replayed from its dead letter once the state is repaired, it links as it should have.
    state.values[f"mpi.person|{first['person_key']}"] = person
    [link] = [decode_link(o.value)
              for o in index.handle(letter["original_value"], state, NOW_MS, at)]
    assert (link["action"], link["method"]) == ("link", "national_id")
    assert link["person_key"] == first["person_key"]
    assert link["record_key"] == pseudonymiser.person_key("H002", "MRN-B")


def test_an_undecodable_identity_observation_is_dead_lettered(
    terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    index = PatientIndexStage(KAFKA, REGISTRY, b"p" * 32)
    state = DictState()
    [refused] = index.handle(b"\x00not avro", state, NOW_MS, IDENTITY_AT)
    letter = serde.AvroDeserializer(REGISTRY, serde.DEAD_LETTER)(refused.value)
    assert (letter["stage"], letter["reason_code"]) == ("mpi", "invalid_observation")
    assert letter["original_value"] == b"\x00not avro" and state.values == {}
