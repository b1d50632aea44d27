"""ClickHouse access shared by the CLI, the sink and the runtime: connect, migrate, query.

The embedded engine (chdb) can be opened by one process only. The process that owns it
(the sink under `medstream up`) serves a small read-only query endpoint
(medstream.query_endpoint), and commands that run beside it (`medstream sql`, `medstream
reconcile`) send their queries there; without a running owner they open the engine
themselves. Either way every read-only query goes through :func:`run_read_only`, which
checks what it reaches (medstream.sqlcheck) and bounds it.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Final, TextIO

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from medstream import sqlcheck
from medstream.settings import ClickHouseSettings, RuntimeSettings, clickhouse_url

READ_ONLY = {"readonly": 2}  # 2: no writes or DDL, but per-query limits may still be set
USER_MAX_ROWS = 10_000  # default result bound of `medstream sql`
PROOF_MAX_ROWS = 100_000_000  # reconcile and ground-truth checks must see every row
_DB_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class QueryError(RuntimeError):
    """A query was refused or failed; the message is ClickHouse's reason."""


class QueryRefused(QueryError):
    """A query was refused before it ran (what it reaches is not allowed); the message
    says what and why."""


#: First characters that make a spreadsheet read a CSV cell as a formula.
CSV_FORMULA_PREFIXES: Final = ("=", "+", "-", "@", "\t", "\r")


def write_csv(out: TextIO, columns: list[str], rows: list[list[Any]]) -> None:
    """A query result as CSV a spreadsheet shows as text: a cell starting with a formula
    character gets a leading apostrophe (OWASP's CSV injection advice); numbers are left
    alone. The console's export and ``medstream sql --format csv`` both write this."""

    def cell(value: Any) -> Any:
        if isinstance(value, str) and value.startswith(CSV_FORMULA_PREFIXES):
            return "'" + value
        return value

    writer = csv.writer(out)
    writer.writerow([cell(c) for c in columns])
    writer.writerows([cell(v) for v in row] for row in rows)


@dataclass(frozen=True)
class QueryResult:
    """Column names and rows of a read-only query."""

    columns: list[str]
    rows: list[list[Any]]
    truncated: bool = False


def sql_string(text: str) -> str:
    """``text`` as a ClickHouse string literal (backslashes and quotes escaped)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def connect(
    url: str, ca_cert: str | None = None, chdb_config: Path | None = None
) -> Client:
    """Open a client for an http(s):// ClickHouse server or a chdb:///path engine.

    ``ca_cert`` is the CA bundle that signed an https:// server's certificate (the server's
    certificate is always verified); ``chdb_config`` an extra ClickHouse configuration file
    for the embedded engine (backups use it to allow their directory).
    """
    if url.startswith("chdb://"):
        path = Path(url.removeprefix("chdb://"))
        path.mkdir(parents=True, exist_ok=True)
        options = {"config-file": str(chdb_config)} if chdb_config else None
        try:
            return clickhouse_connect.get_client(dsn=f"chdb://{path}", chdb_options=options)
        except Exception as exc:
            if "lock" in str(exc).lower():
                raise QueryError(
                    f"the embedded ClickHouse at {path} is open in another process (a running "
                    "`medstream up` or sink): queries go through a running `medstream up`, "
                    "other commands need it stopped first"
                ) from exc
            raise
    if url.startswith(("http://", "https://")):
        if not ca_cert:
            return clickhouse_connect.get_client(dsn=url)
        if not url.startswith("https://"):
            raise QueryError("MEDSTREAM_CLICKHOUSE_CA_CERT is set but CLICKHOUSE_URL is not https://")
        if not Path(ca_cert).is_file():
            raise QueryError(f"MEDSTREAM_CLICKHOUSE_CA_CERT {ca_cert} is not a readable file")
        return clickhouse_connect.get_client(dsn=url, verify=True, ca_cert=ca_cert)
    raise QueryError(f"CLICKHOUSE_URL must start with http://, https:// or chdb://, got {url!r}")


def migration_files() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every migration shipped in sinks/migrations, in order."""
    folder = resources.files("sinks").joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        match = re.match(r"^(\d{4})_(\w+)\.sql$", entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text()))
    return sorted(found)


def migration_statements(sql: str, database: str, cluster: str = "") -> list[str]:
    """The statements of one migration file for ``database``; with a ``cluster``, every table
    is replicated (Replicated*MergeTree on Keeper paths from the servers' macros) and every
    DDL statement runs ON CLUSTER, so each replica gets the same tables and the data."""
    statements = _statements(sql.replace("{db}", database))
    return [replicated(s, cluster) for s in statements] if cluster else statements


_ENGINE = re.compile(r"ENGINE = (Replacing|Aggregating)?MergeTree(?:\(([^)]*)\))?")
_DDL = re.compile(
    r"^((?:CREATE (?:MATERIALIZED VIEW|VIEW|TABLE|DATABASE) IF NOT EXISTS|ALTER TABLE"
    r"|DROP (?:TABLE|VIEW|DATABASE) IF EXISTS) \S+)"
)


def replicated(statement: str, cluster: str) -> str:
    """One statement for a replicated cluster (see migration_statements)."""
    if not _DB_NAME.match(cluster):
        raise QueryError(f"invalid cluster name {cluster!r}")

    def engine(match: re.Match[str]) -> str:
        arguments = ["'/clickhouse/tables/{shard}/{database}/{table}'", "'{replica}'"]
        if match.group(2):
            arguments.append(match.group(2))
        return f"ENGINE = Replicated{match.group(1) or ''}MergeTree({', '.join(arguments)})"

    text = _ENGINE.sub(engine, statement)
    text = text.replace("non_replicated_deduplication_window", "replicated_deduplication_window")
    return _DDL.sub(lambda m: f"{m.group(1)} ON CLUSTER {cluster}", text, count=1)


def migrate(client: Client, database: str, cluster: str = "") -> list[str]:
    """Apply pending migrations idempotently; returns the names applied now. ``cluster``
    (a ClickHouse server's remote_servers name) replicates every table to every replica."""
    if not _DB_NAME.match(database):
        raise QueryError(f"invalid database name {database!r}")
    bootstrap = (
        f"CREATE DATABASE IF NOT EXISTS {database}",
        f"CREATE TABLE IF NOT EXISTS {database}.schema_migrations "
        "(version UInt32, name String, applied_time DateTime64(3, 'UTC') DEFAULT now64(3)) "
        "ENGINE = MergeTree ORDER BY version",
    )
    for statement in bootstrap:
        client.command(replicated(statement, cluster) if cluster else statement)
    recorded = client.query(f"SELECT version FROM {database}.schema_migrations")
    done = {row[0] for row in recorded.result_rows}
    applied = []
    for version, name, sql in migration_files():
        if version in done:
            continue
        for statement in migration_statements(sql, database, cluster):
            client.command(statement)
        client.insert(
            f"{database}.schema_migrations", [(version, name)], column_names=["version", "name"]
        )
        applied.append(f"{version:04d}_{name}")
    return applied


def _statements(sql: str) -> list[str]:
    without_comments = "\n".join(
        line for line in sql.splitlines() if not line.lstrip().startswith("--")
    )
    return [part.strip() for part in without_comments.split(";") if part.strip()]


@dataclass(frozen=True)
class QueryLimits:
    """What one read-only query may use besides time: memory, result bytes and threads
    (the engine cancels a query that goes past its time or memory)."""

    memory_bytes: int = 2 << 30
    result_bytes: int = 64 << 20
    threads: int = 2

    @staticmethod
    def of(ch: ClickHouseSettings) -> QueryLimits:
        """The limits configured for ``ch``."""
        return QueryLimits(
            ch.query_max_memory_mb << 20, ch.query_max_result_mb << 20, ch.query_max_threads
        )


DEFAULT_LIMITS = QueryLimits()
_EXPLAIN = re.compile(r"^\s*EXPLAIN\s+(AST|QUERY\s+TREE)\s+", re.IGNORECASE)
#: The row filter of an organisation scope, as access.organisation_filter writes it.
ORGANISATION_FILTER = re.compile(r"organisation_id\s+IN\s*\((?:'(?:[^'\\]|\\.)*'|[\s,])*\)")


def checked_statement(
    client: Client, sql: str, database: str
) -> tuple[str | None, str, list[str]]:
    """(``"AST"``, ``"QUERY TREE"`` or None, the SELECT, its parse tree lines) of a statement
    any caller may run; QueryError when it reaches outside ``database`` and its analyst
    database (see medstream.sqlcheck). Only ``EXPLAIN AST`` runs here: it parses and
    executes nothing."""
    explain = _EXPLAIN.match(sql)
    kind = re.sub(r"\s+", " ", explain.group(1).upper()) if explain else None
    statement = sql[explain.end():] if explain else sql
    try:
        sqlcheck.check_one_statement(statement)
        try:
            # No settings: the driver then adds no SETTINGS clause, so every Set node in
            # the tree is the statement's own.
            lines = explain_lines(client, f"EXPLAIN AST {statement}")
        except Exception as exc:
            raise QueryError(_clean_error(str(exc))) from exc
        tables = sqlcheck.statement_tables("\n".join(lines), statement, _local_tables(client))
        allowed = frozenset({database, f"{database}_analyst"})
        refused = sorted(t for t in tables if not sqlcheck.allowed_table(t, allowed))
        if refused:
            raise sqlcheck.StatementRefused(
                f"queries may not read {', '.join(refused)}: queries read the {database} and "
                f"{database}_analyst databases (and the engine's table catalogue) only"
            )
    except sqlcheck.StatementRefused as exc:
        raise QueryRefused(str(exc)) from exc
    return kind, statement, lines


def explain_lines(
    client: Client, explain: str, settings: dict[str, Any] | None = None
) -> list[str]:
    """The lines of an EXPLAIN, each exactly as the engine wrote it.

    Read raw: the driver's query() takes any statement ending in LIMIT 0 for a column probe
    (and fails on EXPLAIN's rows). The engine writes one row per line of the tree; a
    quoted name with a line break, which would print as two, is refused by sqlcheck."""
    if settings:
        # A SETTINGS clause of its own, as query() would add: the driver applies raw_query's
        # settings to an embedded engine by SET, and cannot undo a SET readonly.
        clause = ", ".join(f"{name} = {_setting_literal(v)}" for name, v in settings.items())
        explain = f"{explain}\n SETTINGS {clause}"
    raw = client.raw_query(explain, fmt=sqlcheck.EXPLAIN_FORMAT)
    return [_TSV_ESCAPE.sub(_unescape, line) for line in raw.decode("utf-8").split("\n") if line]


def _setting_literal(value: Any) -> str:
    """A setting value as a ClickHouse literal (maps for additional_table_filters)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        pairs = ", ".join(f"{sql_string(str(k))}: {_setting_literal(v)}" for k, v in value.items())
        return "{" + pairs + "}"
    return sql_string(str(value))


_TSV_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
_TSV_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "0": "\0", "b": "\b", "f": "\f"}


def _unescape(match: re.Match[str]) -> str:
    return _TSV_ESCAPES.get(match.group(1), match.group(1))


def _local_tables(client: Client) -> frozenset[str]:
    """Tables of the client's current database (what an unqualified name reaches), read for
    each check: a cached list would miss a table created since."""
    rows = client.query(
        "SELECT name FROM system.tables WHERE database = currentDatabase()"
    ).result_rows
    return frozenset(str(row[0]) for row in rows)


def run_read_only(
    client: Client,
    sql: str,
    database: str,
    timeout_s: int = 60,
    max_rows: int = USER_MAX_ROWS,
    settings: dict[str, Any] | None = None,
    limits: QueryLimits = DEFAULT_LIMITS,
) -> QueryResult:
    """Run one checked SELECT (or ``EXPLAIN AST``/``EXPLAIN QUERY TREE`` of one) with
    writes, DDL and reach outside the medstream databases refused, bounded in time, memory,
    threads and result rows and bytes.

    ``settings`` adds to (or tightens) the defaults: a governed query passes ``readonly=1``
    (no setting may be changed by the query itself) and its organisation row filters.
    Engine errors never show the row filters. A proof query (``max_rows`` of
    PROOF_MAX_ROWS) that would be cut fails instead.
    """
    kind, statement, tree = checked_statement(client, sql, database)
    if kind == "AST":  # the check already parsed it: nothing more to run
        return QueryResult(["explain"], [[line] for line in tree])
    extra = settings or {}
    engine_settings = {
        **READ_ONLY,
        **extra,
        "max_execution_time": timeout_s,
        "timeout_overflow_mode": "throw",
        "max_memory_usage": limits.memory_bytes,
        "max_threads": limits.threads,
        "max_result_rows": max_rows + 1,
        "max_result_bytes": limits.result_bytes,
        "result_overflow_mode": "break",
    }
    rows: list[list[Any]] = []
    size, truncated = 0, False
    try:
        # Streamed, so a result is cut (and the query cancelled) once it passes max_rows or
        # the byte limit, whatever the engine's own accounting of constant columns says.
        if kind is not None:  # EXPLAIN QUERY TREE: a small text, and chdb cannot stream it
            explained = explain_lines(client, sql, engine_settings)
            return QueryResult(
                ["explain"], [[line] for line in explained[:max_rows]],
                truncated=len(explained) > max_rows,
            )
        with client.query_row_block_stream(sql, settings=engine_settings) as stream:
            columns = list(stream.source.column_names)
            for block in stream:
                for row in block:
                    size += _row_bytes(row)
                    if len(rows) >= max_rows or size > limits.result_bytes:
                        truncated = True
                        break
                    rows.append(list(row))
                if truncated:
                    break
    except Exception as exc:
        message = _hide_filters(_clean_error(str(exc)), extra)
        raise QueryError(message + _LIMIT_HINTS.get(message.split(".")[0], "")) from exc
    if truncated and max_rows >= PROOF_MAX_ROWS:
        raise QueryError(
            f"the result passed {limits.result_bytes >> 20} MB; a reconcile or proof query must "
            "see every row, so nothing is returned (MEDSTREAM_CLICKHOUSE_QUERY_MAX_RESULT_MB)"
        )
    return QueryResult(columns, rows, truncated=truncated)


#: What to change when a query passed one of its limits (by ClickHouse error code).
_LIMIT_HINTS = {
    "Code: 159": " (the query was cancelled at its time limit: MEDSTREAM_CONSOLE_SQL_TIMEOUT_S "
    "in the console, MEDSTREAM_CLICKHOUSE_QUERY_TIMEOUT_S for `medstream sql`)",
    "Code: 241": " (the query was cancelled at its memory limit: "
    "MEDSTREAM_CLICKHOUSE_QUERY_MAX_MEMORY_MB)",
}


def _row_bytes(row: Any) -> int:
    """About how many bytes a result row takes (text length; 8 per number)."""
    return sum(
        len(value) if isinstance(value, str | bytes) else 8 if isinstance(value, int | float)
        else len(str(value))
        for value in row
    )


def _hide_filters(message: str, settings: dict[str, Any]) -> str:
    """An engine error without the text of the row filters it may quote (an error that
    echoes the query echoes its settings too; a query's own SETTINGS are refused, so any
    there are medstream's)."""
    echoed = message.find(" SETTINGS ")
    if echoed >= 0 and "additional_table_filters" in message[echoed:]:
        suffix = re.search(r"\. \([A-Z_]+\)$", message)
        message = message[:echoed] + " SETTINGS <hidden>" + (suffix.group(0) if suffix else "")
    for text in (settings.get("additional_table_filters") or {}).values():
        message = message.replace(str(text), "<organisation filter>")
    return ORGANISATION_FILTER.sub("<organisation filter>", message)


def _clean_error(message: str) -> str:
    """ClickHouse's reason without the driver's wrapping, nesting or version suffix."""
    match = re.search(r"Code: (\d+)\. DB::Exception: (.*)", message, re.DOTALL)
    if not match:
        return message
    code, text = match.groups()
    text = re.sub(r"^(?:Code: \d+\. DB::Exception: )+", "", text)
    text = re.split(r" \(version [\d.]+\)|\. Stack trace|\n", text)[0].strip()
    return f"Code: {code}. {text}"


def open_clickhouse(ch: ClickHouseSettings, runtime: RuntimeSettings) -> Client:
    """A client for the configured ClickHouse (server or embedded), with its TLS settings."""
    return connect(clickhouse_url(ch, runtime), ca_cert=ch.ca_cert or None)
