"""Unit tests of the detect and lifecycle stages the Faust agents delegate to (no broker)."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest

from medstream.settings import KafkaSettings
from schemas import serde
from streams.detect import (
    DetectStage,
    LifecycleInputs,
    LifecycleStage,
    Output,
    TickOverlay,
)
from streams.alert_lifecycle import AlertTransition
from streams.findings import DictState, Finding
from streams.model import epoch_ms

REGISTRY = serde.ManifestRegistry()
KAFKA = KafkaSettings(bootstrap_servers="unused:9092", topic_prefix="t.")
T0 = 1_793_700_000_000
PERSON = "f" * 32


def decode(output: Output) -> dict[str, Any]:
    subject = {
        "t.alerts": serde.ALERT, "t.alerts.lifecycle": serde.LIFECYCLE_INPUT,
        "t.alerts.outcomes": serde.ALERT_ACTION_OUTCOME,
    }[output.topic]
    return serde.AvroDeserializer(REGISTRY, subject)(output.value)


def lineage(event_id: str, kind: str, offset: int) -> dict[str, Any]:
    return {
        "event_id": event_id, "source_kind": "device", "source_system": "gw",
        "organisation_id": "H001", "event_time": T0 + offset * 1000,
        "ingest_time": T0 + offset * 1000 + 500, "normalised_time": T0 + offset * 1000 + 600,
        "source_topic": "t.raw.device", "source_partition": 0, "source_offset": offset,
        "record_index": 0, "record_count": 1, "source_ref": f"{kind}-{offset}",
        "mapping_version": "v-test", "person_key": PERSON,
    }


def observation(event_id: str, loinc: str, value: float, unit: str, offset: int) -> bytes:
    record = lineage(event_id, "obs", offset) | {
        "device_id": "DEV-FICT-1", "device_type": "monitor-a", "metric_code": loinc,
        "local_code": loinc, "value": value, "unit": unit, "original_unit": unit,
        "mapping_status": "mapped",
    }
    return serde.AvroSerializer(REGISTRY, serde.OBSERVATION)(record)


def claim_line(event_id: str, claim_id: str, offset: int) -> bytes:
    record = lineage(event_id, "claim", offset) | {
        "source_kind": "claim", "claim_id": claim_id, "payer_id": "PAYER-1", "line_no": 1,
        "item_code": "J01DD04", "local_item_code": "D004", "item_display": "ceftriaxone",
        "quantity": 2.0, "unit_price": 35.5, "amount": 71.0,
        "service_date": date(2026, 11, 20), "diagnosis_codes": ["J18.9"],
        "mapping_status": "mapped", "encounter_key": None,
    }
    return serde.AvroSerializer(REGISTRY, serde.CLAIM_LINE)(record)


@pytest.fixture
def detect() -> DetectStage:
    return DetectStage(KAFKA, REGISTRY)


@pytest.fixture
def lifecycle() -> LifecycleStage:
    return LifecycleStage(KAFKA, REGISTRY)


def test_deteriorating_vitals_become_one_news2_emergency_finding(detect: DetectStage) -> None:
    # RR 26 (3), SpO2 91 (3), SBP 95 (2), HR 120 (2), T 39.2 (2): NEWS2 12 -> emergency.
    vitals = [
        ("9279-1", 26, "/min"), ("59408-5", 91, "%"), ("8480-6", 95, "mm[Hg]"),
        ("8867-4", 120, "/min"), ("8310-5", 39.2, "Cel"),
    ]
    state = DictState()
    outputs: list[Output] = []
    for offset, (loinc, value, unit) in enumerate(vitals):
        outputs += detect.handle(
            "observation", observation(f"obs{offset}", loinc, value, unit, offset), state, T0
        )
    assert len(outputs) == 1
    finding = decode(outputs[0])
    assert (finding["input_kind"], finding["rule_id"]) == ("finding", "news2.emergency")
    assert finding["severity"] == "critical" and finding["value"] == 12
    assert sorted(finding["triggering_event_ids"]) == [f"obs{i}" for i in range(5)]
    assert finding["subject"] == f"{PERSON}|news2" and finding["person_key"] == PERSON
    # Lineage is that of the observation that completed the set.
    assert (finding["source_topic"], finding["source_offset"]) == ("t.raw.device", 4)
    assert outputs[0].key == f"news2.emergency|{PERSON}|news2".encode()


def test_the_same_claim_line_billed_on_another_claim_is_an_exact_duplicate(
    detect: DetectStage,
) -> None:
    state = DictState()
    assert detect.handle("claim_line", claim_line("c1", "CLM-1", 1), state, T0) == []
    # The same event again is a redelivery, not a duplicate.
    assert detect.handle("claim_line", claim_line("c1", "CLM-1", 1), state, T0) == []
    [output] = detect.handle("claim_line", claim_line("c2", "CLM-2", 2), state, T0)
    finding = decode(output)
    assert finding["rule_id"] == "claims.exact_duplicate"
    assert set(finding["triggering_event_ids"]) == {"c1", "c2"}


def finding(event_id: str, event_time: int) -> Finding:
    return Finding(
        rule_id="critical_value.potassium", rule_version="r1", severity="critical",
        organisation_id="H001", subject=f"{PERSON}|2823-3", event_time_ms=event_time,
        triggering_event_ids=(event_id,), explanation="Potassium 6.9 mmol/L above critical high 6.2",
        person_key=PERSON, analyte_code="2823-3", value=6.9, unit="mmol/L",
        details={"direction": "high"},
    )


def test_lifecycle_opens_once_then_acknowledge_and_resolve(lifecycle: LifecycleStage) -> None:
    inputs = LifecycleInputs(KAFKA, REGISTRY)
    state = DictState()
    event = lineage("lab1", "lab", 7) | {"source_topic": "t.raw.hl7_lab"}
    opened = lifecycle.handle(inputs.finding(finding("lab1", T0), T0, event).value, state, T0 + 10)
    [snapshot] = [decode(o) for o in opened]
    assert (snapshot["action"], snapshot["status"], snapshot["occurrences"]) == ("opened", "open", 1)
    assert (snapshot["source_topic"], snapshot["source_offset"]) == ("t.raw.hl7_lab", 7)
    assert snapshot["value"] == 6.9 and snapshot["analyte_code"] == "2823-3"
    assert snapshot["triggering_event_ids"] == ["lab1"] and opened[0].key == PERSON.encode()
    alert_id = snapshot["alert_id"]
    # The same finding processed again counts nothing: its "opened" is sent again, the same
    # snapshot (its "opened" may not have reached the broker before a kill); a new one
    # folds into the open alert.
    from prometheus_client import REGISTRY as METRICS

    def alerts_counted() -> float | None:
        return METRICS.get_sample_value(
            "medstream_alerts_total", {"rule_id": "critical_value.potassium"})

    counted = alerts_counted()
    [again] = [decode(o) for o in lifecycle.handle(
        inputs.finding(finding("lab1", T0), T0).value, state, T0 + 20)]
    assert alerts_counted() == counted  # sent again, not counted again
    # The opening's lineage stays the opening finding's (not the reprocessed one's).
    assert (again["source_topic"], again["source_offset"]) == ("t.raw.hl7_lab", 7)
    same = ("transition_id", "alert_id", "action", "status", "occurrences", "updated_time")
    assert {k: again.get(k) for k in same} == {k: snapshot.get(k) for k in same}
    assert lifecycle.handle(inputs.finding(finding("lab2", T0 + 60_000), T0).value, state, T0) == []
    ack = inputs.action("acknowledge", alert_id, "critical_value.potassium", f"{PERSON}|2823-3",
                        "nurse.li", "called ward", T0 + 30, organisation_id="H001",
                        request_id="req-1")
    acked, ack_outcome = [decode(o) for o in lifecycle.handle(ack.value, state, T0 + 30)]
    assert (acked["status"], acked["actor"], acked["note"]) == ("acknowledged", "nurse.li", "called ward")
    assert acked["alert_id"] == alert_id and acked["value"] == 6.9
    assert (ack_outcome["request_id"], ack_outcome["outcome"], ack_outcome["status"]) == (
        "req-1", "applied", "acknowledged"
    )
    resolve = inputs.action("resolve", alert_id, "critical_value.potassium", f"{PERSON}|2823-3",
                            "dr.wang", None, T0 + 40, request_id="req-2")
    outputs = lifecycle.handle(resolve.value, state, T0 + 40)
    assert [o.topic for o in outputs] == ["t.alerts", "t.alerts.outcomes"]
    assert outputs[1].key == b"req-2"
    resolved = decode(outputs[0])
    assert (resolved["status"], resolved["action"], resolved["occurrences"]) == ("resolved", "resolved", 2)
    # The same request processed again (a redelivery) is answered applied again, changing nothing.
    [again] = [decode(o) for o in lifecycle.handle(ack.value, state, T0 + 45)]
    assert (again["request_id"], again["outcome"], again["reason"]) == ("req-1", "applied", "")
    # A new action on a resolved alert is refused with its reason, never a crash.
    late = inputs.action("acknowledge", alert_id, "critical_value.potassium", f"{PERSON}|2823-3",
                         "nurse.li", None, T0 + 50, request_id="req-3")
    [refused] = [decode(o) for o in lifecycle.handle(late.value, state, T0 + 50)]
    assert (refused["request_id"], refused["outcome"], refused["status"]) == (
        "req-3", "refused", "resolved"
    )
    assert refused["reason"] == f"cannot acknowledge alert {alert_id}: it is already resolved"


def test_a_restore_input_brings_back_an_alert_with_its_figures(lifecycle: LifecycleStage) -> None:
    inputs = LifecycleInputs(KAFKA, REGISTRY)
    before_restart = DictState()
    event = lineage("lab1", "lab", 7) | {"source_topic": "t.raw.hl7_lab"}
    [opened] = lifecycle.handle(inputs.finding(finding("lab1", T0), T0, event).value,
                                before_restart, T0 + 10)
    snapshot = decode(opened)
    alert_id = snapshot["alert_id"]
    state = DictState()  # the changelog is gone
    ack = inputs.action("acknowledge", alert_id, "critical_value.potassium", f"{PERSON}|2823-3",
                        "nurse.li", None, T0 + 20, organisation_id="H001", request_id="r1")
    [refused] = [decode(o) for o in lifecycle.handle(ack.value, state, T0 + 20)]
    assert (refused["outcome"], refused["status"]) == ("refused", "")
    # What ClickHouse holds of it (its last transition, as stored) comes back as a restore.
    restore = inputs.restore(
        AlertTransition(
            transition_id=snapshot["transition_id"], alert_id=alert_id,
            rule_id=snapshot["rule_id"], rule_version=snapshot["rule_version"],
            subject=snapshot["subject"], organisation_id="H001", person_key=PERSON,
            severity="critical", status="open", action="opened", actor="system", note=None,
            time_ms=T0 + 10, first_event_time_ms=T0, last_event_time_ms=T0,
            occurrences=1, escalation_level=0, triggering_event_ids=("lab1",),
            explanation=snapshot["explanation"],
        ),
        epoch_ms(snapshot["detected_time"]),  # when it opened, as alert_current holds it
        {"ingest_time": T0 + 7500, "analyte_code": "2823-3", "value": 6.9, "unit": "mmol/L",
         "source_topic": "t.raw.hl7_lab", "source_partition": 0, "source_offset": 7,
         "mapping_version": "v-test", "details_json": '{"direction": "high"}'},
        T0 + 30,
    )
    assert restore.key == f"critical_value.potassium|{PERSON}|2823-3".encode()  # its partition
    assert lifecycle.handle(restore.value, state, T0 + 30) == []  # adopted, nothing emitted
    assert lifecycle.handle(restore.value, state, T0 + 31) == []  # known: left alone
    again = inputs.action("acknowledge", alert_id, "critical_value.potassium",
                          f"{PERSON}|2823-3", "nurse.li", "called ward", T0 + 40,
                          organisation_id="H001", request_id="r2")
    acked, outcome = [decode(o) for o in lifecycle.handle(again.value, state, T0 + 40)]
    assert (outcome["request_id"], outcome["outcome"]) == ("r2", "applied")
    assert (acked["alert_id"], acked["status"], acked["actor"]) == (
        alert_id, "acknowledged", "nurse.li"
    )
    # The figures and lineage of the opening finding are those of before the restart.
    assert (acked["value"], acked["unit"], acked["source_offset"], acked["detected_time"]) == (
        snapshot["value"], snapshot["unit"], 7, snapshot["detected_time"]
    )


def test_unacknowledged_critical_alert_escalates_on_tick(lifecycle: LifecycleStage) -> None:
    inputs = LifecycleInputs(KAFKA, REGISTRY)
    state = DictState()
    lifecycle.handle(inputs.finding(finding("lab1", T0), T0).value, state, T0)
    assert [decode(o)["action"] for o in lifecycle.tick(state, T0 + 60_000)] == []
    escalated = [decode(o) for o in lifecycle.tick(state, T0 + 16 * 60_000)]
    assert [(e["action"], e["escalation_level"]) for e in escalated] == [("escalated", 1)]


def test_tick_overlay_keeps_tick_writes_out_of_the_table() -> None:
    table = DictState()
    overlay = TickOverlay(table)
    overlay.in_record().put("a", 1)
    overlay.in_tick().put("a", 2)
    overlay.in_tick().put("b", 3)
    assert table.values == {"a": 1}
    assert overlay.in_record().get("a") == 2 and dict(overlay.items()) == {"a": 2, "b": 3}
    overlay.in_tick().delete("a")
    assert overlay.get("a") is None and dict(overlay.items()) == {"b": 3}
    # A record's write reaches the table and replaces the tick's change.
    overlay.in_record().put("a", 4)
    assert table.values == {"a": 4} and overlay.get("a") == 4


def test_a_buffered_record_view_writes_each_key_once_at_flush() -> None:
    writes: list[str] = []

    class CountingState(DictState):
        def put(self, key: str, value: object) -> None:
            writes.append(key)
            super().put(key, value)

    table = CountingState()
    overlay = TickOverlay(table)
    view = overlay.in_record_buffered()
    for sample in range(10):  # ten samples of one device packet
        view.put("device|D1", {"samples": sample})
    view.put("device|D2", {"samples": 1})
    view.delete("device|D2")
    assert view.get("device|D1") == {"samples": 9} and view.get("device|D2") is None
    assert writes == [] and table.values == {}
    view.flush()
    assert writes == ["device|D1"] and table.values == {"device|D1": {"samples": 9}}


def test_a_tick_record_escalates_inside_the_partition_that_owns_the_alert(
    lifecycle: LifecycleStage,
) -> None:
    inputs = LifecycleInputs(KAFKA, REGISTRY)
    state = DictState()
    lifecycle.handle(inputs.finding(finding("lab1", T0), T0).value, state, T0)
    tick = inputs.tick(T0 + 16 * 60_000)
    assert tick.key is None and tick.topic == "t.alerts.lifecycle"
    [escalated] = [decode(o) for o in lifecycle.handle(tick.value, state, T0 + 16 * 60_000)]
    assert (escalated["action"], escalated["escalation_level"]) == ("escalated", 1)
    # The level is in the state the record wrote, so the next tick does not repeat it.
    assert lifecycle.handle(tick.value, state, T0 + 17 * 60_000) == []
