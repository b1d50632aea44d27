"""PostgreSQL CDC collector: the pgoutput decoder, and the collector against real PostgreSQL.

The integration tests use the local PostgreSQL 15 (wal_level=logical) and the session's
real broker. Every test creates its own tables, publication and slot and drops the slot
at teardown (a leftover slot pins WAL). They skip when PostgreSQL is unreachable unless
MEDSTREAM_REQUIRE_SOURCES=1.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import struct
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from medstream.settings import KafkaSettings
from producers.base import ConfigError
from producers.postgres_cdc import (
    HEARTBEAT_PREFIX,
    UNCHANGED_TOAST,
    Begin,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Origin,
    PgOutputError,
    PostgresCdcConfig,
    PostgresCdcProducer,
    Relation,
    Truncate,
    TypeInfo,
    Update,
    decode_pgoutput,
    lsn_int,
    lsn_text,
    parse_text_value,
)
from schemas.serde import ManifestRegistry
from tests.kafka_helpers import DLQ, Published, collect_command, collector_env, consume, raw_topic
from tests.waiting import wait_for

PG_DSN = os.environ.get(
    "MEDSTREAM_TEST_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test"
)
EMR = raw_topic("emr_cdc")
REPO = Path(__file__).resolve().parents[2]

# --- pgoutput decoder (pure) --------------------------------------------------------------

_PG_EPOCH_US = 946_684_800_000_000


def _pg_time(ms: int) -> bytes:
    return struct.pack(">q", ms * 1000 - _PG_EPOCH_US)


def _tuple(*values: str | None | object) -> bytes:
    out = struct.pack(">h", len(values))
    for value in values:
        if value is None:
            out += b"n"
        elif value is UNCHANGED_TOAST:
            out += b"u"
        else:
            data = str(value).encode()
            out += b"t" + struct.pack(">i", len(data)) + data
    return out


def test_decode_begin_commit_origin_type() -> None:
    commit_ms = 1_700_000_000_123
    begin = decode_pgoutput(
        b"B" + struct.pack(">Q", 0x16B3748) + _pg_time(commit_ms) + struct.pack(">I", 742)
    )
    assert begin == Begin(0x16B3748, commit_ms, 742)
    commit = decode_pgoutput(
        b"C" + b"\x00" + struct.pack(">QQ", 0x16B3748, 0x16B3780) + _pg_time(commit_ms)
    )
    assert commit == Commit(0, 0x16B3748, 0x16B3780, commit_ms)
    assert decode_pgoutput(b"O" + struct.pack(">Q", 5) + b"node_a\x00") == Origin(5, "node_a")
    assert decode_pgoutput(b"Y" + struct.pack(">I", 16500) + b"public\x00mood\x00") == TypeInfo(
        16500, "public", "mood"
    )


def test_decode_relation_and_row_changes() -> None:
    relation = decode_pgoutput(
        b"R"
        + struct.pack(">I", 16384)
        + b"public\x00his_visit\x00"
        + b"f"
        + struct.pack(">h", 2)
        + b"\x01visit_no\x00"
        + struct.pack(">Ii", 25, -1)
        + b"\x00admit_time\x00"
        + struct.pack(">Ii", 1184, -1)
    )
    assert isinstance(relation, Relation)
    assert relation.qualified_name == "public.his_visit"
    assert relation.replica_identity == "f"
    assert [(c.name, c.type_oid, c.is_key) for c in relation.columns] == [
        ("visit_no", 25, True),
        ("admit_time", 1184, False),
    ]
    oid = struct.pack(">I", 16384)
    assert decode_pgoutput(b"I" + oid + b"N" + _tuple("V1", None)) == Insert(16384, ("V1", None))
    assert decode_pgoutput(b"U" + oid + b"N" + _tuple("V1", "x")) == Update(
        16384, None, False, ("V1", "x")
    )
    assert decode_pgoutput(
        b"U" + oid + b"O" + _tuple("V1", "a") + b"N" + _tuple("V1", UNCHANGED_TOAST)
    ) == Update(16384, ("V1", "a"), False, ("V1", UNCHANGED_TOAST))
    assert decode_pgoutput(b"U" + oid + b"K" + _tuple("V0", None) + b"N" + _tuple("V1", "b")) == (
        Update(16384, ("V0", None), True, ("V1", "b"))
    )
    assert decode_pgoutput(b"D" + oid + b"K" + _tuple("V1", None)) == Delete(
        16384, ("V1", None), True
    )
    assert decode_pgoutput(b"D" + oid + b"O" + _tuple("V1", "t")) == Delete(
        16384, ("V1", "t"), False
    )
    truncate = decode_pgoutput(b"T" + struct.pack(">ib", 2, 1) + struct.pack(">II", 1, 2))
    assert truncate == Truncate(1, (1, 2))
    message = decode_pgoutput(
        b"M\x01" + struct.pack(">Q", 9) + b"medstream\x00" + struct.pack(">i", 3) + b"abc"
    )
    assert message == LogicalMessage(True, 9, "medstream", b"abc")


def test_decode_text_values_are_utf8() -> None:
    decoded = decode_pgoutput(b"I" + struct.pack(">I", 1) + b"N" + _tuple("测试-ä"))
    assert isinstance(decoded, Insert) and decoded.new == ("测试-ä",)


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (b"", "empty message"),
        (b"Z", "unknown message type 'Z'"),
        (b"B\x00\x00", "truncated"),
        (b"I" + struct.pack(">I", 1) + b"X", "Insert without a new tuple"),
        (b"D" + struct.pack(">I", 1) + b"N" + _tuple("a"), "Delete without an old tuple"),
        (b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">h", 1) + b"b", "value kind 'b'"),
        (b"O" + struct.pack(">Q", 1) + b"no-terminator", "unterminated string"),
        (b"I" + struct.pack(">I", 1) + b"N" + _tuple("a") + b"extra", "unread bytes"),
    ],
)
def test_decode_rejects_malformed_messages(payload: bytes, problem: str) -> None:
    with pytest.raises(PgOutputError, match=problem):
        decode_pgoutput(payload)


def test_lsn_text_round_trip() -> None:
    assert lsn_text(0x16B3748) == "0/16B3748"
    assert lsn_text((0x1A << 32) | 0x2B) == "1A/2B"
    assert lsn_int("0/16B3748") == 0x16B3748
    assert lsn_int("1A/2B") == (0x1A << 32) | 0x2B
    with pytest.raises(ValueError):
        lsn_int("16B3748")


def test_parse_text_value_by_type() -> None:
    shanghai = ZoneInfo("Asia/Shanghai")
    aware = parse_text_value("2024-03-01 02:03:04.5+00", 1184, shanghai)
    assert aware == datetime(2024, 3, 1, 2, 3, 4, 500000, tzinfo=UTC)
    naive = parse_text_value("2024-03-01 10:03:04", 1114, shanghai)
    assert isinstance(naive, datetime) and naive.isoformat() == "2024-03-01T10:03:04+08:00"
    assert str(parse_text_value("2024-03-01", 1082, shanghai)) == "2024-03-01"
    assert parse_text_value("42", 23, shanghai) == 42
    assert str(parse_text_value("4.50", 1700, shanghai)) == "4.50"
    assert parse_text_value("t", 16, shanghai) is True
    assert parse_text_value("x", 25, shanghai) == "x"
    assert parse_text_value(None, 1184, shanghai) is None
    with pytest.raises(ValueError):
        parse_text_value("infinity", 1184, shanghai)


def test_config_defaults_slot_and_publication_from_name() -> None:
    config = PostgresCdcConfig.model_validate(
        {
            "name": "his-pg-1",
            "organisation_id": "H001",
            "source_system": "HIS-PG",
            "dsn": PG_DSN,
            "tables": [_diag_mapping("public.d")],
        }
    )
    assert (config.slot_name, config.publication_name) == (
        "medstream_his_pg_1",
        "medstream_his_pg_1",
    )
    with pytest.raises(ValueError, match="slot 'Bad-Slot'"):
        PostgresCdcConfig.model_validate(
            {**config.model_dump(), "slot": "Bad-Slot", "tables": [_diag_mapping("public.d")]}
        )
    with pytest.raises(ValueError, match="unknown time zone"):
        PostgresCdcConfig.model_validate(
            {
                **config.model_dump(),
                "source_timezone": "Mars/Base",
                "tables": [_diag_mapping("public.d")],
            }
        )


def test_example_configuration_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    from producers.base import load_config

    monkeypatch.setenv("PGPASSWORD", "not-a-real-password")
    config = load_config(REPO / "deploy/collectors/postgres.example.yaml", PostgresCdcConfig)
    assert isinstance(config, PostgresCdcConfig)
    assert "password=not-a-real-password" in config.dsn
    assert [t.target for t in config.tables] == ["patient_visit", "visit_diagnosis", "lab_result"]
    assert config.slot_name == "medstream_his_pg_1"


# --- real PostgreSQL ----------------------------------------------------------------------


def _visit_mapping(source: str) -> dict[str, Any]:
    return {
        "source": source,
        "target": "patient_visit",
        "columns": {
            "visit_no": "visit_no",
            "patient_mrn": "mrn",
            "patient_name": "pat_name",
            "birth_date": "birth_date",
            "sex": "sex",
            "visit_type": "visit_type",
            "dept_code": "dept_code",
            "admit_time": "admit_time",
            "discharge_time": "discharge_time",
        },
    }


def _diag_mapping(source: str) -> dict[str, Any]:
    return {
        "source": source,
        "target": "visit_diagnosis",
        "columns": {
            "diag_id": "diag_id",
            "visit_no": "visit_no",
            "patient_mrn": "mrn",
            "diag_code": "icd_code",
            "diag_name": "icd_name",
            "diag_type": "diag_type",
            "diag_time": "diag_time",
        },
    }


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """The local PostgreSQL's DSN; skips (or fails with MEDSTREAM_REQUIRE_SOURCES=1) if down."""
    import psycopg2

    try:
        conn = psycopg2.connect(PG_DSN, connect_timeout=3)
    except psycopg2.OperationalError as exc:
        reason = f"PostgreSQL at {PG_DSN!r} is unreachable: {str(exc).strip()}"
        if os.environ.get("MEDSTREAM_REQUIRE_SOURCES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    with conn, conn.cursor() as cur:
        cur.execute("SHOW wal_level")
        assert cur.fetchone()[0] == "logical", "the test PostgreSQL needs wal_level=logical"
    conn.close()
    yield PG_DSN


def _sql(statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement in autocommit on the test database; returns rows if any."""

    conn = _connect_retrying()
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def _connect_retrying(timeout_s: float = 60.0) -> Any:
    """A connection, waiting while the server restarts."""
    import psycopg2

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return psycopg2.connect(PG_DSN, connect_timeout=3)
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@dataclass
class Source:
    """One test's tables and collector names."""

    tag: str
    visit: str  # qualified names
    diag: str
    name: str

    @property
    def slot(self) -> str:
        return "medstream_" + self.name.replace("-", "_")

    def config(self, tmp_path: Path, **overrides: Any) -> PostgresCdcConfig:
        data: dict[str, Any] = {
            "kind": "postgres",
            "name": self.name,
            "organisation_id": "H-TEST",
            "source_system": f"his-{self.tag}",
            "dsn": PG_DSN,
            "state_dir": str(tmp_path / "state"),
            "heartbeat_interval_s": 0,
            "feedback_interval_s": 0.2,
            "source_timezone": "Asia/Shanghai",
            "reconnect_max_backoff_s": 2,
            "tables": [_visit_mapping(self.visit), _diag_mapping(self.diag)],
        }
        data.update(overrides)
        return PostgresCdcConfig.model_validate(data)

    def insert_visit(self, cur: Any, visit_no: str, note: str = "") -> None:
        cur.execute(
            f"INSERT INTO {self.visit} (visit_no, mrn, pat_name, birth_date, sex, visit_type, "
            "dept_code, admit_time, discharge_time, note) VALUES (%s, %s, 'Test Patient', "
            "'1980-02-29', 'F', 'I', 'CARD', '2024-03-01 02:03:04+00', NULL, %s)",
            (visit_no, f"MRN-{visit_no}", note),
        )


def _drop_slot(slot: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = _sql("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,))
        if not rows:
            return
        if rows[0][0] is not None:
            _sql("SELECT pg_terminate_backend(%s)", (rows[0][0],))
            time.sleep(0.2)
            continue
        try:
            _sql("SELECT pg_drop_replication_slot(%s)", (slot,))
        except Exception:  # noqa: BLE001 - it became active again; retry
            time.sleep(0.2)
    raise AssertionError(f"could not drop replication slot {slot}")


@pytest.fixture
def source(postgres: str) -> Iterator[Source]:
    """Fresh tables for one test; the slot, publication and tables are dropped afterwards."""
    tag = uuid.uuid4().hex[:8]
    src = Source(tag, f"public.his_visit_{tag}", f"public.his_diag_{tag}", f"pg-{tag}")
    _sql(
        f"CREATE TABLE {src.visit} (visit_no text PRIMARY KEY, mrn text, pat_name text, "
        "birth_date date, sex char(1), visit_type text, dept_code text, "
        "admit_time timestamptz, discharge_time timestamp, note text, bed integer)"
    )
    _sql(
        f"CREATE TABLE {src.diag} (diag_id bigint PRIMARY KEY, visit_no text, mrn text, "
        "icd_code text, icd_name text, diag_type text, diag_time timestamptz)"
    )
    # Mapped text columns can be TOASTed: check() requires REPLICA IDENTITY FULL.
    _sql(f"ALTER TABLE {src.visit} REPLICA IDENTITY FULL")
    _sql(f"ALTER TABLE {src.diag} REPLICA IDENTITY FULL")
    yield src
    _drop_slot(src.slot)
    _sql(f"DROP PUBLICATION IF EXISTS {src.slot}")
    _sql(f"DROP TABLE IF EXISTS {src.visit}, {src.diag}")


class Running:
    """A collector running on a thread until :meth:`stop`."""

    def __init__(self, collector: PostgresCdcProducer) -> None:
        self.collector = collector
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.collector.run(self.stop_event)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def wait_streaming(self, timeout_s: float = 30) -> None:
        wait_for(lambda: self.collector.streaming or self.error is not None, timeout_s)
        assert self.error is None, self.error

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(60)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error




@pytest.fixture
def start(source: Source) -> Iterator[Callable[[PostgresCdcProducer], Running]]:
    """Starts collectors on threads; stops every one before the source is dropped."""
    started: list[Running] = []

    def run(collector: PostgresCdcProducer) -> Running:
        started.append(Running(collector))
        return started[-1]

    yield run
    for running in started:
        running.stop_event.set()
    for running in started:
        running.thread.join(60)


def _collector(
    source: Source, tmp_path: Path, kafka: KafkaSettings, producer: Any = None, **overrides: Any
) -> PostgresCdcProducer:
    return PostgresCdcProducer(
        source.config(tmp_path, **overrides), kafka, ManifestRegistry(), producer=producer
    )


def _confirmed_flush(slot: str) -> int:
    rows = _sql(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,)
    )
    assert rows, f"slot {slot} does not exist"
    return lsn_int(rows[0][0])


def _current_lsn() -> int:
    return lsn_int(_sql("SELECT pg_current_wal_lsn()::text")[0][0])


def _values(records: list[Published]) -> list[dict[str, Any]]:
    return [r.value for r in records]


def _consume_visits(
    kafka: KafkaSettings, expected: set[str], timeout_s: float = 90
) -> list[dict[str, Any]]:
    """Read the EMR topic until every expected visit was published (duplicates allowed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = _values(consume(kafka, [EMR], len(expected), timeout_s=10))
        published = {r["after"]["visit_no"] for r in records if r["after"]}
        if expected <= published or time.monotonic() > deadline:
            return records


@pytest.mark.integration
def test_snapshot_then_stream_has_no_gap_and_no_double(
    source: Source,
    kafka_factory: Callable[..., KafkaSettings],
    tmp_path: Path,
    start: Callable[[PostgresCdcProducer], Running],
) -> None:
    kafka = kafka_factory()
    conn = _connect_retrying()
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(
            f"INSERT INTO {source.visit} (visit_no, mrn, visit_type, dept_code, admit_time) "
            "SELECT 'S' || lpad(n::text, 6, '0'), 'MRN-S' || n, 'O', 'GEN', now() "
            "FROM generate_series(1, 3000) n"
        )
    writing = threading.Event()
    writing.set()
    written: list[str] = []

    def writer() -> None:
        with conn.cursor() as cur:
            n = 0
            while writing.is_set():
                n += 1
                source.insert_visit(cur, f"W{n:06d}")
                written.append(f"W{n:06d}")
                if n % 7 == 0 and n <= 3000:  # updates of snapshot rows while the snapshot is read
                    cur.execute(
                        f"UPDATE {source.visit} SET dept_code = 'ICU' WHERE visit_no = %s",
                        (f"S{n:06d}",),
                    )

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        wait_for(lambda: len(written) >= 20, 10, "writes before the snapshot")
        running = start(_collector(source, tmp_path, kafka, snapshot_batch_rows=50))
        running.wait_streaming()
        wait_for(lambda: len(written) >= 200, 30, "writes while streaming")
    finally:
        writing.clear()
        thread.join()
    final = dict(_sql(f"SELECT visit_no, dept_code FROM {source.visit}"))
    # At least one record per row; updates of snapshot rows made before the snapshot was
    # taken are inside it, so the exact count is unknown: read until the topic is quiet.
    records = _values(consume(kafka, [EMR], len(final), timeout_s=60, settle_s=2.0))
    running.stop()
    conn.close()

    created = Counter(r["after"]["visit_no"] for r in records if r["op"] in ("r", "c"))
    assert set(created) == set(final), "every row is read by the snapshot or streamed"
    assert max(created.values()) == 1, "no row is both in the snapshot and streamed"
    snapshot = [r for r in records if r["op"] == "r"]
    streamed = [r for r in records if r["op"] != "r"]
    assert snapshot and streamed
    consistent = snapshot[0]["source_position"]
    assert {r["source_position"] for r in snapshot} == {consistent}
    # Snapshot rows share one version strictly below every streamed change (the slot's
    # restart_lsn - 1, not the consistent point: changes of a transaction open across the
    # point lie below it and must still outrank the snapshot).
    [snapshot_version] = {r["position_seq"] for r in snapshot}
    assert snapshot_version < lsn_int(consistent)
    assert all(r["position_seq"] > snapshot_version for r in streamed)
    assert all(
        re.fullmatch(
            rf"his-{source.tag}:snapshot:{source.visit}:[0-9a-f]{{32}}:[0-9a-f]{{32}}",
            r["message_id"],
        )
        for r in snapshot
    ), "snapshot ids carry a hash of the key, never the key text"
    # Each row's newest state (highest position_seq) is its final state in the database.
    newest: dict[str, dict[str, Any]] = {}
    for record in records:
        visit_no = record["after"]["visit_no"]
        if visit_no not in newest or record["position_seq"] > newest[visit_no]["position_seq"]:
            newest[visit_no] = record
    assert {v: r["after"]["dept_code"] for v, r in newest.items()} == final
    assert len({r["message_id"] for r in records}) == len(records)


@pytest.mark.integration
@pytest.mark.parametrize("identity", ["full", "default"])
def test_insert_update_delete_with_before_and_after_images(
    identity: str,
    source: Source,
    kafka_factory: Callable[..., KafkaSettings],
    tmp_path: Path,
    start: Callable[[PostgresCdcProducer], Running],
) -> None:
    kafka = kafka_factory()
    if identity == "default":  # the fixture sets FULL
        _sql(f"ALTER TABLE {source.visit} REPLICA IDENTITY DEFAULT")
    collector = _collector(source, tmp_path, kafka)
    running = start(collector)
    running.wait_streaming()
    assert collector.metrics.ready._value.get() == 1
    read_before = collector.metrics.read._value.get()
    conn = _connect_retrying()
    conn.autocommit = True
    with conn.cursor() as cur:
        source.insert_visit(cur, "V0001", note="unmapped column")
        cur.execute(
            f"UPDATE {source.visit} SET discharge_time = '2024-03-05 18:30:00', "
            "dept_code = 'ICU' WHERE visit_no = 'V0001'"
        )
        cur.execute(f"DELETE FROM {source.visit} WHERE visit_no = 'V0001'")
    conn.close()
    records = _values(consume(kafka, [EMR], 3))
    running.stop()
    assert collector.metrics.read._value.get() == read_before + 3
    assert 0 <= collector.metrics.source_lag._value.get() < 60
    assert collector.metrics.ready._value.get() == 0  # stopped

    assert [r["op"] for r in records] == ["c", "u", "d"]
    created, updated, deleted = records
    after = {
        "visit_no": "V0001",
        "patient_mrn": "MRN-V0001",
        "patient_name": "Test Patient",
        "birth_date": "1980-02-29",
        "sex": "F",
        "visit_type": "I",
        "dept_code": "CARD",
        "admit_time": "2024-03-01T02:03:04+00:00",
        "discharge_time": None,
    }
    assert created["table"] == "patient_visit" and created["before"] is None
    assert created["after"] == after
    discharged = {**after, "dept_code": "ICU", "discharge_time": "2024-03-05T18:30:00+08:00"}
    assert updated["after"] == discharged
    assert deleted["after"] is None
    if identity == "full":
        assert updated["before"] == after
        assert deleted["before"] == discharged
    else:  # default identity: no before image of an update, only the key of a delete
        assert updated["before"] is None
        assert deleted["before"] == {**{k: None for k in after}, "visit_no": "V0001"}
    for record in records:
        assert record["organisation_id"] == "H-TEST"
        assert record["source_system"] == f"his-{source.tag}"
        system, change_lsn = record["message_id"].split(":")
        assert system == f"his-{source.tag}"
        # The change's own WAL position: before its commit, and its row version.
        assert lsn_int(change_lsn) < lsn_int(record["source_position"])
        assert record["position_seq"] == lsn_int(change_lsn)
    seqs = [r["position_seq"] for r in records]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3


@pytest.mark.integration
def test_rows_of_one_transaction_share_transaction_id_and_commit_position(
    source: Source,
    kafka_factory: Callable[..., KafkaSettings],
    tmp_path: Path,
    start: Callable[[PostgresCdcProducer], Running],
) -> None:
    kafka = kafka_factory()
    running = start(_collector(source, tmp_path, kafka))
    running.wait_streaming()
    conn = _connect_retrying()
    with conn, conn.cursor() as cur:  # one transaction: a visit and two diagnoses
        source.insert_visit(cur, "V0100")
        for diag_id, code in ((1, "I21.0"), (2, "E11.9")):
            cur.execute(
                f"INSERT INTO {source.diag} VALUES (%s, 'V0100', 'MRN-V0100', %s, 'Test', 'A', "
                "'2024-03-01 03:00:00+00')",
                (diag_id, code),
            )
        cur.execute("SELECT txid_current()")
        xid = cur.fetchone()[0]
    with conn, conn.cursor() as cur:  # a second transaction
        cur.execute(f"UPDATE {source.diag} SET diag_type = 'D' WHERE diag_id = 2")
    commit_lsn = lsn_int(_sql("SELECT pg_current_wal_lsn()::text")[0][0])
    conn.close()
    records = _values(consume(kafka, [EMR], 4))
    running.stop()

    assert [r["table"] for r in records] == [
        "patient_visit",
        "visit_diagnosis",
        "visit_diagnosis",
        "visit_diagnosis",
    ]
    first, second = records[:3], records[3]
    assert {r["transaction_id"] for r in first} == {xid}
    assert len({r["source_position"] for r in first}) == 1
    assert second["transaction_id"] != xid
    assert lsn_int(second["source_position"]) > lsn_int(first[0]["source_position"])
    assert lsn_int(second["source_position"]) < commit_lsn
    # Changes come before their commit record; each change has its own position.
    assert all(r["position_seq"] < lsn_int(r["source_position"]) for r in records)
    assert len({r["position_seq"] for r in records}) == 4
    assert first[1]["after"] == {
        "diag_id": "1",
        "visit_no": "V0100",
        "patient_mrn": "MRN-V0100",
        "diag_code": "I21.0",
        "diag_name": "Test",
        "diag_type": "A",
        "diag_time": "2024-03-01T03:00:00+00:00",
    }
    assert len({r["commit_time"] for r in first}) == 1


class GatedProducer:
    """A real confluent-kafka producer whose delivery reports are held until :meth:`open`."""

    def __init__(self, kafka: KafkaSettings) -> None:
        from confluent_kafka import Producer

        self._producer = Producer(kafka.producer_config())
        self._gate = threading.Event()
        self._held: list[tuple[Callable[[Any, Any], None], Any, Any]] = []
        self.delivered = 0

    def open(self) -> None:
        self._gate.set()

    def list_topics(self, *args: Any, **kwargs: Any) -> Any:  # the counter asks the cluster id
        return self._producer.list_topics(*args, **kwargs)

    def produce(self, topic: str, on_delivery: Callable[[Any, Any], None], **kwargs: Any) -> None:
        def report(error: Any, message: Any) -> None:
            self.delivered += 1
            self._held.append((on_delivery, error, message))

        self._producer.produce(topic, on_delivery=report, **kwargs)

    def _release(self) -> None:
        if self._gate.is_set():
            held, self._held = self._held, []
            for callback, error, message in held:
                callback(error, message)

    def poll(self, timeout: float = 0) -> int:
        served = self._producer.poll(timeout)
        self._release()
        return int(served)

    def flush(self, timeout: float = 30) -> int:
        remaining = self._producer.flush(timeout)
        self._release()
        return int(remaining) + (0 if self._gate.is_set() else len(self._held))

    def __len__(self) -> int:
        return len(self._producer) + (0 if self._gate.is_set() else len(self._held))

    def __bool__(self) -> bool:  # RawPublisher tests `producer or Producer(...)`
        return True


@pytest.mark.integration
def test_confirmed_flush_lsn_advances_only_after_delivery(
    source: Source,
    kafka_factory: Callable[..., KafkaSettings],
    tmp_path: Path,
    start: Callable[[PostgresCdcProducer], Running],
) -> None:
    kafka = kafka_factory()
    gated = GatedProducer(kafka)
    running = start(_collector(source, tmp_path, kafka, producer=gated))
    running.wait_streaming()
    initial = _confirmed_flush(source.slot)
    conn = _connect_retrying()
    with conn, conn.cursor() as cur:
        source.insert_visit(cur, "V0200")
    end_of_commit = _current_lsn()
    conn.close()
    # The broker has the record, but its delivery report is held back.
    assert len(consume(kafka, [EMR], 1)) == 1
    wait_for(lambda: gated.delivered >= 1, 10, "the delivery report")
    time.sleep(1.5)  # several feedback intervals (0.2 s)
    assert _confirmed_flush(source.slot) < end_of_commit
    assert _confirmed_flush(source.slot) >= initial
    gated.open()
    wait_for(lambda: _confirmed_flush(source.slot) >= end_of_commit, 15, "confirmed_flush_lsn")
    running.stop()


@pytest.mark.integration
def test_idle_heartbeat_advances_confirmed_flush_lsn(
    source: Source,
    kafka_factory: Callable[..., KafkaSettings],
    tmp_path: Path,
    start: Callable[[PostgresCdcProducer], Running],
) -> None:
    kafka = kafka_factory()
    running = start(_collector(source, tmp_path, kafka, heartbeat_interval_s=0.5))
    running.wait_streaming()
    # WAL that no mapped table wrote: the slot must still move past it.
    _sql("CREATE TEMP TABLE IF NOT EXISTS unrelated (n int)")
    _sql("SELECT pg_logical_emit_message(false, 'test', 'unrelated WAL')")
    target = _current_lsn()
    wait_for(lambda: _confirmed_flush(source.slot) >= target, 30, "confirmed_flush_lsn")
    heartbeats_before = _confirmed_flush(source.slot)
    # With no writes at all, the collector's own heartbeat messages keep moving it.
    wait_for(lambda: _confirmed_flush(source.slot) > heartbeats_before, 30, "heartbeat advance")
    running.stop()
    assert consume(kafka, [EMR], 0, timeout_s=2) == []
    assert HEARTBEAT_PREFIX == "medstream.heartbeat"


def _write_config(source: Source, tmp_path: Path, **overrides: Any) -> Path:
    import yaml

    config = source.config(tmp_path, **overrides).model_dump(mode="json")
    path = tmp_path / f"{source.name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _cli_env(kafka: KafkaSettings, tmp_path: Path) -> dict[str, str]:
    return collector_env(kafka, tmp_path / "data")


class Writer:
    """Inserts visits in small transactions on a thread, surviving server restarts.

    Only rows whose commit was confirmed are counted; a row whose commit outcome is unknown
    (connection lost at commit) is looked up in the table at the end instead.
    """

    def __init__(self, source: Source, prefix: str) -> None:
        self.source = source
        self.prefix = prefix
        self.count = 0
        self._running = threading.Event()
        self._running.set()
        self.thread = threading.Thread(target=self._write, daemon=True)
        self.thread.start()

    def _write(self) -> None:
        import psycopg2

        conn = None
        n = 0
        while self._running.is_set():
            try:
                if conn is None or conn.closed:
                    conn = _connect_retrying()
                with conn, conn.cursor() as cur:
                    n += 1
                    self.source.insert_visit(cur, f"{self.prefix}{n:06d}")
                self.count += 1
            except psycopg2.Error:
                conn = None
                time.sleep(0.2)
            time.sleep(0.005)
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self._running.clear()
        self.thread.join(30)


def _visits(source: Source) -> set[str]:
    return {row[0] for row in _sql(f"SELECT visit_no FROM {source.visit}")}


@pytest.mark.integration
def test_kill_9_mid_stream_then_restart_publishes_every_change(
    source: Source, kafka_factory: Callable[..., KafkaSettings], tmp_path: Path
) -> None:
    kafka = kafka_factory()
    config = _write_config(source, tmp_path)
    env = _cli_env(kafka, tmp_path)
    command = collect_command("postgres", config)
    conn = _connect_retrying()
    with conn, conn.cursor() as cur:
        for n in range(50):  # rows for the snapshot
            source.insert_visit(cur, f"P{n:06d}")
    conn.close()
    log_file = (tmp_path / "collector.log").open("w")
    first = subprocess.Popen(command, env=env, cwd=REPO, stdout=log_file, stderr=log_file)
    writer = Writer(source, "K")
    try:
        wait_for(lambda: writer.count >= 150, 60, "writes")
        wait_for(lambda: _slot_exists(source.slot), 30, "the slot")
        wait_for(lambda: len(consume(kafka, [EMR], 100, timeout_s=5)) >= 100, 60, "publishing")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        killed_at = datetime.now(UTC)
        confirmed_at_kill = _confirmed_flush(source.slot)
        wait_for(lambda: writer.count >= 300, 60, "writes while the collector is down")
        time.sleep(0.2)
        second = subprocess.Popen(command, env=env, cwd=REPO, stdout=log_file, stderr=log_file)
        wait_for(lambda: writer.count >= 400, 60, "writes after the restart")
    finally:
        writer.stop()
        if first.poll() is None:
            first.kill()
    expected = _visits(source)
    try:
        records = _consume_visits(kafka, expected)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(30)
        log_file.close()
    assert second.returncode == 0, (tmp_path / "collector.log").read_text()[-3000:]
    published = {r["after"]["visit_no"] for r in records}
    assert expected <= published, f"lost {len(expected - published)} row changes"
    # Duplicates after the restart are only changes that were not yet acknowledged.
    republished = [
        r
        for r in records
        if r["op"] == "c"
        and r["captured_time"] > killed_at
        and lsn_int(r["source_position"]) < confirmed_at_kill
    ]
    assert republished == []
    log_text = (tmp_path / "collector.log").read_text()
    assert "MRN-" not in log_text and "Test Patient" not in log_text


def _slot_exists(slot: str) -> bool:
    return bool(_sql("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)))


@pytest.mark.integration
def test_database_restart_mid_stream_loses_nothing(
    source: Source,
    kafka_factory: Callable[..., KafkaSettings],
    tmp_path: Path,
    start: Callable[[PostgresCdcProducer], Running],
) -> None:
    kafka = kafka_factory()
    collector = _collector(source, tmp_path, kafka)
    running = start(collector)
    running.wait_streaming()
    writer = Writer(source, "R")
    try:
        wait_for(lambda: writer.count >= 100, 60, "writes before the restart")
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", "15", "main", "restart"],
            check=True,
            timeout=120,
        )
        _connect_retrying(120).close()
        written = writer.count
        wait_for(lambda: writer.count >= written + 100, 60, "writes after the restart")
    finally:
        writer.stop()
        _connect_retrying(120).close()
    expected = _visits(source)
    records = _consume_visits(kafka, expected)
    wait_for(lambda: collector.metrics.ready._value.get() == 1, 30, "streaming again")
    running.stop()
    published = {r["after"]["visit_no"] for r in records}
    assert expected <= published, f"lost {len(expected - published)} row changes"
    assert collector.reconnects >= 1


@pytest.mark.integration
@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"source": "public.no_such_table_{tag}"}, "unknown table public.no_such_table_{tag}"),
        (
            {"columns": {**_visit_mapping("x")["columns"], "dept_code": "department"}},
            "public.his_visit_{tag} has no column department (mapped to patient_visit.dept_code)",
        ),
        (
            {"columns": {**_visit_mapping("x")["columns"], "admit_time": "bed"}},
            "type mismatch: public.his_visit_{tag}.bed is integer but "
            "patient_visit.admit_time needs timestamp",
        ),
    ],
)
def test_check_reports_mapping_errors_with_exit_code_2(
    change: dict[str, Any],
    problem: str,
    source: Source,
    kafka_factory: Callable[..., KafkaSettings],
    tmp_path: Path,
) -> None:
    kafka = kafka_factory()
    visit = {
        **_visit_mapping(source.visit),
        **{k: v.format(tag=source.tag) if isinstance(v, str) else v for k, v in change.items()},
    }
    config = _write_config(source, tmp_path, tables=[visit, _diag_mapping(source.diag)])
    result = subprocess.run(
        collect_command("postgres", config, "--check"),
        env=_cli_env(kafka, tmp_path), cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert problem.format(tag=source.tag) in result.stderr + result.stdout
    assert not _slot_exists(source.slot), "--check creates nothing"


@pytest.mark.integration
def test_check_accepts_a_valid_mapping_with_replica_identity_full(
    source: Source, kafka_factory: Callable[..., KafkaSettings], tmp_path: Path
) -> None:
    kafka = kafka_factory()
    config = _write_config(source, tmp_path)
    result = subprocess.run(
        collect_command("postgres", config, "--check"),
        env=_cli_env(kafka, tmp_path), cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 table mapping(s) valid" in result.stdout
    assert "REPLICA IDENTITY is not FULL" not in result.stdout
    assert "configuration is valid against the source" in result.stdout


@pytest.mark.integration
def test_check_in_process_lists_every_problem(
    source: Source, kafka_factory: Callable[..., KafkaSettings], tmp_path: Path
) -> None:
    kafka = kafka_factory()
    broken_visit = {
        **_visit_mapping(source.visit),
        "columns": {
            **_visit_mapping("x")["columns"],
            "dept_code": "department",
            "admit_time": "bed",
        },
    }
    collector = _collector(
        source, tmp_path, kafka, tables=[broken_visit, _diag_mapping("public.gone_" + source.tag)]
    )
    with pytest.raises(ConfigError) as info:
        collector.check()
    message = str(info.value)
    assert "has no column department" in message
    assert f"{source.visit}.bed is integer but" in message
    assert f"unknown table public.gone_{source.tag}" in message


@pytest.mark.integration
def test_schema_change_added_column_is_fine_renamed_column_is_dead_lettered(
    source: Source,
    kafka_factory: Callable[..., KafkaSettings],
    tmp_path: Path,
    start: Callable[[PostgresCdcProducer], Running],
    caplog: pytest.LogCaptureFixture,
) -> None:
    kafka = kafka_factory()
    caplog.set_level(logging.INFO, logger="medstream.collector.postgres")
    collector = _collector(source, tmp_path, kafka)
    running = start(collector)
    running.wait_streaming()
    failed = collector.metrics.failed("schema_changed")
    failed_before = failed._value.get()
    conn = _connect_retrying()
    conn.autocommit = True
    with conn.cursor() as cur:
        source.insert_visit(cur, "V0300")
        cur.execute(f"ALTER TABLE {source.visit} ADD COLUMN ward text")
        cur.execute(
            f"INSERT INTO {source.visit} (visit_no, visit_type, dept_code, admit_time, ward) "
            "VALUES ('V0301', 'O', 'GEN', now(), 'W1')"
        )
        cur.execute(f"ALTER TABLE {source.visit} RENAME COLUMN dept_code TO department")
        source_rows = 2
        cur.execute(
            f"INSERT INTO {source.visit} (visit_no, visit_type, department, admit_time) "
            "VALUES ('V0302', 'O', 'GEN', now())"
        )
        cur.execute(f"UPDATE {source.visit} SET visit_type = 'E' WHERE visit_no = 'V0300'")
        cur.execute(
            f"INSERT INTO {source.diag} VALUES (9, 'V0302', 'MRN-X', 'J18.9', 'Test', 'A', now())"
        )
    conn.close()
    records = _values(consume(kafka, [EMR], source_rows + 1))
    dead = _values(consume(kafka, [DLQ], 2))
    records.sort(key=lambda r: r["position_seq"])
    running.stop()

    assert [(r["table"], r["after"]["visit_no"]) for r in records] == [
        ("patient_visit", "V0300"),
        ("patient_visit", "V0301"),
        ("visit_diagnosis", "V0302"),
    ], "the added column changes nothing; the other table keeps streaming"
    assert "ward" not in records[1]["after"]
    assert [d["reason_code"] for d in dead] == ["schema_changed", "schema_changed"]
    for letter in dead:
        assert source.visit in letter["reason"] and "dept_code" in letter["reason"]
        assert letter["stage"] == "producer" and letter["source_kind"] == "emr_cdc"
        assert letter["organisation_id"] == "H-TEST"
        assert b'"department"' in letter["original_value"]
    assert failed._value.get() == failed_before + 2
    alerts = [
        r
        for r in caplog.records
        if r.levelno == logging.ERROR and "ALERT schema change" in r.getMessage()
    ]
    assert len(alerts) == 1, "one alert per relation change"
    assert any(
        r.levelno == logging.INFO and "gained column(s) ward" in r.getMessage()
        for r in caplog.records
    )


class StopAfter:
    """A real producer that sets ``stop`` after ``count`` records: a collector dying mid-way."""

    def __init__(self, kafka: KafkaSettings, stop: threading.Event, count: int) -> None:
        from confluent_kafka import Producer

        self._producer = Producer(kafka.producer_config())
        self._stop = stop
        self._left = count

    def list_topics(self, *args: Any, **kwargs: Any) -> Any:  # the counter asks the cluster id
        return self._producer.list_topics(*args, **kwargs)

    def produce(self, topic: str, **kwargs: Any) -> None:
        self._producer.produce(topic, **kwargs)
        self._left -= 1
        if self._left <= 0:
            self._stop.set()

    def poll(self, timeout: float = 0) -> int:
        return int(self._producer.poll(timeout))

    def flush(self, timeout: float = 30) -> int:
        return int(self._producer.flush(timeout))

    def __len__(self) -> int:
        return len(self._producer)

    def __bool__(self) -> bool:
        return True


@pytest.mark.integration
def test_collector_stopped_mid_snapshot_redoes_it_on_restart(
    source: Source,
    kafka_factory: Callable[..., KafkaSettings],
    tmp_path: Path,
    start: Callable[[PostgresCdcProducer], Running],
) -> None:
    kafka = kafka_factory()
    _sql(
        f"INSERT INTO {source.visit} (visit_no, mrn, visit_type, dept_code, admit_time) "
        "SELECT 'S' || lpad(n::text, 5, '0'), NULL, 'O', 'GEN', now() "
        "FROM generate_series(1, 500) n"
    )
    stop = threading.Event()
    first = _collector(
        source, tmp_path, kafka, producer=StopAfter(kafka, stop, 100), snapshot_batch_rows=10
    )
    first.run(stop)  # returns when stopped, mid-snapshot
    assert _slot_exists(source.slot) and not first.streaming
    first_point = _confirmed_flush(source.slot)

    second = _collector(source, tmp_path, kafka)
    start(second).wait_streaming()
    records = _values(consume(kafka, [EMR], 600, timeout_s=30))
    assert all(r["op"] == "r" for r in records)
    by_point = Counter(r["source_position"] for r in records)
    assert len(by_point) == 2, "two snapshots: the unfinished one and the redone one"
    redone = lsn_text(max(lsn_int(p) for p in by_point))
    assert lsn_int(redone) >= first_point
    assert by_point[redone] == 500
    assert 100 <= sum(by_point.values()) - 500 < 500
    assert {r["after"]["visit_no"] for r in records if r["source_position"] == redone} == (
        _visits(source)
    )
    # The redone snapshot gives every row the id it had in the unfinished one, so the
    # rows published twice collapse downstream (their event ids are equal).
    ids = {
        r["after"]["visit_no"]: r["message_id"] for r in records if r["source_position"] == redone
    }
    earlier = [r for r in records if r["source_position"] != redone]
    assert earlier and all(r["message_id"] == ids[r["after"]["visit_no"]] for r in earlier)
    assert len(set(ids.values())) == 500


@pytest.mark.integration
def test_truncate_of_a_mapped_table_is_dead_lettered(
    source: Source,
    kafka_factory: Callable[..., KafkaSettings],
    tmp_path: Path,
    start: Callable[[PostgresCdcProducer], Running],
) -> None:
    kafka = kafka_factory()
    collector = _collector(source, tmp_path, kafka)
    start(collector).wait_streaming()
    conn = _connect_retrying()
    conn.autocommit = True
    with conn.cursor() as cur:
        source.insert_visit(cur, "V0400")
        cur.execute(f"TRUNCATE {source.visit}")
        source.insert_visit(cur, "V0401")
    conn.close()
    records = _values(consume(kafka, [EMR], 2))
    dead = _values(consume(kafka, [DLQ], 1))
    assert sorted(r["after"]["visit_no"] for r in records) == ["V0400", "V0401"]
    [letter] = dead
    assert letter["reason_code"] == "truncate"
    assert f"{source.visit} was truncated" in letter["reason"]
    wait_for(lambda: _confirmed_flush(source.slot) >= _current_lsn(), 15, "the position after it")


# --- review regressions: decoding without a server (a fake producer acknowledges at once) ---


class InstantProducer:
    """Acknowledges every record at once (or holds them when ``hold``), keeping them."""

    def __init__(self, hold: bool = False) -> None:
        self.sent: list[tuple[str, Any, bytes]] = []
        self.hold = hold
        self.held: list[Callable[[Any, Any], None]] = []

    def produce(self, topic: str, key: Any = None, value: bytes = b"", **kwargs: Any) -> None:
        self.sent.append((topic, key, value))
        if self.hold:
            self.held.append(kwargs["on_delivery"])
        else:
            kwargs["on_delivery"](None, None)

    def release(self) -> None:
        held, self.held = self.held, []
        for callback in held:
            callback(None, None)

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = 0) -> int:
        return len(self.held)

    def __len__(self) -> int:
        return len(self.held)

    def __bool__(self) -> bool:
        return True


_VISIT_COLUMNS = [
    ("visit_no", 25, True),
    ("mrn", 25, False),
    ("pat_name", 25, False),
    ("birth_date", 1082, False),
    ("sex", 25, False),
    ("visit_type", 25, False),
    ("dept_code", 25, False),
    ("admit_time", 1184, False),
    ("discharge_time", 1114, False),
]


def _relation_message(
    oid: int, name: str, columns: list[tuple[str, int, bool]], identity: str = "f"
) -> bytes:
    out = b"R" + struct.pack(">I", oid) + b"public\x00" + name.encode() + b"\x00"
    out += identity.encode() + struct.pack(">h", len(columns))
    for column, type_oid, key in columns:
        out += (
            bytes([1 if key else 0]) + column.encode() + b"\x00" + struct.pack(">Ii", type_oid, -1)
        )
    return out


def _visit_tuple(visit_no: str, dept: str, name: object = "N") -> bytes:
    return _tuple(
        visit_no, "M1", name, "1980-01-01", "F", "I", dept, "2024-03-01 02:03:04+00", None
    )


def _begin(final_lsn: int, xid: int) -> bytes:
    return (
        b"B" + struct.pack(">Q", final_lsn) + _pg_time(1_700_000_000_000) + struct.pack(">I", xid)
    )


def _commit(commit_lsn: int, end_lsn: int) -> bytes:
    return b"C\x00" + struct.pack(">QQ", commit_lsn, end_lsn) + _pg_time(1_700_000_000_000)


def _offline(tmp_path: Path, producer: Any, **overrides: Any) -> PostgresCdcProducer:
    src = Source("unit", "public.v", "public.d", "pg-unit")
    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:1", topic_prefix="unit.")
    return PostgresCdcProducer(
        src.config(tmp_path, **overrides), kafka, ManifestRegistry(), producer=producer
    )


def _decoded(producer: InstantProducer) -> list[dict[str, Any]]:
    from schemas.serde import AvroDeserializer

    decode = AvroDeserializer(ManifestRegistry())
    return [decode(value) for _, _, value in producer.sent]


def test_unchanged_toast_is_never_filled_from_a_key_only_old_tuple(tmp_path: Path) -> None:
    producer = InstantProducer()
    collector = _offline(tmp_path, producer)
    collector._handle(_relation_message(1, "v", _VISIT_COLUMNS, identity="d"), 0)
    collector._handle(_begin(0x5000, 7), 0x4000)
    # A key-changing update (old tuple 'K': key only, other columns null) that leaves the
    # TOASTed pat_name unchanged: the null of the key tuple must not become its value.
    old_key = _tuple("K1", None, None, None, None, None, None, None, None)
    new = _visit_tuple("K2", "ICU", UNCHANGED_TOAST)
    collector._handle(b"U" + struct.pack(">I", 1) + b"K" + old_key + b"N" + new, 0x4100)
    # With a full old row ('O') the unchanged value is taken from it.
    old_full = _visit_tuple("K2", "ICU", "Long Name")
    new_full = _visit_tuple("K2", "CCU", UNCHANGED_TOAST)
    collector._handle(b"U" + struct.pack(">I", 1) + b"O" + old_full + b"N" + new_full, 0x4200)
    collector._handle(_commit(0x5000, 0x5010), 0x5010)
    records = _decoded(producer)
    assert [r.get("reason_code") for r in records] == ["toast_unavailable", None]
    assert records[1]["after"]["patient_name"] == "Long Name"
    assert not any(
        (r.get("after") or {}).get("visit_no") == "K2" and r["after"]["patient_name"] is None
        for r in records
        if "after" in r
    )


def test_position_seq_follows_wal_order_across_the_consistent_point(tmp_path: Path) -> None:
    producer = InstantProducer()
    collector = _offline(tmp_path, producer)
    point = 1_000_000
    collector._handle(_relation_message(1, "v", _VISIT_COLUMNS), 0)
    collector._handle(_relation_message(2, "d", [("n", 23, True)]), 0)
    # T1 began before the snapshot's consistent point and commits after it.
    collector._handle(_begin(point + 60, 700), point - 10_000)
    lsn = point - 9_000
    for n in range(100):  # changes of another published table below the point
        collector._handle(b"I" + struct.pack(">I", 2) + b"N" + _tuple(str(n)), lsn)
        lsn += 80
    collector._handle(b"U" + struct.pack(">I", 1) + b"N" + _visit_tuple("V1", "A"), lsn)
    collector._handle(b"U" + struct.pack(">I", 1) + b"N" + _visit_tuple("V1", "B"), point + 40)
    collector._handle(_commit(point + 60, point + 70), point + 70)
    collector._handle(_begin(point + 200, 701), point + 80)
    collector._handle(b"U" + struct.pack(">I", 1) + b"N" + _visit_tuple("V1", "C"), point + 90)
    collector._handle(_commit(point + 200, point + 210), point + 210)
    records = [r for r in _decoded(producer) if r.get("table") == "patient_visit"]
    assert [r["after"]["dept_code"] for r in records] == ["A", "B", "C"]
    seqs = [r["position_seq"] for r in records]
    assert seqs == [lsn, point + 40, point + 90], "each change keeps its own LSN"


def test_unmapped_relation_is_an_error_once_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    producer = InstantProducer()
    collector = _offline(tmp_path, producer)
    failed = collector.metrics.failed("unmapped_relation")
    before = failed._value.get()
    with caplog.at_level(logging.ERROR, logger="medstream.collector.postgres"):
        collector._handle(_relation_message(9, "v_p2024", _VISIT_COLUMNS), 0)
        collector._handle(_begin(0x5000, 7), 0x4000)
        for lsn in (0x4100, 0x4200):  # two changes: one report
            collector._handle(b"I" + struct.pack(">I", 9) + b"N" + _visit_tuple("V1", "A"), lsn)
        collector._handle(_commit(0x5000, 0x5010), 0x5010)
    assert failed._value.get() == before + 1
    errors = [r.getMessage() for r in caplog.records if "public.v_p2024" in r.getMessage()]
    assert len(errors) == 1 and "no table mapping names it" in errors[0]
    assert producer.sent == []


def test_renamed_mapped_table_keeps_streaming_and_is_remembered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from producers.base import CollectorState

    producer = InstantProducer()
    state = CollectorState(tmp_path / "state.sqlite")
    collector = _offline(tmp_path, producer)
    collector._state = state
    caplog.set_level(logging.WARNING, logger="medstream.collector.postgres")
    collector._handle(_relation_message(1, "v", _VISIT_COLUMNS), 0)
    collector._handle(_relation_message(1, "v_renamed", _VISIT_COLUMNS), 0)
    collector._handle(_begin(0x5000, 7), 0x4000)
    collector._handle(b"I" + struct.pack(">I", 1) + b"N" + _visit_tuple("V1", "A"), 0x4100)
    collector._handle(_commit(0x5000, 0x5010), 0x5010)
    # A new process (OIDs in memory are gone) still knows the relation from its state.
    restarted = _offline(tmp_path, producer)
    restarted._state = state
    restarted._handle(_relation_message(1, "v_renamed", _VISIT_COLUMNS), 0)
    restarted._handle(_begin(0x6000, 8), 0x5100)
    restarted._handle(b"I" + struct.pack(">I", 1) + b"N" + _visit_tuple("V2", "A"), 0x5200)
    restarted._handle(_commit(0x6000, 0x6010), 0x6010)
    state.close()
    records = _decoded(producer)
    assert [(r["table"], r["after"]["visit_no"]) for r in records] == [
        ("patient_visit", "V1"),
        ("patient_visit", "V2"),
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("public.v is now named public.v_renamed" in w for w in warnings)


def test_source_down_is_source_unavailable_not_a_config_error(tmp_path: Path) -> None:
    from producers.base import SourceUnavailable

    collector = _offline(tmp_path, InstantProducer(), dsn="host=127.0.0.1 port=5999 dbname=x")
    with pytest.raises(SourceUnavailable, match="cannot connect to PostgreSQL"):
        collector.check()
    with pytest.raises(SourceUnavailable):
        collector.run(threading.Event())


class FeedbackCursor:
    """Records send_feedback calls."""

    def __init__(self) -> None:
        self.feedback: list[int] = []

    def send_feedback(self, flush_lsn: int = 0, force: bool = False, **_: Any) -> None:
        self.feedback.append(flush_lsn)


def test_back_pressure_wait_is_stop_aware_and_keeps_the_connection_alive(
    tmp_path: Path,
) -> None:
    from producers.postgres_cdc import _Stopped

    producer = InstantProducer(hold=True)  # a broker that never answers
    collector = _offline(tmp_path, producer, max_in_flight=1, feedback_interval_s=0.1)
    cursor = FeedbackCursor()
    collector._cursor, collector.streaming, collector._flush_sent = cursor, True, 0x4000
    collector._handle(_relation_message(1, "v", _VISIT_COLUMNS), 0)
    collector._handle(_begin(0x5000, 7), 0x4100)
    collector._handle(b"I" + struct.pack(">I", 1) + b"N" + _visit_tuple("V1", "A"), 0x4200)
    stop = threading.Event()
    timer = threading.Timer(0.6, stop.set)
    timer.start()
    started = time.monotonic()
    with pytest.raises(_Stopped):
        collector._handle(
            b"I" + struct.pack(">I", 1) + b"N" + _visit_tuple("V2", "A"), 0x4300, stop
        )
    assert time.monotonic() - started < 5
    assert len(cursor.feedback) >= 3 and set(cursor.feedback) == {0x4000}, (
        "only the already confirmed position is repeated"
    )


def test_reading_pauses_while_psycopg2_could_confirm_an_unacknowledged_commit(
    tmp_path: Path,
) -> None:
    producer = InstantProducer(hold=True)
    collector = _offline(tmp_path, producer)
    collector._cursor = FeedbackCursor()
    collector._handle(_relation_message(1, "v", _VISIT_COLUMNS), 0)
    collector._flush_sent = 0x4800  # confirmed while idle
    collector._last_marked = collector._acked_upto = 0x4800
    # T1 (after the confirmed point) is read in full but not yet acknowledged ...
    collector._last_data_start = 0x4900
    collector._handle(_begin(0x5000, 7), 0x4900)
    collector._handle(b"I" + struct.pack(">I", 1) + b"N" + _visit_tuple("V1", "A"), 0x4900)
    collector._handle(_commit(0x5000, 0x5010), 0x5010)
    collector._last_data_start = 0x5010
    assert not collector._must_drain_before_read()
    # ... then T2, which began before the confirmed point: its Begin lies below it.
    collector._handle(_begin(0x6000, 8), 0x4700)
    collector._last_data_start = 0x4700
    assert collector._must_drain_before_read(), "a keepalive now would confirm past T1"
    producer.release()
    collector._collect_acks()
    assert not collector._must_drain_before_read()


# --- review regressions against the real server -------------------------------------------


@pytest.mark.integration
def test_check_refuses_toastable_mapped_table_without_replica_identity_full(
    source: Source, kafka_factory: Callable[..., KafkaSettings], tmp_path: Path
) -> None:
    _sql(f"ALTER TABLE {source.visit} REPLICA IDENTITY DEFAULT")
    collector = _collector(source, tmp_path, kafka_factory())
    with pytest.raises(ConfigError) as info:
        collector.check()
    message = str(info.value)
    assert f"{source.visit}: REPLICA IDENTITY is not FULL" in message
    assert f"ALTER TABLE {source.visit} REPLICA IDENTITY FULL" in message
    assert source.diag not in message, "the FULL table is fine"


@pytest.mark.integration
def test_check_refuses_a_database_that_is_not_utf8(
    postgres: str, kafka_factory: Callable[..., KafkaSettings], tmp_path: Path
) -> None:
    database = f"latin_{uuid.uuid4().hex[:8]}"
    _sql(
        f"CREATE DATABASE {database} ENCODING 'LATIN1' TEMPLATE template0 "
        "LC_COLLATE 'C' LC_CTYPE 'C'"
    )
    try:
        src = Source("enc", "public.v", "public.d", "pg-enc")
        collector = PostgresCdcProducer(
            src.config(tmp_path, dsn=f"host=127.0.0.1 port=5432 user=postgres dbname={database}"),
            kafka_factory(),
            ManifestRegistry(),
        )
        with pytest.raises(ConfigError, match="encoding is LATIN1"):
            collector.check()
    finally:
        _sql(f"DROP DATABASE {database}")


@pytest.mark.integration
def test_partitioned_table_changes_arrive_under_the_mapped_root(
    postgres: str, kafka_factory: Callable[..., KafkaSettings], tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    src = Source(tag, f"public.rv_visit_{tag}", f"public.rv_diag_{tag}", f"pg-{tag}")
    _sql(
        f"CREATE TABLE {src.visit} (visit_no text, mrn text, pat_name text, birth_date date, "
        "sex char(1), visit_type text, dept_code text, admit_time timestamptz, "
        "discharge_time timestamp, note text, bed integer, PRIMARY KEY (visit_no, admit_time)) "
        "PARTITION BY RANGE (admit_time)"
    )
    _sql(
        f"CREATE TABLE {src.visit}_p2024 PARTITION OF {src.visit} "
        "FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')"
    )
    for table in (src.visit, f"{src.visit}_p2024"):
        _sql(f"ALTER TABLE {table} REPLICA IDENTITY FULL")
    _sql(
        f"CREATE TABLE {src.diag} (diag_id bigint PRIMARY KEY, visit_no text, mrn text, "
        "icd_code text, icd_name text, diag_type text, diag_time timestamptz)"
    )
    try:
        kafka = kafka_factory()
        conn = _connect_retrying()
        conn.autocommit = True
        with conn.cursor() as cur:
            src.insert_visit(cur, "P0")
        collector = _collector(src, tmp_path, kafka)
        running = Running(collector)
        running.wait_streaming()
        with conn.cursor() as cur:
            src.insert_visit(cur, "P1")
        conn.close()
        records = _values(consume(kafka, [EMR], 2, timeout_s=20))
        running.stop()
        assert sorted((r["op"], r["after"]["visit_no"]) for r in records) == [
            ("c", "P1"),
            ("r", "P0"),
        ]
        assert collector.metrics.failed("unmapped_relation")._value.get() == 0
    finally:
        _drop_slot(src.slot)
        _sql(f"DROP PUBLICATION IF EXISTS {src.slot}")
        _sql(f"DROP TABLE IF EXISTS {src.visit}, {src.diag}")


@pytest.mark.integration
def test_snapshot_waits_for_a_slow_broker_instead_of_failing(
    source: Source,
    kafka_factory: Callable[..., KafkaSettings],
    tmp_path: Path,
    start: Callable[[PostgresCdcProducer], Running],
) -> None:
    kafka = kafka_factory()
    _sql(
        f"INSERT INTO {source.visit} (visit_no, mrn, visit_type, dept_code, admit_time) "
        "SELECT 'S' || n, NULL, 'O', 'GEN', now() FROM generate_series(1, 20) n"
    )
    gated = GatedProducer(kafka)  # acknowledgements held: a broker slower than any deadline
    running = start(_collector(source, tmp_path, kafka, producer=gated))
    wait_for(lambda: gated.delivered >= 20, 30, "the snapshot records at the broker")
    time.sleep(2)
    assert running.error is None and not running.collector.streaming
    gated.open()
    running.wait_streaming()
    running.stop()
    records = _values(consume(kafka, [EMR], 20))
    assert {r["after"]["visit_no"] for r in records} == {f"S{n}" for n in range(1, 21)}


@pytest.mark.integration
def test_confirmed_flush_never_passes_an_unacknowledged_commit(
    source: Source,
    kafka_factory: Callable[..., KafkaSettings],
    tmp_path: Path,
    start: Callable[[PostgresCdcProducer], Running],
) -> None:
    kafka = kafka_factory()
    gated = GatedProducer(kafka)
    gated.open()
    running = start(_collector(source, tmp_path, kafka, producer=gated))
    running.wait_streaming()
    early = _connect_retrying()  # T2: begins now, commits last
    cur2 = early.cursor()
    source.insert_visit(cur2, "T2-A")
    conn = _connect_retrying()
    conn.autocommit = True
    with conn.cursor() as cur:  # T0: acknowledged and confirmed above T2's first change
        source.insert_visit(cur, "T0")
    t0_end = _current_lsn()
    wait_for(lambda: _confirmed_flush(source.slot) >= t0_end, 15, "T0 confirmed")
    gated._gate.clear()  # from now on acknowledgements are held
    with conn.cursor() as cur:  # T1: read in full, never acknowledged
        source.insert_visit(cur, "T1")
    t1_end = _current_lsn()
    wait_for(lambda: gated.delivered >= 2, 10, "T1 at the broker")
    source.insert_visit(cur2, "T2-B")
    early.commit()  # T2 is decoded after T1, with a change below the confirmed point
    for _ in range(20):  # more WAL: keepalives with a WAL end past T1's commit
        _sql("SELECT pg_logical_emit_message(false, 'test', 'wal')")
        time.sleep(0.4)
    assert _confirmed_flush(source.slot) < t1_end, "confirmed past an unacknowledged commit"
    gated.open()
    wait_for(lambda: _confirmed_flush(source.slot) >= t1_end, 30, "T1 confirmed once acknowledged")
    running.stop()
    early.close()
    conn.close()
