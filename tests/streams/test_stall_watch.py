"""Partitions a worker holds but leaves behind: the stall watch names them (records to fetch
that nothing fetches; records fetched past a committed offset that cannot move) and the
consumer never commits past a raw record no agent acknowledged. The figures are those of a
worker-kill fault trial, read from the broker's own logs: raw.hl7_lab[2] committed at 151
for good with its records read to 224 (the worker reporting lag 0), raw.hl7_lab[3]
committed past 154-157, which no agent processed."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from faust.types import TP

from medstream.settings import KafkaSettings, StreamSettings
from schemas import serde
from streams import app as streams_app
from streams.stall_watch import STALL_AFTER_S, HeldPartition, StallWatch, accept_gap

TEST_KEY = "test-only-pseudonym-key-0123456789abcdef"
RAW, NORM = TP("raw.hl7_lab", 2), TP("norm.lab_result", 1)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _held(tp: TP = RAW, high: int = 224, position: int | None = 224,
          committed: int | None = 151, busy: bool = False) -> HeldPartition:
    return HeldPartition(tp, high, position, committed, busy)


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


def test_the_partition_whose_commit_stuck_behind_a_hole_is_found_once_a_period() -> None:
    clock = Clock()
    watch = StallWatch(clock=clock)
    # Read to its end, committed 73 behind, nothing of the topic in hand: the lag the
    # worker reported (high - next to read) was 0, the group stayed 73 behind.
    assert (_held().to_fetch, _held().unfinished) == (0, 73)
    assert watch.stalled([_held()], busy=False) == []
    clock.now += STALL_AFTER_S - 1
    assert watch.stalled([_held()], busy=False) == []
    clock.now += 1
    [stall] = watch.stalled([_held()], busy=False)
    assert (stall.partition, stall.for_s, stall.hole, stall.repeats) == (
        _held(), STALL_AFTER_S, True, 1)
    # Reported, then its clock starts again: not every second; a repeat counts.
    clock.now += 5
    assert watch.stalled([_held()], busy=False) == []
    clock.now += STALL_AFTER_S
    assert [(s.partition.tp, s.repeats) for s in watch.stalled([_held()], busy=False)] == [
        (RAW, 2)]


def test_records_to_fetch_that_nothing_fetches_are_a_stall_too() -> None:
    clock = Clock()
    watch = StallWatch(clock=clock)
    unfetched = _held(high=224, position=151, committed=151)
    watch.stalled([unfetched], busy=False)
    clock.now += STALL_AFTER_S
    [stall] = watch.stalled([unfetched], busy=False)
    assert (stall.hole, stall.partition.to_fetch) == (False, 73)


def test_progress_work_in_hand_a_rebalance_or_nothing_to_do_is_not_a_stall() -> None:
    clock = Clock()
    watch = StallWatch(clock=clock)
    done = _held(NORM, high=500, position=500, committed=500)
    watch.stalled([_held(), done], busy=False)
    clock.now += STALL_AFTER_S / 2
    # Committed on half-way: its clock starts again.
    watch.stalled([_held(committed=180), done], busy=False)
    clock.now += STALL_AFTER_S / 2
    assert watch.stalled([_held(committed=180), done], busy=False) == []
    # Records of the topic in an agent's hands or queue: the agent is slow, not stalled.
    clock.now += STALL_AFTER_S
    assert watch.stalled([_held(committed=180, busy=True)], busy=False) == []
    clock.now += STALL_AFTER_S
    # A rebalance or a table recovery pauses partitions on purpose.
    assert watch.stalled([_held(committed=180)], busy=True) == []
    clock.now += STALL_AFTER_S - 1
    assert watch.stalled([_held(committed=180)], busy=False) == []
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
        "raw.hl7_lab[3]: Faust jumped over 4 records (154-157) no agent has processed; not "
        "acknowledging them: the stall watch reads them again"
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


def test_a_hole_that_reading_again_did_not_fill_is_accepted_as_a_gap_once() -> None:
    consumer = _consumer()
    watch = StallWatch()
    consumer._committed_offset[RAW] = 151
    _ack(consumer, RAW, 159, 160)
    stuck = _held(high=161, position=161)
    accept_gap(consumer, watch, stuck, "raw.hl7_lab[2] stalled")
    assert consumer._new_offset(RAW) == 161
    assert (RAW, 151, 161) in watch.accepted
    # Not reported again at the same positions.
    clock = Clock()
    again = StallWatch(clock=clock, accepted=watch.accepted)
    again.stalled([stuck], busy=False)
    clock.now += STALL_AFTER_S * 2
    assert again.stalled([stuck], busy=False) == []


def test_a_commit_the_broker_refused_is_not_recorded_as_done() -> None:
    consumer = _consumer()
    consumer._committed_offset[RAW] = 151
    _ack(consumer, RAW, 151, 152, 153)
    refused: list[dict[TP, int]] = []

    async def already_rebalanced(offsets: dict[TP, int]) -> bool:
        """Stands in for aiokafka's commit refused by the coordinator (a rebalance)."""
        refused.append(dict(offsets))
        return False

    async def flushed() -> None:
        """Stands in for the producer's flush before a commit (no broker here)."""

    consumer._commit = already_rebalanced
    consumer.assignment = lambda: {RAW}
    consumer.app.producer.flush = flushed
    offsets = consumer._filter_committable_offsets([RAW])
    assert offsets == {RAW: 154}
    assert asyncio.run(consumer._commit_offsets(offsets)) is False
    assert refused == [{RAW: 154}]
    # Faust recorded 154 as committed; the group still says 151.
    assert consumer._committed_offset[RAW] == 151
    assert consumer._new_offset(RAW) == 154  # the next commit covers them again
