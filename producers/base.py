"""The edge-collector framework: publish raw Avro records, commit source positions after acks.

Every collector (one module and one class per source kind, see ``producers/__init__.py``)
reads its source, turns each source-native unit into one raw record of the contract in
``schemas/avro`` and publishes it with :class:`RawPublisher` (idempotent producer,
acks=all). A source position is committed only once the broker acknowledged every record
read before it: :class:`OrderedAcks` turns out-of-order delivery reports into the last
position that is safe to commit. Input the collector cannot accept goes to the dead-letter
topic with a reason (stage ``producer``), so it is counted, never silently dropped.

Configuration is one YAML file per collector, validated with pydantic before anything
connects; ``${VAR}`` and ``${VAR:-default}`` in it are read from the environment, so
passwords stay out of the file.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import yaml
from confluent_kafka import KafkaError, KafkaException
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medstream.metrics import (
    COLLECTOR_FAILED,
    COLLECTOR_PUBLISHED,
    COLLECTOR_READ,
    COLLECTOR_SOURCE_LAG,
    DEAD_LETTERS,
    READY,
    RECORDS_OUT,
    labelled,
)
from medstream.published import (
    FLUSH_INTERVAL_S,
    PUBLISHED_FILE,
    PublishedLedger,
    new_run_id,
    register_counter_file,
)
from medstream.settings import DLQ_TOPIC, RAW_TOPICS, KafkaSettings, RuntimeSettings
from schemas.identity import dead_letter_id
from schemas.serde import (
    COLLECTOR_HEADER,
    DEAD_LETTER,
    RAW_SUBJECT_BY_KIND,
    RUN_HEADER,
    AvroSerializer,
    SchemaRegistry,
)

log = logging.getLogger("medstream.collector")

#: Dead letters written by a collector carry this stage.
STAGE = "producer"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def wall_clock_ms() -> int:
    """Milliseconds since the epoch, UTC."""
    return time.time_ns() // 1_000_000


# --- configuration ------------------------------------------------------------------------


class ConfigError(ValueError):
    """A collector configuration (or the source it describes) is unusable; says where and why."""


class CollectorConfig(BaseModel):
    """Settings every collector has; a kind's own model extends it."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(description="collector kind, e.g. postgres, mllp")
    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$",
        description="unique collector name: metric label, state directory, lineage",
    )
    organisation_id: str = Field(min_length=1, description="organisation that owns the source")
    source_system: str = Field(min_length=1, description="source system named in raw records")
    state_dir: Path | None = Field(
        default=None, description="where positions are kept (default: DATA_DIR/collectors/NAME)"
    )


def _expand_env(value: Any, path: Path) -> Any:
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            found = os.environ.get(name)
            if found is not None:
                return found
            if default is not None:
                return default
            raise ConfigError(f"{path}: environment variable {name} is not set")

        return _ENV_REF.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, path) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, path) for v in value]
    return value


C = TypeVar("C", bound=CollectorConfig)


def load_config(path: Path, model: type[C]) -> C:
    """Read and validate one collector configuration file; errors name the file and field."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    data = _expand_env(data, path)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from None


# --- ordered acknowledgement --------------------------------------------------------------

P = TypeVar("P")


class OrderedAcks(Generic[P]):
    """Source positions in read order; says which one is safe to commit.

    Call :meth:`track` for every published record (it returns the delivery callback) and
    :meth:`mark` after the last record of a committable unit (a transaction, a message, a
    file) with that unit's position. :meth:`committable` returns the latest marked position
    whose records, and all records before them, were acknowledged. Thread-safe: delivery
    callbacks may run on another thread than the reader.
    """

    def __init__(self) -> None:
        self._entries: deque[list[Any]] = deque()  # [position or _RECORD, done]
        self._lock = threading.Lock()
        self.failure: str | None = None
        self.in_flight = 0

    _RECORD: ClassVar[object] = object()

    def track(self) -> Callable[[Any], None]:
        """Register one record in flight; returns the callback taking the delivery error."""
        entry = [self._RECORD, False]
        with self._lock:
            self._entries.append(entry)
            self.in_flight += 1

        def done(error: Any) -> None:
            with self._lock:
                self.in_flight -= 1
                if error is None:
                    entry[1] = True
                elif self.failure is None:
                    self.failure = str(error)

        return done

    def mark(self, position: P) -> None:
        """The records tracked so far complete a unit whose commit position is ``position``."""
        with self._lock:
            self._entries.append([position, True])

    def committable(self) -> P | None:
        """The newest position safe to commit now (None: nothing new); removes it and earlier."""
        latest: P | None = None
        with self._lock:
            while self._entries and self._entries[0][1]:
                position = self._entries.popleft()[0]
                if position is not self._RECORD:
                    latest = position
        return latest

    @property
    def pending(self) -> int:
        """Entries not yet released by :meth:`committable`."""
        with self._lock:
            return len(self._entries)


# --- publishing ---------------------------------------------------------------------------


class DeliveryFailed(RuntimeError):
    """The broker did not acknowledge a record; its source position must not be committed."""


class RecordTooLarge(DeliveryFailed):
    """A record is larger than Kafka accepts: retrying cannot help, the input must be rejected
    (answered as an error and dead-lettered, which :meth:`RawPublisher.dead_letter` can
    always do because it cuts the original value to :data:`MAX_DEAD_LETTER_BYTES`)."""


class SourceUnavailable(RuntimeError):
    """The source (database, MQTT broker, directory) cannot be reached right now: the
    collector exits 1 and is restarted with backoff, unlike a ConfigError (exit 2)."""


#: Largest raw record a collector should accept; librdkafka's message.max.bytes (1 000 000
#: by default, as is Kafka's per-topic limit) less room for the key, headers and framing.
MAX_RECORD_BYTES = 950_000
#: A dead letter keeps at most this much of the original input.
MAX_DEAD_LETTER_BYTES = 512 * 1024
MAX_REASON_CHARS = 4000


class RawPublisher:
    """Publishes one collector's raw records and dead letters (confluent-kafka, acks=all).

    Delivery callbacks run inside :meth:`poll` / :meth:`flush`, on the calling thread.
    With a ``ledger`` every acknowledged raw record's position is also counted on disk
    (see :mod:`medstream.published`), a count `medstream reconcile` holds against the sink's:
    a raw record's ``on_result`` is then called only after its count is written
    (synchronously, once per poll that delivered something), so no source position is
    committed and no sender answered for a record a crash could leave uncounted. While the
    counter cannot be written those results wait (and :meth:`flush` counts them as not
    acknowledged); each poll tries again.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        registry: SchemaRegistry,
        source_kind: str,
        collector: str,
        producer: Any = None,
        ledger: PublishedLedger | None = None,
    ) -> None:
        from confluent_kafka import Producer

        if source_kind not in RAW_TOPICS:
            raise ValueError(f"unknown source kind {source_kind!r}")
        self.source_kind = source_kind
        self.collector = collector
        self.topic = kafka.topic(RAW_TOPICS[source_kind])
        self.dlq_topic = kafka.topic(DLQ_TOPIC)
        self._serialize = AvroSerializer(registry, RAW_SUBJECT_BY_KIND[source_kind])
        self._serialize_dead_letter = AvroSerializer(registry, DEAD_LETTER)
        self.ledger = ledger
        # Results of acknowledged raw records, held until the ledger has them on disk.
        self._unsettled: list[tuple[Callable[[Any], None], Any]] = []
        self._headers: list[tuple[str, str | bytes | None]] = [
            (COLLECTOR_HEADER, collector.encode())
        ]
        if ledger is not None:
            self._headers.append((RUN_HEADER, ledger.run_id.encode()))
        self._producer = producer if producer is not None else Producer(kafka.producer_config())
        self._published = labelled(COLLECTOR_PUBLISHED, collector)
        self._out = labelled(RECORDS_OUT, "collector", self.topic)

    def encode(self, record: dict[str, Any]) -> bytes:
        """The Confluent-framed Avro bytes of a raw record (raises SerializationError)."""
        return self._serialize(record)

    def publish(
        self,
        key: str | bytes | None,
        record: dict[str, Any] | bytes,
        on_result: Callable[[Any], None],
    ) -> None:
        """Produce one raw record (a dict is encoded first); ``on_result(error or None)``."""
        value = record if isinstance(record, bytes) else self._serialize(record)

        def delivered(error: Any, message: Any) -> None:
            if error is None:
                self._published.inc()
                self._out.inc()
                if self.ledger is not None and message is not None:
                    self.ledger.acknowledged(
                        self.topic, message.partition(), message.offset(), message.timestamp()[1]
                    )
            else:
                labelled(COLLECTOR_FAILED, self.collector, "delivery_failed").inc()
                log.error("%s: delivery to %s failed: %s", self.collector, self.topic, error)
            if self.ledger is None:
                on_result(error)
            else:
                self._unsettled.append((on_result, error))

        self._produce(self.topic, key, value, delivered)

    def dead_letter(
        self,
        reason_code: str,
        reason: str,
        original_value: bytes,
        on_result: Callable[[Any], None],
        *,
        organisation_id: str | None = None,
        original_key: bytes | None = None,
        received_ms: int | None = None,
        record_index: int | None = None,
        record_count: int | None = None,
        refusal: str | None = None,
        count_failure: bool = True,
    ) -> str:
        """Publish a dead letter for input this collector could not accept; returns its id.

        The input never reached a raw topic, so its original position is ``collector/NAME``
        with, as offset, a fingerprint of the input and the reason: the same bad input sent
        again (a resend after a lost answer, a retried batch) gets the same id and collapses
        downstream. Values over :data:`MAX_DEAD_LETTER_BYTES` keep their first part only,
        and a long reason is cut, so a dead letter always fits in a Kafka record.
        ``refusal`` is for a refusal whose input is not kept (too large, too fast): what
        tells it from another one (sender, receive time), as the empty value cannot.
        ``count_failure`` False: the input it stands for was counted as failed already (a
        summary of held refusals, see :class:`RefusalBudget`).
        """
        now_ms = wall_clock_ms()
        received = received_ms if received_ms is not None else now_ms
        fingerprint = hashlib.blake2b(digest_size=8)
        fingerprint.update(reason_code.encode())
        fingerprint.update(b"\0")
        fingerprint.update(original_value)
        if refusal is not None:
            fingerprint.update(b"\0" + refusal.encode())
        sequence = int.from_bytes(fingerprint.digest(), "big") >> 1  # a non-negative long
        origin = f"collector/{self.collector}"
        dlq_id = dead_letter_id(STAGE, origin, 0, sequence, record_index, 0)
        if len(original_value) > MAX_DEAD_LETTER_BYTES:
            original_value = original_value[:MAX_DEAD_LETTER_BYTES]
            reason += f" (original value cut to its first {MAX_DEAD_LETTER_BYTES} bytes)"
        if len(reason) > MAX_REASON_CHARS:
            marker = " ... (more cut)"
            reason = reason[: MAX_REASON_CHARS - len(marker)] + marker
        value = self._serialize_dead_letter(
            {
                "dlq_id": dlq_id,
                "stage": STAGE,
                "reason_code": reason_code,
                "reason": reason,
                "source_kind": self.source_kind,
                "organisation_id": organisation_id,
                "original_topic": origin,
                "original_partition": 0,
                "original_offset": sequence,
                "record_index": record_index,
                "record_count": record_count,
                "original_key": original_key,
                "original_value": original_value,
                "ingest_time": received,
                "failed_time": now_ms,
            }
        )
        if count_failure:
            labelled(COLLECTOR_FAILED, self.collector, reason_code).inc()
        labelled(DEAD_LETTERS, STAGE, reason_code).inc()

        def delivered(error: Any, _message: Any) -> None:
            if error is not None:
                log.error("%s: dead letter to %s failed: %s", self.collector, self.dlq_topic, error)
            on_result(error)

        self._produce(self.dlq_topic, original_key, value, delivered)
        return dlq_id

    def _produce(
        self,
        topic: str,
        key: str | bytes | None,
        value: bytes,
        delivered: Callable[[Any, Any], None],
    ) -> None:
        while True:
            try:
                self._producer.produce(
                    topic, key=key, value=value, headers=self._headers, on_delivery=delivered
                )
                return
            except BufferError:  # local queue full: serve deliveries, then retry
                self._producer.poll(0.05)
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                if getattr(error, "code", lambda: None)() == KafkaError.MSG_SIZE_TOO_LARGE:
                    raise RecordTooLarge(
                        f"{len(value)} bytes exceed the Kafka record size limit"
                    ) from None
                raise DeliveryFailed(f"the producer refused the record: {error}") from None

    def poll(self, timeout: float = 0.0) -> int:
        """Serve delivery callbacks (waits up to ``timeout`` for one)."""
        served = int(self._producer.poll(timeout))
        self._settle()
        return served

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for every record in flight; returns how many are still unacknowledged
        (including acknowledged ones whose count could not be written within ``timeout``)."""
        deadline = time.monotonic() + timeout
        left = int(self._producer.flush(timeout))
        unsettled = self._settle()
        while unsettled and time.monotonic() < deadline:  # the counter write is retried
            self._producer.poll(min(FLUSH_INTERVAL_S, max(0.0, deadline - time.monotonic())))
            unsettled = self._settle()
        return left + unsettled

    def _settle(self) -> int:
        """Write the counts of the records acknowledged since the last call, then hand their
        results on; returns how many results still wait for a successful write."""
        if not self._unsettled:
            return 0
        assert self.ledger is not None
        if not self.ledger.flush():  # logged and counted by the ledger; retried next poll
            return len(self._unsettled)
        settled, self._unsettled = self._unsettled, []
        for on_result, error in settled:
            on_result(error)
        return 0

    def cluster_id(self) -> str:
        """The id of the Kafka cluster this publisher writes to (asks the broker)."""
        return str(self._producer.list_topics(timeout=10).cluster_id or "")

    def in_queue(self) -> int:
        """Records produced but not yet acknowledged or failed, or whose count is not
        written yet (their results are still held)."""
        return len(self._producer) + len(self._unsettled)


class AsyncPublisher:
    """:class:`RawPublisher` for asyncio collectors: awaitable deliveries, bounded in flight.

    A thread serves the producer's delivery callbacks and resolves the waiting futures on
    the event loop. ``max_in_flight`` bounds memory: :meth:`try_reserve` fails instead of
    queueing when it is reached, which the listeners turn into back-pressure (HTTP 503,
    MQTT not acknowledged, MLLP waits).
    """

    def __init__(self, publisher: RawPublisher, max_in_flight: int = 10_000) -> None:
        self.publisher = publisher
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._pending: set[asyncio.Future[None]] = set()
        #: Set when delivery reports can no longer be served: every publish then fails.
        self.broken: DeliveryFailed | None = None

    def start(self) -> None:
        """Start serving delivery callbacks (call from inside the running event loop)."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._serve, name="delivery", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                self.publisher.poll(0.05)
            except Exception as exc:  # a delivery callback raised: deliveries can't be trusted
                log.exception("%s: delivery report handling failed", self.publisher.collector)
                labelled(COLLECTOR_FAILED, self.publisher.collector, "delivery_callback").inc()
                self.broken = DeliveryFailed(f"delivery report handling failed: {exc!r}")
                self._fail_pending()
                return

    def _fail_pending(self) -> None:
        """Fail every publish still waiting, so its sender gets no ACK and retries."""
        loop, broken = self._loop, self.broken
        if loop is None or broken is None or loop.is_closed():
            return

        def fail_all() -> None:
            for future in list(self._pending):
                if not future.done():
                    future.set_exception(broken)
            self._pending.clear()

        try:
            loop.call_soon_threadsafe(fail_all)
        except RuntimeError:  # the loop closed meanwhile: nobody waits any more
            pass

    def try_reserve(self, count: int = 1) -> bool:
        """Take ``count`` in-flight slots, or return False when the bound would be passed."""
        if self.in_flight + count > self.max_in_flight:
            return False
        self.in_flight += count
        return True

    def release(self, count: int = 1) -> None:
        """Give back slots taken by :meth:`try_reserve`."""
        self.in_flight = max(0, self.in_flight - count)

    def _future(self) -> tuple[asyncio.Future[None], Callable[[Any], None]]:
        assert self._loop is not None, "start() first"
        loop = self._loop
        if self.broken is not None:
            raise self.broken
        future: asyncio.Future[None] = loop.create_future()
        self._pending.add(future)

        def resolve(error: Any) -> None:
            def settle() -> None:
                self._pending.discard(future)
                if future.done():
                    return
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(DeliveryFailed(str(error)))

            try:
                loop.call_soon_threadsafe(settle)
            except RuntimeError:  # the event loop is closed: nobody waits for this any more
                pass

        return future, resolve

    async def publish(self, key: str | bytes | None, record: dict[str, Any] | bytes) -> None:
        """Publish and wait for the broker's acknowledgement (raises DeliveryFailed)."""
        future, resolve = self._future()
        try:
            self.publisher.publish(key, record, resolve)
        except BaseException:
            self._pending.discard(future)
            raise
        await future

    async def dead_letter(
        self, reason_code: str, reason: str, original_value: bytes, **kwargs: Any
    ) -> str:
        """Publish a dead letter and wait for its acknowledgement; returns its id."""
        future, resolve = self._future()
        try:
            dlq_id = self.publisher.dead_letter(
                reason_code, reason, original_value, resolve, **kwargs
            )
        except BaseException:
            self._pending.discard(future)
            raise
        await future
        return dlq_id

    async def close(self, timeout: float = 30.0) -> int:
        """Flush what is in flight and stop the callback thread; returns records unacknowledged."""
        self._stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        return await asyncio.to_thread(self.publisher.flush, timeout)


# --- durable collector state --------------------------------------------------------------


class CollectorState:
    """A collector's durable state: positions and "already seen" keys, in one SQLite file.

    Writes are synchronous (``synchronous=FULL``), so a position stored here survives a
    kill -9 of the collector. Not shared between processes.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT)")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS seen (namespace TEXT, key TEXT, value TEXT, "
                "first_seen_ms INTEGER, PRIMARY KEY (namespace, key))"
            )
            self._db.execute(
                "CREATE INDEX IF NOT EXISTS seen_by_age ON seen (namespace, first_seen_ms)"
            )

    def get(self, key: str) -> str | None:
        """A stored value, or None."""
        with self._lock:
            row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def put(self, key: str, value: str) -> None:
        """Store a value durably."""
        with self._lock:
            self._db.execute(
                "INSERT INTO kv (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def delete(self, key: str) -> None:
        """Forget a value."""
        with self._lock:
            self._db.execute("DELETE FROM kv WHERE key = ?", (key,))

    def seen(self, namespace: str, key: str) -> str | None:
        """The value remembered for a key (e.g. a receipt), or None if it was never seen."""
        with self._lock:
            row = self._db.execute(
                "SELECT value FROM seen WHERE namespace = ? AND key = ?", (namespace, key)
            ).fetchone()
        return None if row is None else str(row[0])

    def remember(self, namespace: str, key: str, value: str = "") -> None:
        """Remember a key durably (first time wins)."""
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO seen (namespace, key, value, first_seen_ms) "
                "VALUES (?, ?, ?, ?)",
                (namespace, key, value, wall_clock_ms()),
            )

    def forget_older_than(self, namespace: str, cutoff_ms: int) -> int:
        """Drop keys first seen before ``cutoff_ms``; returns how many."""
        with self._lock:
            cursor = self._db.execute(
                "DELETE FROM seen WHERE namespace = ? AND first_seen_ms < ?", (namespace, cutoff_ms)
            )
        return int(cursor.rowcount)

    def rekey(
        self, old_namespace: str, new_namespace: str, new_key: Callable[[str], str | None]
    ) -> int:
        """Move the keys of ``old_namespace`` to ``new_namespace`` under ``new_key(key)``
        (None: dropped), keeping value and first-seen time, in one transaction; when two
        keys become one, the first seen wins. Returns how many keys were moved."""
        moved = 0
        with self._lock:
            rows = self._db.execute(
                "SELECT key, value, first_seen_ms FROM seen WHERE namespace = ? "
                "ORDER BY first_seen_ms",
                (old_namespace,),
            ).fetchall()
            if not rows:
                return 0
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for key, value, first_seen_ms in rows:
                    renamed = new_key(str(key))
                    if renamed is not None:
                        moved += self._db.execute(
                            "INSERT OR IGNORE INTO seen (namespace, key, value, first_seen_ms) "
                            "VALUES (?, ?, ?, ?)",
                            (new_namespace, renamed, value, first_seen_ms),
                        ).rowcount
                self._db.execute("DELETE FROM seen WHERE namespace = ?", (old_namespace,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return moved

    def secret(self, name: str) -> bytes:
        """A random 32-byte key, created on first use and kept: for keyed hashes that must
        be stable across runs without revealing what they hash (e.g. a patient number)."""
        stored = self.get(f"secret:{name}")
        if stored is None:
            stored = os.urandom(32).hex()
            self.put(f"secret:{name}", stored)
        return bytes.fromhex(stored)

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._db.close()


def snapshot_row_ref(key: bytes, row: Mapping[str, object]) -> str:
    """A stable, keyed fingerprint of one snapshot row's content (column -> value).

    Snapshot records are identified by what they hold, not by the snapshot's position: a
    snapshot redone after a crash re-publishes unchanged rows with the same ids, so they
    collapse downstream, while a row that changed in between gets a new id.
    """
    text = repr(sorted((str(column), repr(value)) for column, value in row.items()))
    return hashlib.blake2b(text.encode(), key=key, digest_size=16).hexdigest()


@dataclass
class HeldRefusals:
    """Refusals of one sender and reason in one window that were counted, not dead-lettered
    one by one; dead-lettered together as one summary once the window has closed."""

    sender: str
    reason_code: str
    organisation_id: str | None
    window_start_ms: int
    dead_lettered: int = 0  # in full, each its own dead letter
    held: int = 0
    first_held_ms: int = 0
    last_held_ms: int = 0

    def summary_reason(self, in_full: int, window_s: float) -> str:
        """The readable reason of the summary dead letter (no payload, no identifiers)."""
        first = datetime.fromtimestamp(self.first_held_ms / 1000, UTC).isoformat()
        last = datetime.fromtimestamp(self.last_held_ms / 1000, UTC).isoformat()
        return (
            f"{self.held} more refusals ({self.reason_code}) of this sender between {first} "
            f"and {last}, after the {self.dead_lettered} dead-lettered one by one: at most "
            f"{in_full} per sender and reason every {window_s:g} s are; these were refused "
            "and counted, their payloads are not kept"
        )


class RefusalBudget:
    """How many refusals of one sender are dead-lettered one by one.

    A sender the collector knows but refuses (too fast, too large) must not fill the
    dead-letter topic at the rate it sends: per sender and reason, the first ``in_full``
    refusals of each ``window_s`` are dead-lettered as usual; later ones in that window are
    counted (the caller's metrics count every refusal), and :meth:`due` hands out one
    :class:`HeldRefusals` per sender, reason and window once it has closed (all of them when
    the collector stops), for the collector to dead-letter as one summary without payload.
    """

    IN_FULL = 20
    WINDOW_S = 60.0

    def __init__(self, in_full: int = IN_FULL, window_s: float = WINDOW_S) -> None:
        self.in_full = in_full
        self.window_s = window_s
        self._windows: dict[tuple[str, str], HeldRefusals] = {}
        self._closed: list[HeldRefusals] = []

    def admit(
        self, sender: str, reason_code: str, now_ms: int, organisation_id: str | None = None
    ) -> bool:
        """True: dead-letter this refusal as usual. False: it is held (counted only)."""
        key = (sender, reason_code)
        window = self._windows.get(key)
        if window is None or now_ms >= window.window_start_ms + self.window_s * 1000:
            if window is not None and window.held:
                self._closed.append(window)
            window = self._windows[key] = HeldRefusals(
                sender, reason_code, organisation_id, now_ms
            )
        if window.dead_lettered < self.in_full:
            window.dead_lettered += 1
            return True
        if not window.held:
            window.first_held_ms = now_ms
        window.held += 1
        window.last_held_ms = now_ms
        return False

    def due(self, now_ms: int, final: bool = False) -> list[HeldRefusals]:
        """The held refusals of every closed window (``final``: of every window), each once."""
        for key, window in list(self._windows.items()):
            if final or now_ms >= window.window_start_ms + self.window_s * 1000:
                del self._windows[key]
                if window.held:
                    self._closed.append(window)
        closed, self._closed = self._closed, []
        return closed

    async def dead_letter_due(
        self, publisher: AsyncPublisher, collector: str, default_organisation: str | None,
        final: bool = False,
    ) -> int:
        """Dead-letter the summary of each closed window (``final``: of every window, when
        the collector stops); returns how many summaries were written. One that cannot be
        delivered is logged with its count (the refusals stay counted in the metrics)."""
        written = 0
        for held in self.due(wall_clock_ms(), final):
            try:
                await publisher.dead_letter(
                    held.reason_code,
                    held.summary_reason(self.in_full, self.window_s),
                    b"",
                    organisation_id=held.organisation_id or default_organisation,
                    original_key=held.sender.encode(),
                    received_ms=held.first_held_ms,
                    refusal=f"{held.sender}@{held.first_held_ms}-{held.last_held_ms}:{held.held}",
                    count_failure=False,
                )
                written += 1
            except DeliveryFailed:
                log.error("%s: the summary of %d held refusals (%s) was not delivered",
                          collector, held.held, held.reason_code)
        return written


# --- the collector base class -------------------------------------------------------------


class CollectorMetrics:
    """The per-collector Prometheus children (the label is the configured collector name)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.read = labelled(COLLECTOR_READ, name)
        self.source_lag = labelled(COLLECTOR_SOURCE_LAG, name)
        self.ready = labelled(READY, f"collector-{name}")

    def failed(self, reason_code: str) -> Any:
        """The failure counter for a bounded reason code."""
        return labelled(COLLECTOR_FAILED, self.name, reason_code)


class Collector(ABC, Generic[C]):
    """One edge collector: reads a source, publishes raw records, commits after acks.

    Subclasses set ``kind``, ``source_kind`` and ``config_model`` and implement
    :meth:`run`. :meth:`check` validates the configuration against the live source
    without publishing (``medstream collect KIND --config FILE --check``).
    """

    kind: ClassVar[str]
    source_kind: ClassVar[str]
    config_model: ClassVar[type[CollectorConfig]]

    def __init__(
        self,
        config: C,
        kafka: KafkaSettings,
        registry: SchemaRegistry,
        runtime: RuntimeSettings | None = None,
        producer: Any = None,
    ) -> None:
        self.config = config
        self.kafka = kafka
        self.registry = registry
        runtime = runtime or RuntimeSettings()
        self.state_dir = config.state_dir or runtime.data_dir / "collectors" / config.name
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = CollectorMetrics(config.name)
        self.publisher = RawPublisher(
            kafka, registry, self.source_kind, config.name, producer=producer,
            ledger=self._published_ledger(runtime.data_dir),
        )

    def _published_ledger(self, data_dir: Path) -> PublishedLedger:
        """This process's count of acknowledged raw records (one run per process start),
        beside the collector's positions, listed in the data directory's index so that
        `medstream reconcile` finds it whatever the state directory."""
        publisher = f"collector-{self.config.name}"
        path = self.state_dir / PUBLISHED_FILE
        ledger = PublishedLedger(
            path, publisher, new_run_id(), lambda: self.publisher.cluster_id()
        )
        register_counter_file(data_dir, path)
        return ledger

    @abstractmethod
    def run(self, stop: threading.Event) -> None:
        """Collect until ``stop`` is set; flush and commit what was acknowledged, then return.

        Raises on an unrecoverable error (the process then exits non-zero and a supervisor
        restarts it from the last committed position).
        """

    def check(self) -> list[str]:
        """Validate the configuration against the live source; returns readable findings."""
        return []


def run_async(main: Callable[[threading.Event], Any], stop: threading.Event) -> None:
    """Run an asyncio collector's ``main(stop)`` coroutine until it returns."""
    asyncio.run(main(stop))
