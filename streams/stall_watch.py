"""A worker's watch over the partitions it holds but does not finish.

Faust can leave a partition behind without any error (seen in a worker-kill fault trial,
from the broker's own logs): after the rebalance its read offset was past records it had
never handed to an agent (they were in a stream queue cleared at the revoke), so it dropped
them as "already read" when they were fetched again. On one partition the hole in its
acknowledgements then held the commit back for good (73 records behind, the worker
reporting lag 0); on another the jump was taken for a gap and acknowledged, so the commit
went past 4 records no agent had processed (lost). At least once,
:class:`streams.app.ShortFetchConsumer` no longer acknowledges such jumps on any topic an
agent reads, nor commits while a committed offset is unknown; this watch finds partitions
left behind:

- a commit held back by a hole (records acknowledged past the committed offset, which has
  not moved, or no committed offset known), whatever the traffic;
- records fetched past the committed offset with nothing acknowledged after it, or
  records to fetch (the high watermark past the fetch position) that nothing fetches,
  once nothing of the topic is in an agent's hands or queue,

for ``STALL_AFTER_S``, with no rebalance or table recovery under way. It says so (a
WARNING with Faust's state for the partition, a metric) and, at least once, reads the
partition again from its committed offset (what was processed comes again and is collapsed
by event id downstream). A hole is accepted as a gap only where it holds no records: what
the broker's retention deleted (said as a loss), or, found again at the same committed
offset after reading it again, a range that a read of its own (read_committed, apart from
the worker) finds empty (transaction markers of an earlier exactly_once run). Under
exactly_once the transaction gate stops the worker on a jump in a raw partition, and the
watch only warns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaException
from faust.types import TP

from medstream.metrics import OFFSET_GAPS, STALLED_PARTITIONS, labelled
from medstream.offsets import ReadUnfinished, count_records
from medstream.settings import KafkaSettings

log = logging.getLogger(__name__)

#: Longer than a commit interval and than any pause Faust makes on purpose outside
#: rebalances (a full buffer drains in well under a second), short against a drain timeout.
STALL_AFTER_S = 20.0
#: How long the read of a hole's range (before it is accepted as a gap) may take.
VERIFY_TIMEOUT_S = 30.0
#: A changelog partition stranded (fetched past its end, not read by recovery) this long
#: is read again: recovery reads a changelog in well under a second per thousand records.
RECOVERY_STALL_S = 10.0
#: A rebalance with its table recovery takes seconds to tens of seconds here; one under way
#: for longer is a worker stuck in it (every partition paused).
REBALANCE_STUCK_S = 120.0


@dataclass(frozen=True)
class HeldPartition:
    """What a worker knows of one partition it holds, at one moment."""

    tp: TP
    #: High watermark of the last fetch (the last stable offset under transactions).
    high_watermark: int | None
    #: The consumer's fetch position: the next offset it hands to Faust (past transaction
    #: markers and aborted records); None while it has none.
    position: int | None
    #: Faust's committed offset (the next offset to process), None if it knows none.
    committed: int | None
    #: Records of its topic in an agent's hands or queue (the agent has work: not stalled).
    topic_busy: bool = False
    #: The lowest offset agents acknowledged that Faust has not committed yet (None: none).
    lowest_acked: int | None = None
    #: A record of this partition below ``lowest_acked`` is in an agent's hands, or a commit
    #: of this partition is under way: at this moment the commit is not held by a hole.
    settling: bool = False

    @property
    def to_fetch(self) -> int:
        """Records between the fetch position and the high watermark (0 when unknown)."""
        if self.high_watermark is None or self.high_watermark < 0 or self.position is None:
            return 0
        return max(0, self.high_watermark - self.position)

    @property
    def unfinished(self) -> int:
        """Offsets fetched past the committed offset (0 when either is unknown)."""
        if self.position is None or self.committed is None:
            return 0
        return max(0, self.position - self.committed)

    @property
    def held_back(self) -> bool:
        """Records were acknowledged past a hole at the committed offset, or while the
        committed offset is unknown (the seek after an assignment did not complete): the
        commit cannot move whatever the traffic (it moves from the committed offset on
        only). ``settling`` says whether that is so at this very moment."""
        return self.lowest_acked is not None and (
            self.committed is None or self.lowest_acked > self.committed
        )


@dataclass(frozen=True)
class Stranded:
    """A changelog partition table recovery still needs that the consumer has fetched past
    its last offset: its records were handed out and dropped, and recovery waits for them
    until the next rebalance (the worker's stream partitions paused meanwhile)."""

    tp: TP
    #: The last offset recovery read (-1: none) and the partition's last offset.
    read: int
    last: int
    #: aiokafka's fetch position (past ``last``).
    position: int


@dataclass(frozen=True)
class Stall:
    """A partition found stalled: what it was, for how long, and which kind."""

    partition: HeldPartition
    for_s: float
    #: True: records fetched but not finished (a hole); False: records not fetched.
    hole: bool
    #: How many times in a row it was found stalled at the same positions.
    repeats: int


@dataclass
class _Seen:
    state: tuple[str, int | None, int | None]
    since: float
    repeats: int = 0


@dataclass
class StallWatch:
    """Tracks each held partition's progress; :meth:`stalled` names the stalled ones.

    ``holes`` is False under exactly_once: there a committed offset one short of the fetch
    position is the trailing transaction marker, not a hole.
    """

    holes: bool = True
    after_s: float = STALL_AFTER_S
    clock: Callable[[], float] = time.monotonic
    _seen: dict[TP, _Seen] = field(default_factory=dict)
    #: (tp, committed, position) of holes accepted as gaps: not reported again.
    accepted: set[tuple[TP, int | None, int | None]] = field(default_factory=set)
    #: (tp, committed offset) of partitions read again: a hole found again at the same
    #: committed offset is read by ``count_records`` before it is accepted as a gap.
    sought: set[tuple[TP, int | None]] = field(default_factory=set)
    #: The records (read_committed) at offsets [low, end) of a partition, read apart from
    #: the worker; None when they could not be read. None: no hole is ever accepted
    #: unless retention deleted it.
    count_records: Callable[[TP, int, int], Awaitable[int | None]] | None = None
    #: Since when a rebalance or recovery has been under way (None: none is).
    busy_since: float | None = None
    busy_reported: float | None = None
    #: Changelog partitions found stranded: (read to, fetch position) and since when.
    _stranded: dict[TP, tuple[tuple[int, int], float]] = field(default_factory=dict)

    def stranded_for_long(self, stranded: Iterable[Stranded]) -> list[Stranded]:
        """The changelog partitions stranded at the same place for RECOVERY_STALL_S (each
        reported once a period)."""
        now = self.clock()
        current: dict[TP, tuple[tuple[int, int], float]] = {}
        found = []
        for partition in stranded:
            place = (partition.read, partition.position)
            seen = self._stranded.get(partition.tp)
            since = seen[1] if seen is not None and seen[0] == place else now
            if now - since >= RECOVERY_STALL_S:
                found.append(partition)
                since = now
            current[partition.tp] = (place, since)
        self._stranded = current
        return found

    def stuck_rebalancing(self, busy: bool) -> float | None:
        """Seconds a rebalance or table recovery has been under way, once it is longer
        than REBALANCE_STUCK_S (then once a period); None otherwise. Every partition stays
        paused meanwhile, and the stall checks are off."""
        now = self.clock()
        if not busy:
            self.busy_since = self.busy_reported = None
            return None
        if self.busy_since is None:
            self.busy_since = now
        last = self.busy_reported if self.busy_reported is not None else self.busy_since
        if now - last >= REBALANCE_STUCK_S:
            self.busy_reported = now
            return now - self.busy_since
        return None

    def stalled(self, held: Iterable[HeldPartition], busy: bool) -> list[Stall]:
        """The partitions stalled for at least ``after_s``.

        Three kinds, each with what counts as progress:
        - a hole holding the commit back (acknowledged records past the committed offset,
          or no committed offset known): the committed offset, whatever the traffic; a
          look where it is ``settling`` (a commit of it under way, a record below in an
          agent's hands) is not reported but keeps its clock (commits of other partitions
          every second would otherwise restart it for good);
        - a hole at the end (fetched past the committed offset, nothing acknowledged
          after it) and records to fetch that are not fetched: the fetch position and the
          committed offset, only while nothing of the topic is in an agent's hands or
          queue (else the agent is slow, not stalled).
        ``busy`` (a rebalance or a table recovery under way) restarts every clock: Faust
        pauses partitions then on purpose. A partition reported stalled restarts its clock
        (reported once a period) and counts a repeat while it stays the same.
        """
        now = self.clock()
        current: dict[TP, _Seen] = {}
        stalls: list[Stall] = []
        for partition in held:
            tp = partition.tp
            accepted = (tp, partition.committed, partition.position) in self.accepted
            held_back = self.holes and partition.held_back and not accepted
            trailing = (
                self.holes and not held_back and partition.lowest_acked is None
                and partition.unfinished > 0 and not accepted and not partition.topic_busy
            )
            unfetched = partition.to_fetch > 0 and not partition.topic_busy
            if busy or not (held_back or trailing or unfetched):
                continue
            # What must not move for it to be a stall.
            state = (
                ("held back", partition.committed, None) if held_back
                else ("stuck", partition.committed, partition.position)
            )
            seen = self._seen.get(tp)
            if seen is None or seen.state != state:
                current[tp] = _Seen(state, now)
                continue
            if now - seen.since >= self.after_s and not (held_back and partition.settling):
                stalls.append(Stall(partition, now - seen.since, held_back or trailing,
                                    seen.repeats + 1))
                seen = _Seen(state, now, seen.repeats + 1)
            current[tp] = seen
        self._seen = current
        return stalls


def records_counter(kafka: KafkaSettings) -> Callable[[TP, int, int], Awaitable[int | None]]:
    """StallWatch.count_records on the broker: a consumer of its own (no group, no commit,
    read_committed) reads the partition from ``low`` to its end in a thread and counts the
    records below ``end``; None (said) when it could not within VERIFY_TIMEOUT_S."""
    async def count(tp: TP, low: int, end: int) -> int | None:
        partition = (tp.topic, tp.partition)
        try:
            counts = await asyncio.to_thread(
                count_records, kafka, {partition: low}, {partition: end}, VERIFY_TIMEOUT_S
            )
        except (ReadUnfinished, KafkaException) as exc:
            log.warning("%s[%d]: offsets %d-%d could not be read to check for records: %s",
                        tp.topic, tp.partition, low, end - 1, exc)
            return None
        return counts[partition]

    return count


def faust_state(consumer: object, tp: TP) -> str:
    """Faust's bookkeeping for ``tp``, for the warning (its private attributes, read only)."""
    def holds(name: str) -> str:
        tps = getattr(consumer, name, None)
        return "?" if tps is None else ("yes" if tp in tps else "no")

    read_offsets = getattr(consumer, "_read_offset", {})
    acked = getattr(consumer, "_acked", {}).get(tp) or []
    return (
        f"fetched: {holds('_active_partitions')}, paused: {holds('_paused_partitions')}, "
        f"paused for a full buffer: {holds('_buffered_partitions')}, "
        f"read offset: {read_offsets.get(tp) if tp in read_offsets else 'none'}, "
        f"acknowledged not committed: {len(acked)}"
        f"{f' from {min(acked)}' if acked else ''}, "
        f"flow active: {getattr(consumer, 'flow_active', '?')}"
    )


def fetch_positions(consumer: Any, tps: Iterable[TP]) -> dict[TP, int | None]:
    """aiokafka's fetch position of each partition (read from the consumer's own thread's
    state, read only; None while it has none or the consumer is not running)."""
    aiokafka_consumer = getattr(getattr(consumer, "_thread", None), "_consumer", None)
    subscription = getattr(getattr(aiokafka_consumer, "_subscription", None),
                           "subscription", None)
    assignment = getattr(subscription, "assignment", None)
    positions: dict[TP, int | None] = {}
    for tp in tps:
        state = assignment.state_value(tp) if assignment is not None else None
        positions[tp] = getattr(state, "_position", None)
    return positions


def busy_topics(app: Any, in_hand: Iterable[TP]) -> set[str]:
    """Topics with records in an agent's hands (``in_hand``: partitions with records taken,
    not acknowledged) or queue."""
    busy = {tp.topic for tp in in_hand}
    for topic, channels in list(app.topics._topic_name_index.items()):
        if any(getattr(channel, "_queue", None) is not None and channel._queue.qsize()
               for channel in list(channels)):
            busy.add(topic)
    return busy


def held_partitions(app: Any) -> list[HeldPartition]:
    """Every stream partition the worker holds (not the changelogs), as it stands."""
    consumer = app.consumer
    changelogs = app.tables.changelog_topics
    tps = [tp for tp in consumer.assignment() if tp.topic not in changelogs]
    positions = fetch_positions(consumer, tps)
    committed = consumer._committed_offset
    committing: frozenset[TP] = getattr(consumer, "committing", frozenset())
    in_hand: dict[TP, list[int]] = {}
    for message in list(consumer._unacked_messages):
        if not message.acked:
            in_hand.setdefault(message.tp, []).append(message.offset)
    busy = busy_topics(app, in_hand)
    held = []
    for tp in tps:
        try:
            high = consumer.highwater(tp)
        except AssertionError:  # revoked meanwhile (the consumer runs in its own thread)
            continue
        acked = consumer._acked.get(tp)
        lowest = min(acked) if acked else None
        settling = tp in committing or (
            lowest is not None and any(o < lowest for o in in_hand.get(tp, ()))
        )
        held.append(HeldPartition(tp, high, positions.get(tp), committed.get(tp),
                                  tp.topic in busy, lowest, settling))
    return held


def stranded_changelogs(app: Any) -> list[Stranded]:
    """The changelog partitions table recovery still needs whose fetch position is past
    their last offset. A fetch under way at a revoke resumes at the next assignment with
    Faust's set of partitions emptied, which aiokafka reads as every partition: it hands
    out the changelogs' records, Faust drops them (its flow is stopped), and only stream
    partitions are sought back (:class:`streams.app.ShortFetchConsumerThread` puts such
    records back; this finds what slips past it)."""
    recovery = app.tables.recovery
    needed = [tp for tp, left in recovery.active_remaining().items() if left > 0]
    positions = fetch_positions(app.consumer, needed)
    stranded = []
    for tp in needed:
        last, read, position = (recovery.active_highwaters.get(tp),
                                recovery.active_offsets.get(tp), positions.get(tp))
        if last is not None and read is not None and position is not None and position > last:
            stranded.append(Stranded(tp, read, last, position))
    return stranded


def rebalancing(app: Any) -> bool:
    """A rebalance or a table recovery is under way (Faust pauses partitions then)."""
    return bool(app.rebalancing or getattr(app, "in_recovery", False))


async def watch_and_unstick(app: Any, watch: StallWatch) -> None:
    """One look: a changelog recovery waits for that was fetched past its end is read
    again; each stalled partition is reported and, at least once, read again from its
    committed offset (every partition, once per look, where a committed offset is
    unknown). A hole is accepted as a gap only where it holds no records: what retention
    deleted (said as a loss), or what a read of its own finds empty after reading again
    did not fill it."""
    busy = rebalancing(app)
    recovery = app.tables.recovery
    # Not under exactly_once: there every changelog ends in a commit marker, so recovery
    # always looks stranded until Faust's own end-of-recovery check, which a seek here
    # would put off for good (review 6 H1).
    stranded = (stranded_changelogs(app)
                if app.transaction_gate is None and recovery.need_recovery() else [])
    for strand in watch.stranded_for_long(stranded):
        await read_stranded_again(app, watch, strand)
    stuck_s = watch.stuck_rebalancing(busy)
    if stuck_s is not None:
        log.warning("a rebalance or table recovery has been under way for %.0fs: every "
                    "partition this worker holds stays paused (changelog records still to "
                    "recover: %s%s)", stuck_s,
                    recovery.active_remaining_total() if recovery.need_recovery() else 0,
                    "".join(f"; {p.tp.topic}[{p.tp.partition}] read to {p.read} of {p.last}, "
                            f"fetched to {p.position}" for p in stranded))
    sought_all = False
    for stall in watch.stalled(held_partitions(app), busy):
        partition = stall.partition
        tp = partition.tp
        consumer = app.consumer
        if partition.held_back:
            what = (f"the commit held at {partition.committed} by a hole (records "
                    f"acknowledged from {partition.lowest_acked})")
        elif stall.hole:
            what = (f"{partition.unfinished} offsets fetched past its committed offset "
                    f"{partition.committed} not finished")
        else:
            what = f"{partition.to_fetch} records to fetch not fetched"
        described = (f"{tp.topic}[{tp.partition}] stalled: {what} for {stall.for_s:.0f}s "
                     f"(fetch position {partition.position}, high watermark "
                     f"{partition.high_watermark}, {faust_state(consumer, tp)})")
        labelled(STALLED_PARTITIONS, "streams", tp.topic).inc()
        if app.transaction_gate is not None:
            log.warning("%s; under exactly_once nothing is sought here (the transaction gate "
                        "stops the worker on a jump in a raw partition)", described)
            continue
        if rebalancing(app) or tp not in consumer.assignment():
            continue  # a rebalance began since the look: it seeks every partition anyway
        committed = partition.committed
        if partition.held_back and committed is None:
            # The seek after the assignment did not complete (nothing commits then).
            log.warning("%s; its committed offset is unknown: %s", described,
                        "sought with every partition" if sought_all else
                        "every partition is sought to its committed offset again")
            if not sought_all:
                await consumer.perform_seek()
                sought_all = True
            continue
        if stall.hole and committed is not None:
            start = (await consumer.earliest_offsets(tp)).get(tp)
            if start is not None and start > committed:
                accept_gap(consumer, watch, partition, described, start,
                           "deleted by the broker's retention before any agent "
                           "processed them: LOST", lost=True)
                continue
            if (tp, committed) in watch.sought:
                end = hole_end(consumer, partition)
                records = (None if watch.count_records is None
                           else await watch.count_records(tp, committed, end))
                if records == 0:
                    accept_gap(consumer, watch, partition, described, end,
                               "hold no record (a read of them found none: transaction "
                               "markers of an earlier exactly_once run)")
                    continue
                described += (f"; offsets {committed}-{end - 1} could not be read to check "
                              "them" if records is None
                              else f"; offsets {committed}-{end - 1} hold {records} records")
        resume_from = committed if committed is not None else partition.position
        if resume_from is None:
            log.warning("%s; no committed offset nor fetch position to read it again from",
                        described)
            continue
        log.warning("%s; reading it again from offset %d", described, resume_from)
        await consumer.seek_wait({tp: resume_from})  # in the consumer's thread
        watch.sought.add((tp, committed))
        if rebalancing(app) or tp not in consumer.assignment():
            continue  # the rebalance resumes it after its recovery
        consumer._buffered_partitions.discard(tp)
        consumer.resume_partitions({tp})


def hole_end(consumer: Any, partition: HeldPartition) -> int:
    """Where a hole from the committed offset ends (exclusive): the lowest acknowledged
    offset, else the fetch position."""
    acked = consumer._acked.get(partition.tp) or []
    end = min(acked) if acked else partition.position
    assert end is not None
    return int(end)


async def read_stranded_again(app: Any, watch: StallWatch, strand: Stranded) -> None:
    """Seek a stranded changelog partition to the record after the last one recovery read,
    if records are left there (a tail of transaction markers of an earlier exactly_once
    run is not stranded) and no rebalance came meanwhile."""
    tp, consumer = strand.tp, app.consumer
    generation = app.consumer_generation_id
    left = (None if watch.count_records is None
            else await watch.count_records(tp, strand.read + 1, strand.last + 1))
    if left == 0:
        log.debug("%s[%d]: recovery read to %d; offsets to %d hold no record", tp.topic,
                  tp.partition, strand.read, strand.last)
        return
    if app.consumer_generation_id != generation or tp not in consumer.assignment():
        return  # a rebalance came: its recovery seeks the changelogs itself
    if app.tables.recovery.active_offsets.get(tp) != strand.read:
        return  # recovery moved on (or ended) while the records were counted
    log.warning("table recovery: %s[%d] fetched to %d, past its last offset %d, but read only "
                "to %d for %.0fs (%s records left; they were handed out and dropped across a "
                "rebalance); reading it again from %d", tp.topic, tp.partition, strand.position,
                strand.last, strand.read, RECOVERY_STALL_S, "unknown" if left is None else left,
                strand.read + 1)
    labelled(STALLED_PARTITIONS, "streams", tp.topic).inc()
    await consumer.seek_wait({tp: strand.read + 1})


def accept_gap(consumer: Any, watch: StallWatch, partition: HeldPartition,
               described: str, end: int, why: str, lost: bool = False) -> None:
    """Acknowledge the hole from the committed offset to ``end`` (exclusive) as a gap so
    the commit moves on; logged and counted (medstream_offset_gaps)."""
    tp, committed = partition.tp, partition.committed
    assert committed is not None
    (log.error if lost else log.warning)(
        "%s; offsets %d-%d %s; accepted as a gap", described, committed, end - 1, why)
    labelled(OFFSET_GAPS, "streams", tp.topic).inc()
    if end > committed:
        consumer._gap[tp].addi(committed, end)
        consumer._gap[tp].merge_overlaps()
    watch.accepted.add((tp, committed, partition.position))
