"""Syndromic surveillance: outbreak signals from diagnosis counts per district and hour.

The syndromes (ICD-10 prefix lists), districts and baseline methods are data
(``streams/rules/syndromic.yaml``, versioned). :class:`SyndromicDetector` counts each
diagnosis once per (district, syndrome, hour of EVENT time); when an hour closes it tests
the count against an EWMA baseline (mean + k sd) or a one-sided CUSUM, per syndrome.

Late events: an hour closes when the district's watermark (newest event time seen in the
district minus the allowed lateness) passes its end; diagnoses for a closed hour are
counted in the district's ``late_events`` and not used. Hours close only as newer
diagnoses of the district arrive (event time, no wall clock): a district whose feeds stop
leaves its last hours open, which the feed silence rule reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import Field, model_validator

from streams.findings import Finding, KeyValueState
from streams.model import NonBlank, epoch_ms
from streams.rules_file import StrictModel, read_rules_document, validate_rules

DEFAULT_SYNDROMIC_RULES_PATH: Final[Path] = (
    Path(__file__).resolve().parent / "rules" / "syndromic.yaml"
)

#: Prefixes of the state keys this detector owns.
STATE_PREFIX: Final = "syndromic|"
DISTRICT_PREFIX: Final = "syndromic|district|"
SEEN_PREFIX: Final = "syndromic|seen|"

HOUR_MS: Final = 3_600_000
SEVERITY: Final = "medium"


class SyndromicRulesError(ValueError):
    """The syndromic rules file is missing, not YAML, or not of the expected shape."""


@dataclass(frozen=True, slots=True)
class Syndrome:
    """One syndrome: its ICD-10 prefixes and how its hourly counts are tested."""

    syndrome: str
    display: str
    icd10_prefixes: tuple[str, ...]
    method: str  # "ewma" or "cusum"
    alpha: float
    k: float
    h: float | None
    min_count: int
    min_sd: float
    warmup_hours: int

    def matches(self, icd10_code: str) -> bool:
        """True when the (normalised, upper-case) ICD-10 code falls under this syndrome."""
        return icd10_code.startswith(self.icd10_prefixes)


@dataclass(frozen=True, slots=True)
class SyndromicRules:
    """A loaded syndromic rules version: districts by organisation, syndromes, time limits."""

    version: str
    lateness_ms: int
    dedup_retention_ms: int
    settle_ms: int
    max_triggering_event_ids: int
    districts: dict[str, str]
    syndromes: tuple[Syndrome, ...]

    def syndromes_of(self, icd10_code: str | None) -> list[Syndrome]:
        """The syndromes an ICD-10 code counts for (none when unmapped)."""
        if not icd10_code:
            return []
        code = icd10_code.strip().upper()
        return [s for s in self.syndromes if s.matches(code)]


# --- loading --------------------------------------------------------------------------------


class _SyndromeModel(StrictModel):
    syndrome: NonBlank = Field(pattern=r"^[a-z][a-z0-9_]*$")
    display: NonBlank
    icd10_prefixes: list[NonBlank] = Field(min_length=1)
    method: Literal["ewma", "cusum"]
    alpha: float = Field(gt=0, lt=1)
    k: float = Field(ge=0)
    h: float | None = Field(default=None, gt=0)
    min_count: int = Field(ge=1)
    min_sd: float = Field(gt=0)
    warmup_hours: int = Field(ge=2)

    @model_validator(mode="after")
    def _method_parameters(self) -> _SyndromeModel:
        if self.method == "cusum" and self.h is None:
            raise ValueError("h (the CUSUM decision limit) is required for method cusum")
        if self.method == "ewma" and self.h is not None:
            raise ValueError("h is only used by method cusum; set it to null")
        return self


class _SyndromicRulesModel(StrictModel):
    version: NonBlank
    allowed_lateness_minutes: int = Field(ge=0)
    settle_seconds: int = Field(default=0, ge=0)
    dedup_retention_hours: int = Field(ge=1)
    max_triggering_event_ids: int = Field(ge=1, le=500)
    districts: dict[str, NonBlank] = Field(min_length=1)
    syndromes: list[_SyndromeModel] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> _SyndromicRulesModel:
        names = [s.syndrome for s in self.syndromes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"syndrome {duplicates[0]!r} is defined more than once")
        return self


def syndromic_rules_from_dict(document: Any, source: str = "<dict>") -> SyndromicRules:
    """Validate a parsed syndromic rules document; raises SyndromicRulesError naming the field."""
    model = validate_rules(
        _SyndromicRulesModel, document, SyndromicRulesError, "syndromic rules", source
    )
    syndromes = tuple(
        Syndrome(
            s.syndrome,
            s.display,
            tuple(p.strip().upper() for p in s.icd10_prefixes),
            s.method,
            s.alpha,
            s.k,
            s.h,
            s.min_count,
            s.min_sd,
            s.warmup_hours,
        )
        for s in model.syndromes
    )
    return SyndromicRules(
        version=model.version,
        lateness_ms=model.allowed_lateness_minutes * 60_000,
        dedup_retention_ms=model.dedup_retention_hours * HOUR_MS,
        settle_ms=model.settle_seconds * 1000,
        max_triggering_event_ids=model.max_triggering_event_ids,
        districts=dict(model.districts),
        syndromes=syndromes,
    )


def load_syndromic_rules(path: Path | str = DEFAULT_SYNDROMIC_RULES_PATH) -> SyndromicRules:
    """Read and validate a syndromic rules YAML file; raises SyndromicRulesError."""
    path = Path(path)
    document = read_rules_document(path, SyndromicRulesError, "syndromic rules")
    return syndromic_rules_from_dict(document, str(path))


# --- baseline -------------------------------------------------------------------------------


def _new_baseline() -> dict[str, Any]:
    return {"mean": 0.0, "var": 0.0, "hours": 0, "cusum": 0.0}


def _learn(baseline: dict[str, Any], count: int, alpha: float) -> None:
    """Fold one hour's count into the exponentially weighted mean and variance.

    Incremental EW mean/variance (Finch, "Incremental calculation of weighted mean and
    variance", 2009); while the weight 1/(n+1) exceeds alpha it equals the plain running
    mean and population variance, so a young baseline is not dominated by its first hour.
    """
    weight = max(alpha, 1.0 / (baseline["hours"] + 1))
    diff = count - baseline["mean"]
    increment = weight * diff
    baseline["mean"] += increment
    baseline["var"] = (1 - weight) * (baseline["var"] + diff * increment)
    baseline["hours"] += 1


def _spread(baseline: dict[str, Any], syndrome: Syndrome) -> float:
    """The baseline sd, at least Poisson-like (sqrt(mean)) and at least ``min_sd``."""
    return max(math.sqrt(baseline["var"]), math.sqrt(baseline["mean"]), syndrome.min_sd)


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")


# --- detection ------------------------------------------------------------------------------


class SyndromicDetector:
    """Counts syndrome diagnoses per district and hour and signals unusual hours.

    State: one entry per district (``syndromic|district|<district>``: watermark, next hour
    to close, late_events, the open hours' counts with at most ``max_triggering_event_ids``
    ids each, and one baseline per syndrome), bounded by the districts in the rules and by
    the lateness; plus one small entry per counted diagnosis
    (``syndromic|seen|<organisation>|<diagnosis_key>``) that :meth:`tick` deletes
    ``dedup_retention_hours`` of district event time after its last sighting.
    """

    def __init__(self, rules: SyndromicRules) -> None:
        """Use one loaded rules version."""
        self.rules = rules

    def observe(self, event: dict[str, Any], state: KeyValueState, now_ms: int) -> list[Finding]:
        """Count one diagnosis event and test every hour of its district that closes.

        Deleted diagnoses and unmapped codes never count; a diagnosis counts at its first
        non-deleted sighting only (later updates, even to another code, do not count again).
        A diagnosis first seen late is remembered too, so its updates never count.
        """
        organisation_id = event.get("organisation_id") or ""
        district = self.rules.districts.get(organisation_id)
        if district is None:
            return []
        event_ms = epoch_ms(event["event_time"])
        hour = event_ms - event_ms % HOUR_MS
        key = DISTRICT_PREFIX + district
        record = state.get(key) or {
            "watermark_ms": event_ms - self.rules.lateness_ms,
            # With settling, hours close only after their settle time: until the first close
            # any earlier hour of a backfill is still open.
            "next_close_ms": (
                _hour_of(event_ms - self.rules.lateness_ms) if not self.rules.settle_ms
                else 0
            ),
            "late_events": 0,
            "hours": {},
            "baselines": {s.syndrome: _new_baseline() for s in self.rules.syndromes},
        }
        is_open = hour >= record["next_close_ms"]
        if is_open:
            # Any diagnosis shows the district's feeds delivered data for that hour.
            bucket = record["hours"].setdefault(str(hour), {"total": 0, "syndromes": {}})
            bucket["total"] += 1
        syndromes = self.rules.syndromes_of(event.get("icd10_code"))
        deleted = bool(event.get("is_deleted")) or event.get("op") == "d"
        if syndromes and not deleted and self._first_sighting(event, district, event_ms, state):
            if not is_open:
                record["late_events"] += 1
            else:
                for syndrome in syndromes:
                    counts = bucket["syndromes"].setdefault(
                        syndrome.syndrome, {"count": 0, "event_ids": [], "organisations": {}}
                    )
                    counts["count"] += 1
                    if len(counts["event_ids"]) < self.rules.max_triggering_event_ids:
                        counts["event_ids"].append(event["event_id"])
                    organisations = counts["organisations"]
                    organisations[organisation_id] = organisations.get(organisation_id, 0) + 1
        findings: list[Finding] = []
        watermark = event_ms - self.rules.lateness_ms
        if watermark > record["watermark_ms"]:
            record["watermark_ms"] = watermark
        findings = self._close_hours(district, record, now_ms)
        state.put(key, record)
        return findings

    def tick(self, state: KeyValueState, now_ms: int) -> list[Finding]:
        """Close the hours that settled, and forget diagnoses last seen more than the
        retention before their district's watermark (event time)."""
        findings: list[Finding] = []
        for key, record in state.items():
            if key.startswith(DISTRICT_PREFIX):
                record = dict(record)
                closed = self._close_hours(key[len(DISTRICT_PREFIX):], record, now_ms)
                if closed or record.get("pending"):
                    state.put(key, record)
                findings.extend(closed)
        watermarks: dict[str, int | None] = {}
        for key, seen in state.items():
            if not key.startswith(SEEN_PREFIX):
                continue
            district = seen["district"]
            if district not in watermarks:
                record = state.get(DISTRICT_PREFIX + district)
                watermarks[district] = None if record is None else record["watermark_ms"]
            watermark = watermarks[district]
            if watermark is None or seen["last_ms"] < watermark - self.rules.dedup_retention_ms:
                state.delete(key)
        return findings

    # --- internals --------------------------------------------------------------------------

    def _first_sighting(
        self, event: dict[str, Any], district: str, event_ms: int, state: KeyValueState
    ) -> bool:
        """Remember the diagnosis; True when it had not been seen (within the retention)."""
        diagnosis_key = event.get("diagnosis_key") or event["event_id"]
        key = f"{SEEN_PREFIX}{event['organisation_id']}|{diagnosis_key}"
        seen = state.get(key)
        if seen is None:
            state.put(key, {"district": district, "last_ms": event_ms})
            return True
        if event_ms > seen["last_ms"]:
            state.put(key, {"district": district, "last_ms": event_ms})
        return False

    def _close_hours(
        self, district: str, record: dict[str, Any], now_ms: int
    ) -> list[Finding]:
        """Test the hours the watermark has passed and that settled for ``settle_ms``.

        Settling absorbs the reordering of a backfill (a CDC snapshot of past diagnoses
        arriving through several partitions): an hour the watermark passes waits that long
        on the wall clock, still counting, before it is judged.
        """
        findings: list[Finding] = []
        closable_before = _hour_of(record["watermark_ms"])
        pending: dict[str, int] = record.setdefault("pending", {})
        for hour_key in record["hours"]:
            if int(hour_key) < closable_before:
                pending.setdefault(hour_key, now_ms)
        settled_before = None
        for hour in sorted(int(h) for h in record["hours"]):
            since = pending.get(str(hour))
            if hour >= closable_before or since is None or now_ms - since < self.rules.settle_ms:
                break
            settled_before = hour + HOUR_MS
            pending.pop(str(hour), None)
            bucket = record["hours"].pop(str(hour))
            for syndrome in self.rules.syndromes:
                counts = bucket["syndromes"].get(syndrome.syndrome)
                finding = self._test_hour(district, syndrome, hour, counts, record)
                if finding is not None:
                    findings.append(finding)
        # Hours without any diagnosis are gaps in the data: skipped, neither tested nor learnt.
        if settled_before is not None:
            record["next_close_ms"] = max(record["next_close_ms"], settled_before)
        # Without settling, the hours before the watermark close even when empty (gaps);
        # with it, only judged hours close, so a backfill's earlier hours stay open.
        no_earlier = not record["hours"] or min(int(h) for h in record["hours"]) >= closable_before
        if not self.rules.settle_ms and no_earlier:
            record["next_close_ms"] = max(record["next_close_ms"], closable_before)
        return findings

    def _test_hour(
        self,
        district: str,
        syndrome: Syndrome,
        hour: int,
        counts: dict[str, Any] | None,
        record: dict[str, Any],
    ) -> Finding | None:
        count = 0 if counts is None else counts["count"]
        baseline = record["baselines"].setdefault(syndrome.syndrome, _new_baseline())
        warm = baseline["hours"] >= syndrome.warmup_hours
        mean, sd = baseline["mean"], _spread(baseline, syndrome)
        signal = False
        if syndrome.method == "ewma":
            threshold = mean + syndrome.k * sd
            signal = warm and count >= syndrome.min_count and count > threshold
            statistic = (
                f"above the threshold {threshold:.1f} (EWMA baseline mean {mean:.1f}, "
                f"sd {sd:.1f}, k {syndrome.k:g})"
            )
        else:
            assert syndrome.h is not None  # validated at load
            threshold = syndrome.h
            if warm:
                z = (count - mean) / sd
                baseline["cusum"] = max(0.0, baseline["cusum"] + z - syndrome.k)
            cusum = baseline["cusum"]
            signal = warm and count >= syndrome.min_count and cusum > syndrome.h
            statistic = (
                f"CUSUM {cusum:.2f} above the decision limit h {syndrome.h:g} (baseline mean "
                f"{mean:.1f}, sd {sd:.1f}, reference k {syndrome.k:g}; CUSUM reset)"
            )
        if not signal:
            _learn(baseline, count, syndrome.alpha)
            return None
        assert counts is not None  # a signal needs count >= min_count >= 1
        details: dict[str, Any] = {
            "district": district,
            "syndrome": syndrome.syndrome,
            "method": syndrome.method,
            "hour_start_ms": hour,
            "hour_end_ms": hour + HOUR_MS,
            "count": count,
            "baseline_mean": mean,
            "baseline_sd": sd,
            "threshold": threshold,
            "organisation_counts": dict(counts["organisations"]),
            "late_events": record["late_events"],
        }
        if syndrome.method == "cusum":
            details["cusum"] = baseline["cusum"]
            baseline["cusum"] = 0.0  # reset after a signal
        event_ids = tuple(counts["event_ids"])
        listed = (
            f"all {count} event ids listed"
            if len(event_ids) == count
            else f"first {len(event_ids)} of {count} event ids listed"
        )
        # The alert belongs to the district; it is filed under the organisation that
        # contributed most diagnoses in the hour (ties: the smallest id).
        organisations: dict[str, int] = counts["organisations"]
        top_organisation = min(organisations, key=lambda o: (-organisations[o], o))
        return Finding(
            rule_id=f"syndromic.{syndrome.syndrome}",
            rule_version=self.rules.version,
            severity=SEVERITY,
            organisation_id=top_organisation,
            subject=f"{district}|{syndrome.syndrome}",
            event_time_ms=hour,
            triggering_event_ids=event_ids,
            explanation=(
                f"{syndrome.display} in district {district}: {count} diagnoses in the hour "
                f"from {_utc(hour)}, {statistic}; {listed}"
            ),
            value=float(count),
            details=details,
        )


def _hour_of(ms: int) -> int:
    return ms - ms % HOUR_MS
