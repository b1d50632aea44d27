"""Critical ("panic") laboratory value detection: the first clinical alert rule.

The thresholds are data (``streams/rules/critical_values.yaml``, versioned). A mapped lab
result whose value lies strictly outside [low, high] in the rule's unit raises one alert;
invalid specimens named by the rule (e.g. haemolysed potassium) never do, and repeats for
the same patient and analyte are suppressed for a window of event time (CLSI GP47 practice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pydantic import field_validator, model_validator

from schemas.numbers import describe_value, parse_censored, read_decimal
from streams.findings import Finding
from streams.model import NonBlank, epoch_ms
from streams.rules_file import (
    FiniteOrNull,
    Severity,
    StrictModel,
    check_limits,
    read_rules_document,
    validate_rules,
)
from streams.units import UnitReader

DEFAULT_CRITICAL_RULES_PATH: Final[Path] = (
    Path(__file__).resolve().parent / "rules" / "critical_values.yaml"
)

#: OBX-11 result statuses that withdraw a result (deleted, cancelled, wrong patient).
WITHDRAWN_RESULT_STATUSES: Final = frozenset({"D", "X", "W"})


class CriticalRulesError(ValueError):
    """The critical value rules file is missing, not YAML, or not of the expected shape."""


@dataclass(frozen=True, slots=True)
class CriticalValueRule:
    """Critical limits of one analyte (LOINC) in one standard unit; a None limit is not checked."""

    rule_id: NonBlank
    loinc: NonBlank
    display: NonBlank
    unit: NonBlank
    low: float | None
    high: float | None
    severity: NonBlank
    exclude_specimen_status: frozenset[str]


@dataclass(frozen=True, slots=True)
class CriticalValueRules:
    """A loaded rules version: the rules by LOINC and the repeat suppression window."""

    version: str
    suppression_ms: int
    rules: dict[str, CriticalValueRule]

    def for_loinc(self, loinc: str | None) -> CriticalValueRule | None:
        """The rule of an analyte, if any."""
        return None if loinc is None else self.rules.get(loinc)


@dataclass(frozen=True, slots=True)
class CriticalFinding:
    """A lab result that crossed a critical limit: which rule, which side, and why."""

    rule: CriticalValueRule
    direction: str  # "low" or "high"
    limit: float
    value: float
    explanation: str


@dataclass(frozen=True, slots=True)
class UnreadableCritical:
    """A result of an analyte that has a critical-value rule, which cannot be checked against
    its limits (value not a number, unit not convertible, bound that may be critical).

    It is never passed silently: it raises a ``critical_value.unreadable`` alert. ``reason``
    says what could not be read and never repeats a text value (it may identify a patient).
    """

    rule: CriticalValueRule
    reason: str


#: The rule id of the alert raised for a result that cannot be checked against its limits.
UNREADABLE_RULE_ID: Final = "critical_value.unreadable"


# --- loading --------------------------------------------------------------------------------


class _RuleModel(StrictModel):
    rule_id: NonBlank
    loinc: NonBlank
    display: NonBlank
    unit: NonBlank
    low: FiniteOrNull
    high: FiniteOrNull
    severity: Severity
    exclude_specimen_status: list[str] = []

    @model_validator(mode="after")
    def _limits(self) -> _RuleModel:
        check_limits(self.low, self.high)
        return self


class _RulesModel(StrictModel):
    version: NonBlank
    suppression_minutes: int
    rules: list[_RuleModel]

    @field_validator("suppression_minutes")
    @classmethod
    def _not_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must not be negative")
        return value

    @model_validator(mode="after")
    def _unique(self) -> _RulesModel:
        for attribute in ("rule_id", "loinc"):
            seen: set[str] = set()
            for rule in self.rules:
                key = getattr(rule, attribute)
                if key in seen:
                    raise ValueError(f"{attribute} {key!r} is used by more than one rule")
                seen.add(key)
        return self


def critical_value_rules_from_dict(document: Any, source: str = "<dict>") -> CriticalValueRules:
    """Validate a parsed rules document and index the rules by LOINC."""
    model = validate_rules(
        _RulesModel, document, CriticalRulesError, "critical value rules", source
    )
    rules = {
        rule.loinc: CriticalValueRule(
            rule.rule_id,
            rule.loinc,
            rule.display,
            rule.unit,
            rule.low,
            rule.high,
            rule.severity,
            frozenset(rule.exclude_specimen_status),
        )
        for rule in model.rules
    }
    return CriticalValueRules(model.version, model.suppression_minutes * 60_000, rules)


def load_critical_value_rules(path: Path | str = DEFAULT_CRITICAL_RULES_PATH) -> CriticalValueRules:
    """Read and validate a critical value rules YAML file; raises CriticalRulesError."""
    path = Path(path)
    document = read_rules_document(path, CriticalRulesError, "critical value rules")
    return critical_value_rules_from_dict(document, str(path))


# --- detection ------------------------------------------------------------------------------


def _number(value: float) -> str:
    """A value as people write it: 6.9, 120, 2.2 (no float noise, no trailing .0)."""
    return format(value, ".10g")


def check_critical(
    lab_result: dict[str, Any], rules: CriticalValueRules, units: UnitReader | None = None
) -> CriticalFinding | UnreadableCritical | None:
    """The critical finding of a LabResult record, an UnreadableCritical, or None.

    A result of an analyte with a rule is read in the rule's unit: as stored when the units
    agree, else converted by ``units`` (meq/L, mg/dL, any case). A value equal to a limit is
    not critical; excluded specimen statuses, withdrawn results (OBX-11 D, X, W) and results
    without any value yet never alert. Everything else that cannot be read against the
    limits (text in place of a number, a unit that does not convert, a bound such as "<5"
    that may or may not be critical) is an UnreadableCritical, never silence.
    """
    rule = rule_for(lab_result.get("loinc_code"), rules, units)
    if rule is None or lab_result.get("mapping_status") not in _CHECKED_STATUSES:
        return None
    if lab_result.get("specimen_status") in rule.exclude_specimen_status:
        return None
    if (lab_result.get("result_status") or "").upper() in WITHDRAWN_RESULT_STATUSES:
        return None
    value = lab_result.get("value")
    unit = lab_result.get("unit") or ""
    comparator = ""
    if value is None:
        text = (lab_result.get("value_text") or lab_result.get("original_value") or "").strip()
        if not text:
            return None  # nothing reported yet
        unit = lab_result.get("original_unit") or ""
        value = read_decimal(text)
        if value is None:
            censored = parse_censored(text)
            if censored is None:
                return UnreadableCritical(
                    rule, f"the value is {describe_value(text)}, not a number"
                )
            comparator, value = censored.comparator, censored.bound
    if not math.isfinite(value):
        return UnreadableCritical(rule, "the value is not a finite number")
    if unit != rule.unit:
        conversion = None if units is None else units.conversion(unit, rule.unit, rule.loinc)
        if conversion is None:
            if not unit:
                return UnreadableCritical(rule, f"no unit was sent (the limits are in {rule.unit})")
            return UnreadableCritical(
                rule, f"unit {unit!r} cannot be converted to {rule.unit} for this analyte"
            )
        value = round(conversion.apply(value), 6)
    direction, limit = _side(rule, comparator, value)
    shown = f"{comparator}{_number(value)} {rule.unit}"
    if direction == "unknown":
        return UnreadableCritical(
            rule, f"reported only as {shown}, which may lie beyond a critical limit"
        )
    if direction is None or limit is None:
        return None
    side = "below critical low" if direction == "low" else "above critical high"
    explanation = f"{rule.display} {shown} {side} {_number(limit)}"
    return CriticalFinding(rule, direction, float(limit), float(value), explanation)


def rule_for(
    loinc: str | None, rules: CriticalValueRules, units: UnitReader | None
) -> CriticalValueRule | None:
    """The rule of a result's LOINC, else of another LOINC of the same analyte: potassium in
    whole blood (6298-4) is judged by the potassium rule (2823-3), glucose in mmol/L
    (14749-6) by the glucose rule, as ``analytes.yaml`` groups the codes."""
    rule = rules.for_loinc(loinc)
    if rule is not None or loinc is None or units is None:
        return rule
    analyte = units.analytes.for_loinc(loinc)
    if analyte is None:
        return None
    return next((r for code in analyte.loinc if (r := rules.for_loinc(code))), None)


# Statuses of a result whose LOINC (and so its rule) is known: a unit the dictionary could
# not convert still names the analyte.
_CHECKED_STATUSES: Final = frozenset({"mapped", "unit_unmapped"})


def _side(
    rule: CriticalValueRule, comparator: str, value: float
) -> tuple[str | None, float | None]:
    """Which critical side a value (or a bound: "<", "<=", ">", ">=") lies on: ("low" or
    "high", limit), (None, None) when it is within the limits, ("unknown", None) when a
    bound leaves both possible."""
    low, high = rule.low, rule.high
    if not comparator:
        if low is not None and value < low:
            return "low", low
        if high is not None and value > high:
            return "high", high
        return None, None
    if comparator in ("<", "<="):
        # The true value lies below the bound (or at it for "<=").
        if low is not None and (value < low or (value == low and comparator == "<")):
            return "low", low
        if low is None and (high is None or value <= high):
            return None, None
        return "unknown", None
    if high is not None and (value > high or (value == high and comparator == ">")):
        return "high", high
    if high is None and (low is None or value >= low):
        return None, None
    return "unknown", None


def suppression_key(lab_result: dict[str, Any]) -> str:
    """The repeat-suppression key: ``person_key|loinc``.

    A result without a person falls back to its organisation and order, so results of
    different unidentified patients never suppress each other.
    """
    person = lab_result.get("person_key")
    if not person:
        person = f"order:{lab_result.get('organisation_id')}:{lab_result.get('order_id')}"
    return f"{person}|{lab_result.get('loinc_code')}"


def is_suppressed(
    last_alert_event_time_ms: int | None, event_time_ms: int, suppression_ms: int
) -> bool:
    """True when an earlier alert for the same key lies less than the window away in event time.

    The window applies on both sides, so late-arriving older results are suppressed too;
    exactly ``suppression_ms`` apart is outside the window.
    """
    if last_alert_event_time_ms is None:
        return False
    return abs(event_time_ms - last_alert_event_time_ms) < suppression_ms


def unreadable_finding(
    lab_result: dict[str, Any], unreadable: UnreadableCritical, rules: CriticalValueRules
) -> Finding:
    """The alert-lifecycle finding of a result that cannot be checked against its critical
    limits: same severity as the analyte's rule, its own subject (so it never suppresses nor
    updates a real critical alert of the same analyte)."""
    rule = unreadable.rule
    return Finding(
        rule_id=UNREADABLE_RULE_ID,
        rule_version=rules.version,
        severity=rule.severity,
        organisation_id=lab_result["organisation_id"],
        subject=unreadable_subject(lab_result),
        event_time_ms=epoch_ms(lab_result["event_time"]),
        triggering_event_ids=(lab_result["event_id"],),
        explanation=(
            f"{rule.display} result cannot be checked against its critical limits: "
            f"{unreadable.reason}; confirm the result with the laboratory"
        ),
        person_key=lab_result.get("person_key") or None,
        analyte_code=rule.loinc,
        details={"rule": rule.rule_id, "reason": unreadable.reason},
    )


def unreadable_subject(lab_result: dict[str, Any]) -> str:
    """The subject (and suppression key) of an unreadable-result alert."""
    return f"{suppression_key(lab_result)}|unreadable"


def critical_finding(
    lab_result: dict[str, Any], finding: CriticalFinding, rules: CriticalValueRules
) -> Finding:
    """The alert-lifecycle finding of a critical lab result: one alert per person and analyte.

    Timestamps of the lab result may be int epoch ms or the aware datetimes an Avro
    decoder returns. The subject falls back to the order when the person is unknown.
    """
    person_key = lab_result.get("person_key")
    return Finding(
        rule_id=finding.rule.rule_id,
        rule_version=rules.version,
        severity=finding.rule.severity,
        organisation_id=lab_result["organisation_id"],
        subject=suppression_key(lab_result),
        event_time_ms=epoch_ms(lab_result["event_time"]),
        triggering_event_ids=(lab_result["event_id"],),
        explanation=finding.explanation,
        person_key=person_key or None,
        analyte_code=finding.rule.loinc,
        value=finding.value,
        unit=finding.rule.unit,
        details={"direction": finding.direction, "limit": finding.limit},
    )
