"""Feed rules: silent feeds, dead-letter and unmapped spikes in ingest-time windows, the YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from streams.feed_rules import (
    DEAD_LETTER_SPIKE,
    DEFAULT_FEED_RULES_PATH,
    SILENCE,
    UNMAPPED_SPIKE,
    FeedDetector,
    FeedRules,
    FeedRulesError,
    feed_rules_from_dict,
    load_feed_rules,
)
from streams.findings import Cleared, DictState, Finding

T0 = 1_793_700_000_000 - 1_793_700_000_000 % 900_000  # a 15-minute window boundary
WINDOW = 900_000
MINUTE = 60_000
KEY = "feed|H002|hl7_lab"

_serial = iter(range(10**9))


@pytest.fixture(scope="module")
def rules() -> FeedRules:
    return load_feed_rules()


def norm_event(
    ingest_ms: int, status: str = "mapped", org: str = "H002", kind: str = "hl7_lab"
) -> dict[str, Any]:
    n = next(_serial)
    return {
        "event_id": f"ev-{n}",
        "source_kind": kind,
        "organisation_id": org,
        "event_time": ingest_ms - 30_000,
        "ingest_time": ingest_ms,
        "source_ref": f"MSG-{n}",
        "mapping_status": status,
    }


def dead_letter(
    ingest_ms: int, stage: str = "normalise", org: str | None = "H002", kind: str = "hl7_lab"
) -> dict[str, Any]:
    n = next(_serial)
    return {
        "dlq_id": f"dlq-{n}",
        "stage": stage,
        "reason_code": "invalid_message",
        "reason": "OBX-5 not numeric",
        "source_kind": kind,
        "organisation_id": org,
        "original_topic": "raw.hl7_lab",
        "ingest_time": ingest_ms,
        "failed_time": ingest_ms + 50,
    }


def window_records(
    start: int, events: int, dead: int = 0, unmapped: int = 0
) -> list[dict[str, Any]]:
    """Records spread over one window: ``events`` events (``unmapped`` of them unmapped)."""
    records: list[dict[str, Any]] = []
    total = events + dead
    for i in range(total):
        ingest = start + (i * (WINDOW - 1000)) // max(total, 1)
        if i < dead:
            records.append(dead_letter(ingest))
        else:
            status = "unmapped" if i - dead < unmapped else "mapped"
            records.append(norm_event(ingest, status))
    return records


def only_findings(outcomes: list[Finding | Cleared]) -> list[Finding]:
    """The outcomes, checked to be findings (no clearance among them)."""
    assert all(isinstance(o, Finding) for o in outcomes), outcomes
    return [o for o in outcomes if isinstance(o, Finding)]


def run(detector: FeedDetector, state: DictState, records: list[dict[str, Any]]) -> list[Any]:
    outcomes: list[Any] = []
    for record in records:
        outcomes.extend(detector.observe(record, state, T0))
    return outcomes


# --- the rules file -------------------------------------------------------------------------


def test_default_rules(rules: FeedRules) -> None:
    assert rules.version == "2026.11-1"
    assert rules.silence_after_ms("device") == 5 * MINUTE
    assert rules.silence_after_ms("claim") == 360 * MINUTE
    assert rules.silence_after_ms("something_new") == 60 * MINUTE
    assert (rules.window_ms, rules.lateness_ms) == (15 * MINUTE, 2 * MINUTE)
    assert rules.dead_letter_stages == frozenset({"producer", "normalise"})
    assert rules.dead_letter_spike.threshold(None) == 0.05
    assert rules.dead_letter_spike.threshold(0.01) == 0.05
    assert rules.dead_letter_spike.threshold(0.04) == pytest.approx(0.12)


@pytest.mark.parametrize(
    ("section", "field", "value", "message"),
    [
        ("spikes", "window_minutes", 0, "spikes.window_minutes"),
        ("dead_letter_spike", "min_rate", 1.5, "spikes.dead_letter_spike.min_rate"),
        ("unmapped_spike", "factor", 0.5, "spikes.unmapped_spike.factor"),
        ("silence", "severity", "loud", "silence.severity"),
    ],
)
def test_invalid_rules_name_the_field(section: str, field: str, value: Any, message: str) -> None:
    document = yaml.safe_load(DEFAULT_FEED_RULES_PATH.read_text(encoding="utf-8"))
    target = document["spikes"][section] if section.endswith("_spike") else document[section]
    target[field] = value
    with pytest.raises(FeedRulesError, match=message):
        feed_rules_from_dict(document, "feeds.yaml")


def test_unreadable_rules_file(tmp_path: Path) -> None:
    with pytest.raises(FeedRulesError, match="cannot read feed rules"):
        load_feed_rules(tmp_path / "missing.yaml")


# --- feed.silence ---------------------------------------------------------------------------


def test_silence_per_source_kind_once_per_episode_and_cleared(rules: FeedRules) -> None:
    detector, state = FeedDetector(rules), DictState()
    last = T0 + 10 * MINUTE
    run(detector, state, [norm_event(T0), norm_event(last)])
    run(detector, state, [norm_event(last, kind="device")])
    assert detector.tick(state, last + 5 * MINUTE - 1) == []
    device_silent = only_findings(detector.tick(state, last + 5 * MINUTE))
    assert [(f.rule_id, f.subject, f.severity) for f in device_silent] == [
        (SILENCE, "H002|device", "high")
    ]
    assert device_silent[0].explanation.startswith(
        "Feed H002/device has sent nothing for 5 minutes (limit 5 minutes"
    )
    lab_silent = only_findings(detector.tick(state, last + 60 * MINUTE))
    assert [f.subject for f in lab_silent] == ["H002|hl7_lab"]
    assert lab_silent[0].triggering_event_ids == (state.values[KEY]["last_record_id"],)
    assert detector.tick(state, last + 90 * MINUTE) == []
    # A dead letter shows the feed is sending again (it is broken, not silent).
    back = detector.observe(dead_letter(last + 95 * MINUTE), state, T0)
    assert [(type(o).__name__, o.rule_id, o.subject) for o in back] == [
        ("Cleared", SILENCE, "H002|hl7_lab")
    ]


def test_a_restart_with_kept_state_gives_every_feed_a_whole_limit_first(
    rules: FeedRules,
) -> None:
    """Feed state kept across a restart (Apache Kafka): the platform's own downtime does not
    make every hospital feed silent at once; each gets a whole limit of watching."""
    detector, state = FeedDetector(rules), DictState()
    last = T0 + 10 * MINUTE
    run(detector, state, [norm_event(last, kind="device")])
    back_at = last + 20 * MINUTE  # the workers were down for twenty minutes
    assert only_findings(detector.tick(state, back_at + 1, watching_since_ms=back_at)) == []
    assert only_findings(
        detector.tick(state, back_at + 5 * MINUTE - 1, watching_since_ms=back_at)
    ) == []
    silent = only_findings(detector.tick(state, back_at + 5 * MINUTE, watching_since_ms=back_at))
    assert [f.subject for f in silent] == ["H002|device"]
    assert silent[0].explanation.startswith("Feed H002/device has sent nothing for 25 minutes")


def test_silent_feeds_are_forgotten_and_foreign_keys_kept(rules: FeedRules) -> None:
    detector, state = FeedDetector(rules), DictState()
    state.put("device|x", {"last_ingest_ms": 0})
    run(detector, state, [norm_event(T0, org="H004", kind="claim")])
    detector.tick(state, T0 + 168 * 60 * MINUTE)
    assert sorted(state.values) == ["device|x"]


# --- spikes ---------------------------------------------------------------------------------


def test_dead_letter_spike_against_baseline_then_cleared(rules: FeedRules) -> None:
    detector, state = FeedDetector(rules), DictState()
    records: list[dict[str, Any]] = []
    for w in range(4):  # baseline: 1 dead letter per 100 records (1 %)
        records += window_records(T0 + w * WINDOW, events=99, dead=1)
    records += window_records(T0 + 4 * WINDOW, events=100, dead=25)  # 20 %
    records += window_records(T0 + 5 * WINDOW, events=100, dead=1)
    records.append(norm_event(T0 + 6 * WINDOW + 3 * MINUTE))  # closes window 5
    outcomes = run(detector, state, records)
    assert [(type(o).__name__, o.rule_id) for o in outcomes] == [
        ("Finding", DEAD_LETTER_SPIKE),
        ("Cleared", DEAD_LETTER_SPIKE),
    ]
    spike = outcomes[0]
    assert (spike.subject, spike.severity, spike.organisation_id) == (
        "H002|hl7_lab",
        "medium",
        "H002",
    )
    assert spike.event_time_ms == T0 + 4 * WINDOW
    assert spike.details["bad"] == 25 and spike.details["total"] == 125
    assert spike.value == pytest.approx(0.2)
    assert spike.details["baseline"] == pytest.approx(0.01)
    assert len(spike.triggering_event_ids) == 20  # max_sample_ids
    assert all(i.startswith("dlq-") for i in spike.triggering_event_ids)
    assert "25 dead letters out of 125 records (20.0%)" in spike.explanation
    assert "baseline 1.0%, threshold 5.0%" in spike.explanation
    assert outcomes[1].time_ms == T0 + 6 * WINDOW
    # The spike window was not learnt: the baseline is still about 1 %.
    assert state.values[KEY]["baselines"][DEAD_LETTER_SPIKE] == pytest.approx(0.01, abs=1e-4)


def test_factor_times_baseline_raises_the_threshold(rules: FeedRules) -> None:
    detector, state = FeedDetector(rules), DictState()
    records: list[dict[str, Any]] = []
    for w in range(3):  # a feed that always loses 4 %: threshold 12 %
        records += window_records(T0 + w * WINDOW, events=96, dead=4)
    records += window_records(T0 + 3 * WINDOW, events=90, dead=10)  # 10 %: not a spike
    # ... but learnt: baseline 0.2 x 10 % + 0.8 x 4 % = 5.2 %, threshold 15.6 %.
    records += window_records(T0 + 4 * WINDOW, events=80, dead=20)  # 20 %: a spike
    records.append(norm_event(T0 + 5 * WINDOW + 3 * MINUTE))
    outcomes = run(detector, state, records)
    assert [o.details["bad"] for o in outcomes] == [20]
    assert outcomes[0].details["threshold"] == pytest.approx(3 * 0.052)


def test_small_windows_and_low_rates_do_not_fire(rules: FeedRules) -> None:
    detector, state = FeedDetector(rules), DictState()
    records = window_records(T0, events=10, dead=8)  # 44 % but only 18 records
    records += window_records(T0 + WINDOW, events=100, dead=4)  # 3.8 % < min_rate 5 %
    records.append(norm_event(T0 + 2 * WINDOW + 3 * MINUTE))
    assert run(detector, state, records) == []
    # Only the judged (large enough) window became the baseline.
    assert state.values[KEY]["baselines"][DEAD_LETTER_SPIKE] == pytest.approx(4 / 104)


def test_unmapped_spike_counts_unmapped_and_partial(rules: FeedRules) -> None:
    detector, state = FeedDetector(rules), DictState()
    records = window_records(T0, events=100, unmapped=2)
    window = window_records(T0 + WINDOW, events=50, unmapped=15)
    window[-1]["mapping_status"] = "partial"  # 16 of 50 = 32 %
    records += window + [norm_event(T0 + 2 * WINDOW + 3 * MINUTE)]
    outcomes = run(detector, state, records)
    assert [(o.rule_id, o.details["bad"], o.details["total"]) for o in outcomes] == [
        (UNMAPPED_SPIKE, 16, 50)
    ]
    assert "16 unmapped events out of 50 records (32.0%)" in outcomes[0].explanation
    assert all(i.startswith("ev-") for i in outcomes[0].triggering_event_ids)


def test_late_records_and_wall_clock_window_close(rules: FeedRules) -> None:
    detector, state = FeedDetector(rules), DictState()
    run(detector, state, window_records(T0, events=80, dead=20))
    # No newer record arrives: the wall clock closes the window (end + lateness).
    assert detector.tick(state, T0 + WINDOW + 2 * MINUTE - 1) == []
    closed = only_findings(detector.tick(state, T0 + WINDOW + 2 * MINUTE))
    assert [o.rule_id for o in closed] == [DEAD_LETTER_SPIKE]
    assert closed[0].details["baseline"] is None  # judged on min_rate alone
    # A record for the closed window is late: counted as such and not used.
    assert detector.observe(dead_letter(T0 + 5 * MINUTE), state, T0) == []
    feed_state = state.values[KEY]
    assert feed_state["late_records"] == 1 and feed_state["windows"] == {}


def test_unattributable_and_sink_dead_letters_are_ignored(rules: FeedRules) -> None:
    detector, state = FeedDetector(rules), DictState()
    assert detector.observe(dead_letter(T0, org=None), state, T0) == []
    assert detector.observe(dead_letter(T0, stage="sink"), state, T0) == []
    assert state.values == {}


def test_state_stays_bounded_over_many_windows(rules: FeedRules) -> None:
    detector, state = FeedDetector(rules), DictState()
    for w in range(200):
        run(detector, state, [norm_event(T0 + w * WINDOW + i * MINUTE) for i in range(15)])
    assert len(state.values[KEY]["windows"]) <= 2
    assert len(state.values) == 1
