"""The `medstream` command line: run the pipeline, its parts, and the proofs.

Settings come from the environment (see each command's --help and `medstream settings`);
KAFKA_BOOTSTRAP_SERVERS, CLICKHOUSE_URL and SCHEMA_REGISTRY_URL switch a part from the
embedded default to a real server.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, cast

import typer

from medstream.clickhouse import (
    PROOF_MAX_ROWS,
    QueryError,
    QueryLimits,
    QueryRefused,
    QueryResult,
    migrate,
    open_clickhouse,
    run_read_only,
    sql_string,
    write_csv,
)
from medstream.keys import AUDIT_KEY, DEAD_LETTER_SECRET, SecretRefused, resolve_secret
from medstream.query_endpoint import query_via_gateway, read_query_token
from medstream.runtime import RuntimeState
from medstream.settings import (
    SETTINGS_MODELS,
    AuditSettings,
    ClickHouseSettings,
    KafkaSettings,
    ProcessingGuarantee,
    RegistrySettings,
    RuntimeSettings,
    SinkSettings,
    StreamSettings,
    clickhouse_url,
    environment_variables,
)

if TYPE_CHECKING:
    from medstream.reconcile import LabelCheck

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=(
        "medstream: real-time medical-data ingestion. Environment: KAFKA_BOOTSTRAP_SERVERS "
        "(empty = the embedded broker of MEDSTREAM_EMBEDDED_BROKER), CLICKHOUSE_URL (empty = "
        "embedded chdb under MEDSTREAM_DATA_DIR, default .medstream), SCHEMA_REGISTRY_URL "
        "(empty = schemas/ manifest), MEDSTREAM_* for the rest (`medstream settings` lists them)."
    ),
)



@app.callback()
def _owner_only_files() -> None:
    """Every command creates its files owner-only: the data directory holds patient data
    and keys, and a command run before `up` (`users add`, `migrate`) may be the one that
    creates it."""
    os.umask(0o077)


IN_FLIGHT_S = 10  # what `reconcile` leaves out while the pipeline runs
MetricsPort = Annotated[int, typer.Option(help="serve Prometheus /metrics on this port (0 = off)")]


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _audit_key() -> bytes:
    """The audit key of this host (MEDSTREAM_AUDIT_KEY or the data directory's); a missing
    or refused key stops the command with the remedy."""
    try:
        return resolve_secret(AUDIT_KEY, AuditSettings().key, RuntimeSettings().data_dir)
    except SecretRefused as exc:
        _fail(str(exc), 2)


def _dead_letter_secret() -> bytes:
    """The dead-letter sealing secret (MEDSTREAM_SINK_DEAD_LETTER_SECRET or the data
    directory's); a missing or refused one stops the command with the remedy."""
    try:
        return resolve_secret(
            DEAD_LETTER_SECRET, SinkSettings().dead_letter_secret, RuntimeSettings().data_dir
        )
    except SecretRefused as exc:
        _fail(str(exc), 2)


def _kafka_for_client() -> KafkaSettings:
    """Kafka settings for a command that joins an existing broker (configured or `up`'s)."""
    kafka = _reachable_kafka()
    if kafka is None:
        _fail(
            "no Kafka: set KAFKA_BOOTSTRAP_SERVERS or start the embedded pipeline with "
            "`medstream up` (this command then joins its broker)"
        )
    return kafka


def _reachable_kafka() -> KafkaSettings | None:
    """The broker to check raw offsets on: the configured one, or a running `up`'s; None
    when there is none (an embedded broker that stopped took its offsets with it)."""
    kafka = KafkaSettings()
    if kafka.embedded:
        state = RuntimeState.read(RuntimeSettings())
        if state is None:
            return None
        kafka = kafka.model_copy(
            update={"bootstrap_servers": state.bootstrap_servers, "broker_kind": state.broker_kind}
        )
    return kafka


@contextmanager
def _querier(max_rows: int) -> Iterator[Callable[[str], QueryResult]]:
    """Queries go to a running `medstream up` when there is one, else to ClickHouse directly."""
    ch, runtime = ClickHouseSettings(), RuntimeSettings()
    state = RuntimeState.read(runtime)
    if state is not None and state.query_url and not ch.url:
        url, token = state.query_url, _query_token(runtime)
        yield lambda sql: query_via_gateway(url, sql, ch.query_timeout_s, max_rows, token=token)
        return
    client = open_clickhouse(ch, runtime)
    limits = QueryLimits.of(ch)
    try:
        yield lambda sql: run_read_only(
            client, sql, ch.database, ch.query_timeout_s, max_rows, limits=limits
        )
    finally:
        client.close()


def _query_token(runtime: RuntimeSettings) -> str:
    """The running query endpoint's token (exits with the reason when it is unreadable)."""
    try:
        return read_query_token(runtime.query_token_file)
    except QueryError as exc:
        _fail(str(exc))


def _start_metrics(port: int) -> None:
    if port:
        from medstream.metrics import serve_metrics

        serve_metrics(port, RuntimeSettings().metrics_host)


@app.command()
def up(
    events: Annotated[int, typer.Option(help="clinical records to simulate (0 = endless)")] = 0,
    rate: Annotated[float, typer.Option(help="simulated clinical records per second")] = 200.0,
    seed: Annotated[
        int | None, typer.Option(help="simulator seed (default: a new one, printed)")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Faust worker processes")] = None,
    labels: Annotated[
        Path | None, typer.Option(help="write the simulator's ground truth here")
    ] = None,
    exit_when_done: Annotated[
        bool,
        typer.Option(help="with --events: stop once everything is reconciled; exit 1 on a gap"),
    ] = False,
    collector: Annotated[
        list[Path] | None,
        typer.Option(
            help="run the edge collector configured in this YAML file (repeatable; also "
            "MEDSTREAM_COLLECTOR_CONFIGS, comma-separated)"
        ),
    ] = None,
    simulate: Annotated[
        bool | None,
        typer.Option(
            "--simulate/--no-simulate",
            help="run the region simulator (default: only when no collector is configured)",
        ),
    ] = None,
    console: Annotated[
        bool, typer.Option("--console/--no-console", help="serve the live alert console")
    ] = True,
    metrics_port: Annotated[
        int,
        typer.Option(
            help="serve `up`'s own /metrics (component restarts) on this port (0 = a free "
            "port; runtime.json names it)"
        ),
    ] = 0,
    drain_timeout: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="on Ctrl-C/SIGTERM, seconds to let the workers and the sink store what was "
            "accepted before stopping them (default MEDSTREAM_DRAIN_TIMEOUT_S, 120)",
        ),
    ] = None,
) -> None:
    """Run the whole pipeline: broker, topics, ClickHouse, stream workers, sink, collectors
    and (by default when no collector is configured) the simulator. A component that dies
    is restarted; a stop drains the topics first and exits non-zero if anything accepted
    is left unstored (a second Ctrl-C stops at once)."""
    from medstream.supervisor import CollectorSpec, Supervisor

    streams = StreamSettings()
    if workers is not None:
        streams = streams.model_copy(update={"workers": workers})
    runtime = RuntimeSettings()
    if drain_timeout is not None:
        runtime = runtime.model_copy(update={"drain_timeout_s": drain_timeout})
    try:
        collectors = [
            CollectorSpec.read(path) for path in [*runtime.collector_paths(), *(collector or [])]
        ]
    except ValueError as exc:
        _fail(str(exc), 2)
    names = [c.name for c in collectors]
    if len(set(names)) != len(names):
        _fail(f"collector names must be unique, got {', '.join(sorted(names))}", 2)
    if simulate is None:
        simulate = not collectors
    if exit_when_done and (events <= 0 or not simulate):
        _fail("--exit-when-done needs the simulator and --events N")
    if seed is None:
        seed = secrets.randbelow(1_000_000)
    if simulate:
        typer.echo(f"simulator seed {seed} (repeat this region with --seed {seed})")
    from medstream.settings import ConsoleSettings

    supervisor = Supervisor(
        KafkaSettings(), ClickHouseSettings(), runtime, streams, collectors=collectors,
        simulate=simulate, console=ConsoleSettings() if console else None,
        metrics_port=metrics_port,
    )
    raise typer.Exit(supervisor.run(events, rate, seed, labels, exit_when_done))


@app.command()
def broker(
    fetch_only: Annotated[
        bool,
        typer.Option(
            "--fetch-only",
            help="fetch the Apache Kafka jars from Maven Central into the cache and exit",
        ),
    ] = False,
) -> None:
    """Run only the embedded broker (MEDSTREAM_EMBEDDED_BROKER) in the foreground."""
    from medstream import kafka_broker
    from medstream.runtime import (
        EmbeddedRuntimeError,
        describe_broker,
        ensure_topics,
        start_embedded_broker,
    )

    runtime = RuntimeSettings()
    if fetch_only:
        try:
            libs = kafka_broker.fetch_jars(typer.echo)
        except kafka_broker.KafkaUnavailable as exc:
            _fail(str(exc))
        typer.echo(f"Apache Kafka {kafka_broker.kafka_version()} jars ready in {libs}")
        return
    from medstream.keys import ensure_data_dir_secrets
    from medstream.runtime import private_data_dir

    os.umask(0o077)  # the broker's data is owner-only, like everything in the data directory
    warning = private_data_dir(runtime.data_dir)
    if warning:
        typer.echo(f"warning: {warning}", err=True)
    try:  # the components run beside this broker share the data directory's keys
        ensure_data_dir_secrets(runtime.data_dir)
    except SecretRefused as exc:
        _fail(str(exc), 2)
    try:
        embedded = start_embedded_broker(runtime, lambda line: typer.echo(line, err=True))
    except EmbeddedRuntimeError as exc:
        _fail(str(exc))
    kafka = KafkaSettings().model_copy(
        update={"bootstrap_servers": embedded.bootstrap_servers, "broker_kind": embedded.kind}
    )
    ensure_topics(kafka)
    typer.echo(describe_broker(embedded))
    typer.echo(
        f"KAFKA_BOOTSTRAP_SERVERS={embedded.bootstrap_servers} "
        f"MEDSTREAM_KAFKA_BROKER_KIND={embedded.kind}  (Ctrl-C stops it)"
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5) and embedded.alive():
            pass
    except KeyboardInterrupt:
        pass
    finally:
        embedded.stop()


@app.command()
def topics() -> None:
    """Create the medstream topics on the configured broker (idempotent)."""
    from medstream.runtime import contract_topics, ensure_topics

    kafka = _kafka_for_client()
    created = ensure_topics(kafka)
    for name, partitions in contract_topics(kafka).items():
        created_note = "  (created)" if name in created else ""
        typer.echo(f"{name:<20} {partitions:>3} partitions{created_note}")


@app.command("migrate")
def migrate_command() -> None:
    """Apply the ClickHouse migrations (idempotent)."""
    ch, runtime = ClickHouseSettings(), RuntimeSettings()
    if RuntimeState.read(runtime) is not None and not ch.url:
        typer.echo("the running pipeline's sink applied the migrations at start")
        return
    client = open_clickhouse(ch, runtime)
    applied, fields, views = _prepare_database(client, ch)
    typer.echo("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    typer.echo(f"data_dictionary: {fields} fields of the Avro contracts")
    typer.echo(f"{views} de-identified analyst views in {ch.database}_analyst")


def _prepare_database(client: Any, ch: ClickHouseSettings) -> tuple[list[str], int, int]:
    """Migrations, then what derives from the contracts: the data dictionary and the
    analyst views. Returns (migrations applied, dictionary fields, analyst views)."""
    from medstream.access import refresh_analyst_views
    from sinks.dictionary import refresh_data_dictionary

    if ch.cluster and not ch.url.startswith(("http://", "https://")):
        _fail("MEDSTREAM_CLICKHOUSE_CLUSTER needs a ClickHouse server (CLICKHOUSE_URL)", 2)
    applied = migrate(client, ch.database, ch.cluster)
    fields = refresh_data_dictionary(client, ch.database)
    return applied, fields, refresh_analyst_views(client, ch.database, ch.cluster)


#: How long a stopping sink reads on until its topics are idle (`up` stops the producers
#: first); `up` gives it STOP_TIMEOUT_S["sink"] (60 s) in all.
SINK_STOP_DRAIN_S = 20.0


def _stuck_sink_exit() -> None:
    """The sink's stop took longer than its drain time and STOP_AFTER_DRAIN_S: exit now."""
    from sinks.clickhouse import STOP_AFTER_DRAIN_S

    logging.getLogger("medstream.sink").error(
        "the sink did not stop within %.0fs (is the broker gone?): exiting; records whose "
        "offsets were not committed are read again by the next run",
        SINK_STOP_DRAIN_S + STOP_AFTER_DRAIN_S,
    )
    os._exit(1)


@app.command()
def sink(
    metrics_port: MetricsPort = 0,
    query_port: Annotated[int, typer.Option(help="serve read-only queries here (0 = off)")] = 0,
) -> None:
    """Run the ClickHouse sink (norm.*, alerts, dlq and the raw ledger)."""
    from schemas.serde import registry_from_url
    from sinks.clickhouse import STOP_AFTER_DRAIN_S, ClickHouseSink, SinkFailed, SinkKeys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    kafka = _kafka_for_client()
    ch, runtime = ClickHouseSettings(), RuntimeSettings()
    keys = SinkKeys(_dead_letter_secret(), _audit_key())
    client = open_clickhouse(ch, runtime)
    applied, _, _ = _prepare_database(client, ch)
    if applied:
        logging.getLogger("medstream.sink").info("migrations applied: %s", ", ".join(applied))
    lock = threading.Lock()
    gateway = None
    if query_port:
        from medstream.query_endpoint import QueryGateway, write_query_token

        # Queries get engine handles of their own: they never wait for, or hold up, the
        # sink's inserts. The token is written before the port opens.
        gateway = QueryGateway(
            lambda: open_clickhouse(ch, runtime), ch.database,
            write_query_token(runtime.query_token_file), query_port,
            ch.query_concurrency, QueryLimits.of(ch),
        )
        gateway.start()
    _start_metrics(metrics_port)
    writer = ClickHouseSink(
        kafka, SinkSettings(), client, ch.database, registry_from_url(RegistrySettings().url), lock,
        keys=keys,
    )
    def stop_sink(*_: object) -> None:
        first = not writer.stopping
        writer.stop(SINK_STOP_DRAIN_S)
        if first:
            # An orphaned sink (die_with_parent: its `up` and the broker are gone) must not
            # wait on a dead broker for ever: what it stored is stored, the offsets it could
            # not commit are read again by the next run (the inserts are idempotent).
            watchdog = threading.Timer(SINK_STOP_DRAIN_S + STOP_AFTER_DRAIN_S, _stuck_sink_exit)
            watchdog.daemon = True
            watchdog.start()

    signal.signal(signal.SIGTERM, stop_sink)
    signal.signal(signal.SIGINT, stop_sink)
    try:
        writer.run()
    except SinkFailed as exc:
        _fail(str(exc))
    finally:
        if gateway is not None:
            gateway.stop()
            runtime.query_token_file.unlink(missing_ok=True)
        client.close()
    if writer.left_unstored:
        _fail("stopped with records read but not stored; they stay uncommitted for the next run")


@app.command()
def streams(metrics_port: MetricsPort = 0) -> None:
    """Run one Faust stream worker (normalise + critical values)."""
    # Until the worker installs its own handler: SIGUSR2 stops its timers (`up` sends it
    # before its last drain), it must never end a worker still starting.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    from medstream.audit import AuditTrail, BackgroundAudit, config_change_recorder
    from medstream.settings import TIMERS_STOPPED_ENV
    from schemas.serde import registry_from_url
    from streams.app import TIMERS_STOPPED, StreamsWorker, create_app
    from streams.reloading import on_reload

    if os.environ.get(TIMERS_STOPPED_ENV) == "1":  # started by `up` during its stop
        TIMERS_STOPPED.set()

    kafka = _kafka_for_client()
    registry = registry_from_url(RegistrySettings().url)
    try:
        faust_app = create_app(
            kafka, StreamSettings(), registry, data_dir=RuntimeSettings().data_dir
        )
    except ValueError as exc:
        _fail(str(exc), 2)
    audit = BackgroundAudit(AuditTrail(kafka, registry, key=_audit_key()))
    worker_name = f"medstream-streams@{socket.gethostname()}:{os.getpid()}"
    on_reload(config_change_recorder(audit, worker_name))
    _start_metrics(metrics_port)
    worker = StreamsWorker(faust_app, loglevel="WARNING", quiet=True, redirect_stdouts=False)
    try:
        worker.execute_from_commandline()
    finally:
        audit.drain()


@app.command()
def collect(
    kind: Annotated[
        str, typer.Argument(help="collector kind: postgres, mariadb, mllp, devices, claims")
    ],
    config: Annotated[Path, typer.Option(help="the collector's YAML configuration")],
    check: Annotated[
        bool, typer.Option(help="validate the configuration against the source, then exit")
    ] = False,
    metrics_port: MetricsPort = 0,
) -> None:
    """Run one edge collector: read a real source, publish raw records, commit after acks."""
    from producers import collector_class
    from producers.base import ConfigError, SourceUnavailable, load_config
    from schemas.serde import registry_from_url

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cls = collector_class(kind)
        settings = load_config(config, cls.config_model)
    except (ValueError, ConfigError) as exc:
        _fail(str(exc), 2)
    if settings.kind != kind:
        _fail(f"{config}: kind is {settings.kind!r}, but `collect {kind}` was asked for", 2)
    kafka = _kafka_for_client()
    try:
        collector = cls(settings, kafka, registry_from_url(RegistrySettings().url))
        findings = collector.check()
    except ConfigError as exc:
        _fail(str(exc), 2)
    except SourceUnavailable as exc:  # exit 1: `up` restarts the collector with backoff
        _fail(f"{settings.name}: source unavailable: {exc}", 1)
    if check:
        for finding in findings:
            typer.echo(finding)
        typer.echo(f"{settings.name}: configuration is valid against the source")
        return
    _start_metrics(metrics_port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    typer.echo(f"collector {settings.name} ({kind}) running; Ctrl-C stops it", err=True)
    try:
        collector.run(stop)
    except ConfigError as exc:
        _fail(str(exc), 2)
    except SourceUnavailable as exc:
        _fail(f"{settings.name}: source unavailable: {exc}", 1)
    typer.echo(f"collector {settings.name} stopped", err=True)


@app.command()
def simulate(
    events: Annotated[int, typer.Option(help="clinical records to publish (0 = endless)")] = 10000,
    rate: Annotated[
        float, typer.Option(help="clinical records per second (0 = unthrottled)")
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="seed: the same seed gives the same region")] = 7,
    labels: Annotated[
        Path | None, typer.Option(help="write ground-truth labels (JSONL) here")
    ] = None,
    report: Annotated[
        Path | None, typer.Option(help="write the final publish report (JSON) here")
    ] = None,
    anomaly_rate: Annotated[
        float,
        typer.Option(
            envvar="MEDSTREAM_SIMULATOR_ANOMALY_RATE",
            help="share of messages that inject a labelled anomaly (NEWS2, devices, claims, "
            "feeds, syndromic); `up` passes the environment variable on",
        ),
    ] = 0.005,
    metrics_port: MetricsPort = 0,
) -> None:
    """Publish a deterministic synthetic region's source messages to the raw topics.

    Each run has its own run id (printed, and in the report and labels): the same seed
    gives the same content, under ids no other run uses."""
    from medstream.published import SIMULATOR_FILE
    from medstream.simulator import PublishReport, RegionSimulator, SimulatorProducer
    from schemas.serde import registry_from_url

    kafka = _kafka_for_client()
    _start_metrics(metrics_port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    producer = SimulatorProducer(
        kafka,
        registry_from_url(RegistrySettings().url),
        RegionSimulator(
            seed,
            anomaly_rate=anomaly_rate,
            records_per_second=rate or None,
            # Silences of feeds are injected only when the run outlasts their thresholds.
            long_run_s=(events / rate if events > 0 and rate > 0 else None)
            if events > 0
            else float("inf"),
            rules_dir=StreamSettings().rules_dir,
        ),
        labels_path=labels,
        rate=rate or None,
        published=RuntimeSettings().data_dir / SIMULATOR_FILE,
    )
    typer.echo(f"simulator run {producer.run_id} (seed {seed})", err=True)

    def progress(current: PublishReport) -> None:
        typer.echo(
            f"simulator: {current.total_records} records in {current.total_messages} messages "
            f"({current.duplicates} duplicates, {current.malformed} malformed) "
            f"in {current.elapsed_s:.1f}s",
            err=True,
        )

    final = producer.run(
        events if events > 0 else 10**12, progress=progress, should_stop=stop.is_set
    )
    summary = {
        "run_id": final.run_id,
        "seed": seed,
        "messages": final.total_messages,
        "records": final.total_records,
        "messages_by_kind": final.messages,
        "records_by_kind": final.records,
        "duplicates": final.duplicates,
        "malformed": final.malformed,
        "delivery_failures": final.delivery_failures,
        "elapsed_s": round(final.elapsed_s, 3),
    }
    if report is not None:
        report.write_text(json.dumps(summary, indent=2))
    typer.echo(
        f"simulator done: {final.total_records} records in {final.total_messages} messages, "
        f"{final.elapsed_s:.1f}s"
    )


@app.command()
def sql(
    query: Annotated[str, typer.Argument(help="one read-only SQL statement")],
    output: Annotated[str, typer.Option("--format", help="table, json or csv")] = "table",
    max_rows: Annotated[int, typer.Option(help="print at most this many rows")] = 1000,
    user: Annotated[
        str | None,
        typer.Option(
            "--user",
            help="run as this medstream user, with its role, organisation scope and column "
            "clearance (password from MEDSTREAM_SQL_PASSWORD or a prompt); without it, as "
            "the local operator (every table, read-only)",
        ),
    ] = None,
) -> None:
    """Run a read-only query on the configured ClickHouse (also while `medstream up` runs).
    Every query is recorded in the audit log with its user and row count."""
    from medstream.access import AccessError, QueryGovernor, query_text
    from medstream.audit import AuditError, local_actor, statement_digest
    from streams.deidentify import scrub_text

    if output not in ("table", "json", "csv"):
        _fail("--format must be table, json or csv", 2)
    ch = ClickHouseSettings()
    actor, role_name, settings = local_actor(), "operator", None
    statement = query
    with _query_and_audit(max_rows) as (run, trail):
        try:
            if user is not None:
                account = _sign_in(user)
                actor, role_name = account.name, account.role
                governed = QueryGovernor(ch.database, run).check(account, query)
                statement, settings = governed.sql, governed.settings
            else:  # the operator's statement is checked like any other when it runs
                statement = query_text(query)
        except (QueryError, AccessError) as exc:
            _record(trail, actor, role_name, "query", "refused", target=statement_digest(query),
                    detail=scrub_text(f"{query}\n-- refused: {exc}").text)
            _fail(str(exc))
        try:
            result = run(statement, settings)
        except QueryError as exc:  # refused by the check, timed out, or an engine error
            outcome = "refused" if isinstance(exc, QueryRefused) else "failed"
            _record(trail, actor, role_name, "query", outcome,
                    target=statement_digest(statement),
                    detail=scrub_text(f"{statement}\n-- failed: {exc}").text)
            _fail(str(exc))
        try:
            trail.record(actor=actor, actor_role=role_name, channel="cli", action="query",
                         outcome="ok", target=statement_digest(statement),
                         detail=scrub_text(statement).text, rows=len(result.rows))
        except AuditError as exc:
            _fail(f"{exc}: the result is withheld")
    rows = result.rows[:max_rows]
    if output == "json":
        records = [dict(zip(result.columns, r, strict=True)) for r in rows]
        typer.echo(json.dumps(records, default=str))
    elif output == "csv":
        write_csv(sys.stdout, result.columns, rows)
    else:
        typer.echo(render_table(result.columns, rows))
    if result.truncated or len(result.rows) > max_rows:
        typer.echo(f"(showing the first {len(rows)} rows)", err=True)


def _sign_in(name: str) -> Any:
    """A medstream user, after checking the password (environment or prompt)."""
    from medstream.access import AccessError, UserStore
    from medstream.settings import ConsoleSettings

    password = os.environ.get("MEDSTREAM_SQL_PASSWORD")
    if password is None:
        password = typer.prompt(f"password of {name}", hide_input=True)
    store = UserStore(ConsoleSettings().users_path(RuntimeSettings()))
    try:
        return store.authenticate(name, password)
    except AccessError as exc:
        _record_sign_in_failure(name, str(exc))
        _fail(str(exc))


def _record_sign_in_failure(name: str, reason: str) -> None:
    with _query_and_audit(1) as (_, trail):
        _record(trail, name, "", "sign_in_failed", "refused", detail=reason)


def _record(
    trail: Any, actor: str, role_name: str, action: str, outcome: str, **fields: Any
) -> None:
    """Record an audit event of a refusal; a failure to record it is reported, not raised
    (the refusal stands either way)."""
    from medstream.audit import AuditError

    try:
        trail.record(actor=actor, actor_role=role_name, channel="cli", action=action,
                     outcome=outcome, **fields)
    except AuditError as exc:
        typer.echo(f"warning: {exc}", err=True)


@contextmanager
def _query_and_audit(
    max_rows: int,
) -> Iterator[tuple[Callable[..., QueryResult], Any]]:
    """A query runner and an audit trail: through a running `medstream up` (its query
    endpoint and its broker) or a configured Kafka, else on an engine this command opens
    (the audit event is then inserted directly)."""
    from medstream.audit import AuditTrail, direct_insert
    from schemas.serde import registry_from_url

    ch, runtime, kafka = ClickHouseSettings(), RuntimeSettings(), KafkaSettings()
    state = RuntimeState.read(runtime)
    if kafka.embedded and state is not None:
        kafka = kafka.model_copy(update={"bootstrap_servers": state.bootstrap_servers})
    registry = registry_from_url(RegistrySettings().url)
    if state is not None and state.query_url and not ch.url:
        url, token = state.query_url, _query_token(runtime)
        trail = AuditTrail(kafka, registry, key=_audit_key())

        def via_gateway(
            sql: str, settings: dict[str, Any] | None = None, rows: int = max_rows
        ) -> QueryResult:
            return query_via_gateway(url, sql, ch.query_timeout_s, rows, settings, token=token)

        try:
            yield via_gateway, trail
        finally:
            trail.close()
        return
    try:
        client = open_clickhouse(ch, runtime)
    except QueryError as exc:
        _fail(str(exc))
    try:
        if kafka.embedded:
            migrate(client, ch.database, ch.cluster)  # the audit table must exist first
            trail = AuditTrail(None, insert=direct_insert(client, ch.database))
        else:
            trail = AuditTrail(kafka, registry, key=_audit_key())


        limits = QueryLimits.of(ch)

        def direct(
            sql: str, settings: dict[str, Any] | None = None, rows: int = max_rows
        ) -> QueryResult:
            return run_read_only(
                client, sql, ch.database, ch.query_timeout_s, rows, settings, limits
            )

        yield direct, trail
        trail.close()
    finally:
        client.close()


def render_table(columns: list[str], rows: list[list[Any]]) -> str:
    """A plain aligned text table."""
    text_rows = [["NULL" if v is None else str(v) for v in row] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in text_rows)]) for i, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines.extend(" | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in text_rows)
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)


def _parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@app.command("reconcile")
def reconcile_command(
    since: Annotated[
        str | None, typer.Option(help="ISO time (UTC if no offset); default 24 h ago")
    ] = None,
    until: Annotated[str | None, typer.Option(help="ISO time; default now")] = None,
    labels: Annotated[
        Path | None, typer.Option(help="also check against simulator ground truth")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    broker: Annotated[
        bool,
        typer.Option(
            "--broker/--no-broker",
            help="also hold the raw topics' offsets on the broker against the ledger",
        ),
    ] = True,
    strict: Annotated[
        bool,
        typer.Option(
            help="exit 1 also when the sink has not read records yet (a lag); without it "
            "they are reported as 'not read yet' and only a loss or an unverified range fails",
        ),
    ] = False,
) -> None:
    """Count per source and stage (published, normalised, dead-lettered, stored); exit 1 on gaps.

    Also exit 1 when --labels finds the ground truth not met, and with --strict when the sink
    has not read everything yet; the JSON's "ok" and "failures" and the last line of the
    text ("ok" or "FAILED: ...") say the same as the exit code.

    Besides the sink's own ledger and lineage, what entered is counted independently: from
    the broker's raw-topic offsets (while it holds them) and from the simulator's and
    collectors' own counters under the data directory; every offset range that never
    reached the ledger is named."""
    from medstream.published import published_files
    from medstream.reconcile import check_labels, read_labels, reconcile

    end = _parse_time(until) if until else datetime.now(tz=UTC)
    if until is None and RuntimeState.read(RuntimeSettings()) is not None:
        end -= timedelta(seconds=IN_FLIGHT_S)
        typer.echo(
            f"(the pipeline is running: records of the last {IN_FLIGHT_S} s are in flight and "
            "not counted; pass --until to choose)",
            err=True,
        )
    start = _parse_time(since) if since else end - timedelta(hours=24)
    database = ClickHouseSettings().database
    kafka = _reachable_kafka() if broker else None
    try:
        with _querier(PROOF_MAX_ROWS) as run:
            report = reconcile(
                run, database, start, end, kafka=kafka, sink_group=SinkSettings().group_id,
                counter_files=published_files(RuntimeSettings().data_dir),
            )
            if broker and kafka is None:
                report.independent.append(
                    "broker: not checked, no broker is configured or running (set "
                    "KAFKA_BOOTSTRAP_SERVERS, or start `medstream up`)"
                )
            label_check = (
                check_labels(run, database, read_labels(labels), start) if labels else None
            )
    except QueryError as exc:
        _fail(str(exc))
    except ValueError as exc:  # a labels file naming a table that is not medstream's
        _fail(str(exc), 2)
    label_failures = [] if label_check is None else _label_failures(label_check)
    failures = [
        *([f"{len(report.gaps)} gap(s) in the pipeline's own counts"] if report.gaps else []),
        *(
            [f"{sum(report.internal_errors.values()):,} records dead-lettered as internal "
             "errors (a bug met them)"] if report.internal_errors else []
        ),
        *(
            [f"--strict: {report.pending_records:,} records not read yet by the sink"]
            if strict and report.ok and not report.settled else []
        ),
        *(f"ground truth: {failure}" for failure in label_failures),
    ]
    ok = not failures  # the exit code, the JSON's "ok" and the last line all say this
    if as_json:
        body = {**report.as_dict(), "ok": ok, "strict": strict, "failures": failures}
        if label_check is not None:
            body["labels"] = {
                **label_check.__dict__,
                "missing_events": label_check.missing_events[:20],
                "ok": label_check.ok,
                "failures": label_failures,
            }
        typer.echo(json.dumps(body, default=str, indent=2))
    else:
        typer.echo(report.render())
        if label_check is not None:
            run_ids = ", ".join(label_check.run_ids) or "unknown: labels carry no run id"
            typer.echo(
                f"ground truth (run {run_ids}): "
                f"{label_check.stored_events}/{label_check.expected_events} "
                f"events stored, {label_check.duplicated_events} duplicated, dead letters "
                f"{label_check.found_dead_letters}/{label_check.expected_dead_letters}, alerts "
                f"{label_check.found_alerts}/{label_check.expected_alerts} "
                f"({label_check.unexpected_alerts} unexpected)"
            )
        typer.echo("FAILED: " + "; ".join(failures) if failures else "ok")
    raise typer.Exit(0 if ok else 1)


def _label_failures(check: LabelCheck) -> list[str]:
    """What the ground-truth check found wrong, one line each (empty: it passed)."""
    missing = check.missing_events
    return [
        failure for failure, failed in (
            (f"{len(missing):,} of {check.expected_events:,} labelled events not stored "
             f"(e.g. {', '.join(missing[:3])})", bool(missing)),
            (f"{check.duplicated_events:,} events stored more than once",
             check.duplicated_events > 0),
            (f"dead letters {check.found_dead_letters:,} found, "
             f"{check.expected_dead_letters:,} expected",
             check.found_dead_letters != check.expected_dead_letters),
            (f"{check.found_alerts:,} of {check.expected_alerts:,} expected critical alerts "
             "raised once", check.found_alerts != check.expected_alerts),
            (f"{check.unexpected_alerts:,} critical alerts the labels do not expect (or raised "
             "twice)", check.unexpected_alerts > 0),
        ) if failed
    ]


@app.command("evaluate")
def evaluate_command(
    labels: Annotated[Path, typer.Option(help="the simulator's ground-truth labels (JSONL)")],
    since: Annotated[
        str | None,
        typer.Option(help="ISO time (UTC if no offset); default: labels' earliest time - 5 min"),
    ] = None,
    until: Annotated[str | None, typer.Option(help="ISO time; default: no bound")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Precision, recall and detection delay per alert rule against simulator ground truth;
    exit 1 when a deterministic rule misses recall 1.0 or precision 0.95, 2 on bad labels."""
    from medstream.evaluate import LabelsError, evaluate, load_labels, load_run_scope

    try:
        expected = load_labels(labels)
        scope = load_run_scope(labels)
        start = _parse_time(since) if since else None
        end = _parse_time(until) if until else None
    except LabelsError as exc:
        _fail(str(exc), 2)
    except ValueError as exc:
        _fail(f"--since/--until must be ISO times: {exc}", 2)
    database = ClickHouseSettings().database
    try:
        with _querier(PROOF_MAX_ROWS) as run:
            report = evaluate(run, database, expected, start, end, scope=scope)
    except QueryError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        lines = report.summary_lines()
        typer.echo(lines[0])
        typer.echo(render_table(*report.table()))
        typer.echo("\n".join(lines[1:]))
    raise typer.Exit(0 if report.ok else 1)


terminology_app = typer.Typer(no_args_is_help=True, help="Terminology governance.")
alerts_app = typer.Typer(no_args_is_help=True, help="Monitoring staff: list and act on alerts.")
dlq_app = typer.Typer(no_args_is_help=True, help="The dead-letter store (sealed payloads).")
app.add_typer(terminology_app, name="terminology")
app.add_typer(alerts_app, name="alerts")
app.add_typer(dlq_app, name="dlq")
mpi_app = typer.Typer(no_args_is_help=True, help="Data stewards: the master patient index.")
app.add_typer(mpi_app, name="mpi")


@mpi_app.command("unmerge")
def mpi_unmerge(
    record_key: Annotated[str, typer.Argument(help="the patient record (person_key of events)")],
    by: Annotated[str, typer.Option("--by", help="who splits the record (recorded)")],
    reason: Annotated[
        str,
        typer.Option(help="why; ID and phone numbers and labelled names are removed, so write "
                     "no other identifier"),
    ],
) -> None:
    """Split a patient record out of its person; it is never re-linked automatically."""
    from medstream.steward import StewardError, record_organisation, send_unmerge
    from schemas.serde import registry_from_url

    try:
        with _querier(PROOF_MAX_ROWS) as run:
            organisation = record_organisation(run, ClickHouseSettings().database, record_key)
        send_unmerge(
            _kafka_for_client(), registry_from_url(RegistrySettings().url), record_key,
            organisation, by, reason,
        )
    except (QueryError, StewardError) as exc:
        _fail(str(exc))
    typer.echo(
        f"unmerge of record {record_key} sent to the patient index; person_link shows the "
        "decision (method manual) within seconds"
    )


@terminology_app.command("unmapped")
def terminology_unmapped(
    organisation: Annotated[str | None, typer.Option(help="only this organisation")] = None,
    system: Annotated[
        str | None,
        typer.Option(help="lab, diagnosis, department, device_metric or claim_item"),
    ] = None,
    limit: Annotated[int, typer.Option(help="rows to show, most frequent first")] = 200,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """The steward's worklist: unmapped or ambiguous local codes and units that cannot be
    converted (``K [U/L]``), with counts and ranked candidates."""
    from medstream.worklist import render_worklist, unmapped_worklist
    from streams.terminology import load_terminology

    try:
        terminology = load_terminology()
    except ValueError as exc:
        _fail(f"the terminology dictionary does not load: {exc}", 2)
    try:
        with _querier(PROOF_MAX_ROWS) as run:
            entries = unmapped_worklist(
                run, ClickHouseSettings().database, terminology, organisation, system, limit
            )
    except (QueryError, ValueError) as exc:
        _fail(str(exc), 2 if isinstance(exc, ValueError) else 1)
    if as_json:
        typer.echo(json.dumps([asdict(e) for e in entries], default=str, indent=2,
                              ensure_ascii=False))
    else:
        typer.echo(render_worklist(entries, terminology.version))


@alerts_app.command("list")
def alerts_list(
    status: Annotated[
        str | None, typer.Option(help="open, acknowledged or resolved (default: all)")
    ] = None,
    limit: Annotated[int, typer.Option(help="rows to show")] = 50,
) -> None:
    """Current alerts, most urgent first."""
    from medstream.alert_actions import list_alerts

    if status not in (None, "open", "acknowledged", "resolved"):
        _fail("--status must be open, acknowledged or resolved", 2)
    try:
        with _querier(PROOF_MAX_ROWS) as run:
            columns, rows = list_alerts(run, ClickHouseSettings().database, status, limit)
    except QueryError as exc:
        _fail(str(exc))
    typer.echo(render_table(columns, rows) if rows else "no alerts")


#: Exit code of an action the stream workers did not confirm in time (or was not sent).
EXIT_NOT_CONFIRMED = 3


def _alert_action(action: str, alert_id: str, actor: str, note: str | None, wait_s: float) -> None:
    """Send an acknowledge or resolve and report the lifecycle's real outcome: exit 0 when
    applied, 1 when refused (with the reason), 3 when not confirmed within ``wait_s``. The
    request is audited before it is sent (fail closed) and its outcome after."""
    from medstream.alert_actions import (
        AlertActionError,
        check_action,
        current_state,
        request_action,
    )
    from schemas.serde import registry_from_url
    from streams.deidentify import scrub_text

    audit_action = f"alert_{action}"
    who = actor.strip() or None
    clean_note = scrub_text(note).text if note else ""
    try:
        with _querier(PROOF_MAX_ROWS) as run:
            alert = current_state(run, ClickHouseSettings().database, alert_id)
        check_action(alert, action, actor)
    except QueryError as exc:
        _fail(str(exc))
    except AlertActionError as exc:  # what ClickHouse already shows
        reason = f"{action} refused: {exc}"
        _audit_outcome(audit_action, alert_id, "refused", reason, who)
        _fail(reason)
    _audit_or_fail(audit_action, alert_id, clean_note, actor=who, outcome="requested")
    try:
        outcome = request_action(
            _kafka_for_client(), registry_from_url(RegistrySettings().url), alert, action,
            actor, note, wait_s,
        )
    except AlertActionError as exc:
        _audit_outcome(audit_action, alert_id, "failed", str(exc), who)
        _fail(str(exc), EXIT_NOT_CONFIRMED)
    detail = clean_note if outcome.applied else outcome.message
    _audit_outcome(audit_action, alert_id, outcome.audit_outcome, detail, who)
    if outcome.applied:
        typer.echo(f"{outcome.message} (by {actor.strip()})")
        return
    _fail(outcome.message, 1 if outcome.outcome == "refused" else EXIT_NOT_CONFIRMED)


def _audit_outcome(action: str, target: str, outcome: str, detail: str, actor: str | None) -> None:
    """Audit how an action ended; it already happened (or not), so a failure to record
    this is reported, not fatal."""
    from medstream.audit import AuditError, local_actor

    try:
        with _query_and_audit(1) as (_, trail):
            trail.record(actor=actor or local_actor(), actor_role="operator", channel="cli",
                         action=action, outcome=outcome, target=target, detail=detail)
    except (AuditError, QueryError) as exc:
        typer.echo(f"warning: the outcome was not audited ({exc})", err=True)


AlertNote = Annotated[
    str | None,
    typer.Option(help="note; ID and phone numbers and labelled names are removed, so write "
                 "no other identifier"),
]
AnswerWait = Annotated[
    float,
    typer.Option("--wait", min=0.5, help="seconds to wait for the stream workers' answer "
                 "(exit 3 when none came)"),
]


@alerts_app.command("ack")
def alerts_ack(
    alert_id: Annotated[str, typer.Argument(help="the alert id")],
    by: Annotated[str, typer.Option("--by", help="who acknowledges (recorded)")],
    note: AlertNote = None,
    wait: AnswerWait = 10.0,
) -> None:
    """Acknowledge an open alert: it stops escalating. Exit 0 applied, 1 refused (the
    reason is printed), 3 not confirmed in time."""
    _alert_action("acknowledge", alert_id, by, note, wait)


@alerts_app.command("resolve")
def alerts_resolve(
    alert_id: Annotated[str, typer.Argument(help="the alert id")],
    by: Annotated[str, typer.Option("--by", help="who resolves (recorded)")],
    note: AlertNote = None,
    wait: AnswerWait = 10.0,
) -> None:
    """Resolve an open or acknowledged alert. Exit 0 applied, 1 refused (the reason is
    printed), 3 not confirmed in time."""
    _alert_action("resolve", alert_id, by, note, wait)


@alerts_app.command("restore")
def alerts_restore() -> None:
    """Offer every unresolved alert ClickHouse holds to the alert lifecycle, which adopts
    those it lost (a broker that lost its changelog); `medstream up` does this at start."""
    from medstream.alert_actions import AlertActionError, restore_lifecycle
    from schemas.serde import registry_from_url

    try:
        with _querier(PROOF_MAX_ROWS) as run:
            offered = restore_lifecycle(
                run, ClickHouseSettings().database, _kafka_for_client(),
                registry_from_url(RegistrySettings().url),
            )
    except (QueryError, AlertActionError) as exc:
        _fail(str(exc))
    typer.echo(f"{offered} unresolved alerts offered to the alert lifecycle (it keeps the "
               "state it already has)")


@dlq_app.command("show")
def dlq_show(
    dlq_id: Annotated[str, typer.Argument(help="the dead letter's id")],
    raw: Annotated[bool, typer.Option(help="write the original bytes to stdout as is")] = False,
) -> None:
    """Unseal one dead letter's original record (needs the sink's dead-letter secret).
    The original may hold patient data: each opening is recorded in the audit log first
    (action dead_letter_open), and nothing is shown when it cannot be recorded."""
    from medstream.audit import AuditError, local_actor
    from medstream.sealing import SealingError, derive_key, unseal
    from sinks.clickhouse import DEAD_LETTER_PURPOSE

    database = ClickHouseSettings().database
    with _query_and_audit(PROOF_MAX_ROWS) as (run, trail):
        try:
            rows = run(
                f"SELECT stage, reason_code, reason, original_topic, original_partition, "
                f"original_offset, hex(original_value) FROM {database}.dead_letter FINAL "
                f"WHERE dlq_id = {sql_string(dlq_id)}"
            ).rows
        except QueryError as exc:
            _fail(str(exc))
        if not rows:
            _fail(f"no dead letter {dlq_id}")
        try:
            trail.record(actor=local_actor(), actor_role="operator", channel="cli",
                         action="dead_letter_open", outcome="ok", target=dlq_id, rows=1)
        except AuditError as exc:
            _fail(f"{exc}: the dead letter is not opened")
    stage, reason_code, reason, topic, partition, offset, sealed = rows[0]
    try:
        key = derive_key(_dead_letter_secret(), DEAD_LETTER_PURPOSE)
        original = unseal(bytes.fromhex(sealed), key, dlq_id.encode())
    except (SealingError, ValueError) as exc:
        _fail(f"cannot unseal dead letter {dlq_id}: {exc}")
    if raw:
        sys.stdout.buffer.write(original)
        return
    typer.echo(f"{stage} / {reason_code}: {reason}\nfrom {topic}[{partition}]@{offset}, "
               f"{len(original)} bytes:")
    typer.echo(original.decode("utf-8", errors="backslashreplace"))


@dlq_app.command("replay")
def dlq_replay(
    dlq_ids: Annotated[
        list[str] | None, typer.Argument(help="dead letters to replay (or select with options)")
    ] = None,
    stage: Annotated[
        str | None, typer.Option(help="only this stage's: normalise, detect, lifecycle, mpi, ...")
    ] = None,
    reason_code: Annotated[
        str | None, typer.Option(help="only this reason: internal_error, index_state, ...")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="only dead letters newer than this: 30m, 2h, 7d, ISO time")
    ] = None,
    limit: Annotated[int, typer.Option(help="at most this many, oldest first", min=1)] = 1000,
    yes: Annotated[bool, typer.Option("--yes", help="publish them (else only say which)")] = False,
) -> None:
    """Publish dead letters' original records again to the topics they came from, after the
    bug is fixed or the state repaired (header medstream-replay: the dead letter's id).
    Without --yes it only lists what it would replay. Each replay is audited first."""
    from confluent_kafka import Producer

    from medstream.audit import AuditError, local_actor
    from medstream.dead_letters import plan_replay, replay
    from medstream.sealing import SealingError

    if not (dlq_ids or stage or reason_code):
        _fail("say which dead letters: DLQ_ID ..., --stage or --reason-code", 2)
    database = ClickHouseSettings().database
    since_at = _since(since) if since else None
    with _query_and_audit(PROOF_MAX_ROWS) as (run, trail):
        try:
            plan = plan_replay(run, database, dlq_ids or (), stage, reason_code, since_at, limit)
        except QueryError as exc:
            _fail(str(exc))
        for dlq_id, why in plan.refused.items():
            typer.echo(f"not replayed: {dlq_id}: {why}", err=True)
        if not plan.letters:
            _fail("no dead letter to replay", 1)
        stages = ", ".join(f"{name} {n}" for name, n in plan.by_stage().items())
        if not yes:
            typer.echo(f"would replay {len(plan.letters)} dead letters ({stages}); nothing "
                       "was published: add --yes to publish them")
            return
        actor, target = local_actor(), f"{len(plan.letters)} dead letters ({stages})"
        try:
            trail.record(actor=actor, actor_role="operator", channel="cli",
                         action="dead_letter_replay", outcome="requested", target=target,
                         detail=" ".join(d for d, *_ in plan.letters))
        except AuditError as exc:
            _fail(f"{exc}: nothing was replayed")
        producer = Producer(_kafka_for_client().producer_config())
        failures: list[str] = []

        def delivered(error: Any, _message: Any) -> None:
            if error is not None:
                failures.append(str(error))

        def produce(topic: str, key: bytes | None, value: bytes,
                    headers: list[tuple[str, str | bytes | None]]) -> None:
            producer.produce(topic, key=key, value=value, headers=list(headers),
                             on_delivery=delivered)
            producer.poll(0)

        def progress(done: int, total: int) -> None:
            if done % 500 == 0 or done == total:
                typer.echo(f"replayed {done} of {total}")

        try:
            sent = replay(run, database, plan, _dead_letter_secret(), produce, progress)
        except (SealingError, ValueError) as exc:
            failures.append(f"cannot unseal: {exc}")
            sent = 0
        unsent = producer.flush(60)
        outcome = "failed" if failures or unsent else "ok"
        _record(trail, actor, "operator", "dead_letter_replay", outcome, target=target,
                rows=sent - unsent, detail="; ".join(failures[:5]))
    if failures or unsent:
        _fail(f"{len(failures) + unsent} of {len(plan.letters)} dead letters were not "
              f"published again ({'; '.join(failures[:3]) or 'no broker acknowledgement'})")
    typer.echo(f"published {sent} original records again ({stages}); each is processed like "
               "a new record (the same event ids: nothing is stored twice)")


@app.command()
def bench(
    events: Annotated[int, typer.Option(help="clinical records per run")] = 30000,
    json_path: Annotated[Path | None, typer.Option("--json", help="write the figures here")] = None,
    workers: Annotated[int, typer.Option(help="Faust workers for the pipeline run")] = 2,
    keep_data: Annotated[bool, typer.Option(help="keep the runs' logs and engines")] = False,
    broker: Annotated[
        str,
        typer.Option(help="auto, kafka or tansu (default: MEDSTREAM_EMBEDDED_BROKER)"),
    ] = "",
    idle_seconds: Annotated[
        float, typer.Option(help="seconds of the idle CPU measurement (0 = skip it)")
    ] = 30.0,
    guarantee: Annotated[
        str,
        typer.Option(
            help="at_least_once or exactly_once (default: MEDSTREAM_STREAMS_PROCESSING_GUARANTEE)"
        ),
    ] = "",
) -> None:
    """Measure the raw baseline and the full pipeline in one invocation, on one broker
    (printed); PASS/MISS against the targets; exit 1 on loss."""
    from medstream.bench import BenchRefused, run_bench
    from medstream.runtime import EmbeddedRuntimeError

    if broker not in ("", "auto", "kafka", "tansu"):
        _fail(f"--broker must be auto, kafka or tansu, not {broker!r}", 2)
    if guarantee not in ("", "at_least_once", "exactly_once"):
        _fail(f"--guarantee must be at_least_once or exactly_once, not {guarantee!r}", 2)
    try:
        result = run_bench(
            events, workers, out=typer.echo, keep_data=keep_data, broker=broker,
            idle_s=idle_seconds,
            guarantee=cast(ProcessingGuarantee, guarantee) if guarantee else None,
        )
    except (EmbeddedRuntimeError, BenchRefused) as exc:
        _fail(str(exc))
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2, default=str))
        typer.echo(f"figures written to {json_path}")
    raise typer.Exit(0 if result["ok"] else 1)


@app.command("faults")
def faults_command(
    trials: Annotated[int, typer.Option(help="trials per kind", min=1)] = 3,
    kinds: Annotated[
        str,
        typer.Option(
            help="comma-separated: worker, sink, worker+sink, collector, broker, "
            "cluster-broker, graceful (or all)"
        ),
    ] = "all",
    events: Annotated[int, typer.Option(help="simulated clinical records per trial", min=1)] = 8000,
    rate: Annotated[float, typer.Option(help="simulated records per second", min=1)] = 400.0,
    seed: Annotated[
        int | None, typer.Option(help="seed of the plan (default: a new one, printed)")
    ] = None,
    broker: Annotated[str, typer.Option(help="kafka or tansu (embedded)")] = "kafka",
    workers: Annotated[int, typer.Option(help="Faust worker processes per run", min=1)] = 2,
    json_path: Annotated[Path | None, typer.Option("--json", help="write the results here")] = None,
    keep: Annotated[
        bool, typer.Option(help="keep the data directories of failed trials (logs are kept always)")
    ] = False,
    merge: Annotated[
        list[Path] | None,
        typer.Option(
            help="run nothing: add up the trials of earlier --json files (repeatable), e.g. "
            "the kinds of a long run split over several sittings, and print their table"
        ),
    ] = None,
) -> None:
    """kill -9 trials against `medstream up` (a worker, the sink, both, an MLLP collector,
    the broker, one broker of a three-node cluster) and a graceful stop under backlog, each
    counted against ground truth; a table of the losses; exit 1 on any loss or duplicate.
    With --json the results are written after every trial, so a run cut short keeps them."""
    from medstream.faults import (
        code_version,
        describe_code,
        exit_code,
        parse_kinds,
        read_suites,
        render_table,
        run_faults,
        runnable_kinds,
        suite_json,
        summarise,
        write_json,
    )

    if merge:
        try:
            results, merged = read_suites(merge)
        except ValueError as exc:
            _fail(str(exc), 2)
        for setting in merged:
            planned = int(setting.get("trials", 0)) * len(setting.get("kinds", []))
            short = (
                f" (STOPPED EARLY: {setting['trials_run']} of {planned} planned)"
                if setting["trials_run"] < planned else ""
            )
            typer.echo(
                f"{setting['file']}: {setting['trials_run']} trials of "
                f"{', '.join(setting.get('kinds', []))}, {setting.get('events')} events at "
                f"{setting.get('rate')}/s, broker {setting.get('broker')}, seed "
                f"{setting.get('seed')}, {describe_code(setting.get('code'))}{short}"
            )
        codes = {describe_code(setting.get("code")) for setting in merged}
        if len(codes) > 1:
            typer.echo(f"NOTE: these runs ran on {len(codes)} code versions "
                       f"({', '.join(sorted(codes))}): the table adds up trials of different "
                       "code")
        elif len(merged) > 1 and codes == {describe_code(None)}:
            typer.echo("NOTE: none of these runs recorded its code version: whether they ran "
                       "on the same code cannot be told")
        if not results:
            _fail("the merged files hold no trial", 1)
        typer.echo(render_table(summarise(results)))
        if json_path is not None:
            write_json(json_path, suite_json(results, {"merged": merged}))
            typer.echo(f"results written to {json_path}")
        raise typer.Exit(exit_code(results))

    if broker not in ("kafka", "tansu"):
        _fail(f"--broker must be kafka or tansu, not {broker!r}", 2)
    try:
        chosen = runnable_kinds(parse_kinds(kinds), broker, typer.echo)
    except ValueError as exc:
        _fail(str(exc), 2)
    if not chosen:
        _fail(f"no fault kind of {kinds!r} runs on {broker}", 2)
    if seed is None:
        seed = secrets.randbelow(1_000_000)
    settings = {
        "trials": trials, "kinds": chosen, "events": events, "rate": rate, "seed": seed,
        "broker": broker, "workers": workers, "code": code_version(),
    }

    def save(so_far: list[Any]) -> None:
        if json_path is not None:
            write_json(json_path, suite_json(so_far, settings))

    results = run_faults(
        chosen, trials, events, rate, seed, broker, workers, keep, typer.echo, save
    )
    typer.echo(render_table(summarise(results)))
    if json_path is not None:
        save(results)
        typer.echo(f"results written to {json_path}")
    code = exit_code(results)
    if code:
        failed = sum(1 for r in results if not r.ok)
        typer.echo(f"{failed} of {len(results)} trials lost, doubled or missed something", err=True)
    raise typer.Exit(code)


def _embedded_engine(command: str) -> Path:
    """The embedded engine directory; a ClickHouse server URL is refused with its remedy."""
    ch, runtime = ClickHouseSettings(), RuntimeSettings()
    url = clickhouse_url(ch, runtime)
    if not url.startswith("chdb://"):
        _fail(
            f"`medstream {command}` works on the embedded engine; back a ClickHouse server up "
            "with its own BACKUP DATABASE ... TO Disk('backups', ...) (see deploy/README.md)",
            2,
        )
    if RuntimeState.read(runtime) is not None:
        _fail(f"`medstream up` is running on {runtime.data_dir}: stop it before `{command}`", 2)
    return Path(url.removeprefix("chdb://"))


@app.command("backup")
def backup_command(
    target: Annotated[Path, typer.Argument(help="a new directory to write the backup to")],
) -> None:
    """Back the embedded ClickHouse database up (BACKUP DATABASE) with a row-count manifest."""
    from medstream.backup import backup_embedded

    engine = _embedded_engine("backup")
    try:
        backup_embedded(engine, ClickHouseSettings().database, target, typer.echo)
    except QueryError as exc:
        _fail(str(exc))


@app.command("restore")
def restore_command(
    source: Annotated[Path, typer.Argument(help="a directory written by `medstream backup`")],
) -> None:
    """Restore a backup into a fresh embedded engine and check every table's row count."""
    from medstream.backup import restore_embedded

    engine = _embedded_engine("restore")
    try:
        report = restore_embedded(engine, source, typer.echo)
    except QueryError as exc:
        _fail(str(exc))
    if report.mismatches:
        _fail(f"{len(report.mismatches)} tables differ from the backup")


users_app = typer.Typer(
    no_args_is_help=True,
    help="Console and SQL users: roles monitor, analyst and admin, organisation scope.",
)
app.add_typer(users_app, name="users")
Organisations = Annotated[
    list[str] | None,
    typer.Option("--org", help="organisation in scope (repeatable; '*' = every organisation)"),
]


def _users() -> Any:
    from medstream.access import UserStore
    from medstream.settings import ConsoleSettings

    return UserStore(ConsoleSettings().users_path(RuntimeSettings()))


def _new_password(password_stdin: bool) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\n")
    return str(typer.prompt("new password", hide_input=True, confirmation_prompt=True))


def _config_change(target: str, detail: str) -> None:
    """Audit a change of medstream's configuration made from this shell."""
    _audit_or_fail("config_change", target, detail)


def _audit_or_fail(
    action: str, target: str, detail: str, actor: str | None = None, outcome: str = "ok"
) -> None:
    """Audit an action taken from this shell; the action is refused when it cannot be
    audited (so call this before taking it)."""
    from medstream.audit import AuditError, local_actor

    with _query_and_audit(1) as (_, trail):
        try:
            trail.record(actor=actor or local_actor(), actor_role="operator", channel="cli",
                         action=action, outcome=outcome, target=target, detail=detail)
        except AuditError as exc:
            _fail(f"{exc}: nothing was done")


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="user name (lower case)")],
    role_name: Annotated[str, typer.Option("--role", help="monitor, analyst or admin")],
    org: Organisations = None,
    password_stdin: Annotated[
        bool, typer.Option(help="read the password from standard input (one line)")
    ] = False,
) -> None:
    """Add a user (asks for the password twice)."""
    from medstream.access import AccessError

    store = _users()
    try:
        if name in store.users():
            raise AccessError(f"user {name!r} exists (use `medstream users set` to change it)")
        user = store.new_user(name, role_name, org or [], _new_password(password_stdin))
        _config_change(f"user:{name}", f"user added: role {user.role}, organisations "
                       + ",".join(user.organisations))
        store.save(user)
    except AccessError as exc:
        _fail(str(exc), 2)
    typer.echo(f"added {user.name} ({user.role}; {', '.join(user.organisations)}) to {store.path}")


@users_app.command("set")
def users_set(
    name: Annotated[str, typer.Argument(help="user name")],
    role_name: Annotated[str | None, typer.Option("--role", help="new role")] = None,
    org: Organisations = None,
    password: Annotated[bool, typer.Option("--password", help="set a new password")] = False,
    password_stdin: Annotated[
        bool, typer.Option(help="with --password: read it from standard input")
    ] = False,
    disabled: Annotated[
        bool | None, typer.Option("--disable/--enable", help="disable or enable sign-in")
    ] = None,
) -> None:
    """Change a user's role, organisations, password or sign-in."""
    from medstream.access import AccessError

    store = _users()
    try:
        store.get(name)
        new_password = _new_password(password_stdin) if password else None
        user = store.changed(name, role_name, org or None, new_password, disabled)
        changes = [
            f"role {role_name}" if role_name else "",
            f"organisations {','.join(org)}" if org else "",
            "password changed" if password else "",
            ("disabled" if disabled else "enabled") if disabled is not None else "",
        ]
        _config_change(f"user:{name}", "user changed: " + "; ".join(c for c in changes if c))
        store.save(user)
    except AccessError as exc:
        _fail(str(exc), 2)
    state = "disabled" if user.disabled else "enabled"
    typer.echo(f"{user.name}: {user.role}; {', '.join(user.organisations)}; {state}")


@users_app.command("remove")
def users_remove(name: Annotated[str, typer.Argument(help="user name")]) -> None:
    """Remove a user (open console sessions end at their next request)."""
    from medstream.access import AccessError

    store = _users()
    try:
        store.get(name)
        _config_change(f"user:{name}", "user removed")
        store.remove(name)
    except AccessError as exc:
        _fail(str(exc), 2)
    typer.echo(f"removed {name}")


@users_app.command("list")
def users_list() -> None:
    """Every user with role, scope and state (never the password hash)."""
    users = _users().users()
    rows = [
        [u.name, u.role, ", ".join(u.organisations), "disabled" if u.disabled else "enabled"]
        for u in users.values()
    ]
    typer.echo(render_table(["name", "role", "organisations", "state"], rows) if rows
               else "no users (add one with `medstream users add`)")


@app.command("audit")
def audit_command(
    since: Annotated[
        str | None, typer.Option(help="only events newer than this: 30m, 2h, 7d, or ISO time")
    ] = None,
    actor: Annotated[str | None, typer.Option("--user", help="only this actor")] = None,
    action: Annotated[
        str | None,
        typer.Option(help="only this action: sign_in, sign_in_failed, sign_out, query, "
                     "alert_acknowledge, alert_resolve, config_change, request_refused, "
                     "audit_read, dead_letter_open"),
    ] = None,
    limit: Annotated[int, typer.Option(help="newest events to show")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table")] = False,
) -> None:
    """Print the audit log (sign-ins, queries, alert actions, configuration changes),
    newest first."""
    from medstream.audit import audit_query, rows_of

    since_ms = None
    if since:
        since_ms = int(_since(since).timestamp() * 1000)
    try:
        sql_text = audit_query(ClickHouseSettings().database, since_ms, actor, action, limit)
        with _querier(limit) as run:
            result = run(sql_text)
    except (ValueError, QueryError) as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(rows_of(result), default=str, ensure_ascii=False))
        return
    rows = [[str(v)[:80] if v is not None else "" for v in row] for row in result.rows]
    typer.echo(render_table(result.columns, rows) if rows else "no audit events")


def _since(text: str) -> datetime:
    import re

    match = re.fullmatch(r"(\d+)([mhd])", text.strip())
    if match:
        unit = {"m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
        return datetime.now(tz=UTC) - timedelta(**{unit: int(match.group(1))})
    try:
        return _parse_time(text)
    except ValueError:
        _fail(f"--since takes 30m, 2h, 7d or an ISO time, got {text!r}", 2)


@app.command("grants")
def grants_command(
    service_user: Annotated[
        str, typer.Option(help="ClickHouse user the medstream services connect as")
    ] = "medstream",
) -> None:
    """Print the ClickHouse statements that give a server medstream's role model: roles,
    column-level grants within each clearance, users (same bcrypt hashes) and row policies
    for each user's organisations (users scoped to some organisations are granted only the
    objects that carry the organisation filter, and no audit log). Apply them as a
    ClickHouse admin."""
    from medstream.access import QueryGovernor, analyst_columns, grant_statements

    database = ClickHouseSettings().database
    try:
        with _querier(PROOF_MAX_ROWS) as run:
            columns = analyst_columns(run, database)
            scoped = QueryGovernor(database, lambda q, _s, _r: run(q)).scoped_tables()
    except QueryError as exc:
        _fail(str(exc))
    statements = grant_statements(
        _users().users().values(), database, columns, scoped, service_user
    )
    typer.echo("-- generated by `medstream grants`; apply as a ClickHouse admin")
    for statement in statements:
        typer.echo(statement + ";")


@app.command("console")
def console_command(
    port: Annotated[
        int | None, typer.Option(help="listen on this port (default MEDSTREAM_CONSOLE_PORT)")
    ] = None,
    query_url: Annotated[
        str | None, typer.Option(help="a running sink's query endpoint (set by `up`)")
    ] = None,
    metrics_port: MetricsPort = 0,
) -> None:
    """Serve the live alert console and its SQL endpoint (started by `medstream up`)."""
    from medstream.access import UserStore
    from medstream.audit import AuditTrail
    from medstream.console import Console, Querier, run_console
    from medstream.settings import ConsoleSettings
    from schemas.serde import registry_from_url

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings, ch, runtime = ConsoleSettings(), ClickHouseSettings(), RuntimeSettings()
    kafka = _kafka_for_client()
    registry = registry_from_url(RegistrySettings().url)
    if ch.url.startswith(("http://", "https://")):
        client = open_clickhouse(ch, runtime)
        lock = threading.Lock()
        limits = QueryLimits.of(ch)

        def run(
            sql: str, extra: dict[str, Any] | None, max_rows: int, timeout_s: int
        ) -> QueryResult:
            with lock:
                return run_read_only(
                    client, sql, ch.database, timeout_s, max_rows, extra, limits
                )
    else:
        state = RuntimeState.read(runtime)
        url = query_url or (state.query_url if state else None)
        if not url:
            _fail(
                "the console needs a ClickHouse server (CLICKHOUSE_URL=http(s)://...) or, for "
                "the embedded engine, a running `medstream up` (--query-url)"
            )

        _query_token(runtime)  # unreadable now: say so at once

        def run(
            sql: str, extra: dict[str, Any] | None, max_rows: int, timeout_s: int
        ) -> QueryResult:
            # Read per query: a sink that `up` restarted serves with a new token.
            token = read_query_token(runtime.query_token_file)
            return query_via_gateway(url, sql, timeout_s, max_rows, extra, token=token)

    _start_metrics(metrics_port)
    users = UserStore(settings.users_path(runtime))
    console = Console(
        settings, users, kafka, registry, Querier(run, settings.sql_timeout_s),
        AuditTrail(kafka, registry, key=_audit_key()),
        ch.database,
    )
    listen = port if port is not None else settings.port
    run_console(console, settings.host, listen,
                lambda url: typer.echo(f"console listening on {url}"))


@app.command("settings")
def settings_command() -> None:
    """List every setting with its environment variable and current value (secrets hidden)."""
    for model in SETTINGS_MODELS:
        instance = model()
        variables = environment_variables(model)
        typer.echo(f"[{model.__name__}]")
        for name, info in model.model_fields.items():
            env = variables[name][0]
            value = getattr(instance, name)
            typer.echo(f"  {env:<42} = {value!s:<28} {info.description or ''}")
