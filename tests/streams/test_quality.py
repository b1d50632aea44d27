"""Data quality rules: completeness, plausibility, timeliness, uniqueness, ids and the score.

All events are synthetic; identifiers use the fictional area code 990101.
"""

from __future__ import annotations

import copy
import math
import sqlite3
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from schemas import serde
from streams.critical_values import load_critical_value_rules
from streams.findings import DictState
from streams.model import SUBJECT_BY_KIND, NormalisedEvent, RawContext
from streams.normalise import normalise
from streams.pseudonym import Pseudonymiser
from streams.quality import (
    DEFAULT_QUALITY_RULES_PATH,
    EVENT_FIELDS,
    QUALITY_SCORE_SQL,
    QualityChecker,
    QualityIssue,
    QualityRules,
    QualityRulesError,
    QualityScoreWeights,
    load_quality_rules,
    quality_issue_id,
    quality_rules_from_dict,
    quality_score,
    quality_score_sql,
)
from streams.terminology import Terminology

EVENT_TIME = 1_793_699_100_000  # 2026-11-03 08:25 UTC
INGEST_TIME = EVENT_TIME + 60_000
NOW_MS = INGEST_TIME + 1_000
MINUTE = 60_000
HOUR = 3_600_000
DAY = 86_400_000
SERVICE_DATE = date(2026, 11, 1)
SERVICE_MS = 1_793_491_200_000  # 2026-11-01 00:00 UTC
_REGISTRY = serde.ManifestRegistry()

# Identifying-looking values of the fixtures: no issue detail may repeat them.
ORDER_ID = "ORD-990101-0007"
CLAIM_ID = "CLM-990101-0042"
DEVICE_ID = "DEV-990101-03"
PERSON_KEY = "p" * 32


@pytest.fixture(scope="module")
def rules() -> QualityRules:
    return load_quality_rules()


@pytest.fixture
def checker(rules: QualityRules) -> QualityChecker:
    return QualityChecker(rules)


def lineage(source_kind: str, event_id: str, **overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "event_id": event_id,
        "source_kind": source_kind,
        "source_system": "test-system",
        "organisation_id": "H990101",
        "event_time": EVENT_TIME,
        "ingest_time": INGEST_TIME,
        "normalised_time": INGEST_TIME + 50,
        "source_topic": f"raw.{source_kind}",
        "source_partition": 0,
        "source_offset": 1,
        "record_index": 0,
        "record_count": 1,
        "source_ref": "REF-990101",
        "mapping_version": "test-2026.1",
        "person_key": PERSON_KEY,
    }
    record.update(overrides)
    return record


def lab(**overrides: Any) -> dict[str, Any]:
    record = lineage("hl7_lab", "lab-1")
    record.update(
        order_id=ORDER_ID,
        loinc_code="2823-3",
        local_code="K",
        local_display="Potassium",
        value=4.2,
        value_text=None,
        unit="mmol/L",
        original_value="4.2",
        original_unit="mmol/L",
        abnormal_flag=None,
        result_status="F",
        specimen_status=None,
        mapping_status="mapped",
        reference_low=3.5,
        reference_high=5.3,
    )
    record.update(overrides)
    return record


def observation(**overrides: Any) -> dict[str, Any]:
    record = lineage("device", "obs-1")
    record.update(
        device_id=DEVICE_ID,
        device_type="monitor-a",
        metric_code="8867-4",
        local_code="HR",
        value=72.0,
        unit="/min",
        original_unit="bpm",
        mapping_status="mapped",
    )
    record.update(overrides)
    return record


def claim(**overrides: Any) -> dict[str, Any]:
    record = lineage("claim", "claim-1", event_time=SERVICE_MS, ingest_time=SERVICE_MS + 2 * DAY)
    record.update(
        claim_id=CLAIM_ID,
        payer_id="PAYER-990101",
        line_no=1,
        item_code="C09AA05",
        local_item_code="D001",
        item_display="item D001",
        quantity=2.0,
        unit_price=10.5,
        amount=21.0,
        service_date=SERVICE_DATE,
        diagnosis_codes=["E11.9"],
        mapping_status="mapped",
        encounter_key=None,
    )
    record.update(overrides)
    return record


def encounter(**overrides: Any) -> dict[str, Any]:
    record = lineage("emr_cdc", "enc-1")
    record.update(
        encounter_key="e" * 32,
        op="c",
        is_deleted=False,
        version=7,
        encounter_class="inpatient",
        department_code="03",
        department_local="NK",
        admit_time=EVENT_TIME,
        discharge_time=None,
        birth_year=1960,
        sex="F",
        mapping_status="mapped",
        deceased_time=None,
    )
    record.update(overrides)
    return record


def diagnosis(**overrides: Any) -> dict[str, Any]:
    record = lineage("emr_cdc", "dx-1")
    record.update(
        encounter_key="e" * 32,
        diagnosis_key="d" * 32,
        op="c",
        is_deleted=False,
        version=8,
        icd10_code="J11.1",
        local_code="J11.1",
        local_display="Influenza",
        diagnosis_type="admission",
        mapping_status="mapped",
    )
    record.update(overrides)
    return record


FACTORIES = {
    "lab_result": lab,
    "observation": observation,
    "claim_line": claim,
    "encounter": encounter,
    "diagnosis": diagnosis,
}


def check(
    checker: QualityChecker,
    kind: str,
    event: dict[str, Any],
    state: DictState | None = None,
    **kwargs: Any,
) -> list[QualityIssue]:
    return checker.check(kind, event, state if state is not None else DictState(), NOW_MS, **kwargs)


def rule_ids(issues: list[QualityIssue]) -> list[str]:
    return sorted(issue.rule_id for issue in issues)


# --- loading and validation ------------------------------------------------------------------


def test_default_rules_load(rules: QualityRules) -> None:
    assert rules.version == "2026.11-1"
    assert set(rules.required) == set(FACTORIES)
    assert [r.rule_id for r in rules.required["lab_result"]][:2] == [
        "quality.required.lab_result.value",
        "quality.required.lab_result.unit",
    ]
    assert (
        rules.ranges["lab_result"].rules["2823-3"].rule_id == "quality.range.lab_result.potassium"
    )
    assert set(rules.uniqueness) == {"lab_result", "observation", "claim_line"}
    assert rules.uniqueness["observation"].window_ms == 2 * HOUR
    assert rules.timeliness.for_source("device").late_after_ms == 10 * MINUTE
    assert rules.timeliness.for_source("unknown").late_after_ms == 60 * MINUTE
    assert rules.score == QualityScoreWeights(1.0, 0.25)


def base_document() -> dict[str, Any]:
    return yaml.safe_load(DEFAULT_QUALITY_RULES_PATH.read_text(encoding="utf-8"))


def set_path(document: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    target: Any = document
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("required", "lab_result", 0, "severity"), "fatal", "required.lab_result.0.severity"),
        (
            ("required", "lab_result", 0, "fields"),
            ["valeu"],
            "'valeu' is not a field of lab_result",
        ),
        (("required", "lab_result", 0, "fields"), [], "required.lab_result.0.fields"),
        (("required", "lab_result", 0, "unless"), {"result_stat": ["D"]}, "'result_stat'"),
        (("required", "lab_result", 1, "name"), "value", "required.lab_result.1.name"),
        (("required", "lab_result", 0, "name"), "Value!", "required.lab_result.0.name"),
        (("required", "visit"), [], "required.visit"),
        (
            ("ranges", "lab_result", "rules", 0, "impossible"),
            {"low": 15, "high": 0.5},
            "ranges.lab_result.rules.0.impossible",
        ),
        (
            ("ranges", "lab_result", "rules", 0, "impossible"),
            {"low": None, "high": None},
            "ranges.lab_result.rules.0.impossible",
        ),
        (
            ("ranges", "lab_result", "rules", 0, "implausible"),
            {"low": 0.1, "high": 10},
            "implausible.low must not be below impossible.low",
        ),
        (
            ("ranges", "lab_result", "rules", 0, "impossible", "high"),
            math.inf,
            "ranges.lab_result.rules.0.impossible.high",
        ),
        (("ranges", "lab_result", "rules", 1, "code"), "2823-3", "code '2823-3' is used"),
        (("ranges", "observation", "code_field"), "metric", "'metric' is not a field"),
        (("order", "encounter", 0, "later"), "discharged", "'discharged' is not a field"),
        (("claim_amounts", "total", "absolute_tolerance"), -0.01, "absolute_tolerance"),
        (("claim_amounts", "quantity"), {"severity": "error", "extra": 1}, "quantity.extra"),
        (
            ("timeliness", "sources", "device", "late_after_minutes"),
            60 * 24 * 30,
            "late_after_minutes must be shorter than max_age_days",
        ),
        (("timeliness", "sources", "fax"), {}, "timeliness.sources.fax"),
        (("timeliness", "cdc_lateness_ops"), ["x"], "timeliness.cdc_lateness_ops.0"),
        (("timeliness", "default", "allowed_clock_skew_seconds"), -1, "allowed_clock_skew"),
        (
            ("uniqueness", "encounter"),
            {"key": ["encounter_key"], "duplicate_window_hours": 1, "severity": "warning"},
            "uniqueness.encounter: encounter is CDC state",
        ),
        (("uniqueness", "lab_result", "optional"), ["payer_id"], "'payer_id' is not part"),
        (("uniqueness", "claim_line", "key"), ["claim_no"], "uniqueness.claim_line.key"),
        (("uniqueness", "claim_line", "key"), [], "uniqueness.claim_line.key"),
        (("uniqueness", "observation", "duplicate_window_hours"), 0, "duplicate_window_hours"),
        (("score", "warning_weight"), 2.0, "warning_weight must not exceed error_weight"),
        (("score", "error_weight"), -1, "score.error_weight"),
        (("version",), " ", "version"),
    ],
)
def test_invalid_rules_name_the_field(path: tuple[Any, ...], value: Any, expected: str) -> None:
    document = base_document()
    set_path(document, path, value)
    with pytest.raises(QualityRulesError, match="invalid quality rules") as caught:
        quality_rules_from_dict(document, "test.yaml")
    assert expected in str(caught.value)
    assert str(caught.value).startswith("test.yaml:")


def test_missing_section_and_unreadable_files(tmp_path: Path) -> None:
    document = base_document()
    del document["timeliness"]
    with pytest.raises(QualityRulesError, match="timeliness: Field required"):
        quality_rules_from_dict(document)
    with pytest.raises(QualityRulesError, match="cannot read quality rules"):
        load_quality_rules(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: [unclosed", encoding="utf-8")
    with pytest.raises(QualityRulesError, match="not valid YAML"):
        load_quality_rules(bad)


def latest_fields(kind: str) -> dict[str, Any]:
    definition = _REGISTRY.latest(SUBJECT_BY_KIND[kind]).definition
    return {field["name"]: field["type"] for field in definition["fields"]}


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_event_fields_exist_in_the_latest_schema(kind: str) -> None:
    assert EVENT_FIELDS[kind] <= set(latest_fields(kind))
    # The fixtures are complete events of the latest schema.
    assert set(FACTORIES[kind]()) == set(latest_fields(kind))


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_required_rules_skip_fields_the_schema_forces(rules: QualityRules, kind: str) -> None:
    """A non-null field that cannot be blank (numbers, times, booleans) is never missing."""
    types = latest_fields(kind)
    for rule in rules.required[kind]:
        for name in rule.fields:
            avro_type = types[name]
            nullable = isinstance(avro_type, list) and "null" in avro_type
            blankable = avro_type == "string" or (
                isinstance(avro_type, dict) and avro_type.get("type") == "array"
            )
            assert nullable or blankable, f"{rule.rule_id}: {name} is forced by the schema"


# --- completeness ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_clean_events_have_no_issues(checker: QualityChecker, kind: str) -> None:
    assert check(checker, kind, FACTORIES[kind]()) == []


@pytest.mark.parametrize(
    ("kind", "overrides", "expected", "severity"),
    [
        ("lab_result", {"value": None, "unit": None}, "lab_result.value", "error"),
        ("lab_result", {"value": None, "value_text": "  "}, "lab_result.value", "error"),
        ("lab_result", {"unit": None}, "lab_result.unit", "warning"),
        ("lab_result", {"unit": ""}, "lab_result.unit", "warning"),
        (
            "lab_result",
            {"loinc_code": None, "mapping_status": "unmapped"},
            "lab_result.loinc_code",
            "warning",
        ),
        ("lab_result", {"order_id": ""}, "lab_result.order_id", "warning"),
        ("lab_result", {"person_key": None}, "lab_result.person_key", "warning"),
        ("observation", {"value": None}, "observation.value", "error"),
        (
            "observation",
            {"metric_code": None, "value": None, "unit": None, "mapping_status": "unmapped"},
            "observation.metric_code",
            "warning",
        ),
        ("claim_line", {"local_item_code": " "}, "claim_line.local_item_code", "error"),
        ("claim_line", {"item_code": None}, "claim_line.item_code", "warning"),
        ("claim_line", {"diagnosis_codes": []}, "claim_line.diagnosis_codes", "warning"),
        ("claim_line", {"person_key": None}, "claim_line.person_key", "warning"),
        ("encounter", {"department_code": None}, "encounter.department_code", "warning"),
        ("encounter", {"person_key": None}, "encounter.person_key", "warning"),
        ("encounter", {"sex": None}, "encounter.sex", "warning"),
        ("encounter", {"birth_year": None}, "encounter.birth_year", "warning"),
        ("diagnosis", {"icd10_code": None}, "diagnosis.icd10_code", "warning"),
        ("diagnosis", {"person_key": None}, "diagnosis.person_key", "warning"),
    ],
)
def test_each_required_rule_fires(
    checker: QualityChecker, kind: str, overrides: dict[str, Any], expected: str, severity: str
) -> None:
    issues = check(checker, kind, FACTORIES[kind](**overrides))
    assert len(issues) == 1
    [issue] = issues
    assert issue.rule_id == f"quality.required.{expected}"
    assert (issue.category, issue.severity) == ("completeness", severity)
    assert issue.field == expected.split(".")[1]
    assert issue.event_kind == kind


def test_required_detail_is_readable(checker: QualityChecker) -> None:
    [value] = check(checker, "lab_result", lab(value=None, unit=None))
    assert value.detail == "lab_result value and value_text are missing"
    [unit] = check(checker, "lab_result", lab(unit=None))
    assert unit.detail == "lab_result unit is missing while value is set"


@pytest.mark.parametrize(
    ("kind", "overrides"),
    [
        # value_text alone is a result (text or a censored "<5"), and needs no unit.
        ("lab_result", {"value": None, "unit": None, "value_text": "<5"}),
        # Statuses that carry no result by definition (HL7 table 0085).
        ("lab_result", {"value": None, "unit": None, "result_status": "I"}),
        ("lab_result", {"value": None, "unit": None, "result_status": "x"}),
        # A withdrawn result needs neither patient nor code.
        (
            "lab_result",
            {
                "value": None,
                "unit": None,
                "person_key": None,
                "loinc_code": None,
                "result_status": "D",
            },
        ),
        # An unmapped sample has no value by design: only the metric_code warning applies.
        ("observation", {"value": None, "unit": None, "mapping_status": "unit_unmapped"}),
        ("claim_line", {"encounter_key": None}),
        ("encounter", {"discharge_time": None}),
        (
            "encounter",
            {
                "department_code": None,
                "person_key": None,
                "sex": None,
                "birth_year": None,
                "is_deleted": True,
                "op": "d",
            },
        ),
        ("diagnosis", {"icd10_code": None, "person_key": None, "is_deleted": True, "op": "d"}),
    ],
)
def test_required_rules_do_not_fire_when_met_or_exempt(
    checker: QualityChecker, kind: str, overrides: dict[str, Any]
) -> None:
    assert check(checker, kind, FACTORIES[kind](**overrides)) == []


# --- plausibility: ranges --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "code", "unit", "value", "severity"),
    [
        # Potassium: impossible outside [0.5, 15], implausible outside [1.5, 10].
        ("lab_result", "2823-3", "mmol/L", 0.49, "error"),
        ("lab_result", "2823-3", "mmol/L", 0.5, "warning"),
        ("lab_result", "2823-3", "mmol/L", 1.49, "warning"),
        ("lab_result", "2823-3", "mmol/L", 1.5, None),
        ("lab_result", "2823-3", "mmol/L", 10.0, None),
        ("lab_result", "2823-3", "mmol/L", 10.01, "warning"),
        ("lab_result", "2823-3", "mmol/L", 15.0, "warning"),
        ("lab_result", "2823-3", "mmol/L", 15.01, "error"),
        # Glucose: a negative concentration is impossible, 0 only implausible.
        ("lab_result", "2345-7", "mmol/L", -0.1, "error"),
        ("lab_result", "2345-7", "mmol/L", 0.0, "warning"),
        # Hemoglobin in g/dL sent as g/L.
        ("lab_result", "718-7", "g/L", 14.0, "warning"),
        ("lab_result", "718-7", "g/L", 140.0, None),
        # SpO2: above 100 % impossible, 100 fine.
        ("observation", "59408-5", "%", 100.0, None),
        ("observation", "59408-5", "%", 100.1, "error"),
        ("observation", "59408-5", "%", 49.0, "warning"),
        # Body temperature: impossible outside [25, 45] Cel.
        ("observation", "8310-5", "Cel", 24.9, "error"),
        ("observation", "8310-5", "Cel", 25.0, "warning"),
        ("observation", "8310-5", "Cel", 45.0, "warning"),
        ("observation", "8310-5", "Cel", 45.1, "error"),
        ("observation", "8310-5", "Cel", 37.0, None),
        # Heart rate: above 300/min impossible; 0 (asystole, lead off) is not flagged.
        ("observation", "8867-4", "/min", 300.0, "warning"),
        ("observation", "8867-4", "/min", 301.0, "error"),
        ("observation", "8867-4", "/min", 0.0, None),
        ("observation", "8867-4", "/min", -1.0, "error"),
    ],
)
def test_range_boundaries(
    checker: QualityChecker,
    kind: str,
    code: str,
    unit: str,
    value: float,
    severity: str | None,
) -> None:
    code_field = "loinc_code" if kind == "lab_result" else "metric_code"
    event = FACTORIES[kind](**{code_field: code, "unit": unit, "value": value})
    issues = check(checker, kind, event)
    assert [issue.severity for issue in issues] == ([severity] if severity else [])
    for issue in issues:
        assert issue.rule_id.startswith(f"quality.range.{kind}.")
        assert (issue.category, issue.field) == ("plausibility", "value")


def test_range_detail_names_the_numbers(checker: QualityChecker) -> None:
    [issue] = check(checker, "lab_result", lab(value=16.0))
    assert issue.rule_id == "quality.range.lab_result.potassium"
    assert issue.detail == "Potassium 16 mmol/L is above the possible maximum 15 mmol/L"
    [low] = check(checker, "observation", observation(metric_code="59408-5", unit="%", value=40.0))
    assert low.detail == "Oxygen saturation 40 % is below the plausible minimum 50 %"


@pytest.mark.parametrize(
    ("kind", "overrides"),
    [
        ("lab_result", {"value": 99.0, "unit": "mEq/L"}),  # other unit: not comparable
        ("lab_result", {"value": 99.0, "result_status": "W"}),  # withdrawn
        ("lab_result", {"value": 99.0, "loinc_code": "9999-9"}),  # no range for the code
        ("observation", {"value": 999.0, "metric_code": "0000-0"}),
    ],
)
def test_ranges_are_skipped_when_not_comparable(
    checker: QualityChecker, kind: str, overrides: dict[str, Any]
) -> None:
    assert check(checker, kind, FACTORIES[kind](**overrides)) == []


def test_non_finite_value_is_an_error(checker: QualityChecker) -> None:
    [issue] = check(checker, "observation", observation(value=math.nan))
    assert (issue.rule_id, issue.severity) == ("quality.range.observation.heart_rate", "error")
    assert issue.detail == "Heart rate value is not a finite number"


def test_clinical_alert_values_are_never_quality_issues(checker: QualityChecker) -> None:
    """Critical limits and NEWS2 score-3 boundaries (DOMAIN.md) lie inside the plausible range."""
    critical = load_critical_value_rules()
    for rule in critical.rules.values():
        for limit in (rule.low, rule.high):
            if limit is None:
                continue
            for value in (limit * 0.98, limit, limit * 1.02):
                event = lab(loinc_code=rule.loinc, unit=rule.unit, value=value)
                assert check(checker, "lab_result", event) == [], (rule.rule_id, value)
    news2_extremes = {
        "9279-1": (8.0, 25.0, 40.0),
        "59408-5": (91.0, 85.0),
        "8310-5": (35.0, 39.1, 41.0),
        "8480-6": (90.0, 220.0, 60.0),
        "8867-4": (40.0, 131.0, 180.0),
    }
    for code, values in news2_extremes.items():
        unit = {"9279-1": "/min", "59408-5": "%", "8310-5": "Cel", "8480-6": "mm[Hg]"}.get(
            code, "/min"
        )
        for value in values:
            event = observation(metric_code=code, unit=unit, value=value)
            assert check(checker, "observation", event) == [], (code, value)


# --- plausibility: encounter time order and claim amounts ------------------------------------


def test_discharge_before_admit(checker: QualityChecker) -> None:
    [issue] = check(checker, "encounter", encounter(discharge_time=EVENT_TIME - 90 * MINUTE))
    assert issue.rule_id == "quality.order.encounter.discharge_after_admit"
    assert (issue.category, issue.severity, issue.field) == (
        "plausibility",
        "error",
        "discharge_time",
    )
    assert issue.detail == "discharge_time is 90 min before admit_time"
    # Equal times (a same-minute discharge) and a discharge after admission are fine.
    assert check(checker, "encounter", encounter(discharge_time=EVENT_TIME)) == []
    assert check(checker, "encounter", encounter(discharge_time=EVENT_TIME + DAY)) == []
    # Decoded Avro hands over aware datetimes.
    as_datetime = datetime.fromtimestamp((EVENT_TIME - HOUR) / 1000, tz=UTC)
    decoded = encounter(
        discharge_time=as_datetime, admit_time=datetime.fromtimestamp(EVENT_TIME / 1000, tz=UTC)
    )
    assert rule_ids(check(checker, "encounter", decoded)) == [
        "quality.order.encounter.discharge_after_admit"
    ]
    # A deleted visit is a tombstone.
    deleted = encounter(discharge_time=EVENT_TIME - HOUR, is_deleted=True, op="d")
    assert check(checker, "encounter", deleted) == []


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"quantity": 0.0, "amount": 0.0}, ["quality.amount.claim_line.quantity"]),
        (
            {"quantity": -1.0, "amount": -10.5},
            [
                "quality.amount.claim_line.amount",
                "quality.amount.claim_line.quantity",
            ],
        ),
        ({"quantity": 0.5, "amount": 5.25}, []),
        ({"amount": -21.0}, ["quality.amount.claim_line.amount"]),
        ({"amount": 0.0, "unit_price": 0.0}, []),
        ({"amount": math.inf}, ["quality.amount.claim_line.amount"]),
        ({"amount": 25.0}, ["quality.amount.claim_line.total"]),
        # Absolute tolerance 0.01 (above 0.1 % of 5): 5.01 is inside, 5.011 outside.
        ({"quantity": 1.0, "unit_price": 5.0, "amount": 5.01}, []),
        (
            {"quantity": 1.0, "unit_price": 5.0, "amount": 5.011},
            ["quality.amount.claim_line.total"],
        ),
        # Relative tolerance 0.1 % of 20,000 = 20.
        ({"quantity": 1000.0, "unit_price": 20.0, "amount": 20_020.0}, []),
        (
            {"quantity": 1000.0, "unit_price": 20.0, "amount": 20_020.5},
            ["quality.amount.claim_line.total"],
        ),
    ],
)
def test_claim_amounts(
    checker: QualityChecker, overrides: dict[str, Any], expected: list[str]
) -> None:
    assert rule_ids(check(checker, "claim_line", claim(**overrides))) == expected


def test_claim_total_is_a_consistency_warning_with_the_numbers(checker: QualityChecker) -> None:
    [issue] = check(checker, "claim_line", claim(amount=25.0))
    assert (issue.category, issue.severity, issue.field) == ("consistency", "warning", "amount")
    assert issue.detail == (
        "amount 25 differs from quantity 2 x unit price 10.5 = 21 by 4 (tolerance 0.021)"
    )
    [quantity] = check(checker, "claim_line", claim(quantity=0.0, amount=0.0))
    assert (quantity.category, quantity.severity) == ("plausibility", "error")
    assert quantity.detail == "quantity 0 is not a positive number"


# --- timeliness ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "lag_ms", "expected"),
    [
        # Future: event_time > ingest_time + 300 s skew.
        ("lab_result", -300_000, []),
        ("lab_result", -300_001, ["quality.timeliness.future"]),
        # Late: devices after 10 min, labs after a day.
        ("observation", 10 * MINUTE, []),
        ("observation", 10 * MINUTE + 1, ["quality.timeliness.late"]),
        ("lab_result", DAY, []),
        ("lab_result", DAY + 1, ["quality.timeliness.late"]),
        # Too old replaces late: devices after 30 days, labs after 365.
        ("observation", 30 * DAY + 1, ["quality.timeliness.too_old"]),
        ("lab_result", 365 * DAY, ["quality.timeliness.late"]),
        ("lab_result", 365 * DAY + 1, ["quality.timeliness.too_old"]),
    ],
)
def test_timeliness_boundaries(
    checker: QualityChecker, kind: str, lag_ms: int, expected: list[str]
) -> None:
    event = FACTORIES[kind](ingest_time=EVENT_TIME + lag_ms)
    issues = check(checker, kind, event)
    assert rule_ids(issues) == expected
    for issue in issues:
        assert (issue.category, issue.field) == ("timeliness", "event_time")
        assert issue.severity == (
            "error" if expected == ["quality.timeliness.future"] else "warning"
        )


def test_timeliness_details(checker: QualityChecker) -> None:
    [future] = check(checker, "lab_result", lab(event_time=INGEST_TIME + 2 * HOUR))
    assert future.detail == "event time is 2 h after ingest time (allowed clock skew 5 min)"
    [late] = check(checker, "observation", observation(ingest_time=EVENT_TIME + 3 * HOUR))
    assert late.detail == (
        "event arrived 3 h after its event time (late after 10 min for source kind device)"
    )
    [late] = check(checker, "observation", observation(ingest_time=EVENT_TIME + 50 * HOUR + 59_999))
    assert late.detail.startswith("event arrived 2 days 2 h after")
    [late] = check(checker, "observation", observation(ingest_time=EVENT_TIME + 150 * MINUTE))
    assert late.detail.startswith("event arrived 2 h 30 min after")
    [old] = check(checker, "observation", observation(ingest_time=EVENT_TIME + 40 * DAY))
    assert (
        old.detail == "event was 40 days old at ingest (maximum age 30 days for source kind device)"
    )


def test_claims_tolerate_a_service_date_ahead_of_utc(checker: QualityChecker) -> None:
    # A claim for today, sent at 02:00 in UTC+14: service date 00:00 UTC is 22 h ahead.
    today = claim(ingest_time=SERVICE_MS - 22 * HOUR)
    assert check(checker, "claim_line", today) == []
    tomorrow = claim(ingest_time=SERVICE_MS - DAY - 1)
    assert rule_ids(check(checker, "claim_line", tomorrow)) == ["quality.timeliness.future"]
    late = claim(ingest_time=SERVICE_MS + 31 * DAY)
    assert rule_ids(check(checker, "claim_line", late)) == ["quality.timeliness.late"]


def test_cdc_lateness_only_for_creates_and_deletes(checker: QualityChecker) -> None:
    week_later = EVENT_TIME + 7 * DAY
    # An update's event time is the admission time, not the change: never late.
    assert check(checker, "encounter", encounter(op="u", ingest_time=week_later)) == []
    assert check(checker, "diagnosis", diagnosis(op="r", ingest_time=week_later)) == []
    assert rule_ids(check(checker, "encounter", encounter(ingest_time=week_later))) == [
        "quality.timeliness.late"
    ]
    deleted = diagnosis(op="d", is_deleted=True, ingest_time=week_later)
    assert rule_ids(check(checker, "diagnosis", deleted)) == ["quality.timeliness.late"]
    # The future is wrong whatever the op.
    future = encounter(op="u", event_time=INGEST_TIME + DAY, admit_time=INGEST_TIME + DAY)
    assert rule_ids(check(checker, "encounter", future)) == ["quality.timeliness.future"]


def test_historic_snapshot_events_are_never_late(checker: QualityChecker) -> None:
    old = lab(ingest_time=EVENT_TIME + 400 * DAY)
    assert rule_ids(check(checker, "lab_result", old)) == ["quality.timeliness.too_old"]
    assert check(checker, "lab_result", old, historic=True) == []
    future = lab(event_time=INGEST_TIME + DAY)
    assert rule_ids(check(checker, "lab_result", future, historic=True)) == [
        "quality.timeliness.future"
    ]


# --- uniqueness ------------------------------------------------------------------------------


def test_first_event_is_remembered_and_redelivery_is_harmless(checker: QualityChecker) -> None:
    state = DictState()
    assert check(checker, "lab_result", lab(), state) == []
    [(key, remembered)] = state.values.items()
    assert key.startswith("quality|dup|")
    assert remembered == {"event_id": "lab-1", "event_time": EVENT_TIME, "kind": "lab_result"}
    # The same event again (a redelivery), even from another Kafka offset and decoded as
    # datetimes by an Avro reader: no issue, state unchanged.
    again = lab(
        source_offset=99,
        event_time=datetime.fromtimestamp(EVENT_TIME / 1000, tz=UTC),
        ingest_time=INGEST_TIME + HOUR,
    )
    assert check(checker, "lab_result", again, state) == []
    assert state.values == {key: remembered}


def test_different_event_with_the_same_key_is_a_duplicate(checker: QualityChecker) -> None:
    state = DictState()
    check(checker, "lab_result", lab(), state)
    [issue] = check(checker, "lab_result", lab(event_id="lab-2", source_ref="REF-2"), state)
    assert issue.rule_id == "quality.duplicate.lab_result"
    assert (issue.category, issue.severity, issue.field) == ("uniqueness", "warning", None)
    assert issue.event_id == "lab-2"
    assert issue.detail == (
        "duplicate of event lab-1: same business key (organisation_id, order_id, "
        "loinc_code/local_code, event_time, result_status) under a different event id"
    )
    # The first event stays the one remembered; a third copy names it too.
    [third] = check(checker, "lab_result", lab(event_id="lab-3"), state)
    assert "duplicate of event lab-1" in third.detail
    assert len(state.values) == 1


@pytest.mark.parametrize(
    ("kind", "second"),
    [
        ("lab_result", {"order_id": "ORD-990101-0008"}),
        ("lab_result", {"event_time": EVENT_TIME + 1}),
        ("lab_result", {"loinc_code": "2951-2", "value": 140.0}),
        # Preliminary then final report: versions, not duplicates.
        ("lab_result", {"result_status": "P"}),
        ("lab_result", {"organisation_id": "H990102"}),
        (
            "observation",
            {"local_code": "SPO2", "metric_code": "59408-5", "unit": "%", "value": 97.0},
        ),
        ("observation", {"device_id": "DEV-990101-04"}),
        ("claim_line", {"line_no": 2}),
        ("claim_line", {"payer_id": "PAYER-990102"}),
    ],
)
def test_a_different_business_key_is_no_duplicate(
    checker: QualityChecker, kind: str, second: dict[str, Any]
) -> None:
    state = DictState()
    assert check(checker, kind, FACTORIES[kind](), state) == []
    other = FACTORIES[kind](event_id=f"{kind}-other", **second)
    assert check(checker, kind, other, state) == []
    assert len(state.values) == 2


@pytest.mark.parametrize("kind", ["observation", "claim_line"])
def test_duplicates_of_devices_and_claims(checker: QualityChecker, kind: str) -> None:
    state = DictState()
    check(checker, kind, FACTORIES[kind](), state)
    # The same claim line under another event id, e.g. through a second interface.
    assert rule_ids(check(checker, kind, FACTORIES[kind](event_id="x-2"), state)) == [
        f"quality.duplicate.{kind}"
    ]


def test_key_alternatives_and_optional_parts(checker: QualityChecker) -> None:
    state = DictState()
    unmapped = lab(loinc_code=None, mapping_status="unmapped", result_status=None)
    expected = ["quality.required.lab_result.loinc_code"]
    assert rule_ids(check(checker, "lab_result", unmapped, state)) == expected
    # Without LOINC the local code keys the result; a missing result_status is allowed.
    repeat = dict(unmapped, event_id="lab-2")
    assert rule_ids(check(checker, "lab_result", repeat, state)) == sorted(
        [*expected, "quality.duplicate.lab_result"]
    )
    # A LOINC never collides with a local code of the same text.
    state = DictState()
    check(checker, "lab_result", lab(loinc_code="K", local_code="X"), state)
    check(checker, "lab_result", lab(event_id="lab-2", loinc_code=None, local_code="K"), state)
    assert len(state.values) == 2


def test_incomplete_key_is_not_checked(checker: QualityChecker) -> None:
    state = DictState()
    first = check(checker, "lab_result", lab(order_id=""), state)
    second = check(checker, "lab_result", lab(order_id="", event_id="lab-2"), state)
    assert rule_ids(first) == rule_ids(second) == ["quality.required.lab_result.order_id"]
    assert state.values == {}


def test_events_with_errors_are_not_remembered(checker: QualityChecker) -> None:
    state = DictState()
    broken = observation(value=400.0)  # impossible heart rate: dead-lettered
    assert [i.severity for i in check(checker, "observation", broken, state)] == ["error"]
    assert state.values == {}
    # Its corrected resend under a new packet id is no duplicate.
    assert check(checker, "observation", observation(event_id="obs-2"), state) == []
    assert len(state.values) == 1


def test_cdc_state_kinds_have_no_uniqueness(checker: QualityChecker) -> None:
    state = DictState()
    check(checker, "encounter", encounter(), state)
    assert check(checker, "encounter", encounter(event_id="enc-2", version=8), state) == []
    assert check(checker, "diagnosis", diagnosis(event_id="dx-2"), state) == []
    assert state.values == {}


def test_keys_expire_after_the_window_of_event_time(checker: QualityChecker) -> None:
    state = DictState()
    check(checker, "observation", observation(), state)  # window 2 h
    within = observation(event_id="obs-2", ingest_time=EVENT_TIME + 2 * HOUR)
    assert rule_ids(check(checker, "observation", within, state)) == [
        "quality.duplicate.observation",
        "quality.timeliness.late",
    ]
    # Later than the window after its event time: arrived after its key could have expired,
    # so it is not checked (only the timeliness rule speaks) and not remembered.
    beyond = observation(event_id="obs-3", ingest_time=EVENT_TIME + 2 * HOUR + 1)
    assert rule_ids(check(checker, "observation", beyond, state)) == ["quality.timeliness.late"]
    assert [v["event_id"] for v in state.values.values()] == ["obs-1"]


def test_expired_key_not_yet_pruned_is_replaced(checker: QualityChecker) -> None:
    """Claim lines have no event time in their key: the window runs from the first's."""
    state = DictState()
    check(checker, "claim_line", claim(), state)  # window 90 days
    later = claim(
        event_id="claim-2",
        event_time=SERVICE_MS + 80 * DAY,
        service_date=date(2027, 1, 20),
        ingest_time=SERVICE_MS + 91 * DAY,
    )
    assert check(checker, "claim_line", later, state) == []
    assert [v["event_id"] for v in state.values.values()] == ["claim-2"]


def test_prune_forgets_expired_keys_only(checker: QualityChecker) -> None:
    state = DictState()
    check(checker, "observation", observation(), state)  # expires at EVENT_TIME + 2 h
    check(checker, "lab_result", lab(), state)  # expires at EVENT_TIME + 168 h
    state.put("news2|someone", {"kept": True})  # another detector's state
    state.put("quality|dup|retired", {"event_id": "x", "event_time": EVENT_TIME, "kind": "gone"})
    assert checker.prune(state, EVENT_TIME + 2 * HOUR) == 1  # only the retired kind
    assert checker.prune(state, EVENT_TIME + 2 * HOUR + 1) == 1
    assert sorted(v.get("kind", "other") for v in state.values.values()) == ["lab_result", "other"]
    assert checker.prune(state, EVENT_TIME + 168 * HOUR + 1) == 1
    assert list(state.values) == ["news2|someone"]


# --- ids, records, privacy -------------------------------------------------------------------


def test_issue_ids_are_deterministic(checker: QualityChecker) -> None:
    event = lab(value=None, unit=None, person_key=None)
    first = check(checker, "lab_result", event)
    again = checker.check("lab_result", copy.deepcopy(event), DictState(), NOW_MS + HOUR)
    assert [i.issue_id for i in first] == [i.issue_id for i in again]
    assert len({i.issue_id for i in first}) == 2
    assert first[0].issue_id == quality_issue_id(
        "lab-1", "quality.required.lab_result.value", "value"
    )
    assert again[0].detected_time_ms == NOW_MS + HOUR
    # Another event, rule or field gives another id.
    assert (
        len(
            {
                quality_issue_id("a", "r", "f"),
                quality_issue_id("b", "r", "f"),
                quality_issue_id("a", "s", "f"),
                quality_issue_id("a", "r", None),
            }
        )
        == 4
    )
    assert len(quality_issue_id("a", "r", None)) == 32


def test_issue_is_a_valid_quality_issue_record(checker: QualityChecker) -> None:
    [issue] = check(checker, "lab_result", lab(value=16.0))
    record = issue.as_record()
    assert record["rule_version"] == "2026.11-1"
    assert (record["event_time"], record["ingest_time"], record["detected_time"]) == (
        EVENT_TIME,
        INGEST_TIME,
        NOW_MS,
    )
    assert (record["organisation_id"], record["source_kind"], record["source_system"]) == (
        "H990101",
        "hl7_lab",
        "test-system",
    )
    encoded = serde.AvroSerializer(_REGISTRY, serde.QUALITY_ISSUE)(record)
    decoded = serde.AvroDeserializer(_REGISTRY, serde.QUALITY_ISSUE)(encoded)
    assert decoded["issue_id"] == issue.issue_id
    assert decoded["detail"] == issue.detail
    assert set(decoded) == set(record)


def test_issue_rejects_unknown_category_or_severity() -> None:
    base: dict[str, Any] = dict(
        issue_id="i",
        rule_id="r",
        rule_version="v",
        event_kind="lab_result",
        event_id="e",
        organisation_id="o",
        source_kind="s",
        source_system="x",
        field=None,
        category="completeness",
        severity="warning",
        detail="d",
        event_time_ms=1,
        ingest_time_ms=2,
        detected_time_ms=3,
    )
    assert QualityIssue(**base).severity == "warning"
    with pytest.raises(ValueError, match="category"):
        QualityIssue(**{**base, "category": "accuracy"})
    with pytest.raises(ValueError, match="severity"):
        QualityIssue(**{**base, "severity": "critical"})


def test_details_never_repeat_identifying_values(checker: QualityChecker) -> None:
    state = DictState()
    issues = []
    for kind, overrides in (
        ("lab_result", {"value": 99.0}),
        ("lab_result", {"event_id": "lab-2", "value": 99.0}),
        ("observation", {"value": None, "ingest_time": EVENT_TIME + DAY}),
        ("claim_line", {"amount": 99.0, "person_key": None}),
        ("claim_line", {"event_id": "claim-2", "amount": 99.0}),
    ):
        issues += check(checker, kind, FACTORIES[kind](**overrides), state)
    assert len(issues) == 8
    for issue in issues:
        for identifying in (ORDER_ID, CLAIM_ID, DEVICE_ID, PERSON_KEY, "990101"):
            assert identifying not in issue.detail, issue.rule_id


def test_unknown_kind_is_a_wiring_error(checker: QualityChecker) -> None:
    with pytest.raises(ValueError, match="unknown event kind 'visit'"):
        checker.check("visit", lab(), DictState(), NOW_MS)


# --- the normalise stage's real events -------------------------------------------------------


def test_normalised_device_and_claim_events(
    checker: QualityChecker, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    sample_time = datetime(2026, 11, 3, 0, 0, 0, tzinfo=UTC)
    ingest_ms = int(sample_time.timestamp() * 1000) + 30_000
    packet = {
        "packet_id": "P-1",
        "device_id": DEVICE_ID,
        "device_type": "monitor-a",
        "organisation_id": "H001",
        "source_system": "iot-gw",
        "patient_ref": None,
        "sent_time": sample_time,
        "samples": [
            {"metric": "HR", "value": 72.0, "unit": "bpm", "sample_time": sample_time},
            {"metric": "TEMP", "value": 120.0, "unit": "[degF]", "sample_time": sample_time},
            {"metric": "HR", "value": None, "unit": "bpm", "sample_time": sample_time},
        ],
    }
    outcomes = normalise(
        "device",
        packet,
        RawContext("raw.device", 0, 1, ingest_ms),
        terminology,
        pseudonymiser,
        ingest_ms,
    )
    found = [
        rule_ids(checker.check(o.kind, o.value, DictState(), ingest_ms))
        for o in outcomes
        if isinstance(o, NormalisedEvent)
    ]
    # 120 degF = 48.9 Cel: impossible; a sample without value: unusable.
    assert found == [
        [],
        ["quality.range.observation.body_temperature"],
        ["quality.required.observation.value"],
    ]

    claim_raw = {
        "claim_id": CLAIM_ID,
        "payer_id": "PAYER-A",
        "organisation_id": "H001",
        "source_system": "claims-feed",
        "submitted_time": datetime(2026, 11, 2, tzinfo=UTC),
        "patient_id_number": "990101200001010018",
        "patient_local_id": "MRN-990101",
        "encounter_ref": "V-0001",
        "diagnosis_codes": ["GX01"],
        "lines": [
            {
                "line_no": 1,
                "item_code": "D001",
                "item_display": "item D001",
                "quantity": 2.0,
                "unit_price": 10.5,
                "amount": 21.0,
                "service_date": SERVICE_DATE,
            },
            {
                "line_no": 2,
                "item_code": "D001",
                "item_display": "item D001",
                "quantity": 0.0,
                "unit_price": 10.5,
                "amount": 0.0,
                "service_date": SERVICE_DATE,
            },
        ],
    }
    ctx = RawContext("raw.claim", 0, 1, SERVICE_MS + DAY)
    lines = [
        o
        for o in normalise("claim", claim_raw, ctx, terminology, pseudonymiser, SERVICE_MS + DAY)
        if isinstance(o, NormalisedEvent)
    ]
    state = DictState()
    assert [rule_ids(checker.check(o.kind, o.value, state, SERVICE_MS)) for o in lines] == [
        [],
        ["quality.amount.claim_line.quantity"],
    ]


# --- the score -------------------------------------------------------------------------------

WEIGHTS = QualityScoreWeights(1.0, 0.25)


@pytest.mark.parametrize(
    ("events", "errors", "warnings", "expected"),
    [
        (0, 0, 0, 1.0),
        (100, 0, 0, 1.0),
        (100, 10, 0, 0.9),
        (100, 0, 10, 0.975),
        (100, 10, 20, 0.85),  # 1 - (10 + 5) / 100
        (4, 3, 4, 0.0),  # floored: 1 - 4 / 4 = 0
        (4, 4, 4, 0.0),  # would be -0.25
        (1, 0, 1, 0.75),
    ],
)
def test_quality_score(events: int, errors: int, warnings: int, expected: float) -> None:
    assert quality_score(events, errors, warnings, WEIGHTS) == pytest.approx(expected)


def test_quality_score_rejects_negative_counts() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        quality_score(10, -1, 0, WEIGHTS)


def test_sql_score_matches_the_python_score() -> None:
    """The SQL expression, run by SQLite with ClickHouse's greatest(), gives the same numbers."""
    weights = QualityScoreWeights(1.0, 0.3)
    rendered = quality_score_sql(weights)
    assert "{" not in rendered
    assert rendered == QUALITY_SCORE_SQL.replace("{error_weight:Float64}", "1.0").replace(
        "{warning_weight:Float64}", "0.3"
    )
    rows = [(0, 0, 0), (100, 10, 20), (7, 1, 3), (4, 4, 4), (3, 0, 1), (1000, 1, 999)]
    connection = sqlite3.connect(":memory:")
    connection.create_function("greatest", 2, max)
    connection.execute("CREATE TABLE daily (events INTEGER, errors INTEGER, warnings INTEGER)")
    connection.executemany("INSERT INTO daily VALUES (?, ?, ?)", rows)
    scores = connection.execute(f"SELECT {rendered} FROM daily").fetchall()
    assert [s for (s,) in scores] == pytest.approx([quality_score(*r, weights) for r in rows])
