"""`medstream up`: start every component as its own process, print live status, stop cleanly.

Process layout (each a separate OS process): the embedded broker (Apache Kafka, or tansu
without Java; embedded mode only), one
sink, N Faust stream workers, the alert console, the collectors and the simulator. The sink
is also the one process that opens the embedded ClickHouse engine (chdb allows a single
process per engine path), so it serves the read-only query endpoint that `medstream sql`,
`medstream reconcile` and the console use while the pipeline runs. The supervisor itself
opens no engine.
"""

from __future__ import annotations

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
from medstream.clickhouse import PROOF_MAX_ROWS, QueryError, QueryResult
from medstream.keys import AUDIT_KEY, SecretRefused, ensure_data_dir_secrets, resolve_secret
from medstream.query_endpoint import query_via_gateway, read_query_token
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
    AuditSettings,
    ClickHouseSettings,
    ConsoleSettings,
    KafkaSettings,
    RuntimeSettings,
    StreamSettings,
    clickhouse_url,
)


@dataclass
class Child:
    """One supervised component process."""

    name: str
    args: list[str]
    metrics_port: int
    process: subprocess.Popen[bytes] | None = None
    expected_exit: bool = False  # the simulator may finish on its own
    restartable: bool = False  # collectors resume from their committed source position
    restarts: int = 0  # consecutive restarts after short runs
    restart_at: float | None = None
    started_at: float = 0.0
    last_values: dict[str, float] = field(default_factory=dict)

    @property
    def metrics_url(self) -> str:
        """Its /metrics endpoint."""
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


@dataclass
class Snapshot:
    """Counter values scraped from every child at one moment."""

    at: float
    values: dict[str, float] = field(default_factory=dict)


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
    """Sum the counters the status line shows across children (a finished one keeps its last)."""
    snapshot = Snapshot(time.monotonic())
    for child in children:
        if child.process is not None and child.process.poll() is None:
            try:
                with urllib.request.urlopen(child.metrics_url, timeout=1) as response:
                    child.last_values = _status_values(response.read().decode())
            except OSError:  # a status line only: the last values stand until the next scrape
                pass
        for key, value in child.last_values.items():
            snapshot.values[key] = snapshot.values.get(key, 0.0) + value
    return snapshot


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
                    key = "lag"
                elif sample.name == "medstream_ready":
                    key = "ready"
                if key is not None:
                    values[key] = values.get(key, 0.0) + sample.value
    return values


def status_line(previous: Snapshot, current: Snapshot) -> str:
    """One line: events/s per stage, lag, dead letters, alerts."""
    elapsed = max(current.at - previous.at, 1e-6)

    def rate(key: str) -> float:
        return (current.values.get(key, 0.0) - previous.values.get(key, 0.0)) / elapsed

    v = current.values
    return (
        f"[{datetime.now().strftime('%H:%M:%S')}] "
        f"simulator {rate('out:simulator'):7.0f} msg/s | "
        f"collectors {rate('out:collector'):6.0f} msg/s | "
        f"normalise {rate('in:normalise'):6.0f} msg/s -> {rate('out:normalise'):7.0f} rec/s | "
        f"sink {rate('out:sink'):7.0f} rows/s | lag {v.get('lag', 0):.0f} | "
        f"dead letters {v.get('dlq', 0):.0f} | alerts {v.get('alerts', 0):.0f} | "
        f"published {v.get('out:simulator', 0) + v.get('out:collector', 0):.0f}"
    )


# How long each component may take to stop: the simulator flushes its producer for up to
# 60 s, the sink drains for up to 20 s and then stores what it read.
# A collector that exits is restarted; after this many restarts in a row, each following a
# run shorter than HEALTHY_RUN_S, it is reported as failed and `up` stops.
MAX_QUICK_RESTARTS = 8
HEALTHY_RUN_S = 300.0
#: With --exit-when-done, the stored counts (events, alerts, dead letters) must hold still
#: this long before the run counts as drained.
DRAIN_QUIET_S = 3.0
STOP_TIMEOUT_S = {"simulator": 75.0, "collector": 75.0, "streams": 30.0, "sink": 60.0}


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
    ) -> None:
        self.kafka = kafka
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

    def request_stop(self, *_: object) -> None:
        """Signal handler: stop at the next status tick."""
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
        self.out(f"topics ready ({len(created)} created)")
        ch_url = clickhouse_url(self.clickhouse, self.runtime)
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "MEDSTREAM_KAFKA_BROKER_KIND": broker_kind,
            "MEDSTREAM_STREAMS_PROCESSING_GUARANTEE": self.streams.processing_guarantee,
            "CLICKHOUSE_URL": ch_url,
            "MEDSTREAM_DATA_DIR": str(data_dir.resolve()),
            "PYTHONUNBUFFERED": "1",
        }
        query_port = free_port()
        sink = self._start(
            Child("sink", ["sink", "--query-port", str(query_port)], free_port()), env
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
            self._start(Child(f"streams-{index}", ["streams"], free_port()), env)
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
                Child("simulator", simulate, free_port(), expected_exit=True), env
            )
        RuntimeState(
            os.getpid(),
            bootstrap,
            self.query_url,
            {c.name: c.metrics_url for c in self.children},
            ch_url,
            self.console_url,
            broker_kind,
        ).write(self.runtime.runtime_file)
        self.out(
            f"running: {len(self.children)} processes; metrics at "
            + ", ".join(f"{c.name}={c.metrics_url}" for c in self.children)
        )
        self.out("press Ctrl-C to stop")
        previous = scrape(self.children)
        done_deadline: float | None = None
        while not self._stop.wait(self.runtime.status_interval_s):
            current = scrape(self.children)
            self.out(status_line(previous, current))
            previous = current
            self._restart_collectors()
            died = [c for c in self.children if self._died(c) and not c.restartable]
            if died:
                for child in died:
                    code = child.process.returncode if child.process else None
                    log = self.runtime.data_dir / f"{child.name}.log"
                    self.out(f"{child.name} died with exit code {code}; see {log}")
                return 1
            if self.broker is not None and not self.broker.alive():
                self.out(f"the embedded broker died; see {self.broker.log_path}")
                return 1
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

    def _restart_collectors(self) -> None:
        """A collector (or the console) that died is restarted after a growing pause
        (1 s .. 60 s): a collector resumes from the source position it last committed, so
        nothing it read is lost; the console reloads its alerts from ClickHouse."""
        now = time.monotonic()
        for child in self.children:
            if not child.restartable or not self._died(child):
                continue
            if child.process is not None and child.process.returncode == 2:
                child.restartable = False  # a configuration error: restarting cannot fix it
                continue
            if child.restart_at is None:
                if now - child.started_at > HEALTHY_RUN_S:
                    child.restarts = 0  # it ran well for a while: a fresh failure
                if child.restarts >= MAX_QUICK_RESTARTS:
                    child.restartable = False  # reported as died: `up` stops, exit 1
                    self.out(
                        f"{child.name} failed {child.restarts + 1} times in a row within "
                        f"{HEALTHY_RUN_S:.0f}s of starting; giving up"
                    )
                    continue
                pause = min(60.0, 2.0**child.restarts)
                child.restart_at = now + pause
                code = child.process.returncode if child.process else None
                log = self.runtime.data_dir / f"{child.name}.log"
                self.out(
                    f"{child.name} exited with code {code}; restarting it in {pause:.0f}s "
                    f"(see {log})"
                )
            elif now >= child.restart_at:
                child.restarts += 1
                child.restart_at = None
                self._start(child, self._env)

    def _drained(self, since: datetime) -> tuple[bool, str] | None:
        """After the simulator finished: the reconcile verdict once nothing is in flight."""
        from medstream.reconcile import reconcile

        assert self.query_url is not None
        url = self.query_url
        token_file = self.runtime.query_token_file

        def query(sql: str):  # type: ignore[no-untyped-def]
            token = read_query_token(token_file)  # a restarted sink writes a new one
            return query_via_gateway(url, sql, max_rows=PROOF_MAX_ROWS, token=token)

        try:
            report = reconcile(query, self.clickhouse.database, since, datetime.now(tz=UTC))
            totals = query(
                f"SELECT (SELECT count() FROM {self.clickhouse.database}.alert), "
                f"(SELECT count() FROM {self.clickhouse.database}.dead_letter)"
            ).rows[0]
        except (QueryError, OSError) as exc:  # a busy or restarting gateway: ask again
            self.out(f"reconcile not possible right now ({exc}); retrying")
            return None
        published = sum(s.published_messages for s in report.sources)
        if not report.ok or published < self._published_messages():
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
        return True, report.render()

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
        report_path = self.runtime.data_dir / "simulator-report.json"
        try:
            return int(json.loads(report_path.read_text())["messages"])
        except (OSError, ValueError, KeyError):
            return 1  # no report yet: at least one message must have been seen

    def _died(self, child: Child) -> bool:
        if child.process is None:
            return False
        code = child.process.poll()
        if code is None:
            return False
        return not (child.expected_exit and code == 0)

    def _start(self, child: Child, env: dict[str, str]) -> Child:
        log_path = self.runtime.data_dir / f"{child.name}.log"
        child.started_at = time.monotonic()
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

    def _shutdown(self) -> bool:
        """Stop producers, then stream workers, then the sink (it drains), then Kafka.

        Returns False when a component failed or had to be killed.
        """
        killed = []
        order = sorted(
            self.children,
            key=lambda c: (
                0
                if c.name in ("simulator", "console") or c.name.startswith("collector-")
                else (1 if c.name.startswith("streams") else 2)
            ),
        )
        for child in order:
            process = child.process
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            timeout = STOP_TIMEOUT_S.get(child.name.split("-")[0], 30.0)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.out(f"{child.name} did not stop within {timeout:.0f}s; killing it")
                process.kill()
                process.wait()
                killed.append(child.name)
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
        if failed or killed:
            names = sorted({*(c.name for c in failed), *killed})
            self.out("stopped; components that failed: " + ", ".join(names))
            return False
        self.out("stopped cleanly")
        return True
