"""Unit tests of the per-record normalise stage the Faust agents delegate to (no broker)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import prometheus_client
import pytest

from medstream.settings import KafkaSettings
from schemas import serde
from streams.critical_values import DEFAULT_CRITICAL_RULES_PATH, load_critical_value_rules
from streams.model import RawContext
from streams.pseudonym import Pseudonymiser
from streams.reloading import ReloadingFile
from streams.stage import NormaliseStage, Output, SuppressionState
from streams.terminology import Terminology

from .test_normalise import MRN, MSH, NATIONAL_ID, OBR, PATIENT_SURNAME, PID, hl7_raw

REGISTRY = serde.ManifestRegistry()
KAFKA = KafkaSettings(bootstrap_servers="unused:9092", topic_prefix="t.")
NOW_MS = 1_793_700_005_000


@pytest.fixture
def stage(terminology: Terminology, pseudonymiser: Pseudonymiser) -> NormaliseStage:
    rules = load_critical_value_rules(DEFAULT_CRITICAL_RULES_PATH)
    return NormaliseStage(KAFKA, REGISTRY, terminology, pseudonymiser, rules)


def encoded_hl7(segments: list[str], control_id: str) -> bytes:
    """The message with MSH-10 (the source's own id, hence the event ids) set to control_id."""
    segments = [MSH.replace("|LAB-0001|", f"|{control_id}|"), *segments[1:]]
    return serde.AvroSerializer(REGISTRY, serde.RAW_HL7_MESSAGE)(hl7_raw(segments, control_id=control_id))


def decode(output: Output) -> dict[str, Any]:
    subject = {
        "t.alerts.lifecycle": serde.LIFECYCLE_INPUT,
        "t.dlq": serde.DEAD_LETTER,
        "t.norm.lab_result": serde.LAB_RESULT,
    }[output.topic]
    return serde.AvroDeserializer(REGISTRY, subject)(output.value)


def potassium(value: str, minute: int) -> list[str]:
    return [MSH, PID, OBR, f"OBX|1|NM|K^Potassium^L||{value}|mmol/L|3.5-5.3|HH|||F|||2026110308{minute:02d}00+0800"]


def test_undecodable_bytes_become_one_dead_letter_with_the_original_bytes(stage: NormaliseStage) -> None:
    ctx = RawContext("t.raw.hl7_lab", 1, 99, NOW_MS - 50)
    [output] = stage.handle("hl7_lab", ctx, b"H001:k", b"\x00\x00garbage", SuppressionState.in_memory(), NOW_MS)
    assert (output.topic, output.key) == ("t.dlq", b"H001:k")
    dead = decode(output)
    assert (dead["stage"], dead["reason_code"]) == ("normalise", "undecodable")
    assert "medstream.raw.Hl7Message" in dead["reason"]
    assert (dead["original_topic"], dead["original_partition"], dead["original_offset"]) == ("t.raw.hl7_lab", 1, 99)
    assert dead["original_value"] == b"\x00\x00garbage" and dead["record_index"] is None


def test_critical_value_alerts_once_then_repeat_is_suppressed(stage: NormaliseStage) -> None:
    state = SuppressionState.in_memory()
    first = stage.handle(
        "hl7_lab", RawContext("t.raw.hl7_lab", 0, 1, NOW_MS), b"k", encoded_hl7(potassium("6.9", 5), "C-1"), state, NOW_MS
    )
    assert [o.topic for o in first] == ["t.norm.lab_result", "t.alerts.lifecycle"]
    lab, finding = decode(first[0]), decode(first[1])
    assert (finding["input_kind"], finding["rule_id"]) == ("finding", "critical_value.potassium")
    assert finding["triggering_event_ids"] == [lab["event_id"]]
    assert finding["value"] == 6.9 and finding["unit"] == "mmol/L"
    assert "6.9" in finding["explanation"] and "6.2" in finding["explanation"]
    # Lineage of the lab result that fired, and the lifecycle key: rule and subject.
    assert (finding["source_topic"], finding["source_offset"]) == ("t.raw.hl7_lab", 1)
    assert finding["subject"] == f"{lab['person_key']}|2823-3"
    assert first[1].key == f"critical_value.potassium|{lab['person_key']}|2823-3".encode()
    # A later critical for the same patient and analyte within the window: stored, no alert.
    second = stage.handle(
        "hl7_lab", RawContext("t.raw.hl7_lab", 0, 2, NOW_MS), b"k", encoded_hl7(potassium("7.1", 40), "C-2"), state, NOW_MS
    )
    assert [o.topic for o in second] == ["t.norm.lab_result"]


def test_an_edited_critical_values_file_applies_without_a_restart(
    terminology: Terminology, pseudonymiser: Pseudonymiser, tmp_path: Path
) -> None:
    path = tmp_path / "critical_values.yaml"
    original = DEFAULT_CRITICAL_RULES_PATH.read_text(encoding="utf-8")
    path.write_text(original, encoding="utf-8")
    clock = [0.0]
    rules = ReloadingFile(
        "critical_values", path, load_critical_value_rules, check_every_s=1, clock=lambda: clock[0]
    )
    stage = NormaliseStage(KAFKA, REGISTRY, terminology, pseudonymiser, rules)
    state = SuppressionState.in_memory()

    def run(value: str, minute: int, control_id: str) -> list[Output]:
        ctx = RawContext("t.raw.hl7_lab", 0, minute, NOW_MS)
        return stage.handle(
            "hl7_lab", ctx, b"k", encoded_hl7(potassium(value, minute), control_id), state, NOW_MS
        )

    assert [o.topic for o in run("5.9", 5, "E-1")] == ["t.norm.lab_result"]  # limit 6.2
    edited = original.replace('version: "2026.11-1"', 'version: "2026.11-test"')
    edited = edited.replace("high: 6.2", "high: 5.5", 1)
    assert edited.count("5.5") == 1 and "2026.11-test" in edited
    path.write_text(edited, encoding="utf-8")
    os.utime(path, (1_800_000_000, 1_800_000_000))
    clock[0] = 2.0
    lab, alert = run("5.9", 10, "E-2")
    finding = decode(alert)
    assert (finding["rule_id"], finding["rule_version"]) == (
        "critical_value.potassium",
        "2026.11-test",
    )
    assert "5.5" in finding["explanation"]
    # A broken edit is refused and the last good limits stay in force.
    path.write_text("version: [unclosed\n", encoding="utf-8")
    clock[0] = 4.0
    assert [o.topic for o in run("5.9", 15, "E-3")] == ["t.norm.lab_result"]  # suppressed
    assert rules.last_error is not None and stage.critical_rules.version == "2026.11-test"


def test_no_output_carries_a_direct_identifier(stage: NormaliseStage) -> None:
    outputs = stage.handle(
        "hl7_lab", RawContext("t.raw.hl7_lab", 0, 3, NOW_MS), b"k", encoded_hl7(potassium("6.9", 5), "C-3"),
        SuppressionState.in_memory(), NOW_MS,
    )
    assert len(outputs) == 2
    for output in outputs:
        text = repr(decode(output))
        for identifier in (MRN, NATIONAL_ID, PATIENT_SURNAME):
            assert identifier not in text


def test_record_level_rejection_keeps_the_other_records(stage: NormaliseStage) -> None:
    segments = [*potassium("4.1", 5), "OBX|2|NM|NA^Sodium^L||n/a|mmol/L|137-145||||F"]
    outputs = stage.handle(
        "hl7_lab", RawContext("t.raw.hl7_lab", 0, 4, NOW_MS), b"k", encoded_hl7(segments, "C-4"),
        SuppressionState.in_memory(), NOW_MS,
    )
    assert [o.topic for o in outputs] == ["t.norm.lab_result", "t.dlq"]
    dead = decode(outputs[1])
    assert (dead["reason_code"], dead["record_index"], dead["record_count"]) == ("invalid_record", 1, 2)
    assert decode(outputs[0])["record_index"] == 0


def test_a_replayed_message_re_emits_its_own_alert(stage: NormaliseStage) -> None:
    # The worker died after writing the suppression state but before the alert was
    # delivered; the raw message is processed again and must alert again (same alert id).
    state = SuppressionState.in_memory()
    raw = encoded_hl7(potassium("6.9", 5), "C-9")
    ctx = RawContext("t.raw.hl7_lab", 0, 9, NOW_MS)
    first = stage.handle("hl7_lab", ctx, b"k", raw, state, NOW_MS)
    again = stage.handle("hl7_lab", ctx, b"k", raw, state, NOW_MS + 5000)
    assert [o.topic for o in again] == ["t.norm.lab_result", "t.alerts.lifecycle"]
    assert decode(again[1])["input_id"] == decode(first[1])["input_id"]


def test_a_cdc_snapshot_critical_value_is_stored_without_an_alert(stage: NormaliseStage) -> None:
    """A lab row read by a CDC snapshot was in the HIS before the collector started: it is
    stored, but only the same value arriving as a new row (op c) raises an alert."""
    from datetime import UTC, datetime

    def emr_lab(op: str, result_id: str) -> bytes:
        row = {
            "result_id": result_id, "order_id": f"ORD-{result_id}", "visit_no": "V-1",
            "patient_mrn": MRN, "test_code": "K", "test_name": "Potassium",
            "result_value": "7.4", "unit": "mmol/L", "reference_range": "3.5-5.3",
            "abnormal_flag": "HH", "result_status": "F", "specimen_status": None,
            "result_time": "2026-11-03T08:05:00+08:00",
        }
        return serde.AvroSerializer(REGISTRY, serde.RAW_EMR_ROW_CHANGE)({
            "message_id": f"his-pg:{op}:{result_id}", "organisation_id": "H001",
            "source_system": "his-pg", "op": op, "table": "lab_result", "before": None,
            "after": row, "source_position": "0/1", "position_seq": 1, "transaction_id": 1,
            "commit_time": datetime(2026, 11, 3, tzinfo=UTC),
            "captured_time": datetime(2026, 11, 3, tzinfo=UTC),
        })

    ctx = RawContext("t.raw.emr_cdc", 0, 1, NOW_MS)
    state = SuppressionState.in_memory()
    historic = stage.handle("emr_cdc", ctx, b"k", emr_lab("r", "R-1"), state, NOW_MS)
    assert [o.topic for o in historic] == ["t.norm.lab_result"]
    new = stage.handle("emr_cdc", ctx, b"k", emr_lab("c", "R-2"), state, NOW_MS)
    assert [o.topic for o in new] == ["t.norm.lab_result", "t.alerts.lifecycle"]


def test_an_impossible_value_is_dead_lettered_with_its_quality_issue(stage: NormaliseStage) -> None:
    # Potassium 25 mmol/L cannot be a measurement (haemolysis, contamination, a typo): the
    # result is unusable, so it is dead-lettered, and the broken rule is a counted fact.
    outputs = stage.handle(
        "hl7_lab", RawContext("t.raw.hl7_lab", 0, 11, NOW_MS), b"k", encoded_hl7(potassium("25", 5), "C-11"),
        SuppressionState.in_memory(), NOW_MS,
    )
    assert [o.topic for o in outputs] == ["t.quality.issues", "t.dlq"]
    issue = serde.AvroDeserializer(REGISTRY, serde.QUALITY_ISSUE)(outputs[0].value)
    assert (issue["severity"], issue["category"], issue["event_kind"]) == ("error", "plausibility", "lab_result")
    assert issue["rule_id"].startswith("quality.range.lab_result")
    dead = decode(outputs[1])
    assert (dead["reason_code"], dead["record_index"], dead["record_count"]) == ("quality_error", 0, 1)
    assert issue["rule_id"] in dead["reason"] and MRN not in dead["reason"]


def test_a_warning_is_stored_with_the_event_and_a_redelivery_is_no_duplicate(
    stage: NormaliseStage,
) -> None:
    state = SuppressionState.in_memory()
    late = NOW_MS + 3 * 24 * 3_600_000  # ingested three days after the result time
    raw = encoded_hl7(potassium("4.1", 5), "C-12")
    first = stage.handle("hl7_lab", RawContext("t.raw.hl7_lab", 0, 12, late), b"k", raw, state, late)
    assert sorted(o.topic for o in first) == ["t.norm.lab_result", "t.quality.issues"]
    issue = serde.AvroDeserializer(REGISTRY, serde.QUALITY_ISSUE)(
        next(o for o in first if o.topic == "t.quality.issues").value
    )
    assert (issue["rule_id"], issue["severity"]) == ("quality.timeliness.late", "warning")
    # The same message again (a redelivery): the same issue id, and no duplicate issue.
    again = stage.handle("hl7_lab", RawContext("t.raw.hl7_lab", 0, 13, late), b"k", raw, state, late)
    issues_again = [
        serde.AvroDeserializer(REGISTRY, serde.QUALITY_ISSUE)(o.value)
        for o in again if o.topic == "t.quality.issues"
    ]
    assert [i["issue_id"] for i in issues_again] == [issue["issue_id"]]


def test_device_out_of_range_and_silence_become_lifecycle_findings(stage: NormaliseStage) -> None:
    from streams.findings import DictState

    from .test_normalise import device_raw, sample

    encode = serde.AvroSerializer(REGISTRY, serde.RAW_DEVICE_PACKET)
    devices = DictState()
    ingest = 1_793_700_000_000
    packet = encode(device_raw([sample("HR", 165, "bpm", 1), sample("SPO2", 97, "%", 2)]))
    outputs = stage.handle(
        "device", RawContext("t.raw.device", 0, 1, ingest), b"DEV-1", packet,
        SuppressionState.in_memory(), ingest + 100, device_state=devices,
    )
    found = [decode(o) for o in outputs if o.topic == "t.alerts.lifecycle"]
    assert [(f["rule_id"], f["subject"], f["value"]) for f in found] == [
        ("device.out_of_range", "DEV-1|8867-4", 165.0)
    ]
    # Silence is wall-clock: nothing after one interval, a finding after four (monitor-a: 15 s).
    assert stage.device_tick(devices, ingest + 20_000) == []
    [silence] = [decode(o) for o in stage.device_tick(devices, ingest + 61_000)]
    assert (silence["rule_id"], silence["subject"]) == ("device.silence", "DEV-1")


def test_an_unmapped_code_becomes_a_worklist_occurrence_with_ranked_candidates(
    stage: NormaliseStage,
) -> None:
    segments = [MSH, PID, OBR, "OBX|1|NM|KPOCT^Serum potassium point of care^L||4.1|mmol/L|3.5-5.3||||F"]
    outputs = stage.handle(
        "hl7_lab", RawContext("t.raw.hl7_lab", 0, 21, NOW_MS), b"k", encoded_hl7(segments, "C-21"),
        SuppressionState.in_memory(), NOW_MS,
    )
    [gap] = [
        serde.AvroDeserializer(REGISTRY, serde.UNMAPPED_CODE)(o.value)
        for o in outputs if o.topic == "t.terminology.unmapped"
    ]
    lab = decode(next(o for o in outputs if o.topic == "t.norm.lab_result"))
    assert (gap["code_system"], gap["local_code"], gap["status"]) == ("lab", "KPOCT", "unmapped")
    assert gap["event_id"] == lab["event_id"] and lab["mapping_status"] == "unmapped"
    assert gap["candidate_codes"][0] == "2823-3"  # Potassium [Moles/volume] in Serum or Plasma
    assert gap["candidate_scores"] == sorted(gap["candidate_scores"], reverse=True)
    # A mapped result adds nothing to the worklist.
    mapped = stage.handle(
        "hl7_lab", RawContext("t.raw.hl7_lab", 0, 22, NOW_MS), b"k", encoded_hl7(potassium("4.1", 5), "C-22"),
        SuppressionState.in_memory(), NOW_MS,
    )
    assert "t.terminology.unmapped" not in [o.topic for o in mapped]


def _lab_outputs(stage: NormaliseStage, obx: str, control_id: str, offset: int) -> dict[str, list[dict[str, Any]]]:
    outputs = stage.handle(
        "hl7_lab", RawContext("t.raw.hl7_lab", 0, offset, NOW_MS), b"k",
        encoded_hl7([MSH, PID, OBR, obx], control_id), SuppressionState.in_memory(), NOW_MS,
    )
    by_topic: dict[str, list[dict[str, Any]]] = {}
    for output in outputs:
        if output.topic == "t.quality.issues":
            continue
        subject = serde.UNMAPPED_CODE if output.topic == "t.terminology.unmapped" else None
        record = serde.AvroDeserializer(REGISTRY, subject)(output.value) if subject else decode(output)
        by_topic.setdefault(output.topic, []).append(record)
    return by_topic


def test_potassium_in_milliequivalents_raises_its_critical_alert(stage: NormaliseStage) -> None:
    """Issue 15, reproduced: potassium 7.8 mEq/L was stored NULL and raised nothing."""
    out = _lab_outputs(stage, "OBX|1|NM|K^Kalium^L||7.8|mEq/L|3.5-5.3|HH|||F", "C-40", 40)
    [lab] = out["t.norm.lab_result"]
    [finding] = out["t.alerts.lifecycle"]
    assert (lab["value"], lab["unit"], lab["mapping_status"]) == (7.8, "mmol/L", "mapped")
    assert (finding["rule_id"], finding["value"], finding["unit"]) == (
        "critical_value.potassium", 7.8, "mmol/L"
    )
    assert "t.terminology.unmapped" not in out


def test_a_critical_analyte_in_an_unconvertible_unit_raises_unreadable_and_a_worklist_entry(
    stage: NormaliseStage,
) -> None:
    before = unreadable_count("critical_value.potassium")
    out = _lab_outputs(stage, "OBX|1|NM|K^Kalium^L||7.8|U/L|||||F", "C-41", 41)
    [lab] = out["t.norm.lab_result"]
    [finding] = out["t.alerts.lifecycle"]
    [gap] = out["t.terminology.unmapped"]
    assert (lab["value"], lab["mapping_status"]) == (None, "unit_unmapped")
    assert (finding["rule_id"], finding["severity"]) == ("critical_value.unreadable", "critical")
    assert finding["subject"] == f"{lab['person_key']}|2823-3|unreadable"
    assert "unit 'U/L' cannot be converted to mmol/L" in finding["explanation"]
    assert (gap["code_system"], gap["local_code"], gap["status"]) == ("lab", "K [U/L]", "unit_unmapped")
    assert gap["candidate_codes"] == []  # the fix is a unit alias, not another code
    assert unreadable_count("critical_value.potassium") == before + 1


def test_a_code_sent_as_loinc_that_is_not_loinc_is_read_as_a_local_code(
    stage: NormaliseStage,
) -> None:
    """Issue 15: "K^Kalium^LN" was stored as loinc_code 'K'. It is this organisation's local
    code K (potassium), so it maps and alerts; a code neither LOINC nor local is unmapped."""
    out = _lab_outputs(stage, "OBX|1|NM|K^Kalium^LN||7.8|mmol/L|||||F", "C-42", 42)
    [lab] = out["t.norm.lab_result"]
    assert (lab["loinc_code"], lab["local_code"], lab["mapping_status"]) == ("2823-3", "K", "mapped")
    assert [f["rule_id"] for f in out["t.alerts.lifecycle"]] == ["critical_value.potassium"]
    out = _lab_outputs(stage, "OBX|1|NM|KX^Kalium^LN||7.8|mmol/L|||||F", "C-43", 43)
    [lab] = out["t.norm.lab_result"]
    [gap] = out["t.terminology.unmapped"]
    assert (lab["loinc_code"], lab["mapping_status"]) == (None, "unmapped")
    assert (gap["local_code"], gap["status"]) == ("KX", "unmapped")
    assert "t.alerts.lifecycle" not in out  # the analyte is unknown: the steward maps it first


def unreadable_count(rule_id: str) -> float:
    value = prometheus_client.REGISTRY.get_sample_value(
        "medstream_critical_values_unreadable_total", {"rule_id": rule_id}
    )
    return value or 0.0


def test_a_bug_on_one_record_dead_letters_that_record_and_the_next_is_processed(
    stage: NormaliseStage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A poison pill: a record that makes the code fail is dead-lettered, not a worker crash."""
    from streams import stage as stage_module

    real_normalise = stage_module.normalise

    def normalise_with_a_fake_bug(source_kind: str, raw: dict[str, Any], *args: Any) -> Any:
        # A fake of a bug, not of a dependency: it fails on one record only, after the
        # first outcome, so partial outputs exist and must be discarded.
        for outcome in real_normalise(source_kind, raw, *args):
            yield outcome
            if raw["message_control_id"] == "BUG-1":
                raise KeyError(f"{PATIENT_SURNAME} 6.9")  # the message may carry values

    monkeypatch.setattr(stage_module, "normalise", normalise_with_a_fake_bug)
    errors_before = internal_error_count()
    state = SuppressionState.in_memory()
    poisoned = encoded_hl7(potassium("6.9", 5), "BUG-1")
    outputs = stage.handle(
        "hl7_lab", RawContext("t.raw.hl7_lab", 2, 40, NOW_MS), b"k", poisoned, state, NOW_MS
    )
    assert [o.topic for o in outputs] == ["t.dlq"]
    dead = decode(outputs[0])
    assert (dead["stage"], dead["reason_code"]) == ("normalise", "internal_error")
    assert dead["original_value"] == poisoned and dead["record_index"] is None
    assert (dead["original_topic"], dead["original_offset"]) == ("t.raw.hl7_lab", 40)
    assert "KeyError" in dead["reason"] and "normalise_with_a_fake_bug" in dead["reason"]
    assert PATIENT_SURNAME not in dead["reason"] and "6.9" not in dead["reason"]
    assert internal_error_count() == errors_before + 1
    # The next record of the partition is processed as usual, and the failed record left
    # no state behind: its critical value did not suppress this one's alert.
    following = stage.handle(
        "hl7_lab", RawContext("t.raw.hl7_lab", 2, 41, NOW_MS), b"k",
        encoded_hl7(potassium("6.8", 6), "OK-2"), state, NOW_MS,
    )
    assert [o.topic for o in following] == ["t.norm.lab_result", "t.alerts.lifecycle"]
    assert decode(following[0])["value"] == 6.8


def test_an_unreachable_schema_registry_is_not_dead_lettered(
    terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    """Infrastructure failures are not the record's fault: they raise, and the worker restarts."""

    class UnreachableRegistry(serde.ManifestRegistry):
        """A fake of a registry that cannot be reached (the real one is not run in unit tests)."""

        def by_id(self, schema_id: int) -> serde.SchemaVersion:
            raise serde.RegistryUnavailable("the schema registry could not be asked (ConnectError)")

    rules = load_critical_value_rules(DEFAULT_CRITICAL_RULES_PATH)
    unreachable = NormaliseStage(KAFKA, UnreachableRegistry(), terminology, pseudonymiser, rules)
    with pytest.raises(serde.RegistryUnavailable):
        unreachable.handle(
            "hl7_lab", RawContext("t.raw.hl7_lab", 0, 1, NOW_MS), b"k",
            encoded_hl7(potassium("4.1", 6), "OK-3"), SuppressionState.in_memory(), NOW_MS,
        )


def internal_error_count() -> float:
    return prometheus_client.REGISTRY.get_sample_value(
        "medstream_internal_errors_total", {"stage": "normalise"}
    ) or 0.0
