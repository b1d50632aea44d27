"""Alert lifecycle: turns findings into alerts that open, are acknowledged and are resolved.

Every rule family returns :class:`~streams.findings.Finding` values; :class:`AlertLifecycle`
keeps one alert per (rule_id, subject) while it is open or acknowledged, counts repeats
instead of opening new alerts, escalates alerts nobody acknowledged, resolves them on an
operator's word or, where the rule allows it (``streams/rules/alert_lifecycle.yaml``), on a
:class:`~streams.findings.Cleared`. Each change is an :class:`AlertTransition` for storage.

Times of the lifecycle (throttling, escalation, retention) are wall-clock ``now_ms``: they
measure how fast people react, not when the clinical fact happened.

State (JSON values):
- ``alert|id|<alert_id>``: the alert; a resolved alert is deleted by :meth:`tick` after
  ``retain_resolved_hours``.
- ``alert|subject|<rule_id>|<subject>``: the id of the alert of that rule and subject that
  is still open or acknowledged; deleted when it is resolved.

The state lives in a Faust table rebuilt from its changelog when a worker starts. Where the
changelog is gone (the memory-only tansu broker was restarted, or a broker lost its data),
:meth:`AlertLifecycle.restore` adopts an alert from its last stored state in ClickHouse, so
alerts opened before the restart can still be acknowledged, resolved and escalated.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Final

from pydantic import Field, field_validator

from streams.findings import SEVERITIES, Cleared, Finding, KeyValueState
from streams.model import NonBlank
from streams.rules_file import StrictModel, read_rules_document, validate_rules

log = logging.getLogger(__name__)

DEFAULT_ALERT_LIFECYCLE_PATH: Final[Path] = (
    Path(__file__).resolve().parent / "rules" / "alert_lifecycle.yaml"
)

OPEN: Final = "open"
ACKNOWLEDGED: Final = "acknowledged"
RESOLVED: Final = "resolved"
#: Operator actions.
ACKNOWLEDGE: Final = "acknowledge"
RESOLVE: Final = "resolve"

_ALERT_PREFIX: Final = "alert|id|"
_SUBJECT_PREFIX: Final = "alert|subject|"
_MS_PER_MINUTE: Final = 60_000
#: Fingerprints of the findings an alert counted, kept to ignore a reprocessed finding.
_MAX_FINGERPRINTS: Final = 100
#: At most this many triggering event ids are carried by an alert (the latest finding's).
_MAX_TRIGGERING_IDS: Final = 20
#: Request ids of the operator actions an alert took, kept to answer a reprocessed request.
_MAX_REQUESTS: Final = 20
SYSTEM_ACTOR: Final = "system"


class AlertLifecycleRulesError(ValueError):
    """The alert lifecycle rules file is missing, not YAML, or not of the expected shape."""


class LifecycleError(ValueError):
    """An operator action that the alert's state does not allow (unknown alert, resolved...)."""


#: Statuses an alert can be restored in: a resolved alert needs no state.
RESTORABLE: Final = (OPEN, ACKNOWLEDGED)
#: What an alert's state takes over from its last transition when it is restored.
_ALERT_FIELDS_OF_TRANSITION: Final = (
    "alert_id", "rule_id", "rule_version", "subject", "organisation_id", "person_key",
    "severity", "status", "first_event_time_ms", "last_event_time_ms", "occurrences",
    "escalation_level", "explanation",
)


@dataclass(frozen=True, slots=True)
class EscalationPolicy:
    """When an unacknowledged alert of one severity escalates: first after, then every repeat."""

    after_ms: int
    repeat_ms: int | None
    max_level: int

    def level_at(self, age_ms: int) -> int:
        """The escalation level an alert open for ``age_ms`` without acknowledgement deserves."""
        if age_ms < self.after_ms:
            return 0
        if self.repeat_ms is None:
            return 1
        return min(self.max_level, 1 + (age_ms - self.after_ms) // self.repeat_ms)


@dataclass(frozen=True, slots=True)
class AlertLifecycleRules:
    """A loaded lifecycle rules version: throttling, retention, escalation and auto-resolve."""

    version: str
    update_every_ms: int
    retain_resolved_ms: int
    escalation: dict[str, EscalationPolicy | None]
    auto_resolve: dict[str, bool]
    default_auto_resolve: bool

    def may_auto_resolve(self, rule_id: str) -> bool:
        """Whether a Cleared may resolve an alert of ``rule_id``: the longest prefix decides."""
        matches = [prefix for prefix in self.auto_resolve if rule_id.startswith(prefix)]
        if not matches:
            return self.default_auto_resolve
        return self.auto_resolve[max(matches, key=len)]


@dataclass(frozen=True, slots=True)
class AlertTransition:
    """One change of an alert, as storage and the monitoring screens receive it.

    ``action`` is opened, updated, acknowledged, escalated or resolved; ``status`` is the
    alert's status after it. ``transition_id`` is deterministic (alert, action and what
    makes the action unique), so a replay writes the same rows.
    """

    transition_id: str
    alert_id: str
    rule_id: str
    rule_version: str
    subject: str
    organisation_id: str
    person_key: str | None
    severity: str
    status: str
    action: str
    actor: str
    note: str | None
    time_ms: int
    first_event_time_ms: int
    last_event_time_ms: int
    occurrences: int
    escalation_level: int
    triggering_event_ids: tuple[str, ...]
    explanation: str
    #: The "opened" transition sent again, as it was (its finding reprocessed while the
    #: alert is open): stored again, not counted again.
    resent: bool = False


# --- loading --------------------------------------------------------------------------------


class _EscalationModel(StrictModel):
    after_minutes: int = Field(ge=1)
    repeat_every_minutes: int | None = Field(default=None, ge=1)
    max_level: int = Field(ge=1)


class _RulesModel(StrictModel):
    version: NonBlank
    update_every_minutes: int = Field(ge=0)
    retain_resolved_hours: int = Field(ge=0)
    escalation: dict[str, _EscalationModel | None]
    auto_resolve: dict[str, bool]
    default_auto_resolve: bool

    @field_validator("escalation")
    @classmethod
    def _every_severity(
        cls, value: dict[str, _EscalationModel | None]
    ) -> dict[str, _EscalationModel | None]:
        unknown = sorted(set(value) - set(SEVERITIES))
        if unknown:
            raise ValueError(f"unknown severity {unknown[0]!r}; use {', '.join(SEVERITIES)}")
        missing = [severity for severity in SEVERITIES if severity not in value]
        if missing:
            raise ValueError(f"severity {missing[0]!r} missing (null means never escalate)")
        return value

    @field_validator("auto_resolve")
    @classmethod
    def _prefixes(cls, value: dict[str, bool]) -> dict[str, bool]:
        for prefix in value:
            if not prefix.strip():
                raise ValueError("a rule_id prefix must not be empty")
        return value


def alert_lifecycle_rules_from_dict(document: Any, source: str = "<dict>") -> AlertLifecycleRules:
    """Validate a parsed lifecycle rules document; raises AlertLifecycleRulesError."""
    model = validate_rules(
        _RulesModel, document, AlertLifecycleRulesError, "alert lifecycle rules", source
    )
    escalation: dict[str, EscalationPolicy | None] = {}
    for severity, policy in model.escalation.items():
        if policy is None:
            escalation[severity] = None
            continue
        repeat = policy.repeat_every_minutes
        escalation[severity] = EscalationPolicy(
            policy.after_minutes * _MS_PER_MINUTE,
            None if repeat is None else repeat * _MS_PER_MINUTE,
            # Without a repeat there is only the first escalation.
            1 if repeat is None else policy.max_level,
        )
    return AlertLifecycleRules(
        version=model.version,
        update_every_ms=model.update_every_minutes * _MS_PER_MINUTE,
        retain_resolved_ms=model.retain_resolved_hours * 60 * _MS_PER_MINUTE,
        escalation=escalation,
        auto_resolve=dict(model.auto_resolve),
        default_auto_resolve=model.default_auto_resolve,
    )


def load_alert_lifecycle_rules(
    path: Path | str = DEFAULT_ALERT_LIFECYCLE_PATH,
) -> AlertLifecycleRules:
    """Read and validate an alert lifecycle rules YAML file; raises AlertLifecycleRulesError."""
    path = Path(path)
    document = read_rules_document(path, AlertLifecycleRulesError, "lifecycle rules")
    return alert_lifecycle_rules_from_dict(document, str(path))


# --- identities -----------------------------------------------------------------------------


def _digest(*parts: object) -> str:
    text = "|".join(str(part) for part in parts)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def lifecycle_alert_id(rule_id: str, subject: str, first_event_id: str, generation: int = 0) -> str:
    """The id of an alert: rule, subject and the first triggering event (a replay gives the same).

    ``generation`` is above 0 only when a later alert of the same rule and subject would
    otherwise collide with a remembered one that started with the same event.
    """
    if generation == 0:
        return _digest("alert", rule_id, subject, first_event_id)
    return _digest("alert", rule_id, subject, first_event_id, generation)


def _first_event_token(finding: Finding) -> str:
    """The first triggering event id; silence findings name none, so their event time stands in."""
    if finding.triggering_event_ids:
        return finding.triggering_event_ids[0]
    return f"time:{finding.event_time_ms}"


def _fingerprint(finding: Finding) -> str:
    """What makes a finding the same finding when it is processed again."""
    return _digest(finding.event_time_ms, *finding.triggering_event_ids)


_SEVERITY_RANK: Final = {severity: rank for rank, severity in enumerate(SEVERITIES)}


def _stored_transition(stored: dict[str, Any]) -> AlertTransition | None:
    """A transition kept in the alert's state (a JSON changelog round trip), None (logged)
    when it no longer fits the class (state written by another version)."""
    known = {f.name for f in fields(AlertTransition)}
    try:
        transition = AlertTransition(**{k: v for k, v in stored.items() if k in known})
    except TypeError as exc:
        log.warning("an alert's stored opening does not fit this version (%s): not sent "
                    "again", exc)
        return None
    return replace(transition, triggering_event_ids=tuple(transition.triggering_event_ids))


def alert_state(state: KeyValueState, alert_id: str) -> dict[str, Any] | None:
    """The lifecycle's state of one alert (status, counts...), or None when it has none."""
    alert: dict[str, Any] | None = state.get(_ALERT_PREFIX + alert_id)
    return alert


def _remember_request(alert: dict[str, Any], request_id: str) -> None:
    if request_id:
        alert["requests"] = [*alert.get("requests", ()), request_id][-_MAX_REQUESTS:]


# --- the lifecycle --------------------------------------------------------------------------


class AlertLifecycle:
    """The alert state machine: open -> acknowledged -> resolved, with dedup and escalation.

    A finding for a (rule_id, subject) without an open or acknowledged alert opens one;
    further findings update it (the same finding processed again is ignored). After it is
    resolved, a new finding opens a new alert. Bounded state: one entry per unresolved
    (rule, subject) plus resolved alerts for ``retain_resolved_hours``.
    """

    def __init__(self, rules: AlertLifecycleRules) -> None:
        self.rules = rules

    # --- findings ---------------------------------------------------------------------------

    def on_finding(
        self, finding: Finding, state: KeyValueState, now_ms: int
    ) -> list[AlertTransition]:
        """Open an alert for a finding, or count it on the alert already open (throttled)."""
        subject_key = f"{_SUBJECT_PREFIX}{finding.rule_id}|{finding.subject}"
        fingerprint = _fingerprint(finding)
        current_id = state.get(subject_key)
        if current_id is not None:
            alert = state.get(_ALERT_PREFIX + current_id)
            if alert is not None and alert["status"] != RESOLVED:
                return self._repeat(alert, finding, fingerprint, state, now_ms)
        alert_id = self._new_alert_id(finding, fingerprint, state)
        if alert_id is None:
            return []  # a replay of a finding a remembered (resolved) alert already counted
        alert = {
            "alert_id": alert_id,
            "rule_id": finding.rule_id,
            "rule_version": finding.rule_version,
            "subject": finding.subject,
            "organisation_id": finding.organisation_id,
            "person_key": finding.person_key,
            "severity": finding.severity,
            "status": OPEN,
            "opened_ms": now_ms,
            "resolved_ms": None,
            "first_event_time_ms": finding.event_time_ms,
            "last_event_time_ms": finding.event_time_ms,
            "occurrences": 1,
            "escalation_level": 0,
            "triggering_event_ids": list(finding.triggering_event_ids[:_MAX_TRIGGERING_IDS]),
            "explanation": finding.explanation,
            "last_update_ms": now_ms,
            "pending_update": False,
            "fingerprints": [fingerprint],
            "opened_by": fingerprint,
        }
        opened = self._transition(alert, "opened", SYSTEM_ACTOR, None, now_ms, "")
        alert["opening"] = {**asdict(opened), "triggering_event_ids": list(
            opened.triggering_event_ids)}
        state.put(_ALERT_PREFIX + alert_id, alert)
        state.put(subject_key, alert_id)
        return [opened]

    def _new_alert_id(self, finding: Finding, fingerprint: str, state: KeyValueState) -> str | None:
        """A fresh alert id, or None when a remembered alert with that id counted this finding."""
        first = _first_event_token(finding)
        generation = 0
        while True:
            alert_id = lifecycle_alert_id(finding.rule_id, finding.subject, first, generation)
            remembered = state.get(_ALERT_PREFIX + alert_id)
            if remembered is None:
                return alert_id
            if fingerprint in remembered["fingerprints"]:
                return None
            generation += 1

    def _repeat(
        self,
        alert: dict[str, Any],
        finding: Finding,
        fingerprint: str,
        state: KeyValueState,
        now_ms: int,
    ) -> list[AlertTransition]:
        if fingerprint in alert["fingerprints"]:
            # The same finding again (reprocessing): already counted. If it is the one that
            # opened the alert, the "opened" output may not have reached the broker before a
            # kill (the state did, through the changelog): it is sent again, with the same
            # transition id (collapsed downstream), while the alert is still open.
            opening = alert.get("opening")
            if alert.get("opened_by") == fingerprint and alert["status"] == OPEN and opening:
                # As it was sent (the alert has moved on since: occurrences, triggering
                # events), so the row it may replace downstream stays the same.
                sent = _stored_transition(opening)
                return [] if sent is None else [replace(sent, resent=True)]
            return []
        alert["fingerprints"] = [*alert["fingerprints"], fingerprint][-_MAX_FINGERPRINTS:]
        alert["occurrences"] += 1
        alert["last_event_time_ms"] = max(alert["last_event_time_ms"], finding.event_time_ms)
        alert["first_event_time_ms"] = min(alert["first_event_time_ms"], finding.event_time_ms)
        alert["triggering_event_ids"] = list(finding.triggering_event_ids[:_MAX_TRIGGERING_IDS])
        alert["explanation"] = finding.explanation
        alert["rule_version"] = finding.rule_version
        if _SEVERITY_RANK[finding.severity] < _SEVERITY_RANK[alert["severity"]]:
            alert["severity"] = finding.severity  # an alert takes the most urgent severity seen
        transitions: list[AlertTransition] = []
        if now_ms - alert["last_update_ms"] >= self.rules.update_every_ms:
            transitions.append(self._updated(alert, now_ms))
        else:
            alert["pending_update"] = True  # tick() emits it when the interval has passed
        state.put(_ALERT_PREFIX + alert["alert_id"], alert)
        return transitions

    def _updated(self, alert: dict[str, Any], now_ms: int) -> AlertTransition:
        alert["last_update_ms"] = now_ms
        alert["pending_update"] = False
        return self._transition(
            alert, "updated", SYSTEM_ACTOR, None, now_ms, str(alert["occurrences"])
        )

    def on_cleared(
        self, cleared: Cleared, state: KeyValueState, now_ms: int
    ) -> list[AlertTransition]:
        """Resolve the unresolved alert of the cleared rule and subject if the rule allows it."""
        if not self.rules.may_auto_resolve(cleared.rule_id):
            return []
        alert_id = state.get(f"{_SUBJECT_PREFIX}{cleared.rule_id}|{cleared.subject}")
        if alert_id is None:
            return []
        alert = state.get(_ALERT_PREFIX + alert_id)
        if alert is None or alert["status"] == RESOLVED:
            return []
        return [self._resolve(alert, SYSTEM_ACTOR, cleared.reason, state, now_ms)]

    # --- operator actions -------------------------------------------------------------------

    def acknowledge(
        self, alert_id: str, actor: str, note: str | None, state: KeyValueState, now_ms: int
    ) -> list[AlertTransition]:
        """An operator takes the alert: stops escalation (see :meth:`act`)."""
        return self.act(ACKNOWLEDGE, alert_id, actor, note, state, now_ms)

    def resolve(
        self, alert_id: str, actor: str, note: str | None, state: KeyValueState, now_ms: int
    ) -> list[AlertTransition]:
        """An operator closes an open or acknowledged alert (see :meth:`act`)."""
        return self.act(RESOLVE, alert_id, actor, note, state, now_ms)

    def act(
        self,
        action: str,
        alert_id: str,
        actor: str,
        note: str | None,
        state: KeyValueState,
        now_ms: int,
        *,
        organisation_id: str = "",
        request_id: str = "",
    ) -> list[AlertTransition]:
        """Apply an operator's acknowledge or resolve.

        Refused (LifecycleError, with the reason) when the alert is unknown, of another
        organisation than ``organisation_id`` (when given), already resolved, or, for an
        acknowledge, already acknowledged. The same request (``request_id``) processed
        again changes nothing and is not refused.
        """
        if action not in (ACKNOWLEDGE, RESOLVE):
            raise LifecycleError(f"unknown action {action!r}: {ACKNOWLEDGE} or {RESOLVE}")
        alert = self._operator_alert(alert_id, actor, action, state, organisation_id, request_id)
        if alert is None:
            return []  # this very request was applied before (reprocessing)
        _remember_request(alert, request_id)
        if action == RESOLVE:
            return [self._resolve(alert, actor, note, state, now_ms)]
        if alert["status"] == ACKNOWLEDGED:
            raise LifecycleError(
                f"cannot acknowledge alert {alert_id}: it is already acknowledged by "
                f"{alert.get('acknowledged_by') or 'another operator'}"
            )
        alert["status"] = ACKNOWLEDGED
        alert["acknowledged_by"] = actor
        state.put(_ALERT_PREFIX + alert_id, alert)
        return [self._transition(alert, "acknowledged", actor, note, now_ms, "")]

    def _operator_alert(
        self,
        alert_id: str,
        actor: str,
        action: str,
        state: KeyValueState,
        organisation_id: str,
        request_id: str,
    ) -> dict[str, Any] | None:
        """The alert an action may change (a copy), None when the request was applied already."""
        if not actor.strip():
            raise LifecycleError(f"cannot {action} alert {alert_id}: the actor must be named")
        alert = state.get(_ALERT_PREFIX + alert_id)
        if alert is None:
            raise LifecycleError(
                f"cannot {action} alert {alert_id}: unknown alert (never opened here, or "
                "resolved and forgotten)"
            )
        if organisation_id and organisation_id != alert["organisation_id"]:
            # Checked first, so a refusal tells nothing about another organisation's alert.
            raise LifecycleError(
                f"cannot {action} alert {alert_id}: the action names organisation "
                f"{organisation_id}, which the alert does not belong to"
            )
        if request_id and request_id in alert.get("requests", ()):
            return None
        if alert["status"] == RESOLVED:
            raise LifecycleError(f"cannot {action} alert {alert_id}: it is already resolved")
        return dict(alert)

    # --- recovery ---------------------------------------------------------------------------

    def restore(self, last: AlertTransition, opened_ms: int, state: KeyValueState) -> bool:
        """Adopt an unresolved alert from its last stored transition when this state lacks it.

        For a lifecycle whose changelog is gone: the alert can again be acknowledged,
        resolved, escalated (from ``opened_ms``) and counted. An alert this state knows (in
        any status) is left alone, since the changelog is newer than what storage holds.
        True when adopted.
        """
        if last.status not in RESTORABLE:
            raise LifecycleError(
                f"cannot restore alert {last.alert_id}: status {last.status!r} is not one "
                f"of {', '.join(RESTORABLE)}"
            )
        if state.get(_ALERT_PREFIX + last.alert_id) is not None:
            return False
        alert = {name: getattr(last, name) for name in _ALERT_FIELDS_OF_TRANSITION}
        alert.update(
            opened_ms=opened_ms,
            resolved_ms=None,
            last_update_ms=last.time_ms,
            pending_update=False,
            triggering_event_ids=list(last.triggering_event_ids[:_MAX_TRIGGERING_IDS]),
            # The latest finding's, so that finding processed again is not counted twice.
            fingerprints=[_digest(last.last_event_time_ms, *last.triggering_event_ids)],
            acknowledged_by=last.actor if last.action == "acknowledged" else None,
            requests=[],
        )
        state.put(_ALERT_PREFIX + last.alert_id, alert)
        subject_key = f"{_SUBJECT_PREFIX}{last.rule_id}|{last.subject}"
        if state.get(subject_key) is None:
            # A newer alert of the same rule and subject keeps counting the findings.
            state.put(subject_key, last.alert_id)
        return True

    def _resolve(
        self,
        alert: dict[str, Any],
        actor: str,
        note: str | None,
        state: KeyValueState,
        now_ms: int,
    ) -> AlertTransition:
        alert["status"] = RESOLVED
        alert["resolved_ms"] = now_ms
        alert["pending_update"] = False  # the resolved row carries the final count
        state.put(_ALERT_PREFIX + alert["alert_id"], alert)
        subject_key = f"{_SUBJECT_PREFIX}{alert['rule_id']}|{alert['subject']}"
        if state.get(subject_key) == alert["alert_id"]:
            state.delete(subject_key)
        return self._transition(alert, "resolved", actor, note, now_ms, "")

    # --- time -------------------------------------------------------------------------------

    def tick(self, state: KeyValueState, now_ms: int) -> list[AlertTransition]:
        """Emit throttled updates and escalations that are due; forget old resolved alerts.

        An open alert escalates to the level its age deserves in one transition (a late tick
        does not emit the skipped levels one by one). Scans every alert: call it about once a
        minute.
        """
        transitions: list[AlertTransition] = []
        for key, stored in state.items():
            if not key.startswith(_ALERT_PREFIX):
                continue
            alert = dict(stored)
            if alert["status"] == RESOLVED:
                if now_ms - alert["resolved_ms"] >= self.rules.retain_resolved_ms:
                    state.delete(key)
                continue
            changed = False
            if alert["pending_update"] and (
                now_ms - alert["last_update_ms"] >= self.rules.update_every_ms
            ):
                transitions.append(self._updated(alert, now_ms))
                changed = True
            policy = self.rules.escalation.get(alert["severity"])
            if alert["status"] == OPEN and policy is not None:
                level = policy.level_at(now_ms - alert["opened_ms"])
                if level > alert["escalation_level"]:
                    alert["escalation_level"] = level
                    transitions.append(
                        self._transition(alert, "escalated", SYSTEM_ACTOR, None, now_ms, level)
                    )
                    changed = True
            if changed:
                state.put(key, alert)
        return transitions

    # --- records ----------------------------------------------------------------------------

    @staticmethod
    def _transition(
        alert: dict[str, Any],
        action: str,
        actor: str,
        note: str | None,
        now_ms: int,
        discriminator: object,
    ) -> AlertTransition:
        return AlertTransition(
            transition_id=_digest("transition", alert["alert_id"], action, discriminator),
            alert_id=alert["alert_id"],
            rule_id=alert["rule_id"],
            rule_version=alert["rule_version"],
            subject=alert["subject"],
            organisation_id=alert["organisation_id"],
            person_key=alert["person_key"],
            severity=alert["severity"],
            status=alert["status"],
            action=action,
            actor=actor,
            note=note,
            time_ms=now_ms,
            first_event_time_ms=alert["first_event_time_ms"],
            last_event_time_ms=alert["last_event_time_ms"],
            occurrences=alert["occurrences"],
            escalation_level=alert["escalation_level"],
            triggering_event_ids=tuple(alert["triggering_event_ids"]),
            explanation=alert["explanation"],
        )
