"""Critical lab value detection: limits, exclusions, suppression windows and the alert record."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from schemas import serde
from streams.critical_values import (
    DEFAULT_CRITICAL_RULES_PATH,
    UNREADABLE_RULE_ID,
    CriticalFinding,
    CriticalRulesError,
    CriticalValueRules,
    UnreadableCritical,
    check_critical,
    critical_finding,
    is_suppressed,
    load_critical_value_rules,
    rule_for,
    suppression_key,
    unreadable_finding,
)
from streams.findings import Finding
from streams.model import NormalisedEvent, RawContext
from streams.normalise import normalise
from streams.pseudonym import Pseudonymiser
from streams.terminology import Terminology, load_terminology
from streams.units import UnitReader

NOW_MS = 1_793_700_009_000
HOUR_MS = 3_600_000
_REGISTRY = serde.ManifestRegistry()


@pytest.fixture(scope="module")
def rules() -> CriticalValueRules:
    return load_critical_value_rules()


def lab_result(
    loinc: str = "2823-3", value: float | None = 6.9, unit: str | None = "mmol/L", **overrides: Any
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "event_id": "e" * 32,
        "source_kind": "hl7_lab",
        "source_system": "lis-mllp",
        "organisation_id": "H001",
        "event_time": 1_793_699_100_000,
        "ingest_time": 1_793_699_400_000,
        "normalised_time": 1_793_699_400_050,
        "source_topic": "raw.hl7_lab",
        "source_partition": 3,
        "source_offset": 4711,
        "record_index": 0,
        "record_count": 1,
        "source_ref": "LAB-0001",
        "mapping_version": "test-2026.1",
        "person_key": "p" * 32,
        "order_id": "FO-1001",
        "loinc_code": loinc,
        "local_code": "K",
        "local_display": "Potassium",
        "value": value,
        "value_text": None,
        "unit": unit,
        "original_value": None if value is None else str(value),
        "original_unit": unit,
        "abnormal_flag": None,
        "result_status": "F",
        "specimen_status": None,
        "mapping_status": "mapped",
        "reference_low": None,
        "reference_high": None,
    }
    record.update(overrides)
    return record


def test_shipped_rules_load(rules: CriticalValueRules) -> None:
    assert rules.version == "2026.11-1"
    assert rules.suppression_ms == 360 * 60_000
    assert sorted(rules.rules) == ["2345-7", "2823-3", "2951-2", "718-7"]
    potassium = rules.rules["2823-3"]
    assert (potassium.rule_id, potassium.low, potassium.high, potassium.unit) == (
        "critical_value.potassium",
        2.8,
        6.2,
        "mmol/L",
    )
    assert potassium.exclude_specimen_status == frozenset({"haemolysed"})
    assert rules.rules["718-7"].high is None
    assert load_critical_value_rules(DEFAULT_CRITICAL_RULES_PATH) == rules


def test_high_potassium_is_critical(rules: CriticalValueRules) -> None:
    finding = check_critical(lab_result(value=6.9), rules)
    assert finding is not None
    assert (finding.rule.rule_id, finding.direction, finding.limit, finding.value) == (
        "critical_value.potassium",
        "high",
        6.2,
        6.9,
    )
    assert finding.explanation == "Potassium 6.9 mmol/L above critical high 6.2"


def test_low_potassium_is_critical(rules: CriticalValueRules) -> None:
    finding = check_critical(lab_result(value=2.5), rules)
    assert finding is not None
    assert finding.direction == "low"
    assert finding.explanation == "Potassium 2.5 mmol/L below critical low 2.8"


@pytest.mark.parametrize("value", [2.8, 6.2, 4.1])
def test_values_on_or_inside_the_limits_are_not_critical(
    value: float, rules: CriticalValueRules
) -> None:
    assert check_critical(lab_result(value=value), rules) is None


@pytest.mark.parametrize(("value", "expected"), [(6.21, "high"), (2.79, "low")])
def test_just_outside_the_limits_is_critical(
    value: float, expected: str, rules: CriticalValueRules
) -> None:
    finding = check_critical(lab_result(value=value), rules)
    assert finding is not None and finding.direction == expected


def test_integer_limits_read_naturally(rules: CriticalValueRules) -> None:
    finding = check_critical(lab_result("2951-2", 118.0), rules)
    assert finding is not None
    assert finding.explanation == "Sodium 118 mmol/L below critical low 120"
    assert check_critical(lab_result("2951-2", 120.0), rules) is None
    assert check_critical(lab_result("2951-2", 160.0), rules) is None


def test_null_high_limit_is_never_crossed(rules: CriticalValueRules) -> None:
    assert check_critical(lab_result("718-7", 250.0, "g/L"), rules) is None
    assert check_critical(lab_result("718-7", 60.0, "g/L"), rules) is None
    finding = check_critical(lab_result("718-7", 55.0, "g/L"), rules)
    assert finding is not None
    assert finding.explanation == "Hemoglobin 55 g/L below critical low 60"


def test_excluded_specimen_status_never_alerts(rules: CriticalValueRules) -> None:
    assert check_critical(lab_result(value=6.9, specimen_status="haemolysed"), rules) is None
    # Clotted is excluded for haemoglobin only, not for potassium.
    assert check_critical(lab_result(value=6.9, specimen_status="clotted"), rules) is not None
    assert (
        check_critical(lab_result("718-7", 40.0, "g/L", specimen_status="clotted"), rules) is None
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {"mapping_status": "unmapped"},
        {"value": None},
        {"loinc_code": None},
        {"loinc_code": "1742-6"},
        {"result_status": "X"},
        {"result_status": "D"},
    ],
)
def test_results_that_cannot_be_judged_do_not_alert(
    overrides: dict[str, Any], rules: CriticalValueRules
) -> None:
    assert check_critical(lab_result(**{"value": 9.9, **overrides}), rules) is None


@pytest.fixture(scope="module")
def units() -> UnitReader:
    return load_terminology().units


@pytest.mark.parametrize("unit", ["mEq/L", "meq/L", "MEQ/L", "mmol/l", "MMOL/L"])
def test_potassium_in_milliequivalents_or_any_case_is_critical(
    unit: str, rules: CriticalValueRules, units: UnitReader
) -> None:
    """Issue 15: potassium 7.8 mEq/L passed without an alert; K+ is monovalent, so 1 meq/L is
    1 mmol/L, whatever the case the laboratory writes it in."""
    finding = check_critical(lab_result(value=7.8, unit=unit), rules, units)
    assert isinstance(finding, CriticalFinding)
    assert (finding.direction, finding.value, finding.limit) == ("high", 7.8, 6.2)
    assert finding.explanation == "Potassium 7.8 mmol/L above critical high 6.2"


def test_glucose_in_mass_units_is_converted_by_molar_mass(
    rules: CriticalValueRules, units: UnitReader
) -> None:
    finding = check_critical(lab_result("2345-7", 30.0, "MG/DL"), rules, units)
    assert isinstance(finding, CriticalFinding) and finding.direction == "low"
    assert finding.value == pytest.approx(1.665, abs=0.001)
    assert check_critical(lab_result("2345-7", 100.0, "mg/dL"), rules, units) is None


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"unit": "U/L"}, "unit 'U/L' cannot be converted to mmol/L for this analyte"),
        ({"unit": "Mmol/L"}, "unit 'Mmol/L' cannot be converted to mmol/L for this analyte"),
        ({"unit": None}, "no unit was sent (the limits are in mmol/L)"),
        (
            {"value": None, "value_text": "7.8", "original_unit": "furlong",
             "mapping_status": "unit_unmapped"},
            "unit 'furlong' cannot be converted to mmol/L for this analyte",
        ),
        (
            {"value": None, "value_text": "see comment", "original_value": "see comment"},
            "the value is text of 11 characters, not a number",
        ),
        ({"value": None, "value_text": "<5"}, "reported only as <5 mmol/L, which may lie "
         "beyond a critical limit"),
        ({"value": float("nan")}, "the value is not a finite number"),
    ],
)
def test_a_critical_analyte_that_cannot_be_read_is_never_silent(
    overrides: dict[str, Any], reason: str, rules: CriticalValueRules, units: UnitReader
) -> None:
    finding = check_critical(lab_result(**{"value": 7.8, **overrides}), rules, units)
    assert isinstance(finding, UnreadableCritical)
    assert finding.rule.rule_id == "critical_value.potassium"
    assert finding.reason == reason
    assert "see comment" not in finding.reason  # a text value is described, never repeated


@pytest.mark.parametrize(
    ("loinc", "text", "expected"),
    [
        ("2823-3", "<2.0", ("low", 2.0)),  # below 2.0 is below the critical low 2.8
        ("2823-3", ">=7", ("high", 7.0)),
        ("2345-7", ">33,3", ("high", 33.3)),  # decimal comma
        ("718-7", ">80", None),  # haemoglobin has no high limit: above 80 is never critical
    ],
)
def test_a_censored_value_that_decides_the_rule_is_judged(
    loinc: str, text: str, expected: tuple[str, float] | None,
    rules: CriticalValueRules, units: UnitReader,
) -> None:
    unit = "g/L" if loinc == "718-7" else "mmol/L"
    finding = check_critical(
        lab_result(loinc, None, unit, value_text=text, original_value=text), rules, units
    )
    if expected is None:
        assert finding is None
    else:
        assert isinstance(finding, CriticalFinding)
        assert (finding.direction, finding.value) == expected


def test_unreadable_results_raise_their_own_alert(
    rules: CriticalValueRules, units: UnitReader
) -> None:
    result = lab_result(value=None, value_text="see comment", original_value="see comment")
    unreadable = check_critical(result, rules, units)
    assert isinstance(unreadable, UnreadableCritical)
    finding = unreadable_finding(result, unreadable, rules)
    assert finding.rule_id == UNREADABLE_RULE_ID == "critical_value.unreadable"
    assert finding.severity == "critical"
    assert finding.subject == "p" * 32 + "|2823-3|unreadable"  # apart from a real critical
    assert finding.explanation == (
        "Potassium result cannot be checked against its critical limits: the value is text "
        "of 11 characters, not a number; confirm the result with the laboratory"
    )
    assert finding.value is None and finding.analyte_code == "2823-3"
    # Haemolysed potassium is invalid for the rule: neither critical nor unreadable.
    assert check_critical(dict(result, specimen_status="haemolysed"), rules, units) is None
    assert check_critical(dict(result, value_text=None, original_value=None), rules) is None


def test_preliminary_and_corrected_results_alert(rules: CriticalValueRules) -> None:
    assert check_critical(lab_result(value=6.9, result_status="P"), rules) is not None
    assert check_critical(lab_result(value=6.9, result_status="C"), rules) is not None


def test_suppression_key() -> None:
    assert suppression_key(lab_result()) == f"{'p' * 32}|2823-3"
    anonymous = lab_result(person_key=None)
    assert suppression_key(anonymous) == "order:H001:FO-1001|2823-3"


def test_suppression_window_either_side() -> None:
    window = 6 * HOUR_MS
    t = 1_793_699_100_000
    assert not is_suppressed(None, t, window)
    assert is_suppressed(t, t, window)
    assert is_suppressed(t, t + window - 1, window)
    assert not is_suppressed(t, t + window, window)  # exactly one window later: alert again
    assert is_suppressed(t, t - window + 1, window)  # an older result arriving late
    assert not is_suppressed(t, t - window, window)
    assert not is_suppressed(t, t + 1, 0)  # a zero window suppresses nothing


def test_critical_finding(rules: CriticalValueRules) -> None:
    result = lab_result(value=6.9)
    finding = check_critical(result, rules)
    assert finding is not None
    assert critical_finding(result, finding, rules) == Finding(
        rule_id="critical_value.potassium",
        rule_version="2026.11-1",
        severity="critical",
        organisation_id="H001",
        subject=f"{'p' * 32}|2823-3",
        event_time_ms=1_793_699_100_000,
        triggering_event_ids=("e" * 32,),
        explanation="Potassium 6.9 mmol/L above critical high 6.2",
        person_key="p" * 32,
        analyte_code="2823-3",
        value=6.9,
        unit="mmol/L",
        details={"direction": "high", "limit": 6.2},
    )


def test_critical_finding_from_a_decoded_lab_result(rules: CriticalValueRules) -> None:
    """A lab result read back from Kafka has datetimes; the finding still carries epoch ms."""
    encoded = serde.AvroSerializer(_REGISTRY, serde.LAB_RESULT)(lab_result(value=7.4))
    decoded = serde.AvroDeserializer(_REGISTRY, serde.LAB_RESULT)(encoded)
    assert isinstance(decoded["event_time"], datetime)
    finding = check_critical(decoded, rules)
    assert finding is not None
    assert critical_finding(decoded, finding, rules).event_time_ms == 1_793_699_100_000


def test_normalised_hl7_result_raises_one_alert_and_haemolysed_none(
    terminology: Terminology, pseudonymiser: Pseudonymiser, rules: CriticalValueRules
) -> None:
    msh = "MSH|^~\\&|LIS|H001|MEDSTREAM|REGION|20261103081500+0800||ORU^R01|LAB-0009|P|2.5.1"
    pid = "PID|1||MRN-FICT-0042^^^H001^MR"
    obr = "OBR|1||FO-9||||20261103080000+0800"
    obx = "OBX|1|NM|K^Potassium^L||6.9|mmol/L|3.5-5.3|HH|||F"
    spm = "SPM|" + "|".join(["1", *([""] * 22), "HEM^Haemolysed"])
    ctx = RawContext("raw.hl7_lab", 0, 1, NOW_MS - 1000)

    def first_event(segments: list[str]) -> dict[str, Any]:
        raw = {
            "message_control_id": "LAB-0009",
            "organisation_id": "H001",
            "source_system": "lis-mllp",
            "message_type": "ORU^R01",
            "received_time": datetime(2026, 11, 3, tzinfo=UTC),
            "payload": "\r".join(segments),
        }
        [event] = normalise("hl7_lab", raw, ctx, terminology, pseudonymiser, NOW_MS)
        assert isinstance(event, NormalisedEvent)
        return event.value

    clean = first_event([msh, pid, obr, obx])
    finding = check_critical(clean, rules)
    assert finding is not None
    alert = critical_finding(clean, finding, rules)
    assert alert.person_key == pseudonymiser.person_key("H001", "MRN-FICT-0042")
    assert alert.triggering_event_ids == (clean["event_id"],)
    assert "MRN-FICT-0042" not in repr(alert)
    assert check_critical(first_event([msh, pid, obr, obx, spm]), rules) is None


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(text, encoding="utf-8")
    return path


RULE = (
    "  - {{rule_id: r1, loinc: '2823-3', display: K, unit: mmol/L, low: {low}, high: {high},"
    " severity: critical}}\n"
)


@pytest.mark.parametrize(
    ("low", "high", "message"),
    [
        ("7", "6", "low must be below high"),
        ("null", "null", "at least one of low and high must be set"),
        (".nan", "6", "must be a finite number"),
    ],
)
def test_bad_limits_are_refused(low: str, high: str, message: str, tmp_path: Path) -> None:
    text = "version: '1'\nsuppression_minutes: 60\nrules:\n" + RULE.format(low=low, high=high)
    with pytest.raises(CriticalRulesError, match=message):
        load_critical_value_rules(_write(tmp_path, text))


def test_duplicate_loinc_is_refused(tmp_path: Path) -> None:
    text = (
        "version: '1'\nsuppression_minutes: 60\nrules:\n"
        + RULE.format(low=1, high=2)
        + RULE.format(low=1, high=2).replace("r1", "r2")
    )
    with pytest.raises(CriticalRulesError, match="loinc '2823-3' is used by more than one rule"):
        load_critical_value_rules(_write(tmp_path, text))


def test_missing_file_and_missing_fields(tmp_path: Path) -> None:
    with pytest.raises(CriticalRulesError, match="cannot read"):
        load_critical_value_rules(tmp_path / "absent.yaml")
    with pytest.raises(CriticalRulesError, match="suppression_minutes: Field required"):
        load_critical_value_rules(_write(tmp_path, "version: '1'\nrules: []\n"))


def test_every_loinc_of_an_analyte_with_a_rule_is_judged_by_it(
    rules: CriticalValueRules, units: UnitReader
) -> None:
    """Review of issue 15: potassium sent as 6298-4 (in blood), glucose as 14749-6 and sodium
    as 2947-0 were stored mapped and raised nothing: the rules were keyed by one LOINC."""
    cases = [("6298-4", 7.8, "mmol/L", "critical_value.potassium", "high"),
             ("2947-0", 110.0, "mmol/L", "critical_value.sodium", "low"),
             ("14749-6", 1.1, "mmol/L", "critical_value.glucose", "low"),
             ("15074-8", 30.0, "mmol/L", "critical_value.glucose", "high"),
             ("2339-0", 20.0, "mg/dL", "critical_value.glucose", "low"),
             ("1558-6", 600.0, "mg/dL", "critical_value.glucose", "high")]
    for loinc, value, unit, rule_id, side in cases:
        finding = check_critical(lab_result(loinc, value, unit), rules, units)
        assert isinstance(finding, CriticalFinding), loinc
        assert (finding.rule.rule_id, finding.direction) == (rule_id, side), loinc
    # Every catalogued code of an analyte that has a rule reaches that rule.
    terminology = load_terminology()
    for rule in rules.rules.values():
        analyte = units.analytes.for_loinc(rule.loinc)
        codes = analyte.loinc if analyte is not None else (rule.loinc,)
        for code in codes:
            assert terminology.known_loinc(code), code
            assert rule_for(code, rules, units) is rule, code
