"""The simulator's injected anomalies against the real detectors, in process.

Ordinary data (anomalies off) run through streams.normalise and the NEWS2, device, claim
and syndromic detectors must raise nothing at all; with anomalies on, every anomaly label
must be found by a finding of its rule sharing an event id, and every finding must belong
to a label. No Kafka: the clock is a fake one paced like a publisher at a fixed rate.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest

from medstream.simulator import (
    ANOMALY_RULES,
    DEVICE_SILENCE_MARGIN_MS,
    PACKET_ROUNDS,
    STATISTICAL_RULES,
    RegionSimulator,
    SimulatedMessage,
    load_rule_reference,
)
from streams.claim_rules import ClaimDetector
from streams.device_rules import DeviceDetector
from streams.findings import DictState, Finding
from streams.model import NormalisedEvent, RawContext
from streams.news2 import News2Detector
from streams.normalise import normalise
from streams.pseudonym import Pseudonymiser
from streams.syndromic import SyndromicDetector

NOW_MS = 1_795_000_000_000
PSEUDONYM_KEY = b"test-only-pseudonym-key-0123456789"
RECORD_LABEL_FIELDS = {
    "source_kind", "organisation_id", "source_ref", "record_index", "record_count", "event_id",
    "kind", "expect", "reason_code", "critical_rule", "critical_suppressed_reason", "unmapped",
    "duplicate_delivery",
}
ANOMALY_FIELDS = RECORD_LABEL_FIELDS | {
    "rule_id", "subject", "event_ids", "statistical", "detectable_from_ms",
}
TICK_EVERY = 25  # messages between DeviceDetector.tick calls (silence is wall-clock)


@dataclass
class Run:
    """What one simulated run produced and what the detectors made of it."""

    simulator: RegionSimulator
    messages: list[SimulatedMessage] = field(default_factory=list)
    anomalies: list[dict[str, Any]] = field(default_factory=list)
    findings: list[tuple[Finding, int]] = field(default_factory=list)  # (finding, clock)
    events: int = 0
    end_ms: int = 0


def run_pipeline(
    seed: int, events: int, rate: float, anomaly_rate: float, problem_rate: float = 0.02
) -> Run:
    """Generate, normalise and detect in process; acknowledgement = the clock at generation."""
    reference = load_rule_reference()
    simulator = RegionSimulator(
        seed, problem_rate=problem_rate, anomaly_rate=anomaly_rate, records_per_second=rate,
        long_run_s=events / rate,  # device silences need the run to outlast them
    )
    pseudonymiser = Pseudonymiser(PSEUDONYM_KEY)
    device_detector = DeviceDetector(reference.devices)
    detectors: list[Any] = [
        News2Detector(reference.news2),
        device_detector,
        ClaimDetector(reference.claims),
        SyndromicDetector(reference.syndromic),
    ]
    states = [DictState() for _ in detectors]
    device_state = states[1]
    run = Run(simulator)
    clock = [float(NOW_MS)]
    for count, message in enumerate(simulator.messages(events, lambda: int(clock[0]))):
        now = int(clock[0])
        run.messages.append(message)
        if not message.labels[0]["duplicate_delivery"]:
            clock[0] += len(message.labels) * 1000 / rate
        run.anomalies += [anomaly.line(now) for anomaly in message.anomalies]
        if count % TICK_EVERY == 0:
            run.findings += [(f, now) for f in device_detector.tick(device_state, now)
                             if isinstance(f, Finding)]
        if isinstance(message.value, bytes):
            continue
        context = RawContext(f"raw.{message.source_kind}", 0, count, now)
        for outcome in normalise(message.source_kind, message.value, context,
                                 reference.terminology, pseudonymiser, now):
            if not isinstance(outcome, NormalisedEvent):
                continue
            run.events += 1
            for detector, state in zip(detectors, states, strict=True):
                run.findings += [(f, now) for f in detector.observe(outcome.value, state, now)
                                 if isinstance(f, Finding)]
    run.end_ms = int(clock[0])
    return run


def match_labels(
    labels: list[dict[str, Any]], findings: list[Finding]
) -> tuple[list[tuple[dict[str, Any], Finding]], list[Finding]]:
    """Each label with the finding of its rule that shares an event id (every label must
    have one), and the findings no label claimed."""
    unmatched = list(findings)
    matched = []
    for label in labels:
        match = next(
            (f for f in unmatched if f.rule_id == label["rule_id"]
             and set(f.triggering_event_ids) & set(label["event_ids"])),
            None,
        )
        assert match is not None, label
        unmatched.remove(match)
        matched.append((label, match))
    return matched, unmatched


@pytest.fixture(scope="module")
def ordinary() -> Run:
    # Old-style record problems stay on (criticals, duplicates, malformed records): none of
    # them may trigger these rules either.
    return run_pipeline(seed=2026, events=20_000, rate=50, anomaly_rate=0.0)


@pytest.fixture(scope="module")
def anomalous() -> Run:
    # 20 records/s: the run spans 1000 s of clock, longer than a flat line needs (600 s).
    return run_pipeline(seed=7, events=20_000, rate=20, anomaly_rate=0.02)


def test_ordinary_data_triggers_no_rule(ordinary: Run) -> None:
    assert ordinary.events >= 19_000
    assert ordinary.anomalies == []
    assert [f"{f.rule_id} {f.explanation}" for f, _ in ordinary.findings] == []
    kinds = Counter(m.source_kind for m in ordinary.messages)
    assert kinds["device"] > 500 and kinds["claim"] > 500  # the rules did see data


def test_every_anomaly_kind_appears_with_well_formed_labels(anomalous: Run) -> None:
    rules = Counter(label["rule_id"] for label in anomalous.anomalies)
    # Feed anomalies need runs longer than their windows (see test_simulator_feeds.py).
    expected = set(ANOMALY_RULES.values()) - {
        "feed.silence", "feed.dead_letter_spike", "feed.unmapped_spike",
    }
    assert set(rules) == expected, rules
    devices = {d.device_id for hs in anomalous.simulator._hospitals for d in hs.devices}
    for label in anomalous.anomalies:
        assert set(label) == ANOMALY_FIELDS
        assert label["expect"] == "anomaly" and label["duplicate_delivery"] is False
        assert label["kind"] is None and label["event_id"] is None
        assert label["critical_rule"] is None and label["record_index"] is None
        assert label["statistical"] == (label["rule_id"] in STATISTICAL_RULES)
        assert label["event_ids"] and all(re.fullmatch(r"[0-9a-f]{32}", e)
                                          for e in label["event_ids"])
        assert isinstance(label["detectable_from_ms"], int)
        assert label["organisation_id"] in {"H001", "H002", "H003", "H004"}
        rule, subject = label["rule_id"], label["subject"]
        if rule.startswith("news2."):
            assert subject is None and len(label["event_ids"]) == 5  # one complete set
        elif rule in ("device.out_of_range", "device.flat_line"):
            assert re.fullmatch(r"H00\d-[a-z]+-[a-z]-\d{3}\|\d+-\d", subject)
        elif rule == "device.silence":
            assert subject.startswith(label["organisation_id"] + "-") and subject not in devices
            assert len(label["event_ids"]) == 1
        elif rule.startswith("claims."):
            assert re.fullmatch(r"P00\d:P00\dCS7R[0-9a-f]{8}-\d{9}\|1", subject)
        else:
            assert rule == "syndromic.ili"
            assert subject in ("yunxi-urban|ili", "mingsha-county|ili")
            assert len(label["event_ids"]) == 12


def test_each_anomaly_is_found_by_its_rule_and_nothing_else_fires(anomalous: Run) -> None:
    findings = [f for f, _ in anomalous.findings if f.rule_id != "device.silence"]
    labels = [a for a in anomalous.anomalies if a["rule_id"] != "device.silence"]
    matched, unmatched = match_labels(labels, findings)
    for label, match in matched:
        if label["subject"] is not None:
            assert match.subject == label["subject"]
        assert match.organisation_id == label["organisation_id"]
    assert [f"{f.rule_id} {f.subject}" for f in unmatched] == []
    # Several of each, found exactly once.
    counts = Counter(label["rule_id"] for label in labels)
    assert all(n >= 3 for rule, n in counts.items() if rule != "syndromic.ili"), counts


def test_device_silence_is_found_once_detectable_and_only_for_labelled_devices(
    anomalous: Run,
) -> None:
    labels = {a["subject"]: a for a in anomalous.anomalies if a["rule_id"] == "device.silence"}
    silences = [(f, at) for f, at in anomalous.findings if f.rule_id == "device.silence"]
    assert len(silences) >= 5
    for finding, at in silences:
        label = labels[finding.subject]  # no ordinary device ever went silent
        assert set(finding.triggering_event_ids) == set(label["event_ids"])
        # Ticks run every TICK_EVERY messages: found within a tick of becoming detectable.
        assert label["detectable_from_ms"] <= at <= label["detectable_from_ms"] + 10_000
    due = [a for a in labels.values() if a["detectable_from_ms"] + 10_000 < anomalous.end_ms]
    assert {f.subject for f, _ in silences} == {a["subject"] for a in due}
    # Armed only when the silence, counted from the device's last (next due) packet, becomes
    # detectable before the run ends: a label the run cannot show would count as a miss.
    late = [a["subject"] for a in labels.values()
            if a["detectable_from_ms"] > anomalous.end_ms - DEVICE_SILENCE_MARGIN_MS]
    assert late == []


def test_a_person_has_at_most_one_news2_episode(anomalous: Run) -> None:
    # The alert of an episode stays open until staff resolve it: a second episode of the
    # same person would fold into it, and its label could never be matched.
    persons = [f.person_key for f, _ in anomalous.findings if f.rule_id.startswith("news2.")]
    assert len(persons) >= 6
    assert len(set(persons)) == len(persons)


def test_news2_episodes_amid_many_out_of_range_samples_raise_only_their_own_level() -> None:
    # A crowded run like the e2e proof's (400 records/s), with far more anomalies: an
    # episode's monitor must not inherit another device's out-of-range value for the same
    # person (seed 105 once raised a news2.urgent that way on the way to an emergency).
    run = run_pipeline(seed=105, events=29_000, rate=400, anomaly_rate=0.15)
    labels = [a for a in run.anomalies if a["rule_id"].startswith("news2.")]
    findings = [f for f, _ in run.findings if f.rule_id.startswith("news2.")]
    assert len(labels) >= 40
    assert sum(a["rule_id"] == "device.out_of_range" for a in run.anomalies) >= 40
    _, unmatched = match_labels(labels, findings)
    assert [f"{f.rule_id} {f.explanation}" for f in unmatched] == []


def test_feed_silence_only_in_long_runs_and_the_feed_then_stays_silent() -> None:
    reference = load_rule_reference()
    threshold = reference.feeds.silence_after_ms("emr_cdc")

    def run(long_run_s: float | None) -> list[tuple[int, SimulatedMessage]]:
        simulator = RegionSimulator(3, anomaly_rate=0.02, records_per_second=5,
                                    long_run_s=long_run_s)
        clock = [float(NOW_MS)]
        timed = []
        for message in simulator.messages(12_000, lambda: int(clock[0])):
            timed.append((int(clock[0]), message))
            if not message.labels[0]["duplicate_delivery"]:
                clock[0] += len(message.labels) * 1000 / 5
        return timed

    def feed_labels(timed: list[tuple[int, SimulatedMessage]]) -> list[tuple[int, Any]]:
        return [(i, a) for i, (_, m) in enumerate(timed) for a in m.anomalies
                if a.rule_id == "feed.silence"]

    assert feed_labels(run(None)) == []
    assert feed_labels(run(threshold / 1000)) == []  # not longer than the threshold
    timed = run(4 * 3600)
    [(index, anomaly)] = feed_labels(timed)
    now, last = timed[index]
    organisation, _, kind = anomaly.subject.partition("|")
    assert kind == "emr_cdc" and anomaly.organisation_id == organisation
    assert anomaly.event_ids == (last.labels[-1]["event_id"],)
    assert anomaly.line(now)["detectable_from_ms"] == now + threshold
    later = [m for _, m in timed[index + 1:]
             if m.source_kind == "emr_cdc" and m.key.decode().startswith(organisation + ":")]
    assert later == []
    assert timed[-1][0] - now > threshold  # the silence did become detectable in this run


def test_devices_keep_a_regular_cadence_and_the_fleet_fits_the_rate() -> None:
    reference = load_rule_reference()
    slow = RegionSimulator(1, records_per_second=10, anomaly_rate=0.0)
    fast = RegionSimulator(1, records_per_second=200, anomaly_rate=0.0)
    full = RegionSimulator(1, anomaly_rate=0.0)
    assert slow.active_devices < full.active_devices < fast.active_devices
    assert full.active_devices == sum(
        count for h in full.region.hospitals for _, count in h.devices
    )
    clock = [float(NOW_MS)]
    sent: dict[str, list[int]] = {}
    types: dict[str, str] = {}
    for message in slow.messages(6_000, lambda: int(clock[0])):
        if not message.labels[0]["duplicate_delivery"]:
            clock[0] += len(message.labels) * 1000 / 10
        value = message.value
        if (message.source_kind == "device" and isinstance(value, dict)
                and not message.labels[0]["duplicate_delivery"]):
            sent.setdefault(value["device_id"], []).append(value["sent_time"])
            types[value["device_id"]] = value["device_type"]
    assert len(sent) == slow.active_devices
    for device_id, times in sent.items():
        interval = slow.region.device_types[types[device_id]].sample_interval_s * 1000
        assert {b - a for a, b in zip(times, times[1:], strict=False)} == {
            PACKET_ROUNDS * interval
        }
        assert PACKET_ROUNDS * interval < reference.devices.silence_after_ms(types[device_id])
