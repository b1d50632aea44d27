"""ClickHouse access shared by the CLI, the sink and the runtime: connect, migrate, query.

The embedded engine (chdb) can be opened by one process only. The process that owns it
(the sink under `medstream up`) serves a small read-only query endpoint, and commands that
run beside it (`medstream sql`, `medstream reconcile`) send their queries there; without a
running owner they open the engine themselves.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from medstream.settings import ClickHouseSettings, RuntimeSettings, clickhouse_url

READ_ONLY = {"readonly": 2}  # 2: no writes or DDL, but per-query limits may still be set
USER_MAX_ROWS = 10_000  # default result bound of `medstream sql`
PROOF_MAX_ROWS = 100_000_000  # reconcile and ground-truth checks must see every row
_DB_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class QueryError(RuntimeError):
    """A query was refused or failed; the message is ClickHouse's reason."""


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


def run_read_only(
    client: Client,
    sql: str,
    database: str,
    timeout_s: int = 60,
    max_rows: int = USER_MAX_ROWS,
    settings: dict[str, Any] | None = None,
) -> QueryResult:
    """Run one query with writes and DDL refused, bounded in time and result size.

    ``settings`` adds to (or tightens) the defaults: a governed query passes ``readonly=1``
    (no setting may be changed by the query itself) and its organisation row filters.
    """
    try:
        result = client.query(
            sql,
            settings={
                **READ_ONLY,
                **(settings or {}),
                "max_execution_time": timeout_s,
                "max_result_rows": max_rows + 1,
                "result_overflow_mode": "break",
            },
        )
    except Exception as exc:
        raise QueryError(_clean_error(str(exc))) from exc
    rows = [list(row) for row in result.result_rows]
    return QueryResult(list(result.column_names), rows[:max_rows], truncated=len(rows) > max_rows)


def _clean_error(message: str) -> str:
    """ClickHouse's reason without the driver's wrapping, nesting or version suffix."""
    match = re.search(r"Code: (\d+)\. DB::Exception: (.*)", message, re.DOTALL)
    if not match:
        return message
    code, text = match.groups()
    text = re.sub(r"^(?:Code: \d+\. DB::Exception: )+", "", text)
    text = re.split(r" \(version [\d.]+\)|\. Stack trace|\n", text)[0].strip()
    return f"Code: {code}. {text}"


def _governed_settings(settings: Any) -> dict[str, Any] | None:
    """The settings a gateway request may add: ``readonly=1``, row filters, and scalar
    subqueries left unfolded for a governed check (they narrow, never widen, what a query
    sees)."""
    if not settings:
        return None
    allowed = {"readonly", "additional_table_filters", "enable_scalar_subquery_optimization"}
    if not isinstance(settings, dict) or set(settings) - allowed:
        raise QueryError(f"a query may only add the settings {sorted(allowed)}")
    if settings.get("readonly", 1) != 1:
        raise QueryError("a query may only tighten readonly to 1")
    if settings.get("enable_scalar_subquery_optimization", 0) != 0:
        raise QueryError("scalar subquery optimisation may only be turned off")
    return {"readonly": 1, **settings}


class QueryGateway:
    """Serves read-only queries on an engine this process owns (POST /query, JSON)."""

    def __init__(self, client: Client, lock: threading.Lock, database: str, port: int = 0) -> None:
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                length = int(self.headers.get("Content-Length", "0"))
                request = json.loads(self.rfile.read(length) or b"{}")
                try:
                    with gateway.lock:
                        result = run_read_only(
                            gateway.client,
                            str(request.get("sql", "")),
                            gateway.database,
                            int(request.get("timeout_s", 60)),
                            int(request.get("max_rows", USER_MAX_ROWS)),
                            _governed_settings(request.get("settings")),
                        )
                    body = {
                        "columns": result.columns,
                        "rows": result.rows,
                        "truncated": result.truncated,
                    }
                    status = 200
                except QueryError as exc:
                    body, status = {"error": str(exc)}, 400
                payload = json.dumps(body, default=str).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                return  # queries may carry patient pseudonyms; they are not logged here

        self.client = client
        self.lock = lock
        self.database = database
        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """Where the gateway listens."""
        return f"http://127.0.0.1:{self.port}/query"

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


def query_via_gateway(
    url: str,
    sql: str,
    timeout_s: int = 60,
    max_rows: int = USER_MAX_ROWS,
    settings: dict[str, Any] | None = None,
) -> QueryResult:
    """Send one read-only query to a running gateway (``settings`` as for run_read_only)."""
    body = {"sql": sql, "timeout_s": timeout_s, "max_rows": max_rows, "settings": settings}
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s + 10) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read() or b"{}")
        raise QueryError(body.get("error", f"HTTP {exc.code}")) from exc
    return QueryResult(body["columns"], body["rows"], body["truncated"])


def open_clickhouse(ch: ClickHouseSettings, runtime: RuntimeSettings) -> Client:
    """A client for the configured ClickHouse (server or embedded), with its TLS settings."""
    return connect(clickhouse_url(ch, runtime), ca_cert=ch.ca_cert or None)
