"""The proof of the rules: the simulator injects anomalies with ground truth, the whole
pipeline runs, and `medstream evaluate` scores every rule's alerts against it."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from medstream.evaluate import is_deterministic
from tests.e2e.test_pipeline import env_for, medstream
from tests.e2e.test_privacy import assert_no_simulated_identifier
from tests.medstream.test_simulator_feeds import short_feed_rules

pytestmark = pytest.mark.e2e


def test_rules_find_the_injected_anomalies_and_no_identifier_is_stored_or_logged(
    tmp_path: Path,
) -> None:
    data_dir, labels = tmp_path / "data", tmp_path / "labels.jsonl"
    # The site's rules directory: an EMR feed counts as silent after 30 s, so the run can
    # hold a feed silence (the shipped threshold is 30 minutes). Workers and simulator read it.
    rules_dir = short_feed_rules(tmp_path / "rules")
    up = subprocess.run(
        medstream("up", "--no-console", "--events", "29000", "--rate", "400", "--seed", "21",
                  "--exit-when-done", "--labels", str(labels)),
        # Four times the default share of anomalies: every kind appears in a one-minute run.
        env=env_for(data_dir, MEDSTREAM_SIMULATOR_ANOMALY_RATE="0.02",
                    MEDSTREAM_STREAMS_RULES_DIR=str(rules_dir)),
        capture_output=True, text=True, timeout=900,
    )
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    injected = Counter(
        line["rule_id"] for line in map(json.loads, labels.read_text().splitlines())
        if line["expect"] == "anomaly"
    )
    # Every kind a run of this length can hold was injected (feed spikes need two 1-minute
    # windows: tests/medstream/test_simulator_feeds.py proves them in process).
    assert {"feed.silence", "news2.urgent", "news2.emergency", "device.out_of_range",
            "device.silence",
            "claims.exact_duplicate", "claims.near_duplicate", "claims.after_death",
            "claims.outside_encounter", "claims.cost_outlier", "syndromic.ili"} <= set(injected)

    result = subprocess.run(
        medstream("evaluate", "--labels", str(labels), "--json"),
        env=env_for(data_dir), capture_output=True, text=True, timeout=120,
    )
    report = json.loads(result.stdout)
    rules = {rule["rule_id"]: rule for rule in report["rules"]}
    judged = [rule for rule in rules.values() if is_deterministic(rule["rule_id"])]
    assert {r["rule_id"] for r in judged} >= {
        "news2.urgent", "news2.emergency", "device.silence", "feed.silence",
        "claims.exact_duplicate",
        "claims.near_duplicate", "critical_value.potassium",
    }
    for rule in judged:
        assert rule["recall"] == 1.0, rule
        assert rule["precision"] >= 0.95, rule
    assert result.returncode == 0 and report["ok"], result.stdout[-2000:]
    # Statistical and other rules are reported with their figures.
    assert rules["claims.cost_outlier"]["labels"] == injected["claims.cost_outlier"]
    assert rules["syndromic.ili"]["labels"] == 1
    assert rules["syndromic.ili"]["true_positives"] == 1  # the outbreak hour signalled
    for rule in rules.values():
        if rule["true_positives"]:
            median, p99 = rule["delay_median_s"], rule["delay_p99_s"]
            assert median is not None and p99 >= median
    # The same run: no direct identifier of the simulated patients reached ClickHouse (any
    # column of any table) or any log line.
    assert_no_simulated_identifier(data_dir)
