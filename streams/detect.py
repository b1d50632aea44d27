"""The detect stage without Faust: rule families over normalised events, and the alert lifecycle.

Two pure-per-record handlers, each called by a thin Faust agent:

- :class:`DetectStage` reads one normalised event (norm.observation, norm.diagnosis,
  norm.claim_line, norm.encounter), runs the rule families that watch it (NEWS2, claims)
  and turns their findings into lifecycle inputs on ``alerts.lifecycle``, keyed by
  ``rule_id|subject`` so that every finding about one alert meets in one partition.
- :class:`LifecycleStage` reads one lifecycle input (a finding, a cleared condition, an
  operator's acknowledge or resolve, a tick, or a restore of an alert from storage) and
  emits the resulting alert transitions to ``alerts`` as full Alert snapshots; what it did
  with an operator action (applied, or refused with the reason) goes to ``alerts.outcomes``
  for whoever asked.

Rules files are reloaded when they change (:class:`streams.reloading.ReloadingFile`);
each finding carries the version that fired.
"""

from __future__ import annotations

import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from medstream.metrics import (
    ALERT_TRANSITIONS,
    ALERTS,
    DEAD_LETTERS,
    FINDINGS,
    IDENTITY_REFUSED,
    PERSON_LINKS,
)
from medstream.settings import (
    ACTION_OUTCOMES_TOPIC,
    ALERTS_TOPIC,
    DLQ_TOPIC,
    FACT_TOPICS,
    LIFECYCLE_TOPIC,
    SYNDROMIC_TOPIC,
    KafkaSettings,
)
from schemas import serde
from streams.alert_lifecycle import (
    ACKNOWLEDGE,
    DEFAULT_ALERT_LIFECYCLE_PATH,
    RESOLVE,
    AlertLifecycle,
    AlertTransition,
    LifecycleError,
    alert_state,
    load_alert_lifecycle_rules,
)
from streams.claim_rules import ClaimDetector, load_claim_rules
from streams.feed_rules import DEFAULT_FEED_RULES_PATH, FeedDetector, load_feed_rules
from streams.findings import Cleared, Finding, KeyValueState, StagedState
from streams.internal_errors import NOT_THE_RECORDS_FAULT, InternalErrors
from streams.model import RawContext, RecordRejected, epoch_ms
from streams.mpi import (
    DEFAULT_MPI_RULES_PATH,
    IdentityObservationError,
    LinkEvent,
    PatientIndex,
    load_mpi_rules,
)
from streams.news2 import News2Detector, load_news2_rules
from streams.normalise import dead_letter_record
from streams.reloading import ReloadingFile
from streams.rules_file import rule_file
from streams.syndromic import (
    DEFAULT_SYNDROMIC_RULES_PATH,
    SyndromicDetector,
    load_syndromic_rules,
)

log = logging.getLogger("medstream.streams.detect")
#: The stage name of the patient index's dead letters.
MPI_STAGE: Final = "mpi"

INPUT_FINDING: Final = "finding"
INPUT_CLEARED: Final = "cleared"
INPUT_ACKNOWLEDGE: Final = ACKNOWLEDGE
INPUT_RESOLVE: Final = RESOLVE
INPUT_TICK: Final = "tick"
INPUT_RESTORE: Final = "restore"
OPERATOR_ACTIONS: Final = (INPUT_ACKNOWLEDGE, INPUT_RESOLVE)
#: Outcomes of an operator action, as the lifecycle reports them.
APPLIED: Final = "applied"
REFUSED: Final = "refused"


@dataclass(frozen=True, slots=True)
class Output:
    """One record to publish: topic, key and Confluent-framed Avro value."""

    topic: str
    key: bytes | None
    value: bytes


def lifecycle_key(rule_id: str, subject: str) -> bytes:
    """The Kafka key of every lifecycle input about one (rule, subject): one partition owns it."""
    return f"{rule_id}|{subject}".encode()


def _digest(*parts: object) -> str:
    text = "\x1f".join(str(part) for part in parts)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class TickOverlay:
    """Rule state for timer ticks: reads see the table, writes stay in this process.

    A Faust table can only be changed while processing a record (its changelog partition
    is the record's). Ticks run outside any record, so what they change (a silence flag,
    an escalation level) is kept here until the next record of that key writes the table
    for real. Lost on restart: a tick may then fire once more, which the alert lifecycle
    folds into the alert still open.
    """

    _DELETED: Final = object()

    def __init__(self, table: KeyValueState) -> None:
        self._table = table
        self._changes: dict[str, Any] = {}

    def in_record(self) -> KeyValueState:
        """The state to use while processing a record: writes go to the table."""
        return _RecordView(self)

    def in_tick(self) -> KeyValueState:
        """The state to use in a timer tick: writes stay in the overlay."""
        return _TickView(self)

    def in_record_buffered(self) -> BufferedRecordView:
        """A record's state whose writes reach the table once per key at :meth:`flush`.

        A device packet updates its device's state once per sample; buffering turns those
        into one table write (one changelog record) per packet.
        """
        return BufferedRecordView(self)

    def get(self, key: str) -> Any | None:
        if key in self._changes:
            value = self._changes[key]
            return None if value is self._DELETED else value
        return self._table.get(key)

    def items(self) -> Iterator[tuple[str, Any]]:
        seen: set[str] = set()
        for key, value in list(self._changes.items()):
            seen.add(key)
            if value is not self._DELETED:
                yield key, value
        for key, value in self._table.items():
            if key not in seen:
                yield key, value


class _RecordView:
    def __init__(self, overlay: TickOverlay) -> None:
        self._overlay = overlay

    def get(self, key: str) -> Any | None:
        return self._overlay.get(key)

    def put(self, key: str, value: Any) -> None:
        self._overlay._changes.pop(key, None)
        self._overlay._table.put(key, value)

    def delete(self, key: str) -> None:
        self._overlay._changes.pop(key, None)
        self._overlay._table.delete(key)

    def items(self) -> Iterator[tuple[str, Any]]:
        return self._overlay.items()


class BufferedRecordView(StagedState):
    """Writes of one record, kept until :meth:`flush` (still inside that record's processing)."""

    def __init__(self, overlay: TickOverlay) -> None:
        super().__init__(_RecordView(overlay))

    def flush(self) -> None:
        """Write every changed key to the table (call before the record's processing ends)."""
        self.commit()


class _TickView(_RecordView):
    def put(self, key: str, value: Any) -> None:
        self._overlay._changes[key] = value

    def delete(self, key: str) -> None:
        self._overlay._changes[key] = TickOverlay._DELETED


class LifecycleInputs:
    """Encodes findings, clearances, operator actions and ticks as lifecycle input records."""

    def __init__(self, kafka: KafkaSettings, registry: serde.SchemaRegistry) -> None:
        self.topic = kafka.topic(LIFECYCLE_TOPIC)
        self.encode = serde.AvroSerializer(registry, serde.LIFECYCLE_INPUT)

    def finding(
        self, finding: Finding, now_ms: int, event: dict[str, Any] | None = None
    ) -> Output:
        """A finding; ``event`` (the record being processed) supplies lineage when it is one
        of the finding's triggering events."""
        lineage: dict[str, Any] = {}
        if event is not None and event.get("event_id") in finding.triggering_event_ids:
            lineage = {
                "ingest_time": epoch_ms(event["ingest_time"]),
                "mapping_version": event.get("mapping_version") or "",
                "source_topic": event.get("source_topic") or "",
                "source_partition": event.get("source_partition", -1),
                "source_offset": event.get("source_offset", -1),
            }
        FINDINGS.labels(finding.rule_id).inc()
        record = {
            "input_kind": INPUT_FINDING,
            "input_id": _digest(
                INPUT_FINDING, finding.rule_id, finding.subject, *finding.triggering_event_ids
            ),
            "rule_id": finding.rule_id,
            "rule_version": finding.rule_version,
            "severity": finding.severity,
            "organisation_id": finding.organisation_id,
            "subject": finding.subject,
            "person_key": finding.person_key,
            "event_time": finding.event_time_ms,
            "ingest_time": lineage.get("ingest_time", finding.event_time_ms),
            "detected_time": now_ms,
            "triggering_event_ids": list(finding.triggering_event_ids),
            "explanation": finding.explanation,
            "analyte_code": finding.analyte_code,
            "value": finding.value,
            "unit": finding.unit,
            "details_json": json.dumps(finding.details, sort_keys=True, default=str),
            "mapping_version": lineage.get("mapping_version", ""),
            "source_topic": lineage.get("source_topic", ""),
            "source_partition": lineage.get("source_partition", -1),
            "source_offset": lineage.get("source_offset", -1),
        }
        return Output(
            self.topic, lifecycle_key(finding.rule_id, finding.subject), self.encode(record)
        )

    def cleared(self, cleared: Cleared, now_ms: int) -> Output:
        """A condition that is over (the lifecycle may resolve its alert)."""
        record = {
            "input_kind": INPUT_CLEARED,
            "input_id": _digest(INPUT_CLEARED, cleared.rule_id, cleared.subject, cleared.time_ms),
            "rule_id": cleared.rule_id,
            "organisation_id": cleared.organisation_id,
            "subject": cleared.subject,
            "event_time": cleared.time_ms,
            "detected_time": now_ms,
            "explanation": cleared.reason,
        }
        return Output(
            self.topic, lifecycle_key(cleared.rule_id, cleared.subject), self.encode(record)
        )

    def tick(self, now_ms: int) -> Output:
        """A timer tick for the partition it is sent to (escalations, forgetting)."""
        record = {
            "input_kind": INPUT_TICK,
            "input_id": _digest(INPUT_TICK, now_ms),
            "event_time": now_ms,
            "detected_time": now_ms,
        }
        return Output(self.topic, None, self.encode(record))

    def action(
        self,
        action: str,
        alert_id: str,
        rule_id: str,
        subject: str,
        actor: str,
        note: str | None,
        now_ms: int,
        *,
        organisation_id: str = "",
        request_id: str = "",
    ) -> Output:
        """An operator's acknowledge or resolve of one alert; ``request_id`` names the
        outcome the lifecycle sends back, ``organisation_id`` the organisation the operator
        acts for (an alert of another one is refused)."""
        if action not in OPERATOR_ACTIONS:
            raise ValueError(f"unknown alert action {action!r}: acknowledge or resolve")
        record = {
            "input_kind": action,
            "input_id": _digest(action, alert_id, actor, now_ms, request_id),
            "rule_id": rule_id,
            "subject": subject,
            "organisation_id": organisation_id,
            "event_time": now_ms,
            "detected_time": now_ms,
            "alert_id": alert_id,
            "actor": actor,
            "note": note,
            "request_id": request_id,
        }
        return Output(self.topic, lifecycle_key(rule_id, subject), self.encode(record))

    def restore(
        self, last: AlertTransition, opened_ms: int, lineage: dict[str, Any], now_ms: int
    ) -> Output:
        """An unresolved alert as storage holds it (its last transition, when it opened),
        for a lifecycle that may have lost it; ``lineage`` holds the opening finding's
        figures and lineage (the keys of :func:`_context`, except detected_time)."""
        record = {
            **lineage,
            "input_kind": INPUT_RESTORE,
            "input_id": _digest(INPUT_RESTORE, last.transition_id, now_ms),
            "alert_id": last.alert_id,
            "rule_id": last.rule_id,
            "rule_version": last.rule_version,
            "severity": last.severity,
            "organisation_id": last.organisation_id,
            "subject": last.subject,
            "person_key": last.person_key,
            "event_time": last.first_event_time_ms,
            "detected_time": opened_ms,
            "triggering_event_ids": list(last.triggering_event_ids),
            "explanation": last.explanation,
            "actor": last.actor,
            "note": last.note,
            "status": last.status,
            "last_action": last.action,
            "updated_time": last.time_ms,
            "last_event_time": last.last_event_time_ms,
            "occurrences": last.occurrences,
            "escalation_level": last.escalation_level,
        }
        return Output(self.topic, lifecycle_key(last.rule_id, last.subject), self.encode(record))

    def outputs(
        self,
        outcomes: list[Finding | Cleared] | list[Finding],
        now_ms: int,
        event: dict[str, Any] | None = None,
    ) -> list[Output]:
        """Lifecycle inputs for every finding and clearance of one rule run."""
        return [
            self.finding(o, now_ms, event) if isinstance(o, Finding) else self.cleared(o, now_ms)
            for o in outcomes
        ]


#: Where a record came from when its caller did not say (direct calls in tools and tests).
UNKNOWN_SOURCE: Final = RawContext("", -1, -1, 0)


class RecordGuard:
    """Processes one record of a stage so that a bug it triggers cannot stop the partition.

    The handler gets a :class:`StagedState` over the stage's state: what it wrote reaches
    the state only when it returns. When it raises (other than NOT_THE_RECORDS_FAULT), its
    outputs and writes are dropped and the whole record is dead-lettered as
    ``internal_error`` with its original key, bytes and position, so the next record is
    processed as usual instead of the worker crashing on this one at every re-read.
    """

    def __init__(self, stage: str, kafka: KafkaSettings, registry: serde.SchemaRegistry) -> None:
        self.stage = stage
        self.dlq_topic = kafka.topic(DLQ_TOPIC)
        self.encode_dead_letter = serde.AvroSerializer(registry, serde.DEAD_LETTER)
        self.internal_errors = InternalErrors(stage)

    def run(
        self,
        handler: Callable[[KeyValueState], list[Output]],
        state: KeyValueState,
        value: bytes | None,
        now_ms: int,
        source: RawContext | None,
        key: bytes | None,
        refusals: tuple[type[Exception], ...] = (),
    ) -> list[Output]:
        """``handler``'s outputs for one record, or the record's one internal_error dead letter.

        ``refusals`` are the stage's own reasons to refuse a record: they raise to the caller
        (which dead-letters the record with its own reason code), the writes dropped too.
        """
        staged = StagedState(state)
        try:
            outputs = handler(staged)
        except refusals:
            # The stage's own verdict on this record: not a bug.
            self.internal_errors.succeeded((source or UNKNOWN_SOURCE).topic)
            raise
        except NOT_THE_RECORDS_FAULT:
            raise
        except Exception as exc:
            source = source or UNKNOWN_SOURCE
            rejected = self.internal_errors.rejected(exc, source)
            return [self.dead_letter(source, key, value, rejected, now_ms)]
        staged.commit()
        self.internal_errors.succeeded((source or UNKNOWN_SOURCE).topic)
        return outputs

    def dead_letter(
        self,
        source: RawContext,
        key: bytes | None,
        value: bytes | None,
        rejected: RecordRejected,
        now_ms: int,
    ) -> Output:
        """The dead letter of one whole record of this stage (counted by reason)."""
        record = dead_letter_record(self.stage, source, key, value or b"", rejected, None, now_ms)
        DEAD_LETTERS.labels(self.stage, rejected.reason_code).inc()
        return Output(self.dlq_topic, key, self.encode_dead_letter(record))


class GuardedStage(ABC):
    """A stage over one topic whose every record is processed under a :class:`RecordGuard`."""

    guard: RecordGuard

    def handle(
        self,
        value: bytes | None,
        state: KeyValueState,
        now_ms: int,
        source: RawContext | None = None,
        key: bytes | None = None,
    ) -> list[Output]:
        """The outputs of one record (``source``: its position); a record that triggers a
        bug is dead-lettered as ``internal_error`` and none of its state writes are kept."""
        return self.guard.run(
            lambda staged: self.process(value, staged, now_ms), state, value, now_ms, source, key
        )

    @abstractmethod
    def process(self, value: bytes | None, state: KeyValueState, now_ms: int) -> list[Output]:
        """The outputs of one record (unguarded; called by :meth:`handle`)."""


def _reloading(name: str, path: Path | str, loader: Any) -> ReloadingFile[Any]:
    return ReloadingFile(name, path, loader)


class DetectStage:
    """Runs the per-patient rule families over one normalised event (no Faust, no broker)."""

    #: Normalised event kinds this stage reads.
    KINDS: Final = ("observation", "diagnosis", "claim_line", "encounter")

    def __init__(
        self,
        kafka: KafkaSettings,
        registry: serde.SchemaRegistry,
        rules_dir: Path | None = None,
    ) -> None:
        self.decoders = {
            kind: serde.AvroDeserializer(registry, serde.NORM_SUBJECT_BY_KIND[kind])
            for kind in self.KINDS
        }
        self.inputs = LifecycleInputs(kafka, registry)
        self.news2_rules = _reloading(
            "news2", rule_file("news2.yaml", rules_dir), load_news2_rules
        )
        self.claim_rules = _reloading(
            "claims", rule_file("claims.yaml", rules_dir), load_claim_rules
        )
        self._news2 = News2Detector(self.news2_rules.current())
        self._claims = ClaimDetector(self.claim_rules.current())
        self.syndromic_rules = _reloading(
            "syndromic-forward", rule_file("syndromic.yaml", rules_dir), load_syndromic_rules
        )
        self.syndromic_topic = kafka.topic(SYNDROMIC_TOPIC)
        self.guard = RecordGuard("detect", kafka, registry)

    def _detectors(self) -> tuple[News2Detector, ClaimDetector]:
        news2_rules = self.news2_rules.current()
        if news2_rules is not self._news2.rules:
            self._news2 = News2Detector(news2_rules)
        claim_rules = self.claim_rules.current()
        if claim_rules is not self._claims.rules:
            self._claims = ClaimDetector(claim_rules)
        return self._news2, self._claims

    def handle(
        self,
        kind: str,
        value: bytes | None,
        state: KeyValueState,
        now_ms: int,
        source: RawContext | None = None,
        key: bytes | None = None,
    ) -> list[Output]:
        """Lifecycle inputs caused by one normalised event (``source``: its position).

        Norm records are our own output: one that does not decode, like any other bug the
        record triggers, dead-letters it as ``internal_error`` (:class:`RecordGuard`).
        """
        return self.guard.run(
            lambda staged: self._handle(kind, value, staged, now_ms), state, value, now_ms,
            source, key,
        )

    def _handle(
        self, kind: str, value: bytes | None, state: KeyValueState, now_ms: int
    ) -> list[Output]:
        event = self.decoders[kind](value)
        news2, claims = self._detectors()
        outcomes: list[Finding | Cleared] = []
        if kind in ("observation", "diagnosis"):
            outcomes.extend(news2.observe(event, state, now_ms))
        if kind in ("claim_line", "encounter"):
            outcomes.extend(claims.observe(event, state, now_ms))
        outputs = self.inputs.outputs(outcomes, now_ms, event)
        if kind == "diagnosis" and self.syndromic_rules.current().syndromes_of(
            event["icd10_code"]
        ):
            # Counts per district need every diagnosis of a district in one place.
            outputs.append(
                Output(self.syndromic_topic, event["organisation_id"].encode(), value or b"")
            )
        return outputs

    def tick(self, state: KeyValueState, now_ms: int) -> list[Output]:
        """Periodic pruning (and any time-driven findings) of the rule families."""
        news2, claims = self._detectors()
        outcomes: list[Finding | Cleared] = [*news2.tick(state, now_ms)]
        outcomes.extend(claims.tick(state, now_ms))
        return self.inputs.outputs(outcomes, now_ms)


class LifecycleStage(GuardedStage):
    """Applies lifecycle inputs to the alert state machine and emits Alert snapshots."""

    def __init__(
        self,
        kafka: KafkaSettings,
        registry: serde.SchemaRegistry,
        rules_path: Path | str = DEFAULT_ALERT_LIFECYCLE_PATH,
    ) -> None:
        self.decode = serde.AvroDeserializer(registry, serde.LIFECYCLE_INPUT)
        self.encode_alert = serde.AvroSerializer(registry, serde.ALERT)
        self.encode_outcome = serde.AvroSerializer(registry, serde.ALERT_ACTION_OUTCOME)
        self.inputs = LifecycleInputs(kafka, registry)
        self.alerts_topic = kafka.topic(ALERTS_TOPIC)
        self.outcomes_topic = kafka.topic(ACTION_OUTCOMES_TOPIC)
        self.rules = _reloading("alert_lifecycle", rules_path, load_alert_lifecycle_rules)
        self._lifecycle = AlertLifecycle(self.rules.current())
        self.guard = RecordGuard("lifecycle", kafka, registry)

    def _machine(self) -> AlertLifecycle:
        rules = self.rules.current()
        if rules is not self._lifecycle.rules:
            self._lifecycle = AlertLifecycle(rules)
        return self._lifecycle

    def process(self, value: bytes | None, state: KeyValueState, now_ms: int) -> list[Output]:
        """Alert snapshots caused by one lifecycle input.

        An operator action also yields its outcome on ``alerts.outcomes``: applied, or
        refused with the reason (unknown or resolved alert, another organisation's alert),
        so the console and the CLI answer with what really happened.
        """
        record = self.decode(value)
        machine = self._machine()
        kind = record["input_kind"]
        transitions: list[AlertTransition]
        if kind == INPUT_FINDING:
            finding = Finding(
                rule_id=record["rule_id"],
                rule_version=record["rule_version"],
                severity=record["severity"],
                organisation_id=record["organisation_id"],
                subject=record["subject"],
                event_time_ms=epoch_ms(record["event_time"]),
                triggering_event_ids=tuple(record["triggering_event_ids"]),
                explanation=record["explanation"],
                person_key=record["person_key"],
                analyte_code=record["analyte_code"],
                value=record["value"],
                unit=record["unit"],
                details=json.loads(record["details_json"] or "{}"),
            )
            transitions = machine.on_finding(finding, state, now_ms)
            if transitions and transitions[0].action == "opened" and not transitions[0].resent:
                # The opening finding's figures and lineage describe the alert.
                state.put(_context_key(transitions[0].alert_id), _context(record))
        elif kind == INPUT_CLEARED:
            cleared = Cleared(
                record["rule_id"],
                record["organisation_id"],
                record["subject"],
                epoch_ms(record["event_time"]),
                record["explanation"],
            )
            transitions = machine.on_cleared(cleared, state, now_ms)
        elif kind in OPERATOR_ACTIONS:
            return self._operator_action(record, state, now_ms)
        elif kind == INPUT_TICK:
            transitions = machine.tick(state, now_ms)
        elif kind == INPUT_RESTORE:
            opened_ms = epoch_ms(record["detected_time"])
            if machine.restore(_last_transition(record), opened_ms, state):
                state.put(_context_key(record["alert_id"]), _context(record))
                log.info("alert %s restored from storage (%s)", record["alert_id"],
                         record["status"])
            return []
        else:
            log.error("unknown lifecycle input kind %r ignored", kind)
            return []
        return [self._snapshot(t, state) for t in transitions]

    def _operator_action(
        self, record: dict[str, Any], state: KeyValueState, now_ms: int
    ) -> list[Output]:
        """Apply an acknowledge or resolve; its snapshots and its outcome."""
        try:
            transitions = self._machine().act(
                record["input_kind"], record["alert_id"], record["actor"], record["note"],
                state, now_ms,
                organisation_id=record["organisation_id"], request_id=record["request_id"],
            )
        except LifecycleError as exc:
            log.warning("alert action refused: %s", exc)
            return [self._outcome(record, REFUSED, str(exc), state, now_ms)]
        outputs = [self._snapshot(t, state) for t in transitions]
        return [*outputs, self._outcome(record, APPLIED, "", state, now_ms)]

    def _outcome(
        self, record: dict[str, Any], outcome: str, reason: str, state: KeyValueState,
        now_ms: int,
    ) -> Output:
        alert = alert_state(state, record["alert_id"])
        value = {
            "request_id": record["request_id"],
            "alert_id": record["alert_id"],
            "action": record["input_kind"],
            "outcome": outcome,
            "reason": reason,
            "status": alert["status"] if alert else "",
            "actor": record["actor"],
            "organisation_id": record["organisation_id"],
            "decided_time": now_ms,
        }
        key = (record["request_id"] or record["alert_id"]).encode()
        return Output(self.outcomes_topic, key, self.encode_outcome(value))

    def tick(self, state: KeyValueState, now_ms: int) -> list[Output]:
        """Throttled updates and escalations that are due."""
        return [self._snapshot(t, state) for t in self._machine().tick(state, now_ms)]

    def _snapshot(self, transition: AlertTransition, state: KeyValueState) -> Output:
        context = state.get(_context_key(transition.alert_id)) or {}
        if transition.status == "resolved":
            state.delete(_context_key(transition.alert_id))
        if not transition.resent:
            ALERT_TRANSITIONS.labels(transition.action).inc()
            if transition.action == "opened":
                ALERTS.labels(transition.rule_id).inc()
        alert = {
            "alert_id": transition.alert_id,
            "rule_id": transition.rule_id,
            "rule_version": transition.rule_version,
            "severity": transition.severity,
            "organisation_id": transition.organisation_id,
            "person_key": transition.person_key,
            "event_time": transition.first_event_time_ms,
            "ingest_time": context.get("ingest_time", transition.first_event_time_ms),
            "detected_time": context.get("detected_time", transition.time_ms),
            "triggering_event_ids": list(transition.triggering_event_ids),
            "analyte_code": context.get("analyte_code"),
            "value": context.get("value"),
            "unit": context.get("unit"),
            "explanation": transition.explanation,
            "source_topic": context.get("source_topic", ""),
            "source_partition": context.get("source_partition", -1),
            "source_offset": context.get("source_offset", -1),
            "mapping_version": context.get("mapping_version", ""),
            "subject": transition.subject,
            "status": transition.status,
            "action": transition.action,
            "actor": transition.actor,
            "note": transition.note,
            "transition_id": transition.transition_id,
            "updated_time": transition.time_ms,
            "first_event_time": transition.first_event_time_ms,
            "last_event_time": transition.last_event_time_ms,
            "occurrences": transition.occurrences,
            "escalation_level": transition.escalation_level,
            "details_json": context.get("details_json", "{}"),
        }
        key = (transition.person_key or transition.subject).encode()
        return Output(self.alerts_topic, key, self.encode_alert(alert))


def _last_transition(record: dict[str, Any]) -> AlertTransition:
    """The stored last transition a restore input carries."""
    return AlertTransition(
        transition_id=record["input_id"],
        alert_id=record["alert_id"],
        rule_id=record["rule_id"],
        rule_version=record["rule_version"],
        subject=record["subject"],
        organisation_id=record["organisation_id"],
        person_key=record["person_key"],
        severity=record["severity"],
        status=record["status"],
        action=record["last_action"],
        actor=record["actor"],
        note=record["note"],
        time_ms=epoch_ms(record["updated_time"]),
        first_event_time_ms=epoch_ms(record["event_time"]),
        last_event_time_ms=epoch_ms(record["last_event_time"]),
        occurrences=record["occurrences"],
        escalation_level=record["escalation_level"],
        triggering_event_ids=tuple(record["triggering_event_ids"]),
        explanation=record["explanation"],
    )


def _context_key(alert_id: str) -> str:
    return f"alertctx|{alert_id}"


def _context(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "ingest_time": epoch_ms(record["ingest_time"]),
        "detected_time": epoch_ms(record["detected_time"]),
        "analyte_code": record["analyte_code"],
        "value": record["value"],
        "unit": record["unit"],
        "source_topic": record["source_topic"],
        "source_partition": record["source_partition"],
        "source_offset": record["source_offset"],
        "mapping_version": record["mapping_version"],
        "details_json": record["details_json"],
    }


class PatientIndexStage:
    """The master patient index over identity observations: link, merge, unmerge, review.

    Runs on the single-partition ``mpi.identity`` topic: one owner sees every person, so
    linking across organisations needs no coordination. Decisions go to ``mpi.links``
    (stored in ClickHouse ``person_link``); the index key never leaves this process.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        registry: serde.SchemaRegistry,
        index_key: bytes,
        rules_path: Path | str = DEFAULT_MPI_RULES_PATH,
    ) -> None:
        self.decode = serde.AvroDeserializer(registry, serde.IDENTITY_OBSERVATION)
        self.encode_link = serde.AvroSerializer(registry, serde.PERSON_LINK)
        self.links_topic = kafka.topic(FACT_TOPICS["person_link"])
        self.guard = RecordGuard(MPI_STAGE, kafka, registry)
        self.rules = _reloading("mpi", rules_path, load_mpi_rules)
        self._key = index_key
        self._index = PatientIndex(self.rules.current(), index_key)

    def _patient_index(self) -> PatientIndex:
        rules = self.rules.current()
        if rules is not self._index.rules:
            self._index = PatientIndex(rules, self._key)
        return self._index

    def handle(
        self,
        value: bytes | None,
        state: KeyValueState,
        now_ms: int,
        source: RawContext,
        key: bytes | None = None,
    ) -> list[Output]:
        """Person link records caused by one identity observation (``source``: its position).

        An observation the index cannot place (a steward command for an unknown record, an
        invalid observation, or index state that lacks what the observation refers to, such
        as a person lost with a changelog batch) changes nothing and goes to the dead-letter
        topic with its original key and bytes, its position and the reason (published to
        mpi.identity again once the state is repaired, it links normally); linking goes on
        with the next observation.
        """
        try:
            observation = self.decode(value)
        except serde.SerializationError as exc:
            return [self._dead_letter(source, key, value, now_ms, "invalid_observation", exc)]

        def place(staged: KeyValueState) -> list[Output]:
            if observation.get("command") == "unmerge":
                reason = f"split by {observation.get('actor') or 'a steward'}: " + (
                    observation.get("reason") or "no reason given"
                )
                links = self._patient_index().unmerge(
                    observation["record_key"], staged, now_ms, reason
                )
            else:
                links = self._patient_index().observe(observation, staged, now_ms)
            return [self._link(link) for link in links]

        # Nothing of a refused record is applied (the guard stages its writes); any other
        # exception is a bug and dead-letters the observation as internal_error.
        try:
            return self.guard.run(
                place, state, value, now_ms, source, key,
                refusals=(IdentityObservationError, KeyError, TypeError, ValueError),
            )
        except IdentityObservationError as exc:
            return [self._dead_letter(source, key, value, now_ms, "invalid_observation", exc)]
        except (KeyError, TypeError, ValueError) as exc:
            # Index state that lacks what the observation refers to (e.g. a changelog batch
            # lost on recovery).
            return [self._dead_letter(source, key, value, now_ms, "index_state", exc)]

    def _dead_letter(
        self,
        source: RawContext,
        key: bytes | None,
        value: bytes | None,
        now_ms: int,
        reason_code: str,
        error: Exception,
    ) -> Output:
        # Tokens and pseudonymous keys only in the reason: the index sees no identifier.
        reason = f"the patient index could not place this observation: {type(error).__name__}: "
        reason += str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
        log.error("%s[%d]@%d: %s", source.topic, source.partition, source.offset, reason)
        IDENTITY_REFUSED.labels(reason_code).inc()
        rejected = RecordRejected(None, None, reason_code, reason)
        return self.guard.dead_letter(source, key, value, rejected, now_ms)

    def unmerge(
        self, record_key: str, state: KeyValueState, now_ms: int, reason: str
    ) -> list[Output]:
        """A data steward splits a record out of its person (never re-linked automatically)."""
        return [
            self._link(link)
            for link in self._patient_index().unmerge(record_key, state, now_ms, reason)
        ]

    def _link(self, link: LinkEvent) -> Output:
        PERSON_LINKS.labels(link.action, link.method).inc()
        record = {
            "link_event_id": link.link_event_id,
            "action": link.action,
            "record_key": link.record_key,
            "person_key": link.person_key,
            "previous_person_key": link.previous_person_key,
            "method": link.method,
            "score": link.score,
            "threshold": link.threshold,
            "explanation": link.explanation,
            "organisation_id": link.organisation_id,
            "effective_time": link.effective_time_ms,
            "triggering_event_id": link.triggering_event_id,
            "decided_time": link.decided_time_ms,
        }
        return Output(self.links_topic, link.record_key.encode(), self.encode_link(record))


class FeedWatchStage(GuardedStage):
    """Feed silence and dead-letter/unmapped spikes from the workers' feed activity summaries.

    Runs on the single-partition ``detect.feed_activity`` topic: one owner sums every
    worker's counts of a feed, so a quiet partition is never mistaken for a silent feed.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        registry: serde.SchemaRegistry,
        rules_path: Path | str = DEFAULT_FEED_RULES_PATH,
    ) -> None:
        self.decode = serde.AvroDeserializer(registry, serde.FEED_ACTIVITY)
        self.inputs = LifecycleInputs(kafka, registry)
        self.rules = _reloading("feeds", rules_path, load_feed_rules)
        self._detector = FeedDetector(self.rules.current())
        self.guard = RecordGuard("feed_watch", kafka, registry)

    def _feeds(self) -> FeedDetector:
        rules = self.rules.current()
        if rules is not self._detector.rules:
            self._detector = FeedDetector(rules)
        return self._detector

    def process(self, value: bytes | None, state: KeyValueState, now_ms: int) -> list[Output]:
        """Lifecycle inputs caused by one worker's summary of one feed and minute."""
        activity = self.decode(value)
        return self.inputs.outputs(self._feeds().observe_activity(activity, state, now_ms), now_ms)

    def tick(self, state: KeyValueState, now_ms: int, watching_since_ms: int = 0) -> list[Output]:
        """Silences due by the wall clock (after a whole limit of watching), and windows the
        clock has closed."""
        return self.inputs.outputs(
            self._feeds().tick(state, now_ms, watching_since_ms), now_ms
        )


class SyndromicStage(GuardedStage):
    """Syndromic surveillance over the diagnoses the detect stage forwards (one partition)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        registry: serde.SchemaRegistry,
        rules_path: Path | str = DEFAULT_SYNDROMIC_RULES_PATH,
    ) -> None:
        self.decode = serde.AvroDeserializer(registry, serde.DIAGNOSIS)
        self.inputs = LifecycleInputs(kafka, registry)
        self.rules = _reloading("syndromic", rules_path, load_syndromic_rules)
        self._detector = SyndromicDetector(self.rules.current())
        self.guard = RecordGuard("syndromic", kafka, registry)

    def _syndromic(self) -> SyndromicDetector:
        rules = self.rules.current()
        if rules is not self._detector.rules:
            self._detector = SyndromicDetector(rules)
        return self._detector

    def process(self, value: bytes | None, state: KeyValueState, now_ms: int) -> list[Output]:
        """Lifecycle inputs caused by one forwarded diagnosis (when an hour closes)."""
        event = self.decode(value)
        return self.inputs.outputs(self._syndromic().observe(event, state, now_ms), now_ms, event)

    def tick(self, state: KeyValueState, now_ms: int) -> list[Output]:
        """Pruning of the seen-diagnosis memory."""
        return self.inputs.outputs(self._syndromic().tick(state, now_ms), now_ms)
