"""Unit tests of the publishers' own counters: acknowledged positions kept on disk as ranges."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from medstream.published import (
    FLUSH_INTERVAL_S,
    PUBLISHED_FILE,
    PublishedLedger,
    published_files,
    read_published,
)
from medstream.settings import KafkaSettings
from producers.base import RawPublisher
from schemas.serde import RUN_HEADER, ManifestRegistry
from tests.kafka_helpers import consume, raw_topic


def test_acknowledged_offsets_are_kept_as_ranges_per_partition(tmp_path: Path) -> None:
    path = tmp_path / "published" / "simulator.sqlite"
    ledger = PublishedLedger(path, "simulator", "r1", lambda: "cluster-1")
    for offset in range(0, 10):
        ledger.acknowledged("raw.hl7_lab", 0, offset, 1_000 + offset)
    for offset in (20, 21, 22):  # another producer wrote 10..19 in between
        ledger.acknowledged("raw.hl7_lab", 0, offset, 2_000 + offset)
    ledger.acknowledged("raw.device", 1, 7, 3_000)
    ledger.close()
    ranges = sorted(read_published([path]), key=lambda r: (r.topic, r.first_offset))
    assert [(r.topic, r.partition, r.first_offset, r.last_offset, r.records) for r in ranges] == [
        ("raw.device", 1, 7, 7, 1),
        ("raw.hl7_lab", 0, 0, 9, 10),
        ("raw.hl7_lab", 0, 20, 22, 3),
    ]
    assert {(r.publisher, r.run_id, r.kafka_cluster) for r in ranges} == {
        ("simulator", "r1", "cluster-1")
    }
    assert (ranges[1].first_ms, ranges[1].last_ms) == (1_000, 1_009)


def test_a_range_still_growing_is_written_at_each_flush_and_survives_the_process(
    tmp_path: Path,
) -> None:
    path = tmp_path / "collectors" / "lis" / "published.sqlite"
    clock = [0.0]
    ledger = PublishedLedger(path, "collector-lis", "p1", lambda: "c", clock=lambda: clock[0])
    ledger.acknowledged("raw.hl7_lab", 0, 0, 1)
    ledger.flush_due()  # not due yet: nothing written
    assert list(read_published([path])) == []
    clock[0] += FLUSH_INTERVAL_S
    ledger.flush_due()
    ledger.acknowledged("raw.hl7_lab", 0, 1, 2)
    clock[0] += FLUSH_INTERVAL_S
    ledger.flush_due()
    # Read while the writer is still open (as after a kill -9): the flushed state is there.
    [grown] = read_published([path])
    assert (grown.first_offset, grown.last_offset, grown.publisher) == (0, 1, "collector-lis")
    assert published_files(tmp_path) == [path]


def test_acknowledgements_wait_while_the_cluster_id_is_unknown(tmp_path: Path) -> None:
    path = tmp_path / "published" / "simulator.sqlite"
    answers: list[str | Exception] = [TimeoutError("no broker yet"), "c2"]

    def cluster_id() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    ledger = PublishedLedger(path, "simulator", "r2", cluster_id)
    ledger.acknowledged("raw.claim", 0, 4, 9)
    ledger.flush()
    assert list(read_published([path])) == []
    ledger.close()
    [kept] = read_published([path])
    assert (kept.kafka_cluster, kept.first_offset) == ("c2", 4)
    assert published_files(tmp_path) == [path]


@pytest.mark.integration
def test_a_collector_s_publisher_counts_what_the_broker_acknowledged(
    kafka_factory: Callable[..., KafkaSettings], tmp_path: Path
) -> None:
    kafka = kafka_factory()
    path = tmp_path / "collectors" / "lab-test" / PUBLISHED_FILE
    publisher: RawPublisher
    ledger = PublishedLedger(path, "collector-lab-test", "p7", lambda: publisher.cluster_id())
    publisher = RawPublisher(kafka, ManifestRegistry(), "hl7_lab", "lab-test", ledger=ledger)
    for n in range(5):
        publisher.publish("same-key", {
            "message_control_id": f"CTRL{n}", "organisation_id": "H001", "source_system": "LIS",
            "message_type": "ORU^R01", "received_time": 1_700_000_000_000 + n,
            "payload": "MSH|^~\\&|LIS",
        }, lambda error: None)
    assert publisher.flush(10) == 0  # flushes the counters too
    [acked] = read_published(published_files(tmp_path))
    assert (acked.publisher, acked.run_id) == ("collector-lab-test", "p7")
    assert acked.topic == kafka.topic("raw.hl7_lab")
    assert (acked.first_offset, acked.last_offset, acked.records) == (0, 4, 5)
    assert acked.kafka_cluster == publisher.cluster_id() != ""
    raw = consume(kafka, [raw_topic("hl7_lab")], 5)
    assert all(r.headers[RUN_HEADER] == b"p7" for r in raw)  # the run travels with each record
