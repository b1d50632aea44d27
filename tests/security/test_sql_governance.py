"""Attacks on governed SQL (the console's /api/sql, `medstream sql --user`) on the real
engine and the real console: each is refused or bounded, its outcome audited in full, and
legitimate use (person_history_at for admins, analysts' views) still works."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from clickhouse_connect.driver.client import Client

from medstream.access import QueryGovernor, UserStore, parsed_objects, refresh_analyst_views
from medstream.audit import AuditTrail, direct_insert, statement_digest
from medstream.clickhouse import QueryError, QueryResult, run_read_only
from medstream.console import Console, Querier
from medstream.settings import ConsoleSettings, KafkaSettings
from medstream.sqlcheck import MAX_QUERY_CHARS
from schemas import serde
from sinks.dictionary import refresh_data_dictionary
from tests.medstream.test_console import _run

pytestmark = pytest.mark.integration

PASSWORD = "synthetic-pass-01"


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> UserStore:
    """The module's users (bcrypt is slow on purpose: made once)."""
    store = UserStore(tmp_path_factory.mktemp("governance") / "users.yaml")
    store.add("analyst.east", "analyst", ["H001"], PASSWORD)
    store.add("admin.all", "admin", ["*"], PASSWORD)
    return store


@pytest.fixture
def governed(clickhouse: Client, database: str) -> str:
    """A migrated database with its data dictionary and analyst views."""
    refresh_data_dictionary(clickhouse, database)
    refresh_analyst_views(clickhouse, database)
    return database


def _runner(clickhouse: Client, database: str) -> Callable[..., QueryResult]:
    lock = threading.Lock()

    def run(sql: str, settings: dict[str, Any] | None = None, rows: int = 1000,
            timeout_s: int = 30) -> QueryResult:
        with lock:
            return run_read_only(clickhouse, sql, database, timeout_s, rows, settings)

    return run


def _flat_query(views: str, target_chars: int) -> str:
    """A SELECT of many sibling lambdas (a shape that made the checker quadratic: ~1 s of
    CPU for 60 KB, ~19 s for 96 KB with the console's executor contended)."""
    calls, index, size = [], 0, 0
    while size < target_chars - 100:
        calls.append(f"arrayMap(x -> x + {index}, [1])")
        size += len(calls[-1]) + 2
        index += 1
    return f"SELECT count(), {', '.join(calls)} FROM {views}.lab_result"


def test_a_large_query_is_checked_in_linear_time_and_an_oversized_one_refused(
    clickhouse: Client, governed: str, users: UserStore
) -> None:
    run = _runner(clickhouse, governed)
    governor = QueryGovernor(governed, run)
    analyst = users.get("analyst.east")
    large = _flat_query(f"{governed}_analyst", MAX_QUERY_CHARS - 100)
    assert MAX_QUERY_CHARS - 200 < len(large) <= MAX_QUERY_CHARS
    started = time.process_time()
    checked = governor.check(analyst, large)
    assert time.process_time() - started < 5.0  # was ~19 s of CPU for 96 KB
    [row] = run(checked.sql, checked.settings).rows
    assert row[:3] == [0, [1], [2]]
    # The parse walk alone, on a tree of tens of thousands of nodes.
    tree = "\n".join(row[0] for row in run(f"EXPLAIN AST {large}").rows)
    assert tree.count("\n") > 20_000
    started = time.process_time()
    assert parsed_objects(tree, large) == {f"{governed}_analyst.lab_result"}
    assert time.process_time() - started < 0.4  # ~0.06 s; the quadratic walk took ~1 s
    oversized = _flat_query(f"{governed}_analyst", 96 * 1024)
    started = time.monotonic()
    with pytest.raises(QueryError, match=f"at most {MAX_QUERY_CHARS} are accepted"):
        governor.check(analyst, oversized)
    assert time.monotonic() - started < 0.5
    # Review of issue 15: an unclosed quote or comment made the literal and comment masks
    # backtrack quadratically (15.8 s of CPU for 64 KB, twice per governed query).
    for crafted in ("SELECT '" + "\\'" * 32000, 'SELECT "' + "/*" * 32000,
                    "WITH s AS (SELECT 1) SELECT " + "/*x" * 21000):
        started = time.process_time()
        with pytest.raises(QueryError):
            governor.check(analyst, crafted)
        assert time.process_time() - started < 2.0


@pytest.mark.parametrize(
    ("user", "sql", "message"),
    [
        ("analyst.east", "SELECT * FROM (SELECT count() FROM {views}.lab_result "
                         "SETTINGS additional_table_filters = {{}})", "SETTINGS"),
        ("admin.all", "SELECT * FROM (SELECT 1 SETTINGS max_execution_time = 100000)",
         "SETTINGS"),
        ("admin.all", "SELECT x FROM (SELECT 1 AS x SETTINGS readonly = 0) UNION ALL SELECT 2",
         "SETTINGS"),
        ("admin.all", "SELECT 1 INTO OUTFILE '/tmp/medstream-governed' TRUNCATE", "INTO OUTFILE"),
        ("admin.all", "SELECT * FROM file('/proc/self/environ', 'LineAsString')",
         "table functions"),
        ("admin.all", "SELECT * FROM person_history_at(at = '2026-01-01')",
         "person_history_at"),
        ("analyst.east", "SELECT * FROM {db}.person_history_at(at = '2026-01-01 00:00:00')",
         "may not read {db}.person_history_at"),
    ],
)
def test_nested_settings_and_reach_are_refused(
    clickhouse: Client, governed: str, users: UserStore, user: str, sql: str, message: str
) -> None:
    governor = QueryGovernor(governed, _runner(clickhouse, governed))
    text = sql.format(db=governed, views=f"{governed}_analyst")
    with pytest.raises(QueryError, match=message.format(db=governed)):
        governor.check(users.get(user), text)


def test_person_history_at_works_for_admins_as_documented(
    clickhouse: Client, governed: str, users: UserStore
) -> None:
    run = _runner(clickhouse, governed)
    checked = QueryGovernor(governed, run).check(
        users.get("admin.all"),
        f"SELECT count() AS n, groupArray(person) FROM {governed}.person_history_at("
        "at = '2026-11-24 08:00:00')",
    )
    result = run(checked.sql, checked.settings)
    assert result.columns == ["n", "groupArray(person)"] and result.rows == [[0, []]]


def test_engine_errors_do_not_show_the_row_filter(
    clickhouse: Client, governed: str, users: UserStore
) -> None:
    run = _runner(clickhouse, governed)
    with pytest.raises(QueryError) as refused:  # the analysis in the check already fails
        checked = QueryGovernor(governed, run).check(
            users.get("analyst.east"),
            f"SELECT no_such_column FROM {governed}_analyst.lab_result",
        )
        run(checked.sql, checked.settings)
    message = str(refused.value)
    assert "no_such_column" in message  # still says what is wrong
    assert "H001" not in message and "organisation_id IN" not in message


# --------------------------------------------------------------------------- the console

def _console(
    kafka: KafkaSettings, clickhouse: Client, database: str, users: UserStore,
    run: Callable[..., QueryResult] | None = None, **settings: Any,
) -> Console:
    lock = threading.Lock()

    def query(sql: str, extra: dict[str, Any] | None, max_rows: int, timeout_s: int
              ) -> QueryResult:
        with lock:
            return run_read_only(clickhouse, sql, database, timeout_s, max_rows, extra)

    def insert(event: dict[str, Any]) -> None:
        with lock:
            direct_insert(clickhouse, database)(event)

    console_settings = ConsoleSettings(**settings)
    return Console(
        console_settings, users, kafka, serde.ManifestRegistry(),
        Querier(run or query, console_settings.sql_timeout_s), AuditTrail(None, insert=insert),
        database,
    )


def _basic(name: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{PASSWORD}".encode()).decode()}


def _audited(clickhouse: Client, database: str) -> list[tuple[Any, ...]]:
    return [
        tuple(row) for row in clickhouse.query(
            f"SELECT actor, outcome, target, detail FROM {database}.audit_log "
            "WHERE action = 'query' ORDER BY event_time"
        ).result_rows
    ]


def test_the_audit_log_keeps_the_whole_statement_that_ran(
    kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, governed: str,
    users: UserStore,
) -> None:
    """A long comment used to push the real statement past the audit's 8,000 characters."""
    console = _console(kafka_factory(), clickhouse, governed, users)
    hidden = (
        f"SELECT 1 AS n /* {'x' * 12_000} */ UNION ALL "
        f"SELECT count() AS n FROM {governed}_analyst.lab_result"
    )

    async def scenario(client: TestClient) -> None:
        answer = await client.post("/api/sql", json={"sql": hidden}, headers=_basic("analyst.east"))
        assert answer.status == 200, await answer.text()

    _run(console, scenario)
    [(actor, outcome, target, detail)] = _audited(clickhouse, governed)
    assert (actor, outcome) == ("analyst.east", "ok")
    assert detail == hidden  # nothing cut, nothing hidden
    assert target == statement_digest(hidden)


def test_console_queries_are_bounded_by_its_timeout_and_every_outcome_is_audited(
    kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, governed: str,
    users: UserStore,
) -> None:
    console = _console(kafka_factory(), clickhouse, governed, users, sql_timeout_s=1)
    slow = "SELECT count() FROM numbers(100000000000) WHERE sipHash64(number) % 7 = 3"

    async def scenario(client: TestClient) -> None:
        started = time.monotonic()
        answer = await client.post("/api/sql", json={"sql": slow}, headers=_basic("admin.all"))
        assert answer.status == 400
        assert "MEDSTREAM_CONSOLE_SQL_TIMEOUT_S" in (await answer.json())["error"]
        assert time.monotonic() - started < 10  # 1 s, not the 60 s default
        refused = await client.post(
            "/api/sql", json={"sql": "SELECT * FROM (SELECT 1 SETTINGS max_threads = 64)"},
            headers=_basic("admin.all"),
        )
        assert refused.status == 400

    _run(console, scenario)
    outcomes = [(actor, outcome) for actor, outcome, _, _ in _audited(clickhouse, governed)]
    assert outcomes == [("admin.all", "failed"), ("admin.all", "refused")]


def test_basic_auth_sql_refuses_other_origins_and_non_json(
    kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, governed: str,
    users: UserStore,
) -> None:
    console = _console(kafka_factory(), clickhouse, governed, users)
    sql = f"SELECT count() FROM {governed}_analyst.lab_result"

    async def scenario(client: TestClient) -> None:
        headers = _basic("analyst.east")
        cross = await client.post("/api/sql", json={"sql": sql},
                                  headers={**headers, "Origin": "http://attacker.example"})
        assert cross.status == 403
        plain = await client.post("/api/sql", data='{"sql": "' + sql + '"}',
                                  headers={**headers, "Content-Type": "text/plain"})
        assert plain.status == 415
        ok = await client.post("/api/sql", json={"sql": sql}, headers=headers)
        assert ok.status == 200

    _run(console, scenario)
    assert [outcome for _, outcome, _, _ in _audited(clickhouse, governed)] == ["ok"]


def test_reconcile_survives_a_timeout_and_health_sees_a_stopped_thread(
    kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, governed: str,
    users: UserStore, tmp_path: Path,
) -> None:
    calls: list[str] = []

    def timing_out(sql: str, extra: dict[str, Any] | None, max_rows: int, timeout_s: int
                   ) -> QueryResult:
        calls.append(sql)
        raise TimeoutError("timed out")  # what a stalled endpoint's socket used to raise

    console = _console(kafka_factory(), clickhouse, governed, users, run=timing_out)

    async def scenario(client: TestClient) -> None:
        deadline = time.monotonic() + 30
        while len(calls) < 2 and time.monotonic() < deadline:  # two rounds: it went on
            await asyncio.sleep(0.1)
        assert len(calls) >= 2
        while not console.ready.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        healthy = await client.get("/healthz")
        assert healthy.status == 200, await healthy.text()
        console._stop.set()  # the background threads end, as if they had died
        for thread in console._threads:
            await asyncio.get_running_loop().run_in_executor(None, thread.join, 10)
        stopped = await client.get("/healthz")
        assert stopped.status == 503
        assert set((await stopped.json())["stopped"]) == {"console-alerts", "console-reconcile"}

    _run(console, scenario)
