"""The audit trail: every sign-in, query, alert action and configuration change, append-only.

An audit event goes where every other medstream fact goes: to a Kafka topic (``audit``),
from which the sink stores it in ClickHouse's ``audit_log``. Recording waits for the
broker's acknowledgement, and whoever records fails closed: a query whose audit event was
not accepted shows no rows, an action that could not be audited is not taken. A command
that owns the embedded engine itself (no running pipeline, no Kafka) inserts the event
directly instead.

The broker takes records from anyone who can reach it, so each audit record carries an
HMAC of its key and value under the audit key (``medstream.keys.AUDIT_KEY``) in a Kafka
header; the sink stores only records whose code matches and dead-letters the others.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import logging
import queue
import struct
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from confluent_kafka import KafkaException, Producer

from medstream.clickhouse import QueryResult, sql_string
from medstream.settings import FACT_TOPICS, KafkaSettings
from schemas import serde

if TYPE_CHECKING:
    from streams.reloading import Reload, Stamp

log = logging.getLogger("medstream.audit")

ACTIONS: Final = (
    "sign_in", "sign_in_failed", "sign_out", "query", "alert_acknowledge", "alert_resolve",
    "config_change", "request_refused", "audit_read", "dead_letter_open",
    "dead_letter_replay",
)
#: ``requested`` is an alert action recorded before it is sent (fail closed); the row of its
#: real outcome follows: ok, refused, failed (not sent) or unconfirmed (sent, no answer in
#: time: it stays queued and may still be applied).
OUTCOMES: Final = ("ok", "refused", "failed", "requested", "unconfirmed")
CHANNELS: Final = ("console", "http", "cli", "workers")
#: The longest detail kept: room for a whole query (medstream.sqlcheck.MAX_QUERY_CHARS)
#: and the reason it was refused, so the text audited is the text that ran. Only a query
#: refused for its length is cut (and says so); its digest covers the whole text.
MAX_DETAIL: Final = 100_000
COLUMNS: Final = (
    "event_time", "actor", "actor_role", "channel", "action", "outcome", "target", "rows",
    "client_address", "detail",
)


#: Kafka header holding an audit record's authentication code.
AUDIT_MAC_HEADER: Final = "medstream-audit-mac"
_MAC_LABEL: Final = b"medstream.audit.mac.v1"
_LENGTH: Final = struct.Struct(">I")


def audit_mac(key: bytes, record_key: bytes | None, value: bytes) -> bytes:
    """The authentication code of one audit record: HMAC-SHA256 under the audit key over
    its Kafka key and value (length-prefixed, so no bytes can move between the two)."""
    mac = hmac.new(key, _MAC_LABEL, hashlib.sha256)
    for part in (record_key or b"", value):
        mac.update(_LENGTH.pack(len(part)) + part)
    return mac.digest()


def audit_refusal(
    key: bytes, record_key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]
) -> tuple[str, str] | None:
    """Why an audit record must not be stored, as (``no_code`` or ``wrong_code``, reason),
    or None when it was written by a holder of the audit key."""
    codes = [v for name, v in headers if name == AUDIT_MAC_HEADER]
    if not codes:
        return "no_code", (
            f"unauthenticated audit record: no {AUDIT_MAC_HEADER} header (medstream's audit "
            "writers always add one; this record was produced by something else)"
        )
    if len(codes) > 1 or not hmac.compare_digest(codes[0], audit_mac(key, record_key, value)):
        return "wrong_code", (
            f"unauthenticated audit record: its {AUDIT_MAC_HEADER} does not match (forged or "
            "altered, or written with another MEDSTREAM_AUDIT_KEY than the sink's)"
        )
    return None


class AuditError(RuntimeError):
    """An audit event was not recorded, so the audited action must not proceed."""


def statement_digest(sql: str) -> str:
    """``sha256:<hex>`` of a statement exactly as it was run (the audit event's target), so
    the stored text can be matched with what ran even where it was de-identified."""
    return "sha256:" + hashlib.sha256(sql.encode()).hexdigest()


def local_actor() -> str:
    """The audit name of an operator at a shell of the engine's machine."""
    try:
        return f"local:{getpass.getuser()}"
    except Exception:  # no user name in a bare container
        return "local:unknown"


def audit_event(
    actor: str,
    actor_role: str,
    channel: str,
    action: str,
    outcome: str,
    target: str = "",
    detail: str = "",
    rows: int | None = None,
    client_address: str = "",
) -> dict[str, Any]:
    """One audit record, checked against the fixed vocabularies."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown audit outcome {outcome!r}")
    if channel not in CHANNELS:
        raise ValueError(f"unknown audit channel {channel!r}")
    if len(detail) > MAX_DETAIL:
        detail = detail[:MAX_DETAIL] + f" ... [cut: {len(detail)} characters]"
    return {
        "audit_id": str(uuid.uuid4()),
        "event_time": int(time.time() * 1000),
        "actor": actor,
        "actor_role": actor_role,
        "channel": channel,
        "action": action,
        "outcome": outcome,
        "target": target,
        "detail": detail,
        "rows": rows,
        "client_address": client_address,
    }


class AuditTrail:
    """Records audit events on the ``audit`` topic (or straight into ``audit_log``)."""

    def __init__(
        self,
        kafka: KafkaSettings | None,
        registry: serde.SchemaRegistry | None = None,
        insert: Callable[[dict[str, Any]], None] | None = None,
        timeout_s: float = 10.0,
        key: bytes | None = None,
    ) -> None:
        """``kafka`` to publish, each record authenticated with the audit ``key``; without
        Kafka, ``insert`` stores the event directly."""
        if kafka is None and insert is None:
            raise ValueError("an audit trail needs Kafka or a direct insert")
        if kafka is not None and not key:
            raise ValueError("an audit trail on Kafka needs the audit key (MEDSTREAM_AUDIT_KEY)")
        self._key = key or b""
        self.timeout_s = timeout_s
        self._insert = insert
        self._producer: Producer | None = None
        self._lock = threading.Lock()
        if kafka is not None:
            self.topic = kafka.topic(FACT_TOPICS["audit_log"])
            self._serialize = serde.AvroSerializer(
                registry or serde.ManifestRegistry(), serde.AUDIT_EVENT
            )
            self._producer = Producer(
                kafka.librdkafka(acks="all", **{"enable.idempotence": True, "linger.ms": 0})
            )

    def record(self, **fields: Any) -> dict[str, Any]:
        """Record one event and wait until it is durable; AuditError when it is not."""
        event = audit_event(**fields)
        if self._producer is None:
            assert self._insert is not None
            try:
                self._insert(event)
            except Exception as exc:
                raise AuditError(f"the audit event was not stored ({exc})") from exc
            return event
        errors: list[str] = []
        delivered = threading.Event()

        def on_delivery(error: Any, _message: Any) -> None:
            if error is not None:
                errors.append(str(error))
            delivered.set()

        try:
            record_key, value = event["audit_id"].encode(), self._serialize(event)
            with self._lock:
                self._producer.produce(
                    self.topic, key=record_key, value=value, on_delivery=on_delivery,
                    headers=[(AUDIT_MAC_HEADER, audit_mac(self._key, record_key, value))],
                )
                deadline = time.monotonic() + self.timeout_s
                while not delivered.is_set() and time.monotonic() < deadline:
                    self._producer.poll(0.05)
        except (BufferError, KafkaException, serde.SerializationError) as exc:
            raise AuditError(f"the audit event was not delivered ({exc})") from exc
        if not delivered.is_set():
            raise AuditError("the audit event was not acknowledged by Kafka in time")
        if errors:
            raise AuditError(f"the audit event was not delivered ({errors[0]})")
        return event

    def close(self) -> None:
        """Flush and release the producer."""
        if self._producer is not None:
            self._producer.flush(self.timeout_s)


class BackgroundAudit:
    """Records events from a background thread, for callers that must not wait (a Faust
    worker's event loop). The change it records has already happened, so a failure to
    record it is logged as an error, not raised."""

    def __init__(self, trail: AuditTrail) -> None:
        self._trail = trail
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._run, name="audit", daemon=True).start()

    def record(self, **fields: Any) -> None:
        """Queue one event."""
        self._queue.put(fields)

    def _run(self) -> None:
        while True:
            fields = self._queue.get()
            try:
                self._trail.record(**fields)
            except Exception as exc:  # the thread must outlive any one failure
                log.error("an audit event (%s) was not recorded: %s", fields.get("action"), exc)
            finally:
                self._queue.task_done()

    def drain(self, timeout_s: float = 10.0) -> None:
        """Wait (bounded) until every queued event was recorded or reported."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)


def config_change_recorder(audit: BackgroundAudit, actor: str) -> Callable[[Reload], None]:
    """A reload listener (``streams.reloading.on_reload``) that records each loaded or
    refused change of a rules or dictionary file as a ``config_change``, naming the files
    that changed. Two rule families of one worker can watch the same file: the same change
    (equal file stamps) is recorded once, while every later edit, even one that keeps the
    version, is recorded again."""
    seen: set[tuple[str, str, Stamp]] = set()

    def record(change: Reload) -> None:
        key = (str(change.path), change.outcome, change.stamp)
        if key in seen:
            return
        seen.add(key)
        audit.record(
            actor=actor, actor_role="operator", channel="workers", action="config_change",
            outcome="ok" if change.outcome == "loaded" else "refused",
            target="file:" + ",".join(change.changed),
            detail=f"{change.name} {change.outcome}: {change.detail}",
        )

    return record


def direct_insert(client: Any, database: str) -> Callable[[dict[str, Any]], None]:
    """An insert of one audit event into ``audit_log`` through an engine this process owns."""
    from datetime import UTC, datetime

    def insert(event: dict[str, Any]) -> None:
        row = dict(event, event_time=datetime.fromtimestamp(event["event_time"] / 1000, tz=UTC))
        client.insert(f"{database}.audit_log", [list(row.values())], column_names=list(row))

    return insert


def audit_query(
    database: str,
    since_ms: int | None = None,
    actor: str | None = None,
    action: str | None = None,
    limit: int = 200,
) -> str:
    """The SQL of `medstream audit`: newest events first, optionally filtered."""
    where = []
    if since_ms is not None:
        where.append(f"event_time >= fromUnixTimestamp64Milli({int(since_ms)}, 'UTC')")
    if actor:
        where.append(f"actor = {sql_string(actor)}")
    if action:
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r} (actions: {', '.join(ACTIONS)})")
        where.append(f"action = {sql_string(action)}")
    clause = f"WHERE {' AND '.join(where)} " if where else ""
    # An event read twice by a restarted sink is stored twice (plain MergeTree): it is
    # shown once.
    return (
        f"SELECT {', '.join(COLUMNS)} FROM {database}.audit_log {clause}"
        f"ORDER BY event_time DESC, audit_id LIMIT 1 BY audit_id LIMIT {int(limit)}"
    )


def rows_of(result: QueryResult) -> list[dict[str, Any]]:
    """Query rows as dictionaries."""
    return [dict(zip(result.columns, row, strict=True)) for row in result.rows]
