"""A worker's watch over the partitions it holds but no longer reads.

A partition with records to read (high watermark past the next offset to read) whose read
position and committed offset have not moved for ``STALL_AFTER_S``, while no rebalance or
table recovery runs and none of its records waits in an agent's buffer, is stalled: the
fetcher skips it (Faust paused it and never resumed it) or Faust drops what it fetches
(its read offset was moved past records never handed to an agent). Either way the records
sit there unprocessed while every component looks healthy: a worker-kill fault trial left
73 raw.hl7_lab records behind for good that way (``up`` drained for 120 s and exited 1).

The watch says so (a WARNING naming the partition and Faust's state for it, a metric) and
seeks the partition back to its committed offset and resumes it: at least once, so what
was processed already comes again and is collapsed by event id downstream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from faust.types import TP

from medstream.metrics import partition_lag

log = logging.getLogger(__name__)

#: Longer than any pause Faust makes on purpose outside rebalances (a full buffer drains
#: in well under a second) and than a commit interval, short against a drain timeout.
STALL_AFTER_S = 20.0


@dataclass(frozen=True)
class HeldPartition:
    """What a worker knows of one partition it holds, at one moment."""

    tp: TP
    high_watermark: int | None
    #: Offset of the last record handed to an agent since the assignment (None: none yet).
    read: int | None
    committed: int | None
    #: Records handed to agents and not acknowledged yet.
    unprocessed: int

    @property
    def to_read(self) -> int:
        """Records between the next offset to read and the high watermark (0 if unknown)."""
        if self.high_watermark is None or self.high_watermark < 0:
            return 0
        return partition_lag(
            self.high_watermark, None if self.read is None else self.read + 1, self.committed
        )


@dataclass
class _Seen:
    read: int | None
    committed: int | None
    since: float


@dataclass
class StallWatch:
    """Tracks each held partition's progress; :meth:`stalled` names the stalled ones."""

    after_s: float = STALL_AFTER_S
    clock: Callable[[], float] = time.monotonic
    _seen: dict[TP, _Seen] = field(default_factory=dict)

    def stalled(
        self, held: Iterable[HeldPartition], busy: bool
    ) -> list[tuple[HeldPartition, float]]:
        """The partitions stalled for at least ``after_s``, with for how long.

        ``busy`` (a rebalance or a table recovery under way) restarts every clock: Faust
        pauses partitions then on purpose. A partition that moved, has nothing to read, or
        has records in an agent's buffer (the agent is slow, not the fetcher) restarts its
        own; a partition reported stalled restarts it too, so it is reported once a period.
        """
        now = self.clock()
        current: dict[TP, _Seen] = {}
        stalled: list[tuple[HeldPartition, float]] = []
        for partition in held:
            seen = self._seen.get(partition.tp)
            moved = (
                seen is None
                or seen.read != partition.read
                or seen.committed != partition.committed
            )
            if busy or moved or partition.to_read == 0 or partition.unprocessed:
                current[partition.tp] = _Seen(partition.read, partition.committed, now)
                continue
            assert seen is not None
            if now - seen.since >= self.after_s:
                stalled.append((partition, now - seen.since))
                seen = _Seen(partition.read, partition.committed, now)
            current[partition.tp] = seen
        self._seen = current
        return stalled


def faust_state(consumer: object, tp: TP) -> str:
    """Faust's bookkeeping for ``tp``, for the warning (its private attributes, read only)."""
    def holds(name: str) -> str:
        tps = getattr(consumer, name, None)
        return "?" if tps is None else ("yes" if tp in tps else "no")

    read_offsets = getattr(consumer, "_read_offset", {})
    return (
        f"fetched: {holds('_active_partitions')}, paused: {holds('_paused_partitions')}, "
        f"paused for a full buffer: {holds('_buffered_partitions')}, "
        f"Faust's read offset: {read_offsets.get(tp) if tp in read_offsets else 'none'}, "
        f"flow active: {getattr(consumer, 'flow_active', '?')}"
    )


async def unstick(consumer: object, partition: HeldPartition, stalled_s: float,
                  resume_from: int) -> None:
    """Seek a stalled partition back to ``resume_from`` and fetch it again (at least once:
    what was processed after that offset comes again and is collapsed downstream)."""
    tp = partition.tp
    log.warning(
        "%s[%d] stalled: %d records to read, none read or committed for %.0fs (%s); "
        "reading it again from offset %d",
        tp.topic, tp.partition, partition.to_read, stalled_s, faust_state(consumer, tp),
        resume_from,
    )
    buffered: set[TP] = getattr(consumer, "_buffered_partitions", set())
    buffered.discard(tp)
    consumer.resume_partitions({tp})  # type: ignore[attr-defined]
    await consumer.seek(tp, resume_from)  # type: ignore[attr-defined]
