"""Alert lifecycle: opening, dedup and throttled updates, operator actions, escalation, expiry."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from streams.alert_lifecycle import (
    DEFAULT_ALERT_LIFECYCLE_PATH,
    AlertLifecycle,
    AlertLifecycleRulesError,
    AlertTransition,
    LifecycleError,
    alert_lifecycle_rules_from_dict,
    lifecycle_alert_id,
    load_alert_lifecycle_rules,
)
from streams.findings import Cleared, DictState, Finding

T0 = 1_793_700_000_000  # wall clock of the first finding
MINUTE = 60_000
HOUR = 60 * MINUTE
PERSON = "p" * 32


def finding(
    *event_ids: str,
    rule_id: str = "critical_value.potassium",
    severity: str = "critical",
    subject: str = f"{PERSON}|2823-3",
    event_time_ms: int = T0 - 5 * MINUTE,
    explanation: str = "Potassium 6.9 mmol/L above critical high 6.2",
) -> Finding:
    return Finding(
        rule_id=rule_id,
        rule_version="2026.11-1",
        severity=severity,
        organisation_id="H001",
        subject=subject,
        event_time_ms=event_time_ms,
        triggering_event_ids=event_ids if event_ids or rule_id.startswith("feed.") else ("e1",),
        explanation=explanation,
        person_key=PERSON,
    )


@pytest.fixture()
def lifecycle() -> AlertLifecycle:
    return AlertLifecycle(load_alert_lifecycle_rules())


def opened(lifecycle: AlertLifecycle, state: DictState, item: Finding | None = None) -> str:
    transitions = lifecycle.on_finding(item or finding("e1"), state, T0)
    assert [t.action for t in transitions] == ["opened"]
    return transitions[0].alert_id


def stored(state: DictState, alert_id: str) -> dict[str, Any]:
    alert: dict[str, Any] = state.values[f"alert|id|{alert_id}"]
    return alert


# --- rules file -----------------------------------------------------------------------------


def test_shipped_rules_load() -> None:
    rules = load_alert_lifecycle_rules()
    assert rules.version == "2026.11-1"
    assert rules.update_every_ms == 15 * MINUTE
    assert rules.retain_resolved_ms == 24 * HOUR
    critical = rules.escalation["critical"]
    assert critical is not None
    assert (critical.after_ms, critical.repeat_ms, critical.max_level) == (
        15 * MINUTE,
        15 * MINUTE,
        3,
    )
    assert rules.escalation["low"] is None
    assert rules.may_auto_resolve("device.silent") is True
    assert rules.may_auto_resolve("feed.stopped") is True
    assert rules.may_auto_resolve("critical_value.potassium") is False
    assert rules.may_auto_resolve("somethingelse.rule") is False


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(
        DEFAULT_ALERT_LIFECYCLE_PATH.read_text(encoding="utf-8")
    )
    return loaded


def test_invalid_rules_name_the_field(document: dict[str, Any], tmp_path: Path) -> None:
    missing = copy.deepcopy(document)
    del missing["escalation"]["low"]
    with pytest.raises(AlertLifecycleRulesError, match="escalation: Value error, severity 'low'"):
        alert_lifecycle_rules_from_dict(missing)
    unknown = copy.deepcopy(document)
    unknown["escalation"]["urgent"] = None
    with pytest.raises(AlertLifecycleRulesError, match="unknown severity 'urgent'"):
        alert_lifecycle_rules_from_dict(unknown)
    negative = copy.deepcopy(document)
    negative["update_every_minutes"] = -1
    with pytest.raises(AlertLifecycleRulesError, match="update_every_minutes: Input should be"):
        alert_lifecycle_rules_from_dict(negative)
    bad_level = copy.deepcopy(document)
    bad_level["escalation"]["high"]["max_level"] = 0
    with pytest.raises(AlertLifecycleRulesError, match="escalation.high.max_level"):
        alert_lifecycle_rules_from_dict(bad_level)
    with pytest.raises(AlertLifecycleRulesError, match="cannot read"):
        load_alert_lifecycle_rules(tmp_path / "absent.yaml")


def test_longest_prefix_decides_auto_resolve(document: dict[str, Any]) -> None:
    changed = copy.deepcopy(document)
    changed["auto_resolve"]["device.battery"] = False
    changed["default_auto_resolve"] = True
    rules = alert_lifecycle_rules_from_dict(changed)
    assert rules.may_auto_resolve("device.battery_low") is False
    assert rules.may_auto_resolve("device.silent") is True
    assert rules.may_auto_resolve("other.rule") is True


# --- opening and dedup ----------------------------------------------------------------------


def test_a_finding_opens_an_alert(lifecycle: AlertLifecycle) -> None:
    state = DictState()
    transitions = lifecycle.on_finding(finding("e1", "e0"), state, T0)
    assert len(transitions) == 1
    opening = transitions[0]
    assert opening.alert_id == lifecycle_alert_id(
        "critical_value.potassium", f"{PERSON}|2823-3", "e1"
    )
    assert (opening.action, opening.status, opening.actor) == ("opened", "open", "system")
    assert (opening.occurrences, opening.escalation_level) == (1, 0)
    assert (opening.time_ms, opening.first_event_time_ms) == (T0, T0 - 5 * MINUTE)
    assert opening.triggering_event_ids == ("e1", "e0")
    assert (opening.severity, opening.organisation_id, opening.person_key) == (
        "critical",
        "H001",
        PERSON,
    )
    assert opening.explanation == "Potassium 6.9 mmol/L above critical high 6.2"
    assert state.values[f"alert|subject|critical_value.potassium|{PERSON}|2823-3"] == (
        opening.alert_id
    )


def test_ids_are_deterministic(lifecycle: AlertLifecycle) -> None:
    def run() -> list[AlertTransition]:
        state = DictState()
        out = lifecycle.on_finding(finding("e1"), state, T0)
        out += lifecycle.on_finding(finding("e2"), state, T0 + 20 * MINUTE)
        out += lifecycle.acknowledge(out[0].alert_id, "nurse-7", None, state, T0 + 21 * MINUTE)
        out += lifecycle.resolve(out[0].alert_id, "nurse-7", "called", state, T0 + 22 * MINUTE)
        return out

    first, second = run(), run()
    assert [t.transition_id for t in first] == [t.transition_id for t in second]
    assert len({t.transition_id for t in first}) == 4
    assert {t.alert_id for t in first} == {first[0].alert_id}


def test_repeats_update_the_open_alert_throttled(lifecycle: AlertLifecycle) -> None:
    state = DictState()
    alert_id = opened(lifecycle, state)
    # A second finding 5 minutes later is counted, but no row is emitted yet.
    later = finding("e2", event_time_ms=T0 + 4 * MINUTE, explanation="Potassium 7.1")
    assert lifecycle.on_finding(later, state, T0 + 5 * MINUTE) == []
    alert = stored(state, alert_id)
    assert (alert["occurrences"], alert["last_event_time_ms"]) == (2, T0 + 4 * MINUTE)
    assert alert["triggering_event_ids"] == ["e2"]
    # The same finding processed again is not counted twice.
    assert lifecycle.on_finding(later, state, T0 + 6 * MINUTE) == []
    assert stored(state, alert_id)["occurrences"] == 2
    # Before the 15 minutes have passed, tick holds the update back...
    assert [t.action for t in lifecycle.tick(state, T0 + 14 * MINUTE)] == []
    # ...and a third finding after them emits one update with the whole count.
    third = finding("e3", event_time_ms=T0 + 15 * MINUTE)
    transitions = lifecycle.on_finding(third, state, T0 + 15 * MINUTE)
    assert [(t.action, t.occurrences, t.status) for t in transitions] == [("updated", 3, "open")]
    assert transitions[0].alert_id == alert_id
    assert transitions[0].first_event_time_ms == T0 - 5 * MINUTE
    assert transitions[0].last_event_time_ms == T0 + 15 * MINUTE


def test_the_finding_that_opened_an_alert_reprocessed_sends_its_opened_again(
    lifecycle: AlertLifecycle,
) -> None:
    # Review 5 M3: a kill after the alert's state reached the changelog but before its
    # "opened" reached the broker; recovery restores the open alert, the uncommitted
    # finding comes again, and was taken for a repeat: the critical alert never opened.
    state = DictState()
    first = finding("e1")
    [opened_row] = lifecycle.on_finding(first, state, T0)
    later = finding("e2", event_time_ms=T0 + 4 * MINUTE)
    assert lifecycle.on_finding(later, state, T0 + 5 * MINUTE) == []
    [again] = lifecycle.on_finding(first, state, T0 + 6 * MINUTE)
    # The same transition as it was sent (not the alert's state since: e2, 2 occurrences),
    # so the row it may replace downstream stays the same; marked as sent again.
    assert again == dataclasses.replace(opened_row, resent=True)
    assert again.triggering_event_ids == ("e1",) and again.occurrences == 1
    assert stored(state, opened_row.alert_id)["occurrences"] == 2  # not counted again
    # Another finding reprocessed is no opening: nothing.
    assert lifecycle.on_finding(later, state, T0 + 7 * MINUTE) == []
    # Once acknowledged, the opening is history: not sent again.
    lifecycle.acknowledge(opened_row.alert_id, "nurse-7", None, state, T0 + 8 * MINUTE)
    assert lifecycle.on_finding(first, state, T0 + 9 * MINUTE) == []


def test_tick_flushes_a_pending_update(lifecycle: AlertLifecycle) -> None:
    state = DictState()
    alert_id = opened(lifecycle, state, finding("e1", severity="low"))
    lifecycle.on_finding(finding("e2", severity="low"), state, T0 + MINUTE)
    lifecycle.on_finding(finding("e3", severity="low"), state, T0 + 2 * MINUTE)
    transitions = lifecycle.tick(state, T0 + 15 * MINUTE)
    assert [(t.action, t.occurrences, t.alert_id) for t in transitions] == [
        ("updated", 3, alert_id)
    ]
    assert lifecycle.tick(state, T0 + 60 * MINUTE) == []  # nothing new: nothing emitted


def test_a_repeat_raises_the_severity(lifecycle: AlertLifecycle) -> None:
    state = DictState()
    alert_id = opened(lifecycle, state, finding("e1", severity="medium"))
    transitions = lifecycle.on_finding(finding("e2", severity="high"), state, T0 + 16 * MINUTE)
    assert [(t.action, t.severity) for t in transitions] == [("updated", "high")]
    lifecycle.on_finding(finding("e3", severity="low"), state, T0 + 40 * MINUTE)
    assert stored(state, alert_id)["severity"] == "high"


# --- operator actions -----------------------------------------------------------------------


def test_acknowledge_then_resolve(lifecycle: AlertLifecycle) -> None:
    state = DictState()
    alert_id = opened(lifecycle, state)
    acks = lifecycle.acknowledge(alert_id, "nurse-7", "on my way", state, T0 + MINUTE)
    assert [(t.action, t.status, t.actor, t.note) for t in acks] == [
        ("acknowledged", "acknowledged", "nurse-7", "on my way")
    ]
    # A second acknowledgement is refused, naming who took it.
    with pytest.raises(LifecycleError, match="already acknowledged by nurse-7"):
        lifecycle.acknowledge(alert_id, "nurse-8", None, state, T0 + 2 * MINUTE)
    # Repeats still count while acknowledged.
    lifecycle.on_finding(finding("e2"), state, T0 + 3 * MINUTE)
    assert stored(state, alert_id)["occurrences"] == 2
    done = lifecycle.resolve(alert_id, "nurse-7", "repeated, normal", state, T0 + 4 * MINUTE)
    assert [(t.action, t.status, t.occurrences, t.time_ms) for t in done] == [
        ("resolved", "resolved", 2, T0 + 4 * MINUTE)
    ]
    assert f"alert|subject|critical_value.potassium|{PERSON}|2823-3" not in state.values


def test_resolve_straight_from_open(lifecycle: AlertLifecycle) -> None:
    state = DictState()
    alert_id = opened(lifecycle, state)
    done = lifecycle.resolve(alert_id, "doctor-2", None, state, T0 + MINUTE)
    assert [(t.action, t.status, t.actor) for t in done] == [("resolved", "resolved", "doctor-2")]


def test_invalid_transitions_raise(lifecycle: AlertLifecycle) -> None:
    state = DictState()
    with pytest.raises(LifecycleError, match="cannot acknowledge alert nope: unknown alert"):
        lifecycle.acknowledge("nope", "nurse-7", None, state, T0)
    with pytest.raises(LifecycleError, match="cannot resolve alert nope: unknown alert"):
        lifecycle.resolve("nope", "nurse-7", None, state, T0)
    alert_id = opened(lifecycle, state)
    with pytest.raises(LifecycleError, match="the actor must be named"):
        lifecycle.acknowledge(alert_id, "  ", None, state, T0)
    lifecycle.resolve(alert_id, "nurse-7", None, state, T0 + MINUTE)
    with pytest.raises(LifecycleError, match=f"cannot resolve alert {alert_id}: it is already"):
        lifecycle.resolve(alert_id, "nurse-7", None, state, T0 + 2 * MINUTE)
    with pytest.raises(LifecycleError, match="cannot acknowledge .* already resolved"):
        lifecycle.acknowledge(alert_id, "nurse-7", None, state, T0 + 2 * MINUTE)
    assert stored(state, alert_id)["status"] == "resolved"


# --- auto-resolve ---------------------------------------------------------------------------


def test_cleared_resolves_only_where_allowed(lifecycle: AlertLifecycle) -> None:
    state = DictState()
    device = finding(rule_id="device.silent", severity="high", subject="monitor-990101-1")
    device_id = opened(lifecycle, state, device)
    cleared = Cleared("device.silent", "H001", "monitor-990101-1", T0 + MINUTE, "data again")
    transitions = lifecycle.on_cleared(cleared, state, T0 + 2 * MINUTE)
    assert [(t.alert_id, t.action, t.status, t.actor, t.note) for t in transitions] == [
        (device_id, "resolved", "resolved", "system", "data again")
    ]
    assert lifecycle.on_cleared(cleared, state, T0 + 3 * MINUTE) == []  # nothing open now
    critical_id = opened(lifecycle, state)
    normal = Cleared("critical_value.potassium", "H001", f"{PERSON}|2823-3", T0, "normal again")
    assert lifecycle.on_cleared(normal, state, T0 + MINUTE) == []
    assert stored(state, critical_id)["status"] == "open"


def test_silence_findings_without_events_get_stable_ids(lifecycle: AlertLifecycle) -> None:
    state = DictState()
    silent = finding(rule_id="feed.stopped", severity="high", subject="H001|his-db")
    assert silent.triggering_event_ids == ()
    alert_id = opened(lifecycle, state, silent)
    assert alert_id == lifecycle_alert_id("feed.stopped", "H001|his-db", f"time:{T0 - 5 * MINUTE}")
    # The same silence again (reprocessed): its "opened" sent again with the same id.
    [again] = lifecycle.on_finding(silent, state, T0 + MINUTE)
    assert (again.action, again.alert_id, again.time_ms, again.resent) == (
        "opened", alert_id, T0, True)
    assert stored(state, alert_id)["occurrences"] == 1


# --- reopening and retention ----------------------------------------------------------------


def test_a_finding_after_resolution_opens_a_new_alert(lifecycle: AlertLifecycle) -> None:
    state = DictState()
    first_id = opened(lifecycle, state)
    lifecycle.resolve(first_id, "nurse-7", None, state, T0 + MINUTE)
    # The finding that opened the resolved alert, reprocessed, does not reopen it.
    assert lifecycle.on_finding(finding("e1"), state, T0 + 2 * MINUTE) == []
    transitions = lifecycle.on_finding(finding("e9"), state, T0 + 3 * MINUTE)
    assert [(t.action, t.occurrences) for t in transitions] == [("opened", 1)]
    assert transitions[0].alert_id != first_id
    assert transitions[0].alert_id == lifecycle_alert_id(
        "critical_value.potassium", f"{PERSON}|2823-3", "e9"
    )
    # A new finding that starts with the same event as the resolved alert gets its own id.
    lifecycle.resolve(transitions[0].alert_id, "nurse-7", None, state, T0 + 4 * MINUTE)
    again = lifecycle.on_finding(finding("e1", "e10"), state, T0 + 5 * MINUTE)
    assert [t.action for t in again] == ["opened"]
    assert again[0].alert_id == lifecycle_alert_id(
        "critical_value.potassium", f"{PERSON}|2823-3", "e1", 1
    )


def test_resolved_alerts_are_forgotten_after_retention(lifecycle: AlertLifecycle) -> None:
    state = DictState()
    alert_id = opened(lifecycle, state)
    lifecycle.resolve(alert_id, "nurse-7", None, state, T0 + MINUTE)
    lifecycle.tick(state, T0 + MINUTE + 24 * HOUR - 1)
    assert f"alert|id|{alert_id}" in state.values
    lifecycle.tick(state, T0 + MINUTE + 24 * HOUR)
    assert state.values == {}
    with pytest.raises(LifecycleError, match="unknown alert"):
        lifecycle.resolve(alert_id, "nurse-7", None, state, T0 + 25 * HOUR)


# --- escalation -----------------------------------------------------------------------------


def _escalations(
    lifecycle: AlertLifecycle, severity: str, minutes: list[int]
) -> list[tuple[int, int]]:
    """(minute, level) of each escalation when tick runs at the given minutes after opening."""
    state = DictState()
    opened(lifecycle, state, finding("e1", severity=severity))
    out = []
    for minute in minutes:
        for transition in lifecycle.tick(state, T0 + minute * MINUTE):
            assert (transition.action, transition.status) == ("escalated", "open")
            out.append((minute, transition.escalation_level))
    return out


@pytest.mark.parametrize(
    ("severity", "expected"),
    [
        # critical: 15 min, then every 15 min up to level 3.
        ("critical", [(15, 1), (30, 2), (45, 3)]),
        # high: 30 min, then every 60 min up to level 2.
        ("high", [(30, 1), (90, 2)]),
        # medium: 120 min, no repeat.
        ("medium", [(120, 1)]),
        # low: never.
        ("low", []),
    ],
)
def test_escalation_timing_per_severity(
    lifecycle: AlertLifecycle, severity: str, expected: list[tuple[int, int]]
) -> None:
    minutes = [1, 14, 15, 29, 30, 44, 45, 60, 89, 90, 119, 120, 600, 6000]
    assert _escalations(lifecycle, severity, minutes) == expected


def test_a_late_tick_escalates_once_to_the_due_level(lifecycle: AlertLifecycle) -> None:
    assert _escalations(lifecycle, "critical", [40, 41, 50]) == [(40, 2), (50, 3)]


def test_acknowledged_alerts_do_not_escalate(lifecycle: AlertLifecycle) -> None:
    state = DictState()
    alert_id = opened(lifecycle, state)
    escalated = lifecycle.tick(state, T0 + 16 * MINUTE)
    assert [(t.action, t.escalation_level) for t in escalated] == [("escalated", 1)]
    ack = lifecycle.acknowledge(alert_id, "nurse-7", None, state, T0 + 17 * MINUTE)
    assert (ack[0].status, ack[0].escalation_level) == ("acknowledged", 1)
    assert lifecycle.tick(state, T0 + 120 * MINUTE) == []


# --- requests, organisations and restore after a restart -------------------------------------


def test_a_reprocessed_request_changes_nothing_and_is_not_refused(
    lifecycle: AlertLifecycle,
) -> None:
    state = DictState()
    alert_id = opened(lifecycle, state)
    act = lifecycle.act
    first = act("acknowledge", alert_id, "nurse-7", None, state, T0 + MINUTE, request_id="r1")
    assert [t.status for t in first] == ["acknowledged"]
    # The same request again (a redelivery): applied already, no second transition.
    assert act("acknowledge", alert_id, "nurse-7", None, state, T0 + 2 * MINUTE,
               request_id="r1") == []
    act("resolve", alert_id, "nurse-7", None, state, T0 + 3 * MINUTE, request_id="r2")
    assert act("resolve", alert_id, "nurse-7", None, state, T0 + 4 * MINUTE,
               request_id="r2") == []
    assert stored(state, alert_id)["requests"] == ["r1", "r2"]
    # A new request on the resolved alert is refused.
    with pytest.raises(LifecycleError, match="already resolved"):
        act("resolve", alert_id, "nurse-7", None, state, T0 + 5 * MINUTE, request_id="r3")
    with pytest.raises(LifecycleError, match="unknown action 'delete'"):
        act("delete", alert_id, "nurse-7", None, state, T0 + 5 * MINUTE)


def test_an_action_naming_another_organisation_is_refused(lifecycle: AlertLifecycle) -> None:
    state = DictState()
    alert_id = opened(lifecycle, state)  # an alert of H001
    before = copy.deepcopy(state.values)
    act = lifecycle.act
    with pytest.raises(LifecycleError, match="names organisation H002, which the alert does not"):
        act("acknowledge", alert_id, "mon.west", None, state, T0, organisation_id="H002")
    with pytest.raises(LifecycleError, match="names organisation H002"):
        act("resolve", alert_id, "mon.west", None, state, T0, organisation_id="H002")
    assert state.values == before
    done = act("acknowledge", alert_id, "mon.east", None, state, T0, organisation_id="H001")
    assert [t.status for t in done] == ["acknowledged"]


def last_transition(transitions: list[AlertTransition], **changes: Any) -> AlertTransition:
    """What ClickHouse holds of an alert: its last transition (``changes`` for a lagging one)."""
    return dataclasses.replace(transitions[-1], **changes)


def test_a_restored_alert_is_taken_up_where_it_was(lifecycle: AlertLifecycle) -> None:
    before_restart = DictState()
    snapshot = last_transition(lifecycle.on_finding(finding("e1"), before_restart, T0))
    alert_id = snapshot.alert_id
    # The broker kept nothing: an empty state refuses the action ...
    state = DictState()
    with pytest.raises(LifecycleError, match="unknown alert"):
        lifecycle.acknowledge(alert_id, "nurse-7", None, state, T0 + MINUTE)
    # ... until the alert is restored from storage.
    assert lifecycle.restore(snapshot, T0, state) is True
    assert lifecycle.restore(snapshot, T0, state) is False  # known now: left alone
    # The finding that opened it, processed again, is not counted; a new one is.
    assert lifecycle.on_finding(finding("e1"), state, T0 + MINUTE) == []
    lifecycle.on_finding(finding("e2", event_time_ms=T0), state, T0 + 2 * MINUTE)
    assert stored(state, alert_id)["occurrences"] == 2
    # It escalates as if no restart had happened: open since T0, critical after 15 min
    # (and the throttled update of the repeat is due).
    due = lifecycle.tick(state, T0 + 16 * MINUTE)
    assert [(t.alert_id, t.action, t.escalation_level) for t in due] == [
        (alert_id, "updated", 0), (alert_id, "escalated", 1)
    ]
    [acked] = lifecycle.acknowledge(alert_id, "nurse-7", "seen", state, T0 + 17 * MINUTE)
    assert (acked.alert_id, acked.status, acked.occurrences, acked.first_event_time_ms) == (
        alert_id, "acknowledged", 2, T0 - 5 * MINUTE
    )
    assert acked.explanation == "Potassium 6.9 mmol/L above critical high 6.2"


def test_restore_never_overrides_what_the_changelog_kept(lifecycle: AlertLifecycle) -> None:
    state = DictState()
    opening = lifecycle.on_finding(finding("e1"), state, T0)
    lifecycle.resolve(opening[0].alert_id, "nurse-7", None, state, T0 + MINUTE)
    kept = copy.deepcopy(state.values)
    # Storage lags behind: it still shows the alert open. The lifecycle knows better.
    assert lifecycle.restore(last_transition(opening), T0, state) is False
    assert state.values == kept
    with pytest.raises(LifecycleError, match="not one of open, acknowledged"):
        lifecycle.restore(last_transition(opening, status="resolved"), T0, DictState())


def test_a_restored_acknowledged_alert_names_who_took_it(lifecycle: AlertLifecycle) -> None:
    before_restart = DictState()
    alert_id = opened(lifecycle, before_restart)
    acked = lifecycle.acknowledge(alert_id, "nurse-7", None, before_restart, T0 + MINUTE)
    state = DictState()
    # A newer alert of the same subject already counts the findings: it keeps doing so.
    state.put(f"alert|subject|critical_value.potassium|{PERSON}|2823-3", "newer")
    lifecycle.restore(last_transition(acked), T0, state)
    assert state.values[f"alert|subject|critical_value.potassium|{PERSON}|2823-3"] == "newer"
    with pytest.raises(LifecycleError, match="already acknowledged by nurse-7"):
        lifecycle.acknowledge(alert_id, "nurse-8", None, state, T0 + 2 * MINUTE)
    [done] = lifecycle.resolve(alert_id, "nurse-8", None, state, T0 + 3 * MINUTE)
    assert (done.alert_id, done.status) == (alert_id, "resolved")
    assert lifecycle.tick(state, T0 + HOUR) == []  # acknowledged, then resolved: no escalation


def test_an_opening_stored_by_another_version_is_read_or_skipped_never_a_crash(
    lifecycle: AlertLifecycle,
) -> None:
    # The opening is kept in the alert's state (a JSON changelog): a field added or removed
    # since must not crash the worker on the record it reprocesses.
    state = DictState()
    first = finding("e1")
    [opened_row] = lifecycle.on_finding(first, state, T0)
    alert = stored(state, opened_row.alert_id)
    alert["opening"]["field_of_a_later_version"] = 1
    state.put(f"alert|id|{opened_row.alert_id}", alert)
    [again] = lifecycle.on_finding(first, state, T0 + MINUTE)
    assert again == dataclasses.replace(opened_row, resent=True)
    del alert["opening"]["explanation"]
    state.put(f"alert|id|{opened_row.alert_id}", alert)
    assert lifecycle.on_finding(first, state, T0 + 2 * MINUTE) == []
