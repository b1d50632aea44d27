"""Attacks on the embedded engine's query endpoint and on `medstream sql` without --user
(the operator's door), on the real chdb engine over real HTTP sockets: every one must be
refused, and the legitimate clients (token, JSON, own address) must still be served."""

from __future__ import annotations

import http.client
import json
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from medstream.clickhouse import QueryError, QueryLimits, connect
from medstream.query_endpoint import (
    QueryGateway,
    query_via_gateway,
    read_query_token,
    write_query_token,
)
from tests.e2e.test_pipeline import env_for, medstream

pytestmark = pytest.mark.integration


@pytest.fixture
def endpoint(
    clickhouse: Client, database: str, tmp_path: Path
) -> Iterator[tuple[QueryGateway, str]]:
    """A running endpoint on the session's engine, as the sink serves it, and its token."""
    token = write_query_token(tmp_path / "query.token")
    gateway = QueryGateway(
        lambda: connect(f"chdb://{clickhouse.path}"), database, token,
        limits=QueryLimits(threads=1),
    )
    gateway.start()
    yield gateway, token
    gateway.stop()


def _post(
    gateway: QueryGateway, headers: dict[str, str], body: bytes = b'{"sql": "SELECT 1"}',
    method: str = "POST",
) -> tuple[int, dict[str, Any]]:
    """One raw request (the client sets every header itself, as an attacker's would)."""
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    try:
        connection.putrequest(method, "/query", skip_host=True, skip_accept_encoding=True)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


def test_the_token_file_is_owner_only_and_a_missing_one_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "query.token"
    token = write_query_token(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_query_token(path) == token and len(token) >= 40
    assert write_query_token(path) != token  # a new run, a new token
    with pytest.raises(QueryError, match="MEDSTREAM_DATA_DIR"):
        read_query_token(tmp_path / "absent.token")


def test_requests_without_the_run_token_are_refused(endpoint: tuple[QueryGateway, str]) -> None:
    gateway, token = endpoint
    host = f"127.0.0.1:{gateway.port}"
    json_type = {"Host": host, "Content-Type": "application/json"}
    assert _post(gateway, json_type)[0] == 401
    status, body = _post(gateway, {**json_type, "Authorization": "Bearer " + "x" * len(token)})
    assert status == 401 and "token" in body["error"]
    assert _post(gateway, {**json_type, "Authorization": f"Basic {token}"})[0] == 401
    assert _post(gateway, {**json_type, "Authorization": token})[0] == 401  # no scheme
    status, body = _post(gateway, {**json_type, "Authorization": f"Bearer {token}"})
    assert (status, body["rows"]) == (200, [[1]])
    assert query_via_gateway(gateway.url, "SELECT 2", token=token).rows == [[2]]
    with pytest.raises(QueryError, match="wrong token"):
        query_via_gateway(gateway.url, "SELECT 2", token="y" * 43)


@pytest.mark.parametrize(
    ("change", "status", "reason"),
    [
        # DNS rebinding: the browser sends the attacker's host name with the loopback port.
        ({"Host": "attacker.example:{port}"}, 403, "Host"),
        ({"Host": "127.0.0.1"}, 403, "Host"),
        ({"Origin": "http://attacker.example"}, 403, "web pages"),
        ({"Content-Type": "text/plain"}, 415, "application/json"),
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415, "application/json"),
        ({"Content-Length": str(10 * 1024 * 1024)}, 413, "at most"),
    ],
)
def test_rebinding_web_pages_and_oversized_requests_are_refused(
    endpoint: tuple[QueryGateway, str], change: dict[str, str], status: int, reason: str
) -> None:
    gateway, token = endpoint
    headers = {
        "Host": f"localhost:{gateway.port}", "Content-Type": "application/json",
        "Authorization": f"Bearer {token}",
    }
    assert _post(gateway, headers)[0] == 200  # the same request, unchanged, is served
    headers.update({k: v.format(port=gateway.port) for k, v in change.items()})
    answered, body = _post(gateway, headers)
    assert answered == status and reason in body["error"]
    assert _post(gateway, {**headers, **{"Host": f"127.0.0.1:{gateway.port}"}},
                 method="GET")[0] in (status, 405)


class _Collector(BaseHTTPRequestHandler):
    """A server an SSRF would reach: it counts what it was asked."""

    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        _Collector.hits.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"1\n")

    def log_message(self, format: str, *args: Any) -> None:
        return


ATTACKS = [
    ("SELECT * FROM file('/proc/self/environ', 'LineAsString')", "table functions"),
    ("SELECT file('/proc/self/environ')", "function file"),
    ("SELECT * FROM file('{data}/users.yaml', 'LineAsString')", "table functions"),
    ("SELECT * FROM url('http://127.0.0.1:{ssrf}/steal', 'LineAsString')", "table functions"),
    ("SELECT (SELECT any(line) FROM url('http://127.0.0.1:{ssrf}/s', 'LineAsString'))",
     "table functions"),
    ("SELECT 1 INTO OUTFILE '{out}' TRUNCATE", "INTO OUTFILE"),
    ("SELECT 1 INTO OUTFILE '{out}' APPEND", "INTO OUTFILE"),
    ("SELECT 1 INTO OUTFILE '{out}' FORMAT CSV", "INTO OUTFILE"),
    ("SELECT * FROM s3('http://127.0.0.1:{ssrf}/b/k', 'CSV')", "table functions"),
    ("SELECT * FROM hdfs('hdfs://127.0.0.1:{ssrf}/x', 'CSV', 'a String')", "table functions"),
    ("SELECT * FROM remote('127.0.0.1:{ssrf}', system.one)", "table functions"),
    ("SELECT * FROM mysql('127.0.0.1:{ssrf}', 'd', 't', 'u', 'p')", "table functions"),
    ("SELECT * FROM postgresql('127.0.0.1:{ssrf}', 'd', 't', 'u', 'p')", "table functions"),
    ("SELECT * FROM executable('id', 'TSV', 'a String')", "table functions"),
    ("SELECT * FROM input('a String')", "table functions"),
    ("SELECT * FROM merge('system', '.*')", "table functions"),
    ("SELECT * FROM medstream_x.person_history_at(at = '2026-01-01')", "may not read"),
    ("SELECT name, value FROM system.settings", "may not read system.settings"),
    # A line break in an alias printed a fake node into the parse tree (review of issue 15).
    ("SELECT ('x' AS `a\n      Literal 1`) IN system.settings", "may not contain a line break"),
    ("SELECT * FROM system.users", "may not read system.users"),
    ("SELECT query FROM system.processes", "may not read system.processes"),
    ("SELECT * FROM system.query_log", "may not read system.query_log"),
    ("SELECT * FROM `system`.`macros`", "may not read system.macros"),
    ("SELECT 1 WHERE 1 IN system.users", "may not read system.users"),
    ("SELECT getSetting('max_memory_usage')", "function getSetting"),
    ("SELECT dictGet('d', 'a', 1)", "function dictGet"),
    ("SELECT hostName()", "function hostName"),
    ("SELECT * FROM (SELECT 1 SETTINGS max_execution_time = 100000)", "SETTINGS"),
    ("SELECT 1 SETTINGS readonly = 0", "SETTINGS"),
    ("SELECT 1 FORMAT TSV", "FORMAT"),
    ("SELECT 1; SELECT 2", "one statement"),
    ("INSERT INTO {db}.audit_log SELECT * FROM {db}.audit_log", "SELECT"),
    ("EXPLAIN SYNTAX SELECT 1", "SELECT"),
    ("EXPLAIN AST SELECT * FROM file('/etc/passwd')", "table functions"),
    ("EXPLAIN QUERY TREE SELECT (SELECT * FROM url('http://127.0.0.1:{ssrf}/e', 'CSV'))",
     "table functions"),
    ("SELECT * FROM secret_in_default", "name the database"),
]


@pytest.fixture
def ssrf_target() -> Iterator[int]:
    """A local HTTP server; after the attacks it must have seen no request."""
    _Collector.hits = []
    server = HTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def test_reach_outside_the_medstream_databases_is_refused_for_every_caller(
    endpoint: tuple[QueryGateway, str], database: str, tmp_path: Path, ssrf_target: int
) -> None:
    gateway, token = endpoint
    out = tmp_path / "written-by-the-pipeline-user.csv"
    for attack, reason in ATTACKS:
        sql = attack.format(data=tmp_path, ssrf=ssrf_target, out=out, db=database)
        with pytest.raises(QueryError, match=reason):
            query_via_gateway(gateway.url, sql, token=token)
    assert not out.exists()
    assert _Collector.hits == []
    # Legitimate reads: the medstream tables, the catalogue, a parameterised view.
    assert query_via_gateway(
        gateway.url, f"SELECT count() FROM {database}.lab_result", token=token
    ).rows == [[0]]
    tables = query_via_gateway(
        gateway.url, f"SELECT name FROM system.tables WHERE database = '{database}' "
        "AND name = 'person_history_at'", token=token,
    )
    assert tables.rows == [["person_history_at"]]
    history = query_via_gateway(
        gateway.url,
        f"SELECT count() FROM {database}.person_history_at(at = '2026-01-01 00:00:00')",
        token=token,
    )
    assert history.rows == [[0]]


def test_the_operators_sql_command_has_the_same_limits(tmp_path: Path) -> None:
    """`medstream sql` without --user, with no pipeline running: it opens the engine
    itself and still refuses reach outside the medstream databases, and audits it."""
    data = tmp_path / "data"
    out = tmp_path / "out.csv"
    for sql, reason in [
        ("SELECT * FROM file('/proc/self/environ', 'LineAsString')", "table functions"),
        (f"SELECT 1 INTO OUTFILE '{out}' TRUNCATE", "INTO OUTFILE"),
        ("SELECT * FROM system.settings", "may not read system.settings"),
    ]:
        refused = subprocess.run(
            medstream("sql", sql), env=env_for(data), capture_output=True, text=True,
            timeout=120,
        )
        assert refused.returncode == 1 and reason in refused.stderr, refused.stderr
    assert not out.exists()
    audited = subprocess.run(
        medstream("sql", "--format", "json",
                  "SELECT outcome, count() AS n FROM medstream.audit_log "
                  "WHERE action = 'query' GROUP BY outcome"),
        env=env_for(data), capture_output=True, text=True, timeout=120,
    )
    assert audited.returncode == 0, audited.stderr
    assert json.loads(audited.stdout) == [{"outcome": "refused", "n": 3}]


def test_a_slow_query_never_holds_up_the_sinks_inserts(
    clickhouse: Client, database: str, endpoint: tuple[QueryGateway, str]
) -> None:
    """The sink inserts under its own lock on its own handle, exactly as `medstream sink`
    does, while an analyst's query burns its whole time limit on the endpoint."""
    gateway, token = endpoint
    sink_lock = threading.Lock()  # what ClickHouseSink holds around every insert
    outcome: list[BaseException | None] = []

    def slow_query() -> None:
        try:
            query_via_gateway(
                gateway.url,
                "SELECT count() FROM numbers(100000000000) WHERE sipHash64(number) % 7 = 3",
                timeout_s=4, token=token,
            )
            outcome.append(None)
        except QueryError as exc:
            outcome.append(exc)

    query = threading.Thread(target=slow_query)
    started = time.monotonic()
    query.start()
    latencies = []
    while query.is_alive() and time.monotonic() - started < 30:
        began = time.perf_counter()
        with sink_lock:
            clickhouse.insert(
                f"{database}.schema_migrations", [(9999, "probe")], column_names=["version", "name"]
            )
        latencies.append(time.perf_counter() - began)
    query.join()
    elapsed = time.monotonic() - started
    assert isinstance(outcome[0], QueryError) and "time limit" in str(outcome[0])
    assert 3.5 < elapsed < 15  # the query ran (and was cancelled at) its 4 s limit
    assert len(latencies) >= 20  # inserts went on the whole time
    assert max(latencies) < 1.0, f"an insert waited {max(latencies):.2f}s for the query"


def test_results_are_bounded_in_bytes_and_a_proof_query_is_never_cut_silently(
    clickhouse: Client, database: str
) -> None:
    from medstream.clickhouse import PROOF_MAX_ROWS, run_read_only

    limits = QueryLimits(result_bytes=1 << 20)
    # A constant column: the engine's own byte accounting counts it once, not per row.
    wide = "SELECT number, repeat('x', 1000) AS padding FROM numbers(100000)"
    result = run_read_only(clickhouse, wide, database, 30, 1_000_000, limits=limits)
    assert result.truncated and 900 <= len(result.rows) <= 1100  # about 1 MB of rows
    with pytest.raises(QueryError, match="MEDSTREAM_CLICKHOUSE_QUERY_MAX_RESULT_MB"):
        run_read_only(clickhouse, wide, database, 30, PROOF_MAX_ROWS, limits=limits)
    small = run_read_only(clickhouse, "SELECT number FROM numbers(10)", database, 30,
                          PROOF_MAX_ROWS, limits=limits)
    assert (len(small.rows), small.truncated) == (10, False)


def test_a_row_filter_is_only_ever_an_organisation_filter(
    endpoint: tuple[QueryGateway, str], database: str, tmp_path: Path
) -> None:
    """Review of issue 15: a filter is SQL the engine runs on every row; one reading a file
    returned the audit key's bytes in an error. Only the governor's own form is taken."""
    gateway, token = endpoint
    secret = tmp_path / "secret.key"
    secret.write_text("bda-secret")
    table = f"{database}.lab_result"
    for condition in (
        f"toUInt8(substring(file('{secret}'), 1, 3)) = 1",
        "organisation_id IN ('H001') OR 1",
        "organisation_id IN (SELECT 'H001')",
    ):
        with pytest.raises(QueryError, match="a row filter may only be organisation_id IN"):
            query_via_gateway(
                gateway.url, f"SELECT count() FROM {table}", token=token,
                settings={"readonly": 1, "additional_table_filters": {table: condition}},
            )
    scoped = query_via_gateway(
        gateway.url, f"SELECT count() FROM {table}", token=token,
        settings={"additional_table_filters": {table: "organisation_id IN ('H001')"}},
    )
    assert scoped.rows == [[0]]
