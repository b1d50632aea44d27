"""Unit tests of the publishers' own counters: acknowledged positions kept on disk as ranges."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from clickhouse_connect.driver.client import Client

from medstream import published
from medstream.clickhouse import run_read_only
from medstream.metrics import PUBLISHED_COUNTER_FAILURES, labelled
from medstream.published import (
    FLUSH_INTERVAL_S,
    PUBLISHED_FILE,
    PublishedLedger,
    published_files,
    read_published,
    register_counter_file,
)
from medstream.settings import KafkaSettings
from producers.base import RawPublisher
from schemas.serde import RUN_HEADER, ManifestRegistry
from tests.kafka_helpers import consume, raw_topic


def test_acknowledged_offsets_are_kept_as_ranges_per_partition(tmp_path: Path) -> None:
    path = tmp_path / "published" / "simulator.sqlite"
    ledger = PublishedLedger(path, "simulator", "r1", lambda: "cluster-1")
    for offset in range(0, 10):
        ledger.acknowledged("raw.hl7_lab", 0, offset, 1_000 + offset)
    for offset in (20, 21, 22):  # another producer wrote 10..19 in between
        ledger.acknowledged("raw.hl7_lab", 0, offset, 2_000 + offset)
    ledger.acknowledged("raw.device", 1, 7, 3_000)
    ledger.close()
    ranges = sorted(read_published([path]), key=lambda r: (r.topic, r.first_offset))
    assert [(r.topic, r.partition, r.first_offset, r.last_offset, r.records) for r in ranges] == [
        ("raw.device", 1, 7, 7, 1),
        ("raw.hl7_lab", 0, 0, 9, 10),
        ("raw.hl7_lab", 0, 20, 22, 3),
    ]
    assert {(r.publisher, r.run_id, r.kafka_cluster) for r in ranges} == {
        ("simulator", "r1", "cluster-1")
    }
    assert (ranges[1].first_ms, ranges[1].last_ms) == (1_000, 1_009)


def test_a_range_still_growing_is_written_at_each_flush_and_survives_the_process(
    tmp_path: Path,
) -> None:
    path = tmp_path / "collectors" / "lis" / "published.sqlite"
    clock = [0.0]
    ledger = PublishedLedger(path, "collector-lis", "p1", lambda: "c", clock=lambda: clock[0])
    ledger.acknowledged("raw.hl7_lab", 0, 0, 1)
    ledger.flush_due()  # not due yet: nothing written
    assert list(read_published([path])) == []
    clock[0] += FLUSH_INTERVAL_S
    ledger.flush_due()
    ledger.acknowledged("raw.hl7_lab", 0, 1, 2)
    clock[0] += FLUSH_INTERVAL_S
    ledger.flush_due()
    # Read while the writer is still open (as after a kill -9): the flushed state is there.
    [grown] = read_published([path])
    assert (grown.first_offset, grown.last_offset, grown.publisher) == (0, 1, "collector-lis")
    assert published_files(tmp_path) == [path]


def test_acknowledgements_wait_while_the_cluster_id_is_unknown(tmp_path: Path) -> None:
    path = tmp_path / "published" / "simulator.sqlite"
    answers: list[str | Exception] = [TimeoutError("no broker yet"), "c2"]

    def cluster_id() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    ledger = PublishedLedger(path, "simulator", "r2", cluster_id)
    ledger.acknowledged("raw.claim", 0, 4, 9)
    ledger.flush()
    assert list(read_published([path])) == []
    ledger.close()
    [kept] = read_published([path])
    assert (kept.kafka_cluster, kept.first_offset) == ("c2", 4)
    assert published_files(tmp_path) == [path]


def _spans(path: Path) -> list[tuple[str, str, int, int]]:
    return sorted(
        (r.kafka_cluster, r.run_id, r.first_offset, r.last_offset) for r in read_published([path])
    )


def test_acks_after_a_broker_restart_are_filed_under_the_new_cluster_and_old_rows_stay(
    tmp_path: Path,
) -> None:
    path = tmp_path / "published" / "simulator.sqlite"
    clusters = ["A", "B"]  # tansu restarted: a new cluster whose offsets start at 0 again
    ledger = PublishedLedger(path, "simulator", "r1", lambda: clusters.pop(0))
    for offset in range(5_000):
        ledger.acknowledged("raw.device", 0, offset, 1_000)
    assert ledger.flush()
    for offset in range(100):
        ledger.acknowledged("raw.device", 0, offset, 2_000)
    ledger.close()
    assert _spans(path) == [("A", "r1", 0, 4_999), ("B", "r1", 0, 99)]


def test_runs_at_the_same_offsets_keep_their_own_rows(tmp_path: Path) -> None:
    path = tmp_path / "published" / "simulator.sqlite"
    for run_id, last in (("r1", 49), ("r2", 9)):
        ledger = PublishedLedger(path, "simulator", run_id, lambda: "same-id")
        for offset in range(last + 1):
            ledger.acknowledged("raw.device", 0, offset, time.time_ns() // 1_000_000)
        ledger.close()
    assert _spans(path) == [("same-id", "r1", 0, 49), ("same-id", "r2", 0, 9)]


def test_a_failed_write_is_rolled_back_counted_and_retried_with_nothing_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(published, "BUSY_TIMEOUT_S", 0.05)
    path = tmp_path / "collectors" / "lis" / PUBLISHED_FILE
    clock = [0.0]
    ledger = PublishedLedger(path, "collector-lis", "p1", lambda: "c", clock=lambda: clock[0])
    failures = labelled(PUBLISHED_COUNTER_FAILURES, "collector-lis")
    before = failures._value.get()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock: "database is locked"
    for offset in range(3):
        ledger.acknowledged("raw.hl7_lab", 0, offset, 1_000)
    with caplog.at_level(logging.ERROR, logger="medstream.published"):
        assert ledger.flush() is False
        assert ledger.flush() is False  # not tried again at once ...
        clock[0] += FLUSH_INTERVAL_S
        assert ledger.flush() is False  # ... but a little later
    assert failures._value.get() - before == 2
    assert [r.message for r in caplog.records if r.levelno == logging.ERROR] == [
        f"collector-lis: writing the published counter {path} failed (database is locked); "
        "3 acknowledgements stay pending and their source positions uncommitted until a "
        "write succeeds"
    ]  # logged once, counted each time
    blocker.execute("ROLLBACK")
    blocker.close()
    ledger.acknowledged("raw.hl7_lab", 0, 3, 1_001)
    clock[0] += FLUSH_INTERVAL_S
    assert ledger.flush() is True  # no "transaction within a transaction": rolled back
    ledger.close()
    assert _spans(path) == [("c", "p1", 0, 3)]


def test_counter_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "published" / "simulator.sqlite"
    old = os.umask(0o002)
    try:
        ledger = PublishedLedger(path, "simulator", "r1", lambda: "c")
        ledger.acknowledged("raw.device", 0, 0, 1)
        assert ledger.flush()
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.parent.iterdir()}
        ledger.close()
    finally:
        os.umask(old)
    assert modes == {
        "simulator.sqlite": 0o600, "simulator.sqlite-wal": 0o600, "simulator.sqlite-shm": 0o600
    }


def test_a_counter_file_in_a_custom_state_dir_is_found_once_registered(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    custom = tmp_path / "elsewhere" / "lis" / PUBLISHED_FILE
    PublishedLedger(custom, "collector-lis", "p1", lambda: "c").close()
    register_counter_file(data_dir, custom)
    register_counter_file(data_dir, custom)  # a restart registers it again: listed once
    assert published_files(data_dir) == [custom]
    assert (data_dir / published.INDEX_FILE).read_text().splitlines() == [str(custom.resolve())]


def test_reads_are_filtered_by_time_and_old_ranges_are_pruned(tmp_path: Path) -> None:
    path = tmp_path / "published" / "simulator.sqlite"
    now_ms = time.time_ns() // 1_000_000
    day_ms = 86_400_000
    ledger = PublishedLedger(path, "simulator", "r1", lambda: "c")
    for offset, at in ((0, now_ms - 40 * day_ms), (5, now_ms - 2 * day_ms), (9, now_ms)):
        ledger.acknowledged("raw.device", 0, offset, at)
    ledger.close()
    recent = read_published([path], since_ms=now_ms - 3 * day_ms, until_ms=now_ms - day_ms)
    assert [r.first_offset for r in recent] == [5]
    assert [r.first_offset for r in read_published([path])] == [0, 5, 9]
    PublishedLedger(path, "simulator", "r2", lambda: "c").close()  # prunes past 30 days
    assert [r.first_offset for r in read_published([path])] == [5, 9]
    plan = sqlite3.connect(path).execute(
        "EXPLAIN QUERY PLAN SELECT * FROM acked WHERE last_ms >= 0 AND first_ms < 1"
    ).fetchall()
    assert "acked_by_time" in str(plan)


@pytest.mark.integration
def test_a_collector_s_publisher_counts_what_the_broker_acknowledged(
    kafka_factory: Callable[..., KafkaSettings], tmp_path: Path
) -> None:
    kafka = kafka_factory()
    path = tmp_path / "collectors" / "lab-test" / PUBLISHED_FILE
    publisher: RawPublisher
    ledger = PublishedLedger(path, "collector-lab-test", "p7", lambda: publisher.cluster_id())
    publisher = RawPublisher(kafka, ManifestRegistry(), "hl7_lab", "lab-test", ledger=ledger)
    for n in range(5):
        publisher.publish("same-key", {
            "message_control_id": f"CTRL{n}", "organisation_id": "H001", "source_system": "LIS",
            "message_type": "ORU^R01", "received_time": 1_700_000_000_000 + n,
            "payload": "MSH|^~\\&|LIS",
        }, lambda error: None)
    assert publisher.flush(10) == 0  # flushes the counters too
    [acked] = read_published(published_files(tmp_path))
    assert (acked.publisher, acked.run_id) == ("collector-lab-test", "p7")
    assert acked.topic == kafka.topic("raw.hl7_lab")
    assert (acked.first_offset, acked.last_offset, acked.records) == (0, 4, 5)
    assert acked.kafka_cluster == publisher.cluster_id() != ""
    raw = consume(kafka, [raw_topic("hl7_lab")], 5)
    assert all(r.headers[RUN_HEADER] == b"p7" for r in raw)  # the run travels with each record


@pytest.mark.integration
def test_up_s_drain_check_goes_on_without_a_damaged_counter_file(
    clickhouse: Client, database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The query gateway is replaced by the same read-only query on the engine directly:
    the gateway's HTTP layer plays no part in what is tested here."""
    from medstream import supervisor
    from medstream.settings import ClickHouseSettings, RuntimeSettings, StreamSettings

    damaged = tmp_path / "published" / "simulator.sqlite"
    damaged.parent.mkdir()
    damaged.write_bytes(b"not a database " * 100)
    monkeypatch.setattr(
        supervisor, "query_via_gateway",
        lambda url, sql, max_rows, token: run_read_only(clickhouse, sql, database, max_rows),
    )
    monkeypatch.setattr(supervisor, "read_query_token", lambda path: "token")
    lines: list[str] = []
    up = supervisor.Supervisor(
        KafkaSettings(), ClickHouseSettings(database=database), RuntimeSettings(data_dir=tmp_path),
        StreamSettings(), out=lines.append,
    )
    up.query_url = "http://127.0.0.1:1/query"
    since = datetime.now(tz=UTC) - timedelta(minutes=5)
    assert up._drained(since) is None  # nothing published yet: not drained, and no crash
    assert up._drained(since) is None
    assert len(lines) == 1 and lines[0].startswith(
        f"warning: the publishers' counter files cannot be read ({damaged}); the drain "
        "check goes on without them"
    ), lines
