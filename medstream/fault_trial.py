"""One trial of `medstream faults`: run `medstream up`, strike, let it drain, measure.

The harness is an operator with a stopwatch and kill -9: it starts `up` as a child process
(its own data directory, the embedded broker or a three-node Apache Kafka cluster), finds
the component to kill by its process id, kills it, watches the run until it drained (or
stalled, or `up` exited on its own), stops `up` and then counts what the embedded engine
holds in a separate process (the engine admits one process at a time), against the
simulator's labels and the HL7 messages the collector acknowledged with AA.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from medstream.faults import GRACEFUL_DRAIN_TIMEOUT_S, GRACEFUL_RATE_FACTOR, Trial, TrialResult

Out = Callable[[str], None]
#: The store must hold still this long, with nothing unaccounted, for a run to be drained.
QUIET_S = 5.0
#: A run whose store did not change for this long after its producers finished, with
#: records still unaccounted for, has stalled: the harness stops it and counts the loss.
STALL_S = 60.0
#: `up` announcing a restart (a collector's, and a worker's, the sink's or the broker's once
#: `up` restarts them): "... restarting it in 2s". Status lines ("[12:00:00] ...") may carry
#: running totals of restarts, and "X restarted (restart 2)" follows an announcement: neither
#: is counted.
#: `up`'s confirmations that a component runs again (not its "restarting it in" notices,
#: which come before a restart that may never happen, nor status lines).
RESTARTED_LINE = re.compile(
    r"(?P<name>\b[\w.-]+) restarted \(restart \d+\)|(?P<broker>the embedded broker runs again)"
)
#: A terminal control sequence (cursor shown or hidden by a progress display).
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
#: How long a stop of `up` may take before the harness kills it (its drain is bounded by
#: --drain-timeout, each component's stop by its own timeout).
STOP_WAIT_S = 300.0
#: What `up`'s stop says when accepted records are left unstored (or cannot be counted).
STOP_SAID_UNSTORED = ("accepted records NOT stored", "what is left unstored cannot be told")
#: The MSH-3 of the resending HL7 sender: its messages are found by it in lab_result.
SENDER_SYSTEM = "FAULTS-LIS"
COMPONENT_ARGS = {"streams": "streams", "sink": "sink", "collect": "collector"}


def restarted_components(output: str) -> list[str]:
    """The components `up` confirmed it started again, one entry per restart, in order
    (``broker`` for the embedded broker)."""
    plain = ANSI_ESCAPE.sub("", output)
    return [
        "broker" if match.group("broker") else match.group("name")
        for match in RESTARTED_LINE.finditer(plain)
    ]


def clean_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a trial's `up`: none of the caller's medstream, Kafka or
    ClickHouse settings (a trial must not reach a real server by accident)."""
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("MEDSTREAM_", "KAFKA_", "CLICKHOUSE_"))
    }
    env.update(MEDSTREAM_DATA_DIR=str(data_dir), MEDSTREAM_STATUS_INTERVAL_S="1", **extra)
    return env


def stat_fields(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, ...); None when
    the process is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if not fields or fields[0] == "Z" else fields


def child_processes(parent: int) -> dict[int, list[str]]:
    """Live child processes of ``parent`` with their command lines (Linux /proc)."""
    children: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = stat_fields(entry.name)
        try:
            if fields is None or int(fields[1]) != parent:
                continue
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # it ended meanwhile
        children[int(entry.name)] = [part.decode(errors="replace") for part in command if part]
    return children


def component_name(command: list[str]) -> str | None:
    """``streams``, ``sink``, ``collector``, ``simulator``, ``console`` or ``broker`` for a
    command line `up` starts; None for anything else."""
    if "kafka.Kafka" in command or any(Path(part).name == "tansu" for part in command[:1]):
        return "broker"
    if "medstream" in command and "-m" in command:
        after = command[command.index("medstream") + 1:]
        if after:
            return {"simulate": "simulator", "console": "console"}.get(
                after[0], COMPONENT_ARGS.get(after[0])
            )
    return None


@dataclass(frozen=True)
class ChildProcess:
    """One process `up` started: a pid and its start time name it even after the pid is
    reused by another process."""

    pid: int
    started: int  # clock ticks after boot, /proc/<pid>/stat field 22


def component_pids(up_pid: int, runtime_file: Path) -> dict[str, ChildProcess]:
    """`up`'s components by name (``streams-0``, ``sink``, ``broker`` ...): its live
    children found in /proc by their command lines.

    The runtime state's ``pids`` (name -> pid) only name them: a pid there that is not a
    current child of `up` (a component restarting, a stale file) is ignored."""
    scanned: dict[int, str] = {}
    counters: dict[str, int] = {}
    for pid, command in sorted(child_processes(up_pid).items()):
        name = component_name(command)
        if name is None:
            continue
        if name in ("streams", "collector"):
            counters[name] = counters.get(name, -1) + 1
            name = f"{name}-{counters[name]}"
        scanned[pid] = name
    try:
        state = json.loads(runtime_file.read_text())
        hints = {int(pid): str(name) for name, pid in state["pids"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        hints = {}
    found: dict[str, ChildProcess] = {}
    # The state's names first, then /proc's for the children it does not name.
    for pid in sorted(scanned, key=lambda pid: pid not in hints):
        started = start_time(pid)
        if started is not None:
            found.setdefault(hints.get(pid, scanned[pid]), ChildProcess(pid, started))
    return found


def start_time(pid: int) -> int | None:
    """When a process started (clock ticks after boot), None when it is gone: a pid and
    its start time name one process even after the pid is reused."""
    fields = stat_fields(pid)
    return None if fields is None else int(fields[19])


def parent_pid(pid: int) -> int | None:
    """The parent of a live process (``PPid`` in /proc/<pid>/status), None when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"^PPid:\s*(\d+)$", status, re.MULTILINE)
    return int(found[1]) if found else None


def kill_child(parent: int | None, process: ChildProcess) -> bool:
    """SIGKILL ``process`` only while it is a child of ``parent`` (any parent: None)
    started at the recorded time; False (nothing sent) otherwise. A pidfd holds the
    process from the check to the signal, so a pid reused meanwhile is never hit."""
    try:
        pidfd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        return False
    try:
        if start_time(process.pid) != process.started or parent not in (
            None, parent_pid(process.pid)
        ):
            return False
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)
    return True


def hl7_message(control_id: str, number: int) -> bytes:
    """A synthetic ORU^R01 with one normal potassium (a synthetic patient)."""
    taken = datetime.now(tz=UTC).strftime("%Y%m%d%H%M%S+0000")
    segments = [
        f"MSH|^~\\&|{SENDER_SYSTEM}|LAB-FAULTS|MEDSTREAM|REGION|{taken}||ORU^R01^ORU_R01|"
        f"{control_id}|P|2.5.1",
        f"PID|1||SYNTH-FAULTS-{number % 11}^^^H001^MR||TESTPATIENT^FAULTS||19800101|F",
        f"OBR|1|PF-{number}|FF-{number}|24323-8^Metabolic panel^LN|||{taken}",
        f"OBX|1|NM|2823-3^Potassium^LN||4.{number % 9}|mmol/L|3.5-5.3|N|||F|||{taken}",
    ]
    return ("\r".join(segments) + "\r").encode()


@dataclass
class ResendingSender:
    """An HIS interface engine in miniature: sends each message until it gets an ACK and
    resends it after any failure (refused connection, closed socket, no ACK in time), as
    HL7 original-mode senders do. AA-acknowledged control ids must be stored exactly once."""

    port: int
    messages: int
    interval_s: float
    prefix: str
    acked: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    resends: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> threading.Thread:
        """Send in a background thread."""
        thread = threading.Thread(target=self._run, name="resending-sender", daemon=True)
        thread.start()
        return thread

    def _run(self) -> None:
        from producers.hl7_mllp import Frame, MllpFramer, mllp_wrap

        sock: socket.socket | None = None
        try:
            for number in range(self.messages):
                control_id = f"{self.prefix}-{number}"
                message = mllp_wrap(hl7_message(control_id, number))
                while not self.stop.is_set():
                    try:
                        if sock is None:
                            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
                        sock.sendall(message)
                        framer = MllpFramer(1 << 20)
                        frames: list[bytes] = []
                        while not frames:
                            data = sock.recv(65536)
                            if not data:
                                raise ConnectionError("closed before the ACK")
                            events, _ = framer.feed(data)
                            frames = [e.content for e in events if isinstance(e, Frame)]
                        code = _ack_code(frames[0])
                        (self.acked if code == "AA" else self.rejected).append(control_id)
                        break
                    except OSError:
                        if sock is not None:
                            sock.close()
                            sock = None
                        self.resends += 1
                        self.stop.wait(0.5)  # the collector is restarting: try again
                if self.stop.wait(self.interval_s):
                    return
        finally:
            if sock is not None:
                sock.close()
            self.done.set()


def _ack_code(frame: bytes) -> str:
    for segment in frame.decode(errors="replace").split("\r"):
        if segment.startswith("MSA|"):
            return segment.split("|")[1]
    return ""


class DrainWatch:
    """Decides, from the running query gateway, when a run has drained or stalled."""

    def __init__(self, data_dir: Path, producers_done: Callable[[], bool]) -> None:
        self.data_dir = data_dir
        self.producers_done = producers_done
        self._state: tuple[object, ...] | None = None
        self._since = time.monotonic()

    def verdict(self) -> str | None:
        """``drained``, ``stalled`` or None (keep waiting)."""
        if not self.producers_done():
            return None
        state = self._store_state()
        if state is None:
            return None  # the gateway is down (a sink restarting): not a still store
        now = time.monotonic()
        if state != self._state:
            self._state, self._since = state, now
            return None
        quiet = now - self._since
        if state[0] and quiet >= QUIET_S:
            return "drained"
        return "stalled" if quiet >= STALL_S else None

    def _store_state(self) -> tuple[object, ...] | None:
        from medstream.clickhouse import PROOF_MAX_ROWS, QueryError
        from medstream.published import published_files
        from medstream.query_endpoint import query_via_gateway, read_query_token
        from medstream.reconcile import reconcile

        try:
            url = json.loads((self.data_dir / "runtime.json").read_text())["query_url"]
            token = read_query_token(self.data_dir / "query.token")
            report_path = self.data_dir / "simulator-report.json"
            published = (
                int(json.loads(report_path.read_text())["messages"])
                if report_path.exists() else 0
            )

            def query(sql: str) -> Any:
                return query_via_gateway(url, sql, 60, PROOF_MAX_ROWS, token=token)

            now = datetime.now(tz=UTC)
            # The publishers' own counters too, as `up` --exit-when-done holds them.
            report = reconcile(
                query, "medstream", now - timedelta(days=1), now,
                counter_files=published_files(self.data_dir),
            )
            totals = query(
                "SELECT (SELECT count() FROM medstream.alert_history), "
                "(SELECT count() FROM medstream.dead_letter), "
                "(SELECT count() FROM medstream.lineage)"
            ).rows[0]
        except (OSError, ValueError, KeyError, TypeError, QueryError, sqlite3.Error):
            return None  # a counter file being written, or the gateway busy: ask again
        seen = sum(s.published_messages for s in report.sources)
        settled = report.drained and seen >= published
        return (settled, seen, tuple(sorted(report.stored_events.items())), *totals)


@dataclass
class TrialRunner:
    """Runs trials of one suite: each in its own directory under ``workdir``."""

    workdir: Path
    events: int
    rate: float
    workers: int = 2
    broker: str = "kafka"
    keep: bool = False
    drain_timeout_s: float = 300.0
    start_timeout_s: float = 300.0
    out: Out = print

    @property
    def run_s(self) -> float:
        """How long the simulator publishes in one run."""
        return self.events / self.rate

    def run(self, trial: Trial) -> TrialResult:
        """Run one trial and count what it lost; never raises for a failed trial."""
        started = time.monotonic()
        result = TrialResult(trial.kind, trial.number, trial.seed, trial.fault_after_s)
        directory = self.workdir / trial.name
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        run = _Run(self, trial, directory, result)
        try:
            run.execute()
        except Exception as exc:  # a harness failure is a result, reported, never a crash
            result.error = result.error or f"{type(exc).__name__}: {exc}"
        finally:
            run.close()
        result.wall_s = round(time.monotonic() - started, 1)
        if result.ok:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            if not self.keep:
                _keep_logs_only(directory)
            result.log_path = str(directory / "up.log")
        return result


class _Run:
    """The processes and files of one trial while it runs."""

    def __init__(self, runner: TrialRunner, trial: Trial, directory: Path, result: TrialResult):
        self.runner, self.trial, self.directory, self.result = runner, trial, directory, result
        self.data_dir = directory / "data"
        self.labels = directory / "labels.jsonl"
        self.up: subprocess.Popen[bytes] | None = None
        self.cluster: Any = None
        self.sender: ResendingSender | None = None
        self.seen_pids: dict[int, int | None] = {}  # pid -> start time
        self.logs: list[Path] = []
        self.extra_env: dict[str, str] = {}
        if runner.broker in ("kafka", "tansu"):
            self.extra_env["MEDSTREAM_EMBEDDED_BROKER"] = runner.broker

    def note(self, text: str) -> None:
        self.result.notes.append(text)
        self.runner.out(f"    {self.trial.kind} #{self.trial.number}: {text}")

    def execute(self) -> None:
        kind, trial = self.trial.kind, self.trial
        rate = self.runner.rate * (GRACEFUL_RATE_FACTOR if kind == "graceful" else 1)
        args = [
            "--no-console", "--events", str(self.runner.events), "--rate", str(rate),
            "--seed", str(trial.seed), "--labels", str(self.labels),
            "--workers", str(self.runner.workers),
        ]
        if kind == "graceful":  # the stop must leave part of its backlog to the restart
            args += ["--drain-timeout", str(GRACEFUL_DRAIN_TIMEOUT_S)]
        if kind == "cluster-broker":
            from medstream.kafka_broker import KafkaCluster

            self.cluster = KafkaCluster(self.directory / "cluster", size=3).start()
            self.extra_env.update(
                KAFKA_BOOTSTRAP_SERVERS=self.cluster.bootstrap_servers,
                MEDSTREAM_KAFKA_REPLICATION_FACTOR="3",
            )
        if kind == "collector":
            port = _free_port()
            config = self.directory / "collector.yaml"
            config.write_text(
                "kind: mllp\nname: faults-lis\norganisation_id: H001\n"
                f"source_system: LIS-FAULTS\nhost: 127.0.0.1\nport: {port}\n"
            )
            args += ["--collector", str(config), "--simulate"]
            count = max(20, self.runner.events // 20)
            self.sender = ResendingSender(
                port, count, self.runner.run_s / count, f"FAULT-{trial.seed}"
            )
        else:
            args.append("--exit-when-done")
        if not self.start_up(args, "up.log") or not self.wait_first_publication():
            return
        running_at = time.monotonic()
        if self.sender is not None:
            self.sender.start()
        self.wait_until(running_at + trial.fault_after_s)
        if self.up is not None and self.up.poll() is None:
            self.strike()
        else:
            self.note("`up` ended before the fault")
        if kind != "graceful":
            report = self.data_dir / "simulator-report.json"  # written when it finished
            self.await_end(
                running_at + self.runner.run_s + self.runner.drain_timeout_s,
                lambda: report.exists() and (self.sender is None or self.sender.done.is_set()),
            )
        self.stop_up()
        self.measure()

    def start_up(self, args: list[str], log_name: str) -> bool:
        """Start `up` and wait until it runs; False (and the error noted) when it did not."""
        log_path = self.directory / log_name
        self.logs.append(log_path)
        env = clean_env(self.data_dir, **self.extra_env)
        with log_path.open("ab") as log:
            self.up = subprocess.Popen(
                [sys.executable, "-m", "medstream", "up", *args],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + self.runner.start_timeout_s
        while "running:" not in log_path.read_text(errors="replace"):
            if self.up.poll() is not None:
                self.result.error = f"`up` exited with code {self.up.returncode} while starting"
                return False
            if time.monotonic() > deadline:
                self.result.error = "`up` did not start in time"
                return False
            time.sleep(0.2)
        self._remember_pids()
        return True

    def wait_first_publication(self, timeout_s: float = 120) -> bool:
        """The run's clock starts when the broker acknowledged the simulator's first
        message (its first label): a fault before that would hit an idle pipeline."""
        deadline = time.monotonic() + timeout_s
        while not (self.labels.exists() and self.labels.stat().st_size > 0):
            if self.up is None or self.up.poll() is not None:
                self.result.error = "`up` ended before the simulator published anything"
                return False
            if time.monotonic() > deadline:
                self.result.error = f"the simulator published nothing within {timeout_s:.0f}s"
                return False
            time.sleep(0.05)
        return True

    def wait_until(self, moment: float) -> None:
        """Wait for the fault's moment (a fixed point in time: nothing to poll for)."""
        while time.monotonic() < moment and self.up is not None and self.up.poll() is None:
            self._remember_pids()
            time.sleep(min(0.1, max(moment - time.monotonic(), 0)))

    def strike(self) -> None:
        """Deliver this trial's fault."""
        assert self.up is not None
        kind = self.trial.kind
        pids = component_pids(self.up.pid, self.data_dir / "runtime.json")
        workers = sorted(name for name in pids if name.startswith("streams"))
        targets: list[str] = []
        if kind in ("worker", "worker+sink") and workers:
            targets.append(workers[self.trial.target % len(workers)])
        if kind in ("sink", "worker+sink"):
            targets.append("sink")
        if kind == "collector":
            targets += [name for name in pids if name.startswith("collector")]
        if kind == "broker":
            targets.append("broker")
        if kind == "cluster-broker":
            node = self.cluster.nodes[self.trial.target % len(self.cluster.nodes)]
            node.kill()
            self.result.killed.append(f"cluster broker {node.node_id}")
            self.note(f"killed cluster broker {node.node_id} with SIGKILL")
            time.sleep(self.trial.restart_after_s)  # the outage lasts this long on purpose
            node.start(timeout_s=120)
            self.note(f"restarted broker {node.node_id} after {self.trial.restart_after_s}s")
            return
        if kind == "graceful":
            self.up.send_signal(signal.SIGTERM)
            self.note(
                f"sent SIGTERM to `up` (drain timeout {GRACEFUL_DRAIN_TIMEOUT_S:g}s) under backlog"
            )
            self.result.stop_hung = not self.stop_up(already_signalled=True)
            self.restart_on_same_data()
            return
        missing = [name for name in targets if name not in pids]
        if missing or not targets:
            self.result.error = (
                f"no process found for {', '.join(missing) or kind} among {sorted(pids)}"
            )
            return
        for name in targets:
            if not kill_child(self.up.pid, pids[name]):
                self.result.error = (
                    f"{name} (pid {pids[name].pid}) ended or was replaced before the kill: "
                    "not killed"
                )
                return
            self.result.killed.append(name)
        self.note(
            "killed " + ", ".join(f"{name} (pid {pids[name].pid})" for name in targets)
            + " with SIGKILL"
        )

    def restart_on_same_data(self) -> None:
        """The graceful kind's second half: `up` again on the same data, no new input."""
        assert self.up is not None
        code = self.up.returncode
        output = (self.directory / "up.log").read_text(errors="replace")
        said = "stopped cleanly" if "stopped cleanly" in output[-2000:] else (
            "said what it left unstored" if any(text in output for text in STOP_SAID_UNSTORED)
            else "did not say `stopped cleanly` nor what it left unstored"
        )
        measured = self._measure_store()
        if measured is None:
            return
        self.result.stop_exit_code = code
        self.result.stop_said_unstored = any(text in output for text in STOP_SAID_UNSTORED)
        self.result.unstored_at_stop = measured["labels"]["missing_events"]
        self.note(
            f"`up` stopped with exit code {code} ({said}) leaving "
            f"{self.result.unstored_at_stop} of {measured['labels']['expected_events']} "
            "acknowledged events unstored; starting it again"
        )
        if not self.start_up(["--no-console", "--no-simulate"], "up-restart.log"):
            return
        self.await_end(time.monotonic() + self.runner.drain_timeout_s, lambda: True)

    def await_end(self, deadline: float, producers_done: Callable[[], bool]) -> None:
        """Until `up` ends by itself, the store drained or stalled, or the deadline."""
        watch = DrainWatch(self.data_dir, producers_done)
        while self.up is not None and self.up.poll() is None:
            self._remember_pids()
            verdict = watch.verdict()
            if verdict == "drained":
                self.note("drained (every published record accounted for, store quiet)")
            elif verdict == "stalled":
                self.note(f"stalled: the store did not change for {STALL_S:.0f}s with gaps")
            elif time.monotonic() > deadline:
                verdict = "timed out"
                self.note("timed out waiting for the run to drain")
            if verdict is not None:
                self.result.drain = verdict
                return
            time.sleep(1.0)
        code = self.up.returncode if self.up is not None else None
        self.result.drain = "exited"
        self.note(f"`up` exited by itself with code {code}")

    def stop_up(self, already_signalled: bool = False) -> bool:
        """SIGTERM `up` (it stops its components in order) and wait; SIGKILL if it hangs
        (then False)."""
        if self.up is None:
            return True
        if self.up.poll() is None and not already_signalled:
            self.up.send_signal(signal.SIGTERM)
        stopped = True
        try:
            self.up.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self.note(f"`up` did not stop within {STOP_WAIT_S:.0f}s: killed")
            self.up.kill()
            self.up.wait()
            stopped = False
        self.result.up_exit_code = self.up.returncode
        self._wait_components_gone()
        return stopped

    def measure(self) -> None:
        """Count the store against ground truth once the trial's `up` is gone."""
        if self.result.error is not None and not self.data_dir.exists():
            return
        text = "".join(p.read_text(errors="replace") for p in self.logs if p.exists())
        restarted = restarted_components(text)
        self.result.restarts_seen = len(restarted)
        self.result.restarted = sorted(set(restarted))
        acked: list[str] | None = None
        if self.sender is not None:
            self.sender.stop.set()
            self.sender.done.wait(timeout=15)  # a send in progress times out after 10 s
            acked = list(self.sender.acked)
            answered = len(acked) + len(self.sender.rejected)
            self.result.sender_finished = answered >= self.sender.messages
            self.note(
                f"sender: {len(acked)} AA, {len(self.sender.rejected)} AE/AR, "
                f"{self.sender.resends} resends"
            )
        measured = self._measure_store(acked)
        if measured is None:
            return
        _apply(self.result, measured)
        if self.result.events == 0:
            self.result.error = "no ground truth: nothing was acknowledged to the producers"

    def _measure_store(self, acked: list[str] | None = None) -> dict[str, Any] | None:
        """The counts of :func:`measure_store`, from a separate process (the engine admits
        one process at a time; this one would have to open one engine after another)."""
        command = [sys.executable, "-m", "medstream.fault_trial", "measure", str(self.labels)]
        if acked is not None:
            acked_path = self.directory / "acked.json"
            acked_path.write_text(json.dumps(acked))
            command += [SENDER_SYSTEM, str(acked_path)]
        env = clean_env(self.data_dir)
        for _attempt in range(5):
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                return dict(json.loads(done.stdout))
            time.sleep(2)  # a component still holding the engine's lock
        self.result.error = f"measuring failed: {done.stderr.strip()[-400:]}"
        return None

    def close(self) -> None:
        """Stop whatever of this trial still runs."""
        if self.sender is not None:
            self.sender.stop.set()
        if self.up is not None and self.up.poll() is None:
            self.up.kill()
            self.up.wait()
        self._wait_components_gone()
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None

    def _remember_pids(self) -> None:
        if self.up is not None and self.up.poll() is None:
            for pid in child_processes(self.up.pid):
                self.seen_pids.setdefault(pid, start_time(pid))

    def _wait_components_gone(self, timeout_s: float = 60) -> None:
        """The components outlive a killed `up` by a moment (they get SIGTERM from the
        kernel); kill the ones still there after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s

        def ours() -> list[ChildProcess]:  # still the same processes (not a reused pid)
            return [
                ChildProcess(pid, started) for pid, started in self.seen_pids.items()
                if started is not None and start_time(pid) == started
            ]

        while ours() and time.monotonic() < deadline:
            time.sleep(0.2)
        for process in ours():  # orphans of a killed `up`: their parent is gone
            kill_child(None, process)
        self.seen_pids.clear()


def _free_port() -> int:
    from medstream.runtime import free_port

    return free_port()


def _keep_logs_only(directory: Path) -> None:
    """A failed trial without --keep: its logs stay (under logs/), its data goes."""
    logs = directory / "logs"
    for path in list(directory.rglob("*.log")):
        if path.parent != directory:
            target = logs / path.relative_to(directory).as_posix().replace("/", "_")
            target.parent.mkdir(exist_ok=True)
            shutil.move(path, target)
    for path in directory.iterdir():
        if path.is_dir() and path != logs:
            shutil.rmtree(path, ignore_errors=True)


def _apply(result: TrialResult, measured: dict[str, Any]) -> None:
    """Copy the measured counts into the trial's result."""
    truth = measured["labels"]
    result.events = truth["expected_events"]
    result.lost = truth["missing_events"]
    result.duplicated = truth["duplicated_events"]
    result.dead_letters_expected = truth["expected_dead_letters"]
    result.dead_letters_found = truth["found_dead_letters"]
    result.alerts_expected = measured["alerts_expected"]
    result.alerts_missing = measured["alerts_missing"]
    result.alerts_duplicated = measured["alerts_duplicated"]
    result.alert_p99_ms = measured["alert_p99_ms"]
    result.reconcile_gaps = measured["gaps"]
    sender = measured.get("sender")
    if sender:
        result.events += sender["acked"]
        result.lost += sender["lost"]
        result.duplicated += sender["duplicated"]
        result.notes.append(
            f"AA-acknowledged HL7 messages: {sender['acked']}, lost {sender['lost']}, "
            f"duplicated {sender['duplicated']}"
        )


def measure_store(
    query: Callable[[str], Any], database: str, labels: list[dict[str, Any]],
    sender_system: str | None = None, acked: list[str] | None = None,
    counter_files: list[Path] | None = None,
) -> dict[str, Any]:
    """The trial's counts from the store: the label check, critical alerts missing and
    duplicated apart, the label-free reconcile's gaps, the p99 event-to-alert delay and,
    with a resending sender, its AA-acknowledged messages lost or duplicated."""
    from medstream.reconcile import check_labels, reconcile

    check = check_labels(query, database, labels)
    expected = {
        label["event_id"] for label in labels
        if label.get("critical_rule") and not label.get("duplicate_delivery")
    }
    opened = {
        str(row[0]): int(row[1])
        for row in query(
            f"SELECT arrayJoin(triggering_event_ids), count() FROM {database}.alert_history "
            "FINAL WHERE action = 'opened' AND rule_id LIKE 'critical_value.%' GROUP BY 1"
        ).rows
    }
    delay = query(
        f"SELECT count(), quantile(0.99)(dateDiff('millisecond', ingest_time, stored_time)) "
        f"FROM {database}.alert_history FINAL "
        "WHERE action = 'opened' AND rule_id LIKE 'critical_value.%'"
    ).rows[0]
    now = datetime.now(tz=UTC)
    # The broker has stopped with `up`: the publishers' own counters are the count of what
    # entered that does not come from the sink.
    report = reconcile(
        query, database, now - timedelta(days=7), now + timedelta(minutes=1),
        counter_files=counter_files or (),
    )
    measured: dict[str, Any] = {
        "labels": {**check.__dict__, "missing_events": len(check.missing_events)},
        "alerts_expected": len(expected),
        "alerts_missing": sum(1 for event in expected if event not in opened),
        "alerts_duplicated": sum(n - 1 for n in opened.values() if n > 1),
        "alert_p99_ms": float(delay[1]) if int(delay[0]) else None,
        "gaps": [gap for gap in report.gaps if not gap.startswith(" ")],
    }
    if sender_system is not None and acked is not None:
        stored = {
            str(row[0]): int(row[1])
            for row in query(
                f"SELECT source_ref, count() FROM {database}.lab_result FINAL "
                f"WHERE source_system = '{sender_system}' GROUP BY source_ref"
            ).rows
        }
        measured["sender"] = {
            "acked": len(acked),
            "lost": sum(1 for control_id in acked if control_id not in stored),
            "duplicated": sum(n - 1 for n in stored.values() if n > 1),
        }
    return measured


def measure_main(argv: list[str]) -> int:
    """``python -m medstream.fault_trial measure LABELS [SENDER_SYSTEM ACKED_JSON]``: print
    the counts of the engine under MEDSTREAM_DATA_DIR as JSON (the harness's own process
    cannot open one engine after another)."""
    from medstream.clickhouse import PROOF_MAX_ROWS, open_clickhouse, run_read_only
    from medstream.published import published_files
    from medstream.reconcile import read_labels
    from medstream.settings import ClickHouseSettings, RuntimeSettings

    if len(argv) not in (2, 4) or argv[0] != "measure":
        print("usage: python -m medstream.fault_trial measure LABELS [SYSTEM ACKED_JSON]",
              file=sys.stderr)
        return 2
    labels_path = Path(argv[1])
    labels = read_labels(labels_path) if labels_path.exists() else []
    sender_system, acked = (argv[2], json.loads(Path(argv[3]).read_text())) if len(argv) == 4 \
        else (None, None)
    ch, runtime = ClickHouseSettings(), RuntimeSettings()
    client = open_clickhouse(ch, runtime)
    try:
        measured = measure_store(
            lambda sql: run_read_only(client, sql, ch.database, 300, PROOF_MAX_ROWS),
            ch.database, labels, sender_system, acked,
            published_files(runtime.data_dir),
        )
    finally:
        client.close()
    print(json.dumps(measured))
    return 0


if __name__ == "__main__":
    sys.exit(measure_main(sys.argv[1:]))
