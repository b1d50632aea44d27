"""Insurance claim anomaly rules: duplicates, cost outliers, services after death or outside visits.

The thresholds are data (``streams/rules/claims.yaml``, versioned). :class:`ClaimDetector`
reads ``claim_line`` events and ``encounter`` events (for visit spans and deaths) of the
same partition, keyed by person_key, and keeps only bounded JSON state:

- ``claims|person|<person_key>``: the person's recent claim lines (pruned when their
  ingest_time is more than ``duplicate_window_days`` behind the person's newest ingest
  time, capped at ``max_lines_per_person``), known encounter spans (pruned after
  ``encounter_retention_days``, capped at ``max_encounters_per_person``) and a known death
  (kept ``death_retention_days``). :meth:`ClaimDetector.tick` drops idle persons.
- ``claims|price|<organisation_id>|<item_code>``: the last ``window_size`` unit prices.

Rule ids are ``claims.exact_duplicate``, ``claims.near_duplicate``, ``claims.cost_outlier``,
``claims.after_death`` and ``claims.outside_encounter``. A finding's subject is the claim
line: ``<payer_id>:<claim_id>|<line_no>`` (claim ids are unique per payer only).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Final

from pydantic import Field

from streams.findings import Finding, KeyValueState
from streams.model import NonBlank, as_date, epoch_ms
from streams.rules_file import Severity, StrictModel, read_rules_document, validate_rules

DEFAULT_CLAIM_RULES_PATH: Final[Path] = Path(__file__).resolve().parent / "rules" / "claims.yaml"

EXACT_DUPLICATE: Final = "claims.exact_duplicate"
NEAR_DUPLICATE: Final = "claims.near_duplicate"
COST_OUTLIER: Final = "claims.cost_outlier"
AFTER_DEATH: Final = "claims.after_death"
OUTSIDE_ENCOUNTER: Final = "claims.outside_encounter"

_PERSON_PREFIX: Final = "claims|person|"
_PRICE_PREFIX: Final = "claims|price|"
_MS_PER_DAY: Final = 86_400_000
_EPOCH_DATE: Final = date(1970, 1, 1)
#: Consistency constant of the modified z-score: 0.6745 = Phi^-1(0.75) (Iglewicz, Hoaglin 1993).
_MAD_SCALE: Final = 0.6745
#: Fallback when MAD is 0: (x - median) / (1.253314 * MeanAD); 1.253314 = sqrt(pi/2) makes the
#: mean absolute deviation estimate the standard deviation of a normal sample (IBM SPSS).
_MEAN_AD_SCALE: Final = 1.253314
#: At most this many earlier lines are named as evidence of one duplicate finding.
_MAX_EVIDENCE: Final = 5


class ClaimRulesError(ValueError):
    """The claim rules file is missing, not YAML, or not of the expected shape."""


@dataclass(frozen=True, slots=True)
class ClaimRules:
    """A loaded claim rules version: one severity and its thresholds per rule, and state caps."""

    version: str
    severities: dict[str, str]
    duplicate_window_days: int
    near_days: int
    near_amount_pct: float
    window_size: int
    min_samples: int
    z_threshold: float
    flat_tolerance_pct: float
    death_retention_days: int
    grace_days: int
    encounter_retention_days: int
    max_lines_per_person: int
    max_encounters_per_person: int


# --- loading --------------------------------------------------------------------------------


class _Strict(StrictModel):
    severity: Severity


class _ExactModel(_Strict):
    duplicate_window_days: int = Field(ge=1)


class _NearModel(_Strict):
    near_days: int = Field(ge=0)
    near_amount_pct: float = Field(ge=0, le=100)


class _OutlierModel(_Strict):
    window_size: int = Field(ge=3)
    min_samples: int = Field(ge=3)
    z_threshold: float = Field(gt=0)
    flat_tolerance_pct: float = Field(ge=0)


class _DeathModel(_Strict):
    death_retention_days: int = Field(ge=1)


class _EncounterModel(_Strict):
    grace_days: int = Field(ge=0)
    encounter_retention_days: int = Field(ge=1)


class _StateModel(StrictModel):
    max_lines_per_person: int = Field(ge=1)
    max_encounters_per_person: int = Field(ge=1)


class _RulesModel(StrictModel):
    version: NonBlank
    exact_duplicate: _ExactModel
    near_duplicate: _NearModel
    cost_outlier: _OutlierModel
    after_death: _DeathModel
    outside_encounter: _EncounterModel
    state: _StateModel


def claim_rules_from_dict(document: Any, source: str = "<dict>") -> ClaimRules:
    """Validate a parsed claim rules document; raises ClaimRulesError naming each bad field."""
    model = validate_rules(_RulesModel, document, ClaimRulesError, "claim rules", source)
    outlier = model.cost_outlier
    if outlier.min_samples > outlier.window_size:
        raise ClaimRulesError(
            f"{source}: invalid claim rules:\n  cost_outlier.min_samples: must not exceed "
            f"window_size ({outlier.window_size})"
        )
    return ClaimRules(
        version=model.version,
        severities={
            EXACT_DUPLICATE: model.exact_duplicate.severity,
            NEAR_DUPLICATE: model.near_duplicate.severity,
            COST_OUTLIER: outlier.severity,
            AFTER_DEATH: model.after_death.severity,
            OUTSIDE_ENCOUNTER: model.outside_encounter.severity,
        },
        duplicate_window_days=model.exact_duplicate.duplicate_window_days,
        near_days=model.near_duplicate.near_days,
        near_amount_pct=model.near_duplicate.near_amount_pct,
        window_size=outlier.window_size,
        min_samples=outlier.min_samples,
        z_threshold=outlier.z_threshold,
        flat_tolerance_pct=outlier.flat_tolerance_pct,
        death_retention_days=model.after_death.death_retention_days,
        grace_days=model.outside_encounter.grace_days,
        encounter_retention_days=model.outside_encounter.encounter_retention_days,
        max_lines_per_person=model.state.max_lines_per_person,
        max_encounters_per_person=model.state.max_encounters_per_person,
    )


def load_claim_rules(path: Path | str = DEFAULT_CLAIM_RULES_PATH) -> ClaimRules:
    """Read and validate a claim rules YAML file; raises ClaimRulesError."""
    path = Path(path)
    document = read_rules_document(path, ClaimRulesError, "claim rules")
    return claim_rules_from_dict(document, str(path))


# --- helpers --------------------------------------------------------------------------------


def _number(value: float) -> str:
    """A value as people write it: 6.9, 120, 2.2 (no float noise, no trailing .0)."""
    return format(value, ".10g")


def _day_text(day: int) -> str:
    """An epoch day number as an ISO date."""
    return (_EPOCH_DATE + timedelta(days=day)).isoformat()


def _day_of_ms(value: Any) -> int:
    """The UTC epoch day of a timestamp (int epoch ms or aware datetime)."""
    return epoch_ms(value) // _MS_PER_DAY


def robust_z(value: float, samples: list[float]) -> tuple[float, float, float | None]:
    """(median, MAD, modified z) of ``value`` against ``samples`` (Iglewicz and Hoaglin 1993).

    z = 0.6745 * (value - median) / MAD. When MAD is 0 (more than half the samples equal),
    z = (value - median) / (1.253314 * mean absolute deviation) instead; when that is 0 too
    (every sample equal) z is None: there is no spread to measure against.
    """
    median = statistics.median(samples)
    mad = statistics.median(abs(sample - median) for sample in samples)
    if mad > 0:
        return median, mad, _MAD_SCALE * (value - median) / mad
    mean_ad = statistics.fmean(abs(sample - median) for sample in samples)
    if mean_ad > 0:
        return median, mad, (value - median) / (_MEAN_AD_SCALE * mean_ad)
    return median, mad, None


# --- detection ------------------------------------------------------------------------------


class ClaimDetector:
    """Claim anomaly rules over claim_line and encounter events of one partition.

    Duplicates are found by whichever of the two lines arrives second; a line seen again with
    the same event_id is a redelivery and ignored while it is still held. A late claim line
    (ingest time older than the person's newest by more than the duplicate window) is still
    checked against what is held, but not stored; lines older than that are no longer
    compared with anything. Deaths and encounter spans that become known after a line
    re-check the person's held lines; each line raises after_death and outside_encounter at
    most once.
    """

    def __init__(self, rules: ClaimRules) -> None:
        self.rules = rules
        self._line_retention_ms = rules.duplicate_window_days * _MS_PER_DAY
        self._encounter_retention_ms = rules.encounter_retention_days * _MS_PER_DAY
        self._death_retention_ms = rules.death_retention_days * _MS_PER_DAY

    # --- entry points -----------------------------------------------------------------------

    def observe(self, event: dict[str, Any], state: KeyValueState, now_ms: int) -> list[Finding]:
        """Findings raised by one claim_line or encounter event (other kinds are ignored)."""
        if "claim_id" in event and "line_no" in event:
            return self._observe_claim_line(event, state)
        if "encounter_key" in event and "admit_time" in event:
            return self._observe_encounter(event, state)
        return []

    def tick(self, state: KeyValueState, now_ms: int) -> list[Finding]:
        """Forget persons with nothing left to remember at wall-clock ``now_ms``; never fires.

        Scans every person entry, so call it rarely (e.g. hourly). Ingest times are
        wall-clock, so ``now_ms`` is compared with them directly.
        """
        for key, person in state.items():
            if not key.startswith(_PERSON_PREFIX):
                continue
            self._prune(person, now_ms)
            if person["lines"] or person["encounters"] or person["death"]:
                state.put(key, person)
            else:
                state.delete(key)
        return []

    # --- claim lines ------------------------------------------------------------------------

    def _observe_claim_line(self, event: dict[str, Any], state: KeyValueState) -> list[Finding]:
        line = self._line_record(event)
        person_key = event.get("person_key")
        person: dict[str, Any] | None = None
        if person_key:
            person = self._person(state, person_key)
            if any(held["event_id"] == line["event_id"] for held in person["lines"]):
                return []  # redelivery of a line still held
        findings: list[Finding] = []
        outlier = self._cost_outlier(event, line, state)
        if person is None or person_key is None:
            return [outlier] if outlier is not None else []
        findings.extend(self._duplicates(line, person, person_key))
        if outlier is not None:
            findings.append(outlier)
        death_finding = self._after_death(line, person, person_key)
        if death_finding is not None:
            findings.append(death_finding)
        encounter_finding = self._outside_encounter(line, person, person_key)
        if encounter_finding is not None:
            findings.append(encounter_finding)
        person["clock_ms"] = max(person["clock_ms"], line["ingest_ms"])
        if line["ingest_ms"] >= person["clock_ms"] - self._line_retention_ms:
            person["lines"].append(line)
        self._prune(person, person["clock_ms"])
        state.put(_PERSON_PREFIX + person_key, person)
        return findings

    @staticmethod
    def _line_record(event: dict[str, Any]) -> dict[str, Any]:
        """What is kept of a claim line: enough to compare it and to name it in a finding."""
        item_code = event.get("item_code")
        return {
            "event_id": event["event_id"],
            "claim": f"{event['payer_id']}:{event['claim_id']}",
            "subject": f"{event['payer_id']}:{event['claim_id']}|{event['line_no']}",
            "organisation_id": event["organisation_id"],
            # Unmapped lines compare by their local code, namespaced so it cannot equal a
            # standard code by accident.
            "item": item_code if item_code else f"local:{event['local_item_code']}",
            "day": (as_date(event["service_date"]) - _EPOCH_DATE).days,
            "quantity": float(event["quantity"]),
            "amount": float(event["amount"]),
            "encounter_key": event.get("encounter_key"),
            "event_time_ms": epoch_ms(event["event_time"]),
            "ingest_ms": epoch_ms(event["ingest_time"]),
            "flags": [],
        }

    def _finding(
        self,
        rule_id: str,
        line: dict[str, Any],
        person_key: str | None,
        evidence: list[str],
        explanation: str,
        **details: Any,
    ) -> Finding:
        return Finding(
            rule_id=rule_id,
            rule_version=self.rules.version,
            severity=self.rules.severities[rule_id],
            organisation_id=line["organisation_id"],
            subject=line["subject"],
            event_time_ms=line["event_time_ms"],
            triggering_event_ids=(line["event_id"], *evidence),
            explanation=explanation,
            person_key=person_key,
            details=details,
        )

    def _duplicates(
        self, line: dict[str, Any], person: dict[str, Any], person_key: str
    ) -> list[Finding]:
        """An exact duplicate finding, or else a near duplicate one, for a new line."""
        exact: list[dict[str, Any]] = []
        near: list[dict[str, Any]] = []
        for held in person["lines"]:
            if held["claim"] == line["claim"] or held["item"] != line["item"]:
                continue  # lines of one claim never duplicate each other
            if abs(held["ingest_ms"] - line["ingest_ms"]) > self._line_retention_ms:
                continue
            if (
                held["organisation_id"] == line["organisation_id"]
                and held["day"] == line["day"]
                and held["quantity"] == line["quantity"]
                and held["amount"] == line["amount"]
            ):
                exact.append(held)
            elif abs(held["day"] - line["day"]) <= self.rules.near_days and self._amounts_near(
                held["amount"], line["amount"]
            ):
                near.append(held)
        if exact:
            first = exact[0]
            explanation = (
                f"Claim line {line['subject']} repeats line {first['subject']} of another claim"
                f" ({len(exact)} such line(s)): organisation {line['organisation_id']}, item "
                f"{line['item']}, service date {_day_text(line['day'])}, quantity "
                f"{_number(line['quantity'])}, amount {_number(line['amount'])}"
            )
            evidence = [held["event_id"] for held in exact[:_MAX_EVIDENCE]]
            matches = [held["subject"] for held in exact[:_MAX_EVIDENCE]]
            return [
                self._finding(
                    EXACT_DUPLICATE, line, person_key, evidence, explanation, matches=matches
                )
            ]
        if near:
            first = near[0]
            days_apart = abs(first["day"] - line["day"])
            explanation = (
                f"Claim line {line['subject']} is close to line {first['subject']} of another "
                f"claim ({len(near)} such line(s)): item {line['item']}, service dates "
                f"{_day_text(first['day'])} and {_day_text(line['day'])} ({days_apart} days "
                f"apart, limit {self.rules.near_days}), amounts {_number(first['amount'])} and "
                f"{_number(line['amount'])} ({_number(round(self._pct_apart(first, line), 2))}%"
                f" apart, limit {_number(self.rules.near_amount_pct)}%)"
            )
            evidence = [held["event_id"] for held in near[:_MAX_EVIDENCE]]
            matches = [held["subject"] for held in near[:_MAX_EVIDENCE]]
            return [
                self._finding(
                    NEAR_DUPLICATE, line, person_key, evidence, explanation, matches=matches
                )
            ]
        return []

    @staticmethod
    def _pct_apart(first: dict[str, Any], second: dict[str, Any]) -> float:
        larger = max(first["amount"], second["amount"])
        return 0.0 if larger == 0 else abs(first["amount"] - second["amount"]) * 100 / larger

    def _amounts_near(self, first: float, second: float) -> bool:
        larger = max(first, second)
        if larger == 0:
            return True
        return abs(first - second) * 100 / larger <= self.rules.near_amount_pct

    def _cost_outlier(
        self, event: dict[str, Any], line: dict[str, Any], state: KeyValueState
    ) -> Finding | None:
        """Score the unit price against the item's window, then add it to the window.

        The price is scored against earlier prices only, so an outlier cannot hide itself;
        it joins the window afterwards (median and MAD barely move for one extreme value).
        """
        item_code = event.get("item_code")
        if not item_code or line["quantity"] <= 0:
            return None  # unmapped items have no comparable price; quantity 0 has no unit price
        key = f"{_PRICE_PREFIX}{line['organisation_id']}|{item_code}"
        window: list[list[Any]] = state.get(key) or []
        if any(event_id == line["event_id"] for event_id, _ in window):
            return None  # redelivery: already scored and counted
        price = line["amount"] / line["quantity"]
        samples = [float(sample) for _, sample in window]
        finding = None
        if len(samples) >= self.rules.min_samples:
            finding = self._score_price(line, event.get("person_key"), item_code, price, samples)
        window.append([line["event_id"], price])
        state.put(key, window[-self.rules.window_size :])
        return finding

    def _score_price(
        self,
        line: dict[str, Any],
        person_key: str | None,
        item_code: str,
        price: float,
        samples: list[float],
    ) -> Finding | None:
        median, mad, z = robust_z(price, samples)
        subject = (
            f"Unit price {_number(round(price, 4))} of item {item_code} at organisation "
            f"{line['organisation_id']}"
        )
        if z is None:
            # Every earlier price is the same tariff: compare with a tolerance instead.
            deviation = abs(price - median) * 100 / median if median else float("inf")
            if price == median or deviation <= self.rules.flat_tolerance_pct:
                return None
            explanation = (
                f"{subject} differs from the fixed price {_number(median)} that all "
                f"{len(samples)} earlier prices had (MAD 0, z undefined): "
                f"{_number(round(deviation, 1))}% off, tolerance "
                f"{_number(self.rules.flat_tolerance_pct)}%"
            )
        else:
            if abs(z) <= self.rules.z_threshold:
                return None
            direction = "above" if z > 0 else "below"
            explanation = (
                f"{subject} is far {direction} the median {_number(round(median, 4))} of the last "
                f"{len(samples)} prices: MAD {_number(round(mad, 4))}, robust z "
                f"{z:.2f} (limit {_number(self.rules.z_threshold)})"
            )
        return self._finding(
            COST_OUTLIER,
            line,
            person_key,
            [],
            explanation,
            item_code=item_code,
            unit_price=price,
            median=median,
            mad=mad,
            z=z,
            samples=len(samples),
        )

    def _after_death(
        self, line: dict[str, Any], person: dict[str, Any], person_key: str
    ) -> Finding | None:
        death = person["death"]
        if death is None or line["day"] <= death["day"] or AFTER_DEATH in line["flags"]:
            return None
        line["flags"].append(AFTER_DEATH)
        days_after = line["day"] - death["day"]
        explanation = (
            f"Claim line {line['subject']} has service date {_day_text(line['day'])}, "
            f"{days_after} day(s) after the person's recorded death on {_day_text(death['day'])}"
        )
        return self._finding(
            AFTER_DEATH,
            line,
            person_key,
            [death["event_id"]],
            explanation,
            days_after_death=days_after,
        )

    def _outside_encounter(
        self, line: dict[str, Any], person: dict[str, Any], person_key: str
    ) -> Finding | None:
        encounter_key = line["encounter_key"]
        if not encounter_key or OUTSIDE_ENCOUNTER in line["flags"]:
            return None
        span = person["encounters"].get(encounter_key)
        if span is None or span["deleted"]:
            return None  # unknown visit: not applicable
        grace = self.rules.grace_days
        if line["day"] < span["admit_day"] - grace:
            days = span["admit_day"] - line["day"]
            where = f"{days} day(s) before admission on {_day_text(span['admit_day'])}"
        elif span["discharge_day"] is not None and line["day"] > span["discharge_day"] + grace:
            days = line["day"] - span["discharge_day"]
            where = f"{days} day(s) after discharge on {_day_text(span['discharge_day'])}"
        else:
            return None
        line["flags"].append(OUTSIDE_ENCOUNTER)
        explanation = (
            f"Claim line {line['subject']} has service date {_day_text(line['day'])}, {where} "
            f"of its visit (grace {grace} day(s))"
        )
        return self._finding(
            OUTSIDE_ENCOUNTER,
            line,
            person_key,
            [span["event_id"]],
            explanation,
            encounter_key=encounter_key,
            days_outside=days,
        )

    # --- encounters -------------------------------------------------------------------------

    def _observe_encounter(self, event: dict[str, Any], state: KeyValueState) -> list[Finding]:
        """Record a visit span and a death (deceased_time), then re-check the held lines.

        CDC versions are honoured: an older version than the one held is ignored. A death is
        withdrawn when the encounter that reported it is deleted or loses its deceased_time.
        """
        person_key = event.get("person_key")
        if not person_key:
            return []
        person = self._person(state, person_key)
        encounter_key = event["encounter_key"]
        version = int(event.get("version") or 0)
        ingest_ms = epoch_ms(event["ingest_time"])
        held = person["encounters"].get(encounter_key)
        if held is not None and version < held["version"]:
            return []  # a stale CDC version arrived late
        deleted = bool(event.get("is_deleted")) or event.get("op") == "d"
        discharge = event.get("discharge_time")
        person["encounters"][encounter_key] = {
            "event_id": event["event_id"],
            "version": version,
            "deleted": deleted,
            "admit_day": _day_of_ms(event["admit_time"]),
            "discharge_day": None if discharge is None else _day_of_ms(discharge),
            "ingest_ms": ingest_ms,
        }
        deceased = event.get("deceased_time")
        death = person["death"]
        if not deleted and deceased is not None:
            day = _day_of_ms(deceased)
            if death is None or death["encounter_key"] == encounter_key or day < death["day"]:
                person["death"] = {
                    "day": day,
                    "encounter_key": encounter_key,
                    "event_id": event["event_id"],
                    "ingest_ms": ingest_ms,
                }
        elif death is not None and death["encounter_key"] == encounter_key:
            person["death"] = None
        findings: list[Finding] = []
        for line in person["lines"]:
            for check in (self._after_death, self._outside_encounter):
                finding = check(line, person, person_key)
                if finding is not None:
                    findings.append(finding)
        person["clock_ms"] = max(person["clock_ms"], ingest_ms)
        self._prune(person, person["clock_ms"])
        state.put(_PERSON_PREFIX + person_key, person)
        return findings

    # --- state ------------------------------------------------------------------------------

    @staticmethod
    def _person(state: KeyValueState, person_key: str) -> dict[str, Any]:
        person = state.get(_PERSON_PREFIX + person_key)
        if person is None:
            return {"clock_ms": 0, "lines": [], "encounters": {}, "death": None}
        return dict(person)

    def _prune(self, person: dict[str, Any], clock_ms: int) -> None:
        """Drop lines, encounters and a death older than their retention, then apply the caps."""
        lines = [
            line
            for line in person["lines"]
            if line["ingest_ms"] >= clock_ms - self._line_retention_ms
        ]
        lines.sort(key=lambda line: line["ingest_ms"])
        person["lines"] = lines[-self.rules.max_lines_per_person :]
        encounters = sorted(
            (
                (key, span)
                for key, span in person["encounters"].items()
                if span["ingest_ms"] >= clock_ms - self._encounter_retention_ms
            ),
            key=lambda item: item[1]["ingest_ms"],
        )
        person["encounters"] = dict(encounters[-self.rules.max_encounters_per_person :])
        death = person["death"]
        if death is not None and death["ingest_ms"] < clock_ms - self._death_retention_ms:
            person["death"] = None
