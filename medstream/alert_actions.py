"""Operators act on alerts: list them, acknowledge them, resolve them.

An action is not written to ClickHouse directly: it is sent to the alert lifecycle
(``alerts.lifecycle``, keyed by rule and subject like every finding of that alert), which
applies it in order with the findings and emits the new state. The note is scrubbed of
identifiers before it leaves this process: it is stored and shown to other staff.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from medstream.clickhouse import sql_string
from medstream.runtime import deliver_one
from medstream.settings import KafkaSettings
from schemas import serde
from streams.deidentify import scrub_text
from streams.detect import INPUT_ACKNOWLEDGE, INPUT_RESOLVE, LifecycleInputs

#: The columns `medstream alerts list` shows.
LIST_COLUMNS = (
    "alert_id", "rule_id", "severity", "status", "organisation_id", "subject",
    "first_event_time", "occurrences", "escalation_level", "explanation",
)


class AlertActionError(RuntimeError):
    """The action cannot be taken: unknown alert, already resolved, or not delivered."""


@dataclass(frozen=True, slots=True)
class AlertState:
    """What an action needs to know about an alert: its routing and its current status."""

    alert_id: str
    rule_id: str
    subject: str
    status: str


def list_alerts(
    query: Callable[[str], Any], database: str, status: str | None, limit: int
) -> tuple[list[str], list[list[Any]]]:
    """Current alerts, most urgent and newest first; ``status`` open/acknowledged/resolved."""
    where = f"WHERE status = {sql_string(status)}" if status else ""
    severity_order = "indexOf(['critical', 'high', 'medium', 'low'], severity)"
    result = query(
        f"SELECT {', '.join(LIST_COLUMNS)} FROM {database}.alert_current FINAL {where} "
        f"ORDER BY {severity_order}, first_event_time DESC LIMIT {int(limit)}"
    )
    return list(LIST_COLUMNS), [list(row) for row in result.rows]


def current_state(query: Callable[[str], Any], database: str, alert_id: str) -> AlertState:
    """The alert's current state; raises AlertActionError when there is no such alert."""
    rows = query(
        f"SELECT alert_id, rule_id, subject, status FROM {database}.alert_current FINAL "
        f"WHERE alert_id = {sql_string(alert_id)}"
    ).rows
    if not rows:
        raise AlertActionError(f"no alert {alert_id} (see `medstream alerts list`)")
    return AlertState(*rows[0])


def send_action(
    kafka: KafkaSettings,
    registry: serde.SchemaRegistry,
    alert: AlertState,
    action: str,
    actor: str,
    note: str | None,
    timeout_s: float = 15.0,
) -> None:
    """Send an acknowledge or resolve to the lifecycle and wait for the broker's ack."""
    if action not in (INPUT_ACKNOWLEDGE, INPUT_RESOLVE):
        raise AlertActionError(f"unknown action {action!r}")
    if not actor.strip():
        raise AlertActionError("name who acts (--by): every alert action is attributed")
    if alert.status == "resolved":
        raise AlertActionError(f"alert {alert.alert_id} is already resolved")
    if action == INPUT_ACKNOWLEDGE and alert.status == "acknowledged":
        raise AlertActionError(f"alert {alert.alert_id} is already acknowledged")
    clean_note = scrub_text(note).text if note else None
    output = LifecycleInputs(kafka, registry).action(
        action, alert.alert_id, alert.rule_id, alert.subject, actor.strip(), clean_note,
        int(time.time() * 1000),
    )
    error = deliver_one(kafka, output.topic, output.key, output.value, timeout_s)
    if error is not None:
        raise AlertActionError(f"the action was not delivered to the stream ({error})")
