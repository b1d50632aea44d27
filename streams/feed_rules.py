"""Feed health rules: a hospital's or payer's feed that stops, fails or goes unmapped.

A feed is one ``(organisation_id, source_kind)`` pair. The thresholds are data
(``streams/rules/feeds.yaml``, versioned). :class:`FeedDetector` reads normalised events
(any kind) and dead-letter records (told apart by their ``dlq_id`` field) and keeps one
state entry per feed under ``feed|<organisation_id>|<source_kind>``. All its times are
ARRIVAL times (``ingest_time``) and the wall clock passed to :meth:`FeedDetector.tick`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from pydantic import Field, field_validator

from streams.findings import Cleared, Finding, KeyValueState
from streams.model import NonBlank, epoch_ms
from streams.rules_file import Severity, StrictModel, read_rules_document, validate_rules

DEFAULT_FEED_RULES_PATH: Final[Path] = Path(__file__).resolve().parent / "rules" / "feeds.yaml"

#: Prefix of every state key this detector owns.
STATE_PREFIX: Final = "feed|"

SILENCE: Final = "feed.silence"
DEAD_LETTER_SPIKE: Final = "feed.dead_letter_spike"
UNMAPPED_SPIKE: Final = "feed.unmapped_spike"

#: Mapping statuses that count an event as unmapped for feed.unmapped_spike.
UNMAPPED_STATUSES: Final = frozenset({"unmapped", "partial"})


class FeedRulesError(ValueError):
    """The feed rules file is missing, not YAML, or not of the expected shape."""


@dataclass(frozen=True, slots=True)
class SpikeRule:
    """When a window's bad-record rate is a spike: volume floor, rate floor, baseline factor."""

    rule_id: str
    severity: str
    min_events: int
    min_rate: float
    factor: float
    baseline_alpha: float

    def threshold(self, baseline: float | None) -> float:
        """The rate at or above which a window fires, given the baseline (None: none yet)."""
        return self.min_rate if baseline is None else max(self.min_rate, self.factor * baseline)


@dataclass(frozen=True, slots=True)
class FeedRules:
    """A loaded feed rules version: silence periods per source kind and the spike rules."""

    version: str
    silence_severity: str
    default_silent_after_ms: int
    silent_after_ms: dict[str, int]
    forget_after_ms: int
    window_ms: int
    lateness_ms: int
    max_sample_ids: int
    dead_letter_stages: frozenset[str]
    dead_letter_spike: SpikeRule
    unmapped_spike: SpikeRule

    def silence_after_ms(self, source_kind: str) -> int:
        """How long a feed of this source kind may send nothing before it counts as silent."""
        return self.silent_after_ms.get(source_kind, self.default_silent_after_ms)


# --- loading --------------------------------------------------------------------------------


class _SilenceModel(StrictModel):
    severity: Severity
    default_silent_after_minutes: float = Field(gt=0)
    silent_after_minutes: dict[str, float]
    forget_after_hours: float = Field(gt=0)

    @field_validator("silent_after_minutes")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        for source_kind, minutes in value.items():
            if minutes <= 0:
                raise ValueError(f"period of {source_kind!r} must be positive")
        return value


class _SpikeModel(StrictModel):
    severity: Severity
    min_events: int = Field(ge=1)
    min_rate: float = Field(gt=0, le=1)
    factor: float = Field(ge=1)
    baseline_alpha: float = Field(gt=0, le=1)


class _SpikesModel(StrictModel):
    window_minutes: int = Field(ge=1)
    allowed_lateness_minutes: int = Field(ge=0)
    max_sample_ids: int = Field(ge=1, le=100)
    dead_letter_stages: list[NonBlank]
    dead_letter_spike: _SpikeModel
    unmapped_spike: _SpikeModel


class _FeedRulesModel(StrictModel):
    version: NonBlank
    silence: _SilenceModel
    spikes: _SpikesModel


def _spike_rule(rule_id: str, model: _SpikeModel) -> SpikeRule:
    return SpikeRule(
        rule_id,
        model.severity,
        model.min_events,
        model.min_rate,
        model.factor,
        model.baseline_alpha,
    )


def feed_rules_from_dict(document: Any, source: str = "<dict>") -> FeedRules:
    """Validate a parsed feed rules document; raises FeedRulesError naming the field."""
    model = validate_rules(_FeedRulesModel, document, FeedRulesError, "feed rules", source)
    silence, spikes = model.silence, model.spikes
    return FeedRules(
        version=model.version,
        silence_severity=silence.severity,
        default_silent_after_ms=round(silence.default_silent_after_minutes * 60_000),
        silent_after_ms={k: round(v * 60_000) for k, v in silence.silent_after_minutes.items()},
        forget_after_ms=round(silence.forget_after_hours * 3_600_000),
        window_ms=spikes.window_minutes * 60_000,
        lateness_ms=spikes.allowed_lateness_minutes * 60_000,
        max_sample_ids=spikes.max_sample_ids,
        dead_letter_stages=frozenset(spikes.dead_letter_stages),
        dead_letter_spike=_spike_rule(DEAD_LETTER_SPIKE, spikes.dead_letter_spike),
        unmapped_spike=_spike_rule(UNMAPPED_SPIKE, spikes.unmapped_spike),
    )


def load_feed_rules(path: Path | str = DEFAULT_FEED_RULES_PATH) -> FeedRules:
    """Read and validate a feed rules YAML file; raises FeedRulesError."""
    path = Path(path)
    document = read_rules_document(path, FeedRulesError, "feed rules")
    return feed_rules_from_dict(document, str(path))


# --- detection ------------------------------------------------------------------------------


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _duration(ms: int) -> str:
    """Whole minutes, or seconds for anything shorter than 5 minutes."""
    if ms < 300_000:
        return f"{ms // 1000} s"
    return f"{ms // 60_000} minutes"


def _percent(rate: float) -> str:
    return f"{rate * 100:.1f}%"


class FeedDetector:
    """Silence, dead-letter spike and unmapped spike rules per feed.

    feed.silence must be computed where EVERY record of a feed passes: in the worker, the
    state table must be keyed (and the input repartitioned) by ``organisation|source_kind``
    over both the norm topics and the dead-letter topic, otherwise a worker that sees only
    some partitions of a feed takes the rest for silence.

    State per feed: newest arrival, silence flag, the watermark, the counts of the windows
    not yet closed (at most ``allowed_lateness / window + 2`` of them, each with at most
    ``max_sample_ids`` ids) and one baseline per spike rule. Feeds silent for longer than
    ``forget_after_hours`` are deleted by :meth:`tick`, which must run periodically.
    """

    def __init__(self, rules: FeedRules) -> None:
        """Use one loaded rules version."""
        self.rules = rules
        self._spike_rules = (rules.dead_letter_spike, rules.unmapped_spike)

    def observe(
        self, record: dict[str, Any], state: KeyValueState, now_ms: int
    ) -> list[Finding | Cleared]:
        """Count one normalised event or dead-letter record against its feed.

        Records without an organisation or source kind (some dead letters) belong to no
        feed and are ignored, and so are dead letters of stages not listed in the rules.
        """
        organisation_id = record.get("organisation_id")
        source_kind = record.get("source_kind")
        is_dead_letter = "dlq_id" in record
        if not organisation_id or not source_kind:
            return []
        if is_dead_letter and record.get("stage") not in self.rules.dead_letter_stages:
            return []
        ingest_ms = epoch_ms(record["ingest_time"])
        record_id = record["dlq_id"] if is_dead_letter else record["event_id"]
        unmapped = not is_dead_letter and record.get("mapping_status") in UNMAPPED_STATUSES
        return self._observe_counts(
            organisation_id,
            source_kind,
            ingest_ms,
            ingest_ms,
            record_id,
            events=0 if is_dead_letter else 1,
            unmapped=1 if unmapped else 0,
            dead_letters=1 if is_dead_letter else 0,
            dead_ids=[record_id] if is_dead_letter else [],
            unmapped_ids=[record_id] if unmapped else [],
            state=state,
        )

    def observe_activity(
        self, activity: dict[str, Any], state: KeyValueState, now_ms: int
    ) -> list[Finding | Cleared]:
        """Count a worker's summary of one feed and minute (a FeedActivity record).

        Workers summarise instead of forwarding every record, so one owner can watch every
        feed across all partitions; a minute's counts land in the window holding it (the
        window length must be a whole number of minutes).
        """
        return self._observe_counts(
            activity["organisation_id"],
            activity["source_kind"],
            epoch_ms(activity["minute_start"]),
            epoch_ms(activity["last_ingest_time"]),
            activity["last_record_id"],
            events=activity["events"],
            unmapped=activity["unmapped"],
            dead_letters=activity["dead_letters"],
            dead_ids=list(activity["dead_letter_ids"]),
            unmapped_ids=list(activity["unmapped_ids"]),
            state=state,
        )

    def _observe_counts(
        self,
        organisation_id: str,
        source_kind: str,
        counted_at_ms: int,
        last_ingest_ms: int,
        last_record_id: str,
        *,
        events: int,
        unmapped: int,
        dead_letters: int,
        dead_ids: list[str],
        unmapped_ids: list[str],
        state: KeyValueState,
    ) -> list[Finding | Cleared]:
        key = f"{STATE_PREFIX}{organisation_id}|{source_kind}"
        feed = state.get(key) or {
            "organisation_id": organisation_id,
            "source_kind": source_kind,
            "last_ingest_ms": None,
            "last_record_id": None,
            "silent": False,
            "watermark_ms": None,
            "late_records": 0,
            "windows": {},
            "baselines": {rule.rule_id: None for rule in self._spike_rules},
            "open": {rule.rule_id: False for rule in self._spike_rules},
        }
        outcomes: list[Finding | Cleared] = []
        if feed["silent"]:
            feed["silent"] = False
            outcomes.append(
                Cleared(
                    SILENCE,
                    organisation_id,
                    f"{organisation_id}|{source_kind}",
                    last_ingest_ms,
                    f"feed {organisation_id}/{source_kind} sends again ({_utc(last_ingest_ms)})",
                )
            )
        if feed["last_ingest_ms"] is None or last_ingest_ms >= feed["last_ingest_ms"]:
            feed["last_ingest_ms"] = last_ingest_ms
            feed["last_record_id"] = last_record_id
        self._count(
            feed, counted_at_ms, events, unmapped, dead_letters, dead_ids, unmapped_ids
        )
        outcomes.extend(self._close_windows(feed, last_ingest_ms - self.rules.lateness_ms))
        state.put(key, feed)
        return outcomes

    def tick(
        self, state: KeyValueState, now_ms: int, watching_since_ms: int = 0
    ) -> list[Finding | Cleared]:
        """Close the windows the wall clock has passed, raise due silences, forget old feeds.

        Consumer lag looks like silence here: call it with the time up to which the input
        topics have been consumed, or not while the consumer is catching up.
        ``watching_since_ms`` is when this worker started watching (its last rebalance): a
        feed is silent only after a whole silence limit of watching, not because the
        platform itself was down while its state was kept.
        """
        outcomes: list[Finding | Cleared] = []
        for key, feed in state.items():
            if not key.startswith(STATE_PREFIX) or feed.get("last_ingest_ms") is None:
                continue
            silent_for = now_ms - feed["last_ingest_ms"]
            if silent_for >= self.rules.forget_after_ms:
                state.delete(key)
                continue
            outcomes.extend(self._close_windows(feed, now_ms - self.rules.lateness_ms))
            limit = self.rules.silence_after_ms(feed["source_kind"])
            watched_for = now_ms - max(feed["last_ingest_ms"], watching_since_ms)
            if not feed["silent"] and watched_for >= limit:
                feed["silent"] = True
                outcomes.append(self._silence_finding(feed, silent_for, limit))
            state.put(key, feed)
        return outcomes

    # --- windows ----------------------------------------------------------------------------

    def _count(
        self,
        feed: dict[str, Any],
        counted_at_ms: int,
        events: int,
        unmapped: int,
        dead_letters: int,
        dead_ids: list[str],
        unmapped_ids: list[str],
    ) -> None:
        start = counted_at_ms - counted_at_ms % self.rules.window_ms
        watermark = feed["watermark_ms"]
        if watermark is not None and start + self.rules.window_ms <= watermark:
            # Its window is closed and judged: not used.
            feed["late_records"] += events + dead_letters
            return
        window = feed["windows"].setdefault(
            str(start),
            {"events": 0, "dead_letters": 0, "unmapped": 0, "dead_ids": [], "unmapped_ids": []},
        )
        cap = self.rules.max_sample_ids
        window["events"] += events
        window["dead_letters"] += dead_letters
        window["unmapped"] += unmapped
        window["dead_ids"].extend(dead_ids[: max(0, cap - len(window["dead_ids"]))])
        window["unmapped_ids"].extend(unmapped_ids[: max(0, cap - len(window["unmapped_ids"]))])

    def _close_windows(self, feed: dict[str, Any], watermark: int) -> list[Finding | Cleared]:
        if feed["watermark_ms"] is not None and watermark <= feed["watermark_ms"]:
            return []
        feed["watermark_ms"] = watermark
        outcomes: list[Finding | Cleared] = []
        for start in sorted(int(s) for s in feed["windows"]):
            if start + self.rules.window_ms > watermark:
                break
            window = feed["windows"].pop(str(start))
            dead, events = window["dead_letters"], window["events"]
            outcomes.extend(
                self._judge(
                    feed,
                    self.rules.dead_letter_spike,
                    start,
                    dead,
                    events + dead,
                    window["dead_ids"],
                )
            )
            outcomes.extend(
                self._judge(
                    feed,
                    self.rules.unmapped_spike,
                    start,
                    window["unmapped"],
                    events,
                    window["unmapped_ids"],
                )
            )
        return outcomes

    def _judge(
        self,
        feed: dict[str, Any],
        rule: SpikeRule,
        start: int,
        bad: int,
        total: int,
        sample_ids: list[str],
    ) -> list[Finding | Cleared]:
        """Test one closed window against one spike rule and update that rule's baseline."""
        if total < rule.min_events:
            return []  # too few records to judge, and too noisy to learn from
        organisation_id, source_kind = feed["organisation_id"], feed["source_kind"]
        subject = f"{organisation_id}|{source_kind}"
        rate = bad / total
        baseline = feed["baselines"][rule.rule_id]
        threshold = rule.threshold(baseline)
        end = start + self.rules.window_ms
        if bad > 0 and rate >= threshold:
            feed["open"][rule.rule_id] = True
            what = "dead letters" if rule is self.rules.dead_letter_spike else "unmapped events"
            baseline_text = "none yet" if baseline is None else _percent(baseline)
            return [
                Finding(
                    rule_id=rule.rule_id,
                    rule_version=self.rules.version,
                    severity=rule.severity,
                    organisation_id=organisation_id,
                    subject=subject,
                    event_time_ms=start,
                    triggering_event_ids=tuple(sample_ids),
                    explanation=(
                        f"Feed {organisation_id}/{source_kind}: {bad} {what} out of {total} "
                        f"records ({_percent(rate)}) in the {self.rules.window_ms // 60_000}-"
                        f"minute window from {_utc(start)}; baseline {baseline_text}, "
                        f"threshold {_percent(threshold)} (at least {_percent(rule.min_rate)} "
                        f"and {rule.factor:g} x baseline); {len(sample_ids)} record ids listed"
                    ),
                    value=rate,
                    details={
                        "window_start_ms": start,
                        "window_end_ms": end,
                        "bad": bad,
                        "total": total,
                        "rate": rate,
                        "baseline": baseline,
                        "threshold": threshold,
                        "late_records": feed["late_records"],
                    },
                )
            ]
        alpha = rule.baseline_alpha
        feed["baselines"][rule.rule_id] = (
            rate if baseline is None else alpha * rate + (1 - alpha) * baseline
        )
        if not feed["open"][rule.rule_id]:
            return []
        feed["open"][rule.rule_id] = False
        reason = (
            f"{bad} of {total} records ({_percent(rate)}) in the window from {_utc(start)}, "
            f"below the threshold {_percent(threshold)}"
        )
        return [Cleared(rule.rule_id, organisation_id, subject, end, reason)]

    def _silence_finding(self, feed: dict[str, Any], silent_for: int, limit: int) -> Finding:
        organisation_id, source_kind = feed["organisation_id"], feed["source_kind"]
        return Finding(
            rule_id=SILENCE,
            rule_version=self.rules.version,
            severity=self.rules.silence_severity,
            organisation_id=organisation_id,
            subject=f"{organisation_id}|{source_kind}",
            event_time_ms=feed["last_ingest_ms"] + limit,
            triggering_event_ids=(feed["last_record_id"],),
            explanation=(
                f"Feed {organisation_id}/{source_kind} has sent nothing for "
                f"{_duration(silent_for)} (limit {_duration(limit)}; last record "
                f"received {_utc(feed['last_ingest_ms'])})"
            ),
            details={"last_ingest_ms": feed["last_ingest_ms"], "silent_for_ms": silent_for},
        )
