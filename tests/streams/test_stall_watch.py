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
        "raw.hl7_lab[3]: Faust jumped over 4 offsets (154-157) not acknowledged nor in an "
        "agent's hands; not acknowledging them: if they hold records no agent processes, the "
        "stall watch reads them again"
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
    # So does every topic an agent reads (the detect agents read norm.*): this app writes
    # them without transactions.
    consumer._committed_offset[norm] = 10
    asyncio.run(consumer._add_gap(norm, 11, 13))
    _ack(consumer, norm, 13)
    assert not consumer._gap[norm] and consumer._new_offset(norm) is None
    # A changelog (compacted, read by table recovery) keeps Faust's gaps.
    changelog = TP(sorted(consumer.app.tables.changelog_topics)[0], 0)
    consumer._committed_offset[changelog] = 10
    asyncio.run(consumer._add_gap(changelog, 11, 13))
    assert consumer._gap[changelog]


def test_nothing_is_committed_while_the_committed_offset_is_unknown() -> None:
    # From the revoke until the seek after the assignment has read the committed offsets,
    # records flow and Faust's commit timer runs: it committed the first run of
    # acknowledgements wherever it started (review 5's probe: 170 over a hole at 151-158).
    consumer = _consumer()
    _ack(consumer, RAW, *range(159, 170))
    assert RAW not in consumer._committed_offset
    assert consumer._new_offset(RAW) is None
    assert consumer._filter_committable_offsets([RAW]) == {}
    # Once the seek set it, the commit moves from there on only.
    consumer._committed_offset[RAW] = 151
    assert consumer._new_offset(RAW) is None
    _ack(consumer, RAW, *range(151, 159))
    assert consumer._new_offset(RAW) == 170


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


def test_a_hole_is_accepted_as_a_gap_only_where_a_read_of_it_finds_no_record() -> None:
    # Fetched to 501, nothing acknowledged after 500: a trailing transaction marker of an
    # earlier exactly_once run, or a record Faust dropped. positions come from aiokafka's
    # thread: stood in for.
    from streams import stall_watch
    positions = stall_watch.fetch_positions
    stall_watch.fetch_positions = lambda consumer, tps: dict.fromkeys(tps, 501)  # type: ignore[assignment]
    try:
        for found, accepted in ((1, False), (None, False), (0, True)):
            worker = Worker({NORM: 501})
            consumer = worker.consumer
            consumer._committed_offset[NORM] = 500
            asked: list[tuple[TP, int, int]] = []

            async def count_records(tp: TP, low: int, end: int, found: int | None = found,
                                    asked: list[tuple[TP, int, int]] = asked) -> int | None:
                """Stands in for the read of the range apart from the worker."""
                asked.append((tp, low, end))
                return found

            clock = Clock()
            watch = StallWatch(clock=clock, count_records=count_records)
            worker.look(watch, clock)
            # Read again first, whatever it holds.
            assert worker.sought == [{NORM: 500}] and not consumer._gap[NORM] and asked == []
            clock.now += STALL_AFTER_S
            asyncio.run(watch_and_unstick(worker.app, watch))
            assert asked == [(NORM, 500, 501)]
            if not accepted:
                # A record there (the re-read was undone by a delivery under way), or the
                # range could not be read: read again, never accepted.
                assert worker.sought == [{NORM: 500}, {NORM: 500}] and not consumer._gap[NORM]
                continue
            assert worker.sought == [{NORM: 500}]
            assert (NORM, 500, 501) in watch.accepted and consumer._gap[NORM]
            clock.now += STALL_AFTER_S * 2
            asyncio.run(watch_and_unstick(worker.app, watch))
            assert worker.sought == [{NORM: 500}] and len(asked) == 1  # not reported again
    finally:
        stall_watch.fetch_positions = positions  # type: ignore[assignment]


def test_a_partition_whose_committed_offset_is_unknown_is_sought_again() -> None:
    # The seek after the assignment did not complete (it timed out): nothing commits.
    other = TP("raw.device", 1)
    worker = Worker({RAW: 224, other: 50})
    consumer = worker.consumer
    _ack(consumer, RAW, *range(159, 224))
    _ack(consumer, other, *range(40, 50))
    seeks: list[bool] = []

    async def perform_seek() -> None:
        """Stands in for the seek to the committed offsets (round trips to the group)."""
        seeks.append(True)

    consumer.perform_seek = perform_seek
    clock = Clock()
    worker.look(StallWatch(clock=clock), clock)
    assert seeks == [True] and worker.sought == []  # every partition, once for both


def test_a_hole_is_found_though_other_partitions_commit_at_most_looks() -> None:
    # A commit of another partition under way at a look restarted the hole's clock, so
    # under traffic it was never reported (review 5's probe: 0 reports in 10 minutes). A
    # look where the partition itself is settling is not reported but keeps its clock.
    clock = Clock()
    watch = StallWatch(clock=clock)
    reports = []
    for look in range(60):
        settling = look % 2 == 0
        reports += watch.stalled([_held(lowest_acked=159, settling=settling)], busy=False)
        clock.now += 1
    assert [round(s.for_s) for s in reports] == [21, 20]
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


@pytest.mark.integration
def test_the_read_of_a_hole_counts_records_not_transaction_markers_nor_aborted_records(
    kafka_factory: Callable[..., KafkaSettings],
) -> None:
    from confluent_kafka import Producer

    from streams.stall_watch import records_counter

    kafka = kafka_factory()
    norm = kafka.topic("norm.lab_result")
    producer = Producer(kafka.producer_config(**{"transactional.id": f"{kafka.topic_prefix}tx"}))
    producer.init_transactions(30)
    # 0-1 records, 2 their commit marker; 3 aborted, 4 its abort marker; 5 a record.
    producer.begin_transaction()
    for _ in range(2):
        producer.produce(norm, value=b"committed", partition=0)
    producer.commit_transaction(30)
    producer.begin_transaction()
    producer.produce(norm, value=b"aborted", partition=0)
    producer.flush(30)
    producer.abort_transaction(30)
    producer.begin_transaction()
    producer.produce(norm, value=b"committed", partition=0)
    producer.commit_transaction(30)
    count = records_counter(kafka)
    tp = TP(norm, 0)
    assert asyncio.run(count(tp, 2, 5)) == 0  # markers and an aborted record: a gap
    assert asyncio.run(count(tp, 0, 2)) == 2
    assert asyncio.run(count(tp, 2, 6)) == 1


class FetchedRecord:
    """A record aiokafka hands out (only its offset matters here)."""

    def __init__(self, offset: int) -> None:
        self.offset = offset


class AiokafkaConsumer:
    """Stands in for aiokafka's consumer in the consumer thread: its fetcher hands out
    ``batches`` (running ``during`` meanwhile, as a rebalance would), seeks are recorded."""

    def __init__(self, batches: dict[TP, list[int]], assigned: set[TP],
                 during: Callable[[Any], None] = lambda partitions: None) -> None:
        self._closed = False
        self.sought: list[tuple[TP, int]] = []
        self.asked: list[Any] = []
        outer = self

        class Subscriptions:
            def fetch_context(self) -> Any:
                import contextlib
                return contextlib.nullcontext()

        class Fetcher:
            _closed = False
            _subscriptions = Subscriptions()

            async def fetched_records(self, partitions: Any, timeout: float | None = None,
                                      max_records: int | None = None) -> dict[TP, list[Any]]:
                """As aiokafka's: membership asked when it drains, after the wait (``during``);
                an empty set means every partition."""
                outer.asked.append(partitions)
                during(partitions)
                return {tp: [FetchedRecord(o) for o in offsets] for tp, offsets in batches.items()
                        if not partitions or tp in partitions}

        self._fetcher = Fetcher()
        self._assigned = assigned

    def assignment(self) -> set[TP]:
        return self._assigned

    def seek(self, tp: TP, offset: int) -> None:
        self.sought.append((tp, offset))


def test_records_fetched_across_a_rebalance_are_put_back_not_dropped() -> None:
    # A CI run: the worker that kept its partitions through a rebalance had a fetch under
    # way at the revoke; it resumed with Faust's set of partitions emptied (aiokafka: every
    # partition), handed out a changelog's records, Faust dropped them, and table recovery
    # waited 3 minutes for them with every stream partition paused.
    consumer = _consumer()
    thread = consumer._thread
    app = consumer.app
    changelog = TP(sorted(app.tables.changelog_topics)[0], 0)
    app.consumer_generation_id = 2
    consumer.flow_active = True
    live = {RAW, changelog}

    def rebalance(partitions: Any) -> None:
        live.clear()  # Faust empties its set at the revoke...
        app.consumer_generation_id = 3  # ...and the next assignment comes

    aiokafka = AiokafkaConsumer({RAW: [40, 41], changelog: [0, 1, 2], NORM: [7]},
                                assigned={RAW, changelog}, during=rebalance)
    # aiokafka asks the live set when it drains: emptied, it is not "every partition".
    assert asyncio.run(thread._fetch_records(aiokafka, live, timeout=0)) == {}
    assert aiokafka.sought == [] and all(bool(asked) for asked in aiokafka.asked)
    # A partition paused during the fetch (review 6 M1: a copy of the set drained it, and
    # Faust dropped its records with the position past them) is not drained.
    live.update({RAW, NORM})
    paused = AiokafkaConsumer({RAW: [42], NORM: [8]}, assigned={RAW, NORM},
                              during=lambda partitions: live.discard(RAW))
    fetched = asyncio.run(thread._fetch_records(paused, live, timeout=0))
    assert list(fetched) == [NORM] and paused.sought == []
    # Records fetched for partitions kept through a rebalance (the generation changed
    # while fetching): Faust drops them, so they are sought back to their first offset.
    live.update({RAW, changelog})

    def next_generation(partitions: Any) -> None:
        app.consumer_generation_id += 1

    kept = AiokafkaConsumer({RAW: [43, 44], changelog: [3]}, assigned={RAW},
                            during=next_generation)
    assert asyncio.run(thread._fetch_records(kept, live, timeout=0)) == {}
    assert kept.sought == [(RAW, 43)]  # the changelog is no longer assigned: not sought
    # The flow stopped while fetching (a revoke under way): put back as well.
    def stop_flow(partitions: Any) -> None:
        consumer.flow_active = False

    stopped = AiokafkaConsumer({RAW: [45]}, assigned={RAW}, during=stop_flow)
    assert asyncio.run(thread._fetch_records(stopped, live, timeout=0)) == {}
    assert stopped.sought == [(RAW, 45)]
    # No partition to fetch: aiokafka is not asked (it would read every partition).
    consumer.flow_active = True
    idle = AiokafkaConsumer({RAW: [46]}, assigned={RAW})
    assert asyncio.run(thread._fetch_records(idle, set(), timeout=0)) == {}
    assert idle.asked == []
    # Otherwise the records go to Faust as they came.
    steady = AiokafkaConsumer({RAW: [46, 47]}, assigned={RAW})
    fetched = asyncio.run(thread._fetch_records(steady, live, timeout=0))
    assert [r.offset for r in fetched[RAW]] == [46, 47] and steady.sought == []


def test_a_changelog_recovery_waits_for_is_read_again_once_stranded() -> None:
    from streams import stall_watch
    from streams.stall_watch import RECOVERY_STALL_S

    positions = stall_watch.fetch_positions
    try:
        for left, gate, sought in ((536, None, [0]), (None, None, [0]), (0, None, []),
                                   (536, "exactly_once", [])):
            worker = Worker({RAW: 224})
            app = worker.app
            changelog = TP(sorted(app.tables.changelog_topics)[0], 0)
            worker.consumer.assignment = lambda changelog=changelog: {RAW, changelog}
            app.consumer_generation_id = 1
            app.transaction_gate = gate
            recovery = app.tables.recovery
            recovery.active_highwaters[changelog] = 535  # its last offset
            recovery.active_offsets[changelog] = -1  # nothing read
            fetch_at = {changelog: 536}
            stall_watch.fetch_positions = (  # type: ignore[assignment]
                lambda consumer, tps, fetch_at=fetch_at: {tp: fetch_at.get(tp) for tp in tps})
            counted: list[tuple[int, int]] = []

            async def count_records(tp: TP, low: int, end: int, left: int | None = left,
                                    counted: list[tuple[int, int]] = counted) -> int | None:
                """Stands in for the read of the records recovery has not read."""
                counted.append((low, end))
                return left

            clock = Clock()
            watch = StallWatch(clock=clock, count_records=count_records)
            asyncio.run(watch_and_unstick(app, watch))
            clock.now += RECOVERY_STALL_S - 1
            asyncio.run(watch_and_unstick(app, watch))
            assert worker.sought == []
            clock.now += 1
            asyncio.run(watch_and_unstick(app, watch))
            # Read again from the record after the last one recovery read, if records are
            # left there (a tail of markers is not stranded); never under exactly_once,
            # where every changelog ends in a marker until Faust's own check ends recovery.
            assert worker.sought == [{changelog: offset} for offset in sought], (left, gate)
            assert counted == ([] if gate else [(0, 536)])
            if not sought:
                continue
            # Read as far as 300 since, the fetch position unchanged: a new place, a new
            # clock; once fetched up to where recovery read, not stranded.
            recovery.active_offsets[changelog] = 300
            clock.now += RECOVERY_STALL_S - 1
            asyncio.run(watch_and_unstick(app, watch))
            fetch_at[changelog] = 301
            clock.now += RECOVERY_STALL_S * 2
            asyncio.run(watch_and_unstick(app, watch))
            assert worker.sought == [{changelog: 0}]
    finally:
        stall_watch.fetch_positions = positions  # type: ignore[assignment]
