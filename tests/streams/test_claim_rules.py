"""Claim anomaly rules: duplicates, cost outliers, after death, outside the visit, bounded state."""

from __future__ import annotations

import copy
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from schemas.identity import event_id
from streams.claim_rules import (
    AFTER_DEATH,
    COST_OUTLIER,
    DEFAULT_CLAIM_RULES_PATH,
    EXACT_DUPLICATE,
    NEAR_DUPLICATE,
    OUTSIDE_ENCOUNTER,
    ClaimDetector,
    ClaimRules,
    ClaimRulesError,
    claim_rules_from_dict,
    load_claim_rules,
    robust_z,
)
from streams.findings import DictState, Finding

DAY_MS = 86_400_000
# 2026-11-03T08:00Z: when the payer submitted the first claims (ingest time, wall clock).
INGEST_MS = 1_793_692_800_000 + 8 * 3_600_000
NOW_MS = INGEST_MS + 1_000
PERSON = "p" * 32
SERVICE_DAY = date(2026, 11, 2)


def _midnight_ms(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)


def claim_line(
    claim_id: str = "CLM-1",
    line_no: int = 1,
    *,
    person_key: str | None = PERSON,
    organisation_id: str = "H001",
    item_code: str | None = "C09AA05",
    local_item_code: str = "D001",
    service_date: date | int = SERVICE_DAY,
    quantity: float = 2.0,
    amount: float = 40.0,
    ingest_ms: int = INGEST_MS,
    encounter_key: str | None = None,
    payer_id: str = "PAY1",
) -> dict[str, Any]:
    """A synthetic normalised claim_line event (fictional ids, area code 990101)."""
    day = (
        service_date
        if isinstance(service_date, date)
        else date.fromordinal(date(1970, 1, 1).toordinal() + service_date)
    )
    return {
        "event_id": event_id("claim", organisation_id, f"{payer_id}:{claim_id}", line_no - 1),
        "source_kind": "claim",
        "source_system": "payer-990101",
        "organisation_id": organisation_id,
        "event_time": _midnight_ms(day),
        "ingest_time": ingest_ms,
        "normalised_time": ingest_ms + 50,
        "source_topic": "raw.claim",
        "source_partition": 0,
        "source_offset": 7,
        "record_index": line_no - 1,
        "record_count": 3,
        "source_ref": f"{payer_id}:{claim_id}",
        "mapping_version": "test-2026.1",
        "person_key": person_key,
        "claim_id": claim_id,
        "payer_id": payer_id,
        "line_no": line_no,
        "item_code": item_code,
        "local_item_code": local_item_code,
        "item_display": "Item",
        "quantity": quantity,
        "unit_price": amount / quantity if quantity else 0.0,
        "amount": amount,
        "service_date": service_date,
        "diagnosis_codes": ["I10"],
        "mapping_status": "mapped" if item_code else "unmapped",
        "encounter_key": encounter_key,
    }


def encounter(
    encounter_key: str = "enc-1",
    *,
    admit: date = date(2026, 11, 1),
    discharge: date | None = date(2026, 11, 5),
    deceased: date | None = None,
    version: int = 1,
    deleted: bool = False,
    ingest_ms: int = INGEST_MS,
    person_key: str | None = PERSON,
) -> dict[str, Any]:
    """A synthetic normalised encounter event; deceased_time is noon of the day of death."""
    return {
        "event_id": event_id("emr_cdc", "H001", f"enc:{encounter_key}:{version}", 0),
        "source_kind": "emr_cdc",
        "organisation_id": "H001",
        "event_time": _midnight_ms(admit),
        "ingest_time": ingest_ms,
        "person_key": person_key,
        "encounter_key": encounter_key,
        "op": "d" if deleted else "u",
        "is_deleted": deleted,
        "version": version,
        "encounter_class": "inpatient",
        "admit_time": _midnight_ms(admit) + 9 * 3_600_000,
        "discharge_time": None if discharge is None else _midnight_ms(discharge) + 3_600_000,
        "deceased_time": None if deceased is None else _midnight_ms(deceased) + 12 * 3_600_000,
        "mapping_status": "mapped",
    }


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(DEFAULT_CLAIM_RULES_PATH.read_text(encoding="utf-8"))
    return loaded


def rules_with(document: dict[str, Any], section: str, **values: Any) -> ClaimRules:
    changed = copy.deepcopy(document)
    changed[section].update(values)
    return claim_rules_from_dict(changed)


@pytest.fixture()
def detector() -> ClaimDetector:
    return ClaimDetector(load_claim_rules())


def of_rule(findings: list[Finding], rule_id: str) -> list[Finding]:
    return [finding for finding in findings if finding.rule_id == rule_id]


# --- rules file -----------------------------------------------------------------------------


def test_shipped_rules_load() -> None:
    rules = load_claim_rules()
    assert rules.version == "2026.11-1"
    assert rules.severities == {
        EXACT_DUPLICATE: "high",
        NEAR_DUPLICATE: "medium",
        COST_OUTLIER: "medium",
        AFTER_DEATH: "high",
        OUTSIDE_ENCOUNTER: "medium",
    }
    assert (rules.duplicate_window_days, rules.near_days, rules.near_amount_pct) == (30, 3, 10)
    assert (rules.window_size, rules.min_samples, rules.z_threshold) == (50, 20, 3.5)
    assert (rules.grace_days, rules.max_lines_per_person) == (1, 300)


def test_invalid_rules_name_the_field(document: dict[str, Any], tmp_path: Path) -> None:
    bad = copy.deepcopy(document)
    bad["near_duplicate"]["severity"] = "urgent"
    with pytest.raises(ClaimRulesError, match="near_duplicate.severity: Value error, must be one"):
        claim_rules_from_dict(bad)
    with pytest.raises(ClaimRulesError, match="cost_outlier.min_samples: must not exceed"):
        rules_with(document, "cost_outlier", min_samples=60)
    missing = copy.deepcopy(document)
    del missing["after_death"]
    with pytest.raises(ClaimRulesError, match="after_death: Field required"):
        claim_rules_from_dict(missing)
    extra = copy.deepcopy(document)
    extra["outside_encounter"]["grace"] = 2
    with pytest.raises(ClaimRulesError, match="outside_encounter.grace: Extra inputs"):
        claim_rules_from_dict(extra)
    with pytest.raises(ClaimRulesError, match="cannot read"):
        load_claim_rules(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: [unclosed\n", encoding="utf-8")
    with pytest.raises(ClaimRulesError, match="not valid YAML"):
        load_claim_rules(broken)


# --- exact and near duplicates --------------------------------------------------------------


def test_exact_duplicate_on_another_claim(detector: ClaimDetector) -> None:
    state = DictState()
    first = claim_line("CLM-1", 1)
    second = claim_line("CLM-2", 3, ingest_ms=INGEST_MS + 5 * DAY_MS)
    assert detector.observe(first, state, NOW_MS) == []
    findings = detector.observe(second, state, NOW_MS)
    assert [f.rule_id for f in findings] == [EXACT_DUPLICATE]
    finding = findings[0]
    assert finding.severity == "high"
    assert finding.rule_version == "2026.11-1"
    assert finding.subject == "PAY1:CLM-2|3"
    assert finding.person_key == PERSON
    assert finding.organisation_id == "H001"
    assert finding.event_time_ms == _midnight_ms(SERVICE_DAY)
    assert finding.triggering_event_ids == (second["event_id"], first["event_id"])
    assert finding.details["matches"] == ["PAY1:CLM-1|1"]
    assert finding.explanation == (
        "Claim line PAY1:CLM-2|3 repeats line PAY1:CLM-1|1 of another claim (1 such line(s)): "
        "organisation H001, item C09AA05, service date 2026-11-02, quantity 2, amount 40"
    )


def test_redelivery_is_not_a_duplicate(detector: ClaimDetector) -> None:
    state = DictState()
    line = claim_line("CLM-1", 1)
    assert detector.observe(line, state, NOW_MS) == []
    assert detector.observe(dict(line, source_offset=99), state, NOW_MS) == []
    assert len(state.values[f"claims|person|{PERSON}"]["lines"]) == 1
    # The price window counted it once as well.
    assert len(state.values["claims|price|H001|C09AA05"]) == 1


def test_lines_of_the_same_claim_are_not_duplicates(detector: ClaimDetector) -> None:
    state = DictState()
    assert detector.observe(claim_line("CLM-1", 1), state, NOW_MS) == []
    assert detector.observe(claim_line("CLM-1", 2), state, NOW_MS) == []
    # The same claim number of another payer is another claim.
    findings = detector.observe(claim_line("CLM-1", 1, payer_id="PAY2"), state, NOW_MS)
    assert [f.rule_id for f in findings] == [EXACT_DUPLICATE]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"amount": 80.0}, []),  # 50% apart: neither exact nor near
        ({"quantity": 3.0}, [NEAR_DUPLICATE]),  # same amount, other quantity: near only
        ({"organisation_id": "H002"}, [NEAR_DUPLICATE]),  # another hospital: near only
        ({"item_code": "N02BE01"}, []),  # another item
        ({"person_key": "q" * 32}, []),  # another person
        ({"ingest_ms": INGEST_MS + 31 * DAY_MS}, []),  # seen after the 30-day window
        ({"ingest_ms": INGEST_MS + 30 * DAY_MS}, [EXACT_DUPLICATE]),  # window inclusive
    ],
)
def test_exact_duplicate_negatives(
    detector: ClaimDetector, change: dict[str, Any], expected: list[str]
) -> None:
    state = DictState()
    detector.observe(claim_line("CLM-1", 1), state, NOW_MS)
    findings = detector.observe(claim_line("CLM-2", 1, **change), state, NOW_MS)
    assert [
        f.rule_id for f in of_rule(findings, EXACT_DUPLICATE) + of_rule(findings, NEAR_DUPLICATE)
    ] == expected


def test_unmapped_lines_compare_by_local_code(detector: ClaimDetector) -> None:
    state = DictState()
    detector.observe(claim_line("CLM-1", item_code=None, local_item_code="X9"), state, NOW_MS)
    findings = detector.observe(
        claim_line("CLM-2", item_code=None, local_item_code="X9"), state, NOW_MS
    )
    assert [f.rule_id for f in findings] == [EXACT_DUPLICATE]
    assert "item local:X9" in findings[0].explanation
    assert "claims|price|H001|None" not in state.values  # no price window for unmapped items


def test_near_duplicate_positive_and_limits(detector: ClaimDetector) -> None:
    state = DictState()
    first = claim_line("CLM-1", 1, service_date=date(2026, 11, 2), amount=40.0)
    detector.observe(first, state, NOW_MS)
    near = claim_line("CLM-2", 1, service_date=date(2026, 11, 5), amount=36.0)
    findings = detector.observe(near, state, NOW_MS)
    assert [f.rule_id for f in findings] == [NEAR_DUPLICATE]
    assert findings[0].severity == "medium"
    assert findings[0].triggering_event_ids == (near["event_id"], first["event_id"])
    assert findings[0].explanation == (
        "Claim line PAY1:CLM-2|1 is close to line PAY1:CLM-1|1 of another claim (1 such line(s)):"
        " item C09AA05, service dates 2026-11-02 and 2026-11-05 (3 days apart, limit 3), "
        "amounts 40 and 36 (10% apart, limit 10%)"
    )
    other = DictState()
    detector.observe(first, other, NOW_MS)
    too_far = claim_line("CLM-3", 1, service_date=date(2026, 11, 6), amount=40.0)
    assert detector.observe(too_far, other, NOW_MS) == []  # 4 days apart
    too_cheap = claim_line("CLM-4", 1, service_date=date(2026, 11, 3), amount=35.9)
    assert detector.observe(too_cheap, other, NOW_MS) == []  # 10.25% apart


def test_exact_duplicate_wins_over_near(detector: ClaimDetector) -> None:
    state = DictState()
    detector.observe(claim_line("CLM-1", 1, service_date=date(2026, 11, 1)), state, NOW_MS)
    detector.observe(claim_line("CLM-2", 1, amount=39.0), state, NOW_MS)  # near of CLM-1
    exact_source = claim_line("CLM-3", 1)  # near of CLM-1 (one day apart) and CLM-2 (2.5%)
    findings = detector.observe(exact_source, state, NOW_MS)
    assert [f.rule_id for f in findings] == [NEAR_DUPLICATE]
    repeat = claim_line("CLM-4", 1)  # exact of CLM-3, near of CLM-1 and CLM-2
    findings = detector.observe(repeat, state, NOW_MS)
    assert [f.rule_id for f in findings] == [EXACT_DUPLICATE]
    assert findings[0].triggering_event_ids == (repeat["event_id"], exact_source["event_id"])


def test_lines_without_person_are_not_compared(detector: ClaimDetector) -> None:
    state = DictState()
    detector.observe(claim_line("CLM-1", person_key=None), state, NOW_MS)
    assert detector.observe(claim_line("CLM-2", person_key=None), state, NOW_MS) == []
    assert not [key for key in state.values if key.startswith("claims|person|")]


def test_decoded_avro_types_are_accepted(detector: ClaimDetector) -> None:
    state = DictState()
    detector.observe(claim_line("CLM-1"), state, NOW_MS)
    decoded = claim_line("CLM-2", service_date=(SERVICE_DAY - date(1970, 1, 1)).days)
    decoded["event_time"] = datetime(2026, 11, 2, tzinfo=UTC)
    decoded["ingest_time"] = datetime.fromtimestamp(INGEST_MS / 1000, tz=UTC)
    findings = detector.observe(decoded, state, NOW_MS)
    assert [f.rule_id for f in findings] == [EXACT_DUPLICATE]
    assert findings[0].event_time_ms == _midnight_ms(SERVICE_DAY)


# --- cost outliers --------------------------------------------------------------------------


def test_robust_z_by_hand() -> None:
    # Iglewicz and Hoaglin (1993) modified z = 0.6745 (x - median) / MAD, worked by hand:
    # median 100, absolute deviations 5,3,2,1,0,0,1,2,3,5 -> MAD 2; x = 112 -> 0.6745*12/2.
    samples = [95.0, 97, 98, 99, 100, 100, 101, 102, 103, 105]
    median, mad, z = robust_z(112.0, samples)
    assert (median, mad) == (100.0, 2.0)
    assert z == pytest.approx(4.047)
    # MAD 0 (six of ten equal): (x - median) / (1.253314 * MeanAD), MeanAD = 60 / 10 = 6.
    median, mad, z = robust_z(130.0, [100.0] * 6 + [80, 90, 110, 120])
    assert (median, mad) == (100.0, 0.0)
    assert z == pytest.approx(30 / (1.253314 * 6))
    assert robust_z(130.0, [100.0] * 5) == (100.0, 0.0, None)


def _price_detector(document: dict[str, Any]) -> ClaimDetector:
    return ClaimDetector(rules_with(document, "cost_outlier", window_size=10, min_samples=10))


def _feed_prices(detector: ClaimDetector, state: DictState, prices: list[float]) -> None:
    for index, price in enumerate(prices):
        # Different persons and days, so no duplicate rule interferes.
        line = claim_line(f"HIST-{index}", person_key=f"h{index:031d}", quantity=1.0, amount=price)
        assert of_rule(detector.observe(line, state, NOW_MS), COST_OUTLIER) == []


def test_cost_outlier_fires_above_threshold(document: dict[str, Any]) -> None:
    detector = _price_detector(document)
    state = DictState()
    _feed_prices(detector, state, [95.0, 97, 98, 99, 100, 100, 101, 102, 103, 105])
    # Two units at 112 each: the unit price, not the amount, is scored.
    line = claim_line("CLM-9", quantity=2.0, amount=224.0)
    findings = of_rule(detector.observe(line, state, NOW_MS), COST_OUTLIER)
    assert len(findings) == 1
    finding = findings[0]
    assert finding.severity == "medium"
    assert finding.subject == "PAY1:CLM-9|1"
    assert finding.triggering_event_ids == (line["event_id"],)
    assert finding.details["z"] == pytest.approx(4.047)
    assert finding.explanation == (
        "Unit price 112 of item C09AA05 at organisation H001 is far above the median 100 of "
        "the last 10 prices: MAD 2, robust z 4.05 (limit 3.5)"
    )


def test_cost_outlier_negatives(document: dict[str, Any]) -> None:
    detector = _price_detector(document)
    state = DictState()
    _feed_prices(detector, state, [95.0, 97, 98, 99, 100, 100, 101, 102, 103])
    # Nine samples < min_samples 10: even an absurd price is not scored yet.
    assert (
        of_rule(detector.observe(claim_line("A", amount=9000.0), state, NOW_MS), COST_OUTLIER) == []
    )
    state = DictState()
    _feed_prices(detector, state, [95.0, 97, 98, 99, 100, 100, 101, 102, 103, 105])
    # x = 110 per unit: z = 0.6745 * 10 / 2 = 3.37 <= 3.5.
    line = claim_line("B", quantity=1.0, amount=110.0)
    assert of_rule(detector.observe(line, state, NOW_MS), COST_OUTLIER) == []
    # Unmapped items are never scored; quantity 0 has no unit price.
    unmapped = claim_line("C", item_code=None, quantity=1.0, amount=9000.0)
    assert detector.observe(unmapped, state, NOW_MS) == []
    assert (
        of_rule(
            detector.observe(claim_line("D", quantity=0.0, amount=9000.0), state, NOW_MS),
            COST_OUTLIER,
        )
        == []
    )


def test_cost_outlier_below_the_median(document: dict[str, Any]) -> None:
    detector = _price_detector(document)
    state = DictState()
    _feed_prices(detector, state, [95.0, 97, 98, 99, 100, 100, 101, 102, 103, 105])
    findings = of_rule(
        detector.observe(claim_line("LOW", quantity=1.0, amount=85.0), state, NOW_MS),
        COST_OUTLIER,
    )
    assert len(findings) == 1
    assert "far below the median 100" in findings[0].explanation
    assert findings[0].details["z"] == pytest.approx(-5.05875)


def test_cost_outlier_with_mad_zero(document: dict[str, Any]) -> None:
    detector = _price_detector(document)
    state = DictState()
    _feed_prices(detector, state, [100.0] * 6 + [80, 90, 110, 120])
    # MeanAD fallback: z = 25 / (1.253314 * 6) = 3.32: within the limit.
    assert (
        of_rule(
            detector.observe(claim_line("OK", quantity=1.0, amount=125.0), state, NOW_MS),
            COST_OUTLIER,
        )
        == []
    )
    state = DictState()
    _feed_prices(detector, state, [100.0] * 6 + [80, 90, 110, 120])
    findings = of_rule(
        detector.observe(claim_line("HI", quantity=1.0, amount=130.0), state, NOW_MS),
        COST_OUTLIER,
    )
    assert len(findings) == 1
    assert findings[0].details["mad"] == 0.0
    assert findings[0].details["z"] == pytest.approx(3.989, abs=0.001)


def test_cost_outlier_with_a_fixed_tariff(document: dict[str, Any]) -> None:
    detector = _price_detector(document)
    state = DictState()
    _feed_prices(detector, state, [50.0] * 10)
    # Every earlier price 50: the same price, and 10% off (tolerance 20%), pass.
    assert (
        of_rule(
            detector.observe(claim_line("SAME", quantity=1.0, amount=50.0), state, NOW_MS),
            COST_OUTLIER,
        )
        == []
    )
    assert (
        of_rule(
            detector.observe(claim_line("TEN", quantity=1.0, amount=55.0), state, NOW_MS),
            COST_OUTLIER,
        )
        == []
    )
    state = DictState()
    _feed_prices(detector, state, [50.0] * 10)
    findings = of_rule(
        detector.observe(claim_line("FAR", quantity=1.0, amount=65.0), state, NOW_MS),
        COST_OUTLIER,
    )
    assert len(findings) == 1
    assert findings[0].details["z"] is None
    assert findings[0].explanation == (
        "Unit price 65 of item C09AA05 at organisation H001 differs from the fixed price 50 "
        "that all 10 earlier prices had (MAD 0, z undefined): 30% off, tolerance 20%"
    )


def test_price_window_is_fixed_size(document: dict[str, Any]) -> None:
    detector = _price_detector(document)
    state = DictState()
    _feed_prices(detector, state, [float(100 + index) for index in range(25)])
    window = state.values["claims|price|H001|C09AA05"]
    assert len(window) == 10
    assert [price for _, price in window] == [float(115 + index) for index in range(10)]


# --- after death ----------------------------------------------------------------------------


def test_claim_after_a_known_death(detector: ClaimDetector) -> None:
    state = DictState()
    death = encounter(deceased=date(2026, 11, 4))
    assert detector.observe(death, state, NOW_MS) == []
    on_the_day = claim_line("CLM-1", service_date=date(2026, 11, 4))
    assert of_rule(detector.observe(on_the_day, state, NOW_MS), AFTER_DEATH) == []
    after = claim_line("CLM-2", 2, service_date=date(2026, 11, 9), item_code="N02BE01")
    findings = of_rule(detector.observe(after, state, NOW_MS), AFTER_DEATH)
    assert len(findings) == 1
    assert findings[0].severity == "high"
    assert findings[0].subject == "PAY1:CLM-2|2"
    assert findings[0].triggering_event_ids == (after["event_id"], death["event_id"])
    assert findings[0].explanation == (
        "Claim line PAY1:CLM-2|2 has service date 2026-11-09, 5 day(s) after the person's "
        "recorded death on 2026-11-04"
    )


def test_death_known_late_rechecks_held_lines(detector: ClaimDetector) -> None:
    state = DictState()
    before = claim_line("CLM-1", service_date=date(2026, 11, 2))
    after = claim_line("CLM-2", service_date=date(2026, 11, 8), item_code="N02BE01")
    assert detector.observe(before, state, NOW_MS) == []
    assert detector.observe(after, state, NOW_MS) == []
    death = encounter(deceased=date(2026, 11, 5), ingest_ms=INGEST_MS + DAY_MS)
    findings = detector.observe(death, state, NOW_MS)
    assert [(f.rule_id, f.subject) for f in findings] == [(AFTER_DEATH, "PAY1:CLM-2|1")]
    assert findings[0].triggering_event_ids == (after["event_id"], death["event_id"])
    # The death redelivered, or the line redelivered, does not report the line again.
    assert detector.observe(death, state, NOW_MS) == []
    assert detector.observe(after, state, NOW_MS) == []


def test_withdrawn_death_no_longer_applies(detector: ClaimDetector) -> None:
    state = DictState()
    detector.observe(encounter(deceased=date(2026, 11, 4), version=1), state, NOW_MS)
    detector.observe(encounter(deceased=None, version=2), state, NOW_MS)  # disposition fixed
    line = claim_line("CLM-1", service_date=date(2026, 11, 5))
    assert of_rule(detector.observe(line, state, NOW_MS), AFTER_DEATH) == []
    # A stale version 1 arriving late does not bring the death back.
    detector.observe(encounter(deceased=date(2026, 11, 4), version=1), state, NOW_MS)
    assert state.values[f"claims|person|{PERSON}"]["death"] is None


# --- outside the encounter ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("service_date", "fires", "where"),
    [
        (date(2026, 11, 7), True, "2 day(s) after discharge on 2026-11-05"),
        (date(2026, 11, 6), False, ""),  # within the one-day grace
        (date(2026, 11, 3), False, ""),  # during the stay
        (date(2026, 10, 31), False, ""),  # the day before admission: grace
        (date(2026, 10, 30), True, "2 day(s) before admission on 2026-11-01"),
    ],
)
def test_outside_encounter_span(
    detector: ClaimDetector, service_date: date, fires: bool, where: str
) -> None:
    state = DictState()
    visit = encounter("enc-1")
    detector.observe(visit, state, NOW_MS)
    line = claim_line("CLM-1", service_date=service_date, encounter_key="enc-1")
    findings = of_rule(detector.observe(line, state, NOW_MS), OUTSIDE_ENCOUNTER)
    assert len(findings) == (1 if fires else 0)
    if fires:
        assert findings[0].severity == "medium"
        assert findings[0].triggering_event_ids == (line["event_id"], visit["event_id"])
        assert findings[0].explanation == (
            f"Claim line PAY1:CLM-1|1 has service date {service_date.isoformat()}, {where} of its"
            " visit (grace 1 day(s))"
        )


def test_outside_encounter_not_applicable(detector: ClaimDetector) -> None:
    state = DictState()
    far = date(2026, 12, 20)
    # Unknown encounter, no encounter_key, and an open stay (no discharge yet).
    assert (
        detector.observe(claim_line("A", service_date=far, encounter_key="enc-x"), state, 0) == []
    )
    assert detector.observe(claim_line("B", 2, service_date=far, item_code="X1"), state, 0) == []
    detector.observe(encounter("enc-open", discharge=None), state, NOW_MS)
    line = claim_line("C", 3, service_date=far, item_code="X2", encounter_key="enc-open")
    assert detector.observe(line, state, NOW_MS) == []
    # A deleted visit is not a span either.
    detector.observe(encounter("enc-del", version=2, deleted=True), state, NOW_MS)
    line = claim_line("D", 4, service_date=far, item_code="X3", encounter_key="enc-del")
    assert detector.observe(line, state, NOW_MS) == []


def test_encounter_known_late_rechecks_held_lines(detector: ClaimDetector) -> None:
    state = DictState()
    line = claim_line("CLM-1", service_date=date(2026, 11, 9), encounter_key="enc-1")
    assert detector.observe(line, state, NOW_MS) == []
    findings = detector.observe(encounter("enc-1"), state, NOW_MS)
    assert [(f.rule_id, f.subject) for f in findings] == [(OUTSIDE_ENCOUNTER, "PAY1:CLM-1|1")]
    assert detector.observe(encounter("enc-1", version=2), state, NOW_MS) == []  # once only


# --- bounded state --------------------------------------------------------------------------


def test_lines_expire_after_the_duplicate_window(detector: ClaimDetector) -> None:
    state = DictState()
    detector.observe(claim_line("OLD", 1), state, NOW_MS)
    detector.observe(
        claim_line("NEW", 1, item_code="X1", ingest_ms=INGEST_MS + 31 * DAY_MS), state, NOW_MS
    )
    held = state.values[f"claims|person|{PERSON}"]["lines"]
    assert [line["subject"] for line in held] == ["PAY1:NEW|1"]


def test_lines_and_encounters_are_capped(document: dict[str, Any]) -> None:
    changed = copy.deepcopy(document)
    changed["state"] = {"max_lines_per_person": 3, "max_encounters_per_person": 2}
    detector = ClaimDetector(claim_rules_from_dict(changed))
    state = DictState()
    for index in range(5):
        line = claim_line(f"C{index}", item_code=f"X{index}", ingest_ms=INGEST_MS + index)
        detector.observe(line, state, NOW_MS)
        detector.observe(encounter(f"enc-{index}", ingest_ms=INGEST_MS + index), state, NOW_MS)
    person = state.values[f"claims|person|{PERSON}"]
    assert [line["subject"] for line in person["lines"]] == ["PAY1:C2|1", "PAY1:C3|1", "PAY1:C4|1"]
    assert sorted(person["encounters"]) == ["enc-3", "enc-4"]


def test_tick_forgets_idle_persons(detector: ClaimDetector) -> None:
    state = DictState()
    detector.observe(claim_line("CLM-1"), state, NOW_MS)
    detector.observe(claim_line("CLM-2", person_key="q" * 32, item_code="X1"), state, NOW_MS)
    detector.observe(encounter(person_key="q" * 32), state, NOW_MS)
    assert detector.tick(state, INGEST_MS + 40 * DAY_MS) == []
    # The line-only person is gone; the other keeps its encounter (retained 180 days).
    assert f"claims|person|{PERSON}" not in state.values
    kept = state.values[f"claims|person|{'q' * 32}"]
    assert (kept["lines"], sorted(kept["encounters"])) == ([], ["enc-1"])
    detector.tick(state, INGEST_MS + 181 * DAY_MS)
    assert not [key for key in state.values if key.startswith("claims|person|")]
