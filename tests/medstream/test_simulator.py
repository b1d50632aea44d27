"""Unit tests of the region simulator: pure generation, ground truth and the publishing loop.

No Kafka here: publishing is exercised with a fake confluent-kafka producer that
acknowledges (or fails) deliveries the way librdkafka does, from poll() and flush().
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import time
from collections import Counter
from datetime import date, datetime
from pathlib import Path
from typing import Any

import hl7
import pytest
import yaml

from medstream.settings import RAW_TOPICS, KafkaSettings
from medstream.simulator import (
    PACKET_ROUNDS,
    RAW_SUBJECTS,
    RECORD_MIX,
    SOURCE_KINDS,
    PublishError,
    PublishReport,
    RegionSimulator,
    SimulatedMessage,
    SimulatorProducer,
    TokenBucket,
    load_region,
    load_rule_reference,
)
from schemas.identity import event_id, national_id_check_digit, national_id_is_valid
from schemas.serde import AvroDeserializer, AvroSerializer, ManifestRegistry, SerializationError

ROOT = Path(__file__).resolve().parents[2]
TERMINOLOGY_PATH = ROOT / "streams" / "dictionaries" / "terminology.yaml"
CRITICAL_RULES_PATH = ROOT / "streams" / "rules" / "critical_values.yaml"
NOW_MS = 1_795_000_000_000  # a fixed "now" (2026-11-17) for reproducible timestamps
RATE = 500.0  # records per second the paced test clock follows
LABEL_FIELDS = {
    "source_kind", "organisation_id", "source_ref", "record_index", "record_count", "event_id",
    "kind", "expect", "reason_code", "critical_rule", "critical_suppressed_reason", "unmapped",
    "duplicate_delivery",
}


def generate_timed(
    seed: int, events: int, now: int = NOW_MS, problem_rate: float = 0.02,
    anomaly_rate: float = 0.005, run_id: str = "T1",
) -> list[tuple[int, SimulatedMessage]]:
    """Messages with the clock reading they were generated at: the clock advances as a
    publisher paced at RATE records per second would (duplicates cost nothing)."""
    simulator = RegionSimulator(
        seed, problem_rate=problem_rate, anomaly_rate=anomaly_rate, records_per_second=RATE,
        run_id=run_id,
    )
    clock = [float(now)]
    timed = []
    for message in simulator.messages(events, now_ms=lambda: int(clock[0])):
        timed.append((int(clock[0]), message))
        if not message.labels[0]["duplicate_delivery"]:
            clock[0] += len(message.labels) * 1000 / RATE
    return timed


def generate(seed: int, events: int, now: int = NOW_MS, problem_rate: float = 0.02,
             anomaly_rate: float = 0.005, run_id: str = "T1") -> list[SimulatedMessage]:
    return [m for _, m in generate_timed(seed, events, now, problem_rate, anomaly_rate, run_id)]


@pytest.fixture(scope="module", autouse=True)
def rule_reference() -> Any:
    return load_rule_reference()  # loaded once, outside the timed tests


@pytest.fixture(scope="module")
def run5k() -> list[SimulatedMessage]:
    return [m for _, m in timed5k_of()]


@functools.cache
def timed5k_of() -> list[tuple[int, SimulatedMessage]]:
    return generate_timed(seed=20261124, events=5_000)


@pytest.fixture(scope="module")
def timed5k() -> list[tuple[int, SimulatedMessage]]:
    return timed5k_of()


@pytest.fixture(scope="module")
def region() -> Any:
    return load_region()


@pytest.fixture(scope="module")
def registry() -> ManifestRegistry:
    return ManifestRegistry()


# --- helpers that read the messages the way a downstream parser would ---------------------


def segments(payload: str) -> list[list[str]]:
    return [segment.split("|") for segment in payload.split("\r") if segment]


def field(segment: list[str], number: int) -> str:
    # MSH-1 is the field separator itself, so MSH fields sit one position to the left.
    index = number - 1 if segment[0] == "MSH" else number
    return segment[index] if index < len(segment) else ""


def obx_segments(payload: str) -> list[list[str]]:
    return [s for s in segments(payload) if s[0] == "OBX"]


def pid_identifiers(payload: str) -> tuple[str, str]:
    pid = next(s for s in segments(payload) if s[0] == "PID")
    mrn_repeat, national_repeat = field(pid, 3).split("~")
    assert mrn_repeat.split("^")[4] == "MR" and national_repeat.split("^")[4] == "NI"
    return mrn_repeat.split("^")[0], national_repeat.split("^")[0]


def specimen_condition(payload: str) -> str:
    spm = [s for s in segments(payload) if s[0] == "SPM"]
    return field(spm[0], 24) if spm else ""


def source_ref(message: SimulatedMessage) -> str:
    value = message.value
    assert isinstance(value, dict)
    if message.source_kind == "hl7_lab":
        return str(value["message_control_id"])
    if message.source_kind == "emr_cdc":
        return str(value["message_id"])
    if message.source_kind == "device":
        return f"{value['device_id']}:{value['packet_id']}"
    return f"{value['payer_id']}:{value['claim_id']}"


def record_count(message: SimulatedMessage) -> int:
    value = message.value
    assert isinstance(value, dict)
    if message.source_kind == "hl7_lab":
        return len(obx_segments(value["payload"]))
    if message.source_kind == "device":
        return len(value["samples"])
    if message.source_kind == "claim":
        return len(value["lines"])
    return 1


def is_iso_timestamp_with_offset(text: str) -> bool:
    try:
        return datetime.fromisoformat(text).tzinfo is not None
    except ValueError:
        return False


_TIME_TEXT = re.compile(r"\d{14}\+0800|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+08:00")
_TIME_FIELDS = {"received_time", "commit_time", "captured_time", "sent_time", "sample_time",
                "submitted_time", "service_date"}


def without_times(message: SimulatedMessage) -> Any:
    """The message content with every timestamp blanked out."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: None if k in _TIME_FIELDS else strip(v) for k, v in value.items()}
        if isinstance(value, list):
            return [strip(v) for v in value]
        if isinstance(value, str):
            return _TIME_TEXT.sub("T", value)
        return value

    return message.source_kind, message.key, strip(message.value), message.labels


def labels_of(messages: list[SimulatedMessage]) -> list[dict[str, Any]]:
    return [label for message in messages for label in message.labels]


def first_copies(messages: list[SimulatedMessage]) -> list[SimulatedMessage]:
    return [m for m in messages if not m.labels[0]["duplicate_delivery"]]


# --- determinism and mix ----------------------------------------------------------------


def test_same_seed_gives_the_same_messages() -> None:
    first = generate(seed=7, events=2_000)
    second = generate(seed=7, events=2_000)
    assert first == second
    assert generate(seed=8, events=2_000) != first


def test_content_does_not_depend_on_the_clock() -> None:
    today = generate(seed=7, events=2_000)
    tomorrow = generate(seed=7, events=2_000, now=NOW_MS + 86_400_000)
    assert [m.labels for m in today] == [m.labels for m in tomorrow]
    assert [m.key for m in today] == [m.key for m in tomorrow]
    # Identities, codes and values are the same; only the timestamps moved.
    assert [without_times(m) for m in today] == [without_times(m) for m in tomorrow]
    assert [m.value for m in today] != [m.value for m in tomorrow]


def test_generates_at_least_the_requested_records_and_stops(run5k: list[SimulatedMessage]) -> None:
    counted = first_copies(run5k)
    records = sum(len(m.labels) for m in counted)
    assert 5_000 <= records < 5_000 + 10
    assert records - len(counted[-1].labels) < 5_000  # stopped right after reaching the count
    assert run5k[-1] is counted[-1]


def test_record_mix_follows_the_target() -> None:
    messages = generate(seed=3, events=20_000)
    records: Counter[str] = Counter()
    for message in first_copies(messages):
        records[message.source_kind] += len(message.labels)
    total = sum(records.values())
    for kind, share in RECORD_MIX.items():
        assert abs(records[kind] / total - share) < 0.03, (kind, records[kind] / total)


def test_problem_rate_is_about_the_requested_share() -> None:
    for rate in (0.02, 0.1):
        messages = generate(seed=5, events=20_000, problem_rate=rate, anomaly_rate=0.0)
        problems = sum(
            1 for m in messages
            if any(label["expect"] != "stored" or label["critical_rule"]
                   or label["critical_suppressed_reason"] or label["unmapped"]
                   or label["duplicate_delivery"] for label in m.labels)
        )
        assert abs(problems / len(messages) - rate) < rate * 0.2, (rate, problems / len(messages))
    clean = generate(seed=5, events=3_000, problem_rate=0.0, anomaly_rate=0.0)
    assert all(label["expect"] == "stored" and not label["unmapped"]
               and label["critical_rule"] is None for label in labels_of(clean))


def test_generating_10k_events_is_fast() -> None:
    started = time.perf_counter()
    messages = generate(seed=1, events=10_000)
    assert time.perf_counter() - started < 2.0
    assert len(messages) > 1_000


# --- contracts ------------------------------------------------------------------------------


def test_every_record_value_encodes_with_its_raw_schema(
    run5k: list[SimulatedMessage], registry: ManifestRegistry
) -> None:
    serializers = {k: AvroSerializer(registry, s) for k, s in RAW_SUBJECTS.items()}
    deserializers = {k: AvroDeserializer(registry, s) for k, s in RAW_SUBJECTS.items()}
    encoded: Counter[str] = Counter()
    for message in run5k:
        if isinstance(message.value, bytes):
            continue
        data = serializers[message.source_kind](message.value)
        decoded = deserializers[message.source_kind](data)
        assert decoded["organisation_id"] == message.value["organisation_id"]
        encoded[message.source_kind] += 1
    assert set(encoded) == set(SOURCE_KINDS)


def test_keys_are_organisation_and_patient_mrn(run5k: list[SimulatedMessage]) -> None:
    """Device packets are keyed by device id, as the device collector keys them."""
    for message in run5k:
        if message.source_kind == "device" and isinstance(message.value, dict):
            assert message.key == message.value["device_id"].encode()
            assert message.value["device_id"].startswith(message.value["organisation_id"] + "-")
            continue
        organisation, _, mrn = message.key.decode().partition(":")
        assert mrn
        if isinstance(message.value, bytes):
            continue
        assert organisation == message.value["organisation_id"]
        if message.source_kind == "hl7_lab" and message.value["payload"].startswith("MSH"):
            assert pid_identifiers(message.value["payload"])[0] == mrn
        elif message.source_kind == "device":
            raise AssertionError("device packets are keyed by device id")
        elif message.source_kind == "claim":
            assert message.value["patient_local_id"] == mrn
        elif message.source_kind == "emr_cdc":
            row = message.value["after"] or message.value["before"]
            assert row["patient_mrn"] == mrn


def test_labels_have_the_documented_shape_and_event_ids(run5k: list[SimulatedMessage]) -> None:
    for message in run5k:
        for label in message.labels:
            assert set(label) == LABEL_FIELDS
            assert label["source_kind"] == message.source_kind
            assert label["expect"] in ("stored", "dead_letter")
            if label["record_index"] is None:  # whole-message failure
                assert len(message.labels) == 1
                assert label["event_id"] is None and label["kind"] is None
                assert label["expect"] == "dead_letter"
                continue
            assert label["event_id"] == event_id(
                label["source_kind"], label["organisation_id"], label["source_ref"],
                label["record_index"],
            )
        if isinstance(message.value, bytes) or message.labels[0]["record_index"] is None:
            continue
        assert [label["record_index"] for label in message.labels] == list(
            range(len(message.labels))
        )
        for label in message.labels:
            assert label["source_ref"] == source_ref(message)
            assert label["organisation_id"] == message.value["organisation_id"]
            assert label["record_count"] == record_count(message) == len(message.labels)
    event_ids = [label["event_id"] for label in labels_of(first_copies(run5k))
                 if label["event_id"] is not None]
    assert len(event_ids) == len(set(event_ids))


def test_emr_row_changes(run5k: list[SimulatedMessage]) -> None:
    last_seq: dict[str, int] = {}
    ops: Counter[tuple[str, str]] = Counter()
    for message in first_copies(run5k):
        if message.source_kind != "emr_cdc" or isinstance(message.value, bytes):
            continue
        value = message.value
        ops[(value["table"], value["op"])] += 1
        org = value["organisation_id"]
        assert value["position_seq"] > last_seq.get(org, 0)
        last_seq[org] = value["position_seq"]
        expected_id = f"{value['source_system']}:S20261124RT1:{value['position_seq']}:0"
        assert value["message_id"] == expected_id
        assert re.fullmatch(r"[0-9A-F]+/[0-9A-F]{8}", value["source_position"])
        assert message.labels[0]["kind"] == (
            "encounter" if value["table"] == "patient_visit" else "diagnosis"
        )
        row = value["before"] if value["op"] == "d" else value["after"]
        assert (value["after"] is None) == (value["op"] == "d")
        if value["table"] == "patient_visit":
            assert set(row) == {"visit_no", "patient_mrn", "patient_name", "id_number",
                                "birth_date", "sex", "visit_type", "dept_code", "admit_time",
                                "discharge_time", "death_time"}
            assert row["death_time"] is None or row["death_time"] == row["discharge_time"]
            assert row["sex"] in ("M", "F", "U") and row["visit_type"] in ("I", "O", "E")
            date.fromisoformat(row["birth_date"])
            if message.labels[0]["expect"] == "stored":
                assert row["admit_time"].endswith("+08:00")
        else:
            assert set(row) == {"diag_id", "visit_no", "patient_mrn", "diag_code", "diag_name",
                                "diag_type", "diag_time"}
            assert row["diag_type"] in ("A", "D", "O")
    for change in [("patient_visit", "c"), ("patient_visit", "u"), ("patient_visit", "d"),
                   ("visit_diagnosis", "c"), ("visit_diagnosis", "d"), ("visit_diagnosis", "r")]:
        assert ops[change] > 0, change


def test_hl7_messages_are_oru_r01_v251(run5k: list[SimulatedMessage]) -> None:
    control_ids: set[tuple[str, str]] = set()
    for message in first_copies(run5k):
        if message.source_kind != "hl7_lab" or isinstance(message.value, bytes):
            continue
        payload = message.value["payload"]
        if not payload.startswith("MSH"):
            continue
        parsed = hl7.parse(payload)
        msh = segments(payload)[0]
        assert field(msh, 4) == message.value["organisation_id"] == str(parsed["MSH.F4"])
        assert field(msh, 9) == "ORU^R01^ORU_R01" and field(msh, 12) == "2.5.1"
        assert field(msh, 10) == message.value["message_control_id"]
        assert re.fullmatch(r"\d{14}\+0800", field(msh, 7))
        assert (field(msh, 4), field(msh, 10)) not in control_ids
        control_ids.add((field(msh, 4), field(msh, 10)))
        obr = next(s for s in segments(payload) if s[0] == "OBR")
        assert field(obr, 3) and field(obr, 4).endswith("^L") and field(obr, 7)
        for obx in obx_segments(payload):
            assert field(obx, 2) == "NM" and field(obx, 11) == "F"
            assert field(obx, 3).endswith("^L") and field(obx, 6)
            assert re.fullmatch(r"[\d.]+-[\d.]+", field(obx, 7))
            assert field(obx, 8) in ("N", "H", "L", "HH", "LL", "")
            assert re.fullmatch(r"\d{14}\+0800", field(obx, 14))


def test_event_times_are_now_minus_at_most_ten_minutes(
    timed5k: list[tuple[int, SimulatedMessage]]
) -> None:
    for now, message in timed5k:
        value = message.value
        if isinstance(value, bytes) or message.labels[0]["duplicate_delivery"]:
            continue
        if message.source_kind == "device":
            # Due packets go out first: sent on their cadence, not later than the clock.
            interval = value["samples"][-1]["sample_time"] - value["samples"][0]["sample_time"]
            assert value["samples"][-1]["sample_time"] == value["sent_time"]
            assert interval % (PACKET_ROUNDS - 1) == 0
            assert now - 60_000 <= value["sent_time"] <= now
        elif message.source_kind == "claim":
            assert now - 600_000 <= value["submitted_time"] <= now
        elif message.source_kind == "hl7_lab":
            assert value["received_time"] == now
        else:
            assert now - 2_000 <= value["commit_time"] <= value["captured_time"] <= now


# --- identifiers ----------------------------------------------------------------------------


def test_national_id_check_digit_algorithm() -> None:
    # The ISO 7064 MOD 11-2 worked example of GB 11643: 11010519491231002X.
    assert national_id_check_digit("11010519491231002") == "X"
    assert national_id_is_valid("11010519491231002X")
    assert not national_id_is_valid("110105194912310021")


def test_national_ids_are_synthetic_and_valid(run5k: list[SimulatedMessage]) -> None:
    people: dict[str, tuple[str, str]] = {}  # one person, one birth date and sex everywhere
    seen = 0
    for message in run5k:
        value = message.value
        if isinstance(value, bytes):
            continue
        found: list[tuple[str, str, str]] = []  # (id number, birth YYYYMMDD, sex)
        if message.source_kind == "hl7_lab" and value["payload"].startswith("MSH"):
            pid = next(s for s in segments(value["payload"]) if s[0] == "PID")
            found.append((pid_identifiers(value["payload"])[1], field(pid, 7), field(pid, 8)))
        elif message.source_kind == "emr_cdc" and value["table"] == "patient_visit":
            row = value["after"] or value["before"]
            found.append((row["id_number"], row["birth_date"].replace("-", ""), row["sex"]))
        elif message.source_kind == "claim" and value["patient_id_number"]:
            found.append((value["patient_id_number"], value["patient_id_number"][6:14], ""))
        for id_number, birth, sex in found:
            seen += 1
            assert len(id_number) == 18 and id_number.startswith("990000")
            assert national_id_is_valid(id_number), id_number
            assert id_number[6:14] == birth
            if sex in ("M", "F"):
                assert int(id_number[16]) % 2 == (1 if sex == "M" else 0)
            if sex:
                assert people.setdefault(id_number, (birth, sex)) == (birth, sex)
    assert seen > 500
    assert len(people) > 200


# --- injected problems ----------------------------------------------------------------------


def lab_lookup(region: Any) -> dict[tuple[str, str], Any]:
    return {(h.organisation_id, code): test for h in region.hospitals
            for code, test in h.lab_tests.items()}


def test_every_problem_kind_appears_with_matching_labels(
    run5k: list[SimulatedMessage], region: Any, registry: ManifestRegistry
) -> None:
    tests = lab_lookup(region)
    unmapped_diagnoses = {(h.organisation_id, d.code) for h in region.hospitals
                          for d in h.diagnoses if d.unmapped}
    unmapped_items = {(h.organisation_id, i.code) for h in region.hospitals
                      for i in h.claim_items if i.unmapped}
    seen: Counter[str] = Counter()
    originals: dict[str, SimulatedMessage] = {}
    for message in run5k:
        value = message.value
        labels = message.labels
        if labels[0]["duplicate_delivery"]:
            original = originals[labels[0]["source_ref"] + message.source_kind]
            assert original.value == value and original.key == message.key
            assert [{**label, "duplicate_delivery": True} for label in original.labels] == labels
            seen["duplicate"] += 1
            continue
        originals[labels[0]["source_ref"] + message.source_kind] = message
        if isinstance(value, bytes):  # (a)
            assert labels[0]["reason_code"] == "undecodable"
            with pytest.raises(SerializationError):
                AvroDeserializer(registry, RAW_SUBJECTS[message.source_kind])(value)
            seen["undecodable"] += 1
            continue
        for label in labels:
            assert label["expect"] == ("dead_letter" if label["reason_code"] else "stored")
        if message.source_kind == "hl7_lab":
            payload = value["payload"]
            if labels[0]["reason_code"] == "invalid_message":  # (b)
                assert not payload.startswith("MSH")
                seen["invalid_hl7"] += 1
                continue
            condition = specimen_condition(payload)
            for label, obx in zip(labels, obx_segments(payload), strict=True):
                test = tests[(value["organisation_id"], field(obx, 3).split("^")[0])]
                assert label["unmapped"] == test.unmapped
                if label["reason_code"] == "invalid_record":  # (c)
                    assert not re.fullmatch(r"[\d.]+", field(obx, 5))
                    assert field(obx, 2) == "NM"
                    seen["nonnumeric_obx"] += 1
                    continue
                reading = float(field(obx, 5))
                flagged_critical = field(obx, 8) in ("HH", "LL")
                assert flagged_critical == bool(
                    label["critical_rule"] or label["critical_suppressed_reason"]
                )
                if label["critical_rule"]:
                    assert label["critical_rule"] == region.alerting[test.analyte].rule_id
                    assert condition == "" and not test.unmapped
                    seen["critical"] += 1
                elif label["critical_suppressed_reason"] == "haemolysed":
                    assert condition == "HEM^Haemolysed" and test.analyte == "potassium"
                    assert reading > test.critical[1]
                    seen["critical_haemolysed"] += 1
                elif label["critical_suppressed_reason"] == "unmapped":
                    assert test.unmapped and test.analyte in region.alerting
                    seen["critical_unmapped"] += 1
                elif label["unmapped"]:
                    seen["unmapped_lab"] += 1
            if condition:
                assert any(label["critical_suppressed_reason"] == "haemolysed"
                           for label in labels)
        elif message.source_kind == "claim":
            for label, line in zip(labels, value["lines"], strict=True):
                assert label["unmapped"] == ((value["organisation_id"], line["item_code"])
                                             in unmapped_items)
                assert line["amount"] == round(line["quantity"] * line["unit_price"], 2)
                if label["reason_code"] == "invalid_record":  # (d)
                    assert line["amount"] < 0
                    seen["negative_claim_amount"] += 1
                else:
                    assert line["amount"] > 0
                    seen["unmapped_claim_item"] += label["unmapped"]
        elif message.source_kind == "emr_cdc":
            label = labels[0]
            row = value["after"] or value["before"]
            if label["reason_code"] == "invalid_record":  # (e)
                assert value["table"] == "patient_visit"
                assert not is_iso_timestamp_with_offset(row["admit_time"])
                seen["invalid_admit_time"] += 1
            elif value["table"] == "patient_visit":
                assert is_iso_timestamp_with_offset(row["admit_time"])
            if value["table"] == "visit_diagnosis":
                assert label["unmapped"] == ((value["organisation_id"], row["diag_code"])
                                             in unmapped_diagnoses)
                seen["unmapped_diagnosis"] += label["unmapped"]
            else:
                assert not label["unmapped"]
        else:
            assert not any(label["unmapped"] or label["reason_code"] for label in labels)
    expected = {"critical", "critical_haemolysed", "critical_unmapped", "undecodable",
                "invalid_hl7", "nonnumeric_obx", "negative_claim_amount", "invalid_admit_time",
                "unmapped_lab", "unmapped_diagnosis", "unmapped_claim_item", "duplicate"}
    assert expected <= {kind for kind, count in seen.items() if count > 0}, seen


def test_criticals_are_unique_per_patient_and_analyte(region: Any) -> None:
    tests = lab_lookup(region)
    messages = generate(seed=99, events=30_000, problem_rate=0.1)
    criticals: Counter[tuple[str, str]] = Counter()
    out_of_range: Counter[tuple[str, str]] = Counter()  # any non-N flag, criticals included
    local_criticals: Counter[tuple[str, str, str]] = Counter()
    for message in first_copies(messages):
        if message.source_kind != "hl7_lab" or isinstance(message.value, bytes):
            continue
        payload = message.value["payload"]
        if not payload.startswith("MSH"):
            continue
        mrn, national_id = pid_identifiers(payload)
        for label, obx in zip(message.labels, obx_segments(payload), strict=True):
            analyte = tests[(message.value["organisation_id"], field(obx, 3).split("^")[0])].analyte
            if field(obx, 8) not in ("N", ""):
                out_of_range[(national_id, analyte)] += 1
            if label["critical_rule"] or label["critical_suppressed_reason"]:
                criticals[(national_id, analyte)] += 1
                local_criticals[(message.value["organisation_id"], mrn, analyte)] += 1
    assert len(criticals) > 100
    assert max(criticals.values()) == 1
    assert max(local_criticals.values()) == 1
    for pair in criticals:
        assert out_of_range[pair] == 1, pair  # the critical itself and nothing else


def test_critical_values_cross_the_regional_rules_after_mapping(region: Any) -> None:
    """Labels agree with streams/rules/critical_values.yaml applied to mapped values."""
    from streams.terminology import load_terminology

    terminology = yaml.safe_load(TERMINOLOGY_PATH.read_text(encoding="utf-8"))["organisations"]
    mapped_terms = load_terminology(TERMINOLOGY_PATH)
    rules = {r["loinc"]: r for r in
             yaml.safe_load(CRITICAL_RULES_PATH.read_text(encoding="utf-8"))["rules"]}
    messages = generate(seed=42, events=30_000, problem_rate=0.1)
    checked: Counter[str] = Counter()
    for message in first_copies(messages):
        if message.source_kind != "hl7_lab" or isinstance(message.value, bytes):
            continue
        payload = message.value["payload"]
        if not payload.startswith("MSH"):
            continue
        haemolysed = specimen_condition(payload).startswith("HEM")
        for label, obx in zip(message.labels, obx_segments(payload), strict=True):
            if label["expect"] != "stored":
                continue
            mapping = terminology[message.value["organisation_id"]]["lab"].get(
                field(obx, 3).split("^")[0]
            )
            assert (mapping is None) == label["unmapped"]
            if mapping is None:
                continue
            assert field(obx, 6) == mapping["local_unit"]
            rule = rules.get(mapping["loinc"])
            if rule is None:
                continue
            # The units library converts (producers must not import streams: the test may).
            converted = mapped_terms.lab(
                message.value["organisation_id"], field(obx, 3).split("^")[0]
            )
            assert converted is not None
            standard = converted.to_standard(float(field(obx, 5)), field(obx, 6))
            assert standard is not None
            beyond = (rule["low"] is not None and standard < rule["low"]) or (
                rule["high"] is not None and standard > rule["high"]
            )
            excluded = haemolysed and "haemolysed" in rule["exclude_specimen_status"]
            assert (beyond and not excluded) == (label["critical_rule"] == rule["rule_id"]), (
                label, standard)
            checked["critical" if label["critical_rule"] else "normal"] += 1
    assert checked["critical"] > 50 and checked["normal"] > 1_000


# --- the region and the terminology map -------------------------------------------------------


def test_terminology_maps_every_region_code_except_the_unmapped_ones(region: Any) -> None:
    document = yaml.safe_load(TERMINOLOGY_PATH.read_text(encoding="utf-8"))
    organisations = document["organisations"]
    assert set(organisations) == {h.organisation_id for h in region.hospitals}
    for hospital in region.hospitals:
        dictionary = organisations[hospital.organisation_id]
        for code, test in hospital.lab_tests.items():
            assert (code in dictionary["lab"]) != test.unmapped, code
            if not test.unmapped:
                assert dictionary["lab"][code]["local_unit"] == test.unit, code
        for diagnosis in hospital.diagnoses:
            assert (diagnosis.code in dictionary["diagnosis"]) != diagnosis.unmapped
        for item in hospital.claim_items:
            assert (item.code in dictionary["claim_item"]) != item.unmapped
        assert set(dictionary["department"]) == {d.code for d in hospital.departments}
        for device_type, _count in hospital.devices:
            metrics = dictionary["device_metric"][device_type]
            for metric in region.device_types[device_type].metrics:
                assert metrics[metric.code]["local_unit"] == metric.unit
        for entry in dictionary["claim_item"].values():
            assert re.fullmatch(r"[A-Z]\d\d[A-Z]{2}\d\d|\d{9}", entry)
        for entry in dictionary["diagnosis"].values():
            assert re.fullmatch(r"[A-Z]\d\d(\.\d)?", entry)
        for section in ("diagnosis", "department", "claim_item"):
            assert all(isinstance(k, str) and isinstance(v, str)
                       for k, v in dictionary[section].items())


def test_region_is_fictional(region: Any) -> None:
    assert region.national_id_area_code == "990000"
    text = (ROOT / "medstream" / "region.yaml").read_text(encoding="utf-8")
    document = yaml.safe_load(text)
    assert all("fictional" in h["name_en"] for h in document["hospitals"])
    assert all("fictional" in p["name"] for p in document["payers"])
    assert not re.search(r"\b1[3-9]\d{9}\b", text)  # no mobile numbers
    assert not re.search(r"\b\d{17}[\dX]\b", text)  # no ID numbers


# --- publishing (fake confluent-kafka producer) ---------------------------------------------


def stepping_clock(step_ms: int = 20) -> Any:
    """A deterministic wall clock: each reading is ``step_ms`` later than the one before."""
    readings = itertools.count(NOW_MS, step_ms)
    return lambda: next(readings)


class FakeProducer:
    """Queues produce() calls and runs their delivery callbacks on poll()/flush()."""

    fail_every: int = 0
    instances: list[FakeProducer] = []

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.pending: list[tuple[str, bytes, bytes, Any]] = []
        self.delivered: list[tuple[str, bytes, bytes]] = []
        self.headers: list[Any] = []
        self.produced = 0
        FakeProducer.instances.append(self)

    def produce(
        self, topic: str, key: bytes, value: bytes, on_delivery: Any, headers: Any = None
    ) -> None:
        self.pending.append((topic, key, value, on_delivery))
        self.headers.append(headers)

    def poll(self, timeout: float = 0) -> int:
        served = 0
        while self.pending:
            topic, key, value, callback = self.pending.pop(0)
            self.produced += 1
            if self.fail_every and self.produced % self.fail_every == 0:
                callback("KafkaError{code=_MSG_TIMED_OUT}", None)
            else:
                self.delivered.append((topic, key, value))
                callback(None, object())
            served += 1
        return served

    def flush(self, timeout: float = 0) -> int:
        self.poll()
        return 0


@pytest.fixture
def fake_producer(monkeypatch: pytest.MonkeyPatch) -> type[FakeProducer]:
    import confluent_kafka

    FakeProducer.fail_every = 0
    FakeProducer.instances = []
    monkeypatch.setattr(confluent_kafka, "Producer", FakeProducer)
    return FakeProducer


def test_publishes_to_raw_topics_and_writes_acknowledged_labels(
    fake_producer: type[FakeProducer], tmp_path: Path, registry: ManifestRegistry
) -> None:
    kafka = KafkaSettings(bootstrap_servers="fake:9092", topic_prefix="t1.")
    labels_path = tmp_path / "labels.jsonl"
    reports: list[PublishReport] = []
    producer = SimulatorProducer(kafka, registry, RegionSimulator(3, anomaly_rate=0.0, run_id="r1"),
                                 labels_path, now_ms=stepping_clock())
    report = producer.run(3_000, progress=reports.append)
    fake = fake_producer.instances[0]
    assert fake.config["enable.idempotence"] is True and fake.config["acks"] == "all"
    assert {topic for topic, _, _ in fake.delivered} == {
        "t1." + RAW_TOPICS[kind] for kind in SOURCE_KINDS
    }
    assert report.total_messages == len(fake.delivered)
    assert report.total_records >= 3_000 and report.delivery_failures == 0
    assert report.duplicates > 0 and report.malformed > 0
    assert reports and reports[-1].total_messages == report.total_messages
    lines = [json.loads(line) for line in labels_path.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == report.labels_written
    assert sum(1 for line in lines if not line["duplicate_delivery"]) == report.total_records
    # The published bytes are what the simulator generated, for the same seed and clock.
    expected = list(
        RegionSimulator(3, anomaly_rate=0.0, run_id="r1").messages(3_000, stepping_clock())
    )
    assert [key for _, key, _ in fake.delivered] == [m.key for m in expected]
    assert [line["event_id"] for line in lines] == [
        label["event_id"] for m in expected for label in m.labels
    ]
    # The run is named in the report, on every label line and on every record.
    assert report.run_id == producer.run_id == "r1"
    assert {line["run_id"] for line in lines} == {"r1"}
    assert all(headers == [("medstream-run", b"r1")] for headers in fake.headers)


def test_anomaly_labels_are_written_after_the_acknowledgement_of_their_last_record(
    fake_producer: type[FakeProducer], tmp_path: Path, registry: ManifestRegistry
) -> None:
    labels_path = tmp_path / "labels.jsonl"
    clock = stepping_clock()
    producer = SimulatorProducer(
        KafkaSettings(bootstrap_servers="fake:9092"), registry,
        RegionSimulator(9, anomaly_rate=0.05, records_per_second=150), labels_path,
        now_ms=clock,
    )
    report = producer.run(4_000)
    lines = [json.loads(line) for line in labels_path.read_text(encoding="utf-8").splitlines()]
    anomalies = [(i, line) for i, line in enumerate(lines) if line["expect"] == "anomaly"]
    assert report.anomalies == len(anomalies) >= 10
    assert report.labels_written == len(lines)
    assert sum(1 for line in lines if line["expect"] != "anomaly"
               and not line["duplicate_delivery"]) == report.total_records
    position = {line["event_id"]: i for i, line in enumerate(lines)
                if line["event_id"] and not line["duplicate_delivery"]}
    silence = load_rule_reference().devices
    finished = clock()
    for index, label in anomalies:
        # Every record the anomaly needs was acknowledged (labelled) before its line.
        assert all(position[e] < index for e in label["event_ids"]), label
        delay = 0
        if label["rule_id"] == "device.silence":
            device_type = label["subject"].split("-", 1)[1].rsplit("-", 1)[0]
            delay = silence.silence_after_ms(device_type)
        assert NOW_MS < label["detectable_from_ms"] - delay < finished


def test_delivery_failures_are_counted_and_raise_without_labels(
    fake_producer: type[FakeProducer], tmp_path: Path, registry: ManifestRegistry
) -> None:
    fake_producer.fail_every = 10
    labels_path = tmp_path / "labels.jsonl"
    producer = SimulatorProducer(
        KafkaSettings(bootstrap_servers="fake:9092"), registry, RegionSimulator(4), labels_path
    )
    with pytest.raises(PublishError) as failure:
        producer.run(1_000)
    report = failure.value.report
    fake = fake_producer.instances[0]
    assert report.delivery_failures == fake.produced // 10 > 0
    assert report.total_messages == len(fake.delivered)
    lines = labels_path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == report.labels_written


def test_should_stop_ends_the_run_early(
    fake_producer: type[FakeProducer], registry: ManifestRegistry
) -> None:
    calls = iter(range(1_000_000))
    producer = SimulatorProducer(
        KafkaSettings(bootstrap_servers="fake:9092"), registry, RegionSimulator(5)
    )
    report = producer.run(100_000, should_stop=lambda: next(calls) >= 50)
    assert report.total_messages == 50


def test_token_bucket_paces_without_spinning() -> None:
    clock = [0.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock[0] += seconds

    bucket = TokenBucket(rate=100.0, clock=lambda: clock[0], sleep=sleep)
    for _ in range(200):
        bucket.acquire(5)  # 1000 tokens at 100/s: about 10 s minus the initial burst
    assert 9.8 <= clock[0] <= 10.0
    assert all(s > 0 for s in sleeps) and len(sleeps) <= 200


def test_rate_limit_slows_publishing(
    fake_producer: type[FakeProducer], registry: ManifestRegistry
) -> None:
    producer = SimulatorProducer(
        KafkaSettings(bootstrap_servers="fake:9092"), registry, RegionSimulator(6), rate=2_000
    )
    started = time.monotonic()
    report = producer.run(600)
    elapsed = time.monotonic() - started
    assert report.total_records >= 600
    assert 0.2 <= elapsed < 2.0


def test_source_ids_differ_between_seeds_so_runs_never_collide() -> None:
    def source_refs(seed: int) -> set[str]:
        return {
            label["source_ref"]
            for message in RegionSimulator(seed, run_id="r1").messages(2_000, stepping_clock())
            for label in message.labels
            if not label["source_ref"].startswith("undecodable")
        }

    first, again, other = source_refs(1), source_refs(1), source_refs(2)
    assert first == again  # deterministic per seed and run
    assert first and not first & other


def event_ids(messages: list[SimulatedMessage]) -> set[str]:
    return {label["event_id"] for m in messages for label in m.labels if label["event_id"]}


def test_a_second_run_of_the_same_seed_sends_the_same_content_under_new_ids() -> None:
    first = generate(seed=7, events=2_000, run_id="a1")
    second = generate(seed=7, events=2_000, run_id="b2")
    # Disjoint event ids: a second run never reuses an id for other content.
    assert len(event_ids(first)) > 1_500 and not event_ids(first) & event_ids(second)
    # Same content: the same patients, values and times, in the same order.
    assert [m.key for m in first] == [m.key for m in second]
    def content(m: SimulatedMessage, run_id: str) -> Any:
        text = json.dumps(without_times(m)[:3], default=str).replace(f"R{run_id}", "R*")
        outcomes = [{k: v for k, v in label.items() if k not in ("event_id", "source_ref")}
                    for label in m.labels]
        return json.loads(text), outcomes

    assert [content(m, "a1") for m in first] == [content(m, "b2") for m in second]


def test_each_simulator_gets_its_own_run_id_by_default() -> None:
    first, second = RegionSimulator(7), RegionSimulator(7)
    assert first.run_id != second.run_id and len(first.run_id) == 8
    assert first.id_tag == f"S7R{first.run_id}"
    with pytest.raises(ValueError, match="run_id"):
        RegionSimulator(7, run_id="has space")


def test_duplicate_deliveries_repeat_their_original_ids_within_a_run() -> None:
    messages = generate(seed=7, events=3_000, run_id="a1")
    originals = event_ids([m for m in messages if not m.labels[0]["duplicate_delivery"]])
    duplicates = event_ids([m for m in messages if m.labels[0]["duplicate_delivery"]])
    assert duplicates and duplicates <= originals



def test_population_is_bounded_for_endless_runs() -> None:
    simulator = RegionSimulator(4, max_patients_per_hospital=400)
    initial = {hs.org: len(hs.patients) for hs in simulator._hospitals}
    for _ in simulator.messages(40_000):
        pass
    for hs in simulator._hospitals:
        # Admissions stop registering new patients at the cap; only the rare injected
        # critical value may still need a patient without history.
        assert len(hs.patients) <= max(400, initial[hs.org]) + 60, hs.org
    unbounded = RegionSimulator(4)
    for _ in unbounded.messages(40_000):
        pass
    assert sum(len(hs.patients) for hs in unbounded._hospitals) > sum(
        len(hs.patients) for hs in simulator._hospitals
    )
