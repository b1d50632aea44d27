"""The exactly-once gate: which transaction a record writes into, which offsets a commit
carries, and the records it refuses to process twice or to skip.

The transactional producers are stand-ins (:class:`FakeTransactionalProducer`, recording
what aiokafka's would be asked to do): the end-to-end test against Apache Kafka is
tests/e2e/test_exactly_once.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.errors import ProducerFenced
from faust.types import TP

from medstream.settings import KafkaSettings, StreamSettings
from streams.transactions import (
    RecordsSkipped,
    TransactionGate,
    TransactionPoisoned,
    current_transactional_id,
    hold_changelog,
)


@dataclass
class FakeTransactionalProducer:
    """Stand-in for aiokafka's transactional producer: records calls, keeps its state."""

    calls: list[tuple[str, Any]] = field(default_factory=list)
    in_transaction: bool = True

    @property
    def _txn_manager(self) -> Any:
        return SimpleNamespace(is_in_transaction=lambda: self.in_transaction)

    async def send_offsets_to_transaction(self, offsets: Any, group_id: str) -> None:
        self.calls.append(("offsets", {(tp.topic, tp.partition): n for tp, n in offsets.items()}))

    async def commit_transaction(self) -> None:
        self.calls.append(("commit", None))
        self.in_transaction = False

    async def begin_transaction(self) -> None:
        self.calls.append(("begin", None))
        self.in_transaction = True


def stub_app(*transactional_ids: str) -> Any:
    producers = {tid: FakeTransactionalProducer() for tid in transactional_ids}
    return SimpleNamespace(
        conf=SimpleNamespace(id="app"),
        # Faust numbers groups of co-partitioned topics; two here: 1 and 4 partitions.
        assignor=SimpleNamespace(group_for_topic=lambda t: 0 if t == "mpi.identity" else 1),
        producer=SimpleNamespace(
            _transaction_producers=producers,
            _trn_locks={tid: asyncio.Lock() for tid in transactional_ids},
        ),
    )


@dataclass
class FakeEvent:
    topic: str
    partition: int
    offset: int
    acked: bool = False

    @property
    def message(self) -> Any:
        return SimpleNamespace(topic=self.topic, partition=self.partition, offset=self.offset)

    def ack(self) -> None:
        self.acked = True


async def process(gate: TransactionGate, event: FakeEvent, seen: list[str | None]) -> None:
    async with gate.record(event):
        seen.append(current_transactional_id())
        await asyncio.sleep(0.01)


def test_a_record_writes_into_its_partitions_transaction_and_is_acknowledged_inside_it() -> None:
    app = stub_app("app-1-2", "app-0-0")
    gate = TransactionGate(app)
    seen: list[str | None] = []
    first, second = FakeEvent("raw.device", 2, 40), FakeEvent("mpi.identity", 0, 7)

    async def run() -> None:
        await process(gate, first, seen)
        await process(gate, second, seen)

    asyncio.run(run())
    assert seen == ["app-1-2", "app-0-0"]
    assert first.acked and second.acked
    assert current_transactional_id() is None  # nothing outside a record
    assert gate.skip(FakeEvent("raw.device", 2, 40))  # delivered again after a seek back
    assert gate.skip(FakeEvent("raw.device", 2, 12))
    assert not gate.skip(FakeEvent("raw.device", 2, 41))
    assert not gate.skip(FakeEvent("raw.device", 3, 40))


def test_a_commit_waits_for_the_record_in_flight_and_carries_exactly_its_offsets() -> None:
    app = stub_app("app-1-2", "app-1-3", "app-0-0")
    gate = TransactionGate(app)
    order: list[str] = []

    async def slow_record() -> None:
        async with gate.record(FakeEvent("raw.hl7_lab", 2, 89)):
            await asyncio.sleep(0.05)
            order.append("record done")

    async def run() -> dict[TP, int]:
        await process(gate, FakeEvent("raw.device", 3, 45), [])
        record = asyncio.create_task(slow_record())
        await asyncio.sleep(0.01)  # the record is in flight when the commit starts
        committed = await gate.commit()
        order.append("committed")
        await record
        return committed

    committed = asyncio.run(run())
    assert order == ["record done", "committed"]
    assert committed == {TP("raw.device", 3): 46, TP("raw.hl7_lab", 2): 90}
    producers = app.producer._transaction_producers
    assert producers["app-1-2"].calls == [
        ("offsets", {("raw.hl7_lab", 2): 90}), ("commit", None), ("begin", None)
    ]
    assert producers["app-1-3"].calls == [
        ("offsets", {("raw.device", 3): 46}), ("commit", None), ("begin", None)
    ]
    assert producers["app-0-0"].calls == []  # holds nothing: left alone
    # Nothing new: the next commit commits nothing.
    assert asyncio.run(gate.commit()) == {}


def test_before_a_rebalance_every_open_transaction_is_ended_also_the_empty_ones() -> None:
    app = stub_app("app-1-2", "app-0-0")
    gate = TransactionGate(app)
    asyncio.run(process(gate, FakeEvent("raw.claim", 2, 5), []))
    asyncio.run(gate.commit(start_new_transaction=False))
    producers = app.producer._transaction_producers
    assert producers["app-1-2"].calls == [("offsets", {("raw.claim", 2): 6}), ("commit", None)]
    assert producers["app-0-0"].calls == [("commit", None)]
    # Once more (Faust commits again while it stops): ended transactions are skipped.
    asyncio.run(gate.commit(start_new_transaction=False))
    assert producers["app-0-0"].calls == [("commit", None)]


def test_a_raw_record_past_one_never_delivered_stops_the_worker() -> None:
    gate = TransactionGate(stub_app("app-1-1"), contiguous=frozenset({"raw.emr_cdc"}))
    asyncio.run(process(gate, FakeEvent("raw.emr_cdc", 1, 10), []))
    with pytest.raises(RecordsSkipped, match=r"raw.emr_cdc\[1\] skipped 11"):
        asyncio.run(process(gate, FakeEvent("raw.emr_cdc", 1, 13), []))
    # Topics written in transactions have commit markers between records: gaps are normal.
    asyncio.run(process(gate, FakeEvent("norm.lab_result", 1, 10), []))
    asyncio.run(process(gate, FakeEvent("norm.lab_result", 1, 12), []))
    assert asyncio.run(gate.commit())[TP("norm.lab_result", 1)] == 13


def test_a_record_that_failed_midway_means_no_more_commits() -> None:
    gate = TransactionGate(stub_app("app-1-0"))

    async def failing() -> None:
        async with gate.record(FakeEvent("raw.claim", 0, 3)):
            raise KeyError("a bug")

    with pytest.raises(KeyError):
        asyncio.run(failing())
    with pytest.raises(TransactionPoisoned, match="a bug"):
        asyncio.run(gate.commit())


def test_table_writes_are_held_for_the_records_transaction_only() -> None:
    gate = TransactionGate(stub_app("app-1-0"))
    published: list[str] = []

    class Channel:
        def get_topic_name(self) -> str:
            return "app-state-changelog"

        async def publish_message(self, future_message: Any, wait: bool) -> None:
            published.append(f"{future_message.key}@{current_transactional_id()}")

    write = SimpleNamespace(key="k", message=SimpleNamespace(channel=Channel(), partition=0))
    assert not hold_changelog(write)  # outside a record: Faust's own buffer sends it

    async def run() -> None:
        async with gate.record(FakeEvent("raw.claim", 0, 3)):
            assert hold_changelog(write)
            assert published == []  # sent when the record is done, before its ack

    asyncio.run(run())
    assert published == ["k@app-1-0"]


def test_after_a_rebalance_processing_starts_at_the_committed_offsets() -> None:
    gate = TransactionGate(stub_app("app-1-0", "app-1-1"))
    asyncio.run(process(gate, FakeEvent("raw.claim", 0, 3), []))
    asyncio.run(gate.commit(start_new_transaction=False))  # as Faust does before a rebalance
    gate.assigned({TP("raw.claim", 0), TP("raw.claim", 1)})
    assert gate.poisoned is None
    # Nothing is processed before the seek (its partitions stay paused until then).
    with pytest.raises(TransactionPoisoned, match="before the seek"):
        asyncio.run(process(gate, FakeEvent("raw.claim", 1, 8), []))
    gate.sought({TP("raw.claim", 1): 20, TP("raw.claim", 0): 4})
    assert gate.skip(FakeEvent("raw.claim", 1, 19))  # the previous owner's, committed
    assert not gate.skip(FakeEvent("raw.claim", 1, 20))
    assert not gate.skip(FakeEvent("raw.claim", 0, 4))
    # A jump past the committed offset of a raw topic is caught from the first record.
    gate.contiguous = frozenset({"raw.claim"})
    with pytest.raises(RecordsSkipped):
        asyncio.run(process(gate, FakeEvent("raw.claim", 1, 25), []))
    # The committed offsets are where processing resumes: nothing left to commit.
    gate = TransactionGate(stub_app("app-1-1"))
    gate.sought({TP("raw.claim", 1): 20})
    assert asyncio.run(gate.commit()) == {}
    # A partition never committed starts wherever the reset policy puts it.
    gate.assigned(set())
    gate.sought({})
    assert not gate.skip(FakeEvent("raw.claim", 0, 0))


def test_a_cancelled_commit_does_not_leave_the_gate_closed() -> None:
    gate = TransactionGate(stub_app("app-1-0"))

    async def run() -> None:
        started, release = asyncio.Event(), asyncio.Event()

        async def slow_record() -> None:
            async with gate.record(FakeEvent("raw.claim", 0, 3)):
                started.set()
                await release.wait()

        record = asyncio.create_task(slow_record())
        await started.wait()
        commit = asyncio.create_task(gate.commit())
        await asyncio.sleep(0)  # the commit now waits for the record in flight
        commit.cancel()
        with pytest.raises(asyncio.CancelledError):
            await commit
        release.set()
        await record
        # Records and commits go on.
        await asyncio.wait_for(process(gate, FakeEvent("raw.claim", 0, 4), []), 2)
        assert await asyncio.wait_for(gate.commit(), 2) == {TP("raw.claim", 0): 5}

    asyncio.run(run())


def test_a_table_with_another_partition_count_than_its_source_is_refused() -> None:
    app = stub_app("app-1-0")
    app.assignor.group_for_topic = lambda topic: 2 if topic.endswith("-changelog") else 1
    gate = TransactionGate(app)

    class Channel:
        def get_topic_name(self) -> str:
            return "app-state-changelog"

        async def publish_message(self, future_message: Any, wait: bool) -> None:
            raise AssertionError("must not be sent")

    write = SimpleNamespace(message=SimpleNamespace(channel=Channel(), partition=0))

    async def run() -> None:
        async with gate.record(FakeEvent("raw.claim", 0, 3)):
            assert hold_changelog(write)

    with pytest.raises(TransactionPoisoned, match="partition count"):
        asyncio.run(run())


def test_exactly_once_commits_often_and_is_refused_on_tansu() -> None:
    assert StreamSettings().processing_guarantee == "at_least_once"
    assert StreamSettings().commit_interval == 1000
    eos = StreamSettings(processing_guarantee="exactly_once")
    assert eos.commit_interval == 100
    slower = StreamSettings(processing_guarantee="exactly_once", commit_interval_ms=250)
    assert slower.commit_interval == 250
    eos.check_broker(KafkaSettings(broker_kind="kafka"))
    with pytest.raises(ValueError, match="needs Apache Kafka"):
        eos.check_broker(KafkaSettings(broker_kind="tansu"))
    StreamSettings().check_broker(KafkaSettings(broker_kind="tansu"))


def test_an_agent_that_raises_mid_record_poisons_the_gate_instead_of_hanging_its_commit() -> None:
    gate = TransactionGate(stub_app("app-1-0"))

    async def records() -> Any:
        for event in [FakeEvent("raw.claim", 0, 3), FakeEvent("raw.claim", 0, 4)]:
            async with gate.record(event):
                yield event

    async def agent() -> None:
        async for _ in records():
            raise KeyError("a bug in a rule")

    async def run() -> None:
        with pytest.raises(KeyError):
            await agent()
        # The event loop closes the abandoned generator (in another task) soon after.
        await asyncio.sleep(0.05)
        with pytest.raises(TransactionPoisoned):
            await asyncio.wait_for(gate.commit(), 2)

    asyncio.run(run())


def test_a_partition_kept_across_a_rebalance_with_uncommitted_work_stops_the_worker() -> None:
    gate = TransactionGate(stub_app("app-1-0"))
    asyncio.run(process(gate, FakeEvent("raw.claim", 0, 3), []))
    # Faust's commit before the rebalance did not happen: processing from the committed
    # offset would put these outputs into the open transaction a second time.
    gate.assigned({TP("raw.claim", 0)})
    assert gate.poisoned is not None
    with pytest.raises(TransactionPoisoned):
        asyncio.run(process(gate, FakeEvent("raw.claim", 0, 4), []))


def test_a_failed_commit_keeps_records_out_of_every_transaction() -> None:
    app = stub_app("app-1-0", "app-1-1")
    gate = TransactionGate(app)

    async def fenced() -> None:
        raise ProducerFenced()

    app.producer._transaction_producers["app-1-0"].commit_transaction = fenced
    asyncio.run(process(gate, FakeEvent("raw.claim", 0, 3), []))
    asyncio.run(process(gate, FakeEvent("raw.claim", 1, 3), []))
    with pytest.raises(ProducerFenced):
        asyncio.run(gate.commit())
    # The other transaction was committed; no record runs into the open ones any more.
    assert ("commit", None) in app.producer._transaction_producers["app-1-1"].calls
    with pytest.raises(TransactionPoisoned):
        asyncio.run(process(gate, FakeEvent("raw.claim", 1, 4), []))
