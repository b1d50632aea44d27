"""Publishers' own count of what the broker acknowledged, kept on disk: a source independent
of the sink and of the broker for `medstream reconcile`.

Every publisher of raw records (each edge collector, the simulator) records the position of
each acknowledged record in one SQLite file per publisher (the simulator's under the data
directory, a collector's beside its positions, see :func:`published_files`):
contiguous acknowledged offsets of one partition form one range row, written in one
transaction per delivery batch. The file survives a broker that forgets everything (tansu
keeps its log in memory), so reconcile can still say how many acknowledged records, and
which offsets, never reached the sink's ledger.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("medstream.published")

#: The simulator's counter file, under the data directory; ...
SIMULATOR_FILE = Path("published") / "simulator.sqlite"
#: ... an edge collector's, in its state directory (DATA_DIR/collectors/NAME by default).
PUBLISHED_FILE = "published.sqlite"
#: Pending acknowledgements are written at least this often (seconds) ...
FLUSH_INTERVAL_S = 0.1
#: ... or as soon as this many are pending.
FLUSH_RECORDS = 1000


def new_run_id() -> str:
    """A fresh run id: eight random hex digits (unique per run, short enough for source ids)."""
    return secrets.token_hex(4)


def published_files(data_dir: Path) -> list[Path]:
    """The counter files of the simulator and of the collectors kept under ``data_dir``."""
    found = [data_dir / SIMULATOR_FILE, *sorted(data_dir.glob(f"collectors/*/{PUBLISHED_FILE}"))]
    return [path for path in found if path.is_file()]


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
    PRIMARY KEY (kafka_cluster, topic, partition, first_offset));
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, publisher TEXT NOT NULL, started_ms INTEGER NOT NULL);
"""


class PublishedLedger:
    """Records one publisher run's acknowledged offsets durably (thread-safe).

    Call :meth:`acknowledged` from the delivery callback and :meth:`flush_due` after each
    poll; :meth:`close` writes the rest. ``cluster_id`` is asked once, at the first write
    (the publisher is connected by then): offsets are only unique within one cluster.
    """

    def __init__(
        self,
        path: Path,
        publisher: str,
        run_id: str,
        cluster_id: Callable[[], str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.publisher = publisher
        self.run_id = run_id
        self._cluster_id = cluster_id
        self._cluster: str | None = None
        self._clock = clock
        self._lock = threading.Lock()
        # (topic, partition) -> the range being extended; written whole at each flush.
        self._open: dict[tuple[str, int], list[int]] = {}
        self._dirty: set[tuple[str, int]] = set()
        self._closed: list[tuple[str, int, list[int]]] = []
        self._pending = 0
        self._last_flush = clock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # a killed process loses nothing
        self._db.executescript(_SCHEMA)
        self._db.execute(
            "INSERT OR IGNORE INTO runs VALUES (?, ?, ?)",
            (run_id, publisher, time.time_ns() // 1_000_000),
        )

    def acknowledged(self, topic: str, partition: int, offset: int, timestamp_ms: int) -> None:
        """The broker acknowledged a record at this position."""
        key = (topic, partition)
        with self._lock:
            current = self._open.get(key)
            if current is not None and offset == current[1] + 1:
                current[1] = offset
                current[3] = max(current[3], timestamp_ms)
            else:
                if current is not None:
                    self._closed.append((topic, partition, current))
                self._open[key] = [offset, offset, timestamp_ms, timestamp_ms]
            self._dirty.add(key)
            self._pending += 1

    def flush_due(self) -> None:
        """Write pending acknowledgements when enough time or records have gathered."""
        if self._pending and (
            self._pending >= FLUSH_RECORDS or self._clock() - self._last_flush >= FLUSH_INTERVAL_S
        ):
            self.flush()

    def flush(self) -> None:
        """Write every pending acknowledgement in one transaction."""
        with self._lock:
            if not self._pending:
                return
            if self._cluster is None:
                try:
                    self._cluster = self._cluster_id()
                except Exception as exc:  # not connected yet: the acks wait for the next flush
                    log.warning("%s: cluster id unknown yet (%s)", self.publisher, exc)
                    return
            rows = [*self._closed, *((t, p, self._open[(t, p)]) for t, p in self._dirty)]
            self._closed, self._dirty, self._pending = [], set(), 0
            self._last_flush = self._clock()
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO acked VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (self.run_id, self._cluster, topic, partition, *span)
                    for topic, partition, span in rows
                ],
            )
            self._db.execute("COMMIT")

    def close(self) -> None:
        """Write the rest and close the file."""
        self.flush()
        with self._lock:
            self._db.close()


def read_published(paths: Iterable[Path]) -> Iterator[AckedRange]:
    """Every acknowledged range recorded in the given counter files."""
    for path in paths:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            publisher_of = dict(db.execute("SELECT run_id, publisher FROM runs").fetchall())
            rows = db.execute(
                "SELECT run_id, kafka_cluster, topic, partition, first_offset, last_offset, "
                "first_ms, last_ms FROM acked ORDER BY kafka_cluster, topic, partition, "
                "first_offset"
            ).fetchall()
        finally:
            db.close()
        for run_id, cluster, topic, partition, first, last, first_ms, last_ms in rows:
            yield AckedRange(
                publisher_of.get(run_id, path.stem), run_id, cluster, topic, partition,
                first, last, first_ms, last_ms,
            )
