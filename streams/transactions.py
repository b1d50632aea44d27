"""Exactly-once processing on Apache Kafka (MEDSTREAM_STREAMS_PROCESSING_GUARANTEE=exactly_once).

Every output record and every table (changelog) write caused by an input record goes
into the Kafka transaction of that record's partition, together with the record's
offset; consumers reading ``read_committed`` (the sink, the next Faust hop) see a
record's outputs exactly once, or not at all when the worker died before the commit
(the record is then processed again by the next owner of its partition).

Faust's exactly_once mode (faust-streaming 0.15) leaves holes this module closes, each
seen in a run that killed a worker (tests/e2e/test_exactly_once.py):
- ``app.producer.send`` is not transactional; only ``Topic.send`` goes through the
  transaction manager, which picks the transactional id by the *output* topic (a
  ``KeyError`` for a topic the app does not consume, the wrong transaction otherwise);
- table writes go through the producer buffer and are sent after the record was
  acknowledged, possibly into the next transaction (``TransactionManager.send_soon``
  raises ``NotImplementedError``);
- a commit takes its offsets before it takes the transaction's lock, so the outputs of a
  record processed in between are committed without that record's offset;
- on a rebalance Faust forgets the acknowledged offsets of every partition (aiokafka
  revokes them all) *before* its last commit, so that commit covers nothing while the
  open transaction keeps the outputs; the consumer then seeks back and the same records
  are processed into that transaction again (9-24 events twice, read_committed);
- after a table recovery Faust seeks back to the committed offsets and delivers again
  records already processed into the open transaction (5 events twice);
- aiokafka fetches a new owner's committed offsets when it joins, before the previous
  owner's last transaction is necessarily complete, and Faust lets records flow from
  there before its own seek.
Here a record is processed inside a :class:`TransactionGate` slot: its sends go to the
transactional producer of its input partition (a context variable says which), its table
writes are held and sent before the record is acknowledged (Faust's transaction manager
picks the same transaction for them, as every table has its source topic's partition
count; the gate checks it), and the gate remembers the record's offset. A commit waits
until no slot is held and puts into each transaction exactly the offsets of the records
whose outputs it holds. The stream partitions of a new assignment stay paused until Faust
has sought them to the committed offsets (after the new transactional producers started,
which completes or aborts the previous owner's transactions), and a record delivered again
is acknowledged without being processed. Records from timers (silence checks, escalation
ticks, feed activity counts) carry no input offset: they go through the plain idempotent
producer, at-least-once, collapsed by event id downstream as before (a feed activity
count can be lost or counted twice when a worker dies).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from aiokafka.errors import ProducerFenced
from aiokafka.structs import TopicPartition
from faust.types import TP

log = logging.getLogger("medstream.streams")
#: The transaction of the input record the running agent task is processing, if any.
_CURRENT: ContextVar[RecordTransaction | None] = ContextVar("medstream_transaction", default=None)


class RecordsSkipped(RuntimeError):
    """The consumer delivered a raw record past one it never delivered: committing would
    lose the skipped ones, so the worker stops and its successor reads them again."""


class TransactionPoisoned(RuntimeError):
    """A record failed midway: its partial outputs sit in an open transaction, so this
    worker must never commit again (the transaction is aborted when it is fenced)."""


@dataclass
class RecordTransaction:
    """The transaction one input record writes into, and the table writes it held back."""

    transactional_id: str
    changelog: list[Any] = field(default_factory=list)


def current_transactional_id() -> str | None:
    """The transactional id the running agent's record writes into (None outside one)."""
    current = _CURRENT.get()
    return None if current is None else current.transactional_id


def hold_changelog(future_message: Any) -> bool:
    """Keep a table write for the running record's transaction; False outside a record."""
    current = _CURRENT.get()
    if current is None:
        return False
    current.changelog.append(future_message)
    return True


def transactional_id(app: Any, topic: str, partition: int) -> str:
    """The transactional id Faust gives the partition group of ``topic``/``partition``."""
    group = app.assignor.group_for_topic(topic)
    return f"{app.conf.id}-{group}-{partition}"


class TransactionGate:
    """Keeps commits and record processing apart: a commit waits until every record
    being processed has sent its outputs and been acknowledged, and no record starts
    while a commit runs, so a committed offset covers exactly the committed outputs."""

    def __init__(self, app: Any, contiguous: frozenset[str] = frozenset()) -> None:
        self._app = app
        #: Input topics written without transactions (the raw.* topics of the collectors).
        self.contiguous = contiguous
        self._open = asyncio.Event()  # cleared while a commit runs
        self._open.set()
        self._idle = asyncio.Event()  # set while no record is in flight
        self._idle.set()
        self._in_flight = 0
        self._commit_lock = asyncio.Lock()
        self.poisoned: BaseException | None = None
        #: False from an assignment until Faust sought its partitions to the committed
        #: offsets (they stay paused until then; a record read anyway stops the worker).
        self.sought_offsets = True
        #: The last offset processed per input partition, and the next offset committed.
        self._processed: dict[TP, int] = {}
        self._committed: dict[TP, int] = {}

    def skip(self, event: Any) -> bool:
        """True for a record at or below the last one processed of its partition: its
        outputs are in the open or a committed transaction already (Faust delivers records
        again after it seeks back)."""
        message = event.message
        last = self._processed.get(TP(message.topic, message.partition))
        return last is not None and message.offset <= last

    def assigned(self, assignment: set[TP]) -> None:
        """A new assignment: nothing is processed until :meth:`sought` says where to start.

        What was processed of a partition kept has been committed (Faust commits before a
        rebalance); if not, its outputs sit in an open transaction that processing from
        the committed offset would fill a second time, so the gate is poisoned instead.
        """
        for tp in assignment:
            last = self._processed.get(tp)
            if last is not None and self._committed.get(tp) != last + 1:
                log.critical("%s[%d]: processed up to %d but not committed before a rebalance; "
                             "stopping", tp.topic, tp.partition, last)
                self.poisoned = self.poisoned or RuntimeError(f"{tp} uncommitted at rebalance")
        self._processed.clear()
        self._committed.clear()
        self.sought_offsets = False

    def sought(self, committed: Mapping[TP, int]) -> None:
        """Faust sought the assigned partitions to ``committed`` (next offsets to read)."""
        self._processed = {tp: offset - 1 for tp, offset in committed.items() if offset > 0}
        self._committed = {tp: offset for tp, offset in committed.items() if offset > 0}
        self.sought_offsets = True

    @asynccontextmanager
    async def record(self, event: Any) -> AsyncIterator[None]:
        """Process ``event`` inside its partition's transaction (acknowledged on success)."""
        message = event.message
        if self.poisoned is not None:
            raise TransactionPoisoned(f"not processing after {self.poisoned!r}")
        if not self.sought_offsets:
            # Its partition should still be paused: its position may be stale.
            raise TransactionPoisoned(
                f"{message.topic}[{message.partition}]@{message.offset} was delivered before "
                "the seek to the committed offsets"
            )
        last = self._processed.get(TP(message.topic, message.partition))
        if last is not None and message.offset > last + 1 and message.topic in self.contiguous:
            # Records of a topic written without transactions take every offset: a jump
            # means the consumer dropped some, and committing past them would lose them.
            log.critical(
                "%s[%d]: offsets %d-%d were never delivered; stopping so that they are read "
                "again", message.topic, message.partition, last + 1, message.offset - 1,
            )
            raise RecordsSkipped(f"{message.topic}[{message.partition}] skipped {last + 1}")
        current = RecordTransaction(transactional_id(self._app, message.topic, message.partition))
        while not self._open.is_set():
            await self._open.wait()
        # No await from here to the try: a commit cannot start in between.
        self._in_flight += 1
        self._idle.clear()
        token = _CURRENT.set(current)
        try:
            yield
            for future_message in current.changelog:
                self._check_changelog(future_message, current.transactional_id)
                await future_message.message.channel.publish_message(future_message, wait=False)
            event.ack()
            self._processed[TP(message.topic, message.partition)] = message.offset
        except BaseException as exc:
            # Also GeneratorExit: an agent that raised leaves its record half done, and
            # the event loop closes the record's generator later, in another task.
            self.poisoned = self.poisoned or exc
            raise
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
            try:
                _CURRENT.reset(token)
            except ValueError:
                pass  # closed from another task: the context var there was never set

    def _check_changelog(self, future_message: Any, record_transaction: str) -> None:
        # Faust's transaction manager sends a table write with the transactional id of
        # the changelog's own partition group: the record's only while every table has
        # as many partitions as the topic it is written from.
        message = future_message.message
        topic = message.channel.get_topic_name()
        if transactional_id(self._app, topic, message.partition) != record_transaction:
            raise TransactionPoisoned(
                f"{topic}[{message.partition}] would be written outside the transaction "
                f"{record_transaction}: a table must have its source topic's partition count"
            )

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold off new records and wait for those in flight: the span of one commit."""
        async with self._commit_lock:
            self._open.clear()
            try:
                while self._in_flight and self.poisoned is None:
                    await self._idle.wait()
                if self.poisoned is not None:
                    raise TransactionPoisoned(
                        f"a record failed midway ({self.poisoned!r}); not committing its "
                        "partial outputs"
                    )
                yield
            finally:
                self._open.set()

    async def commit(self, start_new_transaction: bool = True) -> dict[TP, int]:
        """Commit every transaction holding outputs, each with the offsets of exactly the
        records those outputs came from; the offsets committed (next offset to read).

        With ``start_new_transaction=False`` (before a rebalance or a stop) every open
        transaction is ended, also those holding nothing, so none stays open across it.
        """
        async with self.exclusive():
            pending = {
                tp: offset + 1
                for tp, offset in self._processed.items()
                if self._committed.get(tp) != offset + 1
            }
            by_transaction: dict[str, dict[TP, int]] = defaultdict(dict)
            for tp, offset in pending.items():
                by_transaction[transactional_id(self._app, tp.topic, tp.partition)][tp] = offset
            producer = self._app.producer
            if not start_new_transaction:
                for open_id in list(producer._transaction_producers):
                    by_transaction.setdefault(open_id, {})
            # One producer per transaction: their round trips (add offsets, commit offsets,
            # end transaction) overlap instead of queueing behind each other.
            outcomes = await asyncio.gather(
                *(
                    self._commit_one(open_id, offsets, start_new_transaction)
                    for open_id, offsets in sorted(by_transaction.items())
                ),
                return_exceptions=True,
            )
            failed = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
            if failed:
                # Each commit has ended by now; records must not run into transactions whose
                # offsets may not have been committed with their outputs.
                self.poisoned = self.poisoned or failed[0]
                raise failed[0]
            self._committed.update(pending)
            return pending

    async def _commit_one(
        self, open_id: str, offsets: Mapping[TP, int], start_new_transaction: bool
    ) -> None:
        producer = self._app.producer
        transaction = producer._transaction_producers.get(open_id)
        if transaction is None:
            if offsets:
                # Outputs cannot have been sent without this producer: never reached.
                raise TransactionPoisoned(f"no producer for transaction {open_id}")
            return
        if not transaction._txn_manager.is_in_transaction():
            # Ended before a rebalance or a stop and not begun again: it holds nothing.
            if offsets:
                raise TransactionPoisoned(f"outputs counted for ended transaction {open_id}")
            if start_new_transaction:
                await transaction.begin_transaction()
            return
        try:
            async with producer._trn_locks[open_id]:
                if offsets:
                    await transaction.send_offsets_to_transaction(
                        {TopicPartition(tp.topic, tp.partition): n for tp, n in offsets.items()},
                        self._app.conf.id,
                    )
                await transaction.commit_transaction()
                if start_new_transaction:
                    await transaction.begin_transaction()
        except ProducerFenced:
            # Another worker owns these partitions now: this one is a zombie and stops
            # (its transaction was aborted; the new owner processes the records again).
            log.critical("transaction %s was fenced by another worker; stopping", open_id)
            raise
