"""MariaDB binlog CDC against the real MariaDB server and the real broker.

Every test creates its own uniquely named tables in database ``test`` and drops them
afterwards. The tests that restart MariaDB or purge its binlog always leave it running.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pymysql
import pytest
import yaml

from medstream.settings import KafkaSettings
from producers.base import ConfigError, SourceUnavailable
from producers.mariadb_cdc import (
    POSITION_KEY,
    Gtid,
    GtidPosition,
    MariaDbCdcConfig,
    MariaDbCdcProducer,
    PositionLost,
    binlog_version,
    ddl_tables,
    default_server_id,
    float32_text,
    server_setting_problems,
    time_text,
    xa_statement,
)
from schemas.serde import ManifestRegistry
from tests.kafka_helpers import DLQ, consume, raw_topic

HOST, PORT, USER = "127.0.0.1", 3306, "root"
EMR = raw_topic("emr_cdc")
VISIT_COLUMNS = {
    "visit_no": "visit_no",
    "patient_mrn": "mrn",
    "visit_type": "visit_type",
    "dept_code": "dept_code",
    "admit_time": "admit_time",
    "discharge_time": "discharge_time",
}


# --- fixtures and helpers -----------------------------------------------------------------


def _connect() -> pymysql.connections.Connection[Any]:
    return pymysql.connect(
        host=HOST, port=PORT, user=USER, password="", database="test", autocommit=True,
        connect_timeout=3,
    )


@pytest.fixture(scope="module")
def mariadb() -> None:
    """The real MariaDB server; skip (or fail with MEDSTREAM_REQUIRE_SOURCES=1) without it."""
    try:
        _connect().close()
    except pymysql.err.OperationalError as exc:
        reason = f"MariaDB is not reachable on {HOST}:{PORT}: {exc}"
        if os.environ.get("MEDSTREAM_REQUIRE_SOURCES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


class Sql:
    """Statements on the test database (autocommit; ``transaction`` for several at once)."""

    def __init__(self) -> None:
        self.connection = _connect()

    def __call__(self, statement: str, args: Any = None) -> list[tuple[Any, ...]]:
        for attempt in range(40):  # the server may be coming back from a restart
            try:
                with self.connection.cursor() as cursor:
                    cursor.execute(statement, args)
                    return list(cursor.fetchall())
            except pymysql.err.OperationalError:
                if attempt == 39:
                    raise
                time.sleep(0.5)
                self.connection = _connect() if _answers() else self.connection
        raise AssertionError("unreachable")

    def transaction(self, statements: list[tuple[str, Any]]) -> None:
        with self.connection.cursor() as cursor:
            cursor.execute("BEGIN")
            for statement, args in statements:
                cursor.execute(statement, args)
            cursor.execute("COMMIT")

    def gtid_seq(self) -> int:
        position = self("SELECT @@gtid_binlog_pos")[0][0]
        return GtidPosition.parse(position).max_seq


@pytest.fixture
def sql(mariadb: None) -> Iterator[Sql]:
    db = Sql()
    yield db
    db.connection.close()


@pytest.fixture
def visit_table(sql: Sql) -> Iterator[str]:
    """A fresh ``test.his_visit_<unique>`` table, dropped afterwards."""
    name = f"his_visit_{uuid.uuid4().hex[:10]}"
    sql(
        f"CREATE TABLE `{name}` (id INT PRIMARY KEY, visit_no VARCHAR(32) NOT NULL, "
        "mrn VARCHAR(32), visit_type CHAR(1), dept_code VARCHAR(16), admit_time DATETIME(3), "
        "discharge_time DATETIME NULL) ENGINE=InnoDB"
    )
    yield name
    Sql()(f"DROP TABLE IF EXISTS `{name}`")


def visit_row(n: int, dept: str = "ICU") -> tuple[Any, ...]:
    """Obviously synthetic visit values for row ``n``."""
    return (n, f"VTEST{n:06d}", f"MRN-TEST-{n:05d}", "I", dept, "2024-05-01 08:30:00.250", None)


INSERT = "INSERT INTO `{}` VALUES (%s, %s, %s, %s, %s, %s, %s)"


def make_collector(
    kafka: Any, state_dir: Path, table: str, name: str | None = None, **overrides: Any
) -> MariaDbCdcProducer:
    settings: dict[str, Any] = {
        "kind": "mariadb",
        "name": name or f"mdb-{uuid.uuid4().hex[:8]}",
        "organisation_id": "H001",
        "source_system": "HIS-TEST",
        "host": HOST,
        "port": PORT,
        "user": USER,
        "state_dir": state_dir,
        "heartbeat_s": 0.5,
        "tables": [{"source": f"test.{table}", "target": "patient_visit",
                    "columns": VISIT_COLUMNS}],
    }
    settings.update(overrides)
    return MariaDbCdcProducer(MariaDbCdcConfig.model_validate(settings), kafka,
                              ManifestRegistry())


class Running:
    """A collector's run() on a thread; stops and joins on exit, keeps the error."""

    def __init__(self, collector: MariaDbCdcProducer, stop: threading.Event | None = None):
        self.collector = collector
        self.stop = stop or threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.collector.run(self.stop)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "collector did not stop"


def saved_seq(state_file: Path) -> int | None:
    """The domain's sequence number of the position a collector saved (None: nothing)."""
    if not state_file.exists():
        return None
    try:
        with sqlite3.connect(state_file) as db:
            row = db.execute("SELECT value FROM kv WHERE key = ?", (POSITION_KEY,)).fetchone()
    except sqlite3.OperationalError:  # the collector is still creating the file
        return None
    return None if row is None else GtidPosition.parse(row[0]).max_seq


def wait_for(condition: Callable[[], bool], timeout_s: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what or condition}")


def wait_caught_up(sql: Sql, state_file: Path, running: Running | None = None) -> None:
    """Wait until the collector saved (= Kafka acknowledged) the server's binlog position."""
    target = sql.gtid_seq()

    def done() -> bool:
        if running is not None and running.error is not None:
            raise running.error
        seq = saved_seq(state_file)
        return seq is not None and seq >= target

    wait_for(done, 60, f"collector to save GTID seq {target}")


def gauge(child: Any) -> float:
    return float(child._value.get())


def read_all(kafka: Any, topic: str = EMR, expected: int = 1) -> list[dict[str, Any]]:
    return [p.value for p in consume(kafka, [topic], expected, timeout_s=30, settle_s=2.0)]


def assert_no_double(records: list[dict[str, Any]]) -> None:
    """A message id seen twice must be the same change (a redelivery after a resume)."""
    by_id: dict[str, dict[str, Any]] = {}
    for record in records:
        seen = by_id.setdefault(record["message_id"], record)
        strip = {k: v for k, v in record.items() if k != "captured_time"}
        assert strip == {k: v for k, v in seen.items() if k != "captured_time"}


def state_file(path: Path) -> Path:
    return path / "mariadb.sqlite"


# --- pure logic ---------------------------------------------------------------------------


def test_gtid_position_parse_advance_and_text() -> None:
    position = GtidPosition.parse("1-2-7,0-1-123")
    assert str(position) == "0-1-123,1-2-7"
    assert position.includes(Gtid(0, 1, 120)) and not position.includes(Gtid(0, 1, 124))
    assert not position.includes(Gtid(3, 1, 1))
    assert str(position.advanced(Gtid(0, 1, 124))) == "0-1-124,1-2-7"
    assert GtidPosition.parse("") == GtidPosition() and str(GtidPosition()) == ""
    assert position.max_seq == 123
    with pytest.raises(ValueError, match="not a MariaDB GTID"):
        GtidPosition.parse("0-1")


def test_binlog_version_orders_files_then_positions() -> None:
    assert binlog_version("mariadb-bin.000123", 4567) == 123 * 2**32 + 4567
    assert binlog_version("mariadb-bin.000007", 2**32 - 1) < binlog_version("mariadb-bin.000008", 4)
    assert binlog_version("x.1000000", 4) > binlog_version("x.999999", 2**31)  # 7 digits
    with pytest.raises(ValueError, match="sequence number"):
        binlog_version("mariadb-bin", 4)
    with pytest.raises(ValueError, match="out of range"):
        binlog_version("mariadb-bin.000001", 2**32)


class _CapturingPublisher:
    """Stands in for RawPublisher in pure tests: keeps what would be published."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.dead_letters: list[tuple[str, str, bytes]] = []

    def publish(self, _key: Any, record: dict[str, Any], on_result: Any) -> None:
        self.records.append(record)
        on_result(None)

    def dead_letter(self, reason_code: str, reason: str, original: bytes, on_result: Any,
                    **_: Any) -> str:
        self.dead_letters.append((reason_code, reason, original))
        on_result(None)
        return "dlq"

    def encode(self, record: dict[str, Any]) -> bytes:
        return repr(record).encode()

    def poll(self, _timeout: float = 0.0) -> int:
        return 0


def _offline_collector(tmp_path: Path, table: str = "his_visit", **overrides: Any
                       ) -> MariaDbCdcProducer:
    """A collector whose Kafka is never contacted (pure tests feed it binlog events)."""
    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:1", topic_prefix="offline.")
    return make_collector(kafka, tmp_path, table, **overrides)


def _gtid_event(domain: int, server: int, seq: int, end_pos: int, flags: int = 0) -> Any:
    return SimpleNamespace(domain_id=domain, server_id=server, gtid_seq_no=seq,
                           timestamp=1_714_550_400, flags=flags,
                           packet=SimpleNamespace(log_pos=end_pos))


def _insert_event(table: str, *ids: int) -> Any:
    columns = [SimpleNamespace(type=3), SimpleNamespace(type=253), SimpleNamespace(type=253),
               SimpleNamespace(type=254), SimpleNamespace(type=253), SimpleNamespace(type=18),
               SimpleNamespace(type=18)]
    names = ["id", "visit_no", "mrn", "visit_type", "dept_code", "admit_time", "discharge_time"]
    rows = [{"values": dict(zip(names, visit_row(n), strict=True))} for n in ids]
    return SimpleNamespace(schema="test", table=table, columns=columns, rows=rows)


def test_versions_follow_binlog_order_over_gtid_domains(tmp_path: Path) -> None:
    """Regression: with versions from GTID sequence numbers a domain-0 change after a
    domain-1 transaction with a higher sequence number got a lower version (stale row won)."""
    collector = _offline_collector(tmp_path)
    capture = _CapturingPublisher()
    collector.publisher = capture  # type: ignore[assignment]
    collector._read_position = GtidPosition.parse("0-1-100,1-2-5000")
    snapshot_version = binlog_version("mariadb-bin.000007", 900)
    reader = SimpleNamespace(log_file="mariadb-bin.000007", auto_position="")
    for gtid, end_pos, ids in (((1, 2, 5001), 1000, (1, 2)), ((0, 1, 101), 2000, (1,)),
                               ((1, 2, 5002), 3000, (1,))):
        collector._begin(reader, _gtid_event(*gtid, end_pos))
        collector._on_rows(_insert_event("his_visit", *ids))
        collector._end(reader)
    reader.log_file = "mariadb-bin.000008"  # rotated: positions start small again
    collector._begin(reader, _gtid_event(0, 1, 102, 300))
    collector._on_rows(_insert_event("his_visit", 1))
    collector._end(reader)
    versions = [r["position_seq"] for r in capture.records]
    assert [r["source_position"] for r in capture.records] == [
        "1-2-5001", "1-2-5001", "0-1-101", "1-2-5002", "0-1-102"]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    assert versions[:2] == [binlog_version("mariadb-bin.000007", 1000) + i for i in range(2)]
    assert snapshot_version < min(versions)
    assert str(collector._read_position) == "0-1-102,1-2-5002"


def test_server_settings_problems_name_each_setting() -> None:
    good = {"log_bin": "ON", "binlog_format": "ROW", "binlog_row_image": "FULL",
            "binlog_row_metadata": "FULL"}
    assert server_setting_problems(good) == []
    bad = {"log_bin": "OFF", "binlog_format": "MIXED", "binlog_row_image": "MINIMAL"}
    problems = server_setting_problems(bad)
    assert len(problems) == 4
    assert problems[0].startswith("log_bin is OFF but must be ON")
    assert "binlog_format is MIXED but must be ROW" in problems[1]
    assert "binlog_row_image is MINIMAL but must be FULL" in problems[2]
    assert "binlog_row_metadata is not set but must be FULL" in problems[3]


def test_default_server_id_is_stable_and_per_name() -> None:
    assert default_server_id("his-1") == default_server_id("his-1")
    assert default_server_id("his-1") != default_server_id("his-2")
    assert all(65_536 <= default_server_id(f"c{n}") < 2**32 for n in range(200))


def test_config_rejects_bad_source_and_zone(tmp_path: Path) -> None:
    base: dict[str, Any] = {
        "kind": "mariadb", "name": "m", "organisation_id": "H", "source_system": "S",
        "user": "u",
        "tables": [{"source": "test.t", "target": "patient_visit", "columns": VISIT_COLUMNS}],
    }
    assert MariaDbCdcConfig.model_validate(base).replica_server_id == default_server_id("m")
    with pytest.raises(ValueError, match="schema.table"):
        MariaDbCdcConfig.model_validate(
            {**base, "tables": [{"source": "t", "target": "patient_visit",
                                 "columns": VISIT_COLUMNS}]})
    with pytest.raises(ValueError, match="unknown time zone"):
        MariaDbCdcConfig.model_validate({**base, "source_timezone": "Mars/Olympus"})
    with pytest.raises(ValueError, match="mapped more than once"):
        MariaDbCdcConfig.model_validate({**base, "tables": base["tables"] * 2})


def test_example_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    from producers.base import load_config

    monkeypatch.setenv("MARIADB_PASSWORD", "not-a-real-secret")
    example = Path(__file__).parents[2] / "deploy" / "collectors" / "mariadb.example.yaml"
    config = load_config(example, MariaDbCdcConfig)
    assert isinstance(config, MariaDbCdcConfig)
    assert config.kind == "mariadb" and config.replica_server_id == 7301
    assert config.password.get_secret_value() == "not-a-real-secret"
    assert [t.target for t in config.tables] == ["patient_visit", "visit_diagnosis"]


# --- check() against the live server ------------------------------------------------------


@pytest.mark.integration
def test_check_accepts_good_setup_and_lists_mapping_problems(
    kafka_factory: Any, tmp_path: Path, sql: Sql, visit_table: str
) -> None:
    kafka = kafka_factory()
    findings = make_collector(kafka, tmp_path, visit_table).check()
    assert "binlog ROW/FULL/FULL" in findings[0] and "1 table mapping(s) valid" in findings[0]
    bad = make_collector(
        kafka, tmp_path, visit_table,
        tables=[
            {"source": "test.no_such_table_x", "target": "patient_visit",
             "columns": VISIT_COLUMNS},
            {"source": f"test.{visit_table}", "target": "patient_visit",
             "columns": {**VISIT_COLUMNS, "dept_code": "department"}},
        ],
    )
    with pytest.raises(ConfigError) as info:
        bad.check()
    message = str(info.value)
    assert "no_such_table_x" in message and "department" in message


@pytest.mark.integration
def test_check_names_a_wrong_binlog_setting(
    kafka_factory: Any, tmp_path: Path, sql: Sql, visit_table: str
) -> None:
    collector = make_collector(kafka_factory(), tmp_path, visit_table)
    sql("SET GLOBAL binlog_row_metadata = 'MINIMAL'")
    try:
        with pytest.raises(ConfigError, match="binlog_row_metadata is MINIMAL but must be FULL"):
            collector.check()
    finally:
        sql("SET GLOBAL binlog_row_metadata = 'FULL'")
    collector.check()


@pytest.mark.integration
def test_check_rejects_server_id_of_the_server_or_another_replica(
    kafka_factory: Any, tmp_path: Path, sql: Sql, visit_table: str
) -> None:
    from pymysqlreplication import BinLogStreamReader

    kafka = kafka_factory()
    own = int(sql("SELECT @@server_id")[0][0])
    with pytest.raises(ConfigError, match=f"server_id {own} is the MariaDB server's own"):
        make_collector(kafka, tmp_path, visit_table, server_id=own).check()
    taken = 4_000_000_000 + int(uuid.uuid4().int % 1000)
    other = BinLogStreamReader(
        {"host": HOST, "port": PORT, "user": USER, "password": ""}, server_id=taken,
        report_slave="someone-else", is_mariadb=True,
        auto_position=sql("SELECT @@gtid_binlog_pos")[0][0], blocking=True,
        slave_heartbeat=0.5, enable_logging=False,
    )
    try:
        other.fetchone()  # connected and registered
        wait_for(lambda: any(int(r[0]) == taken for r in sql("SHOW SLAVE HOSTS")), 10)
        with pytest.raises(ConfigError, match=f"server_id {taken} is already used by replica"):
            make_collector(kafka, tmp_path, visit_table, server_id=taken).check()
    finally:
        other.close()


# --- snapshot and stream ------------------------------------------------------------------


@pytest.mark.integration
def test_snapshot_then_stream_without_gap_or_double_under_concurrent_writes(
    kafka_factory: Any, tmp_path: Path, sql: Sql, visit_table: str
) -> None:
    kafka = kafka_factory()
    insert = INSERT.format(visit_table)
    for n in range(1, 301):
        sql(insert, visit_row(n))
    writing = threading.Event()
    writing.set()
    written: list[int] = []

    def writer() -> None:
        db, n = Sql(), 1000
        while writing.is_set():
            n += 1
            db.transaction([(insert, visit_row(n)),
                            (f"UPDATE `{visit_table}` SET dept_code = %s WHERE id = %s",
                             (f"W{n}", n % 300 + 1))])
            written.append(n)
        db.connection.close()

    thread = threading.Thread(target=writer)
    thread.start()
    collector = make_collector(kafka, tmp_path, visit_table)
    try:
        with Running(collector) as running:
            wait_for(lambda: gauge(collector.metrics.ready) == 1, 30, "streaming")
            time.sleep(1.0)
            writing.clear()
            thread.join()
            wait_caught_up(sql, state_file(tmp_path), running)
    finally:
        writing.clear()
        thread.join()
    # Each row at least once; writes made before the snapshot are inside it, so the exact
    # count is unknown: read until the topic is quiet.
    records = read_all(kafka, expected=300 + len(written))
    assert_no_double(records)
    ops = Counter(r["op"] for r in records)
    assert ops["r"] >= 300 and ops["c"] >= 1, ops  # writes happened during and after it
    created = Counter(
        r["after"]["visit_no"] for r in records if r["op"] in ("r", "c")
    )
    expected_rows = {f"VTEST{n:06d}" for n in [*range(1, 301), *written]}
    assert set(created) == expected_rows  # no gap
    assert max(created.values()) == 1  # no row both snapshotted and streamed
    # Replaying by version gives the table as it is now.
    final: dict[str, dict[str, str | None]] = {}
    for record in sorted(records, key=lambda r: r["position_seq"]):
        final[record["after"]["visit_no"]] = record["after"]
    now = {f"VTEST{i:06d}": dept for i, dept in sql(f"SELECT id, dept_code FROM `{visit_table}`")}
    assert {k: v["dept_code"] for k, v in final.items()} == now
    snapshot = [r for r in records if r["op"] == "r"]
    assert len({r["source_position"] for r in snapshot}) == 1
    assert all(r["position_seq"] < s["position_seq"] for r in snapshot for s in records
               if s["op"] != "r")


@pytest.mark.integration
def test_create_update_delete_with_images_and_shared_transaction(
    kafka_factory: Any, tmp_path: Path, sql: Sql, visit_table: str
) -> None:
    kafka = kafka_factory()
    insert = INSERT.format(visit_table)
    collector = make_collector(kafka, tmp_path, visit_table)
    with Running(collector) as running:
        wait_for(lambda: gauge(collector.metrics.ready) == 1, 30, "streaming")
        sql.transaction([(insert, visit_row(1)), (insert, visit_row(2)),
                         (insert, visit_row(3))])
        transaction_seq = sql.gtid_seq()
        sql(f"UPDATE `{visit_table}` SET discharge_time = '2024-05-03 10:00:00', "
            "dept_code = 'WARD' WHERE id = 2")
        sql(f"DELETE FROM `{visit_table}` WHERE id = 3")
        wait_caught_up(sql, state_file(tmp_path), running)
        assert gauge(collector.metrics.source_lag) < 60
    records = read_all(kafka, expected=5)
    assert [r["op"] for r in records if r["op"] != "r"].count("c") == 3
    by_op = {op: [r for r in records if r["op"] == op] for op in "cud"}
    created = by_op["c"]
    assert len(created) == 3 and len(by_op["u"]) == 1 and len(by_op["d"]) == 1
    assert {r["transaction_id"] for r in created} == {transaction_seq}
    assert len({r["source_position"] for r in created}) == 1
    assert created[0]["source_position"].endswith(f"-{transaction_seq}")
    versions = sorted(r["position_seq"] for r in created)
    assert versions == [versions[0] + i for i in range(3)]  # rows of one transaction
    assert len({r["commit_time"] for r in created}) == 1
    first = next(r for r in created if r["after"]["visit_no"] == "VTEST000001")
    assert first["table"] == "patient_visit" and first["before"] is None
    assert first["after"]["patient_mrn"] == "MRN-TEST-00001"
    assert first["after"]["admit_time"].startswith("2024-05-01T08:30:00.25")
    assert first["after"]["admit_time"].endswith("+00:00")
    assert first["after"]["discharge_time"] is None
    assert first["message_id"] == f"HIS-TEST:{first['source_position']}:0:patient_visit"
    update = by_op["u"][0]
    assert update["before"]["dept_code"] == "ICU" and update["after"]["dept_code"] == "WARD"
    assert update["after"]["discharge_time"].startswith("2024-05-03T10:00:00")
    assert update["position_seq"] > max(r["position_seq"] for r in created)
    delete = by_op["d"][0]
    assert delete["after"] is None and delete["before"]["visit_no"] == "VTEST000003"
    assert all(r["organisation_id"] == "H001" and r["source_system"] == "HIS-TEST"
               for r in records)


class _GatedProducer:
    """A real producer whose delivery reports are held back while the gate is closed."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.gate = threading.Event()
        self.gate.set()

    def list_topics(self, *args: Any, **kwargs: Any) -> Any:  # the counter asks the cluster id
        return self.real.list_topics(*args, **kwargs)

    def produce(self, *args: Any, **kwargs: Any) -> None:
        self.real.produce(*args, **kwargs)

    def poll(self, timeout: float = 0.0) -> int:
        if not self.gate.is_set():
            time.sleep(min(timeout, 0.05))
            return 0
        return int(self.real.poll(timeout))

    def flush(self, timeout: float = 30.0) -> int:
        self.gate.wait(timeout)
        return int(self.real.flush(timeout))

    def __len__(self) -> int:
        return len(self.real)


@pytest.mark.integration
def test_position_is_saved_only_after_the_broker_acknowledged(
    kafka_factory: Any, tmp_path: Path, sql: Sql, visit_table: str
) -> None:
    from confluent_kafka import Producer

    kafka = kafka_factory()
    gated = _GatedProducer(Producer(kafka.producer_config()))
    collector = make_collector(kafka, tmp_path, visit_table)
    collector.publisher._producer = gated
    with Running(collector) as running:
        wait_for(lambda: gauge(collector.metrics.ready) == 1, 30, "streaming")
        wait_caught_up(sql, state_file(tmp_path), running)
        before = saved_seq(state_file(tmp_path))
        gated.gate.clear()
        sql.transaction([(INSERT.format(visit_table), visit_row(n)) for n in (1, 2)])
        wait_for(lambda: collector.metrics.read._value.get() >= 2, 20, "rows read")
        time.sleep(1.0)  # several commit rounds while the acknowledgements are held back
        assert saved_seq(state_file(tmp_path)) == before
        gated.gate.set()
        wait_caught_up(sql, state_file(tmp_path), running)
    assert len([r for r in read_all(kafka, expected=2) if r["op"] == "c"]) == 2


# --- resume ---------------------------------------------------------------------------------


@pytest.mark.integration
def test_stop_inside_a_transaction_resumes_at_its_start_with_the_same_ids(
    kafka_factory: Any, tmp_path: Path, sql: Sql, visit_table: str
) -> None:
    """Trap 1: a position inside a transaction cannot be decoded; only commits are saved."""
    kafka = kafka_factory()
    name = f"mdb-{uuid.uuid4().hex[:8]}"
    first = make_collector(kafka, tmp_path, visit_table, name=name)
    with Running(first) as running:
        wait_for(lambda: gauge(first.metrics.ready) == 1, 30, "streaming")
        wait_caught_up(sql, state_file(tmp_path), running)
    before = saved_seq(state_file(tmp_path))
    rows = [visit_row(n) for n in range(1, 3001)]
    with sql.connection.cursor() as cursor:
        cursor.execute("BEGIN")
        cursor.executemany(INSERT.format(visit_table), rows)
        cursor.execute("COMMIT")
    big = sql.gtid_seq()

    class StopAfterReads(threading.Event):
        def is_set(self) -> bool:
            if collector.metrics.read._value.get() >= 100:
                self.set()
            return super().is_set()

    collector = make_collector(kafka, tmp_path, visit_table, name=name)
    with Running(collector, StopAfterReads()) as stopping:
        stopping.thread.join(60)
    assert stopping.error is None
    assert saved_seq(state_file(tmp_path)) == before  # not inside the big transaction
    partial = [r for r in read_all(kafka, expected=100) if r["op"] == "c"]
    assert 100 <= len(partial) < 3000
    again = make_collector(kafka, tmp_path, visit_table, name=name)
    with Running(again) as running:
        wait_caught_up(sql, state_file(tmp_path), running)
    records = [r for r in read_all(kafka, expected=3000) if r["op"] == "c"]
    assert_no_double(records)
    assert len({r["message_id"] for r in records}) == 3000
    assert {r["transaction_id"] for r in records} == {big}
    assert (saved_seq(state_file(tmp_path)) or 0) >= big


@pytest.mark.integration
def test_library_drops_rows_when_started_after_the_table_map(sql: Sql, visit_table: str) -> None:
    """Trap 1, the library itself: file/pos inside a transaction silently loses its rows."""
    from pymysqlreplication import BinLogStreamReader
    from pymysqlreplication.event import XidEvent
    from pymysqlreplication.row_event import TableMapEvent, WriteRowsEvent

    log_file = sql("SHOW MASTER STATUS")[0][0]
    sql(INSERT.format(visit_table), visit_row(1))

    def read_from(pos: int) -> list[Any]:
        reader = BinLogStreamReader(
            {"host": HOST, "port": PORT, "user": USER, "password": ""},
            server_id=4_100_000_000 + int(uuid.uuid4().int % 1000), log_file=log_file,
            log_pos=pos, resume_stream=True, blocking=False, enable_logging=False,
            only_events=[TableMapEvent, WriteRowsEvent, XidEvent], only_tables=[visit_table],
        )
        try:
            return list(reader)
        finally:
            reader.close()

    events = read_from(4)
    table_map = next(e for e in events if isinstance(e, TableMapEvent))
    assert any(isinstance(e, WriteRowsEvent) for e in events)
    after_table_map = read_from(table_map.packet.log_pos)
    assert not any(isinstance(e, WriteRowsEvent) for e in after_table_map)
    assert any(isinstance(e, XidEvent) for e in after_table_map)


@pytest.mark.integration
def test_old_events_decode_with_their_own_columns_after_alter(
    kafka_factory: Any, tmp_path: Path, sql: Sql, visit_table: str
) -> None:
    """Trap 2: rows written before an ALTER keep their column names (binlog metadata)."""
    kafka = kafka_factory()
    name = f"mdb-{uuid.uuid4().hex[:8]}"
    first = make_collector(kafka, tmp_path, visit_table, name=name)
    with Running(first) as running:
        wait_caught_up(sql, state_file(tmp_path), running)
    # Collector down: a row, then the table changes shape under the binlog.
    sql(INSERT.format(visit_table), visit_row(1, dept="OLD"))
    sql(f"ALTER TABLE `{visit_table}` ADD COLUMN ward VARCHAR(8) FIRST")
    sql(f"ALTER TABLE `{visit_table}` RENAME COLUMN mrn TO patient_no")
    sql(f"INSERT INTO `{visit_table}` (ward, id, visit_no, patient_no, visit_type, dept_code, "
        "admit_time) VALUES ('W1', 2, 'VTEST000002', 'MRN-TEST-00002', 'I', 'NEW', "
        "'2024-05-02 09:00:00')")
    collector = make_collector(kafka, tmp_path, visit_table, name=name)
    with Running(collector) as running:
        wait_caught_up(sql, state_file(tmp_path), running)
    created = [r for r in read_all(kafka, expected=1) if r["op"] == "c"]
    assert len(created) == 1
    assert created[0]["after"]["patient_mrn"] == "MRN-TEST-00001"
    assert created[0]["after"]["dept_code"] == "OLD"
    dead = [p.value for p in consume(kafka, [DLQ], 1, timeout_s=20)]
    assert [d["reason_code"] for d in dead] == ["schema_changed"]
    assert visit_table in dead[0]["reason"] and "mrn" in dead[0]["reason"]


@pytest.mark.integration
def test_alter_mid_stream_added_column_fine_renamed_mapped_column_dead_lettered(
    kafka_factory: Any, tmp_path: Path, sql: Sql, visit_table: str, caplog: Any
) -> None:
    kafka = kafka_factory()
    collector = make_collector(kafka, tmp_path, visit_table)
    insert = INSERT.format(visit_table)
    with Running(collector) as running:
        wait_for(lambda: gauge(collector.metrics.ready) == 1, 30, "streaming")
        sql(insert, visit_row(1))
        sql(f"ALTER TABLE `{visit_table}` ADD COLUMN bed VARCHAR(8)")
        sql(f"INSERT INTO `{visit_table}` VALUES (2, 'VTEST000002', 'MRN-TEST-00002', 'I', "
            "'ICU', '2024-05-01 08:30:00', NULL, 'B1')")
        sql(f"ALTER TABLE `{visit_table}` RENAME COLUMN dept_code TO department")
        sql(f"UPDATE `{visit_table}` SET department = 'WARD' WHERE id = 1")
        sql(f"ALTER TABLE `{visit_table}` RENAME COLUMN department TO dept_code")
        sql(f"UPDATE `{visit_table}` SET dept_code = 'ER' WHERE id = 2")
        wait_caught_up(sql, state_file(tmp_path), running)
        failed = collector.metrics.failed("schema_changed")._value.get()
    records = [r for r in read_all(kafka, expected=3) if r["op"] != "r"]
    assert [(r["op"], r["after"]["visit_no"], r["after"]["dept_code"]) for r in records] == [
        ("c", "VTEST000001", "ICU"), ("c", "VTEST000002", "ICU"), ("u", "VTEST000002", "ER"),
    ]
    dead = [p.value for p in consume(kafka, [DLQ], 1, timeout_s=20)]
    assert len(dead) == 1 and dead[0]["reason_code"] == "schema_changed"
    assert f"test.{visit_table}" in dead[0]["reason"] and "dept_code" in dead[0]["reason"]
    assert dead[0]["stage"] == "producer" and dead[0]["organisation_id"] == "H001"
    assert failed == 1
    assert any(r.levelname == "ERROR" and "schema_changed" in r.getMessage()
               for r in caplog.records)


@pytest.mark.integration
def test_binlog_rotation_and_idle_heartbeats_while_streaming(
    kafka_factory: Any, tmp_path: Path, sql: Sql, visit_table: str
) -> None:
    """Trap 5 (RotateEvent) and trap 4 (an idle stream stays responsive through heartbeats)."""
    kafka = kafka_factory()
    collector = make_collector(kafka, tmp_path, visit_table)
    insert = INSERT.format(visit_table)
    running = Running(collector)
    with running:
        wait_for(lambda: gauge(collector.metrics.ready) == 1, 30, "streaming")
        sql(insert, visit_row(1))
        sql("FLUSH BINARY LOGS")
        sql(insert, visit_row(2))
        sql("FLUSH BINARY LOGS")
        sql(f"UPDATE `{visit_table}` SET dept_code = 'WARD' WHERE id = 1")
        wait_caught_up(sql, state_file(tmp_path), running)
        time.sleep(1.5)  # idle: only heartbeats arrive
        assert gauge(collector.metrics.source_lag) == 0
        started = time.monotonic()
        running.stop.set()
        running.thread.join(10)
        assert time.monotonic() - started < 3  # stop is seen at the next heartbeat
    records = [r for r in read_all(kafka, expected=3) if r["op"] != "r"]
    assert [(r["op"], r["after"]["visit_no"]) for r in records] == [
        ("c", "VTEST000001"), ("c", "VTEST000002"), ("u", "VTEST000001")]
    versions = [r["position_seq"] for r in records]
    assert versions[0] < versions[1] < versions[2]  # across the rotations
    assert versions[2] >> 32 == (versions[0] >> 32) + 2  # two files later


def _answers() -> bool:
    try:
        _connect().close()
        return True
    except pymysql.err.OperationalError:
        return False


def _restart_mariadb() -> None:
    subprocess.run(["mysqladmin", "-uroot", "-h127.0.0.1", "shutdown"], check=False,
                   capture_output=True, timeout=60)
    wait_for(lambda: subprocess.run(["pgrep", "-x", "mariadbd"], capture_output=True)
             .returncode != 0, 60, "mariadbd to exit")


def _start_mariadb() -> None:
    if subprocess.run(["pgrep", "-x", "mariadbd"], capture_output=True).returncode != 0:
        subprocess.run(["start-stop-daemon", "--start", "--oknodo", "--background", "--exec",
                        "/usr/sbin/mariadbd"], check=True, timeout=30)
    wait_for(_answers, 60, "MariaDB to answer")


@pytest.mark.integration
def test_collector_reconnects_after_mariadb_restart_and_loses_nothing(
    kafka_factory: Any, tmp_path: Path, sql: Sql, visit_table: str
) -> None:
    """Trap 4: the library's reconnect would restart from the first position; ours resumes."""
    kafka = kafka_factory()
    collector = make_collector(kafka, tmp_path, visit_table)
    insert = INSERT.format(visit_table)
    try:
        with Running(collector) as running:
            wait_for(lambda: gauge(collector.metrics.ready) == 1, 30, "streaming")
            for n in range(1, 51):
                sql(insert, visit_row(n))
            _restart_mariadb()
            wait_for(lambda: gauge(collector.metrics.ready) == 0, 30, "ready to drop")
            _start_mariadb()
            db = Sql()
            for n in range(51, 101):
                db(insert, visit_row(n))
            wait_caught_up(db, state_file(tmp_path), running)
            assert gauge(collector.metrics.ready) == 1
            assert running.error is None
    finally:
        _start_mariadb()
    records = [r for r in read_all(kafka, expected=100) if r["op"] == "c"]
    assert sorted(r["after"]["visit_no"] for r in records) == [
        f"VTEST{n:06d}" for n in range(1, 101)]


@pytest.mark.integration
def test_purged_position_fails_clearly_then_resnapshots_when_needed(
    kafka_factory: Any, tmp_path: Path, sql: Sql, visit_table: str
) -> None:
    """Trap 6: the saved position's binlog was purged."""
    kafka = kafka_factory()
    name = f"mdb-{uuid.uuid4().hex[:8]}"
    with Running(make_collector(kafka, tmp_path, visit_table, name=name)) as running:
        wait_caught_up(sql, state_file(tmp_path), running)
    sql(INSERT.format(visit_table), visit_row(1))
    sql("FLUSH BINARY LOGS")
    current = sql("SHOW MASTER STATUS")[0][0]

    def dump_threads() -> list[int]:
        return [int(r[0]) for r in sql("SHOW PROCESSLIST") if r[4] == "Binlog Dump"]

    try:  # a replica still reading an old file keeps it from being purged
        wait_for(lambda: not dump_threads(), 10, "earlier binlog readers to leave")
    except AssertionError:
        for thread_id in dump_threads():
            sql(f"KILL {thread_id}")

    def purged() -> bool:  # the file before is kept until InnoDB checkpointed it
        sql(f"PURGE BINARY LOGS TO '{current}'")
        return [r[0] for r in sql("SHOW BINARY LOGS")] == [current]

    wait_for(purged, 30, "the old binlog files to be purged")
    collector = make_collector(kafka, tmp_path, visit_table, name=name)
    failing = Running(collector)
    with failing:
        failing.thread.join(30)
    assert isinstance(failing.error, PositionLost), failing.error
    info = failing.error
    assert "snapshot_mode: when_needed" in str(info)
    assert "no longer on the MariaDB server" in str(info)
    again = make_collector(kafka, tmp_path, visit_table, name=name, snapshot_mode="when_needed")
    with Running(again) as running:
        wait_caught_up(sql, state_file(tmp_path), running)
    snapshot = [r for r in read_all(kafka, expected=1) if r["op"] == "r"]
    assert [r["after"]["visit_no"] for r in snapshot] == ["VTEST000001"]


@pytest.mark.integration
def test_kill_9_of_the_collector_process_loses_nothing(
    kafka_factory: Any, tmp_path: Path, sql: Sql, visit_table: str
) -> None:
    kafka = kafka_factory()
    name = f"mdb-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "mariadb.yaml"
    config.write_text(yaml.safe_dump({
        "kind": "mariadb", "name": name, "organisation_id": "H001",
        "source_system": "HIS-TEST", "host": HOST, "port": PORT, "user": USER,
        "password": "${MARIADB_PASSWORD:-}", "heartbeat_s": 0.5,
        "tables": [{"source": f"test.{visit_table}", "target": "patient_visit",
                    "columns": VISIT_COLUMNS}],
    }))
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
           "MEDSTREAM_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
           "MEDSTREAM_DATA_DIR": str(tmp_path / "data")}
    state = tmp_path / "data" / "collectors" / name / "mariadb.sqlite"
    command = [sys.executable, "-m", "medstream", "collect", "mariadb", "--config", str(config)]
    insert = INSERT.format(visit_table)
    log = (tmp_path / "collector.log").open("w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: saved_seq(state) is not None, 60, "snapshot position")
        for batch in range(20):
            sql.transaction([(insert, visit_row(batch * 5 + i)) for i in range(1, 6)])
            if batch == 5:
                wait_caught_up(sql, state)  # some transactions saved before the kill
        process.send_signal(signal.SIGKILL)  # most likely in the middle of the stream
        process.wait(10)
        killed_at = saved_seq(state)
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_caught_up(sql, state)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    records = [r for r in read_all(kafka, expected=100) if r["op"] == "c"]
    assert_no_double(records)
    assert sorted({r["after"]["visit_no"] for r in records}) == [
        f"VTEST{n:06d}" for n in range(1, 101)]
    assert killed_at is not None
    output = (tmp_path / "collector.log").read_text()
    assert output.count("snapshot of") == 1  # the restart resumed, it did not re-snapshot
    assert "resuming from GTID position" in output


@pytest.mark.integration
def test_stream_cut_inside_a_transaction_resumes_without_duplicates(
    kafka_factory: Any, tmp_path: Path, sql: Sql, visit_table: str
) -> None:
    """The library reconnects by itself after a lost connection; no row goes out twice."""
    from confluent_kafka import Producer

    kafka = kafka_factory()
    collector = make_collector(kafka, tmp_path, visit_table, max_in_flight=50)
    gated = _GatedProducer(Producer(kafka.producer_config()))
    collector.publisher._producer = gated

    def dump_threads() -> set[int]:
        return {int(r[0]) for r in sql("SHOW PROCESSLIST") if r[4] == "Binlog Dump"}

    with Running(collector) as running:
        wait_for(lambda: gauge(collector.metrics.ready) == 1, 30, "streaming")
        wait_caught_up(sql, state_file(tmp_path), running)
        old_threads = dump_threads()
        gated.gate.clear()  # the collector stalls after 50 rows of the transaction
        with sql.connection.cursor() as cursor:
            cursor.execute("BEGIN")
            cursor.executemany(INSERT.format(visit_table),
                               [visit_row(n) for n in range(1, 20_001)])
            cursor.execute("COMMIT")
        big = sql.gtid_seq()
        wait_for(lambda: collector.metrics.read._value.get() >= 50, 20, "first rows")
        for thread_id in old_threads:
            sql(f"KILL {thread_id}")
        gated.gate.set()
        wait_caught_up(sql, state_file(tmp_path), running)
        assert dump_threads() and not dump_threads() & old_threads  # it reconnected
    records = [r for r in read_all(kafka, expected=20_000) if r["op"] == "c"]
    assert len(records) == 20_000  # no row sent twice
    assert len({r["message_id"] for r in records}) == 20_000
    assert {r["transaction_id"] for r in records} == {big}


# --- source unavailable vs configuration errors ------------------------------------------


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_unreachable_server_is_source_unavailable_not_a_config_error(tmp_path: Path) -> None:
    """Regression: a database down at start raised ConfigError (exit 2, never restarted)."""
    port = _closed_port()
    collector = _offline_collector(tmp_path, port=port)
    with pytest.raises(SourceUnavailable, match=f"cannot connect.*127.0.0.1:{port}") as info:
        collector.check()
    assert not isinstance(info.value, ConfigError)
    with pytest.raises(SourceUnavailable, match="cannot connect"):
        collector.run(threading.Event())  # no saved position: the snapshot cannot connect


def test_stream_unreachable_past_source_retry_is_source_unavailable(tmp_path: Path) -> None:
    """Regression: after source_retry_s the stream raised a bare RuntimeError."""
    collector = _offline_collector(tmp_path, port=_closed_port(), source_retry_s=0.5)
    with sqlite3.connect(state_file(tmp_path)) as db:
        db.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT)")
        db.execute("INSERT INTO kv VALUES (?, ?)", (POSITION_KEY, "0-1-1"))
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match="unreachable for"):
        collector.run(threading.Event())
    assert time.monotonic() - started < 20


@pytest.mark.integration
def test_wrong_user_stays_a_config_error(
    kafka_factory: Any, tmp_path: Path, sql: Sql, visit_table: str
) -> None:
    collector = make_collector(kafka_factory(), tmp_path, visit_table,
                               user=f"nosuch_{uuid.uuid4().hex[:8]}")
    with pytest.raises(ConfigError, match="cannot connect") as info:
        collector.check()
    assert not isinstance(info.value, SourceUnavailable)


# --- DDL, XA and value rendering: pure parts ------------------------------------------------


def test_ddl_tables_names_truncated_renamed_and_dropped_tables() -> None:
    assert ddl_tables("TRUNCATE his_visit", "test") == ("truncate", [("test", "his_visit")])
    assert ddl_tables("truncate table `his`.`a``b`", "test") == ("truncate", [("his", "a`b")])
    assert ddl_tables("RENAME TABLE a TO b, other.c TO d", "test") == (
        "rename", [("test", "a"), ("test", "b"), ("other", "c"), ("test", "d")])
    assert ddl_tables("ALTER TABLE a ADD x INT, RENAME AS o.b", "test") == (
        "rename", [("test", "a"), ("o", "b")])
    assert ddl_tables("DROP TABLE IF EXISTS `a b`, c /* generated by server */", "t") == (
        "drop", [("t", "a b"), ("t", "c")])
    for statement in ("ALTER TABLE a RENAME COLUMN x TO y", "ALTER TABLE a RENAME INDEX i TO j",
                      "ALTER TABLE a ADD COLUMN b INT", "CREATE TABLE a (id INT)",
                      "UPDATE a SET b = 1"):
        assert ddl_tables(statement, "test") is None, statement


def test_xa_statement_and_value_texts() -> None:
    assert xa_statement("XA END X'7831',X'',1") == ("END", "X'7831',X'',1")
    assert xa_statement("xa commit X'7831',X'',1 ONE PHASE") == (
        "COMMIT ONE PHASE", "X'7831',X'',1")
    assert xa_statement("XA ROLLBACK X'7831',X'',1") == ("ROLLBACK", "X'7831',X'',1")
    assert xa_statement("COMMIT") is None
    assert time_text(-timedelta(hours=1, minutes=2, seconds=3, microseconds=4)) == (
        "-01:02:03.000004")
    assert time_text(timedelta(hours=838, minutes=59, seconds=59)) == "838:59:59"
    assert float32_text(1.100000023841858) == 1.1
    assert float32_text(123456.703125) == 123456.7
    assert float32_text(3.4028234663852886e38) == 3.4028235e38


def test_ddl_on_mapped_tables_dead_letters_truncate_and_counts_rename(
    tmp_path: Path, caplog: Any
) -> None:
    collector = _offline_collector(tmp_path)
    capture = _CapturingPublisher()
    collector.publisher = capture  # type: ignore[assignment]
    reader = SimpleNamespace(log_file="mariadb-bin.000001", auto_position="")
    renamed = collector.metrics.failed("schema_changed")._value.get()
    for seq, query, schema in ((1, "TRUNCATE TABLE his_visit", "test"),
                               (2, "TRUNCATE other_table", "test"),
                               (3, "RENAME TABLE test.his_visit TO test.his_visit_old", "x"),
                               (4, "TRUNCATE his_visit", "elsewhere")):
        collector._begin(reader, _gtid_event(0, 1, seq, 100 * seq, flags=1))
        collector._on_query(reader, SimpleNamespace(query=query, schema=schema.encode()))
    assert [(code, original) for code, _, original in capture.dead_letters] == [
        ("truncate", b'{"table": "test.his_visit", "op": "truncate", "source_position": '
                     b'"0-1-1", "query": "TRUNCATE TABLE his_visit"}')]
    assert collector.metrics.failed("schema_changed")._value.get() == renamed + 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("test.his_visit was truncated" in m for m in errors)
    assert any("schema_changed" in m and "renamed" in m for m in errors)
    assert str(collector._read_position) == "0-1-4"


# --- DDL, values, back-pressure and XA against the live server -------------------------------


@pytest.mark.integration
def test_truncate_and_rename_of_a_mapped_table_are_not_silent(
    kafka_factory: Any, tmp_path: Path, sql: Sql, visit_table: str, caplog: Any
) -> None:
    kafka = kafka_factory()
    collector = make_collector(kafka, tmp_path, visit_table)
    moved = f"{visit_table}_old"
    try:
        with Running(collector) as running:
            wait_for(lambda: gauge(collector.metrics.ready) == 1, 30, "streaming")
            sql(INSERT.format(visit_table), visit_row(1))
            sql(f"TRUNCATE TABLE `{visit_table}`")
            sql(f"RENAME TABLE `{visit_table}` TO `{moved}`")
            sql(f"ALTER TABLE `{moved}` RENAME TO `{visit_table}`")
            sql(INSERT.format(visit_table), visit_row(2))
            wait_caught_up(sql, state_file(tmp_path), running)
            renamed = collector.metrics.failed("schema_changed")._value.get()
            truncated = collector.metrics.failed("truncate")._value.get()
    finally:
        sql(f"DROP TABLE IF EXISTS `{moved}`")
    dead = [p.value for p in consume(kafka, [DLQ], 1, timeout_s=20)]
    assert [d["reason_code"] for d in dead] == ["truncate"]
    assert f"test.{visit_table} was truncated" in dead[0]["reason"]
    assert truncated == 1 and renamed == 2  # renamed away, and a table renamed onto it
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert sum("schema_changed" in m and visit_table in m for m in errors) == 2
    created = [r["after"]["visit_no"] for r in read_all(kafka, expected=2) if r["op"] == "c"]
    assert created == ["VTEST000001", "VTEST000002"]


TYPED_COLUMNS = {"result_id": "id", "order_id": "id", "test_code": "id",
                 "result_time": "taken", "visit_no": "flags", "test_name": "ratio",
                 "result_value": "offset6", "unit": "offset2", "reference_range": "whole",
                 "abnormal_flag": "big", "result_status": "tiny"}


@pytest.mark.integration
def test_snapshot_and_stream_render_bit_float_and_time_identically(
    kafka_factory: Any, tmp_path: Path, sql: Sql
) -> None:
    """Regression: BIT '\\x05' vs '00000101', FLOAT '1.1' vs '1.100000023841858', and a
    negative TIME with a fraction decoded wrongly from the binlog."""
    table = f"his_typed_{uuid.uuid4().hex[:10]}"
    sql(f"CREATE TABLE `{table}` (id INT PRIMARY KEY, taken DATETIME, flags BIT(8), "
        "ratio FLOAT, offset6 TIME(6), offset2 TIME(2), whole TIME, big FLOAT, tiny BIT(1))")
    insert = f"INSERT INTO `{table}` VALUES (%s, '2024-05-01 08:30:00', b'00000101', 1.1, " \
             "'-01:02:03.000004', '-00:00:00.01', '-838:59:59', 123456.7, 1)"
    expected = {"visit_no": "5", "test_name": "1.1", "result_value": "-01:02:03.000004",
                "unit": "-00:00:00.010000", "reference_range": "-838:59:59",
                "abnormal_flag": "123456.7", "result_status": "1"}
    try:
        sql(insert, (1,))
        kafka = kafka_factory()
        collector = make_collector(kafka, tmp_path, table, tables=[
            {"source": f"test.{table}", "target": "lab_result", "columns": TYPED_COLUMNS}])
        with Running(collector) as running:
            wait_caught_up(sql, state_file(tmp_path), running)
            sql(insert, (2,))
            wait_caught_up(sql, state_file(tmp_path), running)
        records = read_all(kafka, expected=2)
    finally:
        sql(f"DROP TABLE IF EXISTS `{table}`")
    by_op = {r["op"]: r["after"] for r in records}
    assert set(by_op) == {"r", "c"}
    for op, after in by_op.items():
        assert {k: after[k] for k in expected} == expected, op


class _SilentBroker:
    """A producer whose broker never answers: nothing is ever acknowledged."""

    def __init__(self) -> None:
        self.produced = 0
        self.test_over = threading.Event()

    def produce(self, *_: Any, **__: Any) -> None:
        self.produced += 1

    def poll(self, timeout: float = 0.0) -> int:
        if self.test_over.is_set():  # ends a collector that ignored stop (it holds the table)
            raise RuntimeError("the test is over")
        time.sleep(min(timeout, 0.05))
        return 0

    def flush(self, timeout: float = 30.0) -> int:
        return self.produced

    def __len__(self) -> int:
        return self.produced


@pytest.mark.integration
def test_stop_is_honoured_while_waiting_for_a_silent_broker(
    kafka_factory: Any, tmp_path: Path, sql: Sql, visit_table: str
) -> None:
    """Regression: _wait_for_room never looked at ``stop``, so SIGTERM hung in an outage."""
    for n in range(1, 21):
        sql(INSERT.format(visit_table), visit_row(n))
    collector = make_collector(kafka_factory(), tmp_path, visit_table, max_in_flight=5)
    silent = _SilentBroker()
    collector.publisher._producer = silent
    running = Running(collector)
    with running:
        try:
            wait_for(lambda: silent.produced >= 5, 30, "the in-flight bound to fill")
            time.sleep(0.3)
            assert silent.produced == 5 and running.thread.is_alive()  # held by back-pressure
            started = time.monotonic()
            running.stop.set()
            running.thread.join(10)
            assert not running.thread.is_alive() and time.monotonic() - started < 5
        finally:
            silent.test_over.set()
    assert running.error is None
    assert saved_seq(state_file(tmp_path)) is None  # nothing acknowledged, nothing saved


def _xa_cleanup(sql: Sql, xids: list[str]) -> None:
    """Roll back our XA transactions still prepared (they would outlive the test and their
    locks would block dropping the table)."""

    def rolled_back() -> bool:
        prepared = {row[3].decode() if isinstance(row[3], bytes) else str(row[3])
                    for row in sql("XA RECOVER")}
        for xid in set(xids) & prepared:
            try:  # fails until the server has detached it from the closed session
                sql(f"XA ROLLBACK '{xid}'")
            except pymysql.err.MySQLError:
                return False
        return True

    wait_for(rolled_back, 30, "prepared XA transactions to be rolled back")


@pytest.mark.integration
def test_xa_rows_publish_at_xa_commit_only_and_survive_a_restart_while_prepared(
    kafka_factory: Any, tmp_path: Path, sql: Sql, visit_table: str
) -> None:
    """Regression: rows of XA PREPARE were published at once, even when rolled back."""
    kafka = kafka_factory()
    name = f"mdb-{uuid.uuid4().hex[:8]}"
    insert = INSERT.format(visit_table)
    committed, rolled_back = f"xa-c-{uuid.uuid4().hex[:8]}", f"xa-r-{uuid.uuid4().hex[:8]}"
    xa = Sql()
    try:
        first = make_collector(kafka, tmp_path, visit_table, name=name)
        with Running(first) as running:
            wait_caught_up(sql, state_file(tmp_path), running)
            before_xa = saved_seq(state_file(tmp_path))
            xa(f"XA START '{committed}'")
            xa(insert, visit_row(1))
            xa(f"XA END '{committed}'")
            xa(f"XA PREPARE '{committed}'")
            sql(insert, visit_row(2))
            latest = sql.gtid_seq()
            wait_for(lambda: first._read_position.max_seq >= latest, 30, "row 2 read")
            time.sleep(1.0)  # commit rounds pass: the saved position stays before the XA
            assert saved_seq(state_file(tmp_path)) == before_xa
            assert first.metrics.read._value.get() == 2  # row 1 read, but held back
        # Restarted while prepared: the held-back rows are read again from the saved position.
        again = make_collector(kafka, tmp_path, visit_table, name=name)
        with Running(again) as running:
            wait_for(lambda: gauge(again.metrics.ready) == 1, 30, "streaming")
            committed_at = datetime.fromtimestamp(time.time_ns() // 1_000_000 / 1000, tz=UTC)
            xa(f"XA COMMIT '{committed}'")
            xa(f"XA START '{rolled_back}'")
            xa(insert, visit_row(3))
            xa(f"XA END '{rolled_back}'")
            xa(f"XA PREPARE '{rolled_back}'")
            xa(f"XA ROLLBACK '{rolled_back}'")
            sql(insert, visit_row(4))
            wait_caught_up(sql, state_file(tmp_path), running)
    finally:  # detached first: a prepared XA can only be rolled back by another session then
        xa.connection.close()
        _xa_cleanup(sql, [committed, rolled_back])
    records = [r for r in read_all(kafka, expected=4) if r["op"] == "c"]
    assert_no_double(records)
    # Rows of different patients land in different partitions, so the read order says
    # nothing: when each row was first published does (row 2 is published again after the
    # restart, from the saved position before the XA).
    first_published: dict[str, datetime] = {}
    for r in records:
        visit = r["after"]["visit_no"]
        first_published[visit] = min(first_published.get(visit, r["captured_time"]),
                                     r["captured_time"])
    assert sorted(first_published) == ["VTEST000001", "VTEST000002", "VTEST000004"]  # no 3
    # Row 1 only at XA COMMIT; row 2 before it, although written after row 1's XA PREPARE.
    assert first_published["VTEST000002"] < committed_at <= first_published["VTEST000001"]
    assert sum(r["after"]["visit_no"] == "VTEST000001" for r in records) == 1
