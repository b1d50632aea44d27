"""`medstream faults`: kill -9 trials against `medstream up`, each checked against ground truth.

Each trial runs `medstream up` in its own data directory with the simulator writing its
ground-truth labels, kills one component with SIGKILL at a random moment (or stops `up`
gracefully under a backlog and starts it again on the same data), lets the run drain and
counts what ClickHouse holds against the labels: events lost, events duplicated under
FINAL, critical alerts missing or duplicated, dead letters expected and found, and the
gaps the label-free reconcile names. This module plans the trials (a seeded RNG), adds
their results up and renders the table; :mod:`medstream.fault_trial` runs one trial.
"""

from __future__ import annotations

import json
import random
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

#: What a trial does to the running pipeline.
FaultKind = Literal[
    "worker", "sink", "worker+sink", "collector", "broker", "cluster-broker", "graceful"
]
KINDS: tuple[FaultKind, ...] = (
    "worker", "sink", "worker+sink", "collector", "broker", "cluster-broker", "graceful"
)
#: Kinds that need Apache Kafka, and why: tansu keeps nothing across its own restart or
#: a stop (the graceful kind stops with a backlog on purpose, for the next start to store
#: it), and a cluster of it is not what medstream supports.
KAFKA_ONLY: dict[FaultKind, str] = {
    "broker": "tansu keeps nothing across its restart",
    "cluster-broker": "medstream runs no tansu cluster",
    "graceful": "tansu keeps nothing across a stop: the backlog it leaves is lost",
}
#: The moment of the fault, seconds after the simulator started, for a run that lasts at
#: least KILL_WINDOW_S[1] seconds; shorter runs scale it down (see :func:`kill_window`).
KILL_WINDOW_S = (2.0, 18.0)
#: A killed broker of the three-node cluster is started again after this many seconds.
BROKER_RESTART_S = (1.0, 3.0)
#: The graceful stop happens under a backlog: its run publishes this many times faster
#: than the others (the same events, so it lasts this many times less) ...
GRACEFUL_RATE_FACTOR = 4
#: ... the stop comes 1-3 s after the broker acknowledged the run's first record (the
#: workers are still joining or behind a publisher at that rate; later, a pipeline that
#: keeps up would leave no backlog) ...
GRACEFUL_WINDOW_S = (1.0, 3.0)
#: ... and `up` is given this --drain-timeout (none: with even 1 s a fast pipeline stored
#: the whole backlog, 0 of 1,237 left, and the trial tested nothing), so the stop leaves the
#: backlog in the topics: it must say so with a non-zero exit code, and the restart must
#: store it once. (A stop that drains is the e2e tests' `up` Ctrl-C.)
GRACEFUL_DRAIN_TIMEOUT_S = 0.0
#: Kinds whose fault is a SIGKILL, and those of them `up` must answer with a restart of
#: each killed component (a cluster node is started again by the harness itself).
KILL_KINDS: tuple[FaultKind, ...] = (
    "worker", "sink", "worker+sink", "collector", "broker", "cluster-broker"
)
RESTARTED_KINDS: tuple[FaultKind, ...] = ("worker", "sink", "worker+sink", "collector", "broker")
#: How a watched run may end and still pass: drained, or `up` ended by itself (its exit
#: code is judged on its own).
DRAIN_ENDINGS = ("drained", "exited")


@dataclass(frozen=True)
class Trial:
    """One planned fault: which kind, when (seconds into the run) and the run's seed."""

    kind: FaultKind
    number: int  # 1.. within its kind
    seed: int
    fault_after_s: float
    restart_after_s: float = 0.0  # cluster-broker only: the harness restarts the node
    target: int = 0  # which worker (or cluster node), as an index to choose from

    @property
    def name(self) -> str:
        """A file-system-safe name, unique in one suite run."""
        return f"{self.kind.replace('+', '-')}-{self.number}"


def kill_window(run_s: float) -> tuple[float, float]:
    """When a fault may strike in a run lasting ``run_s`` seconds: 2-18 s, or for a
    shorter run between a tenth and seven tenths of it (the fault must hit mid-run)."""
    low, high = KILL_WINDOW_S
    if run_s >= high / 0.7:
        return low, high
    return round(0.1 * run_s, 3), round(0.7 * run_s, 3)


def graceful_window(run_s: float) -> tuple[float, float]:
    """When the graceful stop may come in a suite whose other runs last ``run_s`` seconds:
    :data:`GRACEFUL_WINDOW_S`, but not after seven tenths of its own (faster) run while that
    is longer than the lower bound (the stop must come while the simulator still publishes)."""
    low, high = GRACEFUL_WINDOW_S
    return low, round(max(low, min(high, 0.7 * run_s / GRACEFUL_RATE_FACTOR)), 3)


def plan_trials(
    kinds: Sequence[FaultKind], trials: int, seed: int, run_s: float, workers: int
) -> list[Trial]:
    """The trials of a suite run, in the order they run (kind by kind); the same seed
    gives the same plan."""
    rng = random.Random(seed)
    planned = []
    for kind in kinds:
        low, high = graceful_window(run_s) if kind == "graceful" else kill_window(run_s)
        for number in range(1, trials + 1):
            planned.append(
                Trial(
                    kind=kind,
                    number=number,
                    seed=rng.randrange(1_000_000),
                    fault_after_s=round(rng.uniform(low, high), 2),
                    restart_after_s=(
                        round(rng.uniform(*BROKER_RESTART_S), 2)
                        if kind == "cluster-broker" else 0.0
                    ),
                    target=rng.randrange(3 if kind == "cluster-broker" else max(workers, 1)),
                )
            )
    return planned


def parse_kinds(text: str) -> list[FaultKind]:
    """``worker,sink`` -> the kinds; ``all`` -> every kind. ValueError names unknown ones."""
    if text.strip() in ("", "all"):
        return list(KINDS)
    wanted = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [part for part in wanted if part not in KINDS]
    if unknown:
        raise ValueError(
            f"unknown fault kind {', '.join(unknown)} (known: {', '.join(KINDS)}, or all)"
        )
    return [kind for kind in KINDS if kind in wanted]


@dataclass(kw_only=True)
class FaultCounts:
    """What trials lost and did, counted against ground truth (one trial, or added up)."""

    events: int = 0  # events the labels (and the resending sender's AA) expect stored
    lost: int = 0
    duplicated: int = 0
    alerts_expected: int = 0
    alerts_missing: int = 0
    alerts_duplicated: int = 0
    dead_letters_expected: int = 0
    dead_letters_found: int = 0
    restarts_seen: int = 0
    wall_s: float = 0.0

    def add(self, other: FaultCounts) -> None:
        """Add another's counts to these."""
        for count in fields(FaultCounts):
            setattr(self, count.name, getattr(self, count.name) + getattr(other, count.name))


@dataclass
class TrialResult(FaultCounts):
    """What one trial found."""

    kind: FaultKind
    number: int
    seed: int
    fault_after_s: float
    alert_p99_ms: float | None = None
    up_exit_code: int | None = None
    #: graceful only: how the stop under backlog ended, and what it left unstored (a stop
    #: that leaves acknowledged records unstored must say so with a non-zero exit code; one
    #: that left nothing came with no backlog and tested nothing).
    stop_exit_code: int | None = None
    unstored_at_stop: int | None = None
    #: graceful only: the stop did not end within the harness's wait and was SIGKILLed.
    stop_hung: bool = False
    #: graceful only: the stop's output said what it left unstored (None: not known, a
    #: result written before this was recorded).
    stop_said_unstored: bool | None = None
    #: The killed components whose restart `up` confirmed (None: not known, a result
    #: written before this was recorded; then only their count is checked).
    restarted: list[str] | None = None
    #: Label-free reconcile: the gaps it named (it should see every loss the labels see).
    reconcile_gaps: list[str] = field(default_factory=list)
    #: How waiting for the drain ended: ``drained``, ``exited`` (`up` ended by itself),
    #: ``stalled`` or ``timed out``; None when it was never watched.
    drain: str | None = None
    #: collector only: the resending sender got an answer to every message.
    sender_finished: bool | None = None
    #: The components the fault killed with SIGKILL, by name.
    killed: list[str] = field(default_factory=list)
    #: What happened, in order: the fault, restarts, how the run ended.
    notes: list[str] = field(default_factory=list)
    #: The trial could not be run or measured (then its counts prove nothing).
    error: str | None = None
    log_path: str | None = None

    @property
    def ok(self) -> bool:
        """Measured, and none of :attr:`problems`."""
        return not self.problems

    @property
    def problems(self) -> list[str]:
        """Why this trial failed, one reason each (empty: it passed)."""
        if self.error is not None:
            return [f"not measured: {self.error}"]
        return [
            reason for reason, failed in (
                (f"{self.lost} lost", self.lost > 0),
                (f"{self.duplicated} duplicated", self.duplicated > 0),
                (f"{self.alerts_missing} critical alerts missing", self.alerts_missing > 0),
                (f"{self.alerts_duplicated} critical alerts duplicated",
                 self.alerts_duplicated > 0),
                (f"dead letters {self.dead_letters_found} of {self.dead_letters_expected}",
                 self.dead_letters_found != self.dead_letters_expected),
                (f"the graceful stop left acknowledged records unstored without saying so "
                 f"(exit code {self.stop_exit_code})", self.stop_hid_unstored),
                ("the graceful stop hung and was killed",
                 self.kind == "graceful" and self.stop_hung),
                ("the graceful stop never happened",
                 self.kind == "graceful" and self.unstored_at_stop is None),
                ("the stop came with no backlog: nothing was tested",
                 self.kind == "graceful" and self.unstored_at_stop == 0),
                (f"the run did not drain ({self.drain or 'never watched'})",
                 self.drain not in DRAIN_ENDINGS),
                ("the resending sender never finished", self.sender_finished is False),
                (f"`up` ended with exit code {self.up_exit_code}", self.up_exit_code != 0),
                ("no component was killed", self.kind in KILL_KINDS and not self.killed),
                (f"{self.restarts_seen} restarts for {len(self.killed)} killed",
                 self.kind in RESTARTED_KINDS and self.restarted is None
                 and self.restarts_seen < len(self.killed)),
                (f"never restarted: {', '.join(self.not_restarted)}",
                 self.kind in RESTARTED_KINDS and bool(self.not_restarted)),
                ("reconcile named no gap for the loss", self.reconcile_missed),
                ("reconcile named gaps with nothing lost", self.reconcile_false_alarm),
            ) if failed
        ]

    @property
    def reconcile_missed(self) -> bool:
        """The trial lost events but the label-free reconcile named no gap."""
        return self.lost > 0 and not self.reconcile_gaps

    @property
    def reconcile_false_alarm(self) -> bool:
        """The label-free reconcile named gaps although nothing was lost."""
        return self.lost == 0 and bool(self.reconcile_gaps)

    @property
    def stop_hid_unstored(self) -> bool:
        """A graceful stop left acknowledged records unstored and did not say so: it
        exited 0 (or its code is unknown), or its output did not say what it left."""
        return bool(self.unstored_at_stop) and (
            self.stop_exit_code in (0, None) or self.stop_said_unstored is False
        )

    @property
    def not_restarted(self) -> list[str]:
        """The killed components `up` did not confirm restarting (empty when unknown)."""
        if self.restarted is None:
            return []
        return [name for name in self.killed if name not in self.restarted]

    def summary(self) -> str:
        """One progress line for people."""
        if self.error is not None:
            verdict = f"NOT MEASURED: {self.error}"
        else:
            verdict = (
                f"{self.events} events, {self.lost} lost, {self.duplicated} duplicated, "
                f"alerts {self.alerts_expected - self.alerts_missing}/{self.alerts_expected} "
                f"({self.alerts_duplicated} duplicated), dead letters "
                f"{self.dead_letters_found}/{self.dead_letters_expected}, "
                f"restarts {self.restarts_seen}, reconcile gaps {len(self.reconcile_gaps)}"
            )
            if self.unstored_at_stop is not None:
                verdict += (
                    f"; the stop left {self.unstored_at_stop} unstored and exited "
                    f"{self.stop_exit_code}" + (" (NOT REPORTED)" if self.stop_hid_unstored else "")
                )
        state = "ok" if self.ok else "FAILED" + (
            "" if self.error is not None else " (" + "; ".join(self.problems) + ")"
        )
        return f"{self.kind} #{self.number}: {verdict} in {self.wall_s:.0f}s: {state}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {**asdict(self), "ok": self.ok, "problems": self.problems}

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> TrialResult:
        """Back from :meth:`as_dict` (``ok`` and ``problems`` are judged again, not read)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(body) - known - {"ok", "problems"})
        if unknown or body.get("kind") not in KINDS:
            raise ValueError(
                f"not a fault trial: kind {body.get('kind')!r}"
                + (f", unknown fields {', '.join(unknown)}" if unknown else "")
            )
        return cls(**{k: v for k, v in body.items() if k in known})


@dataclass
class KindSummary(FaultCounts):
    """The trials of one kind added up (the worst p99, the total wall time)."""

    kind: str
    trials: int = 0
    failed: int = 0
    reconcile_gaps: int = 0
    #: Trials that lost something without a reconcile gap, and the reverse.
    reconcile_missed: int = 0
    false_alarms: int = 0
    alert_p99_ms: float | None = None


def summarise(results: Sequence[TrialResult]) -> list[KindSummary]:
    """One summary per kind, in the order of :data:`KINDS`."""
    by_kind: dict[str, KindSummary] = {}
    for result in sorted(results, key=lambda r: (KINDS.index(r.kind), r.number)):
        total = by_kind.setdefault(result.kind, KindSummary(result.kind))
        total.trials += 1
        total.failed += 0 if result.ok else 1
        total.add(result)
        total.reconcile_gaps += len(result.reconcile_gaps)
        total.reconcile_missed += int(result.reconcile_missed)
        total.false_alarms += int(result.reconcile_false_alarm)
        if result.alert_p99_ms is not None:
            total.alert_p99_ms = max(total.alert_p99_ms or 0.0, result.alert_p99_ms)
    return list(by_kind.values())


TABLE_COLUMNS = (
    "kind", "trials", "failed", "events", "lost", "duplicated", "alerts missing",
    "alerts duplicated", "dead letters exp/found", "restarts seen", "reconcile gaps",
    "reconcile missed", "false alarms", "p99 critical alert", "wall time",
)


def render_table(summaries: Sequence[KindSummary]) -> str:
    """The suite's table (aligned text, also valid Markdown)."""
    rows = [
        [
            s.kind, str(s.trials), str(s.failed), str(s.events), str(s.lost),
            str(s.duplicated), str(s.alerts_missing), str(s.alerts_duplicated),
            f"{s.dead_letters_expected}/{s.dead_letters_found}", str(s.restarts_seen),
            str(s.reconcile_gaps), str(s.reconcile_missed), str(s.false_alarms),
            "n/a" if s.alert_p99_ms is None else f"{s.alert_p99_ms / 1000:.1f} s",
            f"{s.wall_s:.0f} s",
        ]
        for s in summaries
    ]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(TABLE_COLUMNS)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(TABLE_COLUMNS), separator, *(line(r) for r in rows)])


def exit_code(results: Sequence[TrialResult]) -> int:
    """0 when every trial passed (see :attr:`TrialResult.problems`); 1 otherwise (also when
    a trial could not be measured, or none ran)."""
    return 0 if results and all(r.ok for r in results) else 1


def suite_json(
    results: Sequence[TrialResult], settings: dict[str, Any]
) -> dict[str, Any]:
    """The JSON the suite writes: its settings, every trial and the summary per kind."""
    return {
        "settings": settings,
        "ok": exit_code(results) == 0,
        "kinds": [asdict(s) for s in summarise(results)],
        "trials": [r.as_dict() for r in results],
    }


def read_suites(paths: Sequence[Any]) -> tuple[list[TrialResult], list[dict[str, Any]]]:
    """The trials and settings of suite JSON files (``medstream faults --merge``), e.g. the
    kinds of a long run split over several sittings. ValueError names a file that is not
    one, a file given twice, and files holding the same trials (each would count twice); a
    file that stopped early (fewer trials than planned) is said in its settings, not hidden.
    """
    results: list[TrialResult] = []
    settings: list[dict[str, Any]] = []
    files: dict[Path, str] = {}  # resolved -> as given
    #: (kind, number, trial seed) -> (suite seed or None when unknown, file) of each file.
    trials_seen: dict[tuple[str, int, int], list[tuple[Any, str]]] = {}
    for path in paths:
        resolved = Path(path).resolve()
        if resolved in files:
            raise ValueError(
                f"{path}: given twice (also as {files[resolved]}): its trials would count "
                "twice; name each file once"
            )
        files[resolved] = str(path)
        try:
            with open(path, encoding="utf-8") as handle:
                body = json.load(handle)
            trials = [TrialResult.from_dict(trial) for trial in body["trials"]]
            setting = dict(body["settings"])
            if "merged" in setting and not all(
                isinstance(inner, dict) and "trials_run" in inner and "file" in inner
                for inner in setting["merged"]
            ):
                raise ValueError("its merged settings name no file and trial count")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a fault suite result ({exc})") from exc
        _refuse_trials_seen(trials, setting.get("seed"), str(path), trials_seen)
        results.extend(trials)
        if "merged" in setting:
            # A merge of earlier files: the settings of each (their seeds and sizes).
            settings.extend(
                {**inner, "file": f"{inner.get('file')} (via {path})"}
                for inner in setting["merged"]
            )
            continue
        setting["file"] = str(path)
        setting["trials_run"] = len(trials)
        settings.append(setting)
    return results, settings


def _refuse_trials_seen(
    trials: Sequence[TrialResult], suite_seed: Any, file: str,
    seen: dict[tuple[str, int, int], list[tuple[Any, str]]],
) -> None:
    """ValueError when an earlier file holds one of ``trials`` (same kind, number and seed
    under the same suite seed, or an unknown one: a merged file's); else remember them."""
    keys = [(trial.kind, trial.number, trial.seed) for trial in trials]
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:
        shown = ", ".join(f"{kind} #{number} (seed {seed})" for kind, number, seed in twice[:5])
        raise ValueError(f"{file} holds the same trials more than once ({shown}): each would "
                         "count twice")
    repeated: dict[str, list[str]] = {}
    for trial in trials:
        key = (trial.kind, trial.number, trial.seed)
        for other_seed, other_file in seen.get(key, []):
            if None in (other_seed, suite_seed) or other_seed == suite_seed:
                repeated.setdefault(other_file, []).append(
                    f"{trial.kind} #{trial.number} (seed {trial.seed})"
                )
    if repeated:
        other_file, names = next(iter(repeated.items()))
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise ValueError(
            f"{file} and {other_file} hold the same trials ({shown}, suite seed "
            f"{suite_seed if suite_seed is not None else 'unknown'}): each would count twice; "
            "merge every run once"
        )
    for trial in trials:
        seen.setdefault((trial.kind, trial.number, trial.seed), []).append((suite_seed, file))


def code_version() -> dict[str, Any]:
    """The commit of the code that runs the suite and whether it had uncommitted changes
    (recorded with the results, so a merge of runs on different code says so); unknown
    outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10, check=True)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                 "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def describe_code(code: dict[str, Any] | None) -> str:
    """A run's code version for people."""
    if not code or not code.get("commit"):
        return "code unknown"
    dirty = code.get("dirty")
    return f"code {code['commit'][:10]}" + (
        " with uncommitted changes" if dirty else " (changes unknown)" if dirty is None else "")


def runnable_kinds(
    kinds: Sequence[FaultKind], broker: str, out: Callable[[str], None] = print
) -> list[FaultKind]:
    """``kinds`` without those the broker cannot run (said, with why)."""
    if broker != "tansu":
        return list(kinds)
    for kind in kinds:
        if kind in KAFKA_ONLY:
            out(f"on tansu: {kind} left out ({KAFKA_ONLY[kind]}; it needs Apache Kafka)")
    return [kind for kind in kinds if kind not in KAFKA_ONLY]


def run_suite(
    planned: Sequence[Trial],
    run_trial: Callable[[Trial], TrialResult],
    out: Callable[[str], None] = print,
    on_result: Callable[[list[TrialResult]], None] | None = None,
) -> list[TrialResult]:
    """Run the planned trials one after another, a progress line before and after each;
    ``on_result`` gets the results so far after every trial (the suite's JSON is written
    then, so a run cut short keeps what it measured)."""
    results = []
    for index, trial in enumerate(planned, 1):
        out(
            f"[{index}/{len(planned)}] {trial.kind} #{trial.number}: seed {trial.seed}, "
            f"fault {trial.fault_after_s:.1f}s into the run"
        )
        result = run_trial(trial)
        results.append(result)
        if on_result is not None:
            on_result(results)
        out(f"[{index}/{len(planned)}] {result.summary()}")
        if not result.ok and result.log_path:
            out(f"[{index}/{len(planned)}] logs of the failed trial: {result.log_path}")
    return results


def write_json(path: Any, body: dict[str, Any]) -> None:
    """Write the suite's JSON."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(body, handle, indent=2, default=str)


def run_faults(
    kinds: Sequence[FaultKind],
    trials: int,
    events: int,
    rate: float,
    seed: int,
    broker: str,
    workers: int,
    keep: bool,
    out: Callable[[str], None] = print,
    on_result: Callable[[list[TrialResult]], None] | None = None,
) -> list[TrialResult]:
    """Plan and run the suite; the kinds tansu cannot run are left out with a note."""
    import shutil
    import tempfile

    from medstream.fault_trial import TrialRunner

    kinds = runnable_kinds(kinds, broker, out)
    workdir = Path(tempfile.mkdtemp(prefix="medstream-faults-"))
    runner = TrialRunner(workdir, events, rate, workers=workers, broker=broker, keep=keep, out=out)
    planned = plan_trials(kinds, trials, seed, runner.run_s, workers)
    out(
        f"fault suite: {len(planned)} trials ({trials} per kind: {', '.join(kinds)}), "
        f"{events} events at {rate:.0f}/s, {workers} workers, broker {broker}, seed {seed}; "
        f"trials under {workdir}"
    )
    results = run_suite(planned, runner.run, out, on_result)
    if not any(workdir.iterdir()):
        shutil.rmtree(workdir, ignore_errors=True)
    elif not keep:
        out(f"logs of the failed trials are kept under {workdir}")
    return results
