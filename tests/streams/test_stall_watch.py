"""Partitions a worker holds but leaves behind: the stall watch names them (records to fetch
that nothing fetches; records fetched past a committed offset that cannot move) and the
consumer never commits past a raw record no agent acknowledged. The figures are those of a
worker-kill fault trial, read from the broker's own logs: raw.hl7_lab[2] committed at 151
for good with its records read to 224 (the worker reporting lag 0), raw.hl7_lab[3]
committed past 154-157, which no agent processed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest
from faust.types import TP

from medstream.settings import KafkaSettings, StreamSettings
from schemas import serde
from streams import app as streams_app
from streams.stall_watch import (
    REBALANCE_STUCK_S,
    STALL_AFTER_S,
    HeldPartition,
    StallWatch,
    watch_and_unstick,
)

TEST_KEY = "test-only-pseudonym-key-0123456789abcdef"
RAW, NORM = TP("raw.hl7_lab", 2), TP("norm.lab_result", 1)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _held(tp: TP = RAW, high: int = 224, position: int | None = 224,
          committed: int | None = 151, busy: bool = False, lowest_acked: int | None = None,
          settling: bool = False) -> HeldPartition:
    return HeldPartition(tp, high, position, committed, busy, lowest_acked, settling)


def _consumer() -> Any:
    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:1")
    app = streams_app.create_app(
        kafka, StreamSettings(pseudonym_key=TEST_KEY),  # type: ignore[arg-type]
        serde.ManifestRegistry(),
    )
    return app.consumer


def _ack(consumer: Any, tp: TP, *offsets: int) -> None:
    for offset in offsets:
        consumer._acked[tp].append(offset)
        consumer._acked_index[tp].add(offset)


def test_a_commit_held_back_by_a_hole_is_found_whatever_the_traffic() -> None:
    clock = Clock()
    watch = StallWatch(clock=clock)
    # Records read and acknowledged on past the hole at 151-158, the fetch position moving
    # and the agent busy: the commit still cannot move (the review's probe found the first
    # watch silent for 10 minutes of traffic; the worker's lag said 0).
    position = 200
    for _ in range(4):
        position += 8
        assert watch.stalled([_held(position=position, busy=True, lowest_acked=159)],
                             busy=False) == []
        clock.now += STALL_AFTER_S / 4
    [stall] = watch.stalled([_held(position=position, busy=True, lowest_acked=159)],
                            busy=False)
    assert (stall.hole, stall.repeats, stall.partition.held_back) == (True, 1, True)
    # Reported, then its clock starts again: not every second; a repeat counts.
    clock.now += 5
    assert watch.stalled([_held(lowest_acked=159)], busy=False) == []
    clock.now += STALL_AFTER_S
    assert [s.repeats for s in watch.stalled([_held(lowest_acked=159)], busy=False)] == [2]
    # The commit moved: no stall.
    clock.now += STALL_AFTER_S
    assert watch.stalled([_held(committed=224, lowest_acked=None)], busy=False) == []


def test_a_commit_under_way_or_a_record_in_hand_below_the_acknowledged_is_no_hole() -> None:
    clock = Clock()
    watch = StallWatch(clock=clock)
    slow = _held(lowest_acked=159, settling=True)
    watch.stalled([slow], busy=False)
    clock.now += STALL_AFTER_S * 2
    assert watch.stalled([slow], busy=False) == []


def test_a_hole_at_the_end_and_records_not_fetched_are_stalls_once_the_topic_is_idle() -> None:
    clock = Clock()
    watch = StallWatch(clock=clock)
    # Fetched to 224, committed 151, nothing acknowledged after it (the dropped records
    # were the last): found once nothing of the topic is in an agent's hands or queue.
    trailing, unfetched = _held(), _held(NORM, high=224, position=151, committed=151)
    assert (trailing.to_fetch, trailing.unfinished, unfetched.to_fetch) == (0, 73, 73)
    watch.stalled([trailing, unfetched], busy=False)
    clock.now += STALL_AFTER_S
    assert [(s.partition.tp, s.hole) for s in watch.stalled([trailing, unfetched],
                                                            busy=False)] == [
        (RAW, True), (NORM, False)]
    busy = [_held(busy=True), _held(NORM, high=224, position=151, committed=151, busy=True)]
    clock.now += STALL_AFTER_S * 2
    assert watch.stalled(busy, busy=False) == []


def test_a_rebalance_or_nothing_to_do_is_not_a_stall() -> None:
    clock = Clock()
    watch = StallWatch(clock=clock)
    done = _held(NORM, high=500, position=500, committed=500)
    watch.stalled([_held(lowest_acked=159), done], busy=False)
    clock.now += STALL_AFTER_S
    # A rebalance or a table recovery pauses partitions on purpose: every clock restarts.
    assert watch.stalled([_held(lowest_acked=159), done], busy=True) == []
    clock.now += STALL_AFTER_S - 1
    assert watch.stalled([_held(lowest_acked=159), done], busy=False) == []
    # Unknown positions are not records to read.
    assert _held(high=-1, position=5).to_fetch == 0 and _held(position=None).unfinished == 0


def test_under_exactly_once_the_trailing_transaction_marker_is_not_a_hole() -> None:
    # The gate commits last processed + 1; the fetch position is past the marker after it.
    clock = Clock()
    watch = StallWatch(holes=False, clock=clock)
    idle = _held(NORM, high=501, position=501, committed=500)
    watch.stalled([idle], busy=False)
    clock.now += STALL_AFTER_S * 3
    assert watch.stalled([idle], busy=False) == []


def test_a_jump_on_a_raw_topic_is_never_acknowledged_and_holds_the_commit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    consumer = _consumer()
    # Faust took the jump over 154-157 for a gap and acknowledged it: the commit went past
    # four records no agent processed (p3 of the trial).
    p3, norm = TP("raw.hl7_lab", 3), NORM
    consumer._committed_offset[p3] = 154
    with caplog.at_level(logging.WARNING, "medstream.streams"):
        asyncio.run(consumer._add_gap(p3, 154, 158))
    assert [r.getMessage() for r in caplog.records] == [
        "raw.hl7_lab[3]: Faust jumped over 4 records (154-157) not acknowledged nor in an "
        "agent's hands; not acknowledging them: if no agent processes them, the stall watch "
        "reads them again"
    ]
    _ack(consumer, p3, 158, 159)
    assert not consumer._gap[p3]
    assert consumer._new_offset(p3) is None
    # A jump over records processed already (Faust's read offset set back after a
    # rebalance) is no loss and not said.
    caplog.clear()
    asyncio.run(consumer._add_gap(p3, 158, 160))
    assert caplog.records == []
    # Faust reads its committed offset as the last one processed: an acknowledgement one
    # past it would commit over the record at the committed offset itself.
    consumer._committed_offset[RAW] = 151
    _ack(consumer, RAW, 152)
    assert consumer._new_offset(RAW) is None
    _ack(consumer, RAW, 151)
    assert consumer._new_offset(RAW) == 153
    # A topic that may hold transaction markers keeps Faust's gaps.
    consumer._committed_offset[norm] = 10
    asyncio.run(consumer._add_gap(norm, 11, 13))
    assert consumer._gap[norm]


class Worker:
    """The real app and consumer of a worker with no broker: the calls that would go to
    aiokafka's thread or the broker are stood in for and recorded."""

    def __init__(self, held: dict[TP, int], log_starts: dict[TP, int] | None = None) -> None:
        self.consumer = _consumer()
        self.app = self.consumer.app
        self.sought: list[dict[TP, int]] = []
        consumer = self.consumer
        consumer.assignment = lambda: set(held)
        consumer.highwater = held.__getitem__

        async def seek_wait(offsets: dict[TP, int]) -> None:
            self.sought.append(dict(offsets))

        async def earliest_offsets(*tps: TP) -> dict[TP, int]:
            return {tp: (log_starts or {}).get(tp, 0) for tp in tps}

        consumer.seek_wait = seek_wait
        consumer.earliest_offsets = earliest_offsets

    def look(self, watch: StallWatch, clock: Clock) -> None:
        """Two looks STALL_AFTER_S apart (the first starts the clocks)."""
        asyncio.run(watch_and_unstick(self.app, watch))
        clock.now += STALL_AFTER_S
        asyncio.run(watch_and_unstick(self.app, watch))


def test_a_raw_partition_held_back_is_read_again_and_a_hole_is_only_accepted_if_deleted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker = Worker({RAW: 224}, log_starts={RAW: 0})
    consumer = worker.consumer
    consumer._committed_offset[RAW] = 151
    _ack(consumer, RAW, *range(159, 224))
    clock = Clock()
    watch = StallWatch(clock=clock)
    with caplog.at_level(logging.WARNING, "streams.stall_watch"):
        worker.look(watch, clock)
    assert worker.sought == [{RAW: 151}]
    assert "raw.hl7_lab[2] stalled: the commit held at 151 by a hole (records acknowledged " \
        "from 159) for 20s" in caplog.text
    assert "reading it again from offset 151" in caplog.text
    # Still there 20 s later (reading again did not deliver 151-158): a raw topic's every
    # offset is a record, so it is read again, never accepted as a gap.
    clock.now += STALL_AFTER_S
    asyncio.run(watch_and_unstick(worker.app, watch))
    assert worker.sought == [{RAW: 151}, {RAW: 151}] and not consumer._gap[RAW]
    assert consumer._new_offset(RAW) is None
    # Unless retention deleted them: said as a loss, and the commit moves on.
    worker_deleted = Worker({RAW: 224}, log_starts={RAW: 159})
    deleted = worker_deleted.consumer
    deleted._committed_offset[RAW] = 151
    _ack(deleted, RAW, *range(159, 224))
    caplog.clear()
    with caplog.at_level(logging.WARNING, "streams.stall_watch"):
        worker_deleted.look(StallWatch(clock=clock), clock)
    assert worker_deleted.sought == []
    assert "offsets 151-158 deleted by the broker's retention before any agent processed " \
        "them: LOST; accepted as a gap" in caplog.text
    assert deleted._new_offset(RAW) == 224


def test_a_hole_elsewhere_is_accepted_as_a_gap_only_after_reading_it_again() -> None:
    worker = Worker({NORM: 501})
    consumer = worker.consumer
    consumer._committed_offset[NORM] = 500
    # Fetched to 501, nothing acknowledged after 500: a trailing transaction marker of an
    # earlier exactly_once run. positions come from aiokafka's thread: stood in for.
    from streams import stall_watch
    positions = stall_watch.fetch_positions
    stall_watch.fetch_positions = lambda consumer, tps: dict.fromkeys(tps, 501)  # type: ignore[assignment]
    try:
        clock = Clock()
        watch = StallWatch(clock=clock)
        worker.look(watch, clock)
        assert worker.sought == [{NORM: 500}] and not consumer._gap[NORM]
        clock.now += STALL_AFTER_S
        asyncio.run(watch_and_unstick(worker.app, watch))
        assert worker.sought == [{NORM: 500}]  # accepted, not read again
        assert (NORM, 500, 501) in watch.accepted and consumer._gap[NORM]
        clock.now += STALL_AFTER_S * 2
        asyncio.run(watch_and_unstick(worker.app, watch))
        assert worker.sought == [{NORM: 500}]  # and not reported again
    finally:
        stall_watch.fetch_positions = positions  # type: ignore[assignment]


def test_fetch_positions_are_read_from_aiokafka_s_own_state() -> None:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from streams.stall_watch import fetch_positions

    async def read() -> dict[TP, int | None]:
        aiokafka_consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1")
        aiokafka_consumer.assign([TopicPartition(RAW.topic, RAW.partition),
                                  TopicPartition(NORM.topic, NORM.partition)])
        assignment = aiokafka_consumer._subscription.subscription.assignment
        assignment.state_value(TopicPartition(RAW.topic, RAW.partition)).seek(224)

        class Thread:
            _consumer = aiokafka_consumer

        class Consumer:
            _thread = Thread

        try:
            return fetch_positions(Consumer, [RAW, NORM, TP("raw.device", 0)])
        finally:
            await aiokafka_consumer.stop()

    assert asyncio.run(read()) == {RAW: 224, NORM: None, TP("raw.device", 0): None}


def _refused_commit(during: Callable[[Any], None] = lambda consumer: None) -> Any:
    """A consumer at committed 151 with 151-153 acknowledged whose next commit the broker
    refuses ("already rebalanced"; ``during`` runs meanwhile); returns it after that
    commit and what it asked to commit."""
    consumer = _consumer()
    consumer._committed_offset[RAW] = 151
    _ack(consumer, RAW, 151, 152, 153)
    asked: list[dict[TP, int]] = []

    async def refused(offsets: dict[TP, int]) -> bool:
        """Stands in for aiokafka's commit refused by the coordinator (a rebalance)."""
        asked.append(dict(offsets))
        during(consumer)
        return False

    async def flushed() -> None:
        """Stands in for the producer's flush before a commit (no broker here)."""

    consumer._commit = refused
    consumer.assignment = lambda: {RAW}
    consumer.app.producer.flush = flushed
    offsets = consumer._filter_committable_offsets([RAW])
    assert asyncio.run(consumer._commit_offsets(offsets)) is False
    return consumer, asked


def test_a_commit_the_broker_refused_is_not_recorded_as_done() -> None:
    consumer, asked = _refused_commit()
    assert asked == [{RAW: 154}]
    # Faust recorded 154 as committed; the group still says 151.
    assert consumer._committed_offset[RAW] == 151
    assert consumer._new_offset(RAW) == 154  # the next commit covers them again


def test_a_commit_made_while_the_seek_asks_for_the_log_starts_stands() -> None:
    consumer = _consumer()
    moved, fresh = TP("raw.device", 0), TP("raw.device", 3)

    async def committed_offsets() -> dict[TP, int | None]:
        """Stands in for aiokafka's seek_to_committed (round trips to the coordinator)."""
        return {moved: 10, fresh: None}

    async def log_starts(*tps: TP) -> dict[TP, int]:
        """Stands in for a ListOffsets request; the worker commits 10-14 meanwhile."""
        consumer._committed_offset[moved] = 15
        return dict.fromkeys(tps, 0)

    consumer.seek_to_committed = committed_offsets
    consumer.earliest_offsets = log_starts
    asyncio.run(consumer.perform_seek())
    # Set back to 10, Faust would wait for a record 10 it processed already: stalled.
    assert (consumer._committed_offset[moved], consumer._committed_offset[fresh]) == (15, 0)


def test_a_refused_commit_does_not_undo_a_seek_made_meanwhile() -> None:
    def seek(consumer: Any) -> None:
        """The rebalance's seek sets 160 while the commit is under way."""
        consumer._committed_offset[RAW] = 160

    consumer, _ = _refused_commit(seek)
    assert consumer._committed_offset[RAW] == 160
    assert not consumer._acked[RAW]  # nothing put back below the seek's offset


def test_a_rebalance_that_never_ends_is_said_once_a_period() -> None:
    clock = Clock()
    watch = StallWatch(clock=clock)
    assert watch.stuck_rebalancing(busy=True) is None
    clock.now += REBALANCE_STUCK_S - 1
    assert watch.stuck_rebalancing(busy=True) is None
    clock.now += 1
    assert watch.stuck_rebalancing(busy=True) == REBALANCE_STUCK_S
    clock.now += 10
    assert watch.stuck_rebalancing(busy=True) is None
    clock.now += REBALANCE_STUCK_S
    assert watch.stuck_rebalancing(busy=True) == REBALANCE_STUCK_S * 2 + 10
    # Over: the next one is timed afresh.
    assert watch.stuck_rebalancing(busy=False) is None
    clock.now += REBALANCE_STUCK_S
    assert watch.stuck_rebalancing(busy=True) is None
