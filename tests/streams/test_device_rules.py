"""Device rules: out-of-range entry and clearance, frozen sensors, silent devices, the YAML."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from streams.device_rules import (
    DEFAULT_DEVICE_RULES_PATH,
    FLAT_LINE,
    OUT_OF_RANGE,
    SILENCE,
    DeviceDetector,
    DeviceRules,
    DeviceRulesError,
    device_rules_from_dict,
    load_device_rules,
)
from streams.findings import Cleared, DictState, Finding

T0 = 1_793_700_000_000  # 2026-11-03 (fictional test day)
HR, SPO2, TEMP = "8867-4", "59408-5", "8310-5"
DEVICE = "h001-monitor-a-03"


@pytest.fixture(scope="module")
def rules() -> DeviceRules:
    return load_device_rules()


def sample(
    n: int,
    value: float | None,
    metric: str | None = HR,
    unit: str = "/min",
    t_ms: int | None = None,
    ingest_ms: int | None = None,
    device_id: str = DEVICE,
    device_type: str = "monitor-a",
) -> dict[str, Any]:
    """One observation event: sample number n of a monitor-a (15 s interval) by default."""
    event_ms = T0 + n * 15_000 if t_ms is None else t_ms
    return {
        "event_id": f"obs-{device_id}-{metric}-{n}",
        "source_kind": "device",
        "organisation_id": "H001",
        "event_time": event_ms,
        "ingest_time": event_ms + 400 if ingest_ms is None else ingest_ms,
        "source_ref": f"pkt-{n}",
        "person_key": "pk-990101-0001",
        "device_id": device_id,
        "device_type": device_type,
        "metric_code": metric,
        "local_code": "HR",
        "value": value,
        "unit": unit,
        "original_unit": "bpm",
        "mapping_status": "mapped" if metric else "unmapped",
    }


def feed(detector: DeviceDetector, state: DictState, events: list[dict[str, Any]]) -> list[Any]:
    outcomes: list[Any] = []
    for event in events:
        outcomes.extend(detector.observe(event, state, T0))
    return outcomes


# --- the rules file -------------------------------------------------------------------------


def test_default_rules_hold_the_documented_limits(rules: DeviceRules) -> None:
    assert rules.version == "2026.11-1"
    assert (rules.limits[HR].low, rules.limits[HR].high, rules.limits[HR].unit) == (
        40,
        140,
        "/min",
    )
    assert (rules.limits[SPO2].low, rules.limits[SPO2].high) == (85, None)
    assert (rules.limits[TEMP].low, rules.limits[TEMP].high, rules.limits[TEMP].unit) == (
        35.0,
        39.5,
        "Cel",
    )
    assert rules.limits["8480-6"].unit == "mm[Hg]"
    assert set(rules.flat_line) == {HR, SPO2, "9279-1"}
    # 4 missed intervals of each device type in medstream/region.yaml.
    assert rules.silence_after_ms("monitor-a") == 60_000
    assert rules.silence_after_ms("oximeter-o") == 20_000
    assert rules.silence_after_ms("wearable-w") == 240_000
    assert rules.silence_after_ms("unknown-type") == 240_000


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("out_of_range", "metrics", 0, "low"), 150, "out_of_range.metrics.0: Value error, low"),
        (("out_of_range", "severity"), "urgent", "out_of_range.severity"),
        (("flat_line", "metrics", 0, "min_samples"), 1, "flat_line.metrics.0.min_samples"),
        (("silence", "missed_intervals"), 0, "silence.missed_intervals"),
        (("silence", "forget_after_hours"), 0.001, "forget_after_hours must exceed"),
    ],
)
def test_invalid_rules_name_the_field(path: tuple[Any, ...], value: Any, message: str) -> None:
    document = yaml.safe_load(DEFAULT_DEVICE_RULES_PATH.read_text(encoding="utf-8"))
    target = document
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    with pytest.raises(DeviceRulesError) as raised:
        device_rules_from_dict(document, "devices.yaml")
    assert message in str(raised.value)
    assert str(raised.value).startswith("devices.yaml: invalid device rules")


def test_duplicate_metric_and_unreadable_file_are_rejected(tmp_path: Path) -> None:
    document = yaml.safe_load(DEFAULT_DEVICE_RULES_PATH.read_text(encoding="utf-8"))
    document["out_of_range"]["metrics"].append(
        copy.deepcopy(document["out_of_range"]["metrics"][0])
    )
    with pytest.raises(DeviceRulesError, match="'8867-4' is listed more than once"):
        device_rules_from_dict(document)
    with pytest.raises(DeviceRulesError, match="cannot read device rules"):
        load_device_rules(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: [", encoding="utf-8")
    with pytest.raises(DeviceRulesError, match="not valid YAML"):
        load_device_rules(broken)


# --- device.out_of_range --------------------------------------------------------------------


def test_out_of_range_fires_on_entry_once_and_clears_on_return(rules: DeviceRules) -> None:
    detector, state = DeviceDetector(rules), DictState()
    assert feed(detector, state, [sample(0, 80), sample(1, 140)]) == []  # 140 is the limit
    entered = feed(detector, state, [sample(2, 152)])
    assert len(entered) == 1
    finding = entered[0]
    assert isinstance(finding, Finding)
    assert (finding.rule_id, finding.severity, finding.rule_version) == (
        OUT_OF_RANGE,
        "high",
        "2026.11-1",
    )
    assert finding.subject == f"{DEVICE}|{HR}"
    assert finding.triggering_event_ids == (f"obs-{DEVICE}-{HR}-2",)
    assert (finding.value, finding.unit, finding.analyte_code) == (152.0, "/min", HR)
    assert finding.event_time_ms == T0 + 2 * 15_000
    assert finding.explanation == (
        f"Heart rate 152 /min above device alarm high 140 on device {DEVICE}"
    )
    assert feed(detector, state, [sample(3, 160), sample(4, 145)]) == []  # still out: no repeat
    back = feed(detector, state, [sample(5, 90)])
    assert len(back) == 1 and isinstance(back[0], Cleared)
    assert (back[0].rule_id, back[0].subject, back[0].time_ms) == (
        OUT_OF_RANGE,
        f"{DEVICE}|{HR}",
        T0 + 5 * 15_000,
    )
    assert "90 /min" in back[0].reason
    again = feed(detector, state, [sample(6, 35)])  # a new episode, on the low side
    assert len(again) == 1 and "below device alarm low 40" in again[0].explanation


def test_out_of_range_checks_only_mapped_samples_in_the_rule_unit(rules: DeviceRules) -> None:
    detector, state = DeviceDetector(rules), DictState()
    outcomes = feed(
        detector,
        state,
        [
            sample(0, 200, metric=None),  # unmapped local code
            sample(1, 200, unit="bpm"),  # not the rule's UCUM unit
            sample(2, None),  # no value
            sample(3, float("nan")),
            sample(4, 39.8, metric=TEMP, unit="Cel"),  # temperature above 39.5
        ],
    )
    assert [(o.rule_id, o.subject, o.value) for o in outcomes] == [
        (OUT_OF_RANGE, f"{DEVICE}|{TEMP}", 39.8)
    ]


def test_spo2_has_no_upper_limit_and_a_late_sample_does_not_change_state(
    rules: DeviceRules,
) -> None:
    detector, state = DeviceDetector(rules), DictState()
    assert feed(detector, state, [sample(0, 100, metric=SPO2, unit="%")]) == []
    low = feed(detector, state, [sample(10, 82, metric=SPO2, unit="%")])
    assert [o.rule_id for o in low] == [OUT_OF_RANGE]
    # A sample older than the newest one (sample 5 < 10) arrives late: the device's current
    # reading is still 82 %, so it neither clears nor re-fires.
    assert feed(detector, state, [sample(5, 97, metric=SPO2, unit="%")]) == []
    cleared = feed(detector, state, [sample(11, 95, metric=SPO2, unit="%")])
    assert [type(o).__name__ for o in cleared] == ["Cleared"]


# --- device.flat_line -----------------------------------------------------------------------


def test_flat_line_needs_both_samples_and_duration_then_clears(rules: DeviceRules) -> None:
    detector, state = DeviceDetector(rules), DictState()
    # monitor-a samples every 15 s: 20 samples span only 285 s, so the 600 s duration decides:
    # the 41st identical sample (n = 40, 600 s after the first) fires.
    before = feed(detector, state, [sample(n, 72) for n in range(40)])
    assert before == []
    fired = feed(detector, state, [sample(40, 72)])
    assert len(fired) == 1
    finding = fired[0]
    assert (finding.rule_id, finding.severity, finding.subject) == (
        FLAT_LINE,
        "medium",
        f"{DEVICE}|{HR}",
    )
    assert finding.details["samples"] == 41 and finding.details["duration_ms"] == 600_000
    assert "stayed at 72 /min for 41 consecutive samples over 600 s" in finding.explanation
    assert finding.triggering_event_ids[0] == f"obs-{DEVICE}-{HR}-0"
    assert finding.triggering_event_ids[-1] == f"obs-{DEVICE}-{HR}-40"
    assert len(finding.triggering_event_ids) == 10
    assert feed(detector, state, [sample(n, 72) for n in range(41, 60)]) == []  # no repeat
    varied = feed(detector, state, [sample(60, 75)])
    assert [(type(o).__name__, o.rule_id) for o in varied] == [("Cleared", FLAT_LINE)]


def test_flat_line_on_a_slow_wearable_waits_for_the_sample_count(rules: DeviceRules) -> None:
    detector, state = DeviceDetector(rules), DictState()
    wearable = "h002-wearable-w-01"
    events = [
        sample(
            n,
            18,
            metric="9279-1",
            t_ms=T0 + n * 60_000,
            device_id=wearable,
            device_type="wearable-w",
        )
        for n in range(20)
    ]
    outcomes = feed(detector, state, events)
    # 10 samples already span 540 s, but 20 samples are needed: only the 20th fires.
    assert len(outcomes) == 1 and outcomes[0].details["samples"] == 20


def test_flat_line_ignores_redelivered_samples_and_unlisted_metrics(rules: DeviceRules) -> None:
    detector, state = DeviceDetector(rules), DictState()
    assert feed(detector, state, [sample(0, 72)] * 60) == []  # the same event 60 times
    run = state.values[f"device|H001|{DEVICE}"]["metrics"][HR]["run"]
    assert run["count"] == 1
    # Temperature is not a beat-to-beat metric: a steady 36.8 for an hour is no finding.
    steady = [sample(n, 36.8, metric=TEMP, unit="Cel") for n in range(240)]
    assert feed(detector, state, steady) == []


def test_flat_line_tolerates_spread_up_to_epsilon(rules: DeviceRules) -> None:
    document = yaml.safe_load(DEFAULT_DEVICE_RULES_PATH.read_text(encoding="utf-8"))
    document["flat_line"]["metrics"][0].update(epsilon=1, min_samples=5, min_duration_s=60)
    detector, state = DeviceDetector(device_rules_from_dict(document)), DictState()
    values = [72, 73, 72, 73, 72]  # spread 1: within epsilon
    outcomes = feed(detector, state, [sample(n, v) for n, v in enumerate(values)])
    assert len(outcomes) == 1 and "stayed at 72-73 /min for 5" in outcomes[0].explanation


# --- device.silence -------------------------------------------------------------------------


def test_silence_fires_once_per_episode_and_the_next_packet_clears(rules: DeviceRules) -> None:
    detector, state = DeviceDetector(rules), DictState()
    last_ingest = T0 + 5_000
    feed(detector, state, [sample(0, 80, ingest_ms=last_ingest)])
    assert detector.tick(state, last_ingest + 59_999) == []  # 4 x 15 s not yet passed
    silent = detector.tick(state, last_ingest + 60_000)
    assert len(silent) == 1
    finding = silent[0]
    assert isinstance(finding, Finding)
    assert (finding.rule_id, finding.severity, finding.subject) == (SILENCE, "high", DEVICE)
    assert finding.triggering_event_ids == (f"obs-{DEVICE}-{HR}-0",)
    assert finding.event_time_ms == last_ingest + 60_000
    assert "sent nothing for 60 s, at least 4 x its 15 s sample interval" in finding.explanation
    assert detector.tick(state, last_ingest + 120_000) == []  # same episode: no repeat
    back = detector.observe(sample(20, 80, ingest_ms=last_ingest + 130_000), state, T0)
    assert [(type(o).__name__, o.rule_id, o.subject) for o in back] == [
        ("Cleared", SILENCE, DEVICE)
    ]
    assert detector.tick(state, last_ingest + 150_000) == []
    assert len(detector.tick(state, last_ingest + 190_000)) == 1  # a second episode


def test_a_restart_with_kept_state_gives_every_device_a_whole_limit_first(
    rules: DeviceRules,
) -> None:
    """On Apache Kafka the device state survives a worker restart: devices last heard before
    the platform went down are not all silent the moment it comes back (an alert storm the
    memory-only broker never showed); each gets a whole silence limit of watching."""
    detector, state = DeviceDetector(rules), DictState()
    last_ingest = T0 + 5_000
    feed(detector, state, [sample(0, 80, ingest_ms=last_ingest)])
    back_at = last_ingest + 10 * 60_000  # the workers were down for ten minutes
    assert detector.tick(state, back_at + 5_000, watching_since_ms=back_at) == []
    assert detector.tick(state, back_at + 59_999, watching_since_ms=back_at) == []
    # A packet from the backlog in time ends it quietly...
    detector.observe(sample(1, 80, ingest_ms=back_at + 2_000), state, T0)
    assert detector.tick(state, back_at + 61_999, watching_since_ms=back_at) == []
    # ... and a device that stays silent is found one limit after watching resumed, with
    # its real silence in the explanation.
    silent = detector.tick(state, back_at + 62_000, watching_since_ms=back_at)
    assert [f.subject for f in silent] == [DEVICE]
    other, other_state = DeviceDetector(rules), DictState()
    feed(other, other_state, [sample(0, 80, ingest_ms=last_ingest)])
    found = other.tick(other_state, back_at + 60_000, watching_since_ms=back_at)
    assert len(found) == 1 and "sent nothing for 660 s" in found[0].explanation


def test_silence_uses_arrival_time_and_the_device_type_interval(rules: DeviceRules) -> None:
    detector, state = DeviceDetector(rules), DictState()
    ingest = datetime(2026, 11, 3, 8, 0, tzinfo=UTC)  # decoders hand over aware datetimes
    ingest_ms = int(ingest.timestamp() * 1000)
    event = sample(
        0,
        97,
        metric=SPO2,
        unit="%",
        device_id="h001-oximeter-o-02",
        device_type="oximeter-o",
        t_ms=ingest_ms - 3_600_000,
    )
    event["ingest_time"] = ingest
    detector.observe(event, state, ingest_ms)
    # An hour-old event time does not matter: 4 x 5 s after ARRIVAL it is silent.
    assert detector.tick(state, ingest_ms + 19_000) == []
    assert [f.subject for f in detector.tick(state, ingest_ms + 20_000)] == ["h001-oximeter-o-02"]


def test_long_silent_devices_are_forgotten(rules: DeviceRules) -> None:
    detector, state = DeviceDetector(rules), DictState()
    state.put("news2|someone-else", {"kept": True})  # other detectors' keys are left alone
    feed(detector, state, [sample(0, 80, ingest_ms=T0)])
    feed(detector, state, [sample(0, 80, ingest_ms=T0 + 3_600_000, device_id="h001-monitor-a-04")])
    detector.tick(state, T0 + 24 * 3_600_000)
    assert sorted(state.values) == ["device|H001|h001-monitor-a-04", "news2|someone-else"]


def test_the_same_device_id_at_two_organisations_keeps_two_states(rules: DeviceRules) -> None:
    detector = DeviceDetector(rules)
    state = DictState()
    detector.observe(sample(0, 72.0), state, T0)
    other = dict(sample(1, 72.0), organisation_id="H002", event_id="obs-other-1")
    # Long after H001's device went quiet, H002's device of the same id still sends.
    detector.observe(dict(other, ingest_time=T0 + 120_000), state, T0 + 120_000)
    outcomes = detector.tick(state, T0 + 120_000)
    assert [(o.rule_id, o.organisation_id, o.subject) for o in outcomes] == [
        ("device.silence", "H001", DEVICE)
    ]
    assert sorted(state.values) == [f"device|H001|{DEVICE}", f"device|H002|{DEVICE}"]
