"""Data quality rules per normalised event kind: completeness, plausibility, timeliness, uniqueness.

The rules are data (``streams/rules/quality.yaml``, versioned). :class:`QualityChecker`
checks one normalised event and returns :class:`QualityIssue` values: an ``error`` means
the event is unusable (the integrator dead-letters it), a ``warning`` means it is stored
and flagged. Issues are about whether data can be true, never about whether a patient is
in danger (that is what critical values and NEWS2 alert on).

Only uniqueness keeps state, under ``quality|dup|<hash of kind and business key>``: the
first event_id, event time and kind of each business key. See :meth:`QualityChecker.prune`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TypeGuard

from pydantic import Field, StrictBool, StrictInt, StrictStr, model_validator

from streams.findings import KeyValueState
from streams.model import NonBlank, epoch_ms
from streams.rules_file import (
    Finite,
    FiniteOrNull,
    StrictModel,
    check_limits,
    read_rules_document,
    validate_rules,
)

DEFAULT_QUALITY_RULES_PATH: Final[Path] = Path(__file__).resolve().parent / "rules" / "quality.yaml"

#: Normalised event kinds the checker knows.
EVENT_KINDS: Final = ("encounter", "diagnosis", "lab_result", "observation", "claim_line")
#: Kinds that are CDC state (later versions replace earlier ones): no uniqueness rule.
CDC_STATE_KINDS: Final = frozenset({"encounter", "diagnosis"})
#: Issue categories.
CATEGORIES: Final = ("completeness", "plausibility", "timeliness", "uniqueness", "consistency")
#: Issue severities: error (unusable, dead-lettered) and warning (stored, flagged).
QUALITY_SEVERITIES: Final = ("error", "warning")

_COMMON_FIELDS: Final = frozenset(
    {
        "event_id",
        "source_kind",
        "source_system",
        "organisation_id",
        "event_time",
        "ingest_time",
        "normalised_time",
        "source_topic",
        "source_partition",
        "source_offset",
        "record_index",
        "record_count",
        "source_ref",
        "mapping_version",
        "person_key",
    }
)

#: Fields of each kind's latest norm schema (a rules file may only name these; the tests keep
#: this list in line with schemas/avro).
EVENT_FIELDS: Final[dict[str, frozenset[str]]] = {
    "encounter": _COMMON_FIELDS
    | {
        "encounter_key",
        "op",
        "is_deleted",
        "version",
        "encounter_class",
        "department_code",
        "department_local",
        "admit_time",
        "discharge_time",
        "birth_year",
        "sex",
        "mapping_status",
        "deceased_time",
    },
    "diagnosis": _COMMON_FIELDS
    | {
        "encounter_key",
        "diagnosis_key",
        "op",
        "is_deleted",
        "version",
        "icd10_code",
        "local_code",
        "local_display",
        "diagnosis_type",
        "mapping_status",
    },
    "lab_result": _COMMON_FIELDS
    | {
        "order_id",
        "loinc_code",
        "local_code",
        "local_display",
        "value",
        "value_text",
        "unit",
        "original_value",
        "original_unit",
        "abnormal_flag",
        "result_status",
        "specimen_status",
        "mapping_status",
        "reference_low",
        "reference_high",
    },
    "observation": _COMMON_FIELDS
    | {
        "device_id",
        "device_type",
        "metric_code",
        "local_code",
        "value",
        "unit",
        "original_unit",
        "mapping_status",
    },
    "claim_line": _COMMON_FIELDS
    | {
        "claim_id",
        "payer_id",
        "line_no",
        "item_code",
        "local_item_code",
        "item_display",
        "quantity",
        "unit_price",
        "amount",
        "service_date",
        "diagnosis_codes",
        "mapping_status",
        "encounter_key",
    },
}

#: The quality score as a ClickHouse expression over the columns ``events``, ``errors`` and
#: ``warnings``, with the weights as query parameters (bind them from the rules file's
#: ``score`` section); :func:`quality_score_sql` renders it with literal weights for DDL.
#: Same formula as :func:`quality_score`.
QUALITY_SCORE_SQL: Final = (
    "CASE WHEN events = 0 THEN 1.0 ELSE greatest(0.0, 1.0 - "
    "(errors * {error_weight:Float64} + warnings * {warning_weight:Float64}) / events) END"
)

TIMELINESS_FUTURE: Final = "quality.timeliness.future"
TIMELINESS_LATE: Final = "quality.timeliness.late"
TIMELINESS_TOO_OLD: Final = "quality.timeliness.too_old"

_DUPLICATE_PREFIX: Final = "quality|dup|"
_MS_PER_SECOND: Final = 1_000
_MS_PER_MINUTE: Final = 60_000
_MS_PER_HOUR: Final = 3_600_000
_MS_PER_DAY: Final = 86_400_000


class QualityRulesError(ValueError):
    """The quality rules file is missing, not YAML, or not of the expected shape."""


# --- the issue ------------------------------------------------------------------------------


def quality_issue_id(event_id: str, rule_id: str, field: str | None) -> str:
    """The id of an issue: one per event, rule and field, so a redelivered event repeats it."""
    text = f"{event_id}|{rule_id}|{field or ''}"
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True)
class QualityIssue:
    """One quality rule one event broke: which rule and version, which field, how bad, and why.

    ``detail`` is readable English with clinical numbers at most, never a value that could
    identify a patient (no names, ids, order or claim numbers).
    """

    issue_id: str
    rule_id: str
    rule_version: str
    event_kind: str
    event_id: str
    organisation_id: str
    source_kind: str
    source_system: str
    field: str | None
    category: str
    severity: str
    detail: str
    event_time_ms: int
    ingest_time_ms: int
    detected_time_ms: int

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"category must be one of {', '.join(CATEGORIES)}")
        if self.severity not in QUALITY_SEVERITIES:
            raise ValueError(f"severity must be one of {', '.join(QUALITY_SEVERITIES)}")

    def as_record(self) -> dict[str, Any]:
        """The issue as a QualityIssue Avro record (quality_issue.v1), timestamps in epoch ms."""
        return {
            "issue_id": self.issue_id,
            "rule_id": self.rule_id,
            "rule_version": self.rule_version,
            "event_kind": self.event_kind,
            "event_id": self.event_id,
            "organisation_id": self.organisation_id,
            "source_kind": self.source_kind,
            "source_system": self.source_system,
            "field": self.field,
            "category": self.category,
            "severity": self.severity,
            "detail": self.detail,
            "event_time": self.event_time_ms,
            "ingest_time": self.ingest_time_ms,
            "detected_time": self.detected_time_ms,
        }


# --- the loaded rules -----------------------------------------------------------------------

ConditionValue = str | bool | int


@dataclass(frozen=True, slots=True)
class Condition:
    """Field -> allowed values; strings compare case-insensitively, booleans only with booleans."""

    values: tuple[tuple[str, tuple[ConditionValue, ...]], ...] = ()

    def holds(self, event: Mapping[str, Any]) -> bool:
        """True when every listed field holds one of its values (an empty condition holds)."""
        return all(_one_of(event.get(name), allowed) for name, allowed in self.values)

    def any_holds(self, event: Mapping[str, Any]) -> bool:
        """True when at least one listed field holds one of its values."""
        return any(_one_of(event.get(name), allowed) for name, allowed in self.values)


@dataclass(frozen=True, slots=True)
class RequiredRule:
    """A clinically required field (or alternatives): met when any one of ``fields`` is present."""

    rule_id: str
    fields: tuple[str, ...]
    severity: str
    when: Condition
    unless: Condition
    if_present: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Band:
    """Closed interval [low, high]; a None bound is open."""

    low: float | None
    high: float | None


@dataclass(frozen=True, slots=True)
class RangeRule:
    """Impossible (error) and implausible (warning) limits of one code in one standard unit."""

    rule_id: str
    code: str
    display: str
    unit: str
    impossible: Band
    implausible: Band | None


@dataclass(frozen=True, slots=True)
class RangeRules:
    """The range rules of one kind: where code, value and unit are, and the rules by code."""

    code_field: str
    value_field: str
    unit_field: str
    unless: Condition
    rules: dict[str, RangeRule]


@dataclass(frozen=True, slots=True)
class OrderRule:
    """Field ``later`` must not be before field ``earlier`` (both timestamps)."""

    rule_id: str
    earlier: str
    later: str
    severity: str
    unless: Condition


@dataclass(frozen=True, slots=True)
class ClaimAmountRules:
    """Severities of the claim line amount rules and the tolerance of amount = quantity x price."""

    quantity_severity: str
    amount_severity: str
    total_severity: str
    absolute_tolerance: float
    relative_tolerance: float


@dataclass(frozen=True, slots=True)
class SourceTimeliness:
    """Timeliness limits of one source kind, in milliseconds."""

    allowed_clock_skew_ms: int
    late_after_ms: int
    max_age_ms: int


@dataclass(frozen=True, slots=True)
class TimelinessRules:
    """Severities, the CDC ops whose lateness is measured, and limits per source kind."""

    future_severity: str
    late_severity: str
    too_old_severity: str
    cdc_lateness_ops: frozenset[str]
    default: SourceTimeliness
    sources: dict[str, SourceTimeliness]

    def for_source(self, source_kind: str) -> SourceTimeliness:
        """The limits of a source kind, or the default ones."""
        return self.sources.get(source_kind, self.default)


#: One business key part: a field, or alternatives of which the first present is used.
KeyPart = str | tuple[str, ...]


@dataclass(frozen=True, slots=True)
class UniquenessRule:
    """The business key of a kind, which parts may be missing, and how long keys are kept."""

    rule_id: str
    key: tuple[KeyPart, ...]
    optional: frozenset[str]
    window_ms: int
    severity: str


@dataclass(frozen=True, slots=True)
class QualityScoreWeights:
    """Cost of an event with an error and of one with only warnings in :func:`quality_score`."""

    error_weight: float
    warning_weight: float


@dataclass(frozen=True, slots=True)
class QualityRules:
    """A loaded quality rules version, indexed by event kind."""

    version: str
    required: dict[str, tuple[RequiredRule, ...]]
    ranges: dict[str, RangeRules]
    order: dict[str, tuple[OrderRule, ...]]
    claim_amounts: ClaimAmountRules
    timeliness: TimelinessRules
    uniqueness: dict[str, UniquenessRule]
    score: QualityScoreWeights


# --- loading --------------------------------------------------------------------------------

_Kind = Literal["encounter", "diagnosis", "lab_result", "observation", "claim_line"]
_Severity = Literal["error", "warning"]
_Name = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
_Values = Annotated[list[StrictBool | StrictInt | StrictStr], Field(min_length=1)]
_Condition = dict[NonBlank, _Values]
_Fields = Annotated[list[NonBlank], Field(min_length=1)]
_Alternatives = Annotated[list[NonBlank], Field(min_length=2)]


class _RequiredModel(StrictModel):
    name: _Name
    fields: _Fields
    severity: _Severity
    when: _Condition = {}
    unless: _Condition = {}
    if_present: list[NonBlank] = []


class _BandModel(StrictModel):
    low: FiniteOrNull = None
    high: FiniteOrNull = None

    @model_validator(mode="after")
    def _bounds(self) -> _BandModel:
        check_limits(self.low, self.high)
        return self


class _RangeModel(StrictModel):
    name: _Name
    code: NonBlank
    display: NonBlank
    unit: NonBlank
    impossible: _BandModel
    implausible: _BandModel | None = None

    @model_validator(mode="after")
    def _nested(self) -> _RangeModel:
        outer, inner = self.impossible, self.implausible
        if inner is None:
            return self
        if outer.low is not None and (inner.low is not None and inner.low < outer.low):
            raise ValueError("implausible.low must not be below impossible.low")
        if outer.high is not None and (inner.high is not None and inner.high > outer.high):
            raise ValueError("implausible.high must not be above impossible.high")
        return self


class _RangeSetModel(StrictModel):
    code_field: NonBlank
    value_field: NonBlank
    unit_field: NonBlank
    unless: _Condition = {}
    rules: list[_RangeModel]

    @model_validator(mode="after")
    def _unique(self) -> _RangeSetModel:
        for attribute in ("name", "code"):
            seen: set[str] = set()
            for rule in self.rules:
                key = getattr(rule, attribute)
                if key in seen:
                    raise ValueError(f"{attribute} {key!r} is used by more than one rule")
                seen.add(key)
        return self


class _OrderModel(StrictModel):
    name: _Name
    earlier: NonBlank
    later: NonBlank
    severity: _Severity
    unless: _Condition = {}


class _SeverityModel(StrictModel):
    severity: _Severity


class _TotalModel(StrictModel):
    severity: _Severity
    absolute_tolerance: Finite = Field(ge=0)
    relative_tolerance: Finite = Field(ge=0)


class _ClaimAmountsModel(StrictModel):
    quantity: _SeverityModel
    amount: _SeverityModel
    total: _TotalModel


class _SourceTimelinessModel(StrictModel):
    allowed_clock_skew_seconds: int = Field(ge=0)
    late_after_minutes: int = Field(gt=0)
    max_age_days: int = Field(gt=0)

    @model_validator(mode="after")
    def _late_before_old(self) -> _SourceTimelinessModel:
        if self.late_after_minutes * _MS_PER_MINUTE >= self.max_age_days * _MS_PER_DAY:
            raise ValueError("late_after_minutes must be shorter than max_age_days")
        return self


class _TimelinessModel(StrictModel):
    future_severity: _Severity
    late_severity: _Severity
    too_old_severity: _Severity
    cdc_lateness_ops: list[Literal["c", "u", "d", "r"]]
    default: _SourceTimelinessModel
    sources: dict[Literal["emr_cdc", "hl7_lab", "device", "claim"], _SourceTimelinessModel]


class _UniquenessModel(StrictModel):
    key: Annotated[list[NonBlank | _Alternatives], Field(min_length=1)]
    optional: list[NonBlank] = []
    duplicate_window_hours: int = Field(gt=0)
    severity: _Severity

    @model_validator(mode="after")
    def _optional_in_key(self) -> _UniquenessModel:
        named = {part for item in self.key for part in ([item] if isinstance(item, str) else item)}
        for name in self.optional:
            if name not in named:
                raise ValueError(f"optional field {name!r} is not part of the key")
        return self


class _ScoreModel(StrictModel):
    error_weight: Finite = Field(ge=0)
    warning_weight: Finite = Field(ge=0)

    @model_validator(mode="after")
    def _warning_lighter(self) -> _ScoreModel:
        if self.warning_weight > self.error_weight:
            raise ValueError("warning_weight must not exceed error_weight")
        return self


class _RulesModel(StrictModel):
    version: NonBlank
    required: dict[_Kind, list[_RequiredModel]]
    ranges: dict[_Kind, _RangeSetModel]
    order: dict[_Kind, list[_OrderModel]]
    claim_amounts: _ClaimAmountsModel
    timeliness: _TimelinessModel
    uniqueness: dict[_Kind, _UniquenessModel]
    score: _ScoreModel

    @model_validator(mode="after")
    def _known_fields(self) -> _RulesModel:
        for kind, uniqueness in self.uniqueness.items():
            if kind in CDC_STATE_KINDS:
                raise ValueError(
                    f"uniqueness.{kind}: {kind} is CDC state (versions replace each other) "
                    "and takes no uniqueness rule"
                )
            for item in uniqueness.key:
                for name in [item] if isinstance(item, str) else item:
                    _check_field(kind, name, f"uniqueness.{kind}.key")
        for kind, rules in self.required.items():
            names: set[str] = set()
            for index, rule in enumerate(rules):
                path = f"required.{kind}.{index}"
                if rule.name in names:
                    raise ValueError(f"{path}.name: {rule.name!r} is used by more than one rule")
                names.add(rule.name)
                for name in [*rule.fields, *rule.if_present, *rule.when, *rule.unless]:
                    _check_field(kind, name, path)
        for kind, range_set in self.ranges.items():
            for name in (range_set.code_field, range_set.value_field, range_set.unit_field):
                _check_field(kind, name, f"ranges.{kind}")
            for name in range_set.unless:
                _check_field(kind, name, f"ranges.{kind}.unless")
        for kind, orders in self.order.items():
            for index, order in enumerate(orders):
                for name in (order.earlier, order.later, *order.unless):
                    _check_field(kind, name, f"order.{kind}.{index}")
        return self


def _check_field(kind: str, name: str, path: str) -> None:
    if name not in EVENT_FIELDS[kind]:
        raise ValueError(f"{path}: {name!r} is not a field of {kind} events")


def _condition(condition: dict[str, list[ConditionValue]]) -> Condition:
    values = []
    for name, allowed in condition.items():
        folded = tuple(v.strip().casefold() if isinstance(v, str) else v for v in allowed)
        values.append((name, folded))
    return Condition(tuple(values))


def _band(model: _BandModel) -> Band:
    return Band(model.low, model.high)


def _source_timeliness(model: _SourceTimelinessModel) -> SourceTimeliness:
    return SourceTimeliness(
        model.allowed_clock_skew_seconds * _MS_PER_SECOND,
        model.late_after_minutes * _MS_PER_MINUTE,
        model.max_age_days * _MS_PER_DAY,
    )


def quality_rules_from_dict(document: Any, source: str = "<dict>") -> QualityRules:
    """Validate a parsed quality rules document; raises QualityRulesError naming the field."""
    model = validate_rules(_RulesModel, document, QualityRulesError, "quality rules", source)
    required: dict[str, tuple[RequiredRule, ...]] = {
        kind: tuple(
            RequiredRule(
                f"quality.required.{kind}.{rule.name}",
                tuple(rule.fields),
                rule.severity,
                _condition(rule.when),
                _condition(rule.unless),
                tuple(rule.if_present),
            )
            for rule in rules
        )
        for kind, rules in model.required.items()
    }
    ranges: dict[str, RangeRules] = {
        kind: RangeRules(
            range_set.code_field,
            range_set.value_field,
            range_set.unit_field,
            _condition(range_set.unless),
            {
                rule.code: RangeRule(
                    f"quality.range.{kind}.{rule.name}",
                    rule.code,
                    rule.display,
                    rule.unit,
                    _band(rule.impossible),
                    None if rule.implausible is None else _band(rule.implausible),
                )
                for rule in range_set.rules
            },
        )
        for kind, range_set in model.ranges.items()
    }
    order: dict[str, tuple[OrderRule, ...]] = {
        kind: tuple(
            OrderRule(
                f"quality.order.{kind}.{rule.name}",
                rule.earlier,
                rule.later,
                rule.severity,
                _condition(rule.unless),
            )
            for rule in rules
        )
        for kind, rules in model.order.items()
    }
    amounts = model.claim_amounts
    timeliness = model.timeliness
    uniqueness: dict[str, UniquenessRule] = {
        kind: UniquenessRule(
            f"quality.duplicate.{kind}",
            tuple(item if isinstance(item, str) else tuple(item) for item in rule.key),
            frozenset(rule.optional),
            rule.duplicate_window_hours * _MS_PER_HOUR,
            rule.severity,
        )
        for kind, rule in model.uniqueness.items()
    }
    return QualityRules(
        version=model.version,
        required=required,
        ranges=ranges,
        order=order,
        claim_amounts=ClaimAmountRules(
            amounts.quantity.severity,
            amounts.amount.severity,
            amounts.total.severity,
            amounts.total.absolute_tolerance,
            amounts.total.relative_tolerance,
        ),
        timeliness=TimelinessRules(
            timeliness.future_severity,
            timeliness.late_severity,
            timeliness.too_old_severity,
            frozenset(timeliness.cdc_lateness_ops),
            _source_timeliness(timeliness.default),
            {kind: _source_timeliness(t) for kind, t in timeliness.sources.items()},
        ),
        uniqueness=uniqueness,
        score=QualityScoreWeights(model.score.error_weight, model.score.warning_weight),
    )


def load_quality_rules(path: Path | str = DEFAULT_QUALITY_RULES_PATH) -> QualityRules:
    """Read and validate a quality rules YAML file; raises QualityRulesError."""
    path = Path(path)
    document = read_rules_document(path, QualityRulesError, "quality rules")
    return quality_rules_from_dict(document, str(path))


# --- small helpers --------------------------------------------------------------------------


def _one_of(value: Any, allowed: tuple[ConditionValue, ...]) -> bool:
    if isinstance(value, str):
        folded = value.strip().casefold()
        return any(isinstance(a, str) and a == folded for a in allowed)
    # bool is an int in Python: True must not match 1, nor 1 match True.
    return any(type(a) is type(value) and a == value for a in allowed)


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, list | tuple):
        return bool(value)
    return True


def _number(value: float) -> str:
    """A value as people write it: 6.9, 120, 2.2 (no float noise, no trailing .0)."""
    return format(value, ".10g")


def _is_number(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _duration(ms: int) -> str:
    """A readable duration, truncated to its two largest units: '3 days 4 h', '25 min'."""
    seconds = abs(ms) // _MS_PER_SECOND
    if seconds < 120:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 120:
        return f"{minutes} min"
    hours = minutes // 60
    if hours < 48:
        return f"{hours} h" + (f" {minutes % 60} min" if minutes % 60 else "")
    return f"{hours // 24} days" + (f" {hours % 24} h" if hours % 24 else "")


def _key_value(value: Any) -> Any:
    """A key part in a form that hashes the same however the event was decoded."""
    if isinstance(value, datetime):
        return epoch_ms(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, str):
        return value.strip()
    return value


# --- checking -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Event:
    """What every issue of one event repeats."""

    kind: str
    event_id: str
    organisation_id: str
    source_kind: str
    source_system: str
    event_time_ms: int
    ingest_time_ms: int
    detected_time_ms: int


class QualityChecker:
    """Checks normalised events against a quality rules version.

    Deterministic per event: timeliness compares the event's own event_time and ingest_time
    (not wall time) and duplicates are judged against the event's ingest time, so a
    reprocessed event yields the same issues with the same ids.
    """

    def __init__(self, rules: QualityRules) -> None:
        self.rules = rules

    def check(
        self,
        kind: str,
        event: dict[str, Any],
        state: KeyValueState,
        now_ms: int,
        *,
        historic: bool = False,
    ) -> list[QualityIssue]:
        """The quality issues of one normalised event of ``kind``, errors and warnings.

        ``historic`` marks a CDC snapshot event (NormalisedEvent.historic): it was in the
        source before the collector started, so it is never late or too old. The event's
        business key is remembered for the duplicate rule only when it has no error (an
        event that is dead-lettered must not make its corrected resend a duplicate). An
        unknown kind is a wiring error and raises ValueError.
        """
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r}; expected one of {EVENT_KINDS}")
        context = _Event(
            kind,
            event["event_id"],
            event["organisation_id"],
            event["source_kind"],
            event["source_system"],
            epoch_ms(event["event_time"]),
            epoch_ms(event["ingest_time"]),
            now_ms,
        )
        issues = self._completeness(context, event)
        issues += self._ranges(context, event)
        issues += self._order(context, event)
        if kind == "claim_line":
            issues += self._claim_amounts(context, event)
        issues += self._timeliness(context, event, historic)
        has_error = any(issue.severity == "error" for issue in issues)
        issues += self._uniqueness(context, event, state, remember=not has_error)
        return issues

    def prune(self, state: KeyValueState, now_ms: int) -> int:
        """Forget remembered business keys whose window has passed; returns how many.

        A key expires once ``now_ms`` is past its event time + the kind's
        ``duplicate_window_hours`` (and keys of kinds without a rule any more at once).
        Call it from a timer (e.g. every few minutes) with the ingest time of the newest
        event processed, not wall time, so that a replay of old data prunes as the first
        run did; a lookup never uses an expired key anyway, so pruning only bounds the
        state. It scans ``state.items()``, O(keys held) per call, never per event.
        """
        removed = 0
        for key, remembered in state.items():
            if not key.startswith(_DUPLICATE_PREFIX):
                continue
            rule = self.rules.uniqueness.get(remembered.get("kind", ""))
            if rule is None or remembered["event_time"] + rule.window_ms < now_ms:
                state.delete(key)
                removed += 1
        return removed

    # --- the rule families ------------------------------------------------------------------

    def _issue(
        self,
        context: _Event,
        rule_id: str,
        field: str | None,
        category: str,
        severity: str,
        detail: str,
    ) -> QualityIssue:
        return QualityIssue(
            issue_id=quality_issue_id(context.event_id, rule_id, field),
            rule_id=rule_id,
            rule_version=self.rules.version,
            event_kind=context.kind,
            event_id=context.event_id,
            organisation_id=context.organisation_id,
            source_kind=context.source_kind,
            source_system=context.source_system,
            field=field,
            category=category,
            severity=severity,
            detail=detail,
            event_time_ms=context.event_time_ms,
            ingest_time_ms=context.ingest_time_ms,
            detected_time_ms=context.detected_time_ms,
        )

    def _completeness(self, context: _Event, event: dict[str, Any]) -> list[QualityIssue]:
        issues = []
        for rule in self.rules.required.get(context.kind, ()):
            if not rule.when.holds(event) or rule.unless.any_holds(event):
                continue
            if not all(_present(event.get(name)) for name in rule.if_present):
                continue
            if any(_present(event.get(name)) for name in rule.fields):
                continue
            missing = " and ".join(rule.fields)
            verb = "are" if len(rule.fields) > 1 else "is"
            detail = f"{context.kind} {missing} {verb} missing"
            if rule.if_present:
                detail += f" while {' and '.join(rule.if_present)} is set"
            issues.append(
                self._issue(
                    context, rule.rule_id, rule.fields[0], "completeness", rule.severity, detail
                )
            )
        return issues

    def _ranges(self, context: _Event, event: dict[str, Any]) -> list[QualityIssue]:
        range_rules = self.rules.ranges.get(context.kind)
        if range_rules is None or range_rules.unless.any_holds(event):
            return []
        rule = range_rules.rules.get(event.get(range_rules.code_field) or "")
        value = event.get(range_rules.value_field)
        if rule is None or not _is_number(value) or event.get(range_rules.unit_field) != rule.unit:
            return []
        field = range_rules.value_field
        if not math.isfinite(value):
            detail = f"{rule.display} value is not a finite number"
            return [self._issue(context, rule.rule_id, field, "plausibility", "error", detail)]
        for band, severity, word in (
            (rule.impossible, "error", "possible"),
            (rule.implausible, "warning", "plausible"),
        ):
            if band is None:
                continue
            if band.low is not None and value < band.low:
                side, limit = f"below the {word} minimum", band.low
            elif band.high is not None and value > band.high:
                side, limit = f"above the {word} maximum", band.high
            else:
                continue
            shown = f"{_number(value)} {rule.unit}"
            detail = f"{rule.display} {shown} is {side} {_number(limit)} {rule.unit}"
            return [self._issue(context, rule.rule_id, field, "plausibility", severity, detail)]
        return []

    def _order(self, context: _Event, event: dict[str, Any]) -> list[QualityIssue]:
        issues = []
        for rule in self.rules.order.get(context.kind, ()):
            if rule.unless.any_holds(event):
                continue
            earlier, later = event.get(rule.earlier), event.get(rule.later)
            if earlier is None or later is None:
                continue
            gap = epoch_ms(earlier) - epoch_ms(later)
            if gap > 0:
                detail = f"{rule.later} is {_duration(gap)} before {rule.earlier}"
                issues.append(
                    self._issue(
                        context, rule.rule_id, rule.later, "plausibility", rule.severity, detail
                    )
                )
        return issues

    def _claim_amounts(self, context: _Event, event: dict[str, Any]) -> list[QualityIssue]:
        amounts = self.rules.claim_amounts
        quantity, unit_price, amount = (event.get(n) for n in ("quantity", "unit_price", "amount"))
        issues = []
        if _is_number(quantity) and not (math.isfinite(quantity) and quantity > 0):
            issues.append(
                self._issue(
                    context,
                    "quality.amount.claim_line.quantity",
                    "quantity",
                    "plausibility",
                    amounts.quantity_severity,
                    f"quantity {_number(quantity)} is not a positive number",
                )
            )
        if _is_number(amount) and not (math.isfinite(amount) and amount >= 0):
            issues.append(
                self._issue(
                    context,
                    "quality.amount.claim_line.amount",
                    "amount",
                    "plausibility",
                    amounts.amount_severity,
                    f"amount {_number(amount)} is negative or not a finite number",
                )
            )
        if issues:
            return issues  # amounts that are themselves wrong say nothing about the total
        if not (_is_number(quantity) and _is_number(unit_price) and _is_number(amount)):
            return issues
        if not math.isfinite(unit_price):
            return issues
        expected = quantity * unit_price
        difference = abs(amount - expected)
        tolerance = max(amounts.absolute_tolerance, amounts.relative_tolerance * abs(expected))
        if difference > tolerance:
            detail = (
                f"amount {_number(amount)} differs from quantity {_number(quantity)} x unit "
                f"price {_number(unit_price)} = {_number(round(expected, 6))} by "
                f"{_number(round(difference, 6))} (tolerance {_number(round(tolerance, 6))})"
            )
            issues.append(
                self._issue(
                    context,
                    "quality.amount.claim_line.total",
                    "amount",
                    "consistency",
                    amounts.total_severity,
                    detail,
                )
            )
        return issues

    def _timeliness(
        self, context: _Event, event: dict[str, Any], historic: bool
    ) -> list[QualityIssue]:
        timeliness = self.rules.timeliness
        limits = timeliness.for_source(context.source_kind)
        lag = context.ingest_time_ms - context.event_time_ms
        if -lag > limits.allowed_clock_skew_ms:
            detail = (
                f"event time is {_duration(-lag)} after ingest time "
                f"(allowed clock skew {_duration(limits.allowed_clock_skew_ms)})"
            )
            return [
                self._issue(
                    context,
                    TIMELINESS_FUTURE,
                    "event_time",
                    "timeliness",
                    timeliness.future_severity,
                    detail,
                )
            ]
        op = event.get("op")
        if historic or (context.kind in CDC_STATE_KINDS and op not in timeliness.cdc_lateness_ops):
            return []
        if lag > limits.max_age_ms:
            rule_id, severity = TIMELINESS_TOO_OLD, timeliness.too_old_severity
            detail = (
                f"event was {_duration(lag)} old at ingest "
                f"(maximum age {limits.max_age_ms // _MS_PER_DAY} days "
                f"for source kind {context.source_kind})"
            )
        elif lag > limits.late_after_ms:
            rule_id, severity = TIMELINESS_LATE, timeliness.late_severity
            detail = (
                f"event arrived {_duration(lag)} after its event time "
                f"(late after {_duration(limits.late_after_ms)} "
                f"for source kind {context.source_kind})"
            )
        else:
            return []
        return [self._issue(context, rule_id, "event_time", "timeliness", severity, detail)]

    def _uniqueness(
        self, context: _Event, event: dict[str, Any], state: KeyValueState, *, remember: bool
    ) -> list[QualityIssue]:
        rule = self.rules.uniqueness.get(context.kind)
        if rule is None:
            return []
        if context.ingest_time_ms - context.event_time_ms > rule.window_ms:
            return []  # arrived after its key could have expired: bounded lateness
        parts: list[Any] = [context.kind]
        for item in rule.key:
            names = (item,) if isinstance(item, str) else item
            found = next((n for n in names if _present(event.get(n))), None)
            if found is None:
                if isinstance(item, str) and item in rule.optional:
                    parts.append(None)
                    continue
                return []  # an incomplete key would match unrelated events
            value = _key_value(event[found])
            parts.append(value if isinstance(item, str) else [found, value])
        digest = hashlib.blake2b(
            json.dumps(parts, separators=(",", ":"), default=str).encode(), digest_size=16
        ).hexdigest()
        state_key = f"{_DUPLICATE_PREFIX}{digest}"
        remembered = state.get(state_key)
        if remembered is not None and (
            context.ingest_time_ms - remembered["event_time"] > rule.window_ms
        ):
            remembered = None  # expired but not yet pruned
        if remembered is None:
            if remember:
                state.put(
                    state_key,
                    {
                        "event_id": context.event_id,
                        "event_time": context.event_time_ms,
                        "kind": context.kind,
                    },
                )
            return []
        if remembered["event_id"] == context.event_id:
            return []  # the same event again: a harmless redelivery
        fields = ", ".join(item if isinstance(item, str) else "/".join(item) for item in rule.key)
        detail = (
            f"duplicate of event {remembered['event_id']}: same business key ({fields}) "
            "under a different event id"
        )
        return [self._issue(context, rule.rule_id, None, "uniqueness", rule.severity, detail)]


# --- the quality score ----------------------------------------------------------------------


def quality_score(events: int, errors: int, warnings: int, weights: QualityScoreWeights) -> float:
    """The quality score of a set of events, in [0, 1]; 1.0 when there are no events.

    ``score = max(0, 1 - (error_weight * errors + warning_weight * warnings) / events)``,
    where ``errors`` counts events with at least one error issue and ``warnings`` events
    with warning issues and no error. :data:`QUALITY_SCORE_SQL` is the same formula.
    """
    if events < 0 or errors < 0 or warnings < 0:
        raise ValueError("events, errors and warnings must not be negative")
    if events == 0:
        return 1.0
    penalty = (weights.error_weight * errors + weights.warning_weight * warnings) / events
    return max(0.0, 1.0 - penalty)


def quality_score_sql(weights: QualityScoreWeights) -> str:
    """:data:`QUALITY_SCORE_SQL` with the weights written in, for views and DDL."""
    # repr of a float always has a decimal point, so no SQL dialect divides as integers.
    return QUALITY_SCORE_SQL.replace(
        "{error_weight:Float64}", repr(float(weights.error_weight))
    ).replace("{warning_weight:Float64}", repr(float(weights.warning_weight)))
