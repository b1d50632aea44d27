"""The Faust application: one thin normalise agent per raw topic.

Broker-dependent tuning (KafkaSettings.broker_kind):
- Apache Kafka: session timeout 10 s (its minimum is 6 s), fetch waits of 500 ms (a
  waiting fetch is answered as soon as new data arrives), an idempotent producer.
- tansu (the embedded fallback): session timeout 3 s and heartbeat 0.5 s (its group joins
  take about half the session timeout), fetch waits of 20 ms (it does not wake a waiting
  fetch when new data arrives), no idempotence (aiokafka's InitProducerId v0 is refused).
Both: producer linger 5 ms and acks=all; at-least-once by default, duplicates collapsed by
event id downstream. Faust commits a raw offset only after the records an agent sent for
it were acked (Faust "attachments"), so a source record is never marked done before its
output exists. On Apache Kafka, MEDSTREAM_STREAMS_PROCESSING_GUARANTEE=exactly_once puts
each record's outputs, table writes and offset in one transaction (streams.transactions).
- agent_supervisor = CrashingSupervisor: an agent that raises stops the worker, which then
  exits non-zero instead of limping on with a restarted agent.
- tables in memory, rebuilt from their changelog topics at start and at every rebalance
  (streams.recovery): on tansu, whose end offsets under-count by up to one produce batch,
  the true ends are read from the log, so recovery reads the whole last batch and a worker
  never stops over a changelog it read further than the reported end.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import os
import signal
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, cast

import faust
from aiokafka.errors import KafkaError, ProducerFenced
from faust.exceptions import ConsumerNotStarted
from faust.transport.consumer import ensure_TP
from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers.aiokafka import (
    AIOKafkaConsumerThread,
    Consumer,
    Producer,
    Transport,
    server_list,
)
from faust.types import TP
from faust.worker import Worker
from mode import BaseSignalT, CrashingSupervisor
from mode.utils.objects import cached_property
from mode.utils.queues import FlowControlEvent

from medstream.keys import PSEUDONYM_KEY, resolve_secret
from medstream.metrics import (
    END_TO_END_SECONDS,
    PROCESSING_SECONDS,
    READY,
    RECORDS_IN,
    RECORDS_OUT,
    TIMERS_QUIET,
    PartitionPosition,
    labelled,
    report_consumer_lag,
    topic_lags,
)
from medstream.settings import (
    FEED_ACTIVITY_TOPIC,
    IDENTITY_TOPIC,
    LIFECYCLE_TOPIC,
    NORM_TOPICS,
    RAW_TOPICS,
    SYNDROMIC_TOPIC,
    KafkaSettings,
    StreamSettings,
)
from schemas import serde
from streams.critical_values import load_critical_value_rules
from streams.detect import (
    DetectStage,
    FeedWatchStage,
    LifecycleStage,
    Output,
    PatientIndexStage,
    SyndromicStage,
    TickOverlay,
)
from streams.findings import DictState, KeyValueState
from streams.internal_errors import InternalErrorStorm, surviving_tick
from streams.model import RawContext
from streams.pseudonym import Pseudonymiser
from streams.recovery import CheckedTableManager, tansu_log_ends
from streams.reloading import ReloadingFile
from streams.rules_file import rule_file
from streams.stage import STAGE, NormaliseStage, SuppressionState
from streams.stall_watch import StallWatch, records_counter, watch_and_unstick
from streams.terminology import DEFAULT_TERMINOLOGY_PATH, TerminologySource
from streams.transactions import TransactionGate, current_transactional_id, hold_changelog

DEFAULT_FETCH_WAIT_MS = 20
EXIT_DELIVERY_FAILED = 70
#: Exit code of a worker stopped by too many internal errors in a row (stops_on_storm).
EXIT_INTERNAL_ERROR_STORM = 71
#: Seconds between timer ticks of the rule families and of the alert lifecycle.
DETECT_TICK_S = 30.0
LIFECYCLE_TICK_S = 15.0
#: Device silence is due after a few sample intervals (tens of seconds): check often.
DEVICE_TICK_S = 5.0
#: Seconds between a worker's feed activity summaries and between feed-watch ticks.
FEED_ACTIVITY_S = 5.0
FEED_TICK_S = 15.0
QUALITY_PRUNE_S = 60.0
#: How often a worker reports its consumer lag (cheap: the watermarks of fetch responses).
LAG_REPORT_S = 1.0
log = logging.getLogger("medstream.streams")


def exit_on_failed_delivery(delivery: asyncio.Future[Any]) -> None:
    """Stop the worker at once when an output record could not be delivered.

    Faust commits raw offsets after flushing its producer, not after checking each
    delivery, so a lost output must end the process before it can commit past it; the
    uncommitted raw records are then processed again by the next worker.
    """
    error = None if delivery.cancelled() else delivery.exception()
    if delivery.cancelled() or error is not None:
        log.critical("an output record could not be delivered (%s); exiting", error)
        os._exit(EXIT_DELIVERY_FAILED)


def stops_on_storm(agent: Callable[[faust.StreamT], Awaitable[None]]
                   ) -> Callable[[faust.StreamT], Awaitable[None]]:
    """An agent body that ends the process at once on InternalErrorStorm.

    Raising would let Faust stop gracefully, and a graceful stop acknowledges and commits
    the record the agent was on: the record that tripped the breaker would be lost. Ending
    the process here commits nothing more (Faust commits an offset only after the producer
    flushed the outputs before it), so after the fix the worker reads that record again.
    """

    @functools.wraps(agent)
    async def guarded(stream: faust.StreamT) -> None:
        try:
            await agent(stream)
        except InternalErrorStorm as exc:
            log.critical("%s; the worker exits now (code %d) without committing that record",
                         exc, EXIT_INTERNAL_ERROR_STORM)
            logging.shutdown()
            os._exit(EXIT_INTERNAL_ERROR_STORM)

    return guarded


#: Set when the worker was asked to stop making timer output (SIGUSR2, :class:`StreamsWorker`,
#: or started with TIMERS_STOPPED_ENV=1 by `up` during its stop).
TIMERS_STOPPED = threading.Event()
#: Timer ticks under way (started before TIMERS_STOPPED was set, not finished yet).
_TICKS_UNDER_WAY: list[int] = [0]
# `up` waits for this before its last drain (a signal sent before the worker's handler was
# installed is lost: `up` sends it again until the worker confirms).
TIMERS_QUIET.set_function(
    lambda: 1.0 if TIMERS_STOPPED.is_set() and not _TICKS_UNDER_WAY[0] else 0.0
)


def until_timers_stopped(
    tick: Callable[[], Awaitable[None]]
) -> Callable[[], Awaitable[None]]:
    """A timer body that does nothing once :data:`TIMERS_STOPPED` is set.

    `up` stops the workers' timers before its last drain: device silence, escalations
    and feed-watch findings a tick made after the drain measured nothing left were never
    read by the alert lifecycle before the workers stopped (181 records left on
    alerts.lifecycle, exit 1, in one of a few `up --exit-when-done` runs).
    """
    @functools.wraps(tick)
    async def body() -> None:
        if TIMERS_STOPPED.is_set():
            return
        _TICKS_UNDER_WAY[0] += 1
        try:
            await tick()
        finally:
            _TICKS_UNDER_WAY[0] -= 1

    return body


class StreamsWorker(Worker):
    """Faust's worker, whose SIGUSR2 stops the timers that make output (mode's enters a
    debugger); SIGTERM still stops the worker."""

    def _on_sigusr2(self) -> None:
        if not TIMERS_STOPPED.is_set():
            log.warning("asked to stop making timer output (SIGUSR2): timers stopped")
        TIMERS_STOPPED.set()

    def _shutdown_loop(self) -> None:
        try:
            super()._shutdown_loop()
        finally:
            # Closing the loop resets its signal handlers to the default, which for SIGUSR2
            # ends the process (signal 12) before `medstream streams` drains its audit.
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class KeptOnResumeFlowControl(FlowControlEvent):
    """Faust's flow control, except that resuming keeps what the stream queues hold.

    Faust clears every stream queue when it resumes after a rebalance, which comes after
    it has seeked the stream partitions to their committed offsets: records fetched from
    there in between were dropped while the consumer's read offset had moved past them,
    so they were never processed and a later commit went past them (2 of 14,960 events
    lost in one of three runs that killed a worker). The queues are still cleared when
    partitions are revoked (``flow_control.clear()``), where stale records belong.
    """

    def resume(self) -> None:
        self._suspend.clear()
        self._resume.set()


class StreamsApp(faust.App):
    """The Faust app, carrying the consumer fetch wait and producer idempotence its
    transport needs."""

    fetch_wait_max_ms: int = DEFAULT_FETCH_WAIT_MS
    idempotent_producer: bool = False
    #: tansu under-counts end offsets: table recovery reads the true ones from the log.
    tansu_watermarks: bool = False
    #: Set under exactly_once: records and commits take turns (streams.transactions).
    transaction_gate: TransactionGate | None = None
    #: Topics whose every offset is a record (the raw topics: collectors and the simulator
    #: write them without transactions): a jump in what Faust delivers there is records
    #: it dropped, never a gap to acknowledge.
    contiguous_topics: frozenset[str] = frozenset()

    @cached_property
    def flow_control(self) -> FlowControlEvent:
        return KeptOnResumeFlowControl(loop=self.loop)


class LivePartitions:
    """Faust's live set of active partitions as aiokafka's drain filter: membership is
    asked when aiokafka drains (a partition paused meanwhile is not drained), and it is
    never empty to aiokafka, which reads an empty set as every partition."""

    __slots__ = ("live",)

    def __init__(self, live: Any) -> None:
        self.live = live

    def __bool__(self) -> bool:
        return True

    def __contains__(self, tp: object) -> bool:
        return tp in self.live


class ShortFetchConsumerThread(AIOKafkaConsumerThread):
    """aiokafka consumer with a short fetch wait (Faust hard-codes 1500 ms).

    The wait comes from the app (:class:`StreamsApp`), so two apps in one process can
    differ; aiokafka reads it when its fetcher starts.
    """

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = getattr(self.app, "fetch_wait_max_ms", DEFAULT_FETCH_WAIT_MS)
        return consumer

    async def _fetch_records(
        self, consumer: Any, active_partitions: Any, timeout: float | None = None,
        max_records: int | None = None,
    ) -> Any:
        """Faust's fetch (in the consumer's thread), except that records Faust would drop
        are put back. Faust hands aiokafka its live set of active partitions: a fetch under
        way at a revoke resumes at the next assignment with that set emptied, which aiokafka
        reads as every partition, so it handed out the changelogs' records too and moved
        its positions past them; Faust then dropped them (its flow stopped, the generation
        changed) and only stream partitions were sought back. A table recovery that had
        sought its changelogs already then waited for those records until the next
        rebalance (3 minutes of a worker's partitions paused in a CI run: a kept
        changelog's 1,329 records never read). Here aiokafka sees the live set as a set
        that is never "every partition" (a copy would drain partitions paused meanwhile,
        which Faust drops), nothing is fetched when it is empty, and records fetched across
        a rebalance or with the flow stopped are sought back to."""
        if not active_partitions:
            return {}
        generation = self.app.consumer_generation_id
        records = await super()._fetch_records(
            consumer, cast(set[TP], LivePartitions(active_partitions)), timeout=timeout,
            max_records=max_records,
        )
        if records and (self.app.consumer_generation_id != generation
                        or not self.consumer.flow_active):
            assigned = consumer.assignment()
            for tp, batch in records.items():
                if batch and tp in assigned:
                    consumer.seek(tp, batch[0].offset)
            return {}
        return records

    async def _highwaters(self, partitions: Any) -> Any:
        # Under transactions Faust reads the last stable offset from the consumer's cache,
        # empty until a partition was first fetched: table recovery then took a changelog
        # for empty. ListOffsets answers it under the consumer's isolation level. tansu
        # answers the first offset of the last batch + 1: its true ends are read from the
        # log, or recovery misses the rest of that batch and later stops the worker
        # (streams.recovery).
        ends = await self._ensure_consumer().end_offsets(partitions)
        if not getattr(self.app, "tansu_watermarks", False):
            return ends
        transport = cast(Transport, self.transport)
        return await tansu_log_ends(server_list(transport.url, transport.default_port), ends)


def fetched_high_watermark(consumer: Consumer, tp: TP) -> int | None:
    """The high watermark (under transactions the last stable offset) of the last fetch
    response for ``tp``; None while none came since the assignment, or when ``tp`` was
    revoked meanwhile (the consumer runs in a thread of its own)."""
    try:
        return consumer.highwater(tp)
    except AssertionError:  # aiokafka asserts the partition is still assigned
        return None


class ShortFetchConsumer(Consumer):
    """Faust consumer using :class:`ShortFetchConsumerThread`; at least once, it never
    commits past a record of a topic an agent reads that no agent acknowledged, and it
    records only commits the broker took."""

    #: The partitions of the commit under way (at least once), for the stall watch.
    committing: frozenset[TP] = frozenset()

    def _new_consumer_thread(self) -> ShortFetchConsumerThread:
        return ShortFetchConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def _guarded(self, tp: TP) -> bool:
        """At least once, every topic an agent reads is guarded: this app's own producers
        and the collectors write them without transactions, so every offset is a record
        (markers of an earlier exactly_once run are told apart by the stall watch, which
        reads such a hole before accepting it). Changelogs are read by table recovery, not
        acknowledged, and compacted."""
        return (getattr(self.app, "transaction_gate", None) is None
                and tp.topic not in self.app.tables.changelog_topics)

    async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        """Faust takes a jump in the offsets it delivers for a gap (transaction markers,
        compaction) and acknowledges the skipped offsets. On a guarded topic they are records
        it dropped (its read offset was ahead of the fetch position after a rebalance):
        acknowledged, the commit went past 4 records no agent processed. They stay
        unacknowledged here; the stall watch reads them again and accepts a gap only where
        a read of the range finds no record (streams.stall_watch)."""
        if not self._guarded(tp):
            await super()._add_gap(tp, offset_from, offset_to)
            return
        # After a rebalance Faust sets its read offset back behind records it delivered
        # already: a jump over those is no loss. Said only for offsets no agent has
        # (transaction markers of an earlier exactly_once run are said too: rare).
        committed = self._committed_offset.get(tp) or 0
        in_hand = {m.offset for m in list(self._unacked_messages) if m.tp == tp}
        missing = [o for o in range(max(offset_from, committed), offset_to)
                   if o not in self._acked_index[tp] and o not in in_hand]
        if missing:
            log.warning("%s[%d]: Faust jumped over %d offsets (%d-%d) not acknowledged "
                        "nor in an agent's hands; not acknowledging them: if they hold "
                        "records no agent processes, the stall watch reads them again",
                        tp.topic, tp.partition, len(missing), missing[0], missing[-1])

    def _new_offset(self, tp: TP) -> int | None:
        """Faust's next offset to commit, except that on a guarded topic the lowest
        acknowledged offset must be the committed one (Faust lets one record through: it
        reads its committed offset as the last one processed, not as the next), and
        nothing is committed while the committed offset is unknown (from the revoke until
        the seek after the assignment has read it; Faust then commits the first run of
        acknowledgements wherever it starts, past records no agent processed)."""
        acked = self._acked.get(tp)
        if acked and self._guarded(tp):
            committed = self._committed_offset.get(tp)
            if committed is None:
                return None
            gap = self._gap.get(tp)
            if min(acked) > committed and not (gap and gap.overlaps(committed)):
                return None
        return cast(int | None, super()._new_offset(tp))

    async def _commit_offsets(
        self, offsets: Mapping[TP, int], start_new_transaction: bool = True
    ) -> bool:
        """Faust's commit (at least once: flush the outputs, then commit), except that a
        commit the broker refused ("already rebalanced") is not recorded as done: Faust
        records it anyway, so its committed offset stood above the group's and the seek
        after the rebalance skipped the records in between."""
        if getattr(self.app, "transaction_gate", None) is not None or self.in_transaction:
            return cast(bool, await super()._commit_offsets(offsets, start_new_transaction))
        assignment = self.assignment()
        committable = {tp: offset for tp, offset in offsets.items() if tp in assignment}
        if not committable:
            return False  # revoked meanwhile: their next owner processes them again
        before = {tp: self._committed_offset.get(tp) for tp in committable}
        self.committing = frozenset(committable)
        try:
            await self.app.producer.flush()
            taken = await self._commit(committable)
        finally:
            self.committing = frozenset()
        if taken:
            self.app.tables.on_commit(committable)
            self._committed_offset.update(committable)
            self.app.monitor.on_tp_commit(committable)
            return True
        for tp, offset in committable.items():
            previous = before[tp]
            if (previous is not None and self._committed_offset.get(tp) == previous
                    and self._guarded(tp)):
                # Faust took them off its acknowledged list for this commit: put back,
                # so the next commit covers them (elsewhere the stall watch reads the
                # hole again). Not after a seek meanwhile: that one stands.
                again = [o for o in range(previous, offset) if o not in self._acked_index[tp]]
                self._acked[tp].extend(again)
                self._acked_index[tp].update(again)
        return False

    async def force_commit(self, topics: Any = None, start_new_transaction: bool = True) -> bool:
        """Commit; under exactly_once by the gate, which knows which offsets each open
        transaction covers (Faust's own acknowledgements are dropped at a rebalance)."""
        gate = getattr(self.app, "transaction_gate", None)
        if gate is None:
            return await super().force_commit(topics, start_new_transaction=start_new_transaction)
        try:
            committed = await gate.commit(start_new_transaction)
        except ProducerFenced as exc:
            await self.crash(exc)
            return False
        for tp in committed:
            # Faust's per-offset acknowledgements are not used for committing here.
            self._acked.pop(tp, None)
            self._acked_index.pop(tp, None)
            self._gap.pop(tp, None)
        self._committed_offset.update(committed)
        self.app.tables.on_commit(committed)
        self.app.monitor.on_tp_commit(committed)
        return bool(committed)

    async def on_partitions_assigned(self, assigned: Any, generation_id: int = 0) -> None:
        """Under exactly_once, start the gate's bookkeeping afresh."""
        gate = getattr(self.app, "transaction_gate", None)
        if gate is not None:
            gate.assigned(set(assigned))
        await super().on_partitions_assigned(assigned, generation_id)

    async def perform_seek(self) -> None:
        """Seek to the committed offsets; under exactly_once with the stream partitions
        paused until then.

        Faust resumes them just before this seek, and aiokafka's positions come from the
        committed offsets it fetched when it joined, possibly before the previous owner's
        last transaction was complete: records read from there would be processed twice.
        This seek comes after the new transactional producers started, which completes or
        aborts the previous owner's transactions. At-least-once, records flow during the
        seek (pausing them there made Faust drop part of a fetched batch for good).
        """
        gate = getattr(self.app, "transaction_gate", None)
        if gate is None:
            await self._seek_keeping_own_commits()
            return
        # Faust resumed them just before: paused again before any of their records reaches
        # an agent (Faust's getmany checks this very set before it hands a record over).
        resumed = set(self._get_active_partitions())
        self.pause_partitions(resumed)
        await super().perform_seek()
        # Resumed only after a seek that completed: one cancelled by a new rebalance or
        # failed leaves them paused for the recovery that follows.
        assignment = self.assignment()
        gate.sought({
            tp: offset
            for tp, offset in self._committed_offset.items()
            if tp in assignment and offset is not None
        })
        self.resume_partitions(resumed)

    async def _seek_keeping_own_commits(self) -> None:
        """Faust's seek to the committed offsets, except that an offset this worker itself
        committed while the seek read them (one round trip per partition, records flowing)
        is kept instead of the older one read.

        Faust sets its committed offset to what it read and commits only from an
        acknowledged offset right after that one: set back below records it had processed
        and committed meanwhile, a partition's group offset never moved again (a drain that
        never completed after a restart: raw.device 31 records behind, everything stored).
        """
        read = {ensure_TP(tp): offset for tp, offset in (await self.seek_to_committed()).items()}
        # Never committed at the broker: reading starts at the log start (auto_offset_reset
        # earliest), which is then the offset the first acknowledgement must be. Asked
        # before this worker's own commits are read, so none made meanwhile is undone.
        unknown = [tp for tp, offset in read.items()
                   if offset is None and self._guarded(tp)]
        log_starts = dict(await self.earliest_offsets(*unknown)) if unknown else {}
        committed: dict[TP, int | None] = {}
        never: set[TP] = set()
        for tp, offset in read.items():
            own = self._committed_offset.get(tp)
            if own is None and offset is None and tp in log_starts:
                never.add(tp)
                offset = log_starts[tp]
            committed[tp] = (
                offset if own is None else own if offset is None else max(own, offset)
            )
        self._read_offset.update(
            {tp: offset if offset is not None and offset >= 0 and tp not in never else None
             for tp, offset in committed.items()}
        )
        # Faust keeps 0 as None (its committed offset reads as the last one processed);
        # a guarded topic's strict commit needs the 0 (streams.stall_watch).
        self._committed_offset.update({
            tp: offset if offset or self._guarded(tp) else None
            for tp, offset in committed.items() if offset is not None
        })


class IdempotentProducer(Producer):
    """Faust's aiokafka producer, idempotent when the app asks for it (Apache Kafka).

    Faust turns idempotence on only inside transactions; on Kafka every producer should
    have it, so a retried batch is never written twice and order holds within a partition.
    Under exactly_once, whatever an agent sends or writes to a table while it processes
    a record goes to the transaction of that record's partition (streams.transactions).
    """

    def _settings_extra(self) -> Mapping[str, Any]:
        extra = dict(super()._settings_extra())
        if getattr(self.app, "idempotent_producer", False):
            extra.update(acks="all", enable_idempotence=True)
        return extra

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        timestamp: float | None,
        headers: Any,
        *,
        transactional_id: str | None = None,
    ) -> Any:
        return await super().send(
            topic, key, value, partition, timestamp, headers,
            transactional_id=transactional_id or current_transactional_id(),
        )

    def send_soon(self, fut: Any) -> None:
        if not hold_changelog(fut):
            super().send_soon(fut)


class ShortFetchTransport(Transport):
    """The aiokafka transport with the configured fetch wait and idempotence (URL scheme
    medstream-kafka://)."""

    Consumer = ShortFetchConsumer
    Producer = IdempotentProducer


TRANSPORTS.aliases["medstream-kafka"] = f"{__name__}:ShortFetchTransport"


def broker_credentials(kafka: KafkaSettings) -> faust.types.auth.CredentialsT | None:
    """Faust's (aiokafka's) view of MEDSTREAM_KAFKA_SECURITY_PROTOCOL and its SASL and CA
    settings, the same ones every confluent-kafka client of medstream gets."""
    protocol = kafka.security_protocol.upper()
    if protocol == "PLAINTEXT":
        return None
    if protocol not in ("SSL", "SASL_SSL", "SASL_PLAINTEXT"):
        raise ValueError(
            f"MEDSTREAM_KAFKA_SECURITY_PROTOCOL {kafka.security_protocol!r} is not one of "
            "PLAINTEXT, SSL, SASL_SSL, SASL_PLAINTEXT"
        )
    context = None
    if protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=kafka.ssl_ca_location or None)
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    if not kafka.sasl_mechanism:
        raise ValueError(f"{protocol} needs MEDSTREAM_KAFKA_SASL_MECHANISM (e.g. SCRAM-SHA-512)")
    return faust.SASLCredentials(
        username=kafka.sasl_username,
        password=kafka.sasl_password.get_secret_value(),
        mechanism=kafka.sasl_mechanism,
        ssl_context=context,
    )


def derived_key(secret: bytes, purpose: str) -> bytes:
    """A separate key per purpose from the one configured secret (HMAC-SHA256 with a label)."""
    return hmac.new(secret, f"medstream.{purpose}.v1".encode(), hashlib.sha256).digest()


class TableState:
    """A Faust table as a :class:`streams.findings.KeyValueState` (JSON-able values)."""

    def __init__(self, table: Any) -> None:
        self._table = table

    def get(self, key: str) -> Any | None:
        """The value stored under ``key``, or None."""
        return self._table.get(key)

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` (written to the changelog of the record's partition).

        Always written, even when it compares equal to what ``get`` returns: rule families
        change the object ``get`` handed out in place and put it back, so an equality check
        would compare the object with itself and drop the changelog record.
        """
        self._table[key] = value

    def delete(self, key: str) -> None:
        """Forget ``key``."""
        if key in self._table:
            del self._table[key]

    def items(self) -> Any:
        """Every (key, value) of the partitions this worker holds."""
        return iter(list(self._table.items()))


class PartitionState:
    """The keys of one source partition inside a shared state (prefixed ``<partition>|``)."""

    def __init__(self, table: KeyValueState, partition: int | str) -> None:
        self._table = table
        self._prefix = f"{partition}|"

    def get(self, key: str) -> Any | None:
        """The value stored under ``key`` for this partition, or None."""
        return self._table.get(self._prefix + key)

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key`` for this partition."""
        self._table.put(self._prefix + key, value)

    def delete(self, key: str) -> None:
        """Forget ``key`` for this partition."""
        self._table.delete(self._prefix + key)

    def items(self) -> Any:
        """This partition's (key, value) pairs, keys without the prefix."""
        size = len(self._prefix)
        return iter(
            [(k[size:], v) for k, v in self._table.items() if k.startswith(self._prefix)]
        )


def create_app(
    kafka: KafkaSettings,
    settings: StreamSettings,
    registry: serde.SchemaRegistry,
    terminology_path: str | None = None,
    rules_path: str | None = None,
    data_dir: Path | None = None,
) -> faust.App:
    """Build the Faust app with its agents; nothing connects until the worker starts. The
    pseudonym key is the configured one or ``data_dir``'s (ValueError naming the setting
    when it is missing or a published demo key)."""
    settings.check_broker(kafka)
    secret = resolve_secret(PSEUDONYM_KEY, settings.pseudonym_key, data_dir)
    brokers = ";".join(f"medstream-kafka://{b}" for b in kafka.bootstrap_servers.split(","))
    app = StreamsApp(
        settings.app_id,
        broker=brokers,
        key_serializer="raw",
        value_serializer="raw",
        broker_credentials=broker_credentials(kafka),
        broker_session_timeout=kafka.session_timeout / 1000,
        broker_heartbeat_interval=kafka.heartbeat_interval / 1000,
        broker_commit_interval=settings.commit_interval / 1000,
        processing_guarantee=settings.processing_guarantee,
        producer_linger=settings.producer_linger_ms / 1000,
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
        topic_partitions=kafka.raw_partitions,
        topic_replication_factor=kafka.replication_factor,
        topic_allow_declare=True,
        table_standby_replicas=0,
        store="memory://",
        web_enabled=False,
        agent_supervisor=CrashingSupervisor,
        TableManager=CheckedTableManager,
    )
    app.fetch_wait_max_ms = kafka.fetch_wait
    app.idempotent_producer = not kafka.tansu
    app.tansu_watermarks = kafka.tansu
    app.contiguous_topics = frozenset(kafka.topic(name) for name in RAW_TOPICS.values())
    if settings.exactly_once:
        app.transaction_gate = TransactionGate(app, app.contiguous_topics)
    gate = app.transaction_gate

    async def records(stream: faust.StreamT) -> AsyncIterator[faust.EventT]:
        """The stream's events; under exactly_once each is processed inside its partition's
        transaction, and one redelivered after Faust seeks back (its outputs are already in
        the transaction) is acknowledged without being processed again."""
        async for event in stream.events():
            if gate is None:
                yield event
            elif gate.skip(event):
                event.ack()
            else:
                async with gate.record(event):
                    yield event

    rules_dir = settings.rules_dir
    stage = NormaliseStage(
        kafka,
        registry,
        TerminologySource(terminology_path or DEFAULT_TERMINOLOGY_PATH),
        Pseudonymiser(secret),
        ReloadingFile(
            "critical_values",
            rules_path or rule_file("critical_values.yaml", rules_dir),
            load_critical_value_rules,
        ),
        identity_key=derived_key(secret, "mpi.tokens"),
        rules_dir=rules_dir,
    )
    suppression_table = app.Table(
        "critical-suppression", default=None, partitions=kafka.raw_partitions
    )
    suppression = SuppressionState(suppression_table.get, suppression_table.__setitem__)
    # Duplicate detection remembers business keys in this process only: one changelog
    # record per event would double what the worker produces. A restarted worker forgets
    # them (a duplicate arriving across a restart is not flagged).
    quality_table = DictState()
    quality_pruned_at: dict[tuple[str, int], float] = {}
    device_state = TickOverlay(
        TableState(app.Table("device-state", default=None, partitions=kafka.raw_partitions))
    )

    async def publish(outputs: list[Output]) -> None:
        for output in outputs:
            delivery = await app.producer.send(
                output.topic, output.key, output.value, None, None, None
            )
            cast(asyncio.Future, delivery).add_done_callback(exit_on_failed_delivery)
            labelled(RECORDS_OUT, STAGE, output.topic).inc()

    def normalise_agent(source_kind: str) -> Any:
        async def agent(stream: faust.StreamT) -> None:
            async for event in records(stream):
                message = event.message
                started = time.perf_counter()
                ctx = RawContext.of(message)
                labelled(RECORDS_IN, STAGE, message.topic).inc()
                # Quality state is kept per partition, so a partition's keys are pruned
                # together and a revoked partition's keys simply age out.
                quality_state = PartitionState(
                    quality_table, f"{message.topic}:{message.partition}"
                )
                devices = device_state.in_record_buffered()
                outputs = stage.handle(
                    source_kind, ctx, message.key, message.value, suppression,
                    quality_state=quality_state,
                    device_state=devices,
                )
                devices.flush()
                due = quality_pruned_at.get((message.topic, message.partition), 0.0)
                if started - due > QUALITY_PRUNE_S:
                    quality_pruned_at[(message.topic, message.partition)] = started
                    stage.prune_quality_state(quality_state, ctx.timestamp_ms)
                await publish(outputs)
                now = time.time()
                labelled(PROCESSING_SECONDS, STAGE).observe(time.perf_counter() - started)
                labelled(END_TO_END_SECONDS, STAGE).observe(now - message.timestamp)

        agent.__name__ = f"normalise_{source_kind}"
        return agent

    for source_kind, topic_name in RAW_TOPICS.items():
        raw_topic = app.topic(
            kafka.topic(topic_name),
            key_serializer="raw",
            value_serializer="raw",
            partitions=kafka.raw_partitions,
        )
        app.agent(raw_topic, name=f"normalise_{source_kind}")(
            stops_on_storm(normalise_agent(source_kind))
        )

    # -- detect: per-patient rule families over the normalised events -----------------------
    detect = DetectStage(kafka, registry, rules_dir)
    detect_state = TickOverlay(
        TableState(app.Table("detect-state", default=None, partitions=kafka.norm_partitions))
    )

    def detect_agent(kind: str) -> Any:
        async def agent(stream: faust.StreamT) -> None:
            async for event in records(stream):
                message = event.message
                labelled(RECORDS_IN, "detect", message.topic).inc()
                now_ms = int(time.time() * 1000)
                # Keys are scoped to the partition (a claim item's price window, say, is
                # read and written by one partition only, so its changelog stays right).
                state = PartitionState(detect_state.in_record(), message.partition)
                await publish(
                    detect.handle(
                        kind, message.value, state, now_ms, RawContext.of(message), message.key
                    )
                )

        agent.__name__ = f"detect_{kind}"
        return agent

    for kind in DetectStage.KINDS:
        norm_topic = app.topic(
            kafka.topic(NORM_TOPICS[kind]),
            key_serializer="raw",
            value_serializer="raw",
            partitions=kafka.norm_partitions,
        )
        app.agent(norm_topic, name=f"detect_{kind}")(stops_on_storm(detect_agent(kind)))

    # When this worker last started watching (its last rebalance): silences are measured
    # from here at the earliest, since state kept across a restart remembers devices and
    # feeds the platform could not hear while it was down.
    watching_since = {"ms": int(time.time() * 1000)}

    @app.timer(DEVICE_TICK_S)
    @until_timers_stopped
    @surviving_tick(stage.internal_errors)
    async def device_tick() -> None:
        now_ms = int(time.time() * 1000)
        await publish(stage.device_tick(device_state.in_tick(), now_ms, watching_since["ms"]))

    @app.timer(DETECT_TICK_S)
    @until_timers_stopped
    @surviving_tick(detect.guard.internal_errors)
    async def detect_tick() -> None:
        now_ms = int(time.time() * 1000)
        for partition in range(kafka.norm_partitions):
            state = PartitionState(detect_state.in_tick(), partition)
            await publish(detect.tick(state, now_ms))

    # -- the alert lifecycle: findings, clearances and operator actions -> alert states -----
    lifecycle = LifecycleStage(kafka, registry, rule_file("alert_lifecycle.yaml", rules_dir))
    # Every key of the lifecycle table belongs to one partition (inputs are keyed by rule
    # and subject) and is prefixed with it; the timer sends a tick record to each partition,
    # so escalations and the forgetting of resolved alerts are written inside a record of
    # the partition that owns them, to its changelog. Where the changelog is gone (tansu
    # restarted), `medstream up` sends restore inputs built from ClickHouse's alert_current
    # (medstream.alert_actions.restore_lifecycle) before any worker starts.
    lifecycle_table = TableState(
        app.Table("alert-lifecycle", default=None, partitions=kafka.norm_partitions)
    )
    lifecycle_topic = app.topic(
        kafka.topic(LIFECYCLE_TOPIC),
        key_serializer="raw",
        value_serializer="raw",
        partitions=kafka.norm_partitions,
    )

    @app.agent(lifecycle_topic, name="alert_lifecycle")
    @stops_on_storm
    async def alert_lifecycle(stream: faust.StreamT) -> None:
        async for event in records(stream):
            now_ms = int(time.time() * 1000)
            labelled(RECORDS_IN, "lifecycle", event.message.topic).inc()
            state = PartitionState(lifecycle_table, event.message.partition)
            await publish(
                lifecycle.handle(
                    event.message.value, state, now_ms, RawContext.of(event.message),
                    event.message.key,
                )
            )

    @app.timer(LIFECYCLE_TICK_S, on_leader=True)
    @until_timers_stopped
    @surviving_tick(lifecycle.guard.internal_errors)
    async def lifecycle_tick() -> None:
        tick = lifecycle.inputs.tick(int(time.time() * 1000))
        for partition in range(kafka.norm_partitions):
            delivery = await app.producer.send(
                tick.topic, None, tick.value, partition, None, None
            )
            cast(asyncio.Future, delivery).add_done_callback(exit_on_failed_delivery)

    # -- the master patient index: one partition, one owner of every person -----------------
    patient_index = PatientIndexStage(
        kafka, registry, derived_key(secret, "mpi.person"), rule_file("mpi.yaml", rules_dir)
    )
    index_state = TableState(app.Table("mpi-state", default=None, partitions=1))
    identity_topic = app.topic(
        kafka.topic(IDENTITY_TOPIC), key_serializer="raw", value_serializer="raw", partitions=1
    )

    @app.agent(identity_topic, name="patient_index")
    @stops_on_storm
    async def patient_index_agent(stream: faust.StreamT) -> None:
        async for event in records(stream):
            labelled(RECORDS_IN, "mpi", event.message.topic).inc()
            now_ms = int(time.time() * 1000)
            message = event.message
            await publish(
                patient_index.handle(
                    message.value, index_state, now_ms, RawContext.of(message), message.key
                )
            )

    # -- feeds: every worker's per-minute counts -> one watcher of every feed ---------------
    @app.timer(FEED_ACTIVITY_S)
    @until_timers_stopped
    @surviving_tick(stage.internal_errors)
    async def send_feed_activity() -> None:
        await publish(stage.feed_activity_outputs())

    feed_watch = FeedWatchStage(kafka, registry, rule_file("feeds.yaml", rules_dir))
    feed_state = TickOverlay(TableState(app.Table("feed-state", default=None, partitions=1)))
    feed_topic = app.topic(
        kafka.topic(FEED_ACTIVITY_TOPIC), key_serializer="raw", value_serializer="raw",
        partitions=1,
    )

    @app.agent(feed_topic, name="feed_watch")
    @stops_on_storm
    async def feed_watch_agent(stream: faust.StreamT) -> None:
        async for event in records(stream):
            now_ms = int(time.time() * 1000)
            state = feed_state.in_record()
            await publish(
                feed_watch.handle(
                    event.message.value, state, now_ms, RawContext.of(event.message),
                    event.message.key,
                )
            )

    @app.timer(FEED_TICK_S)
    @until_timers_stopped
    @surviving_tick(feed_watch.guard.internal_errors)
    async def feed_tick() -> None:
        now_ms = int(time.time() * 1000)
        await publish(feed_watch.tick(feed_state.in_tick(), now_ms, watching_since["ms"]))

    # -- public health: syndromic counts per district and hour -------------------------------
    syndromic = SyndromicStage(kafka, registry, rule_file("syndromic.yaml", rules_dir))
    syndromic_state = TickOverlay(
        TableState(app.Table("syndromic-state", default=None, partitions=1))
    )
    syndromic_topic = app.topic(
        kafka.topic(SYNDROMIC_TOPIC), key_serializer="raw", value_serializer="raw", partitions=1
    )

    @app.agent(syndromic_topic, name="syndromic")
    @stops_on_storm
    async def syndromic_agent(stream: faust.StreamT) -> None:
        async for event in records(stream):
            now_ms = int(time.time() * 1000)
            state = syndromic_state.in_record()
            await publish(
                syndromic.handle(
                    event.message.value, state, now_ms, RawContext.of(event.message),
                    event.message.key,
                )
            )

    @app.timer(DETECT_TICK_S)
    @until_timers_stopped
    @surviving_tick(syndromic.guard.internal_errors)
    async def syndromic_tick() -> None:
        await publish(syndromic.tick(syndromic_state.in_tick(), int(time.time() * 1000)))

    async def mark_ready(
        sender: Any, /, *args: Any, signal: BaseSignalT[Any], **kwargs: Any
    ) -> None:
        watching_since["ms"] = int(time.time() * 1000)
        READY.labels("streams").set(1)

    app.on_rebalance_complete.connect(mark_ready)
    raw_topic_names = {kafka.topic(name) for name in RAW_TOPICS.values()}

    lag_topics: set[str] = set()

    @app.timer(LAG_REPORT_S)
    async def report_lag() -> None:
        # Lag = high watermark - next offset to read (after the last record read since the
        # assignment, else the committed offset Faust sought to: from the broker at the
        # assignment, updated at each commit) + records read but not processed yet. So a
        # restarted worker with nothing new to read reports 0 rather than the whole
        # partition, and one with its buffers full does not report 0. On tansu the watermark
        # under-counts by up to one produce batch: a lower bound there. A topic with a
        # partition whose watermark is unknown is not reported (unknown is not 0).
        consumer = cast(ShortFetchConsumer, app.consumer)
        held = [tp for tp in consumer.assignment() if tp.topic in raw_topic_names]
        highs = {tp: fetched_high_watermark(consumer, tp) for tp in held}
        unknown = [tp for tp, high in highs.items() if high is None or high < 0]
        if unknown:
            # Not fetched yet since the assignment: asked of the broker, so that a worker
            # that was just assigned reports its lag at once rather than after a fetch.
            try:
                highs.update(
                    await asyncio.wait_for(consumer.highwaters(*unknown), LAG_REPORT_S * 5)
                )
            except (KafkaError, ConsumerNotStarted, OSError, TimeoutError) as exc:
                log.debug("high watermarks of %d partitions not known yet: %s",
                          len(unknown), exc)
        read_offsets = app.monitor.tp_read_offsets
        committed = consumer._committed_offset
        # Read means handed to the agents' buffers: what is still there is not processed.
        unprocessed: dict[TP, int] = {}
        for message in list(consumer._unacked_messages):
            if message.offset >= (committed.get(message.tp) or 0):
                unprocessed[message.tp] = unprocessed.get(message.tp, 0) + 1
        positions = []
        for tp, high in highs.items():
            read = read_offsets.get(tp)
            positions.append(PartitionPosition(
                tp.topic, high, None if read is None else read + 1, committed.get(tp),
                unprocessed.get(tp, 0),
            ))
        report_consumer_lag(STAGE, topic_lags(positions), lag_topics)

    stall_watch = StallWatch(holes=app.transaction_gate is None,
                             count_records=records_counter(kafka))

    @app.timer(LAG_REPORT_S)
    async def watch_stalls() -> None:
        # Partitions held but left behind (streams.stall_watch); never ends the worker.
        try:
            await watch_and_unstick(app, stall_watch)
        except Exception as exc:
            log.warning("the stall watch failed (%r); it looks again in %.0fs",
                        exc, LAG_REPORT_S)

    for noisy in ("aiokafka", "faust", "mode"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return app
