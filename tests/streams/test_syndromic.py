"""Syndromic surveillance: counting once per diagnosis, hour closing, EWMA and CUSUM signals.

The signal tests use synthetic hourly series (seeded Poisson counts) with a known injected
outbreak: a step in the mean at a known hour. They assert silence over the stable part
and a signal within the expected number of hours after the step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import dataclasses

import pytest
import yaml

from streams.findings import DictState, Finding
from streams.syndromic import (
    DEFAULT_SYNDROMIC_RULES_PATH,
    HOUR_MS,
    SyndromicDetector,
    SyndromicRules,
    SyndromicRulesError,
    load_syndromic_rules,
    syndromic_rules_from_dict,
)

T0 = 1_793_700_000_000 - 1_793_700_000_000 % HOUR_MS  # an hour boundary
DISTRICT_KEY = "syndromic|district|yunxi-urban"


@pytest.fixture(scope="module")
def rules() -> SyndromicRules:
    # Judged at once (no settling), so event time alone drives these tests; settling is
    # tested on its own below.
    return dataclasses.replace(load_syndromic_rules(), settle_ms=0)


class Diagnoses:
    """Makes synthetic diagnosis events with unique, fictional ids."""

    def __init__(self) -> None:
        self.serial = 0

    def __call__(
        self,
        t_ms: int,
        code: str | None,
        org: str = "H001",
        diagnosis_key: str | None = None,
        op: str = "c",
    ) -> dict[str, Any]:
        self.serial += 1
        return {
            "event_id": f"ev-{self.serial:06d}",
            "source_kind": "emr_cdc",
            "organisation_id": org,
            "event_time": t_ms,
            "ingest_time": t_ms + 2_000,
            "person_key": f"pk-990101-{self.serial:06d}",
            "encounter_key": f"enc-{self.serial}",
            "diagnosis_key": diagnosis_key or f"dk-{self.serial:06d}",
            "op": op,
            "is_deleted": op == "d",
            "version": 1,
            "icd10_code": code,
            "mapping_status": "mapped" if code else "unmapped",
        }


def hourly_series(
    detector: SyndromicDetector, state: DictState, counts: list[int], code: str
) -> list[Finding]:
    """Feed ``counts[i]`` diagnoses of ``code`` in hour i (plus one unrelated diagnosis, so
    every hour has data), then one event two hours later to close the last hour."""
    make = Diagnoses()
    findings: list[Finding] = []
    for hour, count in enumerate(counts):
        start = T0 + hour * HOUR_MS
        events = [make(start + 1_000, "I10")]
        events += [make(start + (i + 1) * HOUR_MS // (count + 2), code) for i in range(count)]
        for event in events:
            findings.extend(detector.observe(event, state, 0))
    closing = make(T0 + (len(counts) + 1) * HOUR_MS, "I10")
    findings.extend(detector.observe(closing, state, 0))
    return findings


def signal_hours(findings: list[Finding]) -> list[int]:
    return [(f.event_time_ms - T0) // HOUR_MS for f in findings]


# --- the rules file -------------------------------------------------------------------------


def test_default_rules_and_code_matching(rules: SyndromicRules) -> None:
    assert rules.version == "2026.11-1"
    assert rules.lateness_ms == HOUR_MS
    assert rules.districts == {
        "H001": "yunxi-urban",
        "H002": "yunxi-urban",
        "H003": "yunxi-urban",
        "H004": "mingsha-county",
    }
    assert [s.syndrome for s in rules.syndromes_of("J11.1")] == ["ili"]
    assert [s.syndrome for s in rules.syndromes_of(" j09.x1 ")] == ["ili"]
    assert [s.syndrome for s in rules.syndromes_of("A08.0")] == ["gastrointestinal"]
    assert [s.syndrome for s in rules.syndromes_of("A09")] == ["gastrointestinal"]
    # Conservative ILI: pneumonia, upper respiratory infection and fever are not counted.
    assert rules.syndromes_of("J18.9") == rules.syndromes_of("J06.9") == []
    assert rules.syndromes_of("R50.9") == rules.syndromes_of(None) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "cusum", "h": None}, r"h \(the CUSUM decision limit\) is required"),
        ({"method": "ewma", "h": 4.0}, "h is only used by method cusum"),
        ({"method": "shewhart"}, "syndromes.0.method"),
        ({"alpha": 1.0}, "syndromes.0.alpha"),
        ({"icd10_prefixes": []}, "syndromes.0.icd10_prefixes"),
    ],
)
def test_invalid_rules_name_the_field(change: dict[str, Any], message: str) -> None:
    document = yaml.safe_load(DEFAULT_SYNDROMIC_RULES_PATH.read_text(encoding="utf-8"))
    document["syndromes"][0].update(change)
    with pytest.raises(SyndromicRulesError, match=message):
        syndromic_rules_from_dict(document, "syndromic.yaml")


def test_duplicate_syndrome_and_missing_file(tmp_path: Path) -> None:
    document = yaml.safe_load(DEFAULT_SYNDROMIC_RULES_PATH.read_text(encoding="utf-8"))
    document["syndromes"][1]["syndrome"] = "ili"
    with pytest.raises(SyndromicRulesError, match="'ili' is defined more than once"):
        syndromic_rules_from_dict(document)
    with pytest.raises(SyndromicRulesError, match="cannot read syndromic rules"):
        load_syndromic_rules(tmp_path / "missing.yaml")


# --- counting -------------------------------------------------------------------------------


def test_each_diagnosis_counts_once_and_deletes_and_unmapped_never(rules: SyndromicRules) -> None:
    detector, state, make = SyndromicDetector(rules), DictState(), Diagnoses()
    hour = str(T0)
    events = [
        make(T0 + 60_000, "J11.1", diagnosis_key="dk-a"),
        make(T0 + 120_000, "J11.1", diagnosis_key="dk-a", op="u"),  # CDC update: same one
        make(T0 + 180_000, "J10.0", diagnosis_key="dk-a", op="u"),
        make(T0 + 240_000, "J11.1", diagnosis_key="dk-b", op="d"),  # deleted: not counted
        make(T0 + 300_000, "J11.1", diagnosis_key="dk-b"),  # ... its first non-deleted sighting
        make(T0 + 360_000, None),  # unmapped house code
        make(T0 + 420_000, "J11.1", org="H003"),  # another urban hospital
        make(T0 + 480_000, "J11.1", org="H004"),  # the county: another district
        make(T0 + 540_000, "J11.1", org="H999"),  # not in the district map: ignored
    ]
    for event in events:
        assert detector.observe(event, state, 0) == []
    bucket = state.values[DISTRICT_KEY]["hours"][hour]
    assert bucket["total"] == 7  # every urban diagnosis event shows the feed delivered
    ili = bucket["syndromes"]["ili"]
    assert ili["count"] == 3
    assert ili["organisations"] == {"H001": 2, "H003": 1}
    assert ili["event_ids"] == ["ev-000001", "ev-000005", "ev-000007"]
    county = state.values["syndromic|district|mingsha-county"]["hours"][hour]
    assert county["syndromes"]["ili"]["count"] == 1
    assert "syndromic|seen|H999|" not in "".join(state.values)


def test_hours_close_on_the_watermark_and_late_events_are_not_used(
    rules: SyndromicRules,
) -> None:
    detector, state, make = SyndromicDetector(rules), DictState(), Diagnoses()
    detector.observe(make(T0 + 10 * 60_000, "J11.1"), state, 0)
    # Watermark = newest event time - 60 min: the hour [T0, T0+1h) closes at T0 + 2h.
    detector.observe(make(T0 + 2 * HOUR_MS - 1, "I10"), state, 0)
    assert str(T0) in state.values[DISTRICT_KEY]["hours"]
    detector.observe(make(T0 + 2 * HOUR_MS, "I10"), state, 0)
    record = state.values[DISTRICT_KEY]
    assert str(T0) not in record["hours"] and record["next_close_ms"] == T0 + HOUR_MS
    assert record["baselines"]["ili"]["hours"] == 1  # the closed hour was learnt (count 1)
    # Within the lateness, an event for the still-open hour counts ...
    detector.observe(make(T0 + HOUR_MS + 5, "J11.1"), state, 0)
    assert state.values[DISTRICT_KEY]["hours"][str(T0 + HOUR_MS)]["syndromes"]["ili"]["count"] == 1
    # ... an event for the closed hour is late: counted as such, not used.
    detector.observe(make(T0 + 30 * 60_000, "J11.1"), state, 0)
    record = state.values[DISTRICT_KEY]
    assert record["late_events"] == 1 and str(T0) not in record["hours"]
    assert record["baselines"]["ili"]["hours"] == 1


def test_hours_without_any_data_are_skipped_not_learnt_as_zero(rules: SyndromicRules) -> None:
    detector, state, make = SyndromicDetector(rules), DictState(), Diagnoses()
    detector.observe(make(T0, "J11.1"), state, 0)
    detector.observe(make(T0 + 30 * HOUR_MS, "I10"), state, 0)  # a 30-hour outage
    baseline = state.values[DISTRICT_KEY]["baselines"]["ili"]
    assert baseline["hours"] == 1 and baseline["mean"] == 1.0
    assert state.values[DISTRICT_KEY]["next_close_ms"] == T0 + 29 * HOUR_MS


def test_tick_forgets_diagnoses_after_the_retention(rules: SyndromicRules) -> None:
    detector, state, make = SyndromicDetector(rules), DictState(), Diagnoses()
    detector.observe(make(T0, "J11.1", diagnosis_key="dk-old"), state, 0)
    detector.observe(make(T0 + 100 * HOUR_MS, "J11.1", diagnosis_key="dk-new"), state, 0)
    assert detector.tick(state, 0) == []
    assert {k for k in state.values if k.startswith("syndromic|seen|")} == {
        "syndromic|seen|H001|dk-old",
        "syndromic|seen|H001|dk-new",
    }
    # Watermark 170 h - 1 h lateness: dk-old (0 h) is past the 168 h retention, dk-new is not.
    detector.observe(make(T0 + 170 * HOUR_MS, "I10"), state, 0)
    detector.tick(state, 0)
    assert {k for k in state.values if k.startswith("syndromic|seen|")} == {
        "syndromic|seen|H001|dk-new"
    }
    # Forgotten: a later update of dk-old would count again (documented limitation).
    assert (
        detector.observe(make(T0 + 171 * HOUR_MS, "J11.1", "H001", "dk-old", "u"), state, 0) == []
    )
    record = state.values[DISTRICT_KEY]
    assert record["hours"][str(T0 + 171 * HOUR_MS)]["syndromes"]["ili"]["count"] == 1


# --- EWMA (ILI) -----------------------------------------------------------------------------


def test_ewma_silent_on_a_stable_baseline_and_signals_after_a_step(
    rules: SyndromicRules,
) -> None:
    rng = np.random.default_rng(20261101)
    stable = rng.poisson(8, 120).tolist()  # 48 warm-up hours + 72 tested hours
    outbreak = rng.poisson(24, 6).tolist()  # the injected step at hour 120: mean 8 -> 24
    detector, state = SyndromicDetector(rules), DictState()
    findings = hourly_series(detector, state, stable + outbreak, "J11.1")
    hours = signal_hours(findings)
    assert hours and min(hours) >= 120, f"false alarm in the stable part: {hours}"
    # Threshold about 8 + 3.5 x 2.8 = 17.9 against a mean of 24: expected within 2 hours.
    assert min(hours) <= 121
    first = findings[0]
    count = outbreak[min(hours) - 120]
    assert (first.rule_id, first.severity, first.subject) == (
        "syndromic.ili",
        "medium",
        "yunxi-urban|ili",
    )
    assert first.value == count and first.details["count"] == count
    assert first.details["baseline_mean"] == pytest.approx(np.mean(stable), abs=1.5)
    assert first.details["threshold"] == pytest.approx(
        first.details["baseline_mean"] + 3.5 * first.details["baseline_sd"]
    )
    assert len(first.triggering_event_ids) == count
    assert f"Influenza-like illness in district yunxi-urban: {count} diagnoses" in (
        first.explanation
    )
    assert f"all {count} event ids listed" in first.explanation


def test_ewma_waits_for_the_warm_up_and_min_count(rules: SyndromicRules) -> None:
    detector, state = SyndromicDetector(rules), DictState()
    # A big jump in hour 10 is inside the 48-hour warm-up: no signal.
    assert hourly_series(detector, state, [1] * 10 + [30] + [1] * 5, "J11.1") == []
    detector, state = SyndromicDetector(rules), DictState()
    # After warm-up on zeros, 4 cases exceed mean + 3 sd (sd floor 1) but not min_count 5.
    findings = hourly_series(detector, state, [0] * 60 + [4] + [0] * 3 + [5], "J11.1")
    assert signal_hours(findings) == [64]


def test_triggering_ids_are_capped_at_fifty(rules: SyndromicRules) -> None:
    detector, state = SyndromicDetector(rules), DictState()
    findings = hourly_series(detector, state, [2] * 50 + [60], "J10.1")
    assert len(findings) == 1
    assert len(findings[0].triggering_event_ids) == 50
    assert "first 50 of 60 event ids listed" in findings[0].explanation


def test_alert_is_filed_under_the_largest_contributor(rules: SyndromicRules) -> None:
    detector, state, make = SyndromicDetector(rules), DictState(), Diagnoses()
    hourly_series(detector, state, [1] * 50, "J11.1")  # warm baseline, hours 0..49
    start = T0 + 52 * HOUR_MS
    events = [make(start + i * 1000, "J11.1", org="H002") for i in range(6)]
    events += [make(start + 10_000 + i * 1000, "J11.1", org="H003") for i in range(4)]
    events.append(make(start + 3 * HOUR_MS, "I10"))
    findings = [f for e in events for f in detector.observe(e, state, 0)]
    assert [(f.organisation_id, f.details["organisation_counts"]) for f in findings] == [
        ("H002", {"H002": 6, "H003": 4})
    ]


# --- CUSUM (gastrointestinal) ---------------------------------------------------------------


def test_cusum_silent_on_a_stable_baseline_and_signals_after_a_step(
    rules: SyndromicRules,
) -> None:
    rng = np.random.default_rng(7)
    stable = rng.poisson(4, 120).tolist()
    outbreak = rng.poisson(9, 8).tolist()  # step at hour 120: mean 4 -> 9 (about +2.5 sd)
    detector, state = SyndromicDetector(rules), DictState()
    findings = hourly_series(detector, state, stable + outbreak, "A09")
    hours = signal_hours(findings)
    assert hours and min(hours) >= 120, f"false alarm in the stable part: {hours}"
    # Each outbreak hour adds about (9 - 4) / 2 - 0.5 = 2 to S; h = 6: within 4 hours.
    assert min(hours) <= 123
    first = findings[0]
    assert (first.rule_id, first.subject) == (
        "syndromic.gastrointestinal",
        "yunxi-urban|gastrointestinal",
    )
    assert first.details["method"] == "cusum"
    assert first.details["cusum"] > 6.0 and first.details["threshold"] == 6.0
    assert (
        "above the decision limit h 6" in first.explanation and "CUSUM reset" in first.explanation
    )
    # Reset after the signal: S starts again from zero, so the next hour cannot signal.
    assert min(hours) + 1 not in hours


def test_cusum_accumulates_a_step_a_single_hour_test_misses(rules: SyndromicRules) -> None:
    # Same moderate step through both methods: mean 6 -> 11 (about +2 sd per hour). The
    # 3-sd EWMA test fires only on unusually high hours; the CUSUM sums the evidence.
    document = yaml.safe_load(DEFAULT_SYNDROMIC_RULES_PATH.read_text(encoding="utf-8"))
    document["syndromes"][0]["icd10_prefixes"] = ["A08", "A09"]
    document["syndromes"][1]["icd10_prefixes"] = ["J11"]
    swapped = syndromic_rules_from_dict(document)  # ewma now watches A08/A09
    series = [6, 5, 7, 6, 6, 5, 7, 6] * 7 + [11] * 6
    ewma = hourly_series(SyndromicDetector(swapped), DictState(), series, "A09")
    cusum = hourly_series(SyndromicDetector(rules), DictState(), series, "A09")
    assert ewma == []  # 11 < 6 + 3.5 x 2.45 in every outbreak hour
    # S grows by about (11 - 6) / 2.45 - 0.5 = 1.5 an hour (a little less as the baseline
    # learns the 11s) and passes h = 6 in the fifth outbreak hour (56 + 4); then it resets.
    assert signal_hours(cusum) == [60]
    assert cusum[0].details["cusum"] == pytest.approx(6.39, abs=0.01)


def test_a_backfill_arriving_out_of_order_is_counted_before_its_hours_are_judged() -> None:
    """A CDC snapshot of past diagnoses reaches the detector through several partitions, out
    of order: settling keeps every hour open until the backfill has arrived."""
    rules = load_syndromic_rules()
    assert rules.settle_ms == 20_000  # the shipped value
    detector = SyndromicDetector(rules)
    state = DictState()
    make = Diagnoses()
    counts = [2] * 60 + [14]  # a stable baseline (past the warm-up), then an outbreak hour
    events = []
    for hour, count in enumerate(counts):
        start = T0 + hour * HOUR_MS
        events.append(make(start + 1_000, "I10"))
        events += [make(start + (i + 1) * 60_000, "J11.1") for i in range(count)]
    events.append(make(T0 + (len(counts) + 1) * HOUR_MS, "I10"))  # closes the last hour
    import random

    random.Random(3).shuffle(events)
    wall = 1_000_000
    findings = [f for event in events for f in detector.observe(event, state, wall)]
    assert findings == []  # nothing judged within the settle time
    assert state.get(DISTRICT_KEY)["late_events"] == 0
    assert detector.tick(state, wall + 19_999) == []
    signalled = detector.tick(state, wall + 20_000)
    assert signal_hours(signalled) == [60]
    assert signalled[0].rule_id == "syndromic.ili" and signalled[0].value == 14
    # Judged hours are closed: a later diagnosis for one of them is late, not counted.
    detector.observe(make(T0 + 5 * HOUR_MS, "J11.1"), state, wall + 30_000)
    assert state.get(DISTRICT_KEY)["late_events"] == 1
