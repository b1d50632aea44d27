"""NEWS2 (National Early Warning Score 2, RCP 2017): scoring as data, and a streaming detector.

The chart is data (``streams/rules/news2.yaml``, versioned): :func:`score_news2` is a pure
function from one set of vital signs to per-parameter sub-scores, a total and a clinical
response level. :class:`News2Detector` keeps each person's latest vital signs (event time,
bounded lateness) and fires ``news2.urgent`` / ``news2.emergency`` when the level rises,
returning :class:`~streams.findings.Cleared` when it falls again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import Field, model_validator

from streams.findings import Cleared, Finding, KeyValueState
from streams.model import NonBlank, epoch_ms
from streams.rules_file import (
    FiniteOrNull,
    Severity,
    StrictModel,
    read_rules_document,
    validate_rules,
)

DEFAULT_NEWS2_RULES_PATH: Final[Path] = Path(__file__).resolve().parent / "rules" / "news2.yaml"

#: The NEWS2 parameters in the order of the RCP chart (and of every explanation).
PARAMETERS: Final = (
    "respiration_rate",
    "spo2",
    "supplemental_oxygen",
    "systolic_bp",
    "pulse",
    "consciousness",
    "temperature",
)

#: Clinical response levels, lowest first.
LEVELS: Final = ("none", "low", "urgent", "emergency")

#: Namespace of every state key this detector writes: ``news2|<person_key>``.
STATE_PREFIX: Final = "news2|"

_MINUTE_MS: Final = 60_000
_DAY_MS: Final = 86_400_000


class News2RulesError(ValueError):
    """The NEWS2 rules file is missing, not YAML, or not of the expected shape."""


class News2InputError(ValueError):
    """A set of vital signs cannot be scored (a required parameter missing, a bad value)."""


# --- loaded rules ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Band:
    """One chart band: charted values in [low, high] (None = open-ended) score ``score``."""

    low: Decimal | None
    high: Decimal | None
    score: int

    def contains(self, charted: Decimal) -> bool:
        """True when a charted value lies in this band (both bounds inclusive)."""
        return (self.low is None or charted >= self.low) and (
            self.high is None or charted <= self.high
        )


@dataclass(frozen=True, slots=True)
class BandedParameter:
    """A measured parameter scored by bands: respiration rate, systolic BP, pulse, temperature."""

    name: str
    display: str
    metric_codes: frozenset[str]
    unit: str
    required: bool
    decimals: int
    bands: tuple[Band, ...]


@dataclass(frozen=True, slots=True)
class Spo2Parameter:
    """Oxygen saturation, scored on scale 1, or on scale 2 with separate bands on air and oxygen."""

    name: str
    display: str
    metric_codes: frozenset[str]
    unit: str
    required: bool
    decimals: int
    scale_1: tuple[Band, ...]
    scale_2_on_air: tuple[Band, ...]
    scale_2_on_oxygen: tuple[Band, ...]


@dataclass(frozen=True, slots=True)
class OxygenParameter:
    """Air or oxygen, recorded as an inhaled oxygen flow rate: above the threshold is oxygen."""

    name: str
    display: str
    metric_codes: frozenset[str]
    unit: str
    required: bool
    assumed_on_oxygen: bool | None
    on_oxygen_when_flow_above: float
    score_on_air: int
    score_on_oxygen: int


@dataclass(frozen=True, slots=True)
class ConsciousnessLevel:
    """One ACVPU level: its numeric code in observation events, letter, label and score."""

    code: int
    letter: str
    label: str
    score: int


@dataclass(frozen=True, slots=True)
class ConsciousnessParameter:
    """Level of consciousness on the ACVPU scale, recorded as a numeric code."""

    name: str
    display: str
    metric_codes: frozenset[str]
    unit: str
    required: bool
    assumed_letter: str | None
    levels: tuple[ConsciousnessLevel, ...]

    def by_letter(self, letter: str) -> ConsciousnessLevel | None:
        """The level of an ACVPU letter (upper case), if any."""
        return next((level for level in self.levels if level.letter == letter), None)

    def by_code(self, code: float) -> ConsciousnessLevel | None:
        """The level of a numeric code as it arrives in an observation value, if any."""
        return next((level for level in self.levels if level.code == code), None)


Parameter = BandedParameter | Spo2Parameter | OxygenParameter | ConsciousnessParameter


@dataclass(frozen=True, slots=True)
class AlertRule:
    """The rule id and severity of a finding raised on entering a response level."""

    rule_id: str
    severity: str


@dataclass(frozen=True, slots=True)
class News2Rules:
    """A loaded NEWS2 rules version: the chart, response thresholds, windows and scale-2 codes."""

    version: str
    window_ms: int
    allowed_lateness_ms: int
    diagnosis_retention_ms: int
    scale_2_icd10_prefixes: tuple[str, ...]
    urgent_total: int
    single_parameter_score: int
    emergency_total: int
    urgent: AlertRule
    emergency: AlertRule
    respiration_rate: BandedParameter
    spo2: Spo2Parameter
    supplemental_oxygen: OxygenParameter
    systolic_bp: BandedParameter
    pulse: BandedParameter
    consciousness: ConsciousnessParameter
    temperature: BandedParameter

    def parameters(self) -> tuple[Parameter, ...]:
        """Every parameter in chart order."""
        return tuple(getattr(self, name) for name in PARAMETERS)

    def parameter_for_code(self, metric_code: str | None) -> Parameter | None:
        """The parameter an observation's metric_code records, if any."""
        if metric_code is None:
            return None
        return next((p for p in self.parameters() if metric_code in p.metric_codes), None)

    def is_scale_2_diagnosis(self, icd10_code: str | None) -> bool:
        """True when an ICD-10 code starts with a scale-2 prefix (case and dots ignored)."""
        if not icd10_code:
            return False
        code = _bare_icd10(icd10_code)
        return any(code.startswith(prefix) for prefix in self.scale_2_icd10_prefixes)


def _bare_icd10(code: str) -> str:
    """An ICD-10 code without dots or spaces, upper case: J96.10 -> J9610."""
    return code.replace(".", "").replace(" ", "").upper()


# --- loading --------------------------------------------------------------------------------


def _decimal(value: float) -> Decimal:
    """A number as written in decimal (repr is the shortest string that round-trips)."""
    return Decimal(repr(float(value)))


def _check_bands(field: str, bands: Sequence[_BandModel], decimals: int) -> None:
    """Bands must cover every charted value exactly once: open ends, contiguous, no overlap."""
    if not bands:
        raise ValueError(f"{field}: at least one band is required")
    step = Decimal(1).scaleb(-decimals)
    if bands[0].min is not None:
        raise ValueError(f"{field}[0]: the first band must have no min (it covers <= max)")
    if bands[-1].max is not None:
        raise ValueError(f"{field}[{len(bands) - 1}]: the last band must have no max (>= min)")
    previous_high: Decimal | None = None
    for index, band in enumerate(bands):
        low = None if band.min is None else _decimal(band.min)
        high = None if band.max is None else _decimal(band.max)
        for bound_name, bound in (("min", low), ("max", high)):
            if bound is not None and bound != bound.quantize(step):
                raise ValueError(
                    f"{field}[{index}].{bound_name}: {bound} has more than {decimals} decimals"
                )
        if 0 < index < len(bands) - 1 and (low is None or high is None):
            raise ValueError(f"{field}[{index}]: a middle band needs both min and max")
        if low is not None and high is not None and low > high:
            raise ValueError(f"{field}[{index}]: min {low} is above max {high}")
        if index > 0:
            expected = None if previous_high is None else previous_high + step
            if low != expected:
                raise ValueError(
                    f"{field}[{index}].min: {low} must be {expected}, one chart step after "
                    f"the previous band's max (no gaps, no overlaps)"
                )
        previous_high = high


class _BandModel(StrictModel):
    min: FiniteOrNull = None
    max: FiniteOrNull = None
    score: int = Field(ge=0, le=3)


class _ParameterModel(StrictModel):
    display: NonBlank
    metric_codes: list[NonBlank] = Field(min_length=1)
    unit: NonBlank
    required: bool


class _BandedModel(_ParameterModel):
    decimals: int = Field(ge=0, le=3)
    bands: list[_BandModel]

    @model_validator(mode="after")
    def _chart(self) -> _BandedModel:
        if not self.required:
            raise ValueError("required must be true: NEWS2 assumes no value for a vital sign")
        _check_bands("bands", self.bands, self.decimals)
        return self


class _Spo2Model(_ParameterModel):
    decimals: int = Field(ge=0, le=3)
    scale_1: list[_BandModel]
    scale_2_on_air: list[_BandModel]
    scale_2_on_oxygen: list[_BandModel]

    @model_validator(mode="after")
    def _chart(self) -> _Spo2Model:
        if not self.required:
            raise ValueError("required must be true: NEWS2 assumes no value for a vital sign")
        _check_bands("scale_1", self.scale_1, self.decimals)
        _check_bands("scale_2_on_air", self.scale_2_on_air, self.decimals)
        _check_bands("scale_2_on_oxygen", self.scale_2_on_oxygen, self.decimals)
        return self


class _OxygenModel(_ParameterModel):
    assumed_when_absent: Literal["air", "oxygen"] | None = None
    on_oxygen_when_flow_above: float = Field(ge=0)
    score_on_air: int = Field(ge=0, le=3)
    score_on_oxygen: int = Field(ge=0, le=3)

    @model_validator(mode="after")
    def _assumption(self) -> _OxygenModel:
        if not self.required and self.assumed_when_absent is None:
            raise ValueError("assumed_when_absent is needed when required is false")
        return self


class _LevelModel(StrictModel):
    code: int = Field(ge=0)
    letter: str = Field(pattern="^[A-Z]$")
    label: NonBlank
    score: int = Field(ge=0, le=3)


class _ConsciousnessModel(_ParameterModel):
    assumed_when_absent: str | None = None
    levels: list[_LevelModel] = Field(min_length=1)

    @model_validator(mode="after")
    def _levels(self) -> _ConsciousnessModel:
        for attribute in ("code", "letter"):
            keys = [getattr(level, attribute) for level in self.levels]
            if len(set(keys)) != len(keys):
                raise ValueError(f"levels: each {attribute} must be used once")
        if not self.required and self.assumed_when_absent is None:
            raise ValueError("assumed_when_absent is needed when required is false")
        letters = {level.letter for level in self.levels}
        if self.assumed_when_absent is not None and self.assumed_when_absent not in letters:
            raise ValueError(f"assumed_when_absent must be one of {', '.join(sorted(letters))}")
        return self


class _ParametersModel(StrictModel):
    respiration_rate: _BandedModel
    spo2: _Spo2Model
    supplemental_oxygen: _OxygenModel
    systolic_bp: _BandedModel
    pulse: _BandedModel
    consciousness: _ConsciousnessModel
    temperature: _BandedModel

    @model_validator(mode="after")
    def _unique_codes(self) -> _ParametersModel:
        seen: dict[str, str] = {}
        for name in PARAMETERS:
            for code in getattr(self, name).metric_codes:
                if code in seen:
                    raise ValueError(f"metric code {code!r} is used by {seen[code]} and {name}")
                seen[code] = name
        return self


class _Scale2Model(StrictModel):
    icd10_prefixes: list[NonBlank]


class _ResponseModel(StrictModel):
    urgent_total: int = Field(ge=1)
    single_parameter_score: int = Field(ge=1, le=3)
    emergency_total: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> _ResponseModel:
        if self.emergency_total <= self.urgent_total:
            raise ValueError("emergency_total must be above urgent_total")
        return self


class _AlertModel(StrictModel):
    rule_id: NonBlank
    severity: Severity


class _AlertsModel(StrictModel):
    urgent: _AlertModel
    emergency: _AlertModel


class _RulesModel(StrictModel):
    version: NonBlank
    window_minutes: int = Field(ge=1)
    allowed_lateness_minutes: int = Field(ge=0)
    diagnosis_retention_days: int = Field(ge=0)
    scale_2: _Scale2Model
    response: _ResponseModel
    alerts: _AlertsModel
    parameters: _ParametersModel


def _bands(models: Sequence[_BandModel]) -> tuple[Band, ...]:
    return tuple(
        Band(
            None if band.min is None else _decimal(band.min),
            None if band.max is None else _decimal(band.max),
            band.score,
        )
        for band in models
    )


def _banded(name: str, model: _BandedModel) -> BandedParameter:
    return BandedParameter(
        name,
        model.display,
        frozenset(model.metric_codes),
        model.unit,
        model.required,
        model.decimals,
        _bands(model.bands),
    )


def news2_rules_from_dict(document: Any, source: str = "<dict>") -> News2Rules:
    """Validate a parsed NEWS2 rules document; raises News2RulesError naming the bad field."""
    model = validate_rules(_RulesModel, document, News2RulesError, "NEWS2 rules", source)
    parameters = model.parameters
    spo2 = parameters.spo2
    oxygen = parameters.supplemental_oxygen
    consciousness = parameters.consciousness
    return News2Rules(
        version=model.version,
        window_ms=model.window_minutes * _MINUTE_MS,
        allowed_lateness_ms=model.allowed_lateness_minutes * _MINUTE_MS,
        diagnosis_retention_ms=model.diagnosis_retention_days * _DAY_MS,
        scale_2_icd10_prefixes=tuple(_bare_icd10(p) for p in model.scale_2.icd10_prefixes),
        urgent_total=model.response.urgent_total,
        single_parameter_score=model.response.single_parameter_score,
        emergency_total=model.response.emergency_total,
        urgent=AlertRule(model.alerts.urgent.rule_id, model.alerts.urgent.severity),
        emergency=AlertRule(model.alerts.emergency.rule_id, model.alerts.emergency.severity),
        respiration_rate=_banded("respiration_rate", parameters.respiration_rate),
        spo2=Spo2Parameter(
            "spo2",
            spo2.display,
            frozenset(spo2.metric_codes),
            spo2.unit,
            spo2.required,
            spo2.decimals,
            _bands(spo2.scale_1),
            _bands(spo2.scale_2_on_air),
            _bands(spo2.scale_2_on_oxygen),
        ),
        supplemental_oxygen=OxygenParameter(
            "supplemental_oxygen",
            oxygen.display,
            frozenset(oxygen.metric_codes),
            oxygen.unit,
            oxygen.required,
            None if oxygen.assumed_when_absent is None else oxygen.assumed_when_absent == "oxygen",
            oxygen.on_oxygen_when_flow_above,
            oxygen.score_on_air,
            oxygen.score_on_oxygen,
        ),
        systolic_bp=_banded("systolic_bp", parameters.systolic_bp),
        pulse=_banded("pulse", parameters.pulse),
        consciousness=ConsciousnessParameter(
            "consciousness",
            consciousness.display,
            frozenset(consciousness.metric_codes),
            consciousness.unit,
            consciousness.required,
            consciousness.assumed_when_absent,
            tuple(
                ConsciousnessLevel(level.code, level.letter, level.label, level.score)
                for level in consciousness.levels
            ),
        ),
        temperature=_banded("temperature", parameters.temperature),
    )


def load_news2_rules(path: Path | str = DEFAULT_NEWS2_RULES_PATH) -> News2Rules:
    """Read and validate a NEWS2 rules YAML file; raises News2RulesError."""
    path = Path(path)
    document = read_rules_document(path, News2RulesError, "NEWS2 rules")
    return news2_rules_from_dict(document, str(path))


# --- scoring --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Vitals:
    """One set of observations to score; None means not recorded.

    Values are in the rules' units (/min, %, mm[Hg], Cel). ``supplemental_oxygen`` is True
    on oxygen, False on air; ``consciousness`` is an ACVPU letter. ``spo2_scale`` is 1, or 2
    for hypercapnic respiratory failure.
    """

    respiration_rate: float | None = None
    spo2: float | None = None
    supplemental_oxygen: bool | None = None
    systolic_bp: float | None = None
    pulse: float | None = None
    consciousness: str | None = None
    temperature: float | None = None
    spo2_scale: int = 1


@dataclass(frozen=True, slots=True)
class ParameterScore:
    """The sub-score of one parameter, with the value it came from and how it reads."""

    parameter: str
    score: int
    value: float | str
    assumed: bool
    text: str


@dataclass(frozen=True, slots=True)
class News2Score:
    """A scored set of vital signs: sub-scores in chart order, total, response level and why."""

    parameters: tuple[ParameterScore, ...]
    total: int
    any_single_parameter_3: bool
    level: str
    spo2_scale: int
    explanation: str

    @property
    def sub_scores(self) -> dict[str, int]:
        """Parameter name -> sub-score, in chart order."""
        return {p.parameter: p.score for p in self.parameters}


def _number(value: float | Decimal) -> str:
    """A value as people write it: 38.3, 120, 0.5 (no float noise, no trailing .0)."""
    return format(float(value), ".10g")


def chart_value(value: float, decimals: int) -> Decimal:
    """A measured value as charted: rounded half-up to ``decimals`` places as written in decimal.

    35.05 -> 35.1 and 35.04 -> 35.0 at one decimal; 20.5 -> 21 at none. Every charted value
    then falls in exactly one band of a validated chart.
    """
    return _decimal(value).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)


def _shown(measured: float, charted: Decimal, unit: str) -> str:
    """A measured value with its unit, and the charted value when rounding changed it."""
    if _decimal(measured) == charted:
        return f"{charted} {unit}"
    return f"{_number(measured)} {unit} (charted {charted})"


def _band_score(bands: tuple[Band, ...], charted: Decimal) -> int:
    for band in bands:
        if band.contains(charted):
            return band.score
    # Unreachable with validated rules: the bands cover every charted value.
    raise News2InputError(f"no band holds the charted value {charted}")


def _measured(value: float | None, name: str) -> float:
    if value is None:
        raise News2InputError(f"{name} is required but was not recorded")
    if isinstance(value, bool) or not math.isfinite(value):
        raise News2InputError(f"{name} must be a finite number")
    return float(value)


def _banded_score(parameter: BandedParameter, value: float | None) -> ParameterScore:
    measured = _measured(value, parameter.name)
    charted = chart_value(measured, parameter.decimals)
    score = _band_score(parameter.bands, charted)
    text = f"{parameter.display} {_shown(measured, charted, parameter.unit)} -> {score}"
    return ParameterScore(parameter.name, score, measured, False, text)


def _spo2_score(
    parameter: Spo2Parameter, value: float | None, scale: int, on_oxygen: bool
) -> ParameterScore:
    measured = _measured(value, parameter.name)
    charted = chart_value(measured, parameter.decimals)
    if scale == 1:
        bands, scale_text = parameter.scale_1, "scale 1"
    elif on_oxygen:
        bands, scale_text = parameter.scale_2_on_oxygen, "scale 2, on oxygen"
    else:
        bands, scale_text = parameter.scale_2_on_air, "scale 2, on air"
    score = _band_score(bands, charted)
    shown = _shown(measured, charted, parameter.unit)
    text = f"{parameter.display} ({scale_text}) {shown} -> {score}"
    return ParameterScore(parameter.name, score, measured, False, text)


def _oxygen_score(
    parameter: OxygenParameter, on_oxygen: bool | None
) -> tuple[bool, ParameterScore]:
    assumed = on_oxygen is None
    if on_oxygen is None:
        if parameter.assumed_on_oxygen is None:
            raise News2InputError(f"{parameter.name} is required but was not recorded")
        on_oxygen = parameter.assumed_on_oxygen
    score = parameter.score_on_oxygen if on_oxygen else parameter.score_on_air
    reading = "oxygen" if on_oxygen else "air"
    note = " (assumed, not recorded)" if assumed else ""
    text = f"{parameter.display}: {reading}{note} -> {score}"
    return on_oxygen, ParameterScore(parameter.name, score, reading, assumed, text)


def _consciousness_score(parameter: ConsciousnessParameter, letter: str | None) -> ParameterScore:
    assumed = letter is None
    if letter is None:
        if parameter.assumed_letter is None:
            raise News2InputError(f"{parameter.name} is required but was not recorded")
        letter = parameter.assumed_letter
    level = parameter.by_letter(letter.upper())
    if level is None:
        known = ", ".join(level.letter for level in parameter.levels)
        raise News2InputError(f"{parameter.name} must be one of {known}")
    note = " (assumed, not recorded)" if assumed else ""
    text = f"{parameter.display}: {level.label} ({level.letter}){note} -> {level.score}"
    return ParameterScore(parameter.name, level.score, level.letter, assumed, text)


def response_level(total: int, any_single_3: bool, rules: News2Rules) -> str:
    """The clinical response level: none (0), low, urgent (>=5 or a single 3) or emergency."""
    if total >= rules.emergency_total:
        return "emergency"
    if total >= rules.urgent_total or any_single_3:
        return "urgent"
    return "low" if total > 0 else "none"


def _level_reason(score_total: int, any_single_3: bool, level: str, rules: News2Rules) -> str:
    if level == "emergency":
        return f"emergency: total {score_total} >= {rules.emergency_total}"
    if level == "urgent":
        if score_total >= rules.urgent_total:
            return f"urgent: total {score_total} >= {rules.urgent_total}"
        return f"urgent: a single parameter scored {rules.single_parameter_score}"
    return f"{level}: total {score_total}"


def score_news2(vitals: Vitals, rules: News2Rules) -> News2Score:
    """Score one set of vital signs on the NEWS2 chart; raises News2InputError if it cannot.

    Each measured value is charted (rounded half-up to the chart's resolution) before its
    band is looked up; oxygen and consciousness fall back to the rules' assumed values and
    the explanation says so.
    """
    if vitals.spo2_scale not in (1, 2):
        raise News2InputError("spo2_scale must be 1 or 2")
    on_oxygen, oxygen = _oxygen_score(rules.supplemental_oxygen, vitals.supplemental_oxygen)
    scores = (
        _banded_score(rules.respiration_rate, vitals.respiration_rate),
        _spo2_score(rules.spo2, vitals.spo2, vitals.spo2_scale, on_oxygen),
        oxygen,
        _banded_score(rules.systolic_bp, vitals.systolic_bp),
        _banded_score(rules.pulse, vitals.pulse),
        _consciousness_score(rules.consciousness, vitals.consciousness),
        _banded_score(rules.temperature, vitals.temperature),
    )
    total = sum(p.score for p in scores)
    any_single_3 = any(p.score >= rules.single_parameter_score for p in scores)
    level = response_level(total, any_single_3, rules)
    reason = _level_reason(total, any_single_3, level, rules)
    explanation = f"NEWS2 {total} ({reason}); " + "; ".join(p.text for p in scores)
    return News2Score(scores, total, any_single_3, level, vitals.spo2_scale, explanation)


# --- detection ------------------------------------------------------------------------------


def _empty_record(organisation_id: str) -> dict[str, Any]:
    return {
        "organisation_id": organisation_id,
        "newest_ms": None,
        "last_seen_ms": None,
        "vitals": {},
        "level": None,
        "open": [],
        "diagnoses": {},
    }


def _copy_record(stored: dict[str, Any]) -> dict[str, Any]:
    """A copy to change: the state store may hand out its own objects."""
    return {
        **stored,
        "vitals": {name: dict(entry) for name, entry in stored["vitals"].items()},
        "open": list(stored["open"]),
        "diagnoses": {key: dict(entry) for key, entry in stored["diagnoses"].items()},
    }


def _later(first: int | None, second: int) -> int:
    return second if first is None else max(first, second)


class News2Detector:
    """Per person, the latest vital signs on event time; fires when the NEWS2 level rises.

    State: one JSON record per person under ``news2|<person_key>`` holding the latest value
    of each parameter (value, event time, event id) within the window, the last level, the
    alerts open, and the person's scale-2 diagnoses. A vital-sign event older than the
    person's newest minus ``allowed_lateness`` is not used and counted in ``late_events``;
    values that fall out of the window are dropped on each event, and :meth:`tick` drops a
    person's vital signs once their newest event is older than window + lateness and their
    diagnoses once nothing was seen of them for ``diagnosis_retention``.
    Events the rule cannot use (no person, unmapped code, no value, another unit, an
    impossible code) are counted in ``ignored_events``.
    """

    def __init__(self, rules: News2Rules) -> None:
        self.rules = rules
        self.late_events = 0
        self.ignored_events = 0

    # -- events ---------------------------------------------------------------------------

    def observe(
        self, event: dict[str, Any], state: KeyValueState, now_ms: int
    ) -> list[Finding | Cleared]:
        """Take in one normalised observation or diagnosis event; findings when the level rises.

        Other event kinds are not for this rule and return nothing.
        """
        if "icd10_code" in event:
            return self._observe_diagnosis(event, state)
        if "metric_code" in event:
            return self._observe_vital_sign(event, state)
        return []

    def _observe_vital_sign(
        self, event: dict[str, Any], state: KeyValueState
    ) -> list[Finding | Cleared]:
        person_key = event.get("person_key")
        parameter = self.rules.parameter_for_code(event.get("metric_code"))
        value = event.get("value")
        if (
            not person_key
            or parameter is None
            or value is None
            or isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or event.get("unit") != parameter.unit
            or not self._plausible(parameter, float(value))
        ):
            self.ignored_events += 1
            return []
        event_ms = epoch_ms(event["event_time"])
        key = STATE_PREFIX + person_key
        stored = state.get(key)
        record = (
            _copy_record(stored) if stored is not None else _empty_record(event["organisation_id"])
        )
        newest = record["newest_ms"]
        if newest is not None and event_ms < newest - self.rules.allowed_lateness_ms:
            self.late_events += 1
            return []
        held = record["vitals"].get(parameter.name)
        if held is not None and event_ms <= held["time_ms"]:
            # Not newer than the value held (an out-of-order older value, or a redelivery).
            return []
        record["vitals"][parameter.name] = {
            "value": float(value),
            "time_ms": event_ms,
            "event_id": event["event_id"],
        }
        if newest is None or event_ms >= newest:
            record["organisation_id"] = event["organisation_id"]
        record["newest_ms"] = _later(newest, event_ms)
        record["last_seen_ms"] = _later(record["last_seen_ms"], event_ms)
        horizon = record["newest_ms"] - self.rules.window_ms
        record["vitals"] = {
            name: entry for name, entry in record["vitals"].items() if entry["time_ms"] >= horizon
        }
        outcomes = self._evaluate(person_key, record)
        state.put(key, record)
        return outcomes

    def _plausible(self, parameter: Parameter, value: float) -> bool:
        if isinstance(parameter, OxygenParameter):
            return value >= 0
        if isinstance(parameter, ConsciousnessParameter):
            return parameter.by_code(value) is not None
        return True

    def _observe_diagnosis(
        self, event: dict[str, Any], state: KeyValueState
    ) -> list[Finding | Cleared]:
        """A scale-2 diagnosis puts a person on SpO2 scale 2; its deletion or recoding undoes it.

        Diagnoses are facts about the person, not time-windowed readings: they are not
        subject to lateness, but an event with a lower CDC ``version`` than the one held
        for the same diagnosis_key is stale and ignored.
        """
        person_key = event.get("person_key")
        if not person_key:
            self.ignored_events += 1
            return []
        deleted = bool(event.get("is_deleted")) or event.get("op") == "d"
        qualifies = not deleted and self.rules.is_scale_2_diagnosis(event.get("icd10_code"))
        diagnosis_key = str(event.get("diagnosis_key") or event["event_id"])
        key = STATE_PREFIX + person_key
        stored = state.get(key)
        if stored is None and not qualifies:
            return []
        record = (
            _copy_record(stored) if stored is not None else _empty_record(event["organisation_id"])
        )
        held = record["diagnoses"].get(diagnosis_key)
        if held is None and not qualifies:
            return []
        version = event.get("version")
        if held is not None and version is not None and held["version"] is not None:
            if version < held["version"]:
                return []
        was_scale_2 = self._scale(record) == 2
        event_ms = epoch_ms(event["event_time"])
        # A non-qualifying entry is kept as a tombstone, so an older create arriving after
        # its delete cannot bring scale 2 back; retention prunes it.
        record["diagnoses"][diagnosis_key] = {
            "qualifies": qualifies,
            "version": version,
            "event_id": event["event_id"],
            "time_ms": event_ms,
        }
        record["last_seen_ms"] = _later(record["last_seen_ms"], event_ms)
        outcomes: list[Finding | Cleared] = []
        if was_scale_2 != (self._scale(record) == 2) and record["newest_ms"] is not None:
            outcomes = self._evaluate(person_key, record)
        state.put(key, record)
        return outcomes

    # -- evaluation -----------------------------------------------------------------------

    @staticmethod
    def _scale(record: dict[str, Any]) -> int:
        return 2 if any(d["qualifies"] for d in record["diagnoses"].values()) else 1

    def _vitals(self, record: dict[str, Any]) -> Vitals | None:
        """The set of vital signs within the window, or None when a required one is missing."""
        horizon = record["newest_ms"] - self.rules.window_ms
        values = {
            name: entry["value"]
            for name, entry in record["vitals"].items()
            if entry["time_ms"] >= horizon
        }
        for parameter in self.rules.parameters():
            if parameter.required and parameter.name not in values:
                return None
        flow = values.get("supplemental_oxygen")
        code = values.get("consciousness")
        level = None if code is None else self.rules.consciousness.by_code(code)
        return Vitals(
            respiration_rate=values.get("respiration_rate"),
            spo2=values.get("spo2"),
            supplemental_oxygen=(
                None
                if flow is None
                else flow > self.rules.supplemental_oxygen.on_oxygen_when_flow_above
            ),
            systolic_bp=values.get("systolic_bp"),
            pulse=values.get("pulse"),
            consciousness=None if level is None else level.letter,
            temperature=values.get("temperature"),
            spo2_scale=self._scale(record),
        )

    def _evaluate(self, person_key: str, record: dict[str, Any]) -> list[Finding | Cleared]:
        """Score the person's current set and turn a change of level into findings.

        An incomplete set changes nothing: the level (and any open alert) stays until a
        complete set shows otherwise.
        """
        vitals = self._vitals(record)
        if vitals is None:
            return []
        score = score_news2(vitals, self.rules)
        previous = record["level"]
        record["level"] = score.level
        open_rules: list[str] = record["open"]
        urgent, emergency = self.rules.urgent, self.rules.emergency
        subject = f"{person_key}|news2"
        time_ms = record["newest_ms"]
        outcomes: list[Finding | Cleared] = []
        still_open = {
            emergency.rule_id: score.level == "emergency",
            urgent.rule_id: score.level in ("urgent", "emergency"),
        }
        for rule_id, holds in still_open.items():
            if rule_id in open_rules and not holds:
                open_rules.remove(rule_id)
                reason = f"NEWS2 level fell from {previous} to {score.level}. {score.explanation}"
                organisation_id = record["organisation_id"]
                outcomes.append(Cleared(rule_id, organisation_id, subject, time_ms, reason))
        entering = {"emergency": emergency, "urgent": urgent}.get(score.level)
        # Edge-triggered: one finding per rise into a level. Falling from emergency to
        # urgent raises news2.urgent only if it is not already open from the way up.
        if entering is not None and entering.rule_id not in open_rules:
            open_rules.append(entering.rule_id)
            outcomes.append(
                Finding(
                    rule_id=entering.rule_id,
                    rule_version=self.rules.version,
                    severity=entering.severity,
                    organisation_id=record["organisation_id"],
                    subject=subject,
                    event_time_ms=time_ms,
                    triggering_event_ids=self._evidence(record),
                    explanation=score.explanation,
                    person_key=person_key,
                    value=float(score.total),
                    details=score.sub_scores,
                )
            )
        return outcomes

    def _evidence(self, record: dict[str, Any]) -> tuple[str, ...]:
        """Event ids of the values scored, in chart order, then of any scale-2 diagnosis."""
        horizon = record["newest_ms"] - self.rules.window_ms
        ids = [
            record["vitals"][name]["event_id"]
            for name in PARAMETERS
            if name in record["vitals"] and record["vitals"][name]["time_ms"] >= horizon
        ]
        ids += [d["event_id"] for d in record["diagnoses"].values() if d["qualifies"]]
        return tuple(ids)

    # -- time -----------------------------------------------------------------------------

    def tick(self, state: KeyValueState, now_ms: int) -> list[Finding | Cleared]:
        """Bound the state: forget stale vital signs and diagnoses; NEWS2 never fires on silence.

        A person's vital signs (and level) go once their newest event is older than
        window + lateness before ``now_ms``; their diagnoses once nothing of them was seen
        for ``diagnosis_retention``; the record goes when both are gone.
        """
        vitals_horizon = now_ms - self.rules.window_ms - self.rules.allowed_lateness_ms
        diagnosis_horizon = now_ms - self.rules.diagnosis_retention_ms
        for key, stored in state.items():
            if not key.startswith(STATE_PREFIX) or not isinstance(stored, dict):
                continue
            record = _copy_record(stored)
            changed = False
            if record["newest_ms"] is not None and record["newest_ms"] < vitals_horizon:
                record.update(newest_ms=None, vitals={}, level=None, open=[])
                changed = True
            if record["diagnoses"] and record["last_seen_ms"] < diagnosis_horizon:
                record["diagnoses"] = {}
                changed = True
            if record["newest_ms"] is None and not record["diagnoses"]:
                state.delete(key)
            elif changed:
                state.put(key, record)
        return []
