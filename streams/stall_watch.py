"""A worker's watch over the partitions it holds but does not finish.

Faust can leave a partition behind without any error (seen in a worker-kill fault trial,
from the broker's own logs): after the rebalance its read offset was past records it had
never handed to an agent (they were in a stream queue cleared at the revoke), so it dropped
them as "already read" when they were fetched again. On one partition the hole in its
acknowledgements then held the commit back for good (73 records behind, the worker
reporting lag 0); on another the jump was taken for a gap and acknowledged, so the commit
went past 4 records no agent had processed (lost). :class:`streams.app.ShortFetchConsumer`
no longer acknowledges such jumps on raw topics; this watch finds partitions left behind:

- a commit held back by a hole (records acknowledged past the committed offset, which has
  not moved), whatever the traffic;
- records fetched past the committed offset with nothing acknowledged after it, or
  records to fetch (the high watermark past the fetch position) that nothing fetches,
  once nothing of the topic is in an agent's hands or queue,

for ``STALL_AFTER_S``, with no rebalance or table recovery under way. It says so (a
WARNING with Faust's state for the partition, a metric) and, at least once, reads the
partition again from its committed offset (what was processed comes again and is collapsed
by event id downstream). A hole is accepted as a gap only where it holds no records: on a
raw topic (every offset a record) only what the broker's retention deleted, said as a
loss; elsewhere what reading again did not fill (transaction markers of an earlier
exactly_once run, compaction). Under exactly_once the transaction gate stops the worker on
a jump in a raw partition, and the watch only warns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from faust.types import TP

from medstream.metrics import OFFSET_GAPS, STALLED_PARTITIONS, labelled

log = logging.getLogger(__name__)

#: Longer than a commit interval and than any pause Faust makes on purpose outside
#: rebalances (a full buffer drains in well under a second), short against a drain timeout.
STALL_AFTER_S = 20.0
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
    #: is under way: the commit is not held by a hole.
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
        """Records were acknowledged past a hole at the committed offset: the commit cannot
        move whatever the traffic (Faust commits from the committed offset on only)."""
        return (
            self.committed is not None and self.lowest_acked is not None
            and self.lowest_acked > self.committed and not self.settling
        )


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
    #: (tp, committed, position) of partitions read again: a hole found again at the same
    #: place after that holds no records.
    sought: set[tuple[TP, int | None, int | None]] = field(default_factory=set)
    #: Since when a rebalance or recovery has been under way (None: none is).
    busy_since: float | None = None
    busy_reported: float | None = None

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
        - a hole holding the commit back (acknowledged records past the committed offset):
          the committed offset, whatever the traffic;
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
            held_back = self.holes and partition.held_back
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
            if now - seen.since >= self.after_s:
                stalls.append(Stall(partition, now - seen.since, held_back or trailing,
                                    seen.repeats + 1))
                seen = _Seen(state, now, seen.repeats + 1)
            current[tp] = seen
        self._seen = current
        return stalls


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
    committing = consumer._commit_fut is not None
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
        settling = committing or (
            lowest is not None and any(o < lowest for o in in_hand.get(tp, ()))
        )
        held.append(HeldPartition(tp, high, positions.get(tp), committed.get(tp),
                                  tp.topic in busy, lowest, settling))
    return held


def rebalancing(app: Any) -> bool:
    """A rebalance or a table recovery is under way (Faust pauses partitions then)."""
    return bool(app.rebalancing or getattr(app, "in_recovery", False))


async def watch_and_unstick(app: Any, watch: StallWatch) -> None:
    """One look over the held partitions; each stalled one is reported and, at least once,
    read again from its committed offset. A hole is accepted as a gap only where it holds
    no records: on a raw topic only what retention deleted (said as a loss), elsewhere
    what reading again from the committed offset did not fill."""
    busy = rebalancing(app)
    stuck_s = watch.stuck_rebalancing(busy)
    if stuck_s is not None:
        recovery = app.tables.recovery
        log.warning("a rebalance or table recovery has been under way for %.0fs: every "
                    "partition this worker holds stays paused (changelog records still to "
                    "recover: %s)", stuck_s,
                    recovery.active_remaining_total() if recovery.need_recovery() else 0)
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
        place = (tp, partition.committed, partition.position)
        if stall.hole and partition.committed is not None:
            if tp.topic in app.contiguous_topics:
                start = (await consumer.earliest_offsets(tp)).get(tp)
                if start is not None and start > partition.committed:
                    accept_gap(consumer, watch, partition, described, start,
                               "deleted by the broker's retention before any agent "
                               "processed them: LOST", lost=True)
                    continue
            elif place in watch.sought:
                accept_gap(consumer, watch, partition, described, None,
                           "reading it again did not fill them: no records there "
                           "(transaction markers, compaction or retention)")
                continue
        resume_from = partition.committed if partition.committed is not None else (
            partition.position)
        if resume_from is None:
            log.warning("%s; no committed offset nor fetch position to read it again from",
                        described)
            continue
        log.warning("%s; reading it again from offset %d", described, resume_from)
        await consumer.seek_wait({tp: resume_from})  # in the consumer's thread
        watch.sought.add(place)
        if rebalancing(app) or tp not in consumer.assignment():
            continue  # the rebalance resumes it after its recovery
        consumer._buffered_partitions.discard(tp)
        consumer.resume_partitions({tp})


def accept_gap(consumer: Any, watch: StallWatch, partition: HeldPartition,
               described: str, end: int | None, why: str, lost: bool = False) -> None:
    """Acknowledge the hole from the committed offset to ``end`` (exclusive; None: to the
    lowest acknowledged offset, else the fetch position) as a gap so the commit moves on;
    logged and counted (medstream_offset_gaps)."""
    tp, committed = partition.tp, partition.committed
    assert committed is not None
    if end is None:
        acked = consumer._acked.get(tp) or []
        end = min(acked) if acked else partition.position
    assert end is not None
    (log.error if lost else log.warning)(
        "%s; offsets %d-%d %s; accepted as a gap", described, committed, end - 1, why)
    labelled(OFFSET_GAPS, "streams", tp.topic).inc()
    if end > committed:
        consumer._gap[tp].addi(committed, end)
        consumer._gap[tp].merge_overlaps()
    watch.accepted.add((tp, committed, partition.position))
