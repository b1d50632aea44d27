"""The collector framework: ordered acks, config loading, publishing to the real broker."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from medstream import published
from medstream.metrics import PUBLISHED_COUNTER_FAILURES, labelled
from medstream.published import PublishedLedger, published_files, read_published
from medstream.settings import KafkaSettings, RuntimeSettings
from producers import collector_class
from producers.base import (
    COLLECTOR_HEADER,
    Collector,
    CollectorConfig,
    CollectorState,
    ConfigError,
    OrderedAcks,
    RawPublisher,
    RefusalBudget,
    load_config,
)
from schemas.serde import ManifestRegistry
from tests.kafka_helpers import DLQ, consume, raw_topic


def test_ordered_acks_commit_only_fully_acknowledged_prefix() -> None:
    acks: OrderedAcks[int] = OrderedAcks()
    first = acks.track()
    second = acks.track()
    acks.mark(100)  # transaction 1 = two records
    third = acks.track()
    acks.mark(200)
    second(None)
    third(None)
    assert acks.committable() is None  # the first record is still in flight
    first(None)
    assert acks.committable() == 200
    assert acks.committable() is None
    assert acks.pending == 0


def test_ordered_acks_failure_blocks_commit() -> None:
    acks: OrderedAcks[str] = OrderedAcks()
    done = acks.track()
    acks.mark("a")
    done("broker down")
    assert acks.committable() is None
    assert acks.failure == "broker down"


def test_ordered_acks_from_another_thread() -> None:
    acks: OrderedAcks[int] = OrderedAcks()
    callbacks = []
    for position in range(1000):
        callbacks.append(acks.track())
        acks.mark(position)
    worker = threading.Thread(target=lambda: [cb(None) for cb in reversed(callbacks)])
    worker.start()
    worker.join()
    assert acks.committable() == 999
    assert acks.in_flight == 0


def test_load_config_expands_environment_and_names_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "kind: mllp\nname: lab-1\norganisation_id: ${ORG_FOR_TEST}\n"
        "source_system: ${SYSTEM_FOR_TEST:-LIS}\n"
    )
    monkeypatch.setenv("ORG_FOR_TEST", "H001")
    config = load_config(path, CollectorConfig)
    assert (config.organisation_id, config.source_system) == ("H001", "LIS")
    monkeypatch.delenv("ORG_FOR_TEST")
    with pytest.raises(ConfigError, match="ORG_FOR_TEST is not set"):
        load_config(path, CollectorConfig)
    path.write_text("kind: mllp\nname: Bad Name\norganisation_id: H\nsource_system: S\nport: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, CollectorConfig)
    assert "name:" in str(info.value) and "port:" in str(info.value)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", CollectorConfig)


def test_unknown_collector_kind_lists_known_kinds() -> None:
    with pytest.raises(ValueError, match="known kinds: claims, devices, mariadb, mllp, postgres"):
        collector_class("ftp")


def test_state_survives_reopen(tmp_path: Path) -> None:
    state = CollectorState(tmp_path / "state.sqlite")
    state.put("lsn", "0/16B3748")
    state.remember("files", "abc", "receipt-1")
    state.remember("files", "abc", "receipt-2")  # first time wins
    state.close()
    reopened = CollectorState(tmp_path / "state.sqlite")
    assert reopened.get("lsn") == "0/16B3748"
    assert reopened.seen("files", "abc") == "receipt-1"
    assert reopened.seen("files", "zzz") is None
    reopened.close()


@pytest.mark.integration
def test_publisher_sends_raw_records_and_dead_letters_with_collector_header(kafka_factory) -> None:
    kafka = kafka_factory()
    publisher = RawPublisher(kafka, ManifestRegistry(), "hl7_lab", "lab-test")
    acks: OrderedAcks[int] = OrderedAcks()
    for n in range(3):
        publisher.publish(
            f"k{n}",
            {
                "message_control_id": f"CTRL{n}",
                "organisation_id": "H001",
                "source_system": "LIS",
                "message_type": "ORU^R01",
                "received_time": 1_700_000_000_000 + n,
                "payload": "MSH|^~\\&|LIS",
            },
            acks.track(),
        )
        acks.mark(n)
    dlq_id = publisher.dead_letter(
        "not_hl7", "frame is not an HL7 message", b"garbage", acks.track()
    )
    assert publisher.flush(10) == 0
    assert acks.committable() == 2 and acks.failure is None
    raw = consume(kafka, [raw_topic("hl7_lab")], 3)
    assert sorted(r.value["message_control_id"] for r in raw) == ["CTRL0", "CTRL1", "CTRL2"]
    assert all(r.headers[COLLECTOR_HEADER] == b"lab-test" for r in raw)
    dead = consume(kafka, [DLQ], 1)
    assert len(dead) == 1
    assert dead[0].value["dlq_id"] == dlq_id
    assert dead[0].value["stage"] == "producer"
    assert dead[0].value["original_topic"] == "collector/lab-test"
    assert dead[0].value["reason_code"] == "not_hl7"
    assert dead[0].value["original_value"] == b"garbage"


_LAB_RECORD = {
    "message_control_id": "C1", "organisation_id": "H001", "source_system": "LIS",
    "message_type": "ORU^R01", "received_time": 1_700_000_000_000, "payload": "MSH|",
}


def _counted(path: Path) -> int:
    return sum(r.records for r in read_published([path]))


@pytest.mark.integration
def test_an_acknowledgement_is_acted_on_only_once_its_count_is_on_disk(
    kafka_factory, tmp_path: Path
) -> None:
    path = tmp_path / "published.sqlite"
    publisher: RawPublisher
    ledger = PublishedLedger(path, "collector-lab", "p1", lambda: publisher.cluster_id())
    publisher = RawPublisher(kafka_factory(), ManifestRegistry(), "hl7_lab", "lab", ledger=ledger)
    on_disk_when_settled: list[int] = []
    for n in range(20):
        # What a collector does on an ack (commit a position, answer the sender) happens
        # only when the counter on disk, read by another connection, already holds it.
        publisher.publish(f"k{n}", _LAB_RECORD, lambda error: on_disk_when_settled.append(
            _counted(path)
        ))
    assert publisher.flush(10) == 0
    assert len(on_disk_when_settled) == 20
    assert all(
        counted >= settled
        for settled, counted in enumerate(on_disk_when_settled, start=1)
    ), on_disk_when_settled


@pytest.mark.integration
def test_while_the_counter_cannot_be_written_no_position_is_released_then_all_are(
    kafka_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(published, "BUSY_TIMEOUT_S", 0.05)
    path = tmp_path / "published.sqlite"
    publisher: RawPublisher
    ledger = PublishedLedger(path, "collector-locked", "p1", lambda: publisher.cluster_id())
    publisher = RawPublisher(
        kafka_factory(), ManifestRegistry(), "hl7_lab", "locked", ledger=ledger
    )
    failures = labelled(PUBLISHED_COUNTER_FAILURES, "collector-locked")
    before = failures._value.get()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    acks: OrderedAcks[int] = OrderedAcks()
    for n in range(3):
        publisher.publish(f"k{n}", _LAB_RECORD, acks.track())
        acks.mark(n)
    assert publisher.flush(1) == 3  # acknowledged by Kafka, but not counted on disk yet
    assert publisher.in_queue() == 3  # so a snapshot is not taken as done (postgres_cdc)
    assert acks.committable() is None and acks.failure is None
    assert failures._value.get() > before
    blocker.execute("ROLLBACK")
    blocker.close()
    assert publisher.flush(10) == 0
    assert acks.committable() == 2
    assert _counted(path) == 3


class _Idle(Collector[CollectorConfig]):
    kind = "idle"
    source_kind = "hl7_lab"
    config_model = CollectorConfig

    def run(self, stop: threading.Event) -> None:
        """Nothing to collect."""


def test_a_collector_with_its_own_state_dir_is_found_by_reconcile(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    config = CollectorConfig(
        kind="idle", name="lab-own-dir", organisation_id="H001", source_system="LIS",
        state_dir=tmp_path / "custom",
    )
    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:1")
    collector = _Idle(config, kafka, ManifestRegistry(), RuntimeSettings(data_dir=data_dir))
    collector.publisher.ledger.close()
    assert published_files(data_dir) == [tmp_path / "custom" / "published.sqlite"]


class _PollRaises:
    """A producer whose delivery-report handling fails (as a callback raising would)."""

    def __init__(self) -> None:
        self.produced = 0

    def produce(self, *args: object, **kwargs: object) -> None:
        self.produced += 1

    def poll(self, timeout: float = 0) -> int:
        if self.produced:
            raise RuntimeError("callback exploded")
        return 0

    def flush(self, timeout: float = 0) -> int:
        return self.produced

    def __len__(self) -> int:
        return self.produced


def test_async_publisher_fails_waiting_publishes_when_delivery_reports_break(
    kafka_factory,
) -> None:
    import asyncio

    from producers.base import AsyncPublisher, DeliveryFailed

    publisher = RawPublisher(
        kafka_factory(), ManifestRegistry(), "hl7_lab", "broken", producer=_PollRaises()
    )
    record = {
        "message_control_id": "C1", "organisation_id": "H001", "source_system": "LIS",
        "message_type": "ORU^R01", "received_time": 1_700_000_000_000, "payload": "MSH|",
    }

    async def main() -> tuple[str, str]:
        wrapper = AsyncPublisher(publisher)
        wrapper.start()
        with pytest.raises(DeliveryFailed, match="callback exploded"):
            await asyncio.wait_for(wrapper.publish("k", record), 5)
        with pytest.raises(DeliveryFailed) as later:  # and every later publish, at once
            await asyncio.wait_for(wrapper.publish("k", record), 5)
        await wrapper.close(timeout=0)
        return str(later.value), str(len(wrapper._pending))

    message, pending = asyncio.run(main())
    assert "delivery report handling failed" in message
    assert pending == "0"


def test_snapshot_row_ids_are_stable_keyed_and_content_addressed(tmp_path: Path) -> None:
    from producers.base import snapshot_row_ref

    state = CollectorState(tmp_path / "s.sqlite")
    key = state.secret("snapshot_ids")
    state.close()
    assert CollectorState(tmp_path / "s.sqlite").secret("snapshot_ids") == key  # persisted
    row = {"visit_no": "V-1", "patient_mrn": "SYNTH-MRN-1", "admit": None}
    same = snapshot_row_ref(key, dict(reversed(list(row.items()))))
    assert snapshot_row_ref(key, row) == same  # column order does not matter
    assert snapshot_row_ref(key, {**row, "admit": "2026-11-01"}) != same  # content does
    assert snapshot_row_ref(b"another key" * 3, row) != same  # keyed: not guessable
    assert "SYNTH-MRN-1" not in same and len(same) == 32


def test_the_refusal_budget_dead_letters_the_first_and_summarises_the_rest() -> None:
    budget = RefusalBudget(in_full=2, window_s=10.0)
    t0 = 1_800_000_000_000
    admitted = [budget.admit("DEV-1", "rate_limited", t0 + i, "H001") for i in range(5)]
    assert admitted == [True, True, False, False, False]
    # Another sender, or another reason of the same sender, has its own budget.
    assert budget.admit("DEV-2", "rate_limited", t0) and budget.admit("DEV-1", "too_large", t0)
    assert budget.due(t0 + 9_999) == []  # the window is still open
    [held] = budget.due(t0 + 10_000)
    assert (held.sender, held.reason_code, held.organisation_id) == (
        "DEV-1", "rate_limited", "H001"
    )
    assert (held.dead_lettered, held.held, held.first_held_ms, held.last_held_ms) == (
        2, 3, t0 + 2, t0 + 4
    )
    reason = held.summary_reason(2, 10.0)
    assert reason.startswith("3 more refusals (rate_limited) of this sender between ")
    assert "at most 2 per sender and reason every 10 s" in reason and "DEV-1" not in reason
    assert budget.due(t0 + 20_000) == []  # handed out once
    # A new window admits again; a window closed by the next refusal is handed out too.
    for i in range(4):
        budget.admit("DEV-1", "rate_limited", t0 + 30_000 + i)
    assert budget.admit("DEV-1", "rate_limited", t0 + 45_000)
    assert [h.held for h in budget.due(t0 + 45_001)] == [2]
    budget.admit("DEV-1", "rate_limited", t0 + 45_002)
    budget.admit("DEV-1", "rate_limited", t0 + 45_003)
    assert [h.held for h in budget.due(t0 + 45_004, final=True)] == [1]  # on stop: all
