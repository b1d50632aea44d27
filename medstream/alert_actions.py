"""Operators act on alerts: list them, acknowledge them, resolve them, and get the outcome.

An action is not written to ClickHouse directly: it is sent to the alert lifecycle
(``alerts.lifecycle``, keyed by rule and subject like every finding of that alert), which
applies it in order with the findings, emits the new state, and answers on
``alerts.outcomes`` with what it did: applied, or refused with the reason. Whoever asked
waits (bounded) for that answer, so every action ends applied, refused or timed out, and
that is what the console, the CLI and the audit log report. The note is scrubbed of
identifiers before it leaves this process: it is stored and shown to other staff.

When the broker lost the lifecycle's changelog (the memory-only tansu broker restarted),
:func:`restore_lifecycle` offers every unresolved alert ClickHouse holds to the lifecycle,
which adopts those it does not know (`medstream up` does this at every start).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, Final

from confluent_kafka import Consumer, KafkaException, TopicPartition

from medstream.clickhouse import sql_string
from medstream.runtime import deliver_all, deliver_one
from medstream.settings import ACTION_OUTCOMES_TOPIC, KafkaSettings
from schemas import serde
from streams.alert_lifecycle import AlertTransition
from streams.deidentify import scrub_text
from streams.detect import (
    APPLIED,
    INPUT_ACKNOWLEDGE,
    OPERATOR_ACTIONS,
    REFUSED,
    LifecycleInputs,
)

#: The columns `medstream alerts list` shows.
LIST_COLUMNS = (
    "alert_id", "rule_id", "severity", "status", "organisation_id", "subject",
    "first_event_time", "occurrences", "escalation_level", "explanation",
)
#: Outcomes of an action besides the lifecycle's applied and refused.
TIMED_OUT: Final = "timed_out"
NOT_DELIVERED: Final = "not_delivered"
#: Seconds to wait for the lifecycle's answer to an action (after the broker took it).
DEFAULT_ANSWER_S: Final = 10.0
#: Seconds the broker has to take an action (a broker still starting takes a few).
DELIVERY_S: Final = 15.0


class AlertActionError(RuntimeError):
    """The action cannot be taken: unknown alert, already resolved, or not delivered."""


@dataclass(frozen=True, slots=True)
class AlertState:
    """What an action needs to know about an alert: its routing, owner and current status."""

    alert_id: str
    rule_id: str
    subject: str
    status: str
    organisation_id: str = ""


@dataclass(frozen=True, slots=True)
class ActionOutcome:
    """What became of one operator action: applied, refused, timed_out or not_delivered."""

    request_id: str
    action: str
    alert_id: str
    outcome: str
    reason: str = ""
    status: str = ""

    @property
    def applied(self) -> bool:
        """True when the lifecycle applied the action."""
        return self.outcome == APPLIED

    @property
    def audit_outcome(self) -> str:
        """The audit log's word for it: ok, refused, unconfirmed (sent, no answer in time:
        it stays queued and may still be applied) or failed (not sent)."""
        return {APPLIED: "ok", REFUSED: "refused", TIMED_OUT: "unconfirmed"}.get(
            self.outcome, "failed"
        )

    @property
    def message(self) -> str:
        """One line for people, saying what happened and, if not applied, why."""
        if self.outcome == APPLIED:
            return f"alert {self.alert_id} is {self.status} ({self.action} applied)"
        if self.outcome == REFUSED:
            return f"{self.action} refused: {self.reason}"
        return f"{self.action} of alert {self.alert_id} not confirmed: {self.reason}"


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
        f"SELECT alert_id, rule_id, subject, status, organisation_id "
        f"FROM {database}.alert_current FINAL WHERE alert_id = {sql_string(alert_id)}"
    ).rows
    if not rows:
        raise AlertActionError(f"no alert {alert_id} (see `medstream alerts list`)")
    return AlertState(*rows[0])


def check_action(alert: AlertState, action: str, actor: str) -> None:
    """Refuse (AlertActionError) what the stored state already shows cannot be applied."""
    if action not in OPERATOR_ACTIONS:
        raise AlertActionError(f"unknown action {action!r}: acknowledge or resolve")
    if not actor.strip():
        raise AlertActionError("name who acts (--by): every alert action is attributed")
    if alert.status == "resolved":
        raise AlertActionError(f"alert {alert.alert_id} is already resolved")
    if action == INPUT_ACKNOWLEDGE and alert.status == "acknowledged":
        raise AlertActionError(f"alert {alert.alert_id} is already acknowledged")


def request_action(
    kafka: KafkaSettings,
    registry: serde.SchemaRegistry,
    alert: AlertState,
    action: str,
    actor: str,
    note: str | None,
    answer_s: float = DEFAULT_ANSWER_S,
) -> ActionOutcome:
    """Send an acknowledge or resolve to the lifecycle and wait for its answer.

    Raises AlertActionError when the stored state already refuses it (nothing is sent).
    Otherwise the outcome is the lifecycle's (applied or refused with its reason),
    ``not_delivered`` when the broker did not take the action, or ``timed_out`` when no
    answer came within ``answer_s`` (no stream worker running: the action stays queued and
    is applied or refused when one starts).
    """
    check_action(alert, action, actor)
    request_id = str(uuid.uuid4())
    clean_note = scrub_text(note).text if note else None
    output = LifecycleInputs(kafka, registry).action(
        action, alert.alert_id, alert.rule_id, alert.subject, actor.strip(), clean_note,
        int(time.time() * 1000), organisation_id=alert.organisation_id, request_id=request_id,
    )

    def unanswered(outcome: str, reason: str) -> ActionOutcome:
        return ActionOutcome(request_id, action, alert.alert_id, outcome, reason, alert.status)

    with _OutcomeReader(kafka, registry) as answers:
        error = deliver_one(kafka, output.topic, output.key, output.value, DELIVERY_S)
        if error is not None:
            return unanswered(NOT_DELIVERED, f"the action did not reach the broker ({error})")
        answer = answers.wait_for(request_id, answer_s)
    if answer is None:
        return unanswered(
            TIMED_OUT,
            f"no answer from the stream workers within {answer_s:.0f} s; the action is "
            "queued and is applied or refused when a worker runs (`medstream alerts list` "
            "shows the status)",
        )
    return ActionOutcome(
        request_id, action, alert.alert_id, answer["outcome"], answer["reason"],
        answer["status"],
    )


class _OutcomeReader:
    """Reads ``alerts.outcomes`` from its end as of opening: an answer sent after the
    request cannot be missed, however fast the lifecycle is."""

    def __init__(self, kafka: KafkaSettings, registry: serde.SchemaRegistry) -> None:
        self._topic = kafka.topic(ACTION_OUTCOMES_TOPIC)
        self._decode = serde.AvroDeserializer(registry, serde.ALERT_ACTION_OUTCOME)
        self._consumer = Consumer(
            kafka.consumer_config(f"medstream-action-{uuid.uuid4()}")
        )

    def __enter__(self) -> _OutcomeReader:
        try:
            metadata = self._consumer.list_topics(self._topic, timeout=10)
            partitions = [
                TopicPartition(self._topic, p) for p in metadata.topics[self._topic].partitions
            ]
            if not partitions:
                raise AlertActionError(
                    f"topic {self._topic} does not exist: run `medstream topics`"
                )
            for tp in partitions:
                tp.offset = self._consumer.get_watermark_offsets(tp, timeout=10)[1]
            self._consumer.assign(partitions)
        except KafkaException as exc:
            self._consumer.close()
            raise AlertActionError(f"cannot read {self._topic}: {exc}") from exc
        return self

    def __exit__(self, *_: object) -> None:
        self._consumer.close()

    def wait_for(self, request_id: str, timeout_s: float) -> dict[str, Any] | None:
        """The outcome record answering ``request_id``, or None after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            message = self._consumer.poll(min(0.2, left))
            if message is None or message.error():
                continue
            if message.key() != request_id.encode():
                continue
            try:
                record: dict[str, Any] = self._decode(message.value())
            except serde.SerializationError:
                continue
            if record["request_id"] == request_id:
                return record
        return None


# --- recovery -------------------------------------------------------------------------------

#: The restore query: the last transition of each alert (AlertTransition's fields by name),
#: when it opened, and the opening finding's figures and lineage (times in epoch ms).
_RESTORE_COLUMNS: Final = (
    "transition_id, alert_id, rule_id, rule_version, subject, organisation_id, person_key, "
    "severity, status, action, actor, note, toUnixTimestamp64Milli(updated_time) AS time_ms, "
    "toUnixTimestamp64Milli(first_event_time) AS first_event_time_ms, "
    "toUnixTimestamp64Milli(last_event_time) AS last_event_time_ms, occurrences, "
    "escalation_level, triggering_event_ids, explanation, "
    "toUnixTimestamp64Milli(detected_time) AS opened_ms, "
    "toUnixTimestamp64Milli(ingest_time) AS ingest_time, analyte_code, value, unit, "
    "source_topic, source_partition, source_offset, mapping_version, details_json"
)
#: The transition's fields stored in alert_current (``resent`` is a flag of the stream
#: stage's own outputs, never stored).
_TRANSITION_FIELDS: Final = tuple(
    f.name for f in fields(AlertTransition) if f.name != "resent"
)
#: Integer columns (64-bit integers may come as JSON strings from a gateway).
_INTEGERS: Final = (
    "time_ms", "first_event_time_ms", "last_event_time_ms", "occurrences", "escalation_level",
    "opened_ms", "ingest_time", "source_partition", "source_offset",
)


def stored_alert(row: dict[str, Any]) -> tuple[AlertTransition, int, dict[str, Any]]:
    """An unresolved alert of ``alert_current`` (a row of the restore query): its last
    transition, when it opened, and the opening finding's figures and lineage."""
    row = dict(row, **{name: int(row[name]) for name in _INTEGERS})
    last = AlertTransition(**{name: row[name] for name in _TRANSITION_FIELDS})
    last = replace(last, triggering_event_ids=tuple(last.triggering_event_ids))
    lineage = {
        name: value for name, value in row.items()
        if name not in _TRANSITION_FIELDS and name != "opened_ms"
    }
    return last, row["opened_ms"], lineage


def restore_lifecycle(
    query: Callable[[str], Any],
    database: str,
    kafka: KafkaSettings,
    registry: serde.SchemaRegistry,
    timeout_s: float = 30.0,
) -> int:
    """Offer every unresolved alert ClickHouse holds to the lifecycle; returns how many.

    The lifecycle adopts an alert only when its own state lacks it (its changelog is newer
    than storage), so this is safe on every start. Raises AlertActionError when a restore
    input was not delivered.
    """
    result = query(
        f"SELECT {_RESTORE_COLUMNS} FROM {database}.alert_current FINAL "
        "WHERE status IN ('open', 'acknowledged') ORDER BY updated_time"
    )
    inputs = LifecycleInputs(kafka, registry)
    now_ms = int(time.time() * 1000)
    outputs = [
        inputs.restore(*stored_alert(dict(zip(result.columns, row, strict=True))), now_ms)
        for row in result.rows
    ]
    error = deliver_all(kafka, [(o.topic, o.key, o.value) for o in outputs], timeout_s)
    if error is not None:
        raise AlertActionError(f"restoring the alert lifecycle: {error}")
    return len(result.rows)

