"""The stall watch: a held partition with records to read that nothing reads or commits for
a while is named and read again from its committed offset; a busy worker, a slow agent or
a partition read to its end is not stalled."""

from __future__ import annotations

import asyncio

from faust.types import TP

from medstream.settings import KafkaSettings, StreamSettings
from schemas import serde
from streams import app as streams_app
from streams.stall_watch import STALL_AFTER_S, HeldPartition, StallWatch, unstick

TEST_KEY = "test-only-pseudonym-key-0123456789abcdef"
TP_A, TP_B = TP("raw.hl7_lab", 1), TP("raw.hl7_lab", 3)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _held(tp: TP = TP_A, high: int = 500, read: int | None = 426, committed: int | None = 427,
          unprocessed: int = 0) -> HeldPartition:
    return HeldPartition(tp, high, read, committed, unprocessed)


def test_a_partition_with_records_to_read_that_nothing_reads_is_stalled_once_a_period() -> None:
    clock = Clock()
    watch = StallWatch(clock=clock)
    assert _held().to_read == 73
    assert watch.stalled([_held()], busy=False) == []
    clock.now += STALL_AFTER_S - 1
    assert watch.stalled([_held()], busy=False) == []
    clock.now += 1
    assert watch.stalled([_held()], busy=False) == [(_held(), STALL_AFTER_S)]
    # Reported, then its clock starts again: not reported every second.
    clock.now += 5
    assert watch.stalled([_held()], busy=False) == []
    clock.now += STALL_AFTER_S
    assert [p.tp for p, _ in watch.stalled([_held()], busy=False)] == [TP_A]


def test_progress_work_in_hand_nothing_to_read_or_a_rebalance_is_not_a_stall() -> None:
    clock = Clock()
    watch = StallWatch(clock=clock)
    watch.stalled([_held(), _held(TP_B, read=499, committed=500)], busy=False)
    clock.now += STALL_AFTER_S / 2
    # Read on (or committed on) half-way: its clock starts again.
    watch.stalled([_held(read=430), _held(TP_B, read=499, committed=500)], busy=False)
    clock.now += STALL_AFTER_S / 2
    assert watch.stalled([_held(read=430), _held(TP_B, read=499, committed=500)],
                         busy=False) == []
    # An agent still working through this partition's records: slow, not stalled.
    clock.now += STALL_AFTER_S
    assert watch.stalled([_held(read=430, unprocessed=12)], busy=False) == []
    clock.now += STALL_AFTER_S
    # A rebalance or a table recovery pauses partitions on purpose.
    assert watch.stalled([_held(read=430)], busy=True) == []
    clock.now += STALL_AFTER_S - 1
    assert watch.stalled([_held(read=430)], busy=False) == []
    # An unknown high watermark is not records to read.
    assert _held(high=-1).to_read == 0 and _held(read=None, committed=None, high=9).to_read == 9


def test_a_stalled_partition_is_fetched_again_from_its_committed_offset() -> None:
    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:1")
    consumer = streams_app.create_app(
        kafka, StreamSettings(pseudonym_key=TEST_KEY), serde.ManifestRegistry(),  # type: ignore[arg-type]
    ).consumer
    sought: list[tuple[TP, int]] = []

    async def seek_in_the_consumer_thread(tp: TP, offset: int) -> None:
        """Stands in for aiokafka's seek (a call into the consumer's own thread)."""
        sought.append((tp, offset))

    consumer._seek = seek_in_the_consumer_thread  # type: ignore[method-assign]
    # The states a stalled partition was found in: paused for a full buffer that was then
    # cleared, and a read offset moved past records no agent was handed.
    consumer._active_partitions = {TP_B}
    consumer._buffered_partitions.add(TP_A)
    consumer._read_offset[TP_A] = 480
    asyncio.run(unstick(consumer, _held(), STALL_AFTER_S, resume_from=427))
    assert sought == [(TP_A, 427)]
    assert TP_A in consumer._active_partitions and TP_A not in consumer._buffered_partitions
    assert TP_A not in consumer._paused_partitions
    # Faust hands records from offset 427 on to the agents again (it drops those below).
    assert consumer._read_offset[TP_A] == 427
