"""A record that triggers a bug in a detect-side stage is dead-lettered, and the next is processed.

Each test injects a named fake bug (a monkeypatched function of the stage's rule family
that fails for one record only, after writing state) and checks: exactly one
``internal_error`` dead letter with the stage, the original bytes and position; none of
the failed record's state writes kept; the following record handled as usual.
"""

from __future__ import annotations

import asyncio
from typing import Any

import prometheus_client
import pytest

from medstream.settings import KafkaSettings
from schemas import serde
from streams.alert_lifecycle import AlertLifecycle
from streams.app import create_app
from streams.detect import (
    DetectStage,
    FeedWatchStage,
    GuardedStage,
    LifecycleInputs,
    LifecycleStage,
    Output,
    PatientIndexStage,
    SyndromicStage,
)
from streams.feed_rules import FeedDetector
from streams.findings import DictState, Finding, KeyValueState
from streams.internal_errors import (
    STORM_LIMIT,
    InternalErrors,
    InternalErrorStorm,
    surviving_tick,
)
from streams.model import RawContext
from streams.mpi import PatientIndex
from streams.news2 import News2Detector
from streams.pseudonym import Pseudonymiser
from streams.stage import FeedActivityCounter, NormaliseStage, SuppressionState
from streams.syndromic import SyndromicDetector
from streams.terminology import Terminology

from .test_app import _settings as app_settings
from .test_detect import lineage, observation
from .test_identity import stage as normalise_stage
from .test_identity import two_hospital_identities
from .test_stage import encoded_hl7, potassium

REGISTRY = serde.ManifestRegistry()
KAFKA = KafkaSettings(bootstrap_servers="unused:9092", topic_prefix="t.")
T0 = 1_793_700_000_000
decode_dead_letter = serde.AvroDeserializer(REGISTRY, serde.DEAD_LETTER)


class FakeBug(RuntimeError):
    """The fake of a bug in a rule family (raised for one chosen record only)."""


def internal_error_count(stage: str) -> float:
    return prometheus_client.REGISTRY.get_sample_value(
        "medstream_internal_errors_total", {"stage": stage}
    ) or 0.0


def with_a_fake_bug(
    monkeypatch: pytest.MonkeyPatch, owner: type, name: str, poisoned: Any
) -> None:
    """Make ``owner.name`` write state and then raise for the records ``poisoned`` picks."""
    real = getattr(owner, name)

    def buggy(self: Any, record: Any, state: KeyValueState, *args: Any, **kwargs: Any) -> Any:
        if poisoned(record):
            state.put("written-before-the-bug", {"left": "behind"})
            raise FakeBug("TESTPATIENT 6.9")  # a message that may carry values
        return real(self, record, state, *args, **kwargs)

    monkeypatch.setattr(owner, name, buggy)


def assert_one_internal_error(
    outputs: list[Output], stage: str, at: RawContext, value: bytes, errors_before: float
) -> None:
    assert [o.topic for o in outputs] == ["t.dlq"]
    dead = decode_dead_letter(outputs[0].value)
    assert (dead["stage"], dead["reason_code"]) == (stage, "internal_error")
    assert dead["original_value"] == value
    assert (dead["original_topic"], dead["original_partition"], dead["original_offset"]) == (
        at.topic, at.partition, at.offset
    )
    assert "FakeBug in test_poison_records.py:buggy" in dead["reason"]
    assert "TESTPATIENT" not in dead["reason"] and "6.9" not in dead["reason"]
    assert internal_error_count(stage) == errors_before + 1


def poison_then_next(
    stage: GuardedStage, name: str, at: RawContext, poisoned: bytes, following: bytes
) -> None:
    """The poisoned record is dead-lettered without a trace in state; the next is processed."""
    state = DictState()
    before = internal_error_count(name)
    outputs = stage.handle(poisoned, state, T0, at, b"k")
    assert_one_internal_error(outputs, name, at, poisoned, before)
    assert state.values == {}
    outputs = stage.handle(following, state, T0, at, b"k")
    assert [o for o in outputs if o.topic == "t.dlq"] == []
    assert state.values and "written-before-the-bug" not in state.values


def test_detect_dead_letters_a_poison_event_and_processes_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with_a_fake_bug(monkeypatch, News2Detector, "observe", lambda e: e["event_id"] == "BUG-1")
    detect = DetectStage(KAFKA, REGISTRY)
    state = DictState()
    before = internal_error_count("detect")
    at = RawContext("t.norm.observation", 1, 30, T0)
    poisoned = observation("BUG-1", "9279-1", 26, "/min", 1)
    outputs = detect.handle("observation", poisoned, state, T0, at, b"k")
    assert_one_internal_error(outputs, "detect", at, poisoned, before)
    assert state.values == {}
    following = detect.handle(
        "observation", observation("OK-2", "9279-1", 26, "/min", 2), state, T0,
        RawContext("t.norm.observation", 1, 31, T0), b"k",
    )
    assert [o.topic for o in following if o.topic == "t.dlq"] == []
    assert state.values and "written-before-the-bug" not in state.values


def test_an_unreadable_norm_record_is_an_internal_error_not_a_crash() -> None:
    detect = DetectStage(KAFKA, REGISTRY)
    before = internal_error_count("detect")
    at = RawContext("t.norm.diagnosis", 0, 5, T0)
    outputs = detect.handle("diagnosis", b"not avro", DictState(), T0, at, None)
    dead = decode_dead_letter(outputs[0].value)
    assert [o.topic for o in outputs] == ["t.dlq"]
    assert (dead["reason_code"], dead["original_value"]) == ("internal_error", b"not avro")
    assert "SerializationError" in dead["reason"]
    assert internal_error_count("detect") == before + 1


def test_a_failure_that_is_not_the_records_fault_still_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unreachable(*args: Any) -> Any:
        raise ConnectionError("the schema registry could not be asked")

    detect = DetectStage(KAFKA, REGISTRY)
    monkeypatch.setattr(News2Detector, "observe", unreachable)
    with pytest.raises(ConnectionError):
        detect.handle("observation", observation("E-1", "9279-1", 26, "/min", 1), DictState(), T0)


def finding(subject: str, event_id: str) -> Finding:
    return Finding(
        "critical.potassium", "v1", "critical", "H001", subject, T0, (event_id,),
        "potassium 6.9 mmol/L", person_key="f" * 32,
    )


def test_lifecycle_dead_letters_a_poison_input_and_processes_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with_a_fake_bug(
        monkeypatch, AlertLifecycle, "on_finding", lambda f: f.subject == "BUG|potassium"
    )
    lifecycle = LifecycleStage(KAFKA, REGISTRY)
    inputs = LifecycleInputs(KAFKA, REGISTRY)
    state = DictState()
    before = internal_error_count("lifecycle")
    at = RawContext("t.alerts.lifecycle", 3, 12, T0)
    poisoned = inputs.finding(finding("BUG|potassium", "E-1"), T0)
    outputs = lifecycle.handle(poisoned.value, state, T0, at, poisoned.key)
    assert_one_internal_error(outputs, "lifecycle", at, poisoned.value, before)
    assert decode_dead_letter(outputs[0].value)["original_key"] == poisoned.key
    assert state.values == {}
    following = inputs.finding(finding("OK|potassium", "E-2"), T0)
    [opened] = lifecycle.handle(following.value, state, T0, at, following.key)
    alert = serde.AvroDeserializer(REGISTRY, serde.ALERT)(opened.value)
    assert (opened.topic, alert["action"], alert["subject"]) == (
        "t.alerts", "opened", "OK|potassium"
    )
    assert "written-before-the-bug" not in state.values


def activity(organisation_id: str) -> bytes:
    counter = FeedActivityCounter("worker-1")
    counter.count(organisation_id, "hl7_lab", T0, "rec-1")
    [record] = counter.flush()
    return serde.AvroSerializer(REGISTRY, serde.FEED_ACTIVITY)(record)


def test_feed_watch_dead_letters_a_poison_summary_and_processes_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with_a_fake_bug(
        monkeypatch, FeedDetector, "observe_activity", lambda a: a["organisation_id"] == "HBUG"
    )
    at = RawContext("t.detect.feed_activity", 0, 7, T0)
    poison_then_next(
        FeedWatchStage(KAFKA, REGISTRY), "feed_watch", at, activity("HBUG"), activity("H001")
    )


def diagnosis(event_id: str, offset: int) -> bytes:
    record = lineage(event_id, "dx", offset) | {
        "source_kind": "emr_cdc", "encounter_key": "enc-1", "diagnosis_key": f"dk-{offset}",
        "op": "c", "is_deleted": False, "version": 1, "icd10_code": "J10.1",
        "local_code": "J10.1", "local_display": "influenza", "diagnosis_type": "primary",
        "mapping_status": "mapped",
    }
    return serde.AvroSerializer(REGISTRY, serde.DIAGNOSIS)(record)


def test_syndromic_dead_letters_a_poison_diagnosis_and_processes_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with_a_fake_bug(
        monkeypatch, SyndromicDetector, "observe", lambda e: e["event_id"] == "BUG-1"
    )
    at = RawContext("t.detect.syndromic", 0, 2, T0)
    poison_then_next(
        SyndromicStage(KAFKA, REGISTRY), "syndromic", at, diagnosis("BUG-1", 1),
        diagnosis("OK-2", 2),
    )


def test_the_patient_index_dead_letters_a_bug_as_internal_error_and_links_the_next(
    monkeypatch: pytest.MonkeyPatch, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    """The index already refuses observations it cannot place (invalid_observation,
    index_state); any other exception is a bug and is dead-lettered as internal_error."""
    first, second = two_hospital_identities(normalise_stage(terminology, pseudonymiser))
    decode_identity = serde.AvroDeserializer(REGISTRY, serde.IDENTITY_OBSERVATION)
    poisoned_key = decode_identity(first)["record_key"]
    with_a_fake_bug(
        monkeypatch, PatientIndex, "observe", lambda o: o["record_key"] == poisoned_key
    )
    index = PatientIndexStage(KAFKA, REGISTRY, b"p" * 32)
    state = DictState()
    before = internal_error_count("mpi")
    at = RawContext("t.mpi.identity", 0, 7, T0)
    outputs = index.handle(first, state, T0, at, b"H001")
    assert_one_internal_error(outputs, "mpi", at, first, before)
    assert state.values == {}
    following = index.handle(second, state, T0, RawContext("t.mpi.identity", 0, 8, T0))
    link = serde.AvroDeserializer(REGISTRY, serde.PERSON_LINK)(following[0].value)
    assert [o.topic for o in following] == ["t.mpi.links"]
    assert link["record_key"] == decode_identity(second)["record_key"]
    assert "written-before-the-bug" not in state.values


def test_a_tick_that_raises_is_counted_and_the_next_tick_runs() -> None:
    ticks: list[str] = []

    async def detect_tick() -> None:
        ticks.append("ran")
        if len(ticks) == 1:
            raise FakeBug("a value")

    errors = InternalErrors("detect_tick_test")
    guarded = surviving_tick(errors)(detect_tick)
    asyncio.run(guarded())
    asyncio.run(guarded())
    assert ticks == ["ran", "ran"]
    assert guarded.__name__ == "detect_tick"  # Faust names the timer after it
    assert internal_error_count("detect_tick_test") == 1


def test_a_tick_whose_service_is_unreachable_still_raises() -> None:
    async def lifecycle_tick() -> None:
        raise ConnectionError("broker unreachable")

    with pytest.raises(ConnectionError):
        asyncio.run(surviving_tick(InternalErrors("tick_test"))(lifecycle_tick)())



@pytest.mark.parametrize(
    ("timer", "owner", "method", "stage"),
    [
        ("device_tick", NormaliseStage, "device_tick", "normalise"),
        ("detect_tick", DetectStage, "tick", "detect"),
        ("lifecycle_tick", LifecycleInputs, "tick", "lifecycle"),
        ("send_feed_activity", NormaliseStage, "feed_activity_outputs", "normalise"),
        ("feed_tick", FeedWatchStage, "tick", "feed_watch"),
        ("syndromic_tick", SyndromicStage, "tick", "syndromic"),
    ],
)
def test_every_timer_of_the_worker_survives_a_tick_that_raises(
    monkeypatch: pytest.MonkeyPatch, timer: str, owner: type, method: str, stage: str
) -> None:
    def tick_with_a_fake_bug(*args: Any, **kwargs: Any) -> Any:
        raise FakeBug("a value")

    monkeypatch.setattr(owner, method, tick_with_a_fake_bug)
    worker = create_app(
        KafkaSettings(bootstrap_servers="127.0.0.1:1", topic_prefix="x."), app_settings(),
        REGISTRY,
    )
    # Faust keeps each timer as a loop around the function it decorated: what that loop
    # calls is the guard (old code: the timer's own body, which raised through the loop).
    [task] = [task for task in worker._app_tasks if task.__name__ == timer]
    chain = [task]
    while hasattr(chain[-1], "__wrapped__"):
        chain.append(chain[-1].__wrapped__)
    body = chain[-2]
    assert "faust" not in body.__code__.co_filename, f"{timer} runs its body unguarded"
    before = internal_error_count(stage)
    asyncio.run(body())
    asyncio.run(body())
    assert internal_error_count(stage) == before + 2


def test_a_bug_every_record_hits_stops_the_worker_instead_of_dead_lettering_the_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Review finding L14: the catch-all dead-lettered every record (and every critical
    # alert in them) when a bug hit all of them. STORM_LIMIT in a row now stop the worker.
    with_a_fake_bug(monkeypatch, News2Detector, "observe", lambda e: e["event_id"] != "FINE")
    detect = DetectStage(KAFKA, REGISTRY)
    assert detect.guard.internal_errors.storm_limit == STORM_LIMIT == 20
    state = DictState()

    def handle(offset: int, event: str) -> list[Output]:
        at = RawContext("t.norm.observation", 1, offset, T0)
        return detect.handle("observation", observation(event, "9279-1", 26, "/min", offset),
                             state, T0, at, b"k")

    for offset in range(STORM_LIMIT - 1):
        assert [o.topic for o in handle(offset, f"BUG-{offset}")] == ["t.dlq"]
    assert [o.topic for o in handle(100, "FINE") if o.topic == "t.dlq"] == []  # count restarts
    for offset in range(200, 200 + STORM_LIMIT - 1):
        assert [o.topic for o in handle(offset, f"BUG-{offset}")] == ["t.dlq"]
    before = internal_error_count("detect")
    with pytest.raises(InternalErrorStorm, match="detect: 20 records in a row of t.norm"):
        handle(300, "BUG-300")  # not dead-lettered: uncommitted, read again after the fix
    assert internal_error_count("detect") == before + 1
    assert "written-before-the-bug" not in state.values


def test_the_normalise_breaker_counts_only_records_in_a_row(
    monkeypatch: pytest.MonkeyPatch, terminology: Terminology, pseudonymiser: Pseudonymiser
) -> None:
    from streams import stage as stage_module

    def always_broken(*args: Any) -> Any:
        raise FakeBug("TESTPATIENT")

    normalise = normalise_stage(terminology, pseudonymiser)
    normalise.internal_errors = InternalErrors("normalise", storm_limit=3)
    monkeypatch.setattr(stage_module, "normalise", always_broken)
    outcomes = []
    for offset in range(3):
        try:
            normalise.handle("hl7_lab", RawContext("t.raw.hl7_lab", 0, offset, T0), b"k",
                             encoded_hl7(potassium("4.1", offset), f"OK-{offset}"),
                             SuppressionState.in_memory(), T0)
            outcomes.append("dead-lettered")
        except InternalErrorStorm:
            outcomes.append("stopped")
    assert outcomes == ["dead-lettered", "dead-lettered", "stopped"]


def test_another_feed_s_successes_do_not_hide_a_feed_every_record_of_which_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Second review H2: one count for every topic, reset by any success, so a bug hitting
    # every record of one feed never stopped the worker while other feeds went on.
    with_a_fake_bug(monkeypatch, News2Detector, "observe", lambda e: e["event_id"] != "FINE")
    detect = DetectStage(KAFKA, REGISTRY)
    state = DictState()
    broken, fine = RawContext("t.norm.observation", 0, 0, T0), RawContext("t.norm.lab", 0, 0, T0)

    def succeed_elsewhere() -> None:
        # The stage's count, as another feed's processed record leaves it.
        detect.guard.internal_errors.succeeded(fine.topic)

    for offset in range(STORM_LIMIT - 1):
        at = RawContext(broken.topic, 0, offset, T0)
        outputs = detect.handle("observation", observation(f"BUG-{offset}", "9279-1", 26,
                                                           "/min", offset), state, T0, at, b"k")
        assert [o.topic for o in outputs] == ["t.dlq"]
        succeed_elsewhere()
    assert detect.guard.internal_errors.in_a_row == {broken.topic: STORM_LIMIT - 1}
    with pytest.raises(InternalErrorStorm, match="records in a row of t.norm.observation"):
        detect.handle("observation", observation("BUG-99", "9279-1", 26, "/min", 99), state,
                      T0, RawContext(broken.topic, 0, 99, T0), b"k")
