"""MariaDB binlog CDC collector: snapshot, then the row binlog, as raw EmrRowChange records.

The collector reads the configured hospital tables once in a consistent snapshot (op ``r``)
and then follows the server's binlog from exactly the position that snapshot corresponds
to, so no change is lost or read twice. It registers as a replica (python-mysql-replication)
and keeps its own position: the MariaDB GTID state after the last whole transaction, saved
in :class:`~producers.base.CollectorState` only once Kafka acknowledged every record of
that transaction (and of all before it).

python-mysql-replication has resume traps this module works around on purpose:

* A position inside a transaction (after its TableMapEvent) cannot be decoded on resume, and
  the library then drops the rows silently; so positions are only ever GTID states after a
  commit (XidEvent, COMMIT query, or a standalone DDL), and a stream that breaks inside a
  transaction starts that transaction again and skips the rows already published.
* The library's own reconnect reuses the *starting* GTID state; the reader's
  ``auto_position`` is therefore advanced at every commit and the collector reconnects
  itself (with back-off) after a server restart.
* Column names are taken from the TableMapEvent's optional metadata
  (``binlog_row_metadata=FULL``), never from the current ``information_schema``, so events
  written before an ALTER TABLE decode with the columns they were written with.
* A saved position whose binlog was purged fails with a clear error naming
  ``snapshot_mode`` (``when_needed`` re-snapshots by itself).

Every row change carries the transaction's GTID as ``source_position``, its sequence number
as ``transaction_id``, its commit time, and ``position_seq = seq * 2**20 + row index``;
``message_id`` is ``source_system:gtid:row index:target``, so a change published again after
a resume has the same id.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Any, ClassVar, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pymysql
from pydantic import Field, SecretStr, field_validator, model_validator
from pymysql.constants import FIELD_TYPE

from producers.base import (
    Collector,
    CollectorConfig,
    CollectorState,
    ConfigError,
    DeliveryFailed,
    OrderedAcks,
    wall_clock_ms,
)
from producers.table_mapping import (
    TableMapping,
    UnmappableRow,
    map_row,
    render_value,
    type_family_mysql,
    validate_mappings,
)

log = logging.getLogger("medstream.collector.mariadb")

#: The CollectorState key of the GTID state after the last acknowledged transaction.
POSITION_KEY = "gtid_position"
#: Row changes inside one transaction that get distinct ``position_seq`` values.
ROW_INDEX_BITS = 20
_ROW_INDEX_MAX = (1 << ROW_INDEX_BITS) - 1
#: Server error: the requested GTID position is not in the server's binlog (purged, diverged).
_ER_MASTER_FATAL_READING_BINLOG = 1236
#: GTID event flag: the event group is one statement without XID or COMMIT (DDL, non-InnoDB).
_FL_STANDALONE = 1
#: Server settings a row-based CDC reader needs, with the value each must have.
REQUIRED_SETTINGS = {
    "log_bin": "ON",
    "binlog_format": "ROW",
    "binlog_row_image": "FULL",
    "binlog_row_metadata": "FULL",
}
_TIMESTAMP_TYPES = frozenset({FIELD_TYPE.TIMESTAMP, 17})  # 17: MYSQL_TYPE_TIMESTAMP2
_DATETIME_TYPES = frozenset({FIELD_TYPE.DATETIME, 18})  # 18: MYSQL_TYPE_DATETIME2


class PositionLost(ConfigError):
    """The saved binlog position is no longer on the server; a new snapshot is needed."""


# --- configuration ------------------------------------------------------------------------


def default_server_id(name: str) -> int:
    """A stable replica server id derived from the collector name (65536 .. 2**32-2)."""
    return 65_536 + zlib.crc32(f"medstream-mariadb:{name}".encode()) % (2**32 - 65_537)


class MariaDbCdcConfig(CollectorConfig):
    """Settings of one MariaDB CDC collector (YAML: ``kind: mariadb``)."""

    kind: Literal["mariadb"] = Field(default="mariadb", description="collector kind")
    host: str = Field(default="127.0.0.1", description="MariaDB server host")
    port: int = Field(default=3306, ge=1, le=65535, description="MariaDB server port")
    user: str = Field(min_length=1, description="user with SELECT, REPLICATION SLAVE, "
                      "BINLOG MONITOR (REPLICATION CLIENT) and RELOAD-free snapshot rights")
    password: SecretStr = Field(default=SecretStr(""), description="password (use ${VAR})")
    server_id: int | None = Field(
        default=None,
        ge=1,
        le=2**32 - 1,
        description="replica server id, unique among the server's replicas and different "
        "from the server's own (default: derived from the collector name)",
    )
    tables: list[TableMapping] = Field(min_length=1, description="source table -> target")
    snapshot_mode: Literal["initial", "when_needed", "always", "never"] = Field(
        default="initial",
        description="initial: snapshot when no position is saved; when_needed: also when "
        "the saved position was purged; always: at every start; never: stream from now on",
    )
    source_timezone: str = Field(
        default="UTC", description="IANA time zone of DATETIME values (TIMESTAMP is UTC)"
    )
    heartbeat_s: float = Field(
        default=1.0, gt=0, le=60, description="server heartbeat period while the binlog is idle"
    )
    source_retry_s: float = Field(
        default=300.0,
        gt=0,
        description="how long to keep reconnecting to an unreachable server before exiting",
    )
    max_in_flight: int = Field(default=10_000, ge=1, description="records awaiting broker acks")

    @field_validator("source_timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @model_validator(mode="after")
    def _unique_pairs(self) -> MariaDbCdcConfig:
        pairs = [(t.source, t.target) for t in self.tables]
        duplicates = sorted({f"{s} -> {t}" for s, t in pairs if pairs.count((s, t)) > 1})
        if duplicates:
            raise ValueError(f"tables: mapped more than once: {', '.join(duplicates)}")
        return self

    @property
    def replica_server_id(self) -> int:
        """The server id this collector registers with."""
        return self.server_id if self.server_id is not None else default_server_id(self.name)


# --- GTID positions -----------------------------------------------------------------------


@dataclass(frozen=True)
class Gtid:
    """One MariaDB global transaction id: ``domain-server-sequence``."""

    domain: int
    server: int
    seq: int

    @classmethod
    def parse(cls, text: str) -> Gtid:
        """Parse ``"0-1-123"``; ValueError names the text."""
        parts = text.strip().split("-")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"not a MariaDB GTID: {text!r}")
        return cls(int(parts[0]), int(parts[1]), int(parts[2]))

    def __str__(self) -> str:
        return f"{self.domain}-{self.server}-{self.seq}"


class GtidPosition:
    """A MariaDB GTID state: the last transaction read per replication domain.

    Its text form (``"0-1-123,1-2-7"``, empty for "nothing yet") is what the server takes as
    ``@slave_connect_state`` to stream every transaction after it.
    """

    def __init__(self, gtids: Mapping[int, Gtid] | None = None) -> None:
        self._by_domain: dict[int, Gtid] = dict(gtids or {})

    @classmethod
    def parse(cls, text: str | None) -> GtidPosition:
        """Parse a GTID state (empty or None: the empty state)."""
        gtids = [Gtid.parse(part) for part in (text or "").split(",") if part.strip()]
        return cls({g.domain: g for g in gtids})

    def advanced(self, gtid: Gtid) -> GtidPosition:
        """This state with ``gtid`` as its domain's last transaction."""
        return GtidPosition({**self._by_domain, gtid.domain: gtid})

    def includes(self, gtid: Gtid) -> bool:
        """True when ``gtid`` is at or before this state in its domain (already read)."""
        last = self._by_domain.get(gtid.domain)
        return last is not None and gtid.seq <= last.seq

    @property
    def max_seq(self) -> int:
        """The highest sequence number over all domains (0 for the empty state)."""
        return max((g.seq for g in self._by_domain.values()), default=0)

    def __str__(self) -> str:
        return ",".join(str(self._by_domain[d]) for d in sorted(self._by_domain))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GtidPosition) and self._by_domain == other._by_domain

    def __hash__(self) -> int:
        return hash(str(self))

    def __repr__(self) -> str:
        return f"GtidPosition({str(self)!r})"


def position_seq(seq: int, row_index: int) -> int:
    """The row version of a change: GTID sequence number * 2**20 + row index in the transaction.

    Row indexes past 2**20 - 1 share the last value (the version stays monotonic per row
    across transactions, which is what downstream needs).
    """
    return (seq << ROW_INDEX_BITS) | min(row_index, _ROW_INDEX_MAX)


# --- the collector ------------------------------------------------------------------------


@dataclass
class _Transaction:
    """The binlog transaction being read."""

    gtid: Gtid
    commit_ms: int
    standalone: bool
    rows_read: int = 0  # source rows seen so far (the next row's index)
    skip: int = 0  # rows already published by an earlier attempt at this transaction


class _StreamBroke(Exception):
    """The binlog connection ended; reconnect from the last transaction boundary."""


class MariaDbCdcProducer(Collector[MariaDbCdcConfig]):
    """Snapshot + binlog CDC of MariaDB tables into ``raw.emr_cdc`` (EmrRowChange records)."""

    kind: ClassVar[str] = "mariadb"
    source_kind: ClassVar[str] = "emr_cdc"
    config_model: ClassVar[type[CollectorConfig]] = MariaDbCdcConfig

    def __init__(self, config: MariaDbCdcConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self._zone: tzinfo = ZoneInfo(config.source_timezone)
        self._mappings: dict[tuple[str, str], list[TableMapping]] = {}
        for table in config.tables:
            self._mappings.setdefault((table.schema_name, table.table_name), []).append(table)
        self._acks: OrderedAcks[str] = OrderedAcks()
        self._read_position = GtidPosition()  # after the last whole transaction read
        self._transaction: _Transaction | None = None
        self._published_rows: tuple[Gtid, int] | None = None  # partial transaction published
        self._warned_tables: set[tuple[str, str]] = set()
        self._last_commit = 0.0

    # --- source connection and checks ------------------------------------------------------

    def _connection_settings(self) -> dict[str, Any]:
        return {
            "host": self.config.host,
            "port": self.config.port,
            "user": self.config.user,
            "password": self.config.password.get_secret_value(),
            "connect_timeout": 10,
        }

    def _connect(self, **extra: Any) -> pymysql.connections.Connection[Any]:
        settings = {**self._connection_settings(), "autocommit": True, **extra}
        try:
            return pymysql.connect(**settings)
        except pymysql.err.OperationalError as exc:
            where = f"{self.config.host}:{self.config.port}"
            raise ConfigError(
                f"{self.config.name}: cannot connect to MariaDB at {where} as "
                f"{self.config.user!r}: {exc.args[-1]}"
            ) from None

    def check(self) -> list[str]:
        """Validate the server's binlog settings, the server id and the table mapping.

        Raises ConfigError listing every problem: a binlog setting with the wrong value
        (named, with the value it needs), a server id clash, an unknown table, a missing
        column or a type mismatch.
        """
        connection = self._connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT VERSION(), @@server_id")
                version, server_server_id = cursor.fetchone()
                cursor.execute(
                    "SHOW GLOBAL VARIABLES WHERE Variable_name IN "
                    "('log_bin', 'binlog_format', 'binlog_row_image', 'binlog_row_metadata')"
                )
                variables = {str(k).lower(): str(v) for k, v in cursor.fetchall()}
                cursor.execute("SHOW SLAVE HOSTS")
                replicas = [(int(row[0]), str(row[1])) for row in cursor.fetchall()]
                catalog = self._catalog(cursor)
        finally:
            connection.close()
        problems = server_setting_problems(variables)
        if "mariadb" not in str(version).lower():
            problems.append(
                f"server version {version} is not MariaDB; kind mariadb follows MariaDB GTIDs"
            )
        server_id = self.config.replica_server_id
        if server_id == int(server_server_id):
            problems.append(
                f"server_id {server_id} is the MariaDB server's own server_id; set server_id "
                "in the collector configuration to a value no server or replica uses"
            )
        for replica_id, host in replicas:
            if replica_id == server_id and host != self._report_host:
                problems.append(
                    f"server_id {server_id} is already used by replica {host!r} (SHOW SLAVE "
                    "HOSTS); two replicas with one server_id disconnect each other"
                )
        try:
            validate_mappings(self.config.tables, catalog)
        except ConfigError as exc:
            problems.append(str(exc))
        if problems:
            raise ConfigError(f"{self.config.name}: " + "; ".join(problems))
        return [
            f"{self.config.name}: MariaDB {version} at {self.config.host}:{self.config.port}, "
            f"binlog ROW/FULL/FULL, replica server_id {server_id}, "
            f"{len(self.config.tables)} table mapping(s) valid"
        ]

    @property
    def _report_host(self) -> str:
        return f"medstream-{self.config.name}"

    def _catalog(self, cursor: Any) -> dict[str, dict[str, str]]:
        """``database.table`` -> column -> type family, for the mapped tables."""
        catalog: dict[str, dict[str, str]] = {}
        for database, table in self._mappings:
            cursor.execute(
                "SELECT COLUMN_NAME, DATA_TYPE FROM information_schema.COLUMNS "
                "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION",
                (database, table),
            )
            rows = cursor.fetchall()
            if rows:
                catalog[f"{database}.{table}"] = {
                    str(name): type_family_mysql(str(data_type)) for name, data_type in rows
                }
        return catalog

    # --- run -------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Snapshot if needed, then stream the binlog until ``stop``; commit after acks."""
        state = CollectorState(self.state_dir / "mariadb.sqlite")
        try:
            position = self._start_position(state, stop)
            if position is None:
                return
            self._stream(state, position, stop)
        finally:
            self.metrics.ready.set(0)
            try:
                remaining = self.publisher.flush(30.0)
                if remaining:
                    log.error("%s: %d records unacknowledged at stop", self.config.name,
                              remaining)
                self._commit(state, force=True)
            finally:
                state.close()

    def _start_position(
        self, state: CollectorState, stop: threading.Event
    ) -> GtidPosition | None:
        saved = state.get(POSITION_KEY)
        mode = self.config.snapshot_mode
        if saved is not None and mode != "always":
            log.info("%s: resuming from GTID position %r", self.config.name, saved)
            return GtidPosition.parse(saved)
        if mode == "never":
            position = self._current_position()
            state.put(POSITION_KEY, str(position))
            log.info("%s: no snapshot; streaming from %r", self.config.name, str(position))
            return position
        return self._snapshot(state, stop)

    def _current_position(self) -> GtidPosition:
        connection = self._connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT @@gtid_binlog_pos")
                return GtidPosition.parse(str(cursor.fetchone()[0] or ""))
        finally:
            connection.close()

    def _commit(self, state: CollectorState, force: bool = False) -> None:
        """Save the newest position whose records were all acknowledged (at most 5 per s)."""
        now = time.monotonic()
        if not force and now - self._last_commit < 0.2:
            return
        self._last_commit = now
        self.publisher.poll(0)
        position = self._acks.committable()
        if position is not None:
            state.put(POSITION_KEY, position)
        if self._acks.failure is not None:
            raise DeliveryFailed(
                f"{self.config.name}: the broker did not acknowledge a record "
                f"({self._acks.failure}); the position stays at the last acknowledged commit"
            )

    def _wait_for_room(self) -> None:
        while self._acks.in_flight >= self.config.max_in_flight:
            self.publisher.poll(0.1)

    # --- snapshot --------------------------------------------------------------------------

    def _snapshot(self, state: CollectorState, stop: threading.Event) -> GtidPosition | None:
        """Read every mapped table in one consistent snapshot; returns its binlog position.

        ``START TRANSACTION WITH CONSISTENT SNAPSHOT`` makes MariaDB report the binlog
        file/position the snapshot corresponds to (``binlog_snapshot_file/position``), which
        ``BINLOG_GTID_POS`` turns into the GTID state the stream starts after. The position
        is saved only once every snapshot record was acknowledged; a snapshot interrupted
        before that is redone from the start.
        """
        connection = self._connect(cursorclass=pymysql.cursors.SSCursor, autocommit=False)
        try:
            with connection.cursor() as cursor:
                keys = {source: self._key_columns(cursor, *source) for source in self._mappings}
                cursor.execute("SET SESSION time_zone = '+00:00'")
                cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                cursor.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT")
                snapshot_ms = wall_clock_ms()
                cursor.execute("SHOW STATUS LIKE 'binlog_snapshot_%'")
                status = {str(k).lower(): str(v) for k, v in cursor.fetchall()}
                binlog_file = status.get("binlog_snapshot_file", "")
                binlog_pos = int(status.get("binlog_snapshot_position", "0") or 0)
                cursor.execute("SELECT BINLOG_GTID_POS(%s, %s)", (binlog_file, binlog_pos))
                found = cursor.fetchall()[0][0]
                if found is None:
                    raise ConfigError(
                        f"{self.config.name}: the snapshot's binlog position "
                        f"{binlog_file}:{binlog_pos} has no GTID state (is log_bin on?)"
                    )
                position = GtidPosition.parse(str(found))
                log.info(
                    "%s: snapshot at %s:%d = GTID %r", self.config.name, binlog_file,
                    binlog_pos, str(position),
                )
                count = 0
                for (database, table), order in keys.items():
                    count += self._snapshot_table(
                        cursor, database, table, order, position, snapshot_ms, stop
                    )
                    if stop.is_set():
                        return None
                connection.commit()
        except pymysql.err.Error as exc:
            raise ConfigError(f"{self.config.name}: snapshot failed: {exc}") from None
        finally:
            connection.close()
        self._acks.mark(str(position))
        while self._acks.pending and not stop.is_set():
            self._commit(state, force=True)
            self.publisher.poll(0.1)
        self._commit(state, force=True)
        if state.get(POSITION_KEY) != str(position):
            return None  # stopped before the broker acknowledged the whole snapshot
        log.info("%s: snapshot of %d rows acknowledged", self.config.name, count)
        return position

    @staticmethod
    def _key_columns(cursor: Any, database: str, table: str) -> list[str]:
        """The primary key columns (empty: none), which order the snapshot deterministically."""
        cursor.execute(
            "SELECT COLUMN_NAME FROM information_schema.KEY_COLUMN_USAGE WHERE "
            "TABLE_SCHEMA = %s AND TABLE_NAME = %s AND CONSTRAINT_NAME = 'PRIMARY' "
            "ORDER BY ORDINAL_POSITION",
            (database, table),
        )
        return [str(row[0]) for row in cursor.fetchall()]

    def _snapshot_table(
        self,
        cursor: Any,
        database: str,
        table: str,
        key_columns: list[str],
        position: GtidPosition,
        snapshot_ms: int,
        stop: threading.Event,
    ) -> int:
        quoted = f"`{database.replace('`', '``')}`.`{table.replace('`', '``')}`"
        order = ", ".join(f"`{c.replace('`', '``')}`" for c in key_columns)
        cursor.execute(f"SELECT * FROM {quoted}" + (f" ORDER BY {order}" if order else ""))
        names = [d[0] for d in cursor.description]
        types = [d[1] for d in cursor.description]
        seq = position_seq(position.max_seq, 0)
        count = 0
        for values in cursor:
            row = {n: self._zoned(v, t) for n, v, t in zip(names, values, types, strict=True)}
            for mapping in self._mappings[(database, table)]:
                message_id = (
                    f"{self.config.source_system}:snapshot:{position}:{mapping.source}:"
                    f"{count}:{mapping.target}"
                )
                self._emit(mapping, "r", None, row, message_id, str(position), seq, None,
                           snapshot_ms)
            count += 1
            self.metrics.read.inc()
            if count % 1000 == 0:
                self.publisher.poll(0)
                if stop.is_set():
                    break
        return count

    def _zoned(self, value: object, field_type: int) -> object:
        """Attach the time zone a naive datetime was stored in (TIMESTAMP is read as UTC)."""
        if isinstance(value, datetime) and value.tzinfo is None:
            if field_type in _TIMESTAMP_TYPES:
                return value.replace(tzinfo=UTC)
            if field_type in _DATETIME_TYPES:
                return value.replace(tzinfo=self._zone)
        return value

    # --- publishing ------------------------------------------------------------------------

    def _emit(
        self,
        mapping: TableMapping,
        op: str,
        before: Mapping[str, object] | None,
        after: Mapping[str, object] | None,
        message_id: str,
        source_position: str,
        seq: int,
        transaction_id: int | None,
        commit_ms: int,
    ) -> None:
        """Map one source row change and publish it, or dead-letter it with the reason."""
        self._wait_for_room()
        try:  # a mapped column missing from an image: reason_code schema_changed
            mapped_before = None if before is None else map_row(mapping, before)
            mapped_after = None if after is None else map_row(mapping, after)
        except UnmappableRow as exc:
            self._dead_letter(mapping, op, before, after, message_id, source_position, seq,
                              transaction_id, commit_ms, exc)
            return
        key_image = mapped_after if mapped_after is not None else mapped_before
        record = {
            "message_id": message_id,
            "organisation_id": self.config.organisation_id,
            "source_system": self.config.source_system,
            "op": op,
            "table": mapping.target,
            "before": mapped_before,
            "after": mapped_after,
            "source_position": source_position,
            "position_seq": seq,
            "transaction_id": transaction_id,
            "commit_time": commit_ms,
            "captured_time": max(wall_clock_ms(), commit_ms),
        }
        self.publisher.publish(self._key(mapping, key_image or {}), record, self._acks.track())

    def _key(self, mapping: TableMapping, image: Mapping[str, str | None]) -> bytes:
        """Partition key: one patient's changes (or else one row's) stay in order."""
        mrn = image.get("patient_mrn")
        if mrn:
            return f"{self.config.organisation_id}:{mrn}".encode()
        first = next(iter(mapping.columns), "")
        return f"{self.config.organisation_id}:{mapping.target}:{image.get(first)}".encode()

    def _dead_letter(
        self,
        mapping: TableMapping,
        op: str,
        before: Mapping[str, object] | None,
        after: Mapping[str, object] | None,
        message_id: str,
        source_position: str,
        seq: int,
        transaction_id: int | None,
        commit_ms: int,
        error: UnmappableRow,
    ) -> None:
        """Dead-letter an unmappable change; its original value is the change in source terms."""
        log.error(
            "%s: change %s of %s dead-lettered (%s): %s", self.config.name, message_id,
            mapping.source, error.reason_code, error.reason,
        )
        original = self.publisher.encode(
            {
                "message_id": message_id,
                "organisation_id": self.config.organisation_id,
                "source_system": self.config.source_system,
                "op": op,
                "table": mapping.source,
                "before": None if before is None else _source_image(before),
                "after": None if after is None else _source_image(after),
                "source_position": source_position,
                "position_seq": seq,
                "transaction_id": transaction_id,
                "commit_time": commit_ms,
                "captured_time": max(wall_clock_ms(), commit_ms),
            }
        )
        self.publisher.dead_letter(
            error.reason_code,
            error.reason,
            original,
            self._acks.track(),
            organisation_id=self.config.organisation_id,
            original_key=message_id.encode(),
            received_ms=commit_ms,
        )

    # --- binlog stream ---------------------------------------------------------------------

    def _reader(self, position: GtidPosition) -> Any:
        from pymysqlreplication import BinLogStreamReader
        from pymysqlreplication.event import (
            HeartbeatLogEvent,
            MariadbGtidEvent,
            QueryEvent,
            RotateEvent,
            XidEvent,
        )
        from pymysqlreplication.row_event import (
            DeleteRowsEvent,
            TableMapEvent,
            UpdateRowsEvent,
            WriteRowsEvent,
        )

        settings = self._connection_settings()
        # A dead server shows as a read timeout; the server sends heartbeats while idle.
        settings["read_timeout"] = max(10, int(self.config.heartbeat_s * 6))
        return BinLogStreamReader(
            connection_settings=settings,
            server_id=self.config.replica_server_id,
            report_slave=self._report_host,
            is_mariadb=True,
            auto_position=str(position),
            blocking=True,
            resume_stream=True,
            slave_heartbeat=self.config.heartbeat_s,
            only_schemas=sorted({database for database, _ in self._mappings}),
            only_tables=sorted({table for _, table in self._mappings}),
            only_events=[
                MariadbGtidEvent, XidEvent, QueryEvent, RotateEvent, HeartbeatLogEvent,
                TableMapEvent, WriteRowsEvent, UpdateRowsEvent, DeleteRowsEvent,
            ],
            enable_logging=False,
        )

    def _stream(self, state: CollectorState, start: GtidPosition, stop: threading.Event) -> None:
        """Follow the binlog from ``start``; reconnect after the server went away."""
        self._read_position = start
        down_since: float | None = None
        backoff = 0.2
        while not stop.is_set():
            reader = self._reader(self._read_position)
            try:
                for event in self._events(reader, stop):
                    if down_since is not None:
                        log.info("%s: binlog stream reconnected", self.config.name)
                        down_since, backoff = None, 0.2
                    self.metrics.ready.set(1)
                    self._on_event(reader, event)
                    self._commit(state)
                if stop.is_set():
                    return
                raise _StreamBroke("the server ended the binlog stream")
            except (pymysql.err.Error, _StreamBroke) as exc:
                code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
                if code == _ER_MASTER_FATAL_READING_BINLOG:
                    self._position_lost(state, exc, stop)
                    continue
                self.metrics.ready.set(0)
                now = time.monotonic()
                down_since = down_since or now
                if now - down_since > self.config.source_retry_s:
                    raise RuntimeError(
                        f"{self.config.name}: MariaDB at {self.config.host}:{self.config.port} "
                        f"unreachable for {self.config.source_retry_s:.0f}s: {exc}"
                    ) from None
                log.warning(
                    "%s: binlog stream broke (%s); reconnecting from %r", self.config.name,
                    exc, str(self._read_position),
                )
                self._remember_partial()
                self._commit(state, force=True)
                stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                reader.close()

    @staticmethod
    def _events(reader: Any, stop: threading.Event) -> Iterator[Any]:
        while not stop.is_set():
            event = reader.fetchone()
            if event is None:
                return
            yield event

    def _position_lost(self, state: CollectorState, exc: Exception, stop: threading.Event) -> None:
        """The server no longer has the position: re-snapshot (when_needed) or stop clearly."""
        detail = exc.args[-1] if exc.args else exc
        if self.config.snapshot_mode not in ("when_needed", "always"):
            raise PositionLost(
                f"{self.config.name}: the saved binlog position {str(self._read_position)!r} "
                f"is no longer on the MariaDB server (binlog purged?): {detail}. Take a new "
                "snapshot: set `snapshot_mode: when_needed` (re-snapshot whenever the position "
                "is lost) or `snapshot_mode: always` for one start, in the collector "
                "configuration, then run `medstream collect mariadb --config FILE` again"
            )
        log.warning(
            "%s: saved position %r no longer on the server (%s); taking a new snapshot",
            self.config.name, str(self._read_position), detail,
        )
        self._transaction = None
        self._published_rows = None
        position = self._snapshot(state, stop)
        if position is not None:
            self._read_position = position

    def _remember_partial(self) -> None:
        """A transaction cut off by a broken stream: remember how many rows went out."""
        txn = self._transaction
        if txn is not None:
            self._published_rows = (txn.gtid, max(txn.rows_read, txn.skip))
        self._transaction = None

    def _on_event(self, reader: Any, event: Any) -> None:
        from pymysqlreplication.event import (
            HeartbeatLogEvent,
            MariadbGtidEvent,
            QueryEvent,
            XidEvent,
        )
        from pymysqlreplication.row_event import RowsEvent, TableMapEvent

        if isinstance(event, MariadbGtidEvent):
            self._begin(event)
        elif isinstance(event, RowsEvent):
            self._on_rows(event)
        elif isinstance(event, XidEvent):
            self._end(reader)
        elif isinstance(event, QueryEvent):
            txn = self._transaction
            query = _text(event.query).strip().upper()
            if txn is not None and (txn.standalone or query in ("COMMIT", "XA COMMIT")):
                if txn.standalone:
                    log.info(
                        "%s: DDL/standalone statement in transaction %s", self.config.name,
                        txn.gtid,
                    )
                self._end(reader)
        elif isinstance(event, TableMapEvent):
            self._check_table_map(event)
        elif isinstance(event, HeartbeatLogEvent) and self._transaction is None:
            self.metrics.source_lag.set(0)

    def _begin(self, event: Any) -> None:
        gtid = Gtid(int(event.domain_id), int(event.server_id), int(event.gtid_seq_no))
        skip = 0
        cut_off = self._transaction  # the library reconnected by itself inside it
        if cut_off is not None and cut_off.gtid == gtid:
            skip = max(cut_off.rows_read, cut_off.skip)
        elif self._published_rows is not None and self._published_rows[0] == gtid:
            skip = self._published_rows[1]  # the rows of this retry already went out
        self._published_rows = None
        self._transaction = _Transaction(
            gtid=gtid,
            commit_ms=int(event.timestamp) * 1000,
            standalone=bool(event.flags & _FL_STANDALONE),
            skip=skip,
        )

    def _end(self, reader: Any) -> None:
        txn = self._transaction
        self._transaction = None
        if txn is None or self._read_position.includes(txn.gtid):
            return
        self._read_position = self._read_position.advanced(txn.gtid)
        self._acks.mark(str(self._read_position))
        # The library reconnects by itself after a read timeout, with auto_position.
        reader.auto_position = str(self._read_position)

    def _check_table_map(self, event: Any) -> None:
        source = (str(event.schema), str(event.table))
        if source in self._mappings and source not in self._warned_tables:
            if not event.optional_metadata.column_name_list:
                self._warned_tables.add(source)
                log.warning(
                    "%s: binlog table map of %s.%s has no column names (written before "
                    "binlog_row_metadata=FULL); names come from the current table definition",
                    self.config.name, *source,
                )

    def _on_rows(self, event: Any) -> None:
        from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent

        txn = self._transaction
        source = (str(event.schema), str(event.table))
        mappings = self._mappings.get(source)
        if txn is None or not mappings:
            return
        if self._read_position.includes(txn.gtid):
            return  # a transaction already read, sent again after a reconnect
        types = [column.type for column in event.columns]
        op = "d" if isinstance(event, DeleteRowsEvent) else "u" if isinstance(
            event, UpdateRowsEvent
        ) else "c"
        for row in event.rows:
            row_index = txn.rows_read
            txn.rows_read += 1
            if row_index < txn.skip:
                continue
            if op == "u":
                before = self._zoned_row(row["before_values"], types)
                after: dict[str, object] | None = self._zoned_row(row["after_values"], types)
            elif op == "d":
                before, after = self._zoned_row(row["values"], types), None
            else:
                before, after = None, self._zoned_row(row["values"], types)
            self.metrics.read.inc()
            self.metrics.source_lag.set(max(0.0, (wall_clock_ms() - txn.commit_ms) / 1000))
            for mapping in mappings:
                self._emit(
                    mapping,
                    op,
                    before,
                    after,
                    f"{self.config.source_system}:{txn.gtid}:{row_index}:{mapping.target}",
                    str(txn.gtid),
                    position_seq(txn.gtid.seq, row_index),
                    txn.gtid.seq,
                    txn.commit_ms,
                )

    def _zoned_row(self, values: Mapping[str, object], types: list[int]) -> dict[str, object]:
        return {
            name: self._zoned(value, types[i]) if i < len(types) else value
            for i, (name, value) in enumerate(values.items())
        }


def server_setting_problems(variables: Mapping[str, str]) -> list[str]:
    """Readable problems with the server's binlog settings (empty: fit for row CDC)."""
    problems = []
    for name, wanted in REQUIRED_SETTINGS.items():
        actual = variables.get(name)
        if actual is None or actual.upper() != wanted:
            problems.append(
                f"{name} is {actual or 'not set'} but must be {wanted} (set {name}={wanted} in "
                "the server's [mysqld] configuration and restart MariaDB)"
            )
    return problems


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _source_image(row: Mapping[str, object]) -> dict[str, str | None]:
    """A source row image as text, for a dead letter (values the renderer rejects: type only)."""
    image: dict[str, str | None] = {}
    for column, value in row.items():
        try:
            image[column] = render_value(value)
        except (TypeError, ValueError):
            image[column] = f"<{type(value).__name__}>"
    return image
