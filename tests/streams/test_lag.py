"""The consumer-lag gauge: records behind the high watermark, from the committed offset while
nothing was read since an assignment; a topic with a partition of unknown high watermark is
not reported (never as 0), and topics no longer held leave the gauge."""

from __future__ import annotations

import uuid

from prometheus_client import REGISTRY

from medstream.metrics import PartitionPosition, partition_lag, report_consumer_lag, topic_lags


def test_lag_counts_from_the_last_record_read() -> None:
    assert partition_lag(2220, next_offset=2000, committed=1900) == 220
    assert partition_lag(2220, next_offset=2220, committed=1900) == 0


def test_a_partition_read_to_its_end_before_a_restart_has_no_lag() -> None:
    # Nothing read since the assignment: the committed offset is where reading starts.
    assert partition_lag(2220, next_offset=None, committed=2220) == 0
    assert partition_lag(2220, next_offset=None, committed=2000) == 220
    # Nothing ever committed: the whole partition is behind.
    assert partition_lag(2220, next_offset=None, committed=None) == 2220
    # A stale read offset from an earlier assignment never outweighs the committed one.
    assert partition_lag(2220, next_offset=100, committed=2220) == 0


def test_a_topic_is_reported_only_when_every_partition_s_high_watermark_is_known() -> None:
    positions = [
        PartitionPosition("t.raw.a", 900, next_offset=None, committed=100),
        PartitionPosition("t.raw.a", 500, next_offset=480, committed=400),
        # Just assigned, nothing fetched yet: the old report took its watermark for 0, so a
        # fresh worker with 1,109 records to read reported `lag 0`.
        PartitionPosition("t.raw.b", None, next_offset=None, committed=0),
        PartitionPosition("t.raw.b", 300, next_offset=None, committed=0),
        PartitionPosition("t.raw.c", -1, next_offset=None, committed=None),  # no offset known
        PartitionPosition("t.raw.d", 0, next_offset=None, committed=None),  # empty: known 0
    ]
    assert topic_lags(positions) == {"t.raw.a": 800 + 20, "t.raw.d": 0}


def test_records_read_but_not_processed_yet_count_as_behind() -> None:
    # Read to the end into the agents' buffers, 1,100 of them not processed: the old report
    # said 0 while a restarted worker worked through its buffers.
    read_to_end = PartitionPosition("t.raw.a", 2220, next_offset=2220, committed=1120,
                                    unprocessed=1100)
    assert topic_lags([read_to_end]) == {"t.raw.a": 1100}


def test_topics_no_longer_held_leave_the_gauge() -> None:
    stage = f"test-{uuid.uuid4().hex[:6]}"
    reported: set[str] = set()
    report_consumer_lag(stage, {"t.raw.a": 5, "t.raw.b": 0}, reported)

    def sample(topic: str) -> float | None:
        return REGISTRY.get_sample_value(
            "medstream_consumer_lag", {"stage": stage, "topic": topic}
        )

    assert (sample("t.raw.a"), sample("t.raw.b")) == (5.0, 0.0)
    report_consumer_lag(stage, {"t.raw.b": 7}, reported)
    assert (sample("t.raw.a"), sample("t.raw.b")) == (None, 7.0)
    assert reported == {"t.raw.b"}
