"""Unit tests of the Faust app wiring that need no broker."""

from __future__ import annotations

import asyncio

import pytest
from faust.types import TP

from medstream.settings import KafkaSettings, StreamSettings
from schemas import serde
from streams import app as streams_app

TEST_KEY = "test-only-pseudonym-key-0123456789abcdef"


def _settings(**overrides: object) -> StreamSettings:
    """Stream settings with a test-only pseudonym key (no setting has a default key)."""
    return StreamSettings(pseudonym_key=TEST_KEY, **overrides)  # type: ignore[arg-type]


def test_a_failed_output_delivery_ends_the_worker_before_it_can_commit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exits: list[int] = []
    monkeypatch.setattr(streams_app.os, "_exit", exits.append)
    loop = asyncio.new_event_loop()
    try:
        delivered, failed, cancelled = (loop.create_future() for _ in range(3))
        delivered.set_result("metadata")
        failed.set_exception(ConnectionError("broker gone"))
        cancelled.cancel()
        for future in (delivered, failed, cancelled):
            streams_app.exit_on_failed_delivery(future)
    finally:
        loop.close()
    assert exits == [streams_app.EXIT_DELIVERY_FAILED] * 2


def test_app_has_its_agents_and_the_tuning_of_its_broker() -> None:
    kafka = KafkaSettings(
        bootstrap_servers="127.0.0.1:1",
        topic_prefix="x.",
        fetch_wait_max_ms=25,
        broker_kind="tansu",
    )
    faust_app = streams_app.create_app(kafka, _settings(), serde.ManifestRegistry())
    # One normalise agent per raw topic, one detect agent per watched norm topic, and the
    # alert lifecycle.
    assert sorted(faust_app.agents) == [
        "alert_lifecycle",
        "detect_claim_line", "detect_diagnosis", "detect_encounter", "detect_observation",
        "feed_watch",
        "normalise_claim", "normalise_device", "normalise_emr_cdc", "normalise_hl7_lab",
        "patient_index", "syndromic",
    ]
    assert sorted(a.channel.get_topic_name() for a in faust_app.agents.values()) == [
        "x.alerts.lifecycle",
        "x.detect.feed_activity", "x.detect.syndromic",
        "x.mpi.identity",
        "x.norm.claim_line", "x.norm.diagnosis", "x.norm.encounter", "x.norm.observation",
        "x.raw.claim", "x.raw.device", "x.raw.emr_cdc", "x.raw.hl7_lab",
    ]
    assert faust_app.conf.topic_replication_factor == 1  # the embedded broker's one copy
    replicated = KafkaSettings(bootstrap_servers="127.0.0.1:1", replication_factor=3)
    assert streams_app.create_app(
        replicated, _settings(), serde.ManifestRegistry()
    ).conf.topic_replication_factor == 3
    # tansu: short sessions (its joins take half of one), no idempotence (InitProducerId v0).
    assert faust_app.conf.broker_session_timeout == 3.0
    assert faust_app.conf.broker_heartbeat_interval == 0.5
    assert faust_app.fetch_wait_max_ms == 25
    assert not faust_app.idempotent_producer
    assert str(faust_app.conf.broker[0]).startswith("medstream-kafka://")
    # Apache Kafka: its minimum session is 6 s, waiting fetches are woken by new data, and
    # every producer is idempotent.
    on_kafka = streams_app.create_app(replicated, _settings(), serde.ManifestRegistry())
    assert on_kafka.conf.broker_session_timeout == 10.0
    assert on_kafka.fetch_wait_max_ms == 500
    assert on_kafka.idempotent_producer
    producer = on_kafka.producer
    assert producer._settings_extra() == {"acks": "all", "enable_idempotence": True}
    assert not faust_app.producer._settings_extra()
    # At-least-once by default: no transactions, Faust commits every second.
    assert on_kafka.transaction_gate is None
    assert on_kafka.conf.processing_guarantee.value == "at_least_once"
    assert on_kafka.conf.broker_commit_interval == 1.0
    # exactly_once: Faust's transactional mode with the gate, committing every 100 ms, and
    # the raw topics (written without transactions) checked for skipped offsets.
    eos = streams_app.create_app(
        replicated, _settings(processing_guarantee="exactly_once"), serde.ManifestRegistry()
    )
    assert eos.conf.processing_guarantee.value == "exactly_once"
    assert eos.conf.broker_commit_interval == 0.1
    assert eos.transaction_gate is not None
    assert eos.transaction_gate.contiguous == {
        "raw.claim", "raw.device", "raw.emr_cdc", "raw.hl7_lab"
    }
    # The Faust internals the gate and the flow-control fix rely on (private: an upgrade
    # that renames them must fail here, not silently).
    assert isinstance(eos.producer._transaction_producers, dict)
    assert isinstance(eos.producer._trn_locks, dict)
    for internal in ("_acked", "_acked_index", "_gap", "_committed_offset"):
        assert hasattr(eos.consumer, internal), internal
    assert hasattr(eos.flow_control, "_suspend") and hasattr(eos.flow_control, "_resume")
    with pytest.raises(ValueError, match="exactly_once needs Apache Kafka"):
        streams_app.create_app(
            kafka, _settings(processing_guarantee="exactly_once"), serde.ManifestRegistry()
        )
    # Resuming after a rebalance keeps what the stream queues hold (Faust cleared them
    # after its seek, dropping records for good); revoking still clears them.
    async def queue_after_resume_and_clear() -> tuple[int, int]:
        queue = on_kafka.FlowControlQueue(maxsize=10, clear_on_resume=True)
        on_kafka.flow_control.resume()
        await queue.put("record fetched after the seek")
        on_kafka.flow_control.suspend()
        on_kafka.flow_control.resume()
        kept = queue.qsize()
        on_kafka.flow_control.clear()
        return kept, queue.qsize()

    assert asyncio.run(queue_after_resume_and_clear()) == (1, 0)


class CountingTable(dict[str, object]):
    """A plain mapping that counts writes (each would be a changelog record in Faust)."""

    writes = 0

    def __setitem__(self, key: str, value: object) -> None:
        self.writes += 1
        super().__setitem__(key, value)


def test_table_state_writes_state_changed_in_place_to_the_changelog() -> None:
    # Rule families mutate the dict `get` returned and put it back: every put must reach the
    # table (in Faust, a changelog record), or a restarted worker replays stale state.
    table = CountingTable()
    state = streams_app.TableState(table)
    state.put("claims|window", {"prices": [10.0]})
    window = state.get("claims|window")
    assert window is not None
    window["prices"].append(12.5)
    state.put("claims|window", window)
    assert table.writes == 2 and state.get("claims|window") == {"prices": [10.0, 12.5]}
    state.delete("claims|window")
    assert state.get("claims|window") is None


def test_kafka_security_settings_reach_faust_and_librdkafka() -> None:
    import certifi
    import faust

    assert streams_app.broker_credentials(KafkaSettings(bootstrap_servers="k:9093")) is None
    sasl = KafkaSettings(
        bootstrap_servers="k:9093", security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
        sasl_username="medstream", sasl_password="not-a-real-secret",
        ssl_ca_location=certifi.where(),
    )
    faust_app = streams_app.create_app(sasl, _settings(), serde.ManifestRegistry())
    credentials = faust_app.conf.broker_credentials
    assert isinstance(credentials, faust.SASLCredentials)
    assert (credentials.username, credentials.password) == ("medstream", "not-a-real-secret")
    assert str(credentials.mechanism.value) == "SCRAM-SHA-512"
    assert credentials.ssl_context is not None  # verifies the brokers' certificates
    assert credentials.ssl_context.verify_mode.name == "CERT_REQUIRED"
    conf = sasl.producer_config()
    assert conf["security.protocol"] == "SASL_SSL"
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512" and conf["ssl.ca.location"] == certifi.where()
    tls = KafkaSettings(bootstrap_servers="k:9093", security_protocol="ssl")
    assert isinstance(streams_app.broker_credentials(tls), faust.SSLCredentials)
    with pytest.raises(ValueError, match="SASL_PLAINTEXT needs MEDSTREAM_KAFKA_SASL_MECHANISM"):
        streams_app.broker_credentials(
            KafkaSettings(bootstrap_servers="k:9093", security_protocol="SASL_PLAINTEXT")
        )
    with pytest.raises(ValueError, match="'TLS' is not one of"):
        streams_app.broker_credentials(
            KafkaSettings(bootstrap_servers="k:9093", security_protocol="TLS")
        )



def test_a_seek_to_the_committed_offsets_keeps_what_the_worker_committed_meanwhile() -> None:
    # Faust resumes the stream partitions before it reads their committed offsets one by one
    # (a broker round trip each): records fetched meanwhile were processed, acknowledged and
    # committed, and the seek then set Faust's committed offset back to the older one it had
    # read. Faust commits only from an acknowledged offset right after its committed one, so
    # the group's offset on that partition never moved again (a drain that never completed
    # after a restart: raw.device 31 records behind, everything stored).
    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:1")
    consumer = streams_app.create_app(kafka, _settings(), serde.ManifestRegistry()).consumer
    moved, quiet = TP("raw.device", 0), TP("raw.device", 1)
    # Never committed at the broker when the seek read it: one the worker committed
    # meanwhile (its first records), one nobody ever committed.
    first, fresh = TP("raw.device", 2), TP("raw.device", 3)

    async def committed_offsets_read_before_a_commit() -> dict[TP, int | None]:
        """Stands in for aiokafka's seek_to_committed (a round trip to the group coordinator);
        the worker commits records 10-14 of one partition and 0-4 of another while it runs."""
        consumer._committed_offset[moved] = 15
        consumer._committed_offset[first] = 5
        return {moved: 10, quiet: 7, first: None, fresh: None}

    async def log_starts(*tps: TP) -> dict[TP, int]:
        """Stands in for a ListOffsets request (the earliest offsets)."""
        return dict.fromkeys(tps, 0)

    consumer.seek_to_committed = committed_offsets_read_before_a_commit  # type: ignore[method-assign]
    consumer.earliest_offsets = log_starts  # type: ignore[method-assign]
    asyncio.run(consumer.perform_seek())
    assert (consumer._committed_offset[moved], consumer._committed_offset[quiet]) == (15, 7)
    assert (consumer._read_offset[moved], consumer._read_offset[quiet]) == (15, 7)
    # Its own commit stands (it was set back to nothing, and then to the log start, where
    # the commit waited for records it had processed already: a partition stalled 20 s).
    assert (consumer._committed_offset[first], consumer._read_offset[first]) == (5, 5)
    # Nobody's: reading starts at the log start, the first acknowledgement must be there.
    assert (consumer._committed_offset[fresh], consumer._read_offset[fresh]) == (0, None)
    # Records 15-17 processed after it are committed (Faust's own rule): the offset moves on.
    for offset in (15, 16, 17):
        consumer._acked[moved].append(offset)
        consumer._acked_index[moved].add(offset)
    assert consumer._filter_committable_offsets([moved]) == {moved: 18}


def test_sigusr2_stops_the_timers_that_make_output_and_nothing_else() -> None:
    ticks: list[str] = []

    @streams_app.until_timers_stopped
    async def device_tick() -> None:
        ticks.append("tick")

    worker = streams_app.StreamsWorker.__new__(streams_app.StreamsWorker)
    try:
        asyncio.run(device_tick())
        worker._on_sigusr2()
        asyncio.run(device_tick())
        assert ticks == ["tick"]
    finally:
        streams_app.TIMERS_STOPPED.clear()


def test_the_worker_confirms_its_timers_stopped_once_no_tick_is_under_way() -> None:
    # `up` waits for medstream_timers_stopped 1 before its last drain: a tick started
    # before the signal may still publish.
    from prometheus_client import REGISTRY

    def confirmed() -> float | None:
        return REGISTRY.get_sample_value("medstream_timers_stopped")

    async def run() -> list[float | None]:
        seen = []
        release = asyncio.Event()

        @streams_app.until_timers_stopped
        async def slow_tick() -> None:
            await release.wait()

        tick = asyncio.ensure_future(slow_tick())
        await asyncio.sleep(0)
        seen.append(confirmed())  # not asked yet
        streams_app.StreamsWorker.__new__(streams_app.StreamsWorker)._on_sigusr2()
        seen.append(confirmed())  # asked, a tick under way
        release.set()
        await tick
        seen.append(confirmed())
        return seen

    try:
        assert asyncio.run(run()) == [0.0, 0.0, 1.0]
    finally:
        streams_app.TIMERS_STOPPED.clear()


def test_a_worker_whose_loop_closed_ignores_sigusr2(monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    from faust.worker import Worker

    def close_the_loop(self: object) -> None:
        """Stands in for mode's shutdown: closing the loop resets its handlers."""
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)

    monkeypatch.setattr(Worker, "_shutdown_loop", close_the_loop)
    previous = signal.getsignal(signal.SIGUSR2)
    try:
        worker = streams_app.StreamsWorker.__new__(streams_app.StreamsWorker)
        worker._shutdown_loop()
        # The default would end the process (signal 12) before its audit is drained.
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR2, previous)
