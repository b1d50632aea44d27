"""The role model: users file, governed queries on the real engine, generated grants."""

from __future__ import annotations

import stat
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from clickhouse_connect.driver.client import Client

from medstream.access import (
    AccessError,
    QueryGovernor,
    UserStore,
    analyst_columns,
    analyst_database,
    client_runner,
    grant_statements,
    query_text,
    refresh_analyst_views,
)
from medstream.clickhouse import QueryError, QueryResult, connect, migrate, run_read_only
from sinks.dictionary import refresh_data_dictionary

PASSWORD = "correct horse battery"


def test_users_file_keeps_bcrypt_hashes_owner_only_and_checks_passwords(tmp_path: Path) -> None:
    store = UserStore(tmp_path / "users.yaml")
    store.add("mon.east", "monitor", ["H001"], PASSWORD)
    text = (tmp_path / "users.yaml").read_text()
    assert PASSWORD not in text and "$2b$12$" in text
    assert stat.S_IMODE((tmp_path / "users.yaml").stat().st_mode) == 0o600
    user = store.authenticate("mon.east", PASSWORD)
    assert (user.role, user.organisations) == ("monitor", ("H001",))
    assert user.sees("H001") and not user.sees("H002")
    for name, password in (("mon.east", "wrong password!"), ("nobody", PASSWORD)):
        with pytest.raises(AccessError, match="sign-in failed"):
            store.authenticate(name, password)
    store.update("mon.east", disabled=True)
    with pytest.raises(AccessError):
        store.authenticate("mon.east", PASSWORD)
    store.update("mon.east", disabled=False, organisations=["H001", "H002"])
    assert store.authenticate("mon.east", PASSWORD).sees("H002")
    store.remove("mon.east")
    assert store.users() == {}


@pytest.mark.parametrize(
    ("name", "role", "organisations", "password", "message"),
    [
        ("Bad Name", "monitor", ["H001"], PASSWORD, "invalid user name"),
        ("ok", "superuser", ["H001"], PASSWORD, "unknown role"),
        ("ok", "analyst", [], PASSWORD, "at least one organisation"),
        ("ok", "analyst", ["*", "H001"], PASSWORD, "cannot be combined"),
        ("ok", "analyst", ["H001"], "short", "at least 10 characters"),
    ],
)
def test_invalid_users_are_refused_with_the_reason(
    tmp_path: Path, name: str, role: str, organisations: list[str], password: str, message: str
) -> None:
    with pytest.raises(AccessError, match=message):
        UserStore(tmp_path / "users.yaml").add(name, role, organisations, password)


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO t VALUES (1)",
        "DROP TABLE medstream.lab_result",
        "SELECT 1; DROP TABLE x",
        "SYSTEM SHUTDOWN",
        "ALTER TABLE t DELETE WHERE 1",
    ],
)
def test_only_one_select_statement_passes(sql: str) -> None:
    with pytest.raises(QueryError, match="only one"):
        query_text(sql)


def test_comments_and_a_trailing_semicolon_are_fine() -> None:
    assert query_text("-- why\n/* note */ select 1;") == "select 1"
    assert query_text("WITH 1 AS x SELECT x") == "WITH 1 AS x SELECT x"


@pytest.fixture(scope="module")
def governed_db(clickhouse: Client) -> str:
    """A migrated database with two organisations' lab results and analyst views (shared
    by this module's tests, which only read it)."""
    database = f"test_access_{uuid.uuid4().hex[:8]}"
    migrate(clickhouse, database)
    # A table in the service account's current database, which an unqualified name reaches.
    clickhouse.command(
        "CREATE TABLE IF NOT EXISTS medstream_secret (x String) ENGINE = MergeTree ORDER BY x"
    )
    refresh_data_dictionary(clickhouse, database)
    refresh_analyst_views(clickhouse, database)
    now = datetime.now(tz=UTC)
    columns = [
        "event_id", "source_kind", "source_system", "organisation_id", "event_time",
        "ingest_time", "normalised_time", "source_topic", "source_partition", "source_offset",
        "record_index", "record_count", "source_ref", "mapping_version", "person_key",
        "order_id", "local_code", "local_display", "mapping_status",
    ]
    rows = [
        [f"e{i}", "hl7_lab", "LIS", org, now, now, now, "raw.hl7_lab", 0, i, 0, 1, "r", "1",
         f"P-{i}", f"ORDER-{i}", "K", "Potassium", "mapped"]
        for i, org in enumerate(["H001", "H001", "H002"])
    ]
    clickhouse.insert(f"{database}.lab_result", rows, column_names=columns)
    return database


def _governor(clickhouse: Client, database: str) -> tuple[QueryGovernor, object]:
    def run(sql: str, settings: dict[str, object] | None = None, rows: int = 1000) -> QueryResult:
        return run_read_only(clickhouse, sql, database, 30, rows, settings)

    return QueryGovernor(database, run), run


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> UserStore:
    """The module's users (bcrypt hashing is slow on purpose: made once)."""
    store = UserStore(tmp_path_factory.mktemp("access") / "users.yaml")
    store.add("analyst.east", "analyst", ["H001"], PASSWORD)
    store.add("admin.all", "admin", ["*"], PASSWORD)
    store.add("mon.east", "monitor", ["H001"], PASSWORD)
    store.add("admin.scoped", "admin", ["H001"], PASSWORD)
    return store


def test_analyst_reads_own_organisation_through_views_without_identifier_columns(
    clickhouse: Client, governed_db: str, users: UserStore
) -> None:
    store = users
    governor, run = _governor(clickhouse, governed_db)
    analyst = store.get("analyst.east")
    views = analyst_database(governed_db)
    checked = governor.check(
        analyst, f"SELECT organisation_id, count() AS n FROM {views}.lab_result "
        "GROUP BY organisation_id"
    )
    result = run(checked.sql, checked.settings)  # type: ignore[operator]
    assert result.rows == [["H001", 2]]
    # A join that reaches the base table another way is filtered by the engine too.
    checked = governor.check(
        analyst, f"SELECT count() FROM {views}.lab_result AS a JOIN {views}.lab_result AS b "
        "ON a.event_id = b.event_id"
    )
    assert run(checked.sql, checked.settings).rows == [[2]]  # type: ignore[operator]
    # Common table expressions and a query without FROM are fine.
    checked = governor.check(
        analyst, f"WITH w AS (SELECT person_key FROM {views}.lab_result) SELECT count() FROM w"
    )
    assert run(checked.sql, checked.settings).rows == [[2]]  # type: ignore[operator]
    assert governor.check(analyst, "SELECT 1").sql == "SELECT 1"
    columns = run(f"SELECT name FROM system.columns WHERE database = '{views}' "  # type: ignore[operator]
                  "AND table = 'lab_result'").rows
    assert ["order_id"] not in columns  # a quasi-identifier
    assert ["person_key"] in columns  # a pseudonym: within the analyst clearance


@pytest.mark.parametrize(
    ("user", "sql", "message"),
    [
        ("analyst.east", "SELECT * FROM {db}.lab_result", "may not read {db}.lab_result"),
        ("analyst.east", "SELECT * FROM {db}.audit_log", "may not read"),
        ("analyst.east", "SELECT * FROM system.tables", "may not read system.tables"),
        ("analyst.east", "SELECT * FROM file('/etc/passwd', 'LineAsString')", "table functions"),
        ("analyst.east", "SELECT * FROM {views}.lab_result SETTINGS "
                         "additional_table_filters = {{}}", "SETTINGS clauses"),
        ("mon.east", "SELECT 1", "no SQL access"),
        # Scalar functions and scalar subqueries reach no further than tables do.
        ("analyst.east", "SELECT file('/etc/hostname') FROM numbers(1)", "function file"),
        ("analyst.east", "SELECT (SELECT groupArray(order_id) FROM {db}.lab_result) "
                         "FROM numbers(1)", "may not read {db}.lab_result"),
        ("analyst.east", "WITH (SELECT any(detail) FROM {db}.audit_log) AS x SELECT x",
         "may not read {db}.audit_log"),
        ("analyst.east", "SELECT (SELECT groupArray(query) FROM system.processes)",
         "may not read system.processes"),
        ("analyst.east", "SELECT CAST((SELECT any(order_id) FROM {db}.lab_result WHERE "
                         "organisation_id = 'H002') AS Enum8('a' = 1))", "may not read"),
        ("analyst.east", "SELECT dictGet('d', 'a', toUInt64(1))", "function dictGet"),
        ("analyst.east", "SELECT 1 FROM {views}.lab_result INTO OUTFILE '/tmp/medstream-x'",
         "INTO OUTFILE"),
        ("analyst.east", "SELECT count() FROM lab_result", "name the database"),
        ("admin.scoped", "SELECT count() FROM {db}.audit_log", "may not read"),
        # A faked common table expression does not make an unqualified name safe ...
        ("analyst.east", "SELECT (SELECT any(x) FROM medstream_secret) "
                         "/* , medstream_secret AS ( */", "name the database of medstream_secret"),
        ("analyst.east", "SELECT (SELECT any(x) FROM medstream_secret) AS a, "
                         "(WITH medstream_secret AS (SELECT 1) SELECT 1) AS b",
         "name the database of medstream_secret"),
        # ... and IN names a table too.
        ("analyst.east", "SELECT (SELECT throwIf(('H002', 'x') IN {db}.lab_result))",
         "may not read {db}.lab_result"),
        ("analyst.east", "SELECT user()", "function user"),
    ],
)
def test_refused_queries_say_why(
    clickhouse: Client, governed_db: str, users: UserStore, user: str, sql: str, message: str
) -> None:
    store = users
    governor, run = _governor(clickhouse, governed_db)
    views = analyst_database(governed_db)
    text = sql.format(db=governed_db, views=views)
    with pytest.raises(QueryError, match=message.format(db=governed_db)):
        checked = governor.check(store.get(user), text)
        run(checked.sql, checked.settings)  # type: ignore[operator]


def test_admin_reads_every_table_and_organisation(
    clickhouse: Client, governed_db: str, users: UserStore
) -> None:
    store = users
    governor, run = _governor(clickhouse, governed_db)
    checked = governor.check(
        store.get("admin.all"), f"SELECT count(), countDistinct(order_id) FROM "
        f"{governed_db}.lab_result"
    )
    assert "additional_table_filters" not in checked.settings
    assert run(checked.sql, checked.settings).rows == [[3, 3]]  # type: ignore[operator]
    governor.check(store.get("admin.all"), f"SELECT * FROM {governed_db}.audit_log")


def test_generated_server_grants_parse_and_follow_the_role_model(
    clickhouse: Client, governed_db: str, users: UserStore
) -> None:
    store = users
    runner = client_runner(clickhouse)
    columns = analyst_columns(runner, governed_db)
    governor, _ = _governor(clickhouse, governed_db)
    statements = grant_statements(
        store.users().values(), governed_db, columns, governor.scoped_tables()
    )
    for statement in statements:  # ClickHouse's own parser: every statement is valid SQL
        formatted = clickhouse.query("SELECT formatQuery({s:String})", {"s": statement})
        assert formatted.result_rows[0][0]
    text = "\n".join(statements)
    analyst_grant = next(s for s in statements if f"ON {governed_db}.lab_result TO "
                         "medstream_analyst" in s)
    assert "`person_key`" in analyst_grant and "`order_id`" not in analyst_grant
    assert "CREATE USER OR REPLACE `analyst.east` IDENTIFIED WITH bcrypt_hash BY '$2b$" in text
    assert "DROP USER IF EXISTS `mon.east`" in statements  # monitors have no SQL access
    assert "GRANT medstream_service TO `medstream`" in statements
    assert (f"CREATE ROW POLICY OR REPLACE `medstream_scope_analyst.east` ON "
            f"{governed_db}.lab_result FOR SELECT USING organisation_id IN ('H001') "
            "TO `analyst.east`") in statements
    everyone = next(s for s in statements if s.startswith("CREATE ROW POLICY OR REPLACE "
                    f"medstream_all ON {governed_db}.lab_result"))
    assert everyone.endswith("TO ALL EXCEPT `admin.scoped`, `analyst.east`")


def test_governed_queries_pass_through_the_running_pipelines_query_endpoint(
    clickhouse: Client, governed_db: str, users: UserStore
) -> None:
    """While `medstream up` runs, the console and `medstream sql --user` reach the engine
    through the sink's query endpoint: it must accept the settings a governed check uses,
    and only those."""
    from medstream.query_endpoint import QueryGateway, query_via_gateway

    token = "t" * 40
    gateway = QueryGateway(lambda: connect(f"chdb://{clickhouse.path}"), governed_db, token)
    gateway.start()
    try:
        def run(sql: str, settings: dict[str, object] | None = None,
                rows: int = 1000) -> QueryResult:
            return query_via_gateway(gateway.url, sql, 30, rows, settings, token=token)

        governor = QueryGovernor(governed_db, run)
        checked = governor.check(
            users.get("analyst.east"),
            f"SELECT count() FROM {analyst_database(governed_db)}.lab_result",
        )
        assert run(checked.sql, checked.settings).rows == [[2]]
        with pytest.raises(QueryError, match="may only"):
            run("SELECT 1", {"readonly": 0})
        with pytest.raises(QueryError, match="may only"):
            run("SELECT 1", {"max_threads": 1})
    finally:
        gateway.stop()
