"""NEWS2: every chart boundary, worked totals, rules validation, and the streaming detector.

Expected sub-scores are read off Chart 1 of the RCP report "National Early Warning Score
(NEWS) 2" (2017); the response levels off its Chart 2. Persons, devices and events are
synthetic.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from streams.findings import Cleared, Finding
from streams.news2 import (
    DEFAULT_NEWS2_RULES_PATH,
    News2Detector,
    News2InputError,
    News2Rules,
    News2RulesError,
    Vitals,
    chart_value,
    load_news2_rules,
    news2_rules_from_dict,
    score_news2,
)

T0 = 1_793_700_000_000
MINUTE = 60_000
PERSON = "a1" * 16
OTHER_PERSON = "b2" * 16
SUBJECT = f"{PERSON}|news2"

# A set that scores 0 everywhere: the baseline each boundary test changes one value of.
NORMAL = Vitals(
    respiration_rate=16,
    spo2=97,
    supplemental_oxygen=False,
    systolic_bp=120,
    pulse=70,
    consciousness="A",
    temperature=37.0,
)


@pytest.fixture(scope="module")
def rules() -> News2Rules:
    return load_news2_rules()


@pytest.fixture()
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(DEFAULT_NEWS2_RULES_PATH.read_text(encoding="utf-8"))
    return copy.deepcopy(loaded)


def sub_score(rules: News2Rules, parameter: str, **changes: Any) -> int:
    vitals = Vitals(**{**_fields(NORMAL), **changes})
    return score_news2(vitals, rules).sub_scores[parameter]


def _fields(vitals: Vitals) -> dict[str, Any]:
    return {name: getattr(vitals, name) for name in Vitals.__slots__}


# --- the chart, at every boundary on both sides ---------------------------------------------

RESPIRATION = [(8, 3), (9, 1), (11, 1), (12, 0), (20, 0), (21, 2), (24, 2), (25, 3), (0, 3)]
SPO2_SCALE_1 = [(91, 3), (92, 2), (93, 2), (94, 1), (95, 1), (96, 0), (100, 0)]
SPO2_SCALE_2_AIR = [(83, 3), (84, 2), (85, 2), (86, 1), (87, 1), (88, 0), (92, 0), (93, 0)]
SPO2_SCALE_2_OXYGEN = [
    (83, 3),
    (84, 2),
    (85, 2),
    (86, 1),
    (87, 1),
    (88, 0),
    (92, 0),
    (93, 1),
    (94, 1),
    (95, 2),
    (96, 2),
    (97, 3),
    (100, 3),
]
SYSTOLIC = [(90, 3), (91, 2), (100, 2), (101, 1), (110, 1), (111, 0), (219, 0), (220, 3)]
PULSE = [(40, 3), (41, 1), (50, 1), (51, 0), (90, 0), (91, 1), (110, 1), (111, 2), (130, 2)]
PULSE += [(131, 3)]
TEMPERATURE = [
    (35.0, 3),
    (35.1, 1),
    (36.0, 1),
    (36.1, 0),
    (38.0, 0),
    (38.1, 1),
    (39.0, 1),
    (39.1, 2),
]


@pytest.mark.parametrize(("value", "expected"), RESPIRATION)
def test_respiration_rate_bands(rules: News2Rules, value: float, expected: int) -> None:
    assert sub_score(rules, "respiration_rate", respiration_rate=value) == expected


@pytest.mark.parametrize(("value", "expected"), SPO2_SCALE_1)
def test_spo2_scale_1_bands(rules: News2Rules, value: float, expected: int) -> None:
    assert sub_score(rules, "spo2", spo2=value) == expected
    # Scale 1 does not depend on oxygen: oxygen scores in its own row.
    assert sub_score(rules, "spo2", spo2=value, supplemental_oxygen=True) == expected


@pytest.mark.parametrize(("value", "expected"), SPO2_SCALE_2_AIR)
def test_spo2_scale_2_on_air_bands(rules: News2Rules, value: float, expected: int) -> None:
    score = sub_score(rules, "spo2", spo2=value, spo2_scale=2, supplemental_oxygen=False)
    assert score == expected


@pytest.mark.parametrize(("value", "expected"), SPO2_SCALE_2_OXYGEN)
def test_spo2_scale_2_on_oxygen_bands(rules: News2Rules, value: float, expected: int) -> None:
    score = sub_score(rules, "spo2", spo2=value, spo2_scale=2, supplemental_oxygen=True)
    assert score == expected


@pytest.mark.parametrize(("on_oxygen", "expected"), [(False, 0), (True, 2)])
def test_air_or_oxygen(rules: News2Rules, on_oxygen: bool, expected: int) -> None:
    assert sub_score(rules, "supplemental_oxygen", supplemental_oxygen=on_oxygen) == expected


@pytest.mark.parametrize(("value", "expected"), SYSTOLIC)
def test_systolic_bp_bands(rules: News2Rules, value: float, expected: int) -> None:
    assert sub_score(rules, "systolic_bp", systolic_bp=value) == expected


@pytest.mark.parametrize(("value", "expected"), PULSE)
def test_pulse_bands(rules: News2Rules, value: float, expected: int) -> None:
    assert sub_score(rules, "pulse", pulse=value) == expected


@pytest.mark.parametrize(("letter", "expected"), [("A", 0), ("C", 3), ("V", 3), ("P", 3), ("U", 3)])
def test_consciousness_acvpu(rules: News2Rules, letter: str, expected: int) -> None:
    assert sub_score(rules, "consciousness", consciousness=letter) == expected


@pytest.mark.parametrize(("value", "expected"), TEMPERATURE)
def test_temperature_bands(rules: News2Rules, value: float, expected: int) -> None:
    assert sub_score(rules, "temperature", temperature=value) == expected


# Values between printed bands are charted first: rounded half-up at the chart's resolution,
# as written in decimal (so 35.05, stored as the float 35.04999..., still charts as 35.1).
@pytest.mark.parametrize(
    ("changes", "parameter", "expected"),
    [
        ({"temperature": 35.05}, "temperature", 1),  # charted 35.1
        ({"temperature": 35.04}, "temperature", 3),  # charted 35.0
        ({"temperature": 36.05}, "temperature", 0),  # charted 36.1
        ({"temperature": 36.04}, "temperature", 1),  # charted 36.0
        ({"temperature": 38.05}, "temperature", 1),  # charted 38.1
        ({"temperature": 39.04}, "temperature", 1),  # charted 39.0
        ({"temperature": 39.05}, "temperature", 2),  # charted 39.1
        ({"temperature": 35.99999999}, "temperature", 1),  # conversion noise, charted 36.0
        ({"temperature": 36.11111111}, "temperature", 0),  # 97 degF, charted 36.1
        ({"respiration_rate": 8.49}, "respiration_rate", 3),  # charted 8
        ({"respiration_rate": 8.5}, "respiration_rate", 1),  # charted 9
        ({"respiration_rate": 20.5}, "respiration_rate", 2),  # charted 21
        ({"spo2": 91.5}, "spo2", 2),  # charted 92
        ({"spo2": 95.4}, "spo2", 1),  # charted 95
        ({"pulse": 90.5}, "pulse", 1),  # charted 91
        ({"systolic_bp": 219.5}, "systolic_bp", 3),  # charted 220
    ],
)
def test_values_between_bands_are_charted_half_up(
    rules: News2Rules, changes: dict[str, float], parameter: str, expected: int
) -> None:
    assert sub_score(rules, parameter, **changes) == expected


def test_chart_value_rounds_as_written() -> None:
    assert chart_value(35.05, 1) == Decimal("35.1")
    assert chart_value(35.04, 1) == Decimal("35.0")
    assert chart_value(20.5, 0) == Decimal("21")
    assert chart_value(-0.4, 0) == Decimal("0")


# --- worked totals --------------------------------------------------------------------------


def test_all_normal_scores_zero_and_level_none(rules: News2Rules) -> None:
    score = score_news2(NORMAL, rules)
    assert score.total == 0
    assert score.level == "none"
    assert not score.any_single_parameter_3
    assert list(score.sub_scores) == [
        "respiration_rate",
        "spo2",
        "supplemental_oxygen",
        "systolic_bp",
        "pulse",
        "consciousness",
        "temperature",
    ]


@pytest.mark.parametrize(
    ("vitals", "total", "single_3", "level"),
    [
        # resp 21 -> 2, temp 38.5 -> 1: 3, no single 3 -> low
        (Vitals(21, 97, False, 120, 70, "A", 38.5), 3, False, "low"),
        # new confusion -> 3 alone: total 3 but a red score -> urgent
        (Vitals(16, 97, False, 120, 70, "C", 37.0), 3, True, "urgent"),
        # resp 22 -> 2, SpO2 94 -> 1, pulse 105 -> 1, temp 38.2 -> 1: 5 -> urgent
        (Vitals(22, 94, False, 120, 105, "A", 38.2), 5, False, "urgent"),
        # resp 22 -> 2, SpO2 94 -> 1, BP 100 -> 2, pulse 105 -> 1: 6 -> urgent
        (Vitals(22, 94, False, 100, 105, "A", 37.0), 6, False, "urgent"),
        # resp 22 -> 2, SpO2 93 -> 2, oxygen -> 2, pulse 95 -> 1: 7 -> emergency
        (Vitals(22, 93, True, 120, 95, "A", 37.0), 7, False, "emergency"),
        # every parameter at its worst: 3 + 3 + 2 + 3 + 3 + 3 + 3 = 20
        (Vitals(30, 85, True, 85, 140, "U", 34.0), 20, True, "emergency"),
        # scale 2 on air, SpO2 90 -> 0 (scale 1 would give 3): total 0
        (Vitals(16, 90, False, 120, 70, "A", 37.0, spo2_scale=2), 0, False, "none"),
        # scale 2 on oxygen, SpO2 97 -> 3, oxygen -> 2: 5 and a red score
        (Vitals(16, 97, True, 120, 70, "A", 37.0, spo2_scale=2), 5, True, "urgent"),
    ],
)
def test_worked_totals(
    rules: News2Rules, vitals: Vitals, total: int, single_3: bool, level: str
) -> None:
    score = score_news2(vitals, rules)
    assert score.total == total
    assert score.any_single_parameter_3 is single_3
    assert score.level == level


def test_explanation_lists_every_parameter_with_value_and_score(rules: News2Rules) -> None:
    score = score_news2(Vitals(22, 93, True, 120, 95, "A", 35.05), rules)
    assert score.explanation == (
        "NEWS2 8 (emergency: total 8 >= 7); respiration rate 22 /min -> 2; "
        "SpO2 (scale 1) 93 % -> 2; air or oxygen: oxygen -> 2; systolic BP 120 mm[Hg] -> 0; "
        "pulse 95 /min -> 1; consciousness: alert (A) -> 0; "
        "temperature 35.05 Cel (charted 35.1) -> 1"
    )


def test_oxygen_and_consciousness_default_to_air_and_alert(rules: News2Rules) -> None:
    score = score_news2(Vitals(16, 97, None, 120, 70, None, 37.0), rules)
    assert score.total == 0
    assert [p.parameter for p in score.parameters if p.assumed] == [
        "supplemental_oxygen",
        "consciousness",
    ]
    assert "air or oxygen: air (assumed, not recorded) -> 0" in score.explanation
    assert "consciousness: alert (A) (assumed, not recorded) -> 0" in score.explanation


def test_scale_2_without_recorded_oxygen_scores_on_air(rules: News2Rules) -> None:
    score = score_news2(Vitals(16, 97, None, 120, 70, None, 37.0, spo2_scale=2), rules)
    assert score.sub_scores["spo2"] == 0
    assert "SpO2 (scale 2, on air) 97 % -> 0" in score.explanation


@pytest.mark.parametrize(
    ("vitals", "message"),
    [
        (Vitals(None, 97, False, 120, 70, "A", 37.0), "respiration_rate is required"),
        (Vitals(16, 97, False, 120, 70, "A", None), "temperature is required"),
        (Vitals(16, float("nan"), False, 120, 70, "A", 37.0), "spo2 must be a finite number"),
        (Vitals(16, 97, False, 120, 70, "X", 37.0), "consciousness must be one of A, C, V"),
        (Vitals(16, 97, False, 120, 70, "A", 37.0, spo2_scale=3), "spo2_scale must be 1 or 2"),
    ],
)
def test_unscorable_vitals_raise(rules: News2Rules, vitals: Vitals, message: str) -> None:
    with pytest.raises(News2InputError, match=message):
        score_news2(vitals, rules)


# --- rules file -----------------------------------------------------------------------------


def test_default_rules_load(rules: News2Rules) -> None:
    assert rules.version == "2026.11-1"
    assert rules.window_ms == 60 * MINUTE
    assert rules.scale_2_icd10_prefixes == ("J960", "J961")
    assert rules.urgent.rule_id == "news2.urgent" and rules.urgent.severity == "high"
    assert rules.emergency.rule_id == "news2.emergency"
    assert rules.emergency.severity == "critical"
    assert rules.parameter_for_code("2708-6") is rules.spo2
    assert rules.parameter_for_code("8480-6") is rules.systolic_bp
    assert rules.parameter_for_code("2823-3") is None


def _set(document: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node: Any = document
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is _DELETE:
        del node[last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "names"),
    [
        ("version", _DELETE, ["version", "Field required"]),
        ("window_minutes", 0, ["window_minutes"]),
        ("allowed_lateness_minutes", -1, ["allowed_lateness_minutes"]),
        ("surprise", 1, ["surprise", "Extra inputs"]),
        ("parameters.pulse.bands.0.score", 4, ["parameters.pulse.bands.0.score"]),
        ("parameters.pulse.bands.1.score", 1.5, ["parameters.pulse.bands.1.score"]),
        ("parameters.pulse.unit", " ", ["parameters.pulse.unit", "must not be empty"]),
        # a gap: 36.1-38.0 moved to start at 36.2
        ("parameters.temperature.bands.2.min", 36.2, ["parameters.temperature", "bands[2].min"]),
        # an overlap: 9-11 then 11-20
        ("parameters.respiration_rate.bands.2.min", 11, ["parameters.respiration_rate"]),
        ("parameters.temperature.bands.1.min", 35.15, ["bands[1].min", "more than 1 decimals"]),
        ("parameters.spo2.scale_2_on_oxygen.6.max", 100, ["parameters.spo2", "scale_2_on_oxygen"]),
        ("parameters.systolic_bp.required", False, ["parameters.systolic_bp", "required"]),
        ("parameters.supplemental_oxygen.assumed_when_absent", None, ["assumed_when_absent"]),
        ("parameters.consciousness.assumed_when_absent", "Z", ["parameters.consciousness"]),
        ("parameters.consciousness.levels.1.code", 0, ["each code must be used once"]),
        ("parameters.pulse.metric_codes", ["9279-1"], ["metric code '9279-1'"]),
        ("parameters.temperature.metric_codes", [], ["parameters.temperature.metric_codes"]),
        ("response.emergency_total", 5, ["response", "emergency_total must be above"]),
        ("alerts.urgent.severity", "loud", ["alerts.urgent.severity", "critical, high"]),
        ("scale_2", _DELETE, ["scale_2"]),
    ],
)
def test_invalid_rules_name_the_field(
    document: dict[str, Any], path: str, value: Any, names: list[str]
) -> None:
    _set(document, path, value)
    with pytest.raises(News2RulesError) as raised:
        news2_rules_from_dict(document, "news2-test.yaml")
    message = str(raised.value)
    assert message.startswith("news2-test.yaml: invalid NEWS2 rules")
    for name in names:
        assert name in message


def test_rules_not_a_mapping() -> None:
    with pytest.raises(News2RulesError, match=r"\(top level\)"):
        news2_rules_from_dict(["not", "a", "mapping"])


def test_rules_file_errors(tmp_path: Path) -> None:
    with pytest.raises(News2RulesError, match="cannot read NEWS2 rules"):
        load_news2_rules(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: [unclosed\n", encoding="utf-8")
    with pytest.raises(News2RulesError, match="not valid YAML"):
        load_news2_rules(broken)


# --- the detector ---------------------------------------------------------------------------

UNITS = {
    "9279-1": "/min",
    "59408-5": "%",
    "2708-6": "%",
    "3151-8": "L/min",
    "8480-6": "mm[Hg]",
    "8867-4": "/min",
    "80288-4": "{ACVPU}",
    "8310-5": "Cel",
}
CODES = {
    "resp": "9279-1",
    "spo2": "59408-5",
    "o2": "3151-8",
    "sbp": "8480-6",
    "hr": "8867-4",
    "acvpu": "80288-4",
    "temp": "8310-5",
}


class JsonState:
    """A KeyValueState that stores JSON text, as a Faust table would: proves serialisability."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def get(self, key: str) -> Any:
        text = self.values.get(key)
        return None if text is None else json.loads(text)

    def put(self, key: str, value: Any) -> None:
        self.values[key] = json.dumps(value)

    def delete(self, key: str) -> None:
        self.values.pop(key, None)

    def items(self) -> Iterator[tuple[str, Any]]:
        return iter([(key, json.loads(text)) for key, text in self.values.items()])


def observation(
    metric: str,
    value: float | None,
    minute: float = 0,
    event_id: str | None = None,
    person_key: str | None = PERSON,
    unit: str | None = None,
) -> dict[str, Any]:
    code = CODES.get(metric, metric)
    return {
        "event_id": event_id or f"{metric}-{minute}",
        "source_kind": "device",
        "source_system": "ward-monitors",
        "organisation_id": "H001",
        "event_time": T0 + int(minute * MINUTE),
        "ingest_time": T0 + int(minute * MINUTE) + 500,
        "normalised_time": T0 + int(minute * MINUTE) + 600,
        "person_key": person_key,
        "device_id": "dev-990101-07",
        "device_type": "monitor-a",
        "metric_code": code,
        "local_code": metric.upper(),
        "value": value,
        "unit": unit if unit is not None else UNITS.get(code),
        "original_unit": unit,
        "mapping_status": "mapped",
    }


def diagnosis(
    icd10: str,
    minute: float = 0,
    *,
    key: str = "dx-1",
    deleted: bool = False,
    version: int = 1,
    event_id: str | None = None,
) -> dict[str, Any]:
    return {
        "event_id": event_id or f"dx-{icd10}-{version}",
        "source_kind": "emr_cdc",
        "organisation_id": "H001",
        "event_time": T0 + int(minute * MINUTE),
        "person_key": PERSON,
        "encounter_key": "enc-1",
        "diagnosis_key": key,
        "op": "d" if deleted else "c",
        "is_deleted": deleted,
        "version": version,
        "icd10_code": icd10,
        "mapping_status": "mapped",
    }


def vital_set(minute: float = 0, **values: float | None) -> list[dict[str, Any]]:
    """The five required parameters (normal unless given) and any optional ones given."""
    readings: dict[str, float | None] = {
        "resp": 16,
        "spo2": 97,
        "sbp": 120,
        "hr": 70,
        "temp": 37.0,
        **values,
    }
    return [
        observation(metric, value, minute)
        for metric, value in readings.items()
        if value is not None
    ]


def feed(
    detector: News2Detector, state: JsonState, events: list[dict[str, Any]]
) -> list[Finding | Cleared]:
    outcomes: list[Finding | Cleared] = []
    for event in events:
        outcomes += detector.observe(event, state, T0)
    return outcomes


def rule_ids(outcomes: list[Finding | Cleared]) -> list[tuple[str, str]]:
    return [(type(o).__name__, o.rule_id) for o in outcomes]


@pytest.fixture()
def detector(rules: News2Rules) -> News2Detector:
    return News2Detector(rules)


@pytest.fixture()
def state() -> JsonState:
    return JsonState()


def test_normal_set_fires_nothing_but_is_held(detector: News2Detector, state: JsonState) -> None:
    assert feed(detector, state, vital_set()) == []
    record = state.get(f"news2|{PERSON}")
    assert record["level"] == "none"
    assert sorted(record["vitals"]) == [
        "pulse",
        "respiration_rate",
        "spo2",
        "systolic_bp",
        "temperature",
    ]


def test_urgent_finding_carries_score_evidence_and_explanation(
    detector: News2Detector, state: JsonState
) -> None:
    # resp 22 -> 2, SpO2 94 -> 1, pulse 105 -> 1, temp 38.2 -> 1: total 5
    outcomes = feed(detector, state, vital_set(resp=22, spo2=94, hr=105, temp=38.2))
    assert len(outcomes) == 1
    finding = outcomes[0]
    assert isinstance(finding, Finding)
    assert finding.rule_id == "news2.urgent"
    assert finding.severity == "high"
    assert finding.rule_version == "2026.11-1"
    assert finding.organisation_id == "H001"
    assert finding.subject == SUBJECT
    assert finding.person_key == PERSON
    assert finding.event_time_ms == T0
    assert finding.value == 5.0
    assert finding.details == {
        "respiration_rate": 2,
        "spo2": 1,
        "supplemental_oxygen": 0,
        "systolic_bp": 0,
        "pulse": 1,
        "consciousness": 0,
        "temperature": 1,
    }
    assert finding.triggering_event_ids == ("resp-0", "spo2-0", "sbp-0", "hr-0", "temp-0")
    assert finding.explanation.startswith("NEWS2 5 (urgent: total 5 >= 5); respiration rate 22")
    assert "air or oxygen: air (assumed, not recorded) -> 0" in finding.explanation
    assert "consciousness: alert (A) (assumed, not recorded) -> 0" in finding.explanation
    assert PERSON not in finding.explanation


def test_nothing_is_scored_until_every_required_parameter_is_in(
    detector: News2Detector, state: JsonState
) -> None:
    events = vital_set(resp=30)  # resp 30 -> 3 (urgent) once the set is complete
    assert feed(detector, state, events[:-1]) == []
    assert state.get(f"news2|{PERSON}")["level"] is None
    assert rule_ids(feed(detector, state, events[-1:])) == [("Finding", "news2.urgent")]


def test_recorded_oxygen_and_consciousness_are_scored(
    detector: News2Detector, state: JsonState
) -> None:
    # oxygen 2 L/min -> 2, V (code 2) -> 3, resp 22 -> 2: total 7 -> emergency
    events = vital_set(resp=22) + [observation("o2", 2.0), observation("acvpu", 2)]
    outcomes = feed(detector, state, events)
    assert rule_ids(outcomes) == [("Finding", "news2.emergency")]
    finding = outcomes[0]
    assert isinstance(finding, Finding)
    assert finding.severity == "critical"
    assert finding.value == 7.0
    assert finding.details["supplemental_oxygen"] == 2
    assert finding.details["consciousness"] == 3
    assert "o2-0" in finding.triggering_event_ids and "acvpu-0" in finding.triggering_event_ids
    assert "assumed" not in finding.explanation


def test_zero_oxygen_flow_means_air(detector: News2Detector, state: JsonState) -> None:
    assert feed(detector, state, vital_set() + [observation("o2", 0.0)]) == []
    assert state.get(f"news2|{PERSON}")["level"] == "none"


def test_edge_triggering_and_cleared(detector: News2Detector, state: JsonState) -> None:
    # urgent (resp 25 -> 3) fires once
    assert rule_ids(feed(detector, state, vital_set(0, resp=25))) == [("Finding", "news2.urgent")]
    # still urgent: no repeat
    assert feed(detector, state, vital_set(1, resp=26)) == []
    # urgent -> emergency (resp 3 + SpO2 91 -> 3 + pulse 131 -> 3): emergency only
    assert rule_ids(feed(detector, state, vital_set(2, resp=26, spo2=91, hr=131))) == [
        ("Finding", "news2.emergency")
    ]
    # emergency -> urgent: the emergency clears, urgent is still open from the way up
    outcomes = feed(detector, state, vital_set(3, resp=26))
    assert rule_ids(outcomes) == [("Cleared", "news2.emergency")]
    cleared = outcomes[0]
    assert isinstance(cleared, Cleared)
    assert cleared.subject == SUBJECT
    assert cleared.time_ms == T0 + 3 * MINUTE
    # Each event rescores the latest values: the clearing event is the SpO2 97 of minute 3,
    # while the pulse 131 of minute 2 is still the latest pulse (3 + 3 = 6).
    assert cleared.reason.startswith(
        "NEWS2 level fell from emergency to urgent. NEWS2 6 (urgent: total 6 >= 5); "
        "respiration rate 26 /min -> 3; SpO2 (scale 1) 97 % -> 0"
    )
    # urgent -> low (resp 21 -> 2): urgent clears
    assert rule_ids(feed(detector, state, vital_set(4, resp=21))) == [("Cleared", "news2.urgent")]
    # a later rise fires again
    assert rule_ids(feed(detector, state, vital_set(5, resp=25))) == [("Finding", "news2.urgent")]


def test_straight_to_emergency_then_down_to_urgent(
    detector: News2Detector, state: JsonState
) -> None:
    # resp 3 + SpO2 3 + pulse 3 = 9: emergency, no separate urgent finding
    assert rule_ids(feed(detector, state, vital_set(0, resp=30, spo2=88, hr=140))) == [
        ("Finding", "news2.emergency")
    ]
    # down to urgent (resp 30 -> 3 alone): the emergency clears and urgent is entered
    assert rule_ids(feed(detector, state, vital_set(1, resp=30))) == [
        ("Cleared", "news2.emergency"),
        ("Finding", "news2.urgent"),
    ]
    # straight to none: urgent clears
    assert rule_ids(feed(detector, state, vital_set(2))) == [("Cleared", "news2.urgent")]


def test_values_outside_the_window_are_not_used(detector: News2Detector, state: JsonState) -> None:
    feed(detector, state, vital_set(0, resp=30))  # urgent at minute 0
    # Minute 60: every other parameter is renewed; resp from minute 0 is exactly 60 minutes
    # old, still inside the window, and keeps the level urgent.
    others = [e for e in vital_set(60) if e["metric_code"] != CODES["resp"]]
    assert feed(detector, state, others) == []
    assert state.get(f"news2|{PERSON}")["level"] == "urgent"
    # Minute 61: resp is now 61 minutes old: the set is incomplete, nothing changes
    assert feed(detector, state, [observation("temp", 37.0, 61)]) == []
    record = state.get(f"news2|{PERSON}")
    assert "respiration_rate" not in record["vitals"]  # pruned
    assert record["level"] == "urgent"
    # a fresh normal resp completes the set again and the urgent alert clears
    assert rule_ids(feed(detector, state, [observation("resp", 16, 62)])) == [
        ("Cleared", "news2.urgent")
    ]


def test_late_events_are_counted_and_not_used(detector: News2Detector, state: JsonState) -> None:
    feed(detector, state, vital_set(30))
    # 10 minutes before the newest is the lateness bound itself: still used
    assert rule_ids(detector.observe(observation("resp", 30, 20), state, T0)) == []
    assert state.get(f"news2|{PERSON}")["vitals"]["respiration_rate"]["value"] == 16
    # (older than the held resp at minute 30, so not newer: not used either)
    assert detector.late_events == 0
    # 10.5 minutes before the newest: late
    assert detector.observe(observation("acvpu", 4, 19.5), state, T0) == []
    assert detector.late_events == 1
    assert "consciousness" not in state.get(f"news2|{PERSON}")["vitals"]


def test_out_of_order_event_within_lateness(detector: News2Detector, state: JsonState) -> None:
    feed(detector, state, vital_set(30))
    # consciousness has no value yet: an out-of-order V at minute 25 is used and fires
    outcomes = detector.observe(observation("acvpu", 2, 25), state, T0)
    assert rule_ids(outcomes) == [("Finding", "news2.urgent")]
    assert isinstance(outcomes[0], Finding)
    assert outcomes[0].event_time_ms == T0 + 30 * MINUTE  # the person's newest event time
    # an alert at minute 28 is newer than the V at 25: used, and the urgent clears
    assert rule_ids(detector.observe(observation("acvpu", 0, 28), state, T0)) == [
        ("Cleared", "news2.urgent")
    ]
    # a U at minute 26 is older than the A held from 28: not used
    assert detector.observe(observation("acvpu", 4, 26), state, T0) == []
    held = state.get(f"news2|{PERSON}")["vitals"]["consciousness"]
    assert (held["value"], held["event_id"]) == (0, "acvpu-28")
    assert detector.late_events == 0


def test_redelivered_event_changes_nothing(detector: News2Detector, state: JsonState) -> None:
    feed(detector, state, vital_set(0, resp=30))
    before = dict(state.values)
    assert feed(detector, state, vital_set(0, resp=30)) == []
    assert state.values == before


@pytest.mark.parametrize(
    "event",
    [
        observation("resp", 30, person_key=None),
        observation("2823-3", 6.9, unit="mmol/L"),  # not a NEWS2 parameter
        {**observation("resp", 30), "metric_code": None, "mapping_status": "unmapped"},
        observation("resp", None),
        observation("resp", float("nan")),
        observation("temp", 99.5, unit="[degF]"),  # not the chart's unit
        observation("acvpu", 7),  # no such ACVPU code
        observation("o2", -1.0),
    ],
)
def test_unusable_events_are_ignored(
    detector: News2Detector, state: JsonState, event: dict[str, Any]
) -> None:
    assert detector.observe(event, state, T0) == []
    assert state.values == {}
    assert detector.ignored_events == 1


def test_other_event_kinds_are_not_for_news2(detector: News2Detector, state: JsonState) -> None:
    assert detector.observe({"event_id": "x", "loinc_code": "2823-3"}, state, T0) == []
    assert state.values == {} and detector.ignored_events == 0


def test_datetime_event_times_are_accepted(detector: News2Detector, state: JsonState) -> None:
    events = vital_set(resp=30)
    for event in events:
        event["event_time"] = datetime.fromtimestamp(T0 / 1000, tz=UTC)
    outcomes = feed(detector, state, events)
    assert [o.event_time_ms for o in outcomes if isinstance(o, Finding)] == [T0]


def test_scale_2_diagnosis_scores_spo2_on_scale_2(
    detector: News2Detector, state: JsonState
) -> None:
    assert detector.observe(diagnosis("J96.12"), state, T0) == []
    # SpO2 90 on air: scale 2 gives 0 (scale 1 would give 3 and fire urgent)
    assert feed(detector, state, vital_set(1, spo2=90)) == []
    assert state.get(f"news2|{PERSON}")["level"] == "none"
    # on oxygen at 97 %: SpO2 -> 3, oxygen -> 2: urgent
    outcomes = feed(detector, state, vital_set(2, spo2=97, o2=2.0))
    assert rule_ids(outcomes) == [("Finding", "news2.urgent")]
    finding = outcomes[0]
    assert isinstance(finding, Finding)
    assert finding.details["spo2"] == 3
    assert "SpO2 (scale 2, on oxygen) 97 % -> 3" in finding.explanation
    assert finding.triggering_event_ids[-1] == "dx-J96.12-1"


def test_without_diagnosis_the_same_set_is_scale_1(
    detector: News2Detector, state: JsonState
) -> None:
    outcomes = feed(detector, state, vital_set(1, spo2=90))
    assert rule_ids(outcomes) == [("Finding", "news2.urgent")]
    assert isinstance(outcomes[0], Finding)
    assert "SpO2 (scale 1) 90 % -> 3" in outcomes[0].explanation


def test_deleted_or_other_diagnoses_do_not_put_on_scale_2(
    detector: News2Detector, state: JsonState
) -> None:
    assert detector.observe(diagnosis("J96.1", deleted=True), state, T0) == []
    assert detector.observe(diagnosis("J44.1", key="dx-2"), state, T0) == []
    assert state.values == {}
    assert rule_ids(feed(detector, state, vital_set(1, spo2=90))) == [("Finding", "news2.urgent")]


def test_diagnosis_changes_rescore_the_held_set(detector: News2Detector, state: JsonState) -> None:
    feed(detector, state, vital_set(0, spo2=89))  # scale 1: SpO2 89 -> 3, urgent
    # the hypercapnic diagnosis arrives: on scale 2 SpO2 89 -> 0, the urgent alert clears
    assert rule_ids(detector.observe(diagnosis("J96.0", 5), state, T0)) == [
        ("Cleared", "news2.urgent")
    ]
    # a stale version of the same diagnosis (deleted at version 0) is ignored
    assert detector.observe(diagnosis("J96.0", 6, deleted=True, version=0), state, T0) == []
    # the real deletion puts the person back on scale 1, and the urgent fires again
    outcomes = detector.observe(diagnosis("J96.0", 7, deleted=True, version=2), state, T0)
    assert rule_ids(outcomes) == [("Finding", "news2.urgent")]
    # recreating with an older version after the delete is ignored (tombstone)
    assert detector.observe(diagnosis("J96.0", 8, version=1), state, T0) == []
    assert state.get(f"news2|{PERSON}")["level"] == "urgent"


def test_tick_bounds_the_state(rules: News2Rules, state: JsonState) -> None:
    detector = News2Detector(rules)
    feed(detector, state, vital_set(0))
    late_person = [dict(e, person_key=OTHER_PERSON) for e in vital_set(30)]
    feed(detector, state, late_person)
    # window 60 + lateness 10: at minute 70 nobody is stale yet
    assert detector.tick(state, T0 + 70 * MINUTE) == []
    assert len(state.values) == 2
    # one millisecond later the first person's vital signs are gone, the other's kept
    assert detector.tick(state, T0 + 70 * MINUTE + 1) == []
    assert list(state.values) == [f"news2|{OTHER_PERSON}"]
    assert detector.tick(state, T0 + 101 * MINUTE) == []
    assert state.values == {}


def test_tick_keeps_diagnoses_for_their_retention(
    detector: News2Detector, rules: News2Rules, state: JsonState
) -> None:
    detector.observe(diagnosis("J96.1", 0), state, T0)
    feed(detector, state, vital_set(1))
    detector.tick(state, T0 + 3 * 60 * MINUTE)
    record = state.get(f"news2|{PERSON}")
    assert record["vitals"] == {} and record["level"] is None
    assert record["diagnoses"]["dx-1"]["qualifies"] is True
    # vital signs coming back after hours are scored on scale 2 still
    assert feed(detector, state, vital_set(200, spo2=90)) == []
    later = T0 + 200 * MINUTE + rules.diagnosis_retention_ms + rules.window_ms + MINUTE
    detector.tick(state, later)
    assert state.values == {}


def test_other_namespaces_are_left_alone(detector: News2Detector, state: JsonState) -> None:
    state.put("device|dev-990101-07", {"last_seen_ms": 0})
    assert detector.tick(state, T0) == []
    assert list(state.values) == ["device|dev-990101-07"]
