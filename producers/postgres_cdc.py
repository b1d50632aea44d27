"""PostgreSQL CDC edge collector: initial snapshot, then logical decoding with pgoutput.

How one row change of a hospital database becomes one EmrRowChange record:

* **Slot and snapshot.** On first start (or after a snapshot that did not finish) the
  collector creates its publication (``FOR TABLE`` the mapped tables, with
  ``publish_via_partition_root`` so a partitioned table's changes arrive under its own
  name), then the logical
  replication slot with ``EXPORT_SNAPSHOT``. While the replication connection stays idle, a
  second connection reads every mapped table in a ``REPEATABLE READ`` transaction that
  adopted the exported snapshot (``SET TRANSACTION SNAPSHOT``): these rows are op ``r`` and
  carry the slot's consistent point. Streaming then starts at that point, so no change is
  missed and none is read twice. A collector killed (or stopped with records still
  undelivered) mid-snapshot redoes it (with a new slot) on restart; the duplicates that
  gives are harmless downstream. A slow broker only makes the snapshot wait, never fail.
* **Streaming.** ``START_REPLICATION`` with the pgoutput plugin (protocol version 1) through
  psycopg2's ``LogicalReplicationConnection`` (psycopg 3 has no replication protocol
  support). :func:`decode_pgoutput` turns each message into a small dataclass.
* **Positions.** Every record carries its transaction id, ``source_position`` (the commit
  LSN as text, e.g. ``0/16B3748``) and ``position_seq`` (the change's own WAL LSN as an
  integer, so later changes of a row get higher versions). Snapshot rows get the slot's
  restart_lsn - 1: a transaction open across the consistent point is decoded with changes
  below that point, but decoding never emits anything below restart_lsn, so every
  streamed change outranks the snapshot. The slot's flush position is
  confirmed to the server (``send_feedback``) only after Kafka acknowledged every record of
  every transaction up to it; when nothing is in flight the position follows the server's
  keepalives, and an optional ``pg_logical_emit_message`` heartbeat makes WAL advance even
  when only other databases write, so an idle slot does not pin WAL. psycopg2 itself
  advances the flush position on keepalives in some states; reading pauses while that
  could pass an unacknowledged commit (:meth:`PostgresCdcProducer._must_drain_before_read`).
* **Ids.** ``message_id`` is ``<source_system>:<change LSN>`` (``:<n>`` appended for the n-th
  further record at one LSN, e.g. a multi-row insert) and
  ``<source_system>:snapshot:<schema.table>:<key hash>:<content hash>`` for snapshot
  rows (a keyed BLAKE2b hash of the primary key text: the key itself may be an MRN and
  must not reach logs, dead-letter keys or ``source_ref``), so a redelivered change keeps
  its id and its event id downstream.
* **Mapping.** ``tables`` maps HIS tables and columns to the target tables the normaliser
  knows (see :mod:`producers.table_mapping`); it is checked against the live catalog at
  start. A mapped column that disappears (renamed or dropped) turns each change of that
  table into a dead letter (``schema_changed``) and an ERROR log; other tables continue.
  A TRUNCATE of a mapped table is dead-lettered too (``truncate``): it has no row changes.
  Mappings follow a table by OID once seen (kept in the collector state), so a renamed
  or moved mapped table keeps streaming with a WARNING naming old and new name; a
  published table no mapping knows is an ERROR and a ``unmapped_relation`` failure,
  once per relation.

Replica identity: ``REPLICA IDENTITY FULL`` is required (``check`` refuses otherwise) for
mapped tables with a mapped column that can be TOASTed (text, varchar, bytea, json,
numeric...): with the default identity an update that leaves such a value unchanged
carries no value for it and no old row to take it from, so that row could not be
published. If the identity is changed back at runtime, the Relation message raises an
ERROR alert and such updates are dead-lettered (``toast_unavailable``). FULL also gives
complete before images of deletes; the default gives key columns only.

Text is decoded as UTF-8; ``check`` refuses a database whose encoding is not UTF8.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import select
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from medstream.metrics import COLLECTOR_FAILED, labelled
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
    type_family_postgres,
    validate_mappings,
)

log = logging.getLogger("medstream.collector.postgres")

#: CollectorState keys: the consistent point of the finished snapshot, the confirmed LSN.
SNAPSHOT_KEY = "snapshot_lsn"
CONFIRMED_KEY = "confirmed_lsn"
#: Prefix of the heartbeat messages written with pg_logical_emit_message.
HEARTBEAT_PREFIX = "medstream.heartbeat"
#: CollectorState key prefix: relation OID -> the configured source table it was seen as.
RELATION_KEY_PREFIX = "relation_oid:"

_IDENTIFIER: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_PG_EPOCH_MS: Final = 946_684_800_000  # 2000-01-01T00:00:00Z, PostgreSQL's timestamp epoch
# Session settings that make the server's text output of values unambiguous.
_SESSION_OPTIONS: Final = (
    "-c TimeZone=UTC -c DateStyle=ISO,YMD -c extra_float_digits=1 -c client_encoding=UTF8"
)
# Built-in fixed-length types: their values are never TOASTed. Any other type may be.
_FIXED_LENGTH_TYPES: Final = frozenset(
    {16, 18, 19, 20, 21, 23, 26, 28, 29, 700, 701, 1082, 1083, 1114, 1184, 1186, 1266, 2950}
)


# --- LSNs ---------------------------------------------------------------------------------


def lsn_text(lsn: int) -> str:
    """An LSN as PostgreSQL writes it: ``0/16B3748``."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def lsn_int(text: str) -> int:
    """An LSN in PostgreSQL's text form as an integer (ValueError if it is not one)."""
    high, sep, low = text.strip().partition("/")
    if not sep:
        raise ValueError(f"{text!r} is not an LSN")
    return (int(high, 16) << 32) | int(low, 16)


# --- pgoutput protocol (version 1) --------------------------------------------------------


class Unchanged:
    """An unchanged TOASTed value: pgoutput sends no data for it."""

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"


#: The value pgoutput leaves out for an unchanged TOASTed column ('u').
UNCHANGED_TOAST: Final = Unchanged()

TupleValue = str | None | Unchanged


@dataclass(frozen=True, slots=True)
class Begin:
    """Start of a transaction: its commit LSN, commit time and xid."""

    final_lsn: int
    commit_ms: int
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    """End of a transaction; ``end_lsn`` is where streaming resumes after it."""

    flags: int
    commit_lsn: int
    end_lsn: int
    commit_ms: int


@dataclass(frozen=True, slots=True)
class Origin:
    """Replication origin of the transaction (for changes replayed from elsewhere)."""

    lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class RelationColumn:
    """One column of a Relation message."""

    name: str
    type_oid: int
    type_modifier: int
    is_key: bool


@dataclass(frozen=True, slots=True)
class Relation:
    """A table's current shape; sent before its first change and after every schema change."""

    oid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[RelationColumn, ...]

    @property
    def qualified_name(self) -> str:
        """``schema.table`` (pg_catalog appears with an empty namespace in the protocol)."""
        return f"{self.namespace or 'pg_catalog'}.{self.name}"


@dataclass(frozen=True, slots=True)
class TypeInfo:
    """A data type used by a following Relation (user-defined types only)."""

    oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    """A new row."""

    relation_oid: int
    new: tuple[TupleValue, ...]


@dataclass(frozen=True, slots=True)
class Update:
    """A changed row; ``old`` is the full old row (FULL) or its key (key changed), else None."""

    relation_oid: int
    old: tuple[TupleValue, ...] | None
    old_is_key: bool
    new: tuple[TupleValue, ...]


@dataclass(frozen=True, slots=True)
class Delete:
    """A deleted row: its key columns (default identity) or the full row (FULL)."""

    relation_oid: int
    old: tuple[TupleValue, ...]
    old_is_key: bool


@dataclass(frozen=True, slots=True)
class Truncate:
    """TRUNCATE of one or more tables."""

    options: int
    relation_oids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """A pg_logical_emit_message message (only sent when the ``messages`` option is on)."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


PgOutputMessage = (
    Begin
    | Commit
    | Origin
    | Relation
    | TypeInfo
    | Insert
    | Update
    | Delete
    | Truncate
    | LogicalMessage
)


class PgOutputError(ValueError):
    """A pgoutput message that does not follow protocol version 1."""


class _Reader:
    """Big-endian reads over one message."""

    __slots__ = ("data", "at")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def _unpack(self, fmt: str, size: int) -> Any:
        if self.at + size > len(self.data):
            raise PgOutputError(f"message truncated at byte {self.at} (needs {size} more)")
        value = struct.unpack_from(fmt, self.data, self.at)[0]
        self.at += size
        return value

    def int8(self) -> int:
        return int(self._unpack(">b", 1))

    def byte(self) -> str:
        return chr(self._unpack(">B", 1))

    def int16(self) -> int:
        return int(self._unpack(">h", 2))

    def int32(self) -> int:
        return int(self._unpack(">i", 4))

    def uint32(self) -> int:
        return int(self._unpack(">I", 4))

    def int64(self) -> int:
        return int(self._unpack(">q", 8))

    def uint64(self) -> int:
        return int(self._unpack(">Q", 8))

    def string(self) -> str:
        end = self.data.find(b"\x00", self.at)
        if end < 0:
            raise PgOutputError(f"unterminated string at byte {self.at}")
        text = self.data[self.at : end].decode("utf-8")
        self.at = end + 1
        return text

    def raw(self, size: int) -> bytes:
        if size < 0 or self.at + size > len(self.data):
            raise PgOutputError(f"message truncated at byte {self.at} (needs {size} more)")
        chunk = self.data[self.at : self.at + size]
        self.at += size
        return chunk

    def timestamp_ms(self) -> int:
        return _PG_EPOCH_MS + self.int64() // 1000

    def tuple_data(self) -> tuple[TupleValue, ...]:
        values: list[TupleValue] = []
        for _ in range(self.int16()):
            kind = self.byte()
            if kind == "n":
                values.append(None)
            elif kind == "u":
                values.append(UNCHANGED_TOAST)
            elif kind == "t":
                values.append(self.raw(self.int32()).decode("utf-8"))
            else:  # 'b' (binary) exists only in protocol version 2 with the binary option
                raise PgOutputError(f"unsupported tuple value kind {kind!r}")
        return tuple(values)


def decode_pgoutput(payload: bytes) -> PgOutputMessage:
    """Decode one pgoutput (protocol version 1) message; raises PgOutputError if malformed."""
    if not payload:
        raise PgOutputError("empty message")
    reader = _Reader(bytes(payload))
    tag = reader.byte()
    message: PgOutputMessage
    if tag == "B":
        message = Begin(reader.uint64(), reader.timestamp_ms(), reader.uint32())
    elif tag == "C":
        message = Commit(reader.int8(), reader.uint64(), reader.uint64(), reader.timestamp_ms())
    elif tag == "O":
        message = Origin(reader.uint64(), reader.string())
    elif tag == "R":
        oid, namespace, name = reader.uint32(), reader.string(), reader.string()
        identity = reader.byte()
        columns = []
        for _ in range(reader.int16()):
            flags = reader.int8()
            columns.append(
                RelationColumn(reader.string(), reader.uint32(), reader.int32(), bool(flags & 1))
            )
        message = Relation(oid, namespace, name, identity, tuple(columns))
    elif tag == "Y":
        message = TypeInfo(reader.uint32(), reader.string(), reader.string())
    elif tag == "I":
        oid = reader.uint32()
        if reader.byte() != "N":
            raise PgOutputError("Insert without a new tuple")
        message = Insert(oid, reader.tuple_data())
    elif tag == "U":
        oid = reader.uint32()
        kind = reader.byte()
        old: tuple[TupleValue, ...] | None = None
        old_is_key = False
        if kind in ("K", "O"):
            old, old_is_key = reader.tuple_data(), kind == "K"
            kind = reader.byte()
        if kind != "N":
            raise PgOutputError(f"Update without a new tuple (found {kind!r})")
        message = Update(oid, old, old_is_key, reader.tuple_data())
    elif tag == "D":
        oid = reader.uint32()
        kind = reader.byte()
        if kind not in ("K", "O"):
            raise PgOutputError(f"Delete without an old tuple (found {kind!r})")
        message = Delete(oid, reader.tuple_data(), kind == "K")
    elif tag == "T":
        count = reader.int32()
        options = reader.int8()
        message = Truncate(options, tuple(reader.uint32() for _ in range(count)))
    elif tag == "M":
        transactional = bool(reader.int8() & 1)
        lsn, prefix = reader.uint64(), reader.string()
        message = LogicalMessage(transactional, lsn, prefix, reader.raw(reader.int32()))
    else:
        raise PgOutputError(f"unknown message type {tag!r}")
    if reader.at != len(reader.data):
        raise PgOutputError(f"{len(reader.data) - reader.at} unread bytes after a {tag!r} message")
    return message


# --- values -------------------------------------------------------------------------------

_BOOL, _INT8, _INT2, _INT4, _OID = 16, 20, 21, 23, 26
_FLOAT4, _FLOAT8, _NUMERIC = 700, 701, 1700
_DATE, _TIMESTAMP, _TIMESTAMPTZ = 1082, 1114, 1184


def parse_text_value(text: str | None, type_oid: int, naive_zone: ZoneInfo) -> object:
    """PostgreSQL's text output of a value (TimeZone=UTC, DateStyle=ISO) as a Python value.

    ``timestamp without time zone`` values are read in ``naive_zone`` (the HIS's zone).
    Types without a special reading stay text. Raises ValueError for values such as
    ``infinity`` that have no Python form.
    """
    if text is None:
        return None
    if type_oid == _TIMESTAMPTZ:
        return datetime.fromisoformat(text)
    if type_oid == _TIMESTAMP:
        return datetime.fromisoformat(text).replace(tzinfo=naive_zone)
    if type_oid == _DATE:
        return date.fromisoformat(text)
    if type_oid in (_INT2, _INT4, _INT8, _OID):
        return int(text)
    if type_oid == _NUMERIC:
        try:
            return Decimal(text)
        except InvalidOperation:  # an ArithmeticError, not the ValueError callers expect
            raise ValueError("not a numeric value") from None
    if type_oid in (_FLOAT4, _FLOAT8):
        return float(text)
    if type_oid == _BOOL:
        return text == "t"
    return text


# --- configuration ------------------------------------------------------------------------


class PostgresCdcConfig(CollectorConfig):
    """One PostgreSQL database: connection, slot, publication and the table mapping."""

    kind: Literal["postgres"] = "postgres"
    dsn: str = Field(
        description='libpq connection string, e.g. "host=db port=5432 user=cdc dbname=his '
        'password=${PGPASSWORD}"; the user needs REPLICATION and SELECT on the mapped tables'
    )
    slot: str | None = Field(
        default=None, description="logical replication slot (default: medstream_<name>)"
    )
    publication: str | None = Field(
        default=None,
        description="publication, created FOR TABLE the mapped tables if absent "
        "(default: medstream_<name>)",
    )
    heartbeat_interval_s: float = Field(
        default=10.0,
        ge=0,
        description="seconds between pg_logical_emit_message heartbeats (0: none)",
    )
    source_timezone: str = Field(
        default="UTC", description="time zone of `timestamp without time zone` columns"
    )
    snapshot_batch_rows: int = Field(default=2000, ge=1, description="rows per snapshot fetch")
    max_in_flight: int = Field(
        default=20_000, ge=1, description="unacknowledged records at which reading pauses"
    )
    feedback_interval_s: float = Field(
        default=1.0, gt=0, description="how often a new confirmed position is sent to the server"
    )
    reconnect_max_backoff_s: float = Field(
        default=30.0, gt=0, description="longest wait between reconnection attempts"
    )
    tables: list[TableMapping] = Field(min_length=1, description="source table -> target")

    @field_validator("source_timezone")
    @classmethod
    def _zone_exists(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @model_validator(mode="after")
    def _names(self) -> PostgresCdcConfig:
        default = "medstream_" + self.name.replace("-", "_")
        self.slot = self.slot or default
        self.publication = self.publication or default
        for what, value in (("slot", self.slot), ("publication", self.publication)):
            if not _IDENTIFIER.fullmatch(value):
                raise ValueError(
                    f"{what} {value!r} must be lower-case letters, digits and underscores "
                    "(at most 63, not starting with a digit)"
                )
        return self

    @property
    def slot_name(self) -> str:
        """The replication slot's name."""
        assert self.slot is not None
        return self.slot

    @property
    def publication_name(self) -> str:
        """The publication's name."""
        assert self.publication is not None
        return self.publication


# --- the collector ------------------------------------------------------------------------


@dataclass
class _Transaction:
    """The transaction being streamed."""

    xid: int
    commit_lsn: int
    commit_ms: int
    changes: int = 0
    records_at: dict[int, int] = field(default_factory=dict)  # change LSN -> records emitted


class PostgresCdcProducer(Collector[PostgresCdcConfig]):
    """PostgreSQL logical-decoding collector: snapshot, then pgoutput stream -> EmrRowChange."""

    kind: ClassVar[str] = "postgres"
    source_kind: ClassVar[str] = "emr_cdc"
    config_model: ClassVar[type[CollectorConfig]] = PostgresCdcConfig

    def __init__(self, config: PostgresCdcConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self._zone = ZoneInfo(config.source_timezone)
        self._by_source: dict[str, list[TableMapping]] = {}
        for mapping in config.tables:
            self._by_source.setdefault(mapping.source, []).append(mapping)
        self._relations: dict[int, Relation] = {}
        #: Relation OID -> the configured source it was first seen as (follows renames).
        self._source_by_oid: dict[int, str] = {}
        #: Relation OIDs already reported as unmapped (one ERROR per relation).
        self._unmapped_reported: set[int] = set()
        self._state: CollectorState | None = None
        self._acks: OrderedAcks[int] = OrderedAcks()
        self._transaction: _Transaction | None = None
        self._confirmed = 0
        # Guard against psycopg2's keepalive flush auto-advance (see _must_drain_before_read).
        self._flush_sent = 0  # highest flush_lsn handed to send_feedback (psycopg2 keeps it)
        self._last_data_start = 0  # data_start of the last XLogData message read
        self._last_marked = 0  # end LSN of the last Commit read
        self._acked_upto = 0  # end LSN of the last Commit whose records were all acknowledged
        self._ever_connected = False
        self._reconnects = labelled(COLLECTOR_FAILED, config.name, "source_reconnect")
        self._heartbeat_conn: Any = None
        self._cursor: Any = None
        #: Connections lost and re-established since start (also a failed-metric reason).
        self.reconnects = 0
        #: Whether the current connection reached streaming (after any snapshot).
        self.streaming = False
        self._next_heartbeat = 0.0

    # --- connections -----------------------------------------------------------------------

    def _connect(self, replication: bool = False) -> Any:
        import psycopg2
        import psycopg2.extras

        factory = psycopg2.extras.LogicalReplicationConnection if replication else None
        try:
            return psycopg2.connect(
                self.config.dsn,
                connection_factory=factory,
                options=_SESSION_OPTIONS,
                application_name=f"medstream-{self.config.name}",
                connect_timeout=10,
            )
        except psycopg2.OperationalError as exc:
            # Refused, shutting down, unreachable: a restart with backoff may succeed.
            raise SourceUnavailable(
                f"{self.config.name}: cannot connect to PostgreSQL: {_first_line(exc)}"
            ) from None

    # --- check -----------------------------------------------------------------------------

    def check(self) -> list[str]:
        """Validate server settings and the table mapping against the live catalog.

        Raises ConfigError for a real configuration mistake (wal_level, encoding, mapping,
        a mapped table whose TOASTable columns need REPLICA IDENTITY FULL) and
        SourceUnavailable when the server cannot be reached right now.
        """
        import psycopg2

        conn = self._connect()
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SHOW wal_level")
                wal_level = cur.fetchone()[0]
                if wal_level != "logical":
                    raise ConfigError(
                        f"{self.config.name}: wal_level is {wal_level} but must be logical "
                        "(ALTER SYSTEM SET wal_level = logical, then restart PostgreSQL)"
                    )
                cur.execute("SHOW server_encoding")
                encoding = cur.fetchone()[0]
                if encoding.upper() not in ("UTF8", "UTF-8"):
                    raise ConfigError(
                        f"{self.config.name}: the database encoding is {encoding}, but the "
                        "collector decodes the replication stream as UTF-8: only UTF8 "
                        "databases are supported"
                    )
                validate_mappings(self.config.tables, self._catalog(cur))
                findings = [
                    f"{self.config.name}: wal_level logical, "
                    f"{len(self.config.tables)} table mapping(s) valid"
                ]
                self._check_replica_identity(cur, findings)
                cur.execute(
                    "SELECT confirmed_flush_lsn::text, active FROM pg_replication_slots "
                    "WHERE slot_name = %s",
                    (self.config.slot_name,),
                )
                slot = cur.fetchone()
                if slot is None:
                    findings.append(
                        f"slot {self.config.slot_name} does not exist yet: the first run "
                        "creates it and snapshots the mapped tables"
                    )
                else:
                    findings.append(
                        f"slot {self.config.slot_name} confirmed up to {slot[0]}"
                        + (" (in use by another connection)" if slot[1] else "")
                    )
            return findings
        except psycopg2.Error as exc:
            if _connection_lost(exc):
                raise SourceUnavailable(
                    f"{self.config.name}: lost the connection to PostgreSQL: {_first_line(exc)}"
                ) from None
            raise
        finally:
            conn.close()

    def _check_replica_identity(self, cur: Any, findings: list[str]) -> None:
        """Refuse mapped tables whose TOASTable mapped columns lack REPLICA IDENTITY FULL.

        With the default identity an update that leaves a TOASTed value unchanged carries no
        value for it (and no old row to take it from), so the row could only be dropped or
        published with a hole: FULL is required for such tables. Tables whose mapped columns
        are all fixed-length are only noted.
        """
        mapped = {m.source: set(m.columns.values()) for m in self.config.tables}
        cur.execute(
            "SELECT n.nspname || '.' || c.relname, c.relreplident, a.attname, "
            "a.attlen = -1 AND a.attstorage <> 'p' FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
            "WHERE n.nspname || '.' || c.relname = ANY(%s)",
            (list(self._by_source),),
        )
        identity: dict[str, str] = {}
        toastable: dict[str, list[str]] = {}
        for table, replident, column, can_toast in cur.fetchall():
            identity[table] = replident
            if can_toast and column in mapped.get(table, ()):
                toastable.setdefault(table, []).append(column)
        refused = [t for t in sorted(identity) if identity[t] != "f" and toastable.get(t)]
        if refused:
            raise ConfigError(
                "; ".join(
                    f"{table}: REPLICA IDENTITY is not FULL, but mapped column(s) "
                    f"{', '.join(sorted(toastable[table]))} can be TOASTed, and an update that "
                    "leaves a TOASTed value unchanged would not carry it: run "
                    f"ALTER TABLE {table} REPLICA IDENTITY FULL"
                    for table in refused
                )
            )
        for table in sorted(identity):
            if identity[table] != "f":
                findings.append(
                    f"{table}: REPLICA IDENTITY is not FULL, so before images of "
                    "updates and deletes carry key columns only "
                    f"(ALTER TABLE {table} REPLICA IDENTITY FULL for full images)"
                )

    def _catalog(self, cur: Any) -> dict[str, dict[str, str]]:
        """``schema.table`` -> column -> type family, for the mapped tables."""
        cur.execute(
            "SELECT table_schema || '.' || table_name, column_name, data_type "
            "FROM information_schema.columns "
            "WHERE table_schema || '.' || table_name = ANY(%s) ORDER BY ordinal_position",
            (list(self._by_source),),
        )
        catalog: dict[str, dict[str, str]] = {}
        for table, column, data_type in cur.fetchall():
            catalog.setdefault(table, {})[column] = type_family_postgres(data_type)
        return catalog

    # --- run -------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Snapshot if needed, then stream until ``stop``; reconnect with backoff on loss."""
        import psycopg2

        state = CollectorState(self.state_dir / "postgres.sqlite")
        self._state = state
        backoff = 1.0
        try:
            while not stop.is_set():
                try:
                    self._session(state, stop)
                    return
                except (psycopg2.Error, SourceUnavailable) as exc:
                    if isinstance(exc, psycopg2.Error) and not _connection_lost(exc):
                        raise
                    if not self._ever_connected:
                        # Down at start: exit 1 and let the supervisor retry with backoff.
                        if isinstance(exc, SourceUnavailable):
                            raise
                        raise SourceUnavailable(
                            f"{self.config.name}: PostgreSQL is unavailable: {_first_line(exc)}"
                        ) from None
                    self.metrics.ready.set(0)
                    self._reconnects.inc()
                    self.reconnects += 1
                    reached_stream = self.streaming
                    log.error(
                        "%s: connection to PostgreSQL lost (%s); reconnect %d in %.0f s",
                        self.config.name,
                        _first_line(exc),
                        self.reconnects,
                        backoff,
                    )
                    self._settle(state)
                    if reached_stream:
                        backoff = 1.0
                    stop.wait(backoff)
                    backoff = min(backoff * 2, self.config.reconnect_max_backoff_s)
        finally:
            self.metrics.ready.set(0)
            self._settle(state)
            self._close_heartbeat()
            state.close()

    def _settle(self, state: CollectorState) -> None:
        """Wait for what is in flight and store the position it completes (not sent: no conn)."""
        remaining = self.publisher.flush(30.0)
        if remaining:
            log.error("%s: %d records unacknowledged", self.config.name, remaining)
        done = self._acks.committable()
        if done is not None and done > self._confirmed:
            self._confirmed = done
            state.put(CONFIRMED_KEY, lsn_text(done))
        # A transaction cut off by the loss is streamed again from its start.
        self._acks = OrderedAcks()
        self._transaction = None
        self._flush_sent = self._last_data_start = self._last_marked = self._acked_upto = 0

    def _session(self, state: CollectorState, stop: threading.Event) -> None:
        """One connection's life: (re)snapshot when needed, then stream."""
        self.streaming = False
        conn = self._connect(replication=True)
        self._ever_connected = True
        try:
            cur = conn.cursor()
            snapshot = state.get(SNAPSHOT_KEY)
            slot_lsn = self._slot_confirmed_lsn()
            if snapshot is None or slot_lsn is None:
                if snapshot is not None:
                    log.warning(
                        "%s: slot %s is gone; taking a new snapshot",
                        self.config.name,
                        self.config.slot_name,
                    )
                start = self._snapshot(cur, state, stop)
                if start is None:
                    return
            else:
                stored = state.get(CONFIRMED_KEY)
                start = max(slot_lsn, lsn_int(stored) if stored else 0)
            self._confirmed = start
            try:
                self._stream(cur, state, start, stop)
            except _Stopped:
                pass  # stopped while waiting for the broker; nothing more was confirmed
        finally:
            conn.close()

    def _slot_confirmed_lsn(self) -> int | None:
        """The slot's confirmed flush LSN, or None when it does not exist."""
        conn = self._connect()
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
                    "WHERE slot_name = %s",
                    (self.config.slot_name,),
                )
                row = cur.fetchone()
            return None if row is None or row[0] is None else lsn_int(row[0])
        finally:
            conn.close()

    # --- snapshot --------------------------------------------------------------------------

    def _prepare_slot(self) -> None:
        """Create or complete the publication; drop a slot left by an unfinished snapshot."""
        from psycopg2 import sql

        conn = self._connect()
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                tables = [sql.Identifier(*source.split(".", 1)) for source in self._by_source]
                cur.execute(
                    "SELECT schemaname || '.' || tablename FROM pg_publication_tables "
                    "WHERE pubname = %s",
                    (self.config.publication_name,),
                )
                published = {row[0] for row in cur.fetchall()}
                cur.execute(
                    "SELECT 1 FROM pg_publication WHERE pubname = %s",
                    (self.config.publication_name,),
                )
                publication = sql.Identifier(self.config.publication_name)
                if cur.fetchone() is None:
                    cur.execute(
                        # Partitioned tables publish their partitions' changes under the
                        # root's name (the mapped one), not under each partition's.
                        sql.SQL(
                            "CREATE PUBLICATION {} FOR TABLE {} "
                            "WITH (publish_via_partition_root = true)"
                        ).format(publication, sql.SQL(", ").join(tables))
                    )
                    log.info(
                        "%s: created publication %s", self.config.name, self.config.publication_name
                    )
                else:
                    cur.execute(
                        "SELECT pubviaroot FROM pg_publication WHERE pubname = %s",
                        (self.config.publication_name,),
                    )
                    if not cur.fetchone()[0]:
                        cur.execute(
                            sql.SQL(
                                "ALTER PUBLICATION {} SET (publish_via_partition_root = true)"
                            ).format(publication)
                        )
                    missing = [s for s in self._by_source if s not in published]
                    if missing:
                        cur.execute(
                            sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
                                publication,
                                sql.SQL(", ").join(
                                    sql.Identifier(*s.split(".", 1)) for s in missing
                                ),
                            )
                        )
                        log.info(
                            "%s: added %s to publication %s",
                            self.config.name,
                            ", ".join(missing),
                            self.config.publication_name,
                        )
                cur.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                    "WHERE slot_name = %s",
                    (self.config.slot_name,),
                )
                if cur.rowcount:
                    log.warning(
                        "%s: dropped slot %s of an unfinished snapshot",
                        self.config.name,
                        self.config.slot_name,
                    )
        finally:
            conn.close()

    def _snapshot(self, cur: Any, state: CollectorState, stop: threading.Event) -> int | None:
        """Create the slot with an exported snapshot and publish every mapped row as op r.

        Returns the consistent point to stream from, or None when stopped before the end.
        """
        import psycopg2

        state.delete(SNAPSHOT_KEY)
        state.delete(CONFIRMED_KEY)
        self._prepare_slot()
        cur.execute(
            f"CREATE_REPLICATION_SLOT {self.config.slot_name} LOGICAL pgoutput EXPORT_SNAPSHOT"
        )
        _, consistent_text, snapshot_name, _ = cur.fetchone()
        consistent = lsn_int(consistent_text)
        version = self._snapshot_version()
        log.info(
            "%s: slot %s created at %s; snapshot of %d table(s) starts",
            self.config.name,
            self.config.slot_name,
            consistent_text,
            len(self._by_source),
        )
        started_ms = wall_clock_ms()
        acks: OrderedAcks[int] = OrderedAcks()
        # Snapshot ids carry keyed hashes of the primary key and of the row's content, never
        # their text (a key may be an MRN); the hash key is kept in the collector state, so
        # a snapshot redone after a crash gives unchanged rows the same ids.
        id_key = self._snapshot_id_key()
        rows = 0
        reader = self._connect()
        try:
            reader.set_session(isolation_level="REPEATABLE READ", readonly=True)
            with reader.cursor() as setup:
                setup.execute("SET TRANSACTION SNAPSHOT %s", (snapshot_name,))
            for source, mappings in self._by_source.items():
                for values, key in self._snapshot_rows(reader, source):
                    if stop.is_set():
                        return None
                    row_ref = hashlib.blake2b(key.encode(), key=id_key, digest_size=16).hexdigest()
                    content_ref = snapshot_row_ref(id_key, values)
                    for index, mapping in enumerate(mappings):
                        ref = source if len(mappings) == 1 else f"{source}#{index}"
                        try:
                            self._wait_for_room(acks, stop)
                        except _Stopped:
                            return None
                        self._publish(
                            mapping,
                            "r",
                            None,
                            values,
                            f"{self.config.source_system}:snapshot:{ref}:{row_ref}:"
                            f"{content_ref}",
                            consistent_text,
                            version,
                            None,
                            started_ms,
                            acks,
                        )
                    rows += 1
                    self.metrics.read.inc()
            reader.commit()
        except psycopg2.Error:
            reader.rollback()
            raise
        finally:
            reader.close()
        # Every row is read: wait for the broker as long as it takes (a slow broker is no
        # reason to throw the snapshot away). On stop, a last bounded wait: if everything
        # was delivered by then the snapshot counts as done and is not redone.
        while self.publisher.flush(1.0) and acks.failure is None:
            if stop.is_set():
                self.publisher.flush(30.0)
                break
        remaining = self.publisher.in_queue()
        if remaining or acks.failure is not None:
            if acks.failure is None:
                log.warning(
                    "%s: stopped with %d snapshot record(s) unacknowledged; the snapshot is "
                    "redone on the next start",
                    self.config.name,
                    remaining,
                )
                return None
            raise DeliveryFailed(f"snapshot: delivery failed: {acks.failure}")
        state.put(SNAPSHOT_KEY, consistent_text)
        state.put(CONFIRMED_KEY, consistent_text)
        log.info("%s: snapshot done: %d row(s) published", self.config.name, rows)
        return consistent

    def _snapshot_version(self) -> int:
        """The row version of snapshot rows: strictly below every change decoding can emit.

        The consistent point is not low enough: a transaction that started before it and
        commits after it is decoded in full, with changes below the point. Decoding reads
        WAL from the slot's restart_lsn on (it only moves forward), so no change it emits
        lies below it, and restart_lsn - 1 is older than every streamed change.
        """
        conn = self._connect()
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                    (self.config.slot_name,),
                )
                row = cur.fetchone()
        finally:
            conn.close()
        if row is None or row[0] is None:
            raise PgOutputError(f"slot {self.config.slot_name} has no restart_lsn after creation")
        return lsn_int(row[0]) - 1

    def _snapshot_id_key(self) -> bytes:
        """The persisted key of the snapshot ids' hashes (a fresh one without state)."""
        return self._state.secret("snapshot_ids") if self._state is not None else os.urandom(32)

    def _snapshot_rows(self, reader: Any, source: str) -> Iterator[tuple[dict[str, object], str]]:
        """The rows of one table (mapped columns as Python values) and each row's key text."""
        from psycopg2 import sql

        schema, table = source.split(".", 1)
        with reader.cursor() as cur:
            cur.execute(
                "SELECT a.attname, a.atttypid, "
                "COALESCE(a.attnum = ANY(i.indkey), false) "
                "FROM pg_attribute a "
                "JOIN pg_class c ON c.oid = a.attrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary "
                "WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 "
                "AND NOT a.attisdropped ORDER BY a.attnum",
                (schema, table),
            )
            columns = cur.fetchall()
        if not columns:
            raise ConfigError(f"unknown table {source} (it was dropped or is not visible)")
        mapped = {c for m in self._by_source[source] for c in m.columns.values()}
        keys = [name for name, _, is_key in columns if is_key]
        selected = [(name, oid) for name, oid, _ in columns if name in mapped or name in keys]
        key_select = (
            sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in keys)
            if keys
            else sql.SQL("ctid::text")
        )
        query = sql.SQL("SELECT {}, {} FROM {}").format(
            key_select,
            sql.SQL(", ").join(
                sql.SQL("{}::text").format(sql.Identifier(name)) for name, _ in selected
            ),
            sql.Identifier(schema, table),
        )
        key_count = max(1, len(keys))
        with reader.cursor(name=f"medstream_snapshot_{self.config.slot_name}") as cur:
            cur.itersize = self.config.snapshot_batch_rows
            cur.execute(query)
            for row in cur:
                key = ",".join("" if v is None else v for v in row[:key_count])
                values: dict[str, object] = {}
                for (name, oid), text in zip(selected, row[key_count:], strict=True):
                    if name in mapped:
                        values[name] = _ParsedOrText(text, oid)
                yield values, key

    # --- streaming -------------------------------------------------------------------------

    def _stream(self, cur: Any, state: CollectorState, start: int, stop: threading.Event) -> None:
        """Stream the slot from ``start`` until ``stop``; confirm positions after acks."""
        cur.start_replication(
            slot_name=self.config.slot_name,
            decode=False,
            start_lsn=start,
            status_interval=5,
            options={"proto_version": "1", "publication_names": self.config.publication_name},
        )
        self._relations.clear()
        self._cursor = cur
        self.streaming = True
        self.metrics.ready.set(1)
        log.info(
            "%s: streaming slot %s from %s",
            self.config.name,
            self.config.slot_name,
            lsn_text(start),
        )
        self._flush_sent = start
        self._acked_upto = self._last_marked = start
        sent = start
        last_feedback = 0.0
        handled = 0
        while not stop.is_set():
            if self._acks.failure is not None:
                raise DeliveryFailed(f"delivery to Kafka failed: {self._acks.failure}")
            if self._must_drain_before_read():
                self._drain(stop)
                continue
            message = cur.read_message()
            if message is not None:
                self._last_data_start = message.data_start
                self._handle(message.payload, message.data_start, stop)
                handled += 1
                if handled % 200:
                    continue
            self._collect_acks()
            if self._transaction is None and self._acks.pending == 0:
                # Nothing in flight: everything the server sent is done, keepalives included.
                self._confirmed = max(self._confirmed, int(cur.wal_end or 0))
            now = time.monotonic()
            if self._confirmed > sent and now - last_feedback >= self.config.feedback_interval_s:
                state.put(CONFIRMED_KEY, lsn_text(self._confirmed))
                self._send_feedback(self._confirmed)
                sent, last_feedback = self._confirmed, now
            self._heartbeat(now)
            if message is None:
                select.select([cur], [], [], 0.1)
        # Stopping: deliver what is in flight, then confirm it.
        self.publisher.flush(30.0)
        self._collect_acks()
        if self._confirmed > sent:
            state.put(CONFIRMED_KEY, lsn_text(self._confirmed))
            self._send_feedback(self._confirmed)

    def _collect_acks(self) -> None:
        """Serve delivery reports; advance the confirmable position to what is acknowledged."""
        self.publisher.poll(0)
        done = self._acks.committable()
        if done is not None:
            self._acked_upto = max(self._acked_upto, done)
            if done > self._confirmed:
                self._confirmed = done

    def _send_feedback(self, flush_lsn: int) -> None:
        """Confirm ``flush_lsn`` (every record up to it is acknowledged) to the server."""
        self._flush_sent = max(self._flush_sent, flush_lsn)
        self._cursor.send_feedback(flush_lsn=flush_lsn, force=True)

    def _must_drain_before_read(self) -> bool:
        """Whether reading on could let psycopg2 confirm records Kafka has not acknowledged.

        psycopg2 moves its flush position to a keepalive's WAL end (and sends it with its
        next status update) whenever the flush position we last gave it is at or above the
        start of the last message read. A transaction that began before a confirmed commit
        has changes below it, so that test can hold while transactions read earlier still
        await acknowledgement; the keepalive's WAL end lies past their commits. We therefore
        read nothing more while the test holds and a finished transaction is unacknowledged.
        With all finished transactions acknowledged the advance is harmless: during an open
        transaction's output the walsender's position is not past that transaction's commit
        record, so the transaction is decoded again after a restart.
        """
        return self._flush_sent >= self._last_data_start and self._last_marked > self._acked_upto

    def _drain(self, stop: threading.Event) -> None:
        """Wait for outstanding acknowledgements (stop-aware), keeping the connection alive."""
        keepalive_at = time.monotonic() + self.config.feedback_interval_s
        while self._last_marked > self._acked_upto:
            if stop.is_set():
                raise _Stopped()
            if self._acks.failure is not None:
                raise DeliveryFailed(f"delivery to Kafka failed: {self._acks.failure}")
            self.publisher.poll(0.1)
            self._collect_acks()
            if time.monotonic() >= keepalive_at:
                self._send_feedback(self._flush_sent)  # already confirmed: safe to repeat
                keepalive_at = time.monotonic() + self.config.feedback_interval_s

    def _heartbeat(self, now: float) -> None:
        """Write a WAL message now and then so the slot advances when this database is idle."""
        interval = self.config.heartbeat_interval_s
        if not interval or now < self._next_heartbeat:
            return
        self._next_heartbeat = now + interval
        import psycopg2

        try:
            if self._heartbeat_conn is None or self._heartbeat_conn.closed:
                self._heartbeat_conn = self._connect()
                self._heartbeat_conn.autocommit = True
            with self._heartbeat_conn.cursor() as cur:
                cur.execute(
                    "SELECT pg_logical_emit_message(false, %s, %s)",
                    (HEARTBEAT_PREFIX, self.config.name),
                )
        except psycopg2.Error as exc:
            log.warning("%s: heartbeat failed: %s", self.config.name, type(exc).__name__)
            self._close_heartbeat()

    def _close_heartbeat(self) -> None:
        if self._heartbeat_conn is not None:
            try:
                self._heartbeat_conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail; nothing to do
                pass
            self._heartbeat_conn = None

    def _handle(self, payload: bytes, data_start: int, stop: threading.Event | None = None) -> None:
        """Act on one pgoutput message read at WAL position ``data_start``."""
        message = decode_pgoutput(payload)
        if isinstance(message, Begin):
            self._transaction = _Transaction(message.xid, message.final_lsn, message.commit_ms)
        elif isinstance(message, Commit):
            self._acks.mark(message.end_lsn)
            self._last_marked = max(self._last_marked, message.end_lsn)
            self._transaction = None
            self.metrics.source_lag.set(max(0.0, (wall_clock_ms() - message.commit_ms) / 1000))
        elif isinstance(message, Relation):
            self._relation(message)
        elif isinstance(message, Insert | Update | Delete):
            self._change(message, data_start, stop)
        elif isinstance(message, Truncate):
            self._truncate(message)

    def _mappings_for(self, relation: Relation) -> list[TableMapping] | None:
        """The mappings of a relation: by its name, or by its OID once seen (follows renames)."""
        source = self._source_by_oid.get(relation.oid)
        if source is not None:
            return self._by_source[source]
        return self._by_source.get(relation.qualified_name)

    def _relation(self, relation: Relation) -> None:
        """Remember a table's shape; report renames, unmapped relations and lost columns."""
        previous = self._relations.get(relation.oid)
        self._relations[relation.oid] = relation
        source = self._source_by_oid.get(relation.oid)
        if source is None and self._state is not None:
            source = self._state.get(f"{RELATION_KEY_PREFIX}{relation.oid}")
            if source is not None and source not in self._by_source:
                source = None  # a table no longer in the configuration
        if source is None and relation.qualified_name in self._by_source:
            source = relation.qualified_name
        if source is None:
            # Reported at its first change: pgoutput also sends the Relation of a partition
            # whose changes it publishes under the (mapped) partitioned table.
            return
        if self._source_by_oid.get(relation.oid) != source:
            self._source_by_oid[relation.oid] = source
            if self._state is not None:
                self._state.put(f"{RELATION_KEY_PREFIX}{relation.oid}", source)
        if relation.qualified_name != source:
            log.warning(
                "%s: mapped table %s is now named %s (same relation %d); its changes are "
                "still mapped as %s: update the configuration",
                self.config.name,
                source,
                relation.qualified_name,
                relation.oid,
                source,
            )
        mappings = self._by_source[source]
        names = {c.name for c in relation.columns}
        if previous is not None:
            before = {c.name for c in previous.columns}
            added, lost = sorted(names - before), sorted(before - names)
            if added:
                log.info(
                    "%s: %s gained column(s) %s; the mapping is unaffected",
                    self.config.name,
                    relation.qualified_name,
                    ", ".join(added),
                )
            if lost:
                log.info(
                    "%s: %s lost column(s) %s",
                    self.config.name,
                    relation.qualified_name,
                    ", ".join(lost),
                )
        mapped_columns = {c for m in mappings for c in m.columns.values()}
        if relation.replica_identity != "f":
            toastable = sorted(
                c.name
                for c in relation.columns
                if c.name in mapped_columns and c.type_oid not in _FIXED_LENGTH_TYPES
            )
            if toastable:
                log.error(
                    "%s: ALERT %s has REPLICA IDENTITY %s, not FULL: an update that leaves "
                    "a TOASTed value of %s unchanged cannot be published and goes to the "
                    "dead-letter topic (ALTER TABLE %s REPLICA IDENTITY FULL)",
                    self.config.name,
                    relation.qualified_name,
                    {"d": "DEFAULT", "n": "NOTHING", "i": "USING INDEX"}.get(
                        relation.replica_identity, relation.replica_identity
                    ),
                    ", ".join(toastable),
                    relation.qualified_name,
                )
        for mapping in mappings:
            missing = [c for c in mapping.columns.values() if c not in names]
            if missing:
                log.error(
                    "%s: ALERT schema change: %s has no mapped column %s any more "
                    "(mapped to %s); its changes go to the dead-letter topic until the "
                    "mapping is fixed",
                    self.config.name,
                    relation.qualified_name,
                    ", ".join(missing),
                    mapping.target,
                )

    def _report_unmapped(self, relation: Relation) -> None:
        """A published table no mapping knows changed: ERROR and count, once per relation."""
        if relation.oid in self._unmapped_reported:
            return
        self._unmapped_reported.add(relation.oid)
        self.metrics.failed("unmapped_relation").inc()
        log.error(
            "%s: ALERT %s (relation %d) is published but no table mapping names it; "
            "its changes are not collected (map it, or remove it from publication %s)",
            self.config.name,
            relation.qualified_name,
            relation.oid,
            self.config.publication_name,
        )

    def _change(
        self,
        message: Insert | Update | Delete,
        change_lsn: int,
        stop: threading.Event | None = None,
    ) -> None:
        relation = self._relations.get(message.relation_oid)
        if relation is None:
            raise PgOutputError(f"change of relation {message.relation_oid} before its Relation")
        transaction = self._transaction
        if transaction is None:
            raise PgOutputError("row change outside a transaction")
        transaction.changes += 1
        mappings = self._mappings_for(relation)
        if not mappings:
            self._report_unmapped(relation)
            return
        self.metrics.read.inc()
        names = [c.name for c in relation.columns]

        def image(values: tuple[TupleValue, ...] | None) -> dict[str, TupleValue] | None:
            return None if values is None else dict(zip(names, values, strict=False))

        # Unchanged TOASTed values can only be taken from a full old row ('O'); a key-only
        # old tuple ('K') holds nulls for them, which would erase the value downstream.
        full_old: dict[str, TupleValue] | None = None
        if isinstance(message, Insert):
            op, before, after = "c", None, image(message.new)
        elif isinstance(message, Update):
            op, before, after = "u", image(message.old), image(message.new)
            if not message.old_is_key:
                full_old = before
        else:
            op, before, after = "d", image(message.old), None
        # The change's own WAL position is its version, also for a transaction that was
        # open across the snapshot's consistent point: snapshot rows are versioned below
        # every position decoding emits (see _snapshot_version).
        seq = change_lsn
        commit_text = lsn_text(transaction.commit_lsn)
        for mapping in mappings:
            emitted = transaction.records_at.get(change_lsn, 0)
            transaction.records_at[change_lsn] = emitted + 1
            message_id = f"{self.config.source_system}:{lsn_text(change_lsn)}"
            if emitted:
                message_id += f":{emitted}"
            self._wait_for_room(self._acks, stop)
            self._publish(
                mapping,
                op,
                self._typed(relation, before),
                self._typed(relation, after, fallback=full_old),
                message_id,
                commit_text,
                seq,
                transaction.xid,
                transaction.commit_ms,
                self._acks,
                relation=relation,
            )

    def _typed(
        self,
        relation: Relation,
        values: dict[str, TupleValue] | None,
        fallback: dict[str, TupleValue] | None = None,
    ) -> dict[str, object] | None:
        """A decoded image with each value paired with its type, for lazy parsing."""
        if values is None:
            return None
        types = {c.name: c.type_oid for c in relation.columns}
        typed: dict[str, object] = {}
        for name, value in values.items():
            if isinstance(value, Unchanged):
                old = (fallback or {}).get(name)
                value = old if isinstance(old, str | None) and fallback is not None else value
            typed[name] = (
                value if isinstance(value, Unchanged) else _ParsedOrText(value, types[name])
            )
        return typed

    def _truncate(self, message: Truncate) -> None:
        """A TRUNCATE of a mapped table cannot be represented as row changes: dead-letter it."""
        for oid in message.relation_oids:
            relation = self._relations.get(oid)
            if relation is None:
                continue
            if not self._mappings_for(relation):
                self._report_unmapped(relation)
                continue
            reason = (
                f"{relation.qualified_name} was truncated; row deletes are not published "
                "for a TRUNCATE"
            )
            log.error("%s: %s", self.config.name, reason)
            original = json.dumps({"table": relation.qualified_name, "op": "truncate"}).encode()
            self.publisher.dead_letter(
                "truncate",
                reason,
                original,
                self._acks.track(),
                organisation_id=self.config.organisation_id,
            )

    # --- publishing ------------------------------------------------------------------------

    def _wait_for_room(self, acks: OrderedAcks[int], stop: threading.Event | None = None) -> None:
        """Back-pressure: serve deliveries while too many records await acknowledgement.

        Raises _Stopped when ``stop`` is set meanwhile. While streaming, the replication
        connection is kept alive by repeating the already confirmed position (safe: it
        confirms nothing new), so a long broker outage does not trip wal_sender_timeout.
        """
        self.publisher.poll(0)
        keepalive_at = time.monotonic() + self.config.feedback_interval_s
        while acks.in_flight >= self.config.max_in_flight:
            if stop is not None and stop.is_set():
                raise _Stopped()
            if acks.failure is not None:
                raise DeliveryFailed(f"delivery to Kafka failed: {acks.failure}")
            self.publisher.poll(0.1)
            if self.streaming and time.monotonic() >= keepalive_at:
                self._send_feedback(self._flush_sent)
                keepalive_at = time.monotonic() + self.config.feedback_interval_s

    def _publish(
        self,
        mapping: TableMapping,
        op: str,
        before: Mapping[str, object] | None,
        after: Mapping[str, object] | None,
        message_id: str,
        source_position: str,
        position_seq: int,
        transaction_id: int | None,
        commit_ms: int,
        acks: OrderedAcks[int],
        relation: Relation | None = None,
    ) -> None:
        """Map one row change and publish it, or dead-letter it with the reason."""
        try:
            mapped_before = None if before is None else self._map(mapping, before)
            mapped_after = None if after is None else self._map(mapping, after)
        except UnmappableRow as exc:
            # WARNING per change; the ERROR alert is logged once per relation change.
            log.warning(
                "%s: change %s of %s dead-lettered (%s)",
                self.config.name,
                message_id,
                mapping.source,
                exc.reason_code,
            )
            original = {
                "message_id": message_id,
                "table": mapping.source,
                "op": op,
                "source_position": source_position,
                "before": _source_text(before),
                "after": _source_text(after),
            }
            self.publisher.dead_letter(
                exc.reason_code,
                exc.reason,
                json.dumps(original, sort_keys=True).encode(),
                acks.track(),
                organisation_id=self.config.organisation_id,
                original_key=message_id.encode(),
            )
            return
        key_image = mapped_after if mapped_after is not None else mapped_before or {}
        record = {
            "message_id": message_id,
            "organisation_id": self.config.organisation_id,
            "source_system": self.config.source_system,
            "op": op,
            "table": mapping.target,
            "before": mapped_before,
            "after": mapped_after,
            "source_position": source_position,
            "position_seq": position_seq,
            "transaction_id": transaction_id,
            "commit_time": commit_ms,
            "captured_time": max(wall_clock_ms(), commit_ms),
        }
        self.publisher.publish(self._key(mapping, key_image), record, acks.track())

    def _map(self, mapping: TableMapping, image: Mapping[str, object]) -> dict[str, str | None]:
        """Parse the mapped columns of an image and map them (raises UnmappableRow)."""
        values: dict[str, object] = {}
        for target_field, column in mapping.columns.items():
            if column not in image:
                continue  # map_row names every missing column
            value = image[column]
            if isinstance(value, Unchanged):
                raise UnmappableRow(
                    "toast_unavailable",
                    f"{mapping.source}.{column} (mapped to {mapping.target}.{target_field}) "
                    "is an unchanged TOASTed value the server did not send; set REPLICA "
                    "IDENTITY FULL on the table",
                )
            if isinstance(value, _ParsedOrText):
                try:
                    value = parse_text_value(value.text, value.type_oid, self._zone)
                except ValueError:
                    raise UnmappableRow(
                        "unrenderable_value",
                        f"{mapping.source}.{column} (mapped to {mapping.target}.{target_field})"
                        " holds a value with no ISO form (e.g. infinity)",
                    ) from None
            values[column] = value
        return map_row(mapping, values)

    def _key(self, mapping: TableMapping, image: Mapping[str, str | None]) -> bytes:
        """Partition key: one patient's changes (or else one row's) stay in order."""
        mrn = image.get("patient_mrn")
        if mrn:
            return f"{self.config.organisation_id}:{mrn}".encode()
        first = next(iter(mapping.columns), "")
        return f"{self.config.organisation_id}:{mapping.target}:{image.get(first)}".encode()


class _Stopped(Exception):
    """``stop`` was set while waiting for the broker; the caller unwinds without confirming."""


@dataclass(frozen=True, slots=True)
class _ParsedOrText:
    """A column value as the server's text plus its type OID; parsed only when mapped."""

    text: str | None
    type_oid: int


def _connection_lost(error: Any) -> bool:
    """Whether a psycopg2 error means the server went away (or is busy), not a bad request.

    A broken replication stream surfaces as a DatabaseError without SQLSTATE ("no COPY in
    progress"); the server's own codes for it are classes 08 (connection), 57 (shutdown,
    restart) and 55006 (the slot is still held by the previous connection).
    """
    import psycopg2

    if isinstance(error, psycopg2.InterfaceError):
        return True
    code = getattr(error, "pgcode", None)
    if code is None:
        return True
    return code[:2] in ("08", "53", "57") or code == "55006"


def _first_line(error: BaseException) -> str:
    """The first line of an error message (server messages carry DETAIL/HINT lines)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _source_text(image: Mapping[str, object] | None) -> dict[str, str | None] | None:
    """A source image as text, for a dead letter's original value."""
    if image is None:
        return None
    shown: dict[str, str | None] = {}
    for column, value in image.items():
        if isinstance(value, _ParsedOrText):
            shown[column] = value.text
        elif isinstance(value, Unchanged):
            shown[column] = "<unchanged toast>"
        else:
            shown[column] = None if value is None else str(value)
    return shown
