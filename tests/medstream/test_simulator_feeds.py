"""The simulator's feed anomalies against the real normalise stage and feed watch, in process.

A site's rules directory shortens the feed windows (1-minute spike windows, EMR silence
after 30 s) so that a few simulated minutes hold a silence and both kinds of spike. The
clock is a fake one paced like a publisher at a fixed rate; the normalise stage counts
every record into the feed activity it really sends, and the feed watch judges it on its
own timer, as the Faust agents do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from medstream.settings import KafkaSettings, StreamSettings
from medstream.simulator import SPIKE_EPISODE_WINDOWS, RegionSimulator, SimulatedMessage
from schemas import serde
from streams.app import derived_key
from streams.critical_values import load_critical_value_rules
from streams.detect import INPUT_FINDING, FeedWatchStage
from streams.findings import DictState
from streams.model import RawContext
from streams.pseudonym import Pseudonymiser
from streams.rules_file import SHIPPED_RULES_DIR, rule_file
from streams.stage import NormaliseStage, SuppressionState
from streams.terminology import TerminologySource

NOW_MS = 1_795_000_020_000
RATE = 60.0  # records per second
RUN_S = 330
ACTIVITY_EVERY_MS = 5_000  # as streams.app.FEED_ACTIVITY_S
TICK_EVERY_MS = 15_000  # as streams.app.FEED_TICK_S
REGISTRY = serde.ManifestRegistry()
KAFKA = KafkaSettings(bootstrap_servers="unused:9092", topic_prefix="t.")
SECRET = b"test-only-pseudonym-key-0123456789"
FEED_RULES = {"feed.silence", "feed.dead_letter_spike", "feed.unmapped_spike"}


def short_feed_rules(directory: Path) -> Path:
    """A site rules directory holding only a feeds.yaml with short windows."""
    document = yaml.safe_load((SHIPPED_RULES_DIR / "feeds.yaml").read_text(encoding="utf-8"))
    document["version"] = "test-short-windows"
    document["silence"]["silent_after_minutes"]["emr_cdc"] = 0.5
    document["spikes"]["window_minutes"] = 1
    document["spikes"]["allowed_lateness_minutes"] = 0
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "feeds.yaml").write_text(yaml.safe_dump(document), encoding="utf-8")
    return directory


@dataclass
class FeedRun:
    """What one simulated run sent and what the feed watch raised (at which clock)."""

    messages: list[tuple[int, SimulatedMessage]] = field(default_factory=list)
    anomalies: list[dict[str, Any]] = field(default_factory=list)
    findings: list[tuple[dict[str, Any], int]] = field(default_factory=list)
    dead_letters: int = 0
    end_ms: int = 0


@pytest.fixture(scope="module")
def feed_run(tmp_path_factory: pytest.TempPathFactory) -> FeedRun:
    rules_dir = short_feed_rules(tmp_path_factory.mktemp("site") / "rules")
    simulator = RegionSimulator(
        5, anomaly_rate=0.01, records_per_second=RATE, long_run_s=RUN_S, rules_dir=rules_dir
    )
    stage = NormaliseStage(
        KAFKA, REGISTRY, TerminologySource(), Pseudonymiser(SECRET),
        load_critical_value_rules(rule_file("critical_values.yaml", rules_dir)),
        identity_key=derived_key(SECRET, "mpi.tokens"), rules_dir=rules_dir,
    )
    watch = FeedWatchStage(KAFKA, REGISTRY, rule_file("feeds.yaml", rules_dir))
    decode_input = serde.AvroDeserializer(REGISTRY, serde.LIFECYCLE_INPUT)
    encoders = {k: serde.AvroSerializer(REGISTRY, s) for k, s in serde.RAW_SUBJECT_BY_KIND.items()}
    suppression_table: dict[str, Any] = {}
    suppression = SuppressionState(suppression_table.get, suppression_table.__setitem__)
    watch_state = DictState()
    run = FeedRun()
    clock = [float(NOW_MS)]
    next_activity, next_tick = NOW_MS + ACTIVITY_EVERY_MS, NOW_MS + TICK_EVERY_MS

    def judge(outputs: list[Any], now: int) -> None:
        for output in outputs:
            record = decode_input(output.value)
            if record["input_kind"] == INPUT_FINDING:
                run.findings.append((record, now))

    for offset, message in enumerate(simulator.messages(int(RATE * RUN_S), lambda: int(clock[0]))):
        now = int(clock[0])
        run.messages.append((now, message))
        run.anomalies += [anomaly.line(now) for anomaly in message.anomalies]
        if not message.labels[0]["duplicate_delivery"]:
            clock[0] += len(message.labels) * 1000 / RATE
        value = message.value
        raw = value if isinstance(value, bytes) else encoders[message.source_kind](value)
        context = RawContext(f"t.raw.{message.source_kind}", 0, offset, now)
        outputs = stage.handle(message.source_kind, context, message.key, raw, suppression,
                               now_ms=now)
        run.dead_letters += sum(1 for o in outputs if o.topic == stage.dlq_topic)
        while now >= next_activity:
            for activity in stage.feed_activity_outputs():
                judge(watch.handle(activity.value, watch_state, next_activity), next_activity)
            next_activity += ACTIVITY_EVERY_MS
        while now >= next_tick:
            judge(watch.tick(watch_state, next_tick), next_tick)
            next_tick += TICK_EVERY_MS
    run.end_ms = int(clock[0])
    return run


def test_a_site_rules_directory_overrides_only_the_files_it_holds(tmp_path: Path) -> None:
    rules_dir = short_feed_rules(tmp_path / "rules")
    assert rule_file("feeds.yaml", rules_dir) == rules_dir / "feeds.yaml"
    assert rule_file("news2.yaml", rules_dir) == SHIPPED_RULES_DIR / "news2.yaml"
    assert rule_file("feeds.yaml") == SHIPPED_RULES_DIR / "feeds.yaml"
    with pytest.raises(FileNotFoundError, match="rules directory .*nowhere does not exist"):
        rule_file("feeds.yaml", tmp_path / "nowhere")
    assert StreamSettings(rules_dir="").rules_dir is None  # an empty variable: not set
    assert StreamSettings(rules_dir=str(rules_dir)).rules_dir == rules_dir
    reference = RegionSimulator(1, rules_dir=rules_dir).reference
    assert reference.feeds.version == "test-short-windows"
    assert reference.feeds.window_ms == 60_000
    assert reference.feeds.silence_after_ms("emr_cdc") == 30_000


def test_every_feed_anomaly_is_injected_once_with_its_feed_as_subject(feed_run: FeedRun) -> None:
    labels = [a for a in feed_run.anomalies if a["rule_id"] in FEED_RULES]
    assert sorted(a["rule_id"] for a in labels) == sorted(FEED_RULES)
    for label in labels:
        organisation, _, kind = label["subject"].partition("|")
        assert organisation == label["organisation_id"] and kind == label["source_kind"]
        assert label["statistical"] == (label["rule_id"] != "feed.silence")


def test_a_dead_letter_spike_spoils_a_share_of_one_feed_for_two_windows(
    feed_run: FeedRun,
) -> None:
    [label] = [a for a in feed_run.anomalies if a["rule_id"] == "feed.dead_letter_spike"]
    start = label["detectable_from_ms"]
    end = start + SPIKE_EPISODE_WINDOWS * 60_000
    feed = [m for at, m in feed_run.messages if start <= at < end
            and m.source_kind == "hl7_lab" and m.key.decode().startswith(label["organisation_id"])]
    # Unusable HL7 payloads (the rotation of ordinary problems adds a few of other kinds).
    spoiled = [m for m in feed if m.labels[0]["reason_code"] == "invalid_message"]
    records = sum(len(m.labels) for m in feed)
    # 3 x feeds.yaml's 5 % min_rate of the records, give or take sampling noise.
    assert 0.09 <= len(spoiled) / records <= 0.22, (len(spoiled), records)


def test_each_feed_anomaly_is_found_by_its_rule_and_nothing_else_fires(
    feed_run: FeedRun,
) -> None:
    labels = [a for a in feed_run.anomalies if a["rule_id"] in FEED_RULES]
    findings = [(f, at) for f, at in feed_run.findings]
    for label in labels:
        found = [(f, at) for f, at in findings
                 if f["rule_id"] == label["rule_id"] and f["subject"] == label["subject"]]
        assert found, label
        first, at = found[0]
        # A silence is seen within a tick of its threshold, a spike when its window closes.
        assert label["detectable_from_ms"] - 2_000 <= at
        limit = 15_000 if label["rule_id"] == "feed.silence" else 2 * 60_000 + 15_000
        assert at <= label["detectable_from_ms"] + limit, (label, at)
        assert first["rule_version"] == "test-short-windows"
        if label["rule_id"] == "feed.silence":
            assert "(limit 30 s;" in first["explanation"]
        else:
            details = first["details_json"]
            assert '"bad"' in details and first["value"] >= 0.05
    labelled = {(a["rule_id"], a["subject"]) for a in labels}
    strays = [f"{f['rule_id']} {f['subject']}: {f['explanation']}" for f, _ in findings
              if (f["rule_id"], f["subject"]) not in labelled]
    assert strays == []
