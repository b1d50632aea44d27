"""Publishers' own count of what the broker acknowledged, kept on disk: a source independent
of the sink and of the broker for `medstream reconcile`.

Every publisher of raw records (each edge collector, the simulator) records the position of
each acknowledged record in one SQLite file per publisher (the simulator's under the data
directory, a collector's beside its positions): contiguous acknowledged offsets of one
partition form one range row, keyed by run, cluster and position and only ever extended,
written synchronously in one transaction per delivery batch. The file survives a broker
that forgets everything (tansu keeps its log in memory), so reconcile can still say how
many acknowledged records, and which offsets, never reached the sink's ledger.

Finding the files: every collector lists its counter file's absolute path in
``DATA_DIR/published/collectors.txt`` when it starts (:func:`register_counter_file`), so
:func:`published_files` finds one kept in a custom ``state_dir`` too; the default places are
also searched. Files are created 0600 whatever the umask; ranges older than
:data:`RETENTION_DAYS` are pruned when a publisher opens the file and hourly after that.
"""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from medstream.metrics import PUBLISHED_COUNTER_FAILURES, labelled

log = logging.getLogger("medstream.published")

#: The simulator's counter file, under the data directory; ...
SIMULATOR_FILE = Path("published") / "simulator.sqlite"
#: ... an edge collector's, in its state directory (DATA_DIR/collectors/NAME by default).
PUBLISHED_FILE = "published.sqlite"
#: Every collector lists its counter file here (one absolute path a line), so
#: :func:`published_files` finds it even in a custom ``state_dir``.
INDEX_FILE = Path("published") / "collectors.txt"
#: Pending acknowledgements are written at least this often (seconds) ...
FLUSH_INTERVAL_S = 0.1
#: ... or as soon as this many are pending.
FLUSH_RECORDS = 1000
#: Ranges whose newest record is older than this are pruned (reconcile looks at recent runs).
RETENTION_DAYS = 30
#: Pruning runs at most this often (seconds) while a publisher is running.
PRUNE_INTERVAL_S = 3600.0
#: A failed counter write is logged at most this often (seconds); each one is counted.
FAILURE_LOG_INTERVAL_S = 10.0
#: How long a write waits for another connection's lock before it fails (seconds).
BUSY_TIMEOUT_S = 5.0
_SCHEMA_VERSION = 1


def new_run_id() -> str:
    """A fresh run id: eight random hex digits (unique per run, short enough for source ids)."""
    return secrets.token_hex(4)


def register_counter_file(data_dir: Path, path: Path) -> None:
    """List a collector's counter file in ``data_dir``'s index (once), for reconcile."""
    index = data_dir / INDEX_FILE
    entry = str(path.resolve())
    if entry in _indexed(index):
        return
    index.parent.mkdir(parents=True, exist_ok=True)
    with open(os.open(index, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a") as out:
        out.write(entry + "\n")  # one short O_APPEND write: collectors may start together


def _indexed(index: Path) -> list[str]:
    try:
        return [line for line in index.read_text(encoding="utf-8").splitlines() if line]
    except FileNotFoundError:
        return []


def published_files(data_dir: Path) -> list[Path]:
    """The counter files of the simulator and of every collector using ``data_dir``: those in
    the default state directories and those a collector listed in :data:`INDEX_FILE`."""
    found = [
        data_dir / SIMULATOR_FILE,
        *sorted(data_dir.glob(f"collectors/*/{PUBLISHED_FILE}")),
        *(Path(line) for line in _indexed(data_dir / INDEX_FILE)),
    ]
    unique: dict[Path, Path] = {}
    for path in found:
        if path.is_file():
            unique.setdefault(path.resolve(), path)
    return list(unique.values())


@dataclass
class AckedRange:
    """Contiguous offsets of one partition the broker acknowledged to one publisher run."""

    publisher: str
    run_id: str
    kafka_cluster: str
    topic: str
    partition: int
    first_offset: int
    last_offset: int
    first_ms: int
    last_ms: int

    @property
    def records(self) -> int:
        """Acknowledged records in the range."""
        return self.last_offset - self.first_offset + 1


_SCHEMA = """
CREATE TABLE IF NOT EXISTS acked (
    run_id TEXT NOT NULL, kafka_cluster TEXT NOT NULL, topic TEXT NOT NULL,
    partition INTEGER NOT NULL, first_offset INTEGER NOT NULL, last_offset INTEGER NOT NULL,
    first_ms INTEGER NOT NULL, last_ms INTEGER NOT NULL,
    PRIMARY KEY (run_id, kafka_cluster, topic, partition, first_offset));
CREATE INDEX IF NOT EXISTS acked_by_time ON acked (last_ms);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, publisher TEXT NOT NULL, started_ms INTEGER NOT NULL);
"""

# A row is only ever extended: a later write of the same range never makes it shorter.
_UPSERT = """
INSERT INTO acked VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (run_id, kafka_cluster, topic, partition, first_offset) DO UPDATE SET
    last_offset = max(last_offset, excluded.last_offset),
    first_ms = min(first_ms, excluded.first_ms), last_ms = max(last_ms, excluded.last_ms)
"""


def _open_private(path: Path) -> sqlite3.Connection:
    """The counter file, readable by its owner only whatever the umask (SQLite gives its
    -wal and -shm files the same mode)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    os.chmod(path, 0o600)
    db = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S
    )
    db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # like the collectors' positions: survives a crash
    if db.execute("PRAGMA user_version").fetchone()[0] < _SCHEMA_VERSION:
        _migrate(db)
    return db


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a file written by an older version to the current key (run_id in it)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        old = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'acked'"
        ).fetchone()
        if old is not None:
            db.execute("ALTER TABLE acked RENAME TO acked_old")
        for statement in filter(str.strip, _SCHEMA.split(";")):
            db.execute(statement)
        if old is not None:
            db.execute("INSERT OR IGNORE INTO acked SELECT * FROM acked_old")
            db.execute("DROP TABLE acked_old")
        db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


class PublishedLedger:
    """Records one publisher run's acknowledged offsets durably (thread-safe).

    Call :meth:`acknowledged` from the delivery callback, and :meth:`flush` before anything
    acts on those acknowledgements (a source position committed, an answer to a sender):
    the write is synchronous, so a count that was acted on survives a crash. ``flush_due``
    is for a publisher with nothing to act on (the simulator). ``cluster_id`` is asked at
    the first write, and again after any partition's offsets went backwards (a restarted
    broker, e.g. tansu, which keeps its log in memory, is a new cluster starting at 0):
    offsets are only unique within one cluster. A failed write is rolled back, keeps
    everything pending, is logged and counted, and is tried again at the first flush
    :data:`FLUSH_INTERVAL_S` later.
    """

    def __init__(
        self,
        path: Path,
        publisher: str,
        run_id: str,
        cluster_id: Callable[[], str],
        clock: Callable[[], float] = time.monotonic,
        retention_days: float = RETENTION_DAYS,
    ) -> None:
        self.path = path
        self.publisher = publisher
        self.run_id = run_id
        self._cluster_id = cluster_id
        # Acknowledgements are grouped in epochs: a new one begins when offsets go
        # backwards; each epoch's cluster id is asked at its first write.
        self._epoch = 0
        self._clusters: dict[int, str] = {}
        self._clock = clock
        self._retention_ms = int(retention_days * 86_400_000)
        self._lock = threading.Lock()
        # (topic, partition) -> [first, last, first_ms, last_ms, epoch], written whole at
        # each flush while it grows.
        self._open: dict[tuple[str, int], list[int]] = {}
        self._dirty: set[tuple[str, int]] = set()
        self._closed: list[tuple[str, int, list[int]]] = []
        self._pending = 0
        self._last_flush = clock()
        self._last_prune = clock()
        self._last_failure_log: float | None = None
        self._retry_at: float | None = None
        self._failures = labelled(PUBLISHED_COUNTER_FAILURES, publisher)
        self._db = _open_private(path)
        self._db.execute(
            "INSERT OR IGNORE INTO runs VALUES (?, ?, ?)",
            (run_id, publisher, time.time_ns() // 1_000_000),
        )
        self._prune()

    def acknowledged(self, topic: str, partition: int, offset: int, timestamp_ms: int) -> None:
        """The broker acknowledged a record at this position."""
        key = (topic, partition)
        with self._lock:
            current = self._open.get(key)
            if current is not None and offset == current[1] + 1:
                current[1] = offset
                current[3] = max(current[3], timestamp_ms)
            else:
                if current is not None and offset <= current[1]:
                    # Offsets went backwards: the broker is a new cluster. What came before
                    # keeps the old cluster id; the id is asked again at the next write.
                    self._closed.extend((t, p, span) for (t, p), span in self._open.items())
                    self._open.clear()
                    self._epoch += 1
                elif current is not None:
                    self._closed.append((topic, partition, current))
                self._open[key] = [offset, offset, timestamp_ms, timestamp_ms, self._epoch]
            self._dirty.add(key)
            self._pending += 1

    def flush_due(self) -> None:
        """Write pending acknowledgements when enough time or records have gathered."""
        if self._pending and (
            self._pending >= FLUSH_RECORDS or self._clock() - self._last_flush >= FLUSH_INTERVAL_S
        ):
            self.flush()

    def flush(self) -> bool:
        """Write every pending acknowledgement in one synchronous transaction.

        Returns True once nothing is pending; False when the write failed or the cluster id
        is unknown yet (logged; everything stays pending for the next flush).
        """
        with self._lock:
            if not self._pending:
                return True
            if self._retry_at is not None and self._clock() < self._retry_at:
                return False  # the last write just failed: try again a little later
            rows = [*self._closed, *((t, p, list(self._open[(t, p)])) for t, p in self._dirty)]
            try:
                clusters = self._clusters_of({span[4] for _, _, span in rows})
            except Exception as exc:  # not connected yet: the acks wait for the next flush
                log.warning("%s: Kafka cluster id unknown yet (%s)", self.publisher, exc)
                return False
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany(
                    _UPSERT,
                    [
                        (self.run_id, clusters[span[4]], topic, partition, *span[:4])
                        for topic, partition, span in rows
                    ],
                )
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._failed(exc)
                return False
            self._closed, self._dirty, self._pending = [], set(), 0
            self._retry_at = None
            self._last_flush = self._clock()
            if self._last_flush - self._last_prune >= PRUNE_INTERVAL_S:
                self._last_prune = self._last_flush
                self._prune()
            return True

    def _clusters_of(self, epochs: set[int]) -> dict[int, str]:
        for epoch in sorted(epochs):
            if epoch not in self._clusters:
                self._clusters[epoch] = self._cluster_id()
        return self._clusters

    def _failed(self, exc: sqlite3.Error) -> None:
        """A write failed: undo it, count it, say so (at most every few seconds)."""
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")
        self._failures.inc()
        now = self._clock()
        self._retry_at = now + FLUSH_INTERVAL_S
        if self._last_failure_log is None or now - self._last_failure_log >= FAILURE_LOG_INTERVAL_S:
            self._last_failure_log = now
            log.error(
                "%s: writing the published counter %s failed (%s); %d acknowledgements stay "
                "pending and their source positions uncommitted until a write succeeds",
                self.publisher, self.path, exc, self._pending,
            )

    def _prune(self) -> None:
        """Drop ranges older than the retention, and runs left without any."""
        cutoff = time.time_ns() // 1_000_000 - self._retention_ms
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM acked WHERE last_ms < ?", (cutoff,))
            self._db.execute(
                "DELETE FROM runs WHERE started_ms < ? AND run_id NOT IN "
                "(SELECT DISTINCT run_id FROM acked)",
                (cutoff,),
            )
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._failed(exc)

    def close(self) -> None:
        """Write the rest and close the file."""
        self.flush()
        with self._lock:
            self._db.close()


def read_published(
    paths: Iterable[Path], since_ms: int | None = None, until_ms: int | None = None
) -> Iterator[AckedRange]:
    """The acknowledged ranges recorded in the given counter files; with ``since_ms`` /
    ``until_ms`` only those with a record in [since_ms, until_ms) (filtered in SQL)."""
    for path in paths:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
        try:
            publisher_of = dict(db.execute("SELECT run_id, publisher FROM runs").fetchall())
            rows = db.execute(
                "SELECT run_id, kafka_cluster, topic, partition, first_offset, last_offset, "
                "first_ms, last_ms FROM acked WHERE last_ms >= ? AND first_ms < ? "
                "ORDER BY kafka_cluster, topic, partition, first_offset",
                (
                    since_ms if since_ms is not None else -(2**63),
                    until_ms if until_ms is not None else 2**63 - 1,
                ),
            ).fetchall()
        finally:
            db.close()
        for run_id, cluster, topic, partition, first, last, first_ms, last_ms in rows:
            yield AckedRange(
                publisher_of.get(run_id, path.stem), run_id, cluster, topic, partition,
                first, last, first_ms, last_ms,
            )
