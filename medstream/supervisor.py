"""`medstream up`: start every component as its own process, print live status, restart
what dies, and on a stop let the pipeline store what it accepted before it ends.

Process layout (each a separate OS process): the embedded broker (Apache Kafka, or tansu
without Java; embedded mode only), one
sink, N Faust stream workers, the alert console, the collectors and the simulator. The sink
is also the one process that opens the embedded ClickHouse engine (chdb allows a single
process per engine path), so it serves the read-only query endpoint that `medstream sql`,
`medstream reconcile` and the console use while the pipeline runs. The supervisor itself
opens no engine.

A component that dies (a stream worker, the sink, a collector, the console, the embedded
broker) is started again after a growing pause; the broker is never stopped because a
component died. A graceful stop stops the producers first, waits (bounded) until the
workers' and the sink's consumer groups have committed every accepted record, and exits
non-zero, saying how much and where, when something is still unstored.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from medstream.access import ALL_ORGANISATIONS, UserStore
from medstream.audit import AuditError, AuditTrail
from medstream.backlog import (
    Backlog,
    BacklogUnknown,
    ConsumerGroup,
    measure_backlog,
    pipeline_groups,
)
from medstream.clickhouse import PROOF_MAX_ROWS, QueryError, QueryResult
from medstream.keys import AUDIT_KEY, SecretRefused, ensure_data_dir_secrets, resolve_secret
from medstream.metrics import COMPONENT_RESTARTS, serve_metrics
from medstream.query_endpoint import QueryTokenMissing, query_via_gateway, read_query_token
from medstream.runtime import (
    Broker,
    EmbeddedRuntimeError,
    RuntimeState,
    describe_broker,
    die_with_parent,
    ensure_topics,
    free_port,
    port_free,
    private_data_dir,
    start_embedded_broker,
    wait_for_port,
)
from medstream.settings import (
    RAW_TOPICS,
    TIMERS_STOPPED_ENV,
    AuditSettings,
    ClickHouseSettings,
    ConsoleSettings,
    KafkaSettings,
    RuntimeSettings,
    SinkSettings,
    StreamSettings,
    clickhouse_url,
)

# A component that exits is restarted after a pause that doubles (1 s .. 60 s); after this
# many restarts in a row, each following a run shorter than HEALTHY_RUN_S, it is reported
# as failed and `up` stops (draining what it can).
MAX_QUICK_RESTARTS = 8
HEALTHY_RUN_S = 300.0
LONGEST_PAUSE_S = 60.0


@dataclass
class RestartPolicy:
    """When a component that died is started again: after a pause growing 1 s .. 60 s with
    each quick failure in a row, never again after MAX_QUICK_RESTARTS of them."""

    quick: int = 0  # restarts in a row, each after a run shorter than HEALTHY_RUN_S
    total: int = 0  # restarts in this run of `up`, for the status line and the metric
    due_at: float | None = None
    started_at: float = 0.0

    def schedule(self, now: float) -> float | None:
        """Plan the next start after a death at ``now``; the pause, or None to give up."""
        if now - self.started_at > HEALTHY_RUN_S:
            self.quick = 0  # it ran well for a while: a fresh failure
        if self.quick >= MAX_QUICK_RESTARTS:
            return None
        pause = min(LONGEST_PAUSE_S, 2.0**self.quick)
        self.due_at = now + pause
        return pause

    def due(self, now: float) -> bool:
        """True when a planned start is due."""
        return self.due_at is not None and now >= self.due_at

    def started(self, now: float, restart: bool) -> None:
        """Record a start (``restart``: after a death, counted)."""
        self.started_at = now
        self.due_at = None
        if restart:
            self.quick += 1
            self.total += 1


@dataclass
class Child:
    """One supervised component process."""

    name: str
    args: list[str]
    metrics_port: int
    process: subprocess.Popen[bytes] | None = None
    expected_exit: bool = False  # the simulator may finish on its own
    # Collectors resume from their committed source position, workers and the sink from
    # their committed offsets: all but the simulator are started again when they die.
    restartable: bool = False
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    #: The last values scraped, and the start (monotonic) of the process that reported them.
    last_values: dict[str, float] = field(default_factory=dict)
    values_from: float | None = None
    #: Counter totals of its earlier processes (a restarted process counts from 0 again).
    earlier_counts: dict[str, float] = field(default_factory=dict)
    #: The simulator's report: once it exited, its count of acknowledged messages replaces
    #: the last scrape, which missed what it published after it.
    final_report: Path | None = None

    @property
    def metrics_url(self) -> str:
        """Its /metrics endpoint."""
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def state(self) -> str:
        """running (its values come from the running process), starting (not scraped since
        it started), restarting (died, started again soon), finished (the simulator) or
        down."""
        process = self.process
        if process is None:
            return "starting"
        if process.poll() is None:
            return "running" if self.values_from == self.restart.started_at else "starting"
        if self.expected_exit and process.returncode == 0:
            return "finished"
        return "restarting" if self.restartable else "down"


@dataclass(frozen=True)
class ChildReading:
    """What one component had reported at a snapshot."""

    state: str  # Child.state()
    #: Counters as totals over its restarts; gauges (lag, ready) as its process reports them.
    values: dict[str, float]
    #: Start (monotonic) of the process that reported them, None before any report.
    since: float | None = None
    #: Counter totals of its processes before that one.
    earlier: dict[str, float] = field(default_factory=dict)


@dataclass
class Snapshot:
    """Counter values scraped from every child at one moment (summed in ``values``)."""

    at: float
    values: dict[str, float] = field(default_factory=dict)
    children: dict[str, ChildReading] = field(default_factory=dict)


@dataclass(frozen=True)
class CollectorSpec:
    """An edge collector `up` runs: its kind and name, read from its configuration file
    (the collector process validates the whole file, and the source, when it starts)."""

    kind: str
    name: str
    config: Path

    @classmethod
    def read(cls, path: Path) -> CollectorSpec:
        """Kind and name of a collector configuration; ValueError says what is wrong."""
        import yaml

        from producers import COLLECTOR_KINDS

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"{path}: cannot read ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(data, dict) or not data.get("kind") or not data.get("name"):
            raise ValueError(f"{path}: a collector configuration needs `kind` and `name`")
        if data["kind"] not in COLLECTOR_KINDS:
            known = ", ".join(sorted(COLLECTOR_KINDS))
            raise ValueError(f"{path}: unknown collector kind {data['kind']!r} (known: {known})")
        return cls(str(data["kind"]), str(data["name"]), path.resolve())


def scrape(children: list[Child]) -> Snapshot:
    """Read every child's counters (a finished one keeps its last; the simulator's final
    count comes from its report) and sum them."""
    snapshot = Snapshot(time.monotonic())
    for child in children:
        if child.process is not None and child.process.poll() is None:
            try:
                with urllib.request.urlopen(child.metrics_url, timeout=1) as response:
                    values = _status_values(response.read().decode())
            except OSError:  # a status line only: the last values stand until the next scrape
                pass
            else:
                if child.values_from != child.restart.started_at:  # a new process: from 0
                    for key, value in child.last_values.items():
                        if _is_counter(key):
                            child.earlier_counts[key] = child.earlier_counts.get(key, 0.0) + value
                child.last_values = values
                child.values_from = child.restart.started_at
        elif child.final_report is not None and child.state() == "finished":
            messages = _reported_messages(child.final_report)
            if messages is not None:
                child.last_values["out:simulator"] = float(messages)
        values = {
            key: value + (child.earlier_counts.get(key, 0.0) if _is_counter(key) else 0.0)
            for key, value in child.last_values.items()
        }
        for key, value in child.earlier_counts.items():
            values.setdefault(key, value)
        snapshot.children[child.name] = ChildReading(
            child.state(), values, child.values_from, dict(child.earlier_counts)
        )
        for key, value in values.items():
            snapshot.values[key] = snapshot.values.get(key, 0.0) + value
    return snapshot


def _process_key(child: Child) -> tuple[str, int | None, float | None]:
    """One process of a component (its pid and start), across its restarts."""
    return (child.name, child.process.pid if child.process else None, child.restart.started_at)


def _is_counter(key: str) -> bool:
    """Counters add up over a component's restarts; gauges (lag, ready) do not."""
    return not key.startswith(("lag:", "ready", "timers_stopped"))


def _reported_messages(report: Path) -> int | None:
    """The messages the simulator's report says the broker acknowledged; None until written."""
    try:
        return int(json.loads(report.read_text())["messages"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _status_values(text: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            stage = sample.labels.get("stage", "")
            key = None
            if sample.name == "medstream_records_out_total":
                key = f"out:{stage}"
            elif sample.name == "medstream_records_in_total":
                key = f"in:{stage}"
            elif sample.name == "medstream_dead_letters_total":
                key = "dlq"
            elif sample.name == "medstream_alerts_total":
                key = "alerts"
            elif sample.name == "medstream_consumer_lag":
                key = f"lag:{sample.labels.get('topic', '')}"
            elif sample.name == "medstream_ready":
                key = "ready"
            elif sample.name == "medstream_timers_stopped":
                key = "timers_stopped"
            if key is not None:
                values[key] = values.get(key, 0.0) + sample.value
    return values


def _reports_lag(name: str) -> bool:
    return name == "sink" or name.startswith("streams-")


def lag_summary(current: Snapshot, raw_topics: frozenset[str]) -> str:
    """``lag N`` summed over the stream workers and the sink, or ``lag ?`` with the reason
    when it is not known: a worker or the sink not running, not scraped since its start or
    without its partitions, or no worker reporting the lag of a raw topic (a worker leaves
    out a topic with a partition of unknown high watermark; the sink's lag on the raw topics
    it reads for its ledger does not stand in for it). Never a sum of what happens to be
    there."""
    readings = {name: r for name, r in current.children.items() if _reports_lag(name)}
    unknown = [
        f"{name} {reading.state if reading.state != 'running' else 'not ready'}"
        for name, reading in sorted(readings.items())
        if reading.state != "running" or reading.values.get("ready", 0.0) < 1
    ]
    # The workers' own reports only: the sink reads the raw topics too (for its ledger).
    reported = {
        key.removeprefix("lag:") for name, reading in readings.items()
        if name.startswith("streams-") for key in reading.values if key.startswith("lag:")
    }
    if not unknown and raw_topics - reported:
        unknown.append(f"no lag reported for {', '.join(sorted(raw_topics - reported))}")
    if unknown:
        return f"lag ? ({'; '.join(unknown)})"
    total = sum(
        value for reading in readings.values()
        for key, value in reading.values.items() if key.startswith("lag:")
    )
    return f"lag {total:.0f}"


def rate(previous: Snapshot, current: Snapshot, key: str) -> float:
    """Per second between two snapshots, summed over components; for one restarted in
    between (its counters started again at 0) its rate since the restart, never negative."""
    elapsed = max(current.at - previous.at, 1e-6)
    total = 0.0
    for name, reading in current.children.items():
        now = reading.values.get(key, 0.0)
        before = previous.children.get(name)
        if before is not None and before.since == reading.since:
            total += max(0.0, now - before.values.get(key, 0.0)) / elapsed
        elif reading.since is not None:
            since_start = now - reading.earlier.get(key, 0.0)
            total += since_start / max(current.at - reading.since, 1e-6)
    return total


def status_line(
    previous: Snapshot, current: Snapshot, raw_topics: frozenset[str] = frozenset()
) -> str:
    """One line: events/s per stage, lag, dead letters, alerts, published."""

    def per_s(key: str) -> float:
        return rate(previous, current, key)

    v = current.values
    return (
        f"[{datetime.now().strftime('%H:%M:%S')}] "
        f"simulator {per_s('out:simulator'):7.0f} msg/s | "
        f"collectors {per_s('out:collector'):6.0f} msg/s | "
        f"normalise {per_s('in:normalise'):6.0f} msg/s -> {per_s('out:normalise'):7.0f} rec/s | "
        f"sink {per_s('out:sink'):7.0f} rows/s | {lag_summary(current, raw_topics)} | "
        f"dead letters {v.get('dlq', 0):.0f} | alerts {v.get('alerts', 0):.0f} | "
        f"published {v.get('out:simulator', 0) + v.get('out:collector', 0):.0f}"
    )


def restarts_summary(restarts: dict[str, int]) -> str:
    """`` | restarts streams-0=2 sink=1`` for the status line; empty when none."""
    done = [f"{name}={count}" for name, count in sorted(restarts.items()) if count]
    return f" | restarts {' '.join(done)}" if done else ""


# How long each component may take to stop: the simulator flushes its producer for up to
# 60 s, the sink drains for up to 20 s and then stores what it read.
#: With --exit-when-done, the stored counts (events, alerts, dead letters) must hold still
#: this long before the run counts as drained.
DRAIN_QUIET_S = 3.0
STOP_TIMEOUT_S = {"simulator": 75.0, "collector": 75.0, "streams": 30.0, "sink": 60.0}
#: After a second stop request each component gets at most this long.
STOP_NOW_TIMEOUT_S = 10.0
#: How often the supervisor looks at its components (status lines come less often).
TICK_S = 0.5
#: How long `up` asks the stream workers to confirm their timers stopped (a tick under way
#: finishes well within it), how often it asks, and how long what the last ticks published
#: then has to reach the broker (beyond the producer's linger).
TIMERS_CONFIRM_S = 10.0
TIMERS_POLL_S = 0.5
TIMERS_SETTLE_S = 1.0


class ComponentFailed(RuntimeError):
    """A component died or never became ready."""


class Supervisor:
    """Runs the whole pipeline on embedded defaults (or on configured servers)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        clickhouse: ClickHouseSettings,
        runtime: RuntimeSettings,
        streams: StreamSettings,
        out: Callable[[str], None] = print,
        on_drained: Callable[[Callable[[str], QueryResult]], None] | None = None,
        collectors: list[CollectorSpec] | None = None,
        simulate: bool = True,
        console: ConsoleSettings | None = None,
        metrics_port: int = 0,
    ) -> None:
        self.kafka = kafka
        self.metrics_port = metrics_port
        self.metrics_url: str | None = None
        self.console = console
        self.console_url: str | None = None
        self.collectors = collectors or []
        self.simulate = simulate
        self.clickhouse = clickhouse
        self.runtime = runtime
        self.streams = streams
        self.out = out
        self.on_drained = on_drained
        self._last_drain_state: tuple[object, ...] | None = None
        self._drain_state_since = 0.0
        self.broker: Broker | None = None
        self.children: list[Child] = []
        self._env: dict[str, str] = {}
        self.query_url: str | None = None
        self._stop = threading.Event()
        self._stop_now = threading.Event()
        self._stop_now_at = 0.0  # when the second stop request came (monotonic)
        #: The Kafka settings the components use (the embedded broker's address), once set.
        self._client_kafka: KafkaSettings | None = None
        self._clickhouse_url = ""
        self._broker_restart = RestartPolicy()
        self._broker_lost_records = False  # a memory-only broker died during this run
        self._running = False  # every component started (a stop then drains first)
        # Worker processes that confirmed their timers stopped, and those said not to.
        self._timers_confirmed: set[tuple[str, int | None, float | None]] = set()
        self._timers_unconfirmed: set[tuple[str, int | None, float | None]] = set()

    def request_stop(self, *_: object) -> None:
        """Signal handler: stop at the next tick (draining); a second signal stops at once."""
        if self._stop.is_set() and not self._stop_now.is_set():
            self._stop_now_at = time.monotonic()
            self._stop_now.set()
        self._stop.set()

    def run(
        self,
        events: int,
        rate: float,
        seed: int,
        labels: Path | None,
        exit_when_done: bool,
        done_timeout_s: float = 600,
    ) -> int:
        """Start everything, supervise, stop; returns the process exit code."""
        data_dir = self.runtime.data_dir
        os.umask(0o077)  # every file `up` and its components create is owner-only
        warning = private_data_dir(data_dir)
        if warning:
            self.out(f"warning: {warning}")
        existing = RuntimeState.read(self.runtime)
        if existing is not None:
            self.out(f"medstream is already running for {data_dir} (pid {existing.pid})")
            return 2
        try:
            created = ensure_data_dir_secrets(data_dir)
        except SecretRefused as exc:
            self.out(f"error: {exc}")
            return 2
        for path in created:
            self.out(f"created a random key, {path} (owner-only): back it up with the data")
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGTERM, self.request_stop)
        try:
            port = serve_metrics(self.metrics_port, self.runtime.metrics_host)
        except OSError as exc:
            self.out(
                f"error: `up` cannot serve its metrics on port {self.metrics_port} "
                f"({exc.strerror}); choose another with --metrics-port (0 = a free one)"
            )
            return 2
        self.metrics_url = f"http://127.0.0.1:{port}/metrics"
        try:
            code = self._run(events, rate, seed, labels, exit_when_done, done_timeout_s)
        except ComponentFailed as exc:
            self.out(f"error: {exc}")
            code = 1
        except BaseException:
            self._shutdown()
            raise
        clean = self._shutdown()
        return code if clean else max(code, 1)

    def _run(
        self,
        events: int,
        rate: float,
        seed: int,
        labels: Path | None,
        exit_when_done: bool,
        done_timeout_s: float,
    ) -> int:
        data_dir = self.runtime.data_dir
        bootstrap = self.kafka.bootstrap_servers
        broker_kind: str = self.kafka.broker_kind
        if self.kafka.embedded:
            try:
                self.broker = start_embedded_broker(self.runtime, self.out)
            except EmbeddedRuntimeError as exc:
                raise ComponentFailed(str(exc)) from exc
            bootstrap = self.broker.bootstrap_servers
            broker_kind = self.broker.kind
            COMPONENT_RESTARTS.labels("broker")  # shown at 0 until it dies
            self.out(describe_broker(self.broker))
        kafka = self.kafka.model_copy(
            update={"bootstrap_servers": bootstrap, "broker_kind": broker_kind}
        )
        try:
            self.streams.check_broker(kafka)
        except ValueError as exc:
            raise ComponentFailed(str(exc)) from exc
        if self.streams.exactly_once:
            self.out("stream processing: exactly_once (Kafka transactions, read_committed)")
        created = ensure_topics(kafka)
        self._client_kafka = kafka
        self.out(f"topics ready ({len(created)} created)")
        ch_url = clickhouse_url(self.clickhouse, self.runtime)
        self._clickhouse_url = ch_url
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "MEDSTREAM_KAFKA_BROKER_KIND": broker_kind,
            "MEDSTREAM_STREAMS_PROCESSING_GUARANTEE": self.streams.processing_guarantee,
            "CLICKHOUSE_URL": ch_url,
            "MEDSTREAM_DATA_DIR": str(data_dir.resolve()),
            "PYTHONUNBUFFERED": "1",
        }
        # A restarted sink serves on the same port (and writes a new token): the address in
        # runtime.json and the console's --query-url stay right.
        query_port = free_port()
        sink = self._start(
            Child("sink", ["sink", "--query-port", str(query_port)], free_port(),
                  restartable=True),
            env,
        )
        try:
            if not wait_for_port(query_port, 120, sink.process, cancelled=self._stop.is_set):
                return 0  # stopped while starting
        except RuntimeError as exc:
            log = self.runtime.data_dir / "sink.log"
            raise ComponentFailed(f"the sink did not start ({exc}); its log: {log}") from exc
        self.query_url = f"http://127.0.0.1:{query_port}/query"
        self.out(f"ClickHouse {ch_url} migrated; query endpoint {self.query_url}")
        self._restore_alerts(kafka)
        for index in range(self.streams.workers):
            self._start(
                Child(f"streams-{index}", ["streams"], free_port(), restartable=True), env
            )
        if not self._wait_ready(1 + self.streams.workers, timeout_s=120):
            return 0  # stopped while starting
        self._env = env
        if self.console:
            if not self._start_console(kafka, env):
                return 0  # stopped while starting
        for spec in self.collectors:
            self._start(
                Child(
                    f"collector-{spec.name}",
                    ["collect", spec.kind, "--config", str(spec.config)],
                    free_port(),
                    restartable=True,
                ),
                env,
            )
            self.out(f"collector {spec.name} ({spec.kind}) from {spec.config}")
        started_at = datetime.now(tz=UTC)
        simulator: Child | None = None
        if self.simulate:
            simulate = [
                "simulate", "--events", str(events), "--rate", str(rate), "--seed", str(seed),
                "--report", str((data_dir / "simulator-report.json").resolve()),
            ]
            (data_dir / "simulator-report.json").unlink(missing_ok=True)
            if labels is not None:
                simulate += ["--labels", str(labels.resolve())]
            simulator = self._start(
                Child("simulator", simulate, free_port(), expected_exit=True,
                      final_report=data_dir / "simulator-report.json"),
                env,
            )
        self._write_state()
        self._running = True
        self.out(
            f"running: {len(self.children)} processes; metrics at "
            + ", ".join(f"{c.name}={c.metrics_url}" for c in self.children)
            + f", up={self.metrics_url}"
        )
        self.out("press Ctrl-C to stop")
        raw_topics = frozenset(kafka.topic(name) for name in RAW_TOPICS.values())
        previous = scrape(self.children)
        done_deadline: float | None = None
        next_status = time.monotonic() + self.runtime.status_interval_s
        # A short tick: a component that died is started again on time, not only at the next
        # status line.
        while not self._stop.wait(min(TICK_S, self.runtime.status_interval_s)):
            self._tend_broker()
            self._restart_dead()
            died = [c for c in self.children if self._died(c) and not c.restartable]
            if died:
                for child in died:
                    code = child.process.returncode if child.process else None
                    log = self.runtime.data_dir / f"{child.name}.log"
                    self.out(f"{child.name} died with exit code {code}; see {log}")
                return 1
            if time.monotonic() < next_status:
                continue
            next_status = time.monotonic() + self.runtime.status_interval_s
            current = scrape(self.children)
            self.out(
                status_line(previous, current, raw_topics)
                + restarts_summary(self.restart_counts())
            )
            previous = current
            if (
                exit_when_done
                and simulator is not None
                and simulator.process is not None
                and simulator.process.poll() == 0
            ):
                done_deadline = done_deadline or time.monotonic() + done_timeout_s
                verdict = self._drained(started_at)
                if verdict is not None:
                    self.out(verdict[1])
                    return 0 if verdict[0] else 1
                if time.monotonic() > done_deadline:
                    self.out("timed out waiting for the pipeline to drain")
                    return 1
        return 0

    def _restore_alerts(self, kafka: KafkaSettings) -> None:
        """Offer the unresolved alerts ClickHouse holds to the alert lifecycle before any
        worker starts: after a broker that kept nothing (tansu), alerts opened before the
        restart can still be acknowledged, resolved and escalated. A lifecycle that kept
        its changelog ignores what it knows."""
        from medstream.alert_actions import AlertActionError, restore_lifecycle
        from medstream.settings import RegistrySettings
        from schemas.serde import registry_from_url

        url = self.query_url
        assert url is not None
        try:
            offered = restore_lifecycle(
                lambda sql: query_via_gateway(
                    url, sql, 60, PROOF_MAX_ROWS,
                    token=read_query_token(self.runtime.query_token_file),
                ),
                self.clickhouse.database, kafka, registry_from_url(RegistrySettings().url),
            )
        except (QueryError, AlertActionError, OSError) as exc:
            self.out(
                f"warning: unresolved alerts were not restored to the alert lifecycle ({exc}); "
                "alerts opened before this start may refuse acknowledgement until "
                "`medstream alerts restore` succeeds"
            )
            return
        if offered:
            self.out(f"alert lifecycle: {offered} unresolved alerts offered from ClickHouse")

    def _start_console(self, kafka: KafkaSettings, env: dict[str, str]) -> bool:
        """Start the alert console once the sink serves queries; print its address (and the
        first admin's password when no user exists yet). False when stopped meanwhile."""
        assert self.console is not None and self.query_url is not None
        store = UserStore(self.console.users_path(self.runtime))
        if not store.users():
            password = secrets.token_urlsafe(12)
            audit_key = resolve_secret(AUDIT_KEY, AuditSettings().key, self.runtime.data_dir)
            trail = AuditTrail(kafka, key=audit_key)
            try:
                trail.record(
                    actor="medstream", actor_role="operator", channel="cli",
                    action="config_change", outcome="ok", target="user:admin",
                    detail="first admin created by `medstream up`",
                )
            except AuditError as exc:
                raise ComponentFailed(f"the first console user was not created: {exc}") from exc
            finally:
                trail.close()
            store.add("admin", "admin", [ALL_ORGANISATIONS], password)
            self.out(
                f"created the first console user: admin / {password} (change it with "
                "`medstream users set admin --password`; add users with `medstream users add`)"
            )
        port = self.console.port or free_port()
        host = self.console.host
        if not port_free(host, port):
            chosen = free_port()
            self.out(f"console port {port} is in use; serving the console on {chosen}")
            port = chosen
        console = self._start(
            Child("console", ["console", "--port", str(port), "--query-url", self.query_url],
                  free_port(), restartable=True),
            env,
        )
        probe_host = "127.0.0.1" if host in ("0.0.0.0", "", "localhost") else host
        probe_host = "[::1]" if probe_host in ("::", "::1") else probe_host
        health = f"http://{probe_host}:{port}/healthz"
        deadline = time.monotonic() + 60
        while True:
            if self._stop.is_set():
                return False
            if self._died(console):
                log = self.runtime.data_dir / "console.log"
                raise ComponentFailed(f"the console did not start; its log: {log}")
            try:
                with urllib.request.urlopen(health, timeout=2) as response:
                    if response.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise ComponentFailed(f"the console did not become ready on port {port}")
            time.sleep(0.2)
        self.console_url = f"http://{probe_host}:{port}/"
        self.out(f"alert console: {self.console_url}")
        return True

    def restart_counts(self) -> dict[str, int]:
        """Restarts in this run of `up`, by component (``broker`` for the embedded broker)."""
        counts = {child.name: child.restart.total for child in self.children}
        if self.broker is not None:
            counts["broker"] = self._broker_restart.total
        return counts

    def _restart_dead(self) -> None:
        """A component that died is started again after a growing pause (1 s .. 60 s): a
        collector resumes from the source position it last committed, a stream worker and
        the sink from their groups' committed offsets, so nothing accepted is lost; the
        console reloads its alerts from ClickHouse. One that keeps failing soon after its
        start is given up (reported as died: `up` stops, draining what it can)."""
        if not self._env:
            return  # still starting: a component that dies now fails the start
        now = time.monotonic()
        for child in self.children:
            if not child.restartable or not self._died(child):
                continue
            if child.process is not None and child.process.returncode == 2:
                child.restartable = False  # a configuration error: restarting cannot fix it
                continue
            if child.restart.due_at is None:
                pause = child.restart.schedule(now)
                if pause is None:
                    child.restartable = False
                    self.out(
                        f"{child.name} failed {child.restart.quick + 1} times in a row within "
                        f"{HEALTHY_RUN_S:.0f}s of starting; giving up"
                    )
                    continue
                code = child.process.returncode if child.process else None
                log = self.runtime.data_dir / f"{child.name}.log"
                self.out(
                    f"{child.name} exited with code {code}; restarting it in {pause:.0f}s "
                    f"(see {log})"
                )
            elif child.restart.due(now):
                self._start(child, self._env, restart=True)
                COMPONENT_RESTARTS.labels(child.name).inc()
                self.out(f"{child.name} restarted (restart {child.restart.total})")
                self._write_state()

    def _tend_broker(self) -> None:
        """Start the embedded broker again when it died (never stop it for a component).

        Apache Kafka comes back on the same data directory and port, with everything it
        had; the clients reconnect by themselves. tansu keeps records in memory only: what
        it had accepted and was not yet stored is lost, said plainly, and `up` exits
        non-zero at the end; the workers and the sink start afresh on the empty broker.
        """
        broker = self.broker
        if broker is None or broker.alive():
            return
        now = time.monotonic()
        if self._broker_restart.due_at is None:
            code = broker.process.returncode if broker.process is not None else None
            pause = self._broker_restart.schedule(now)
            if pause is None:
                raise ComponentFailed(
                    f"the embedded broker failed {MAX_QUICK_RESTARTS + 1} times in a row; "
                    f"giving up (see {broker.log_path})"
                )
            if broker.kind == "tansu":
                self._broker_lost_records = True
                self.out(
                    f"the embedded tansu broker died (exit code {code}): the records it had "
                    "accepted and the sink had not stored yet are LOST (tansu keeps them in "
                    f"memory only); restarting it empty in {pause:.0f}s (see {broker.log_path})"
                )
            else:
                self.out(
                    f"the embedded Apache Kafka broker died (exit code {code}); restarting it "
                    f"on the same data directory and port in {pause:.0f}s (its data is kept; "
                    f"see {broker.log_path})"
                )
            return
        if not self._broker_restart.due(now):
            return
        try:
            broker.restart()
        except EmbeddedRuntimeError as exc:
            self.out(f"the embedded broker did not start again ({exc})")
            self._broker_restart.started(now, restart=True)  # counts as a quick failure
            return
        self._broker_restart.started(now, restart=True)
        COMPONENT_RESTARTS.labels("broker").inc()
        self.out(f"the embedded broker runs again on {broker.bootstrap_servers}")
        if broker.kind == "tansu" and self._client_kafka is not None:
            ensure_topics(self._client_kafka)
            # They read from a cluster that no longer exists: start them on the new one.
            for child in self.children:
                if child.name == "sink" or child.name.startswith("streams-"):
                    self._stop_child(child, timeout_s=10.0)
                    self._start(child, self._env)
        self._write_state()

    def _write_state(self) -> None:
        """Publish endpoints and process ids for commands beside `up` (and after a restart)."""
        pids = {
            c.name: c.process.pid
            for c in self.children
            if c.process is not None and c.process.poll() is None
        }
        if self.broker is not None and self.broker.process is not None:
            pids["broker"] = self.broker.process.pid
        assert self._client_kafka is not None
        metrics = {c.name: c.metrics_url for c in self.children}
        if self.metrics_url is not None:
            metrics["up"] = self.metrics_url
        RuntimeState(
            os.getpid(),
            self._client_kafka.bootstrap_servers,
            self.query_url,
            metrics,
            self._clickhouse_url,
            self.console_url,
            self._client_kafka.broker_kind,
            pids,
        ).write(self.runtime.runtime_file)

    def _drained(self, since: datetime) -> tuple[bool, str] | None:
        """After the simulator finished: the reconcile verdict once nothing is in flight."""
        from medstream.published import published_files
        from medstream.reconcile import reconcile

        assert self.query_url is not None
        url = self.query_url
        token_file = self.runtime.query_token_file

        def query(sql: str):  # type: ignore[no-untyped-def]
            token = read_query_token(token_file)  # a restarted sink writes a new one
            return query_via_gateway(url, sql, max_rows=PROOF_MAX_ROWS, token=token)

        try:
            # The publishers' own counters: what they had acknowledged must be in the ledger
            # before the run counts as drained, whatever the sink has seen.
            report = reconcile(
                query, self.clickhouse.database, since, datetime.now(tz=UTC),
                counter_files=(
                    [] if getattr(self, "_counters_unreadable", False)
                    else published_files(self.runtime.data_dir)
                ),
            )
            totals = query(
                f"SELECT (SELECT count() FROM {self.clickhouse.database}.alert), "
                f"(SELECT count() FROM {self.clickhouse.database}.dead_letter)"
            ).rows[0]
        except QueryTokenMissing:  # the exiting sink removed it, the new one has not written it
            self.out("reconcile not possible right now: the sink is restarting; retrying")
            return None
        except (QueryError, OSError) as exc:  # a busy or restarting gateway: ask again
            self.out(f"reconcile not possible right now ({exc}); retrying")
            return None
        if report.unreadable_counters:  # a damaged counter file: drain without the counters
            self.out(
                "warning: the publishers' counter files cannot be read "
                f"({', '.join(report.unreadable_counters)}); the drain check goes on "
                "without them (`medstream reconcile` reports it as a gap)"
            )
            self._counters_unreadable = True
            return None
        published = sum(s.published_messages for s in report.sources)
        if not report.drained or published < self._published_messages():
            self._last_drain_state = None
            return None  # still in flight: try again at the next tick
        # Alerts and dead letters are not in the lineage proof: done only once nothing
        # changed for DRAIN_QUIET_S (an alert takes one more hop, the lifecycle agent, than
        # the event that raised it; one short status tick can pass before it is stored).
        state = (published, tuple(sorted(report.stored_events.items())), *totals)
        if state != self._last_drain_state:
            self._last_drain_state = state
            self._drain_state_since = time.monotonic()
            return None
        if time.monotonic() - self._drain_state_since < DRAIN_QUIET_S:
            return None
        if self.on_drained is not None:
            self.on_drained(query)
        return report.ok, report.render()

    def _wait_ready(self, components: int, timeout_s: float) -> bool:
        """Hold the producers back until the sink and every worker have their partitions.

        Returns False when a stop was requested meanwhile.
        """
        deadline = time.monotonic() + timeout_s
        while scrape(self.children).values.get("ready", 0) < components:
            if self._stop.is_set():
                return False
            died = [c.name for c in self.children if self._died(c)]
            if died:
                logs = ", ".join(str(self.runtime.data_dir / f"{name}.log") for name in died)
                raise ComponentFailed(f"{', '.join(died)} died while starting; see {logs}")
            if time.monotonic() > deadline:
                raise ComponentFailed("components did not join their consumer groups in time")
            time.sleep(0.2)
        self.out(f"sink and {components - 1} stream worker(s) have their partitions")
        return True

    def _published_messages(self) -> int:
        """Messages the finished simulator reported as acknowledged by the broker."""
        messages = _reported_messages(self.runtime.data_dir / "simulator-report.json")
        return 1 if messages is None else messages  # no report yet: at least one message

    def _died(self, child: Child) -> bool:
        if child.process is None:
            return False
        code = child.process.poll()
        if code is None:
            return False
        return not (child.expected_exit and code == 0)

    def _start(self, child: Child, env: dict[str, str], restart: bool = False) -> Child:
        log_path = self.runtime.data_dir / f"{child.name}.log"
        child.restart.started(time.monotonic(), restart)
        COMPONENT_RESTARTS.labels(child.name)  # every component shows, at 0 until it dies
        with log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
            child.process = subprocess.Popen(
                [
                    sys.executable, "-m", "medstream", *child.args,
                    "--metrics-port", str(child.metrics_port),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Ctrl-C reaches the supervisor only; it stops the children in order.
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        if child not in self.children:
            self.children.append(child)
        return child

    def _stop_child(self, child: Child, timeout_s: float, signalled: bool = False) -> bool:
        """SIGTERM (unless ``signalled`` already: a second one cuts a component's own
        shutdown short), wait, SIGKILL after ``timeout_s``, or STOP_NOW_TIMEOUT_S after a
        second stop request; False when it had to be killed."""
        process = child.process
        if process is None or process.poll() is not None:
            return True
        if not signalled:
            process.send_signal(signal.SIGTERM)
        signalled_at = time.monotonic()
        deadline = signalled_at + timeout_s
        while process.poll() is None:
            if self._stop_now.is_set():  # waited in short slices so that this is seen
                deadline = min(deadline, max(self._stop_now_at, signalled_at) + STOP_NOW_TIMEOUT_S)
            now = time.monotonic()
            if now >= deadline:
                limit = (
                    f"{STOP_NOW_TIMEOUT_S:.0f}s of the second stop request"
                    if self._stop_now.is_set() else f"{timeout_s:.0f}s"
                )
                self.out(f"{child.name} did not stop within {limit}; killing it")
                process.kill()
                process.wait()
                return False
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=min(TICK_S, deadline - now))
        return True

    def _stop_all(self, children: list[Child]) -> list[str]:
        """Stop these children together (none is restarted any more); the names of those
        that had to be killed."""
        for child in children:
            child.restartable = False
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        killed = []
        for child in children:
            timeout = STOP_TIMEOUT_S.get(child.name.split("-")[0], 30.0)
            if not self._stop_child(child, timeout, signalled=True):
                killed.append(child.name)
        return killed

    def _drain(self, deadline: float, quiet: bool = False) -> bool:
        """Keep the workers and the sink running (restarting them if they die) until their
        groups have committed every record in their topics, the drain deadline (one for
        the whole stop) is up, or a second stop request came; a progress line every status
        interval. True when drained. ``quiet``: no "drained" line (said once already);
        workers that became ready meanwhile are told to stop their timers."""
        kafka = self._client_kafka
        assert kafka is not None
        groups = pipeline_groups(kafka, self.streams.app_id, SinkSettings().group_id)
        timeout_s = self.runtime.drain_timeout_s
        started = time.monotonic()
        next_line = started
        while True:
            if quiet:
                self._tell_timers_stopped([c for c in self.children
                                           if c.name.startswith("streams")], deadline)
            try:
                backlog: Backlog | None = self._measure_unless_stopped_now(groups)
            except BacklogUnknown as exc:
                backlog, unknown = None, str(exc)
            if backlog is not None and backlog.total == 0:
                if time.monotonic() - started > 1.0 and not quiet:
                    self.out("drained: every accepted record is stored")
                return True
            left = (
                f"{backlog.total:,} records still to store ({backlog.parts()})"
                if backlog is not None
                else f"unknown records still to store ({unknown})"
            )
            now = time.monotonic()
            if self._stop_now.is_set():
                self.out(f"second stop request: not waiting for {left}")
                return False
            if now >= deadline:
                self.out(
                    f"drain timeout ({timeout_s:.0f}s, MEDSTREAM_DRAIN_TIMEOUT_S or "
                    f"--drain-timeout) reached with {left}"
                )
                return False
            if now >= next_line:
                spent = timeout_s - (deadline - now)
                self.out(f"draining: {left} ... {spent:.0f}s of {timeout_s:.0f}s")
                next_line = now + self.runtime.status_interval_s
            try:
                self._tend_broker()
            except ComponentFailed as exc:
                self.out(f"error: {exc}")
                return False
            self._restart_dead()
            self._stop_now.wait(TICK_S)

    def _stop_timers(self, workers: list[Child], deadline: float | None = None) -> bool:
        """See :meth:`_tell_timers_stopped`; from now on a worker started or restarted
        starts with its timers stopped (MEDSTREAM_STREAMS_TIMERS_STOPPED)."""
        if self._env:
            self._env[TIMERS_STOPPED_ENV] = "1"
        return self._tell_timers_stopped(workers, deadline)

    def _tell_timers_stopped(self, workers: list[Child], deadline: float | None = None) -> bool:
        """Ask the running stream workers to stop making timer output (SIGUSR2: device
        silence, escalations, feed watch) until each confirms it (medstream_timers_stopped
        1: stopped, no tick under way; the signal is sent again meanwhile, as one sent
        before a worker's handler was installed is lost), at most TIMERS_CONFIRM_S and not
        past ``deadline``, then give what the last ticks published TIMERS_SETTLE_S to reach
        the broker, so that the drain after it leaves nothing they made for the alert
        lifecycle unread. A worker process that confirmed is not asked again; one that did
        not in time is said once. False when no worker runs or a second stop request came."""
        # Only those scraped since they started: their SIGUSR2 is handled (`medstream
        # streams` ignores it from its start; by default it would end the process).
        running = [c for c in workers if c.state() == "running"]
        if not running or self._stop_now.is_set():
            return False
        pending = [c for c in running if _process_key(c) not in self._timers_confirmed]
        if not pending:
            return True
        until = time.monotonic() + TIMERS_CONFIRM_S
        if deadline is not None:
            until = min(until, deadline)
        confirmed = 0
        while pending:
            for child in pending:
                assert child.process is not None
                child.process.send_signal(signal.SIGUSR2)
            if self._stop_now.wait(TIMERS_POLL_S):
                return False
            scrape(pending)
            for child in pending:
                if child.last_values.get("timers_stopped") == 1.0:
                    self._timers_confirmed.add(_process_key(child))
                    confirmed += 1
            pending = [c for c in pending if c.state() == "running"
                       and _process_key(c) not in self._timers_confirmed]
            if pending and time.monotonic() >= until:
                unsaid = [c for c in pending if _process_key(c) not in self._timers_unconfirmed]
                if unsaid:
                    self.out(
                        f"{', '.join(c.name for c in unsaid)} did not confirm within "
                        f"{TIMERS_CONFIRM_S:.0f}s that their timers stopped: what they make from "
                        "now on may be left for the next run"
                    )
                self._timers_unconfirmed.update(_process_key(c) for c in unsaid)
                break
        return not (confirmed and self._stop_now.wait(TIMERS_SETTLE_S))

    def _measure_unless_stopped_now(self, groups: list[ConsumerGroup]) -> Backlog:
        """measure_backlog (at most 5 s) in a thread a second stop request does not wait for."""
        assert self._client_kafka is not None
        kafka = self._client_kafka
        answer: list[Backlog | BacklogUnknown] = []

        def measure() -> None:
            try:
                answer.append(measure_backlog(kafka, groups, timeout_s=5.0))
            except BacklogUnknown as exc:
                answer.append(exc)

        worker = threading.Thread(target=measure, name="backlog", daemon=True)
        worker.start()
        while worker.is_alive() and not self._stop_now.is_set():
            worker.join(TICK_S)
        if not answer:
            raise BacklogUnknown("not measured: a second stop request came")
        if isinstance(answer[0], BacklogUnknown):
            raise answer[0]
        return answer[0]

    def _left_unstored(self) -> str | None:
        """After the workers and the sink stopped: what the broker accepted and the pipeline
        did not store, and where it is now; None when nothing."""
        if self._client_kafka is None:
            return None  # no broker, no topics: nothing was accepted
        kafka = self._client_kafka
        groups = pipeline_groups(kafka, self.streams.app_id, SinkSettings().group_id)
        try:
            # Bounded by the second stop request's limit too: what is left is still said.
            timeout_s = STOP_NOW_TIMEOUT_S if self._stop_now.is_set() else 10.0
            backlog = measure_backlog(kafka, groups, timeout_s=timeout_s)
        except BacklogUnknown as exc:
            return f"what is left unstored cannot be told: {exc}"
        if backlog.total == 0:
            return None
        topics = ", ".join(f"{topic} {count:,}" for topic, count in backlog.by_topic().items())
        if self.broker is None:
            kept = f"they stay in the topics on {kafka.bootstrap_servers}: the next run stores them"
        elif self.broker.kind == "kafka":
            kept = (
                f"Apache Kafka keeps them under {self.runtime.data_dir / 'kafka'}: the next "
                "`medstream up` on this data directory stores them"
            )
        else:
            kept = "tansu keeps them in memory only: they are LOST as it stops now"
        return (
            f"{backlog.total:,} accepted records NOT stored ({backlog.parts()}; by topic: "
            f"{topics}); {kept}"
        )

    def _shutdown(self) -> bool:
        """Stop the producers; drain the topics into ClickHouse (bounded); stop the stream
        workers, then the sink, then say what is left unstored; then stop Kafka.

        Returns False when a component failed or had to be killed, or when something
        accepted is not stored.
        """
        def stage(child: Child) -> int:
            if child.name in ("simulator", "console") or child.name.startswith("collector-"):
                return 0
            return 1 if child.name.startswith("streams") else 2

        killed = self._stop_all([c for c in self.children if stage(c) == 0])
        if self._running and self._stop_now.is_set():
            self.out("second stop request: stopping without draining")
        elif self._running:
            deadline = time.monotonic() + self.runtime.drain_timeout_s
            if self._drain(deadline) and self._stop_timers(
                [c for c in self.children if stage(c) == 1], deadline
            ):
                self._drain(deadline, quiet=True)
        killed += self._stop_all([c for c in self.children if stage(c) == 1])
        killed += self._stop_all([c for c in self.children if stage(c) == 2])
        unstored = self._left_unstored()
        if self.broker is not None:
            self.broker.stop()
        try:
            self.runtime.runtime_file.unlink()
        except FileNotFoundError:
            pass
        self.runtime.query_token_file.unlink(missing_ok=True)  # a killed sink left it
        failed = [
            c
            for c in self.children
            if self._died(c) and c.process and c.process.returncode not in (0, -15)
        ]
        if self._broker_lost_records:
            self.out(
                "the embedded tansu broker died during this run: the records it had accepted "
                "and that were not yet stored were lost"
            )
        if unstored is not None:
            self.out(f"stopped with {unstored}")
        if failed or killed:
            names = sorted(
                {*(f"{c.name} (exit code {c.process.returncode})" for c in failed if c.process),
                 *(f"{name} (killed)" for name in killed)}
            )
            self.out("stopped; components that failed: " + ", ".join(names))
            return False
        if unstored is not None or self._broker_lost_records:
            return False
        self.out("stopped cleanly")
        return True
