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
* The library decodes a negative TIME with a fraction wrongly; :func:`_read_time2` replaces
  its decoder (and every value is rendered the same way in snapshot and stream, see
  :func:`_canonical`).

Every row change carries the transaction's GTID as ``source_position``, its sequence number
as ``transaction_id``, its commit time, and as ``position_seq`` (the row version downstream)
a value from the server's binlog coordinates, see :func:`binlog_version`: GTID sequence
numbers are only ordered inside one replication domain, binlog coordinates are totally
ordered in commit order over all domains, survive restarts and rotation
(``mariadb-bin.000123`` keeps counting) and are the same when a transaction is read again.
``message_id`` is ``source_system:gtid:row index:target``, so a change published again after
a resume has the same id (and the same version).

A TRUNCATE of a mapped table is dead-lettered (``truncate``); a RENAME or DROP of a mapped
table is logged as an ERROR and counted (``schema_changed``). XA transactions publish their
rows only at ``XA COMMIT`` (none at ``XA ROLLBACK``), with the version of their prepared part
(its row locks keep every other change of those rows before or after it); while one is
prepared, the saved position stays before it, so a restart reads it again. An XA transaction
prepared before the snapshot and committed after it is not published (logged as WARNING).

Binlog coordinates belong to one server's binlog: ``RESET MASTER`` or pointing the collector
at another server (a promoted replica) restarts them lower; then clear the target tables and
take a new snapshot, or later changes would lose against older versions downstream.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
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
    SourceUnavailable,
    snapshot_row_ref,
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
#: Bits of a row version that hold the byte position inside a binlog file (a binlog event
#: header stores positions in 4 bytes, so a file never passes 4 GiB).
POSITION_BITS = 32
#: Server error: the requested GTID position is not in the server's binlog (purged, diverged).
_ER_MASTER_FATAL_READING_BINLOG = 1236
#: Client and server errors that mean "the server cannot be reached now", not a bad setup:
#: server shutting down (1053), connection killed (1927), too many connections (1040),
#: cannot connect (2002, 2003), server gone away (2006), lost connection (2013, 2055).
_SOURCE_UNAVAILABLE_CODES = frozenset({1040, 1053, 1927, 2002, 2003, 2006, 2013, 2055})
#: GTID event flags: one statement without XID or COMMIT (DDL, non-InnoDB); the group is
#: an XA transaction's prepared part (its rows, ended by XA PREPARE); the group is an
#: XA COMMIT or XA ROLLBACK of an earlier prepared part.
_FL_STANDALONE = 1
_FL_PREPARED_XA = 64
_FL_COMPLETED_XA = 128
#: Server settings a row-based CDC reader needs, with the value each must have.
REQUIRED_SETTINGS = {
    "log_bin": "ON",
    "binlog_format": "ROW",
    "binlog_row_image": "FULL",
    "binlog_row_metadata": "FULL",
}
_TIMESTAMP_TYPES = frozenset({FIELD_TYPE.TIMESTAMP, 17})  # 17: MYSQL_TYPE_TIMESTAMP2
_DATETIME_TYPES = frozenset({FIELD_TYPE.DATETIME, 18})  # 18: MYSQL_TYPE_DATETIME2
#: The CAST that reads a FLOAT column at full float32 precision in the snapshot (the text
#: protocol rounds FLOAT to 6 significant digits; the binlog holds all 4 bytes).
_FLOAT_AS_DOUBLE = "CAST({} AS DOUBLE)"


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


def binlog_version(log_file: str, log_pos: int) -> int:
    """A row version from binlog coordinates: file sequence number * 2**32 + byte position.

    ``mariadb-bin.000123`` at byte 4567 gives ``123 * 2**32 + 4567``. Binlog coordinates are
    totally ordered in commit order over every GTID domain, so a later change of a row always
    gets a higher version. A streamed transaction's rows get the position right after its
    GTID event plus their row index (every row takes at least one byte of the transaction, so
    the values stay below the next transaction's); a snapshot gets its
    ``binlog_snapshot_position``, which is the start of the first transaction it does not
    see, so every change streamed after it is higher. Raises ValueError for a file name
    without a number.
    """
    number = log_file.rsplit(".", 1)[-1]
    if not number.isdigit():
        raise ValueError(f"binlog file name {log_file!r} does not end in a sequence number")
    if not 0 <= log_pos < 1 << POSITION_BITS:
        raise ValueError(f"binlog position {log_pos} out of range")
    return (int(number) << POSITION_BITS) | log_pos


def float32_text(value: float) -> float:
    """A FLOAT column value as the shortest decimal that is the same float32.

    The binlog gives the float32 widened to double (1.100000023841858); the snapshot reads
    it the same way (CAST AS DOUBLE); both then render as ``1.1``.
    """
    try:
        packed = struct.pack("<f", value)
    except OverflowError:  # not a float32 at all: rendered (or refused) as it is
        return value
    for digits in range(1, 10):
        shortest = float(f"{value:.{digits}g}")
        try:
            if struct.pack("<f", shortest) == packed:
                return shortest
        except OverflowError:  # rounded past the float32 range (near 3.4e38)
            continue
    return value


def time_text(value: timedelta) -> str:
    """A TIME value as ``[-]HH:MM:SS[.ffffff]`` (hours may pass 24, up to 838)."""
    micros = value // timedelta(microseconds=1)
    sign = "-" if micros < 0 else ""
    seconds, fraction = divmod(abs(micros), 1_000_000)
    minutes, second = divmod(seconds, 60)
    hours, minute = divmod(minutes, 60)
    text = f"{sign}{hours:02d}:{minute:02d}:{second:02d}"
    return f"{text}.{fraction:06d}" if fraction else text


def _read_time2(self: Any, column: Any) -> timedelta:
    """Decode a binlog TIME2 value (replaces the library's decoder, wrong for negative values
    with a fraction): big-endian, offset binary of ``hms << 8*n | fraction`` where n is the
    number of fraction bytes (hms: 10 bits hour, 6 minute, 6 second)."""
    fraction_bytes = (int(column.fsp) + 1) // 2
    stored = int.from_bytes(self.packet.read(3 + fraction_bytes), "big")
    packed = stored - (0x800000 << (8 * fraction_bytes))
    magnitude = abs(packed)
    hms, fraction = magnitude >> (8 * fraction_bytes), magnitude & ((1 << 8 * fraction_bytes) - 1)
    value = timedelta(
        hours=(hms >> 12) & 0x3FF,
        minutes=(hms >> 6) & 0x3F,
        seconds=hms & 0x3F,
        microseconds=fraction * 10 ** (6 - 2 * fraction_bytes),
    )
    return -value if packed < 0 else value


def _patch_library_time2() -> None:
    from pymysqlreplication.row_event import RowsEvent

    if not hasattr(RowsEvent, "_RowsEvent__read_time2"):  # pragma: no cover - library changed
        raise ImportError("python-mysql-replication has no TIME2 decoder to replace any more")
    RowsEvent._RowsEvent__read_time2 = _read_time2  # type: ignore[attr-defined]


_NAME = r"(?:`(?:[^`]|``)+`|[\w$]+)"
_QUALIFIED = rf"{_NAME}(?:\s*\.\s*{_NAME})?"
_COMMENT = re.compile(r"/\*.*?\*/|--[^\n]*|#[^\n]*", re.S)
_TRUNCATE = re.compile(rf"TRUNCATE\s+(?:TABLE\s+)?({_QUALIFIED})", re.I)
_RENAME = re.compile(r"RENAME\s+TABLES?\s+(?:IF\s+EXISTS\s+)?(.*)", re.I | re.S)
_RENAME_PAIR = re.compile(rf"({_QUALIFIED})(?:\s+(?:WAIT\s+\d+|NOWAIT))?\s+TO\s+({_QUALIFIED})",
                          re.I)
_ALTER = re.compile(
    rf"ALTER\s+(?:ONLINE\s+)?(?:IGNORE\s+)?TABLE\s+(?:IF\s+EXISTS\s+)?({_QUALIFIED})(.*)",
    re.I | re.S,
)
_ALTER_RENAME = re.compile(
    rf"\bRENAME\s+(?!(?:COLUMN|INDEX|KEY)\b)(?:TO\s+|AS\s+)?({_QUALIFIED})", re.I
)
_DROP = re.compile(r"DROP\s+(?:TEMPORARY\s+)?TABLES?\s+(?:IF\s+EXISTS\s+)?(.*)", re.I | re.S)
_XA = re.compile(r"XA\s+(END|PREPARE|COMMIT|ROLLBACK)\s+(.*?)(\s+ONE\s+PHASE)?\s*", re.I | re.S)


def _table_name(text: str, default_schema: str) -> tuple[str, str]:
    parts = re.findall(_NAME, text)
    names = [p[1:-1].replace("``", "`") if p.startswith("`") else p for p in parts]
    return (names[0], names[1]) if len(names) == 2 else (default_schema, names[0])


def ddl_tables(query: str, default_schema: str) -> tuple[str, list[tuple[str, str]]] | None:
    """The tables a TRUNCATE, RENAME, ALTER TABLE ... RENAME or DROP TABLE statement makes
    disappear or replaces, as ``(kind, [(database, table), ...])``; None for other statements.

    ``kind`` is ``truncate``, ``rename`` (both sides of every pair) or ``drop``; unqualified
    names belong to ``default_schema`` (the statement's current database).
    """
    text = _COMMENT.sub(" ", query).strip()
    if match := _TRUNCATE.fullmatch(text):
        return "truncate", [_table_name(match.group(1), default_schema)]
    if match := _RENAME.fullmatch(text):
        pairs = _RENAME_PAIR.findall(match.group(1))
        return "rename", [_table_name(n, default_schema) for pair in pairs for n in pair]
    if match := _ALTER.fullmatch(text):
        renamed = _ALTER_RENAME.search(match.group(2))
        if renamed is None:
            return None
        return "rename", [_table_name(match.group(1), default_schema),
                          _table_name(renamed.group(1), default_schema)]
    if match := _DROP.fullmatch(text):
        names = [re.match(_QUALIFIED, part.strip()) for part in match.group(1).split(",")]
        return "drop", [_table_name(n.group(0), default_schema) for n in names if n]
    return None


def xa_statement(query: str) -> tuple[str, str] | None:
    """``(verb, xid)`` of an ``XA END|PREPARE|COMMIT|ROLLBACK xid`` statement, else None.

    The verb is upper case; ``XA COMMIT xid ONE PHASE`` gives ``COMMIT ONE PHASE``. The xid is
    the server's text (``X'7831',X'',1``), the same in the prepared part and its commit.
    """
    match = _XA.fullmatch(query.strip())
    if match is None:
        return None
    verb = match.group(1).upper() + (" ONE PHASE" if match.group(3) else "")
    return verb, " ".join(match.group(2).split())


# --- the collector ------------------------------------------------------------------------


@dataclass
class _RowChange:
    """One mapped row change of an XA transaction, held back until its XA COMMIT."""

    mapping: TableMapping
    op: str
    before: dict[str, object] | None
    after: dict[str, object] | None
    message_id: str
    version: int


@dataclass
class _Transaction:
    """The binlog transaction being read."""

    gtid: Gtid
    commit_ms: int
    standalone: bool
    version_base: int  # binlog_version right after its GTID event; row i gets base + i
    read_before: GtidPosition  # the read position before this transaction
    xa_prepared: bool = False  # the prepared part of an XA transaction: hold its rows back
    rows_read: int = 0  # source rows seen so far (the next row's index)
    skip: int = 0  # rows already published by an earlier attempt at this transaction
    held_back: list[_RowChange] = field(default_factory=list)


@dataclass
class _PreparedXa:
    """An XA transaction read up to XA PREPARE: rows to publish at its XA COMMIT."""

    transaction: _Transaction
    hold: GtidPosition  # the committable position while it is unresolved


class _StreamBroke(Exception):
    """The binlog connection ended; reconnect from the last transaction boundary."""


class _Stopping(Exception):
    """``stop`` was set while waiting for room for more records (e.g. the broker is down)."""


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
        self._snapshot_id_key = b""  # the persisted key of snapshot ids, set by _snapshot
        self._read_position = GtidPosition()  # after the last whole transaction read
        self._transaction: _Transaction | None = None
        self._published_rows: tuple[Gtid, int] | None = None  # partial transaction published
        self._warned_tables: set[tuple[str, str]] = set()
        self._last_commit = 0.0
        self._stop: threading.Event | None = None
        self._prepared_xa: dict[str, _PreparedXa] = {}  # by xid, in prepare order
        self._float_columns: dict[tuple[str, str], set[str]] = {}

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
        except pymysql.err.Error as exc:
            raise self._source_error(exc, "cannot connect") from None

    def _source_error(self, exc: pymysql.err.Error, doing: str) -> Exception:
        """SourceUnavailable for a server that cannot be reached now (restarted with
        back-off), ConfigError for anything else (wrong user, password, rights)."""
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        where = f"MariaDB at {self.config.host}:{self.config.port}"
        message = f"{self.config.name}: {doing}: {where} as {self.config.user!r}: {exc.args[-1]}"
        if code in _SOURCE_UNAVAILABLE_CODES:
            return SourceUnavailable(message)
        return ConfigError(message)

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
        except pymysql.err.Error as exc:
            raise self._source_error(exc, "checking the server failed") from None
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
        self._stop = stop
        try:
            position = self._start_position(state, stop)
            if position is None:
                return
            self._stream(state, position, stop)
        except _Stopping:
            log.info("%s: stopped while waiting for broker acknowledgements", self.config.name)
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
        except pymysql.err.Error as exc:
            raise self._source_error(exc, "reading the GTID position failed") from None
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
        """Back-pressure: serve deliveries while too many records await acknowledgement;
        raises _Stopping when ``stop`` is set meanwhile (the broker may be down for long)."""
        while self._acks.in_flight >= self.config.max_in_flight:
            if self._stop is not None and self._stop.is_set():
                raise _Stopping()
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
                self._float_columns = {
                    source: self._float_column_names(cursor, *source) for source in self._mappings
                }
                cursor.execute("SET SESSION time_zone = '+00:00'")
                cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                cursor.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT")
                snapshot_ms = wall_clock_ms()
                cursor.execute("SHOW STATUS LIKE 'binlog_snapshot_%'")
                status = {str(k).lower(): str(v) for k, v in cursor.fetchall()}
                binlog_file = status.get("binlog_snapshot_file", "")
                binlog_pos = int(status.get("binlog_snapshot_position", "0") or 0)
                version = binlog_version(binlog_file, binlog_pos)
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
                self._snapshot_id_key = state.secret("snapshot_ids")
                for (database, table), order in keys.items():
                    count += self._snapshot_table(
                        cursor, database, table, order, position, version, snapshot_ms, stop
                    )
                    if stop.is_set():
                        return None
                connection.commit()
        except pymysql.err.Error as exc:
            raise self._source_error(exc, "snapshot failed") from None
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

    @staticmethod
    def _float_column_names(cursor: Any, database: str, table: str) -> set[str]:
        """The FLOAT columns, which the snapshot reads as DOUBLE (see _FLOAT_AS_DOUBLE)."""
        cursor.execute(
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s "
            "AND TABLE_NAME = %s AND DATA_TYPE = 'float'",
            (database, table),
        )
        return {str(row[0]) for row in cursor.fetchall()}

    def _snapshot_table(
        self,
        cursor: Any,
        database: str,
        table: str,
        key_columns: list[str],
        position: GtidPosition,
        version: int,
        snapshot_ms: int,
        stop: threading.Event,
    ) -> int:
        quoted = f"`{database.replace('`', '``')}`.`{table.replace('`', '``')}`"
        order = ", ".join(f"`{c.replace('`', '``')}`" for c in key_columns)
        floats = self._float_columns.get((database, table), set())
        columns = "*"
        if floats:  # list every column, so FLOAT ones can be read at full precision
            cursor.execute(
                "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s "
                "AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION",
                (database, table),
            )
            quoted_columns = [
                (str(row[0]), f"`{str(row[0]).replace('`', '``')}`") for row in cursor.fetchall()
            ]
            columns = ", ".join(
                f"{_FLOAT_AS_DOUBLE.format(q)} AS {q}" if name in floats else q
                for name, q in quoted_columns
            )
        cursor.execute(f"SELECT {columns} FROM {quoted}" + (f" ORDER BY {order}" if order else ""))
        names = [d[0] for d in cursor.description]
        types = [FIELD_TYPE.FLOAT if d[0] in floats else d[1] for d in cursor.description]
        count = 0
        for values in cursor:
            row = {
                n: self._canonical(v, t) for n, v, t in zip(names, values, types, strict=True)
            }
            for mapping in self._mappings[(database, table)]:
                # Identified by content (keyed hash, never the values): a snapshot redone
                # after a crash gives unchanged rows the same ids, so they collapse downstream.
                message_id = (
                    f"{self.config.source_system}:snapshot:{mapping.source}:{mapping.target}:"
                    f"{snapshot_row_ref(self._snapshot_id_key, row)}"
                )
                self._emit(mapping, "r", None, row, message_id, str(position), version, None,
                           snapshot_ms)
            count += 1
            self.metrics.read.inc()
            if count % 1000 == 0:
                self.publisher.poll(0)
                if stop.is_set():
                    break
        return count

    def _canonical(self, value: object, field_type: int) -> object:
        """One value as the snapshot and the binlog both give it, before rendering.

        A naive datetime gets the time zone it was stored in (TIMESTAMP is read as UTC); BIT
        (bytes in the snapshot, a '0101' string in the binlog) becomes its integer; FLOAT its
        shortest float32 text (see :func:`float32_text`); TIME ``[-]HH:MM:SS[.ffffff]``.
        """
        if isinstance(value, datetime) and value.tzinfo is None:
            if field_type in _TIMESTAMP_TYPES:
                return value.replace(tzinfo=UTC)
            if field_type in _DATETIME_TYPES:
                return value.replace(tzinfo=self._zone)
        elif field_type == FIELD_TYPE.BIT:
            if isinstance(value, bytes | bytearray):
                return int.from_bytes(value, "big")
            if isinstance(value, str) and value and set(value) <= {"0", "1"}:
                return int(value, 2)
        elif field_type == FIELD_TYPE.FLOAT and isinstance(value, float):
            return float32_text(value)
        elif isinstance(value, timedelta):
            return time_text(value)
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

        _patch_library_time2()
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
                    raise SourceUnavailable(
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
        self._prepared_xa.clear()  # as at a first start: the snapshot is the new beginning
        position = self._snapshot(state, stop)
        if position is not None:
            self._read_position = position

    def _remember_partial(self) -> None:
        """A transaction cut off by a broken stream: remember how many rows went out."""
        txn = self._transaction
        if txn is not None and not txn.xa_prepared:  # XA rows are held back, none went out
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
            self._begin(reader, event)
        elif isinstance(event, RowsEvent):
            self._on_rows(event)
        elif isinstance(event, XidEvent):
            self._end(reader)
        elif isinstance(event, QueryEvent):
            self._on_query(reader, event)
        elif isinstance(event, TableMapEvent):
            self._check_table_map(event)
        elif isinstance(event, HeartbeatLogEvent) and self._transaction is None:
            self.metrics.source_lag.set(0)

    def _on_query(self, reader: Any, event: Any) -> None:
        """COMMIT, the parts of an XA transaction, and DDL that affects a mapped table."""
        txn = self._transaction
        if txn is None:
            return
        query = _text(event.query).strip()
        if query.upper() == "COMMIT":
            self._end(reader)
            return
        fresh = not self._read_position.includes(txn.gtid)
        xa = xa_statement(query)
        if xa is not None:
            verb, xid = xa
            if verb == "END" and txn.xa_prepared:  # the group ends with XA PREPARE (unread)
                if fresh:
                    self._prepared_xa[xid] = _PreparedXa(txn, hold=self._committable())
                self._end(reader)
            elif verb in ("COMMIT", "ROLLBACK"):
                if fresh:
                    self._resolve_xa(xid, verb == "COMMIT", txn.commit_ms)
                self._end(reader)
            elif verb == "COMMIT ONE PHASE" or txn.standalone:
                self._end(reader)
            return
        if txn.standalone:
            if fresh:
                self._check_ddl(query, _text(event.schema), txn)
            self._end(reader)

    def _resolve_xa(self, xid: str, commit: bool, commit_ms: int) -> None:
        """XA COMMIT publishes the prepared rows (with the commit's time); ROLLBACK drops them."""
        prepared = self._prepared_xa.pop(xid, None)
        if prepared is None:
            log.warning(
                "%s: XA %s of %s, prepared before the collector's start position: changes "
                "of mapped tables in it (if any) were not read", self.config.name,
                "COMMIT" if commit else "ROLLBACK", xid,
            )
            return
        if not commit:
            if prepared.transaction.held_back:
                log.info("%s: XA ROLLBACK of %s: %d held-back row changes dropped",
                         self.config.name, xid, len(prepared.transaction.held_back))
            return
        gtid = prepared.transaction.gtid
        for change in prepared.transaction.held_back:
            self._emit(change.mapping, change.op, change.before, change.after,
                       change.message_id, str(gtid), change.version, gtid.seq, commit_ms)

    def _check_ddl(self, query: str, default_schema: str, txn: _Transaction) -> None:
        """A mapped table truncated (dead letter), renamed or dropped (ERROR, counted)."""
        affected = ddl_tables(query, default_schema)
        if affected is None:
            return
        kind, tables = affected
        for source in dict.fromkeys(tables):
            mappings = self._mappings.get(source)
            if not mappings:
                continue
            name = f"{source[0]}.{source[1]}"
            if kind == "truncate":
                reason = (
                    f"{name} was truncated (transaction {txn.gtid}); row deletes are not "
                    "published for a TRUNCATE"
                )
                log.error("%s: %s", self.config.name, reason)
                original = json.dumps(
                    {"table": name, "op": "truncate", "source_position": str(txn.gtid),
                     "query": query}
                ).encode()
                self.publisher.dead_letter(
                    "truncate",
                    reason,
                    original,
                    self._acks.track(),
                    organisation_id=self.config.organisation_id,
                    received_ms=txn.commit_ms,
                )
            else:
                self.metrics.failed("schema_changed").inc()
                log.error(
                    "%s: schema_changed: mapped table %s (-> %s) was %s in transaction %s "
                    "(%s); its changes are no longer read under that name: update `tables` in "
                    "the collector configuration and take a new snapshot", self.config.name,
                    name, ", ".join(m.target for m in mappings),
                    "renamed or replaced" if kind == "rename" else "dropped", txn.gtid, query,
                )

    def _begin(self, reader: Any, event: Any) -> None:
        gtid = Gtid(int(event.domain_id), int(event.server_id), int(event.gtid_seq_no))
        skip = 0
        cut_off = self._transaction  # the library reconnected by itself inside it
        if cut_off is not None and cut_off.gtid == gtid and not cut_off.xa_prepared:
            skip = max(cut_off.rows_read, cut_off.skip)
        elif self._published_rows is not None and self._published_rows[0] == gtid:
            skip = self._published_rows[1]  # the rows of this retry already went out
        self._published_rows = None
        self._transaction = _Transaction(
            gtid=gtid,
            commit_ms=int(event.timestamp) * 1000,
            standalone=bool(event.flags & _FL_STANDALONE),
            # log_pos is where the next event starts: right after this GTID event.
            version_base=binlog_version(str(reader.log_file), int(event.packet.log_pos)),
            read_before=self._read_position,
            xa_prepared=bool(event.flags & _FL_PREPARED_XA),
            skip=skip,
        )

    def _committable(self) -> GtidPosition:
        """The position to save: the read position, or while an XA transaction with held-back
        rows is unresolved, the position before its prepared part (re-read after a restart)."""
        for prepared in self._prepared_xa.values():
            if prepared.transaction.held_back:
                return prepared.hold
        return self._read_position

    def _end(self, reader: Any) -> None:
        txn = self._transaction
        self._transaction = None
        if txn is None or self._read_position.includes(txn.gtid):
            return
        self._read_position = self._read_position.advanced(txn.gtid)
        self._acks.mark(str(self._committable()))
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
                message_id = f"{self.config.source_system}:{txn.gtid}:{row_index}:{mapping.target}"
                version = txn.version_base + row_index
                if txn.xa_prepared:  # published at XA COMMIT, dropped at XA ROLLBACK
                    txn.held_back.append(
                        _RowChange(mapping, op, before, after, message_id, version)
                    )
                    continue
                self._emit(mapping, op, before, after, message_id, str(txn.gtid), version,
                           txn.gtid.seq, txn.commit_ms)

    def _zoned_row(self, values: Mapping[str, object], types: list[int]) -> dict[str, object]:
        return {
            name: self._canonical(value, types[i]) if i < len(types) else value
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
