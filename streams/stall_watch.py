"""A worker's watch over the partitions it holds but does not finish.

Faust can leave a partition behind without any error (seen in a worker-kill fault trial,
from the broker's own logs): after a rebalance its read offset was past records it had
never handed to an agent (they were in a stream queue cleared at the revoke), so it
dropped them as "already read" when they were fetched again. On one partition the hole
in its acknowledgements then held the commit back for good (73 records behind, the worker
reporting lag 0); on another the jump was taken for a gap and acknowledged, so the commit
went past 4 records no agent had processed (lost). :class:`streams.app.ShortFetchConsumer`
no longer acknowledges such jumps; this watch finds the partitions left behind either way:

- records to fetch (the high watermark past the fetch position) that nothing fetches, or
- at least once: records fetched past the committed offset while nothing of the topic is
  in an agent's hands or queue (a hole the commit cannot pass),

with neither position moving for ``STALL_AFTER_S`` and no rebalance or recovery under way.
It says so (a WARNING with Faust's state for the partition, a metric) and, at least once,
reads the partition again from its committed offset (what was processed comes again and is
collapsed by event id downstream). A hole that is still there after that is not records
(transaction markers of an earlier exactly_once run, compaction, retention): it is accepted
as a gap, logged and counted. Under exactly_once the transaction gate refuses any offset
jump itself (the worker stops and reads again), so the watch only warns there.
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
    position: int | None
    committed: int | None
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

    def stalled(self, held: Iterable[HeldPartition], busy: bool) -> list[Stall]:
        """The partitions stalled for at least ``after_s``.

        ``busy`` (a rebalance or a table recovery under way) restarts every clock: Faust
        pauses partitions then on purpose. A partition whose position or committed offset
        moved, with nothing left to do, or of a topic with records in an agent's hands or
        queue, restarts its own. A partition reported stalled restarts it too (reported
        once a period) and counts a repeat while its positions stay the same.
        """
        now = self.clock()
        current: dict[TP, _Seen] = {}
        stalls: list[Stall] = []
        for partition in held:
            seen = self._seen.get(partition.tp)
            positions = (partition.position, partition.committed)
            moved = seen is None or (seen.position, seen.committed) != positions
            hole = (
                self.holes and partition.unfinished > 0
                and (partition.tp, partition.committed, partition.position) not in self.accepted
            )
            idle = partition.to_fetch == 0 and not hole
            if busy or idle or partition.topic_busy or seen is None:
                current[partition.tp] = _Seen(*positions, now)
                continue
            if moved:
                current[partition.tp] = _Seen(*positions, now)
                continue
            if now - seen.since >= self.after_s:
                stalls.append(Stall(partition, now - seen.since, hole, seen.repeats + 1))
                seen = _Seen(*positions, now, seen.repeats + 1)
            current[partition.tp] = seen
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


def busy_topics(app: Any) -> set[str]:
    """Topics with records in an agent's hands (taken, not acknowledged) or queue."""
    busy = {message.tp.topic for message in list(app.consumer._unacked_messages)
            if not message.acked}
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
    busy = busy_topics(app)
    held = []
    for tp in tps:
        try:
            high = consumer.highwater(tp)
        except AssertionError:  # revoked meanwhile (the consumer runs in its own thread)
            continue
        held.append(HeldPartition(tp, high, positions.get(tp), committed.get(tp),
                                  tp.topic in busy))
    return held


def rebalancing(app: Any) -> bool:
    """A rebalance or a table recovery is under way (Faust pauses partitions then)."""
    return bool(app.rebalancing or getattr(app, "in_recovery", False))


async def watch_and_unstick(app: Any, watch: StallWatch) -> None:
    """One look over the held partitions; each stalled one is reported and, at least once,
    read again from its committed offset, or its hole accepted as a gap when reading it
    again did not fill it."""
    for stall in watch.stalled(held_partitions(app), rebalancing(app)):
        partition = stall.partition
        tp = partition.tp
        consumer = app.consumer
        what = (
            f"{partition.unfinished} offsets fetched past its committed offset "
            f"{partition.committed} not finished" if stall.hole
            else f"{partition.to_fetch} records to fetch not fetched"
        )
        described = (f"{tp.topic}[{tp.partition}] stalled: {what} for {stall.for_s:.0f}s "
                     f"(fetch position {partition.position}, high watermark "
                     f"{partition.high_watermark}, {faust_state(consumer, tp)})")
        labelled(STALLED_PARTITIONS, "streams", tp.topic).inc()
        if app.transaction_gate is not None:
            log.warning("%s; under exactly_once the transaction gate stops the worker on a "
                        "jump, so nothing is sought here", described)
            continue
        if rebalancing(app) or tp not in consumer.assignment():
            continue  # a rebalance began since the look: it seeks every partition anyway
        if stall.hole and stall.repeats >= 2 and partition.committed is not None:
            accept_gap(consumer, watch, partition, described)
            continue
        resume_from = partition.committed if partition.committed is not None else (
            partition.position)
        if resume_from is None:
            log.warning("%s; no committed offset nor fetch position to read it again from",
                        described)
            continue
        log.warning("%s; reading it again from offset %d", described, resume_from)
        await consumer.seek_wait({tp: resume_from})  # in the consumer's thread
        consumer._buffered_partitions.discard(tp)
        consumer.resume_partitions({tp})


def accept_gap(consumer: Any, watch: StallWatch, partition: HeldPartition,
               described: str) -> None:
    """A hole still there after it was read again holds no records (transaction markers
    of an earlier run, compaction, retention): acknowledged as a gap so the commit moves
    on, logged and counted (medstream_offset_gaps)."""
    tp, committed = partition.tp, partition.committed
    assert committed is not None and partition.position is not None
    acked = consumer._acked.get(tp) or []
    end = min(acked) if acked else partition.position  # exclusive
    log.warning("%s; reading it again did not fill offsets %d-%d: accepted as a gap "
                "(no records there: transaction markers, compaction or retention)",
                described, committed, end - 1)
    labelled(OFFSET_GAPS, "streams", tp.topic).inc()
    if end > committed:
        consumer._gap[tp].addi(committed, end)
        consumer._gap[tp].merge_overlaps()
    watch.accepted.add((tp, committed, partition.position))
