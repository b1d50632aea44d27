"""The `medstream` command line: run the pipeline, its parts, and the proofs.

Settings come from the environment (see each command's --help and `medstream settings`);
KAFKA_BOOTSTRAP_SERVERS, CLICKHOUSE_URL and SCHEMA_REGISTRY_URL switch a part from the
embedded default to a real server.
"""

from __future__ import annotations

import json
import logging
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from medstream.clickhouse import (
    PROOF_MAX_ROWS,
    QueryError,
    QueryResult,
    migrate,
    open_clickhouse,
    query_via_gateway,
    run_read_only,
    sql_string,
)
from medstream.runtime import RuntimeState
from medstream.settings import (
    SETTINGS_MODELS,
    ClickHouseSettings,
    KafkaSettings,
    RegistrySettings,
    RuntimeSettings,
    SinkSettings,
    StreamSettings,
    clickhouse_url,
    environment_variables,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=(
        "medstream: real-time medical-data ingestion. Environment: KAFKA_BOOTSTRAP_SERVERS "
        "(empty = embedded tansu broker), CLICKHOUSE_URL (empty = embedded chdb under "
        "MEDSTREAM_DATA_DIR, default .medstream), SCHEMA_REGISTRY_URL (empty = schemas/ "
        "manifest), MEDSTREAM_* for the rest (`medstream settings` lists them)."
    ),
)

IN_FLIGHT_S = 10  # what `reconcile` leaves out while the pipeline runs
MetricsPort = Annotated[int, typer.Option(help="serve Prometheus /metrics on this port (0 = off)")]


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _kafka_for_client() -> KafkaSettings:
    """Kafka settings for a command that joins an existing broker (configured or `up`'s)."""
    kafka = KafkaSettings()
    if kafka.embedded:
        state = RuntimeState.read(RuntimeSettings())
        if state is None:
            _fail(
                "no Kafka: set KAFKA_BOOTSTRAP_SERVERS or start the embedded pipeline with "
                "`medstream up` (this command then joins its broker)"
            )
        kafka = kafka.model_copy(update={"bootstrap_servers": state.bootstrap_servers})
    return kafka


@contextmanager
def _querier(max_rows: int) -> Iterator[Callable[[str], QueryResult]]:
    """Queries go to a running `medstream up` when there is one, else to ClickHouse directly."""
    ch, runtime = ClickHouseSettings(), RuntimeSettings()
    state = RuntimeState.read(runtime)
    if state is not None and state.query_url and not ch.url:
        url = state.query_url
        yield lambda sql: query_via_gateway(url, sql, ch.query_timeout_s, max_rows)
        return
    client = open_clickhouse(ch, runtime)
    try:
        yield lambda sql: run_read_only(client, sql, ch.database, ch.query_timeout_s, max_rows)
    finally:
        client.close()


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
) -> None:
    """Run the whole pipeline: broker, topics, ClickHouse, stream workers, sink, collectors
    and (by default when no collector is configured) the simulator."""
    from medstream.supervisor import CollectorSpec, Supervisor

    streams = StreamSettings()
    if workers is not None:
        streams = streams.model_copy(update={"workers": workers})
    runtime = RuntimeSettings()
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
    supervisor = Supervisor(
        KafkaSettings(), ClickHouseSettings(), runtime, streams, collectors=collectors,
        simulate=simulate,
    )
    raise typer.Exit(supervisor.run(events, rate, seed, labels, exit_when_done))


@app.command()
def broker() -> None:
    """Run only the embedded tansu broker in the foreground and print its address."""
    from medstream.runtime import EmbeddedBroker, ensure_topics

    runtime = RuntimeSettings()
    runtime.data_dir.mkdir(parents=True, exist_ok=True)
    embedded = EmbeddedBroker(log_path=runtime.data_dir / "broker.log").start()
    kafka = KafkaSettings().model_copy(update={"bootstrap_servers": embedded.bootstrap_servers})
    ensure_topics(kafka)
    typer.echo(
        f"KAFKA_BOOTSTRAP_SERVERS={embedded.bootstrap_servers}  (Ctrl-C stops it; memory only)"
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
    applied = migrate(client, ch.database)
    typer.echo("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    from sinks.dictionary import refresh_data_dictionary

    fields = refresh_data_dictionary(client, ch.database)
    typer.echo(f"data_dictionary: {fields} fields of the Avro contracts")


@app.command()
def sink(
    metrics_port: MetricsPort = 0,
    query_port: Annotated[int, typer.Option(help="serve read-only queries here (0 = off)")] = 0,
) -> None:
    """Run the ClickHouse sink (norm.*, alerts, dlq and the raw ledger)."""
    from schemas.serde import registry_from_url
    from sinks.clickhouse import ClickHouseSink, SinkFailed

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    kafka = _kafka_for_client()
    ch, runtime = ClickHouseSettings(), RuntimeSettings()
    client = open_clickhouse(ch, runtime)
    applied = migrate(client, ch.database)
    from sinks.dictionary import refresh_data_dictionary

    refresh_data_dictionary(client, ch.database)
    if applied:
        logging.getLogger("medstream.sink").info("migrations applied: %s", ", ".join(applied))
    lock = threading.Lock()
    gateway = None
    if query_port:
        from medstream.clickhouse import QueryGateway

        gateway = QueryGateway(client, lock, ch.database, query_port)
        gateway.start()
    _start_metrics(metrics_port)
    writer = ClickHouseSink(
        kafka, SinkSettings(), client, ch.database, registry_from_url(RegistrySettings().url), lock
    )
    signal.signal(signal.SIGTERM, lambda *_: writer.stop())
    signal.signal(signal.SIGINT, lambda *_: writer.stop())
    try:
        writer.run()
    except SinkFailed as exc:
        _fail(str(exc))
    finally:
        if gateway is not None:
            gateway.stop()
        client.close()
    if writer.left_unstored:
        _fail("stopped with records read but not stored; they stay uncommitted for the next run")


@app.command()
def streams(metrics_port: MetricsPort = 0) -> None:
    """Run one Faust stream worker (normalise + critical values)."""
    from faust.worker import Worker

    from schemas.serde import registry_from_url
    from streams.app import create_app

    kafka = _kafka_for_client()
    faust_app = create_app(kafka, StreamSettings(), registry_from_url(RegistrySettings().url))
    _start_metrics(metrics_port)
    worker = Worker(faust_app, loglevel="WARNING", quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()


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
    """Publish a deterministic synthetic region's source messages to the raw topics."""
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
    )

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
) -> None:
    """Run a read-only query on the configured ClickHouse (also while `medstream up` runs)."""
    try:
        with _querier(max_rows) as run:
            result = run(query)
    except QueryError as exc:
        _fail(str(exc))
    rows = result.rows[:max_rows]
    if output == "json":
        records = [dict(zip(result.columns, r, strict=True)) for r in rows]
        typer.echo(json.dumps(records, default=str))
    elif output == "csv":
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(result.columns)
        writer.writerows(rows)
    else:
        typer.echo(render_table(result.columns, rows))
    if result.truncated or len(result.rows) > max_rows:
        typer.echo(f"(showing the first {len(rows)} rows)", err=True)


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
) -> None:
    """Count per source and stage (published, normalised, dead-lettered, stored); exit 1 on gaps."""
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
    try:
        with _querier(PROOF_MAX_ROWS) as run:
            report = reconcile(run, database, start, end)
            label_check = (
                check_labels(run, database, read_labels(labels), start) if labels else None
            )
    except QueryError as exc:
        _fail(str(exc))
    ok = report.ok and (label_check is None or label_check.ok)
    if as_json:
        body = report.as_dict()
        if label_check is not None:
            body["labels"] = {
                **label_check.__dict__,
                "missing_events": label_check.missing_events[:20],
            }
        typer.echo(json.dumps(body, default=str, indent=2))
    else:
        typer.echo(report.render())
        if label_check is not None:
            typer.echo(
                f"ground truth: {label_check.stored_events}/{label_check.expected_events} "
                f"events stored, {label_check.duplicated_events} duplicated, dead letters "
                f"{label_check.found_dead_letters}/{label_check.expected_dead_letters}, alerts "
                f"{label_check.found_alerts}/{label_check.expected_alerts} "
                f"({label_check.unexpected_alerts} unexpected)"
            )
    raise typer.Exit(0 if ok else 1)


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
    from medstream.evaluate import LabelsError, evaluate, load_labels

    try:
        expected = load_labels(labels)
        start = _parse_time(since) if since else None
        end = _parse_time(until) if until else None
    except LabelsError as exc:
        _fail(str(exc), 2)
    except ValueError as exc:
        _fail(f"--since/--until must be ISO times: {exc}", 2)
    database = ClickHouseSettings().database
    try:
        with _querier(PROOF_MAX_ROWS) as run:
            report = evaluate(run, database, expected, start, end)
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
    """The steward's worklist: unmapped or ambiguous local codes, counts, ranked candidates."""
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


ACTION_CONFIRM_S = 30.0


def _alert_action(action: str, alert_id: str, actor: str, note: str | None) -> None:
    from medstream.alert_actions import AlertActionError, current_state, send_action
    from schemas.serde import registry_from_url

    try:
        with _querier(PROOF_MAX_ROWS) as run:
            alert = current_state(run, ClickHouseSettings().database, alert_id)
        send_action(
            _kafka_for_client(), registry_from_url(RegistrySettings().url), alert, action,
            actor, note,
        )
    except (QueryError, AlertActionError) as exc:
        _fail(str(exc))
    # The stream applies the action in order with the alert's findings: wait until the
    # new state is stored, so "done" means done (a refusal there is only a worker log line).
    wanted = "acknowledged" if action == "acknowledge" else "resolved"
    deadline = time.monotonic() + ACTION_CONFIRM_S
    while time.monotonic() < deadline:
        try:
            with _querier(PROOF_MAX_ROWS) as run:
                status = current_state(run, ClickHouseSettings().database, alert_id).status
        except (QueryError, AlertActionError):
            status = ""
        if status == wanted or (wanted == "acknowledged" and status == "resolved"):
            typer.echo(f"alert {alert_id} is {status} (by {actor.strip()})")
            return
        time.sleep(0.5)
    _fail(
        f"the {action} was sent but alert {alert_id} is still {alert.status} after "
        f"{ACTION_CONFIRM_S:.0f} s: see the stream workers' log"
    )


AlertNote = Annotated[
    str | None,
    typer.Option(help="note; ID and phone numbers and labelled names are removed, so write "
                 "no other identifier"),
]


@alerts_app.command("ack")
def alerts_ack(
    alert_id: Annotated[str, typer.Argument(help="the alert id")],
    by: Annotated[str, typer.Option("--by", help="who acknowledges (recorded)")],
    note: AlertNote = None,
) -> None:
    """Acknowledge an open alert: it stops escalating."""
    _alert_action("acknowledge", alert_id, by, note)


@alerts_app.command("resolve")
def alerts_resolve(
    alert_id: Annotated[str, typer.Argument(help="the alert id")],
    by: Annotated[str, typer.Option("--by", help="who resolves (recorded)")],
    note: AlertNote = None,
) -> None:
    """Resolve an open or acknowledged alert."""
    _alert_action("resolve", alert_id, by, note)


@dlq_app.command("show")
def dlq_show(
    dlq_id: Annotated[str, typer.Argument(help="the dead letter's id")],
    raw: Annotated[bool, typer.Option(help="write the original bytes to stdout as is")] = False,
) -> None:
    """Unseal one dead letter's original record (needs the sink's dead-letter secret)."""
    from medstream.sealing import SealingError, derive_key, unseal
    from sinks.clickhouse import DEAD_LETTER_PURPOSE

    database = ClickHouseSettings().database
    try:
        with _querier(PROOF_MAX_ROWS) as run:
            rows = run(
                f"SELECT stage, reason_code, reason, original_topic, original_partition, "
                f"original_offset, hex(original_value) FROM {database}.dead_letter FINAL "
                f"WHERE dlq_id = {sql_string(dlq_id)}"
            ).rows
    except QueryError as exc:
        _fail(str(exc))
    if not rows:
        _fail(f"no dead letter {dlq_id}")
    stage, reason_code, reason, topic, partition, offset, sealed = rows[0]
    try:
        key = derive_key(
            SinkSettings().dead_letter_secret.get_secret_value().encode(), DEAD_LETTER_PURPOSE
        )
        original = unseal(bytes.fromhex(sealed), key, dlq_id.encode())
    except (SealingError, ValueError) as exc:
        _fail(f"cannot unseal dead letter {dlq_id}: {exc}")
    if raw:
        sys.stdout.buffer.write(original)
        return
    typer.echo(f"{stage} / {reason_code}: {reason}\nfrom {topic}[{partition}]@{offset}, "
               f"{len(original)} bytes:")
    typer.echo(original.decode("utf-8", errors="backslashreplace"))


@app.command()
def bench(
    events: Annotated[int, typer.Option(help="clinical records per run")] = 30000,
    json_path: Annotated[Path | None, typer.Option("--json", help="write the figures here")] = None,
    workers: Annotated[int, typer.Option(help="Faust workers for the pipeline run")] = 2,
    keep_data: Annotated[bool, typer.Option(help="keep the runs' logs and engines")] = False,
) -> None:
    """Measure the raw baseline and the full pipeline in one invocation; exit 1 on loss."""
    from medstream.bench import run_bench

    result = run_bench(events, workers, out=typer.echo, keep_data=keep_data)
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2, default=str))
        typer.echo(f"figures written to {json_path}")
    raise typer.Exit(0 if result["ok"] else 1)


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
