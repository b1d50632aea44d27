"""The fault suite's short run (part of `make test`): `medstream faults` as a user runs it,
one trial of a kind per test, on the embedded Apache Kafka, small runs (1,500 records).

A kill -9 of a worker or of the sink, and a graceful stop under backlog followed by a
restart on the same data: nothing acknowledged may be lost or stored twice, every critical
alert raised once, every malformed record dead-lettered, and the command must say so in its
table and its exit code. The long run (>= 20 trials per kind) is `make faults`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.waiting import require_kafka

pytestmark = pytest.mark.e2e


# A worker and the sink killed alone are tests/e2e/test_up_faults.py's; here the harness is
# proven on both killed at once and on a graceful stop under backlog. The graceful run
# publishes at 4x the rate (1,600/s, faster than the pipeline stores here) for ~4 s, so the
# stop 1-3 s in leaves a backlog (1,500 records were over before the stop: nothing left).
@pytest.mark.parametrize(
    ("kind", "seed", "events", "rate"),
    [
        ("worker+sink", 11, 1500, 300),
        ("graceful", 13, 6000, 400),
    ],
)
def test_one_fault_loses_nothing_and_the_table_says_so(
    tmp_path: Path, kind: str, seed: int, events: int, rate: int
) -> None:
    require_kafka()
    figures = tmp_path / "faults.json"
    done = subprocess.run(
        [sys.executable, "-m", "medstream", "faults", "--kinds", kind, "--trials", "1",
         "--events", str(events), "--rate", str(rate), "--seed", str(seed),
         "--json", str(figures)],
        capture_output=True, text=True, timeout=420,
        env={**os.environ, "TMPDIR": str(tmp_path)},  # a failed trial's logs stay in tmp_path
    )
    output = done.stdout + done.stderr
    body = json.loads(figures.read_text())
    [trial] = body["trials"]
    assert trial["error"] is None, output[-3000:]
    # The ground truth is real: the run published and labelled most of its records (the
    # graceful stop comes while the simulator still publishes, at 4x the rate, so a part).
    if kind == "graceful":
        assert trial["events"] > 300, output[-3000:]
        # The stop really came under a backlog: its short drain left acknowledged records
        # in the topics, it said so with a non-zero exit code, and the restart stored them.
        assert 0 < trial["unstored_at_stop"] <= trial["events"], trial["notes"]
        assert trial["stop_exit_code"] not in (0, None), trial["notes"]
        assert trial["stop_said_unstored"] is True and trial["stop_hung"] is False, trial["notes"]
    else:
        assert trial["events"] > 1000 and trial["dead_letters_expected"] > 0, output[-3000:]
        assert trial["alerts_expected"] > 0, output[-3000:]
    assert (trial["lost"], trial["duplicated"]) == (0, 0), output[-3000:]
    assert (trial["alerts_missing"], trial["alerts_duplicated"]) == (0, 0), output[-3000:]
    assert trial["dead_letters_found"] == trial["dead_letters_expected"], output[-3000:]
    # Every rule of a passing trial: drained, `up` ended with 0, the fault answered, and
    # the label-free reconcile named no gap (nothing was lost).
    assert trial["problems"] == [] and trial["ok"], output[-3000:]
    assert trial["drain"] in ("drained", "exited") and trial["up_exit_code"] == 0, trial["notes"]
    assert trial["reconcile_gaps"] == [], trial["reconcile_gaps"]
    assert done.returncode == 0, output[-3000:]
    assert f"[1/1] {kind} #1: {trial['events']} events, 0 lost, 0 duplicated" in done.stdout
    # The table: one row for the kind, nothing lost, and the same counts as the JSON.
    [row] = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in done.stdout.splitlines()
        if line.startswith(f"| {kind} ")
    ]
    assert row[:8] == [kind, "1", "0", str(trial["events"]), "0", "0", "0", "0"], row
    assert row[8] == f"{trial['dead_letters_expected']}/{trial['dead_letters_found']}"
    assert row[11:13] == ["0", "0"], row  # reconcile missed no loss, raised no false alarm
    if kind == "graceful":
        assert any("starting it again" in note for note in trial["notes"]), trial["notes"]
    else:
        assert any("with SIGKILL" in note for note in trial["notes"]), trial["notes"]
        assert trial["restarts_seen"] >= len(trial["killed"]) >= 1, output[-3000:]
        assert set(trial["killed"]) <= set(trial["restarted"]), trial["notes"]
