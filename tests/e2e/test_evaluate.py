"""The proof of the rules: the simulator injects anomalies with ground truth, the whole
pipeline runs, and `medstream evaluate` scores every rule's alerts against it."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from medstream.evaluate import is_deterministic
from medstream.reconcile import label_event_ids, read_labels
from tests.e2e.test_pipeline import env_for, medstream
from tests.e2e.test_privacy import assert_no_simulated_identifier
from tests.medstream.test_simulator_feeds import short_feed_rules

pytestmark = pytest.mark.e2e


@pytest.mark.alone
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


def test_a_second_run_of_the_same_seed_gets_new_ids_and_the_first_run_still_checks(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    for labels in (first, second):  # `make run` twice with the same seed
        up = subprocess.run(
            medstream("up", "--no-console", "--events", "3000", "--rate", "1500", "--seed", "33",
                      "--exit-when-done", "--labels", str(labels)),
            env=env_for(data_dir), capture_output=True, text=True, timeout=300,
        )
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    ground, again = read_labels(first), read_labels(second)
    [run_1], [run_2] = {line["run_id"] for line in ground}, {line["run_id"] for line in again}
    assert run_1 != run_2
    # Same seed, new ids: nothing of the second run can replace a row of the first.
    assert len(label_event_ids(ground)) > 2000
    assert not label_event_ids(ground) & label_event_ids(again)

    # The first run's ground truth, checked after the second run, counts the first run only.
    result = subprocess.run(
        medstream("reconcile", "--labels", str(first), "--json"),
        env=env_for(data_dir), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    report = json.loads(result.stdout)
    truth = report["labels"]
    assert truth["run_ids"] == [run_1]
    firsts = [line for line in ground if not line["duplicate_delivery"]]
    assert truth["expected_events"] == sum(1 for line in firsts if line["expect"] == "stored")
    assert truth["stored_events"] == truth["expected_events"]
    assert truth["duplicated_events"] == 0
    assert truth["found_dead_letters"] == truth["expected_dead_letters"] == sum(
        1 for line in ground if line["expect"] == "dead_letter"
    ) > 0
    assert truth["found_alerts"] == truth["expected_alerts"] > 0
    assert truth["unexpected_alerts"] == 0
    assert report["conflicts"]["count"] == 0 and report["ok"]
    # Both runs' acknowledged records are in the ledger, by the simulator's own counters.
    runs = {p["run_id"]: p for p in report["published"]}
    assert set(runs) == {run_1, run_2}
    assert all(p["missing"] == 0 and p["acknowledged"] > 0 for p in runs.values())

    scored = subprocess.run(
        medstream("evaluate", "--labels", str(first), "--json"),
        env=env_for(data_dir), capture_output=True, text=True, timeout=120,
    )
    rules = {rule["rule_id"]: rule for rule in json.loads(scored.stdout)["rules"]}
    critical = [rule for rule_id, rule in rules.items() if rule_id.startswith("critical_value.")]
    assert critical and sum(rule["labels"] for rule in critical) == truth["expected_alerts"]
    for rule in critical:  # the second run's alerts are neither matched nor false positives
        assert rule["true_positives"] == rule["labels"] == rule["alerts"], rule
