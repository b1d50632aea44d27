"""Bedside and wearable device rules: out-of-range values, frozen sensors, silent devices.

The limits are data (``streams/rules/devices.yaml``, versioned). :class:`DeviceDetector`
reads normalised observation events (one per metric sample; a device packet yields several
with the same ``source_ref``) and keeps one state entry per device under
``device|<device_id>``.

Time: out-of-range and flat-line rules run on EVENT time and only move forward: a sample
whose event time is older than the newest sample already seen for that device and metric
is late and does not change those rules' state (a device alarm is about the device's
current reading). Silence is about ARRIVAL: it compares the newest ``ingest_time`` of a
device with the wall clock passed to :meth:`DeviceDetector.tick`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from pydantic import Field, field_validator, model_validator

from streams.findings import Cleared, Finding, KeyValueState
from streams.model import NonBlank, epoch_ms
from streams.rules_file import (
    FiniteOrNull,
    Severity,
    StrictModel,
    check_limits,
    read_rules_document,
    validate_rules,
)

DEFAULT_DEVICE_RULES_PATH: Final[Path] = Path(__file__).resolve().parent / "rules" / "devices.yaml"

#: Prefix of every state key this detector owns.
STATE_PREFIX: Final = "device|"

OUT_OF_RANGE: Final = "device.out_of_range"
FLAT_LINE: Final = "device.flat_line"
SILENCE: Final = "device.silence"

#: Event ids of a flat run kept for the finding (the first one plus the newest ones).
_MAX_RUN_EVENT_IDS: Final = 10


class DeviceRulesError(ValueError):
    """The device rules file is missing, not YAML, or not of the expected shape."""


@dataclass(frozen=True, slots=True)
class RangeLimit:
    """Alarm limits of one metric (LOINC) in its UCUM unit; a None limit is not checked."""

    metric: str
    display: str
    unit: str
    low: float | None
    high: float | None


@dataclass(frozen=True, slots=True)
class FlatLineRule:
    """How long a physiologically varying metric may stay constant before it looks frozen."""

    metric: str
    display: str
    epsilon: float
    min_samples: int
    min_duration_ms: int


@dataclass(frozen=True, slots=True)
class DeviceRules:
    """A loaded device rules version: limits and flat-line rules by LOINC, silence settings."""

    version: str
    out_of_range_severity: str
    limits: dict[str, RangeLimit]
    flat_line_severity: str
    flat_line: dict[str, FlatLineRule]
    silence_severity: str
    missed_intervals: int
    default_sample_interval_ms: int
    sample_interval_ms: dict[str, int]
    forget_after_ms: int

    def silence_after_ms(self, device_type: str | None) -> int:
        """How long a device of this type may send nothing before it counts as silent."""
        interval = self.sample_interval_ms.get(device_type or "", self.default_sample_interval_ms)
        return self.missed_intervals * interval


# --- loading --------------------------------------------------------------------------------


class _LimitModel(StrictModel):
    metric: NonBlank
    display: NonBlank
    unit: NonBlank
    low: FiniteOrNull
    high: FiniteOrNull

    @model_validator(mode="after")
    def _limits(self) -> _LimitModel:
        check_limits(self.low, self.high)
        return self


class _OutOfRangeModel(StrictModel):
    severity: Severity
    metrics: list[_LimitModel]


class _FlatLineMetricModel(StrictModel):
    metric: NonBlank
    display: NonBlank
    epsilon: float = Field(ge=0)
    min_samples: int = Field(ge=2)
    min_duration_s: int = Field(ge=0)


class _FlatLineModel(StrictModel):
    severity: Severity
    metrics: list[_FlatLineMetricModel]


class _SilenceModel(StrictModel):
    severity: Severity
    missed_intervals: int = Field(ge=1)
    default_sample_interval_s: int = Field(gt=0)
    sample_interval_s: dict[str, int]
    forget_after_hours: float = Field(gt=0)

    @field_validator("sample_interval_s")
    @classmethod
    def _positive(cls, value: dict[str, int]) -> dict[str, int]:
        for device_type, seconds in value.items():
            if seconds <= 0:
                raise ValueError(f"interval of {device_type!r} must be positive")
        return value


class _DeviceRulesModel(StrictModel):
    version: NonBlank
    out_of_range: _OutOfRangeModel
    flat_line: _FlatLineModel
    silence: _SilenceModel

    @model_validator(mode="after")
    def _unique_metrics(self) -> _DeviceRulesModel:
        for section, metrics in (
            ("out_of_range", [m.metric for m in self.out_of_range.metrics]),
            ("flat_line", [m.metric for m in self.flat_line.metrics]),
        ):
            duplicates = sorted({m for m in metrics if metrics.count(m) > 1})
            if duplicates:
                raise ValueError(f"{section}: metric {duplicates[0]!r} is listed more than once")
        longest_silence_s = self.silence.missed_intervals * max(
            [self.silence.default_sample_interval_s, *self.silence.sample_interval_s.values()]
        )
        if self.silence.forget_after_hours * 3600 <= longest_silence_s:
            raise ValueError("silence.forget_after_hours must exceed the longest silence period")
        return self


def device_rules_from_dict(document: Any, source: str = "<dict>") -> DeviceRules:
    """Validate a parsed device rules document; raises DeviceRulesError naming the field."""
    model = validate_rules(_DeviceRulesModel, document, DeviceRulesError, "device rules", source)
    return DeviceRules(
        version=model.version,
        out_of_range_severity=model.out_of_range.severity,
        limits={
            m.metric: RangeLimit(m.metric, m.display, m.unit, m.low, m.high)
            for m in model.out_of_range.metrics
        },
        flat_line_severity=model.flat_line.severity,
        flat_line={
            m.metric: FlatLineRule(
                m.metric, m.display, m.epsilon, m.min_samples, m.min_duration_s * 1000
            )
            for m in model.flat_line.metrics
        },
        silence_severity=model.silence.severity,
        missed_intervals=model.silence.missed_intervals,
        default_sample_interval_ms=model.silence.default_sample_interval_s * 1000,
        sample_interval_ms={k: v * 1000 for k, v in model.silence.sample_interval_s.items()},
        forget_after_ms=round(model.silence.forget_after_hours * 3_600_000),
    )


def load_device_rules(path: Path | str = DEFAULT_DEVICE_RULES_PATH) -> DeviceRules:
    """Read and validate a device rules YAML file; raises DeviceRulesError."""
    path = Path(path)
    document = read_rules_document(path, DeviceRulesError, "device rules")
    return device_rules_from_dict(document, str(path))


# --- detection ------------------------------------------------------------------------------


def _number(value: float) -> str:
    """A value as people write it: 6.9, 120 (no float noise, no trailing .0)."""
    return format(value, ".10g")


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class DeviceDetector:
    """Out-of-range, flat-line and silence rules over device observation events.

    State: one JSON entry per device (``device|<device_id>``) holding its newest arrival,
    silence flag and, per configured metric, the range side and the current constant run
    (a few numbers and at most ``_MAX_RUN_EVENT_IDS`` event ids). It is bounded by the
    number of devices seen in the last ``forget_after_hours``: :meth:`tick` deletes devices
    silent for longer, so :meth:`tick` must run periodically.
    """

    def __init__(self, rules: DeviceRules) -> None:
        """Use one loaded rules version."""
        self.rules = rules

    def observe(
        self, event: dict[str, Any], state: KeyValueState, now_ms: int
    ) -> list[Finding | Cleared]:
        """Findings and clearances caused by one observation event (one metric sample).

        Any observation of a device, mapped or not, counts as an arrival (it ends a silence
        episode); only mapped samples in the rule's unit are checked against limits.
        """
        device_id = event.get("device_id")
        if not device_id:
            return []
        # Two organisations may use the same device id: the state is per organisation.
        key = f"{STATE_PREFIX}{event['organisation_id']}|{device_id}"
        record = state.get(key) or {
            "organisation_id": event["organisation_id"],
            "device_type": event.get("device_type"),
            "last_ingest_ms": None,
            "last_event_id": None,
            "silent": False,
            "metrics": {},
        }
        outcomes: list[Finding | Cleared] = []
        ingest_ms = epoch_ms(event["ingest_time"])
        if record["silent"]:
            outcomes.append(
                Cleared(
                    SILENCE,
                    record["organisation_id"],
                    device_id,
                    ingest_ms,
                    f"device {device_id} sends again (packet received {_utc(ingest_ms)})",
                )
            )
            record["silent"] = False
        if record["last_ingest_ms"] is None or ingest_ms >= record["last_ingest_ms"]:
            record["last_ingest_ms"] = ingest_ms
            record["last_event_id"] = event["event_id"]
            record["organisation_id"] = event["organisation_id"]
            record["device_type"] = event.get("device_type") or record["device_type"]
        outcomes.extend(self._check_sample(event, device_id, record))
        state.put(key, record)
        return outcomes

    def tick(
        self, state: KeyValueState, now_ms: int, watching_since_ms: int = 0
    ) -> list[Finding | Cleared]:
        """Silence findings due at wall-clock ``now_ms``; forgets long-silent devices.

        A forgotten device's open silence alert is left to staff (no clearance is sent).
        Consumer lag looks like silence here: call it with the time up to which the
        device topic has been consumed, or not while the consumer is catching up.
        ``watching_since_ms`` is when this worker started watching (its last rebalance): a
        device is silent only after a whole silence limit of watching, so the platform's own
        downtime (state kept across a restart) raises no alert for every device at once.
        """
        outcomes: list[Finding | Cleared] = []
        for key, record in state.items():
            if not key.startswith(STATE_PREFIX) or record.get("last_ingest_ms") is None:
                continue
            silent_for = now_ms - record["last_ingest_ms"]
            if silent_for >= self.rules.forget_after_ms:
                state.delete(key)
                continue
            limit = self.rules.silence_after_ms(record["device_type"])
            watched_for = now_ms - max(record["last_ingest_ms"], watching_since_ms)
            if record["silent"] or watched_for < limit:
                continue
            device_id = key[len(STATE_PREFIX) :].split("|", 1)[1]
            interval_s = limit // self.rules.missed_intervals // 1000
            outcomes.append(
                Finding(
                    rule_id=SILENCE,
                    rule_version=self.rules.version,
                    severity=self.rules.silence_severity,
                    organisation_id=record["organisation_id"],
                    subject=device_id,
                    event_time_ms=record["last_ingest_ms"] + limit,
                    triggering_event_ids=(record["last_event_id"],),
                    explanation=(
                        f"Device {device_id} ({record['device_type'] or 'unknown type'}) has "
                        f"sent nothing for {silent_for // 1000} s, at least "
                        f"{self.rules.missed_intervals} x its {interval_s} s sample interval "
                        f"(last packet received {_utc(record['last_ingest_ms'])})"
                    ),
                    details={
                        "device_id": device_id,
                        "device_type": record["device_type"],
                        "last_ingest_ms": record["last_ingest_ms"],
                        "silent_for_ms": silent_for,
                        "silence_after_ms": limit,
                    },
                )
            )
            record["silent"] = True
            state.put(key, record)
        return outcomes

    # --- per-sample rules -------------------------------------------------------------------

    def _check_sample(
        self, event: dict[str, Any], device_id: str, record: dict[str, Any]
    ) -> list[Finding | Cleared]:
        metric = event.get("metric_code")
        value = event.get("value")
        limit = self.rules.limits.get(metric or "")
        flat_rule = self.rules.flat_line.get(metric or "")
        if metric is None or value is None or not math.isfinite(value):
            return []
        if limit is None and flat_rule is None:
            return []
        event_ms = epoch_ms(event["event_time"])
        metric_state = record["metrics"].setdefault(
            metric, {"last_ms": None, "last_id": None, "side": None, "run": None, "flat": False}
        )
        if metric_state["last_id"] == event["event_id"]:
            return []  # a redelivered sample must not lengthen a constant run
        if metric_state["last_ms"] is not None and event_ms < metric_state["last_ms"]:
            return []  # late: older than the device's current reading
        metric_state["last_ms"] = event_ms
        metric_state["last_id"] = event["event_id"]
        outcomes: list[Finding | Cleared] = []
        if limit is not None and event.get("unit") == limit.unit:
            outcomes.extend(self._check_range(event, device_id, limit, metric_state, event_ms))
        if flat_rule is not None:
            outcomes.extend(
                self._check_flat(event, device_id, flat_rule, metric_state, event_ms, value)
            )
        return outcomes

    def _check_range(
        self,
        event: dict[str, Any],
        device_id: str,
        limit: RangeLimit,
        metric_state: dict[str, Any],
        event_ms: int,
    ) -> list[Finding | Cleared]:
        value = float(event["value"])
        side: str | None = None
        if limit.low is not None and value < limit.low:
            side, bound = "low", limit.low
        elif limit.high is not None and value > limit.high:
            side, bound = "high", limit.high
        previous = metric_state["side"]
        metric_state["side"] = side
        subject = f"{device_id}|{limit.metric}"
        if side is None:
            if previous is None:
                return []
            reason = f"{limit.display} back in range: {_number(value)} {limit.unit}"
            return [Cleared(OUT_OF_RANGE, event["organisation_id"], subject, event_ms, reason)]
        if previous is not None:
            return []  # still out of range: the open alert stands
        words = "below device alarm low" if side == "low" else "above device alarm high"
        return [
            Finding(
                rule_id=OUT_OF_RANGE,
                rule_version=self.rules.version,
                severity=self.rules.out_of_range_severity,
                organisation_id=event["organisation_id"],
                subject=subject,
                event_time_ms=event_ms,
                triggering_event_ids=(event["event_id"],),
                explanation=(
                    f"{limit.display} {_number(value)} {limit.unit} {words} "
                    f"{_number(bound)} on device {device_id}"
                ),
                person_key=event.get("person_key"),
                analyte_code=limit.metric,
                value=value,
                unit=limit.unit,
                details={"device_id": device_id, "direction": side, "limit": bound},
            )
        ]

    def _check_flat(
        self,
        event: dict[str, Any],
        device_id: str,
        rule: FlatLineRule,
        metric_state: dict[str, Any],
        event_ms: int,
        value: float,
    ) -> list[Finding | Cleared]:
        outcomes: list[Finding | Cleared] = []
        run = metric_state["run"]
        subject = f"{device_id}|{rule.metric}"
        if run is not None and max(run["max"], value) - min(run["min"], value) <= rule.epsilon:
            run["max"] = max(run["max"], value)
            run["min"] = min(run["min"], value)
            run["end_ms"] = event_ms
            run["count"] += 1
            run["ids"] = [*run["ids"], event["event_id"]][-(_MAX_RUN_EVENT_IDS - 1) :]
        else:
            if metric_state["flat"]:
                reason = f"{rule.display} varies again: {_number(value)}"
                outcomes.append(
                    Cleared(FLAT_LINE, event["organisation_id"], subject, event_ms, reason)
                )
                metric_state["flat"] = False
            # A new run starts at this sample (with epsilon > 0, an older suffix that would
            # also fit is not reconstructed: detection may take a little longer).
            run = {
                "start_ms": event_ms,
                "end_ms": event_ms,
                "min": value,
                "max": value,
                "count": 1,
                "first_id": event["event_id"],
                "ids": [],
            }
            metric_state["run"] = run
        duration_ms = run["end_ms"] - run["start_ms"]
        if (
            metric_state["flat"]
            or run["count"] < rule.min_samples
            or duration_ms < rule.min_duration_ms
        ):
            return outcomes
        metric_state["flat"] = True
        spread = run["max"] - run["min"]
        unit = event.get("unit") or ""
        outcomes.append(
            Finding(
                rule_id=FLAT_LINE,
                rule_version=self.rules.version,
                severity=self.rules.flat_line_severity,
                organisation_id=event["organisation_id"],
                subject=subject,
                event_time_ms=event_ms,
                triggering_event_ids=(run["first_id"], *run["ids"]),
                explanation=(
                    f"{rule.display} on device {device_id} has stayed at "
                    f"{_number(run['min'])}"
                    + (f"-{_number(run['max'])}" if spread else "")
                    + f" {unit} for {run['count']} consecutive samples over "
                    f"{duration_ms // 1000} s (limit {rule.min_samples} samples and "
                    f"{rule.min_duration_ms // 1000} s): frozen sensor or detached probe?"
                ),
                person_key=event.get("person_key"),
                analyte_code=rule.metric,
                value=value,
                unit=unit or None,
                details={
                    "device_id": device_id,
                    "samples": run["count"],
                    "duration_ms": duration_ms,
                    "spread": spread,
                },
            )
        )
        return outcomes
