"""Table recovery: tansu's true end offsets read from its log, and a changelog read further
than it now reaches replayed from its start instead of stopping the worker."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Mapping

import faust
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from faust.types import TP
from prometheus_client import REGISTRY

from medstream.settings import KafkaSettings
from streams.recovery import CheckedRecovery, CheckedTableManager, tansu_log_ends


class FixedEarliestOffsets:
    """Stand-in for the Faust consumer's earliest-offsets query (the only call made here)."""

    def __init__(self, earliest: Mapping[TP, int]) -> None:
        self.earliest = dict(earliest)

    async def earliest_offsets(self, *partitions: TP) -> Mapping[TP, int]:
        return {tp: self.earliest[tp] for tp in partitions}


def replays(topic: str) -> float:
    return REGISTRY.get_sample_value("medstream_table_state_replays_total", {"topic": topic}) or 0


def test_a_changelog_read_further_than_it_reaches_is_replayed_from_its_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = faust.App(f"recovery-{uuid.uuid4().hex[:6]}", TableManager=CheckedTableManager)
    tables = app.tables
    assert isinstance(tables, CheckedTableManager)
    recovery = tables.recovery
    assert isinstance(recovery, CheckedRecovery)
    short, intact = TP("t-state-changelog", 0), TP("t-state-changelog", 1)
    # Read up to offset 5 of partition 0 in an earlier recovery; it now ends at offset 3.
    recovery.active_highwaters.update({short: 3, intact: 9})
    recovery.active_offsets.update({short: 5, intact: 7})
    before = replays("t-state-changelog")
    with caplog.at_level(logging.WARNING, "medstream.streams"):
        asyncio.run(recovery._build_offsets(
            FixedEarliestOffsets({short: 0, intact: 0}), {short, intact},
            recovery.active_offsets, "active",
        ))
    # Replayed from the log start (Faust's "offset read so far" is one below it); the
    # partition that reaches further than what was read goes on from where it was.
    assert recovery.active_offsets[short] == -1 and recovery.active_offsets[intact] == 7
    assert replays("t-state-changelog") == before + 1
    assert [r.getMessage() for r in caplog.records] == [
        "t-state-changelog[0]: read up to offset 5 in an earlier recovery but the changelog "
        "now ends at offset 3; replaying it from the start"
    ]


@pytest.mark.integration
def test_tansu_end_offsets_are_read_from_its_log(
    tansu_kafka_factory: Callable[..., KafkaSettings],
) -> None:
    kafka = tansu_kafka_factory()
    topic = kafka.topic(f"changelog-{uuid.uuid4().hex[:6]}")
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap_servers})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(timeout=30)
    producer = Producer({"bootstrap.servers": kafka.bootstrap_servers, "linger.ms": 200})
    for batch in range(2):  # two produce batches of 4 records: offsets 0-3 and 4-7
        for index in range(4):
            producer.produce(topic, key=b"k%d" % index, value=b"v%d-%d" % (batch, index))
        assert producer.flush(30) == 0
    reader = Consumer({"bootstrap.servers": kafka.bootstrap_servers, "group.id": "unused"})
    try:
        _, reported = reader.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
    finally:
        reader.close()
    # tansu reports the first offset of the last batch + 1 (the under-count worked around).
    assert reported == 5
    servers = kafka.bootstrap_servers.split(",")
    ends = asyncio.run(tansu_log_ends(servers, {TP(topic, 0): reported}))
    assert ends == {TP(topic, 0): 8}
