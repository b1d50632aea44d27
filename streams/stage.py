"""The normalise stage for one raw record, without Faust: decode, normalise, detect, encode.

The Faust agents only iterate and send what this returns, so the whole per-record
behaviour (including dead-lettering and critical-value suppression) is testable without a
broker. Critical values are checked here, on the lab results this record produced, because
the raw HL7 topic is keyed by patient: the suppression state then lives in the partition
that owns the patient, and no second pass over norm.lab_result is needed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Final

from medstream.metrics import (
    CRITICAL_UNREADABLE,
    DEAD_LETTERS,
    QUALITY_ISSUES,
    UNMAPPED_CODES,
)
from medstream.settings import (
    DLQ_TOPIC,
    FACT_TOPICS,
    FEED_ACTIVITY_TOPIC,
    IDENTITY_TOPIC,
    NORM_TOPICS,
    KafkaSettings,
)
from schemas import serde
from streams.critical_values import (
    CriticalValueRules,
    UnreadableCritical,
    check_critical,
    critical_finding,
    is_suppressed,
    suppression_key,
    unreadable_finding,
    unreadable_subject,
)
from streams.deidentify import (
    DEFAULT_FREE_TEXT_FIELDS,
    KnownIdentifiers,
    may_hold_known,
    scrub_text,
)
from streams.detect import LifecycleInputs
from streams.detect import Output as Output
from streams.device_rules import DeviceDetector, load_device_rules
from streams.findings import DictState, KeyValueState, StagedState
from streams.identity import (
    PatientIdentity,
    has_demographics,
    known_identifiers,
    patient_identities,
)
from streams.internal_errors import NOT_THE_RECORDS_FAULT, InternalErrors
from streams.model import NormalisedEvent, RawContext, RecordRejected
from streams.mpi import IdentityTokeniser
from streams.normalise import dead_letter_record, normalise, raises_critical_alerts
from streams.pseudonym import Pseudonymiser
from streams.quality import QualityChecker, load_quality_rules
from streams.reloading import ReloadingFile
from streams.rules_file import rule_file
from streams.terminology import Terminology, TerminologySource

STAGE = "normalise"
log = logging.getLogger(__name__)
#: Patient records whose last identity observation the stage remembers (to skip repeats).
IDENTITY_CACHE_SIZE = 200_000

def unmapped_local_codes(
    kind: str, event: dict[str, Any], terminology: Terminology
) -> list[tuple[str, str, str]]:
    """(code system, local code, local display) of every code an event left unmapped.

    A code that is mapped but arrived in a unit that cannot be converted is listed with
    that unit, ``K [furlong]``: the steward's fix is a unit alias, not a code map.
    """
    organisation_id = event["organisation_id"]
    if event.get("mapping_status") == "unit_unmapped" and kind in ("lab_result", "observation"):
        unit = f"[{event.get('original_unit') or ''}]"
        if kind == "lab_result":
            return [("lab", f"{event['local_code']} {unit}", event["local_display"] or "")]
        return [("device_metric", f"{event['device_type']}/{event['local_code']} {unit}", "")]
    if kind == "lab_result" and event["loinc_code"] is None:
        return [("lab", event["local_code"], event["local_display"] or "")]
    if kind == "diagnosis" and event["icd10_code"] is None:
        return [("diagnosis", event["local_code"], event["local_display"] or "")]
    if kind == "encounter" and event["department_code"] is None:
        return [("department", event["department_local"], "")]
    if kind == "observation" and event["metric_code"] is None:
        code = f"{event['device_type']}/{event['local_code']}"
        return [("device_metric", code, event["local_code"])]
    if kind == "claim_line":
        codes = []
        if event["item_code"] is None:
            codes.append(("claim_item", event["local_item_code"], event["item_display"] or ""))
        codes.extend(
            ("diagnosis", code, "")
            for code in event["diagnosis_codes"]
            if terminology.diagnosis(organisation_id, code) is None
            and terminology.status(organisation_id, "diagnosis", code) != "mapped"
            and not _is_standard_icd10(code, terminology)
        )
        return codes
    return []


def _is_standard_icd10(code: str, terminology: Terminology) -> bool:
    # A claim keeps a mapped diagnosis as its ICD-10 code: that one is not a local gap.
    return terminology.catalogue_entry("diagnosis", code) is not None


def _scrub(event: dict[str, Any], known: KnownIdentifiers) -> None:
    """Remove identifiers from the free-text fields of an event before it leaves the stage."""
    for field in DEFAULT_FREE_TEXT_FIELDS:
        text = event.get(field)
        if isinstance(text, str) and text:
            if may_hold_known(text, known):
                event[field] = scrub_text(text, known).text
            else:
                event[field] = _scrub_without_known(text)


@lru_cache(maxsize=65_536)
def _scrub_without_known(text: str) -> str:
    # Displays and values repeat endlessly ("Potassium", "4.1"): scrub each text once.
    return scrub_text(text).text


class SuppressionState:
    """The last alert per (person, analyte): its event time and triggering event id.

    In the worker this is a Faust table (values stored as JSON lists); the id lets a raw
    message that is processed again re-emit its own alert instead of being suppressed by
    the state it wrote the first time.
    """

    def __init__(
        self,
        get: Callable[[str], Sequence[Any] | None],
        put: Callable[[str, list[Any]], None],
    ) -> None:
        self._get = get
        self._put = put

    @classmethod
    def in_memory(cls) -> SuppressionState:
        """A dict-backed state for tests and the benchmark baseline."""
        store: dict[str, list[Any]] = {}
        return cls(store.get, store.__setitem__)

    def staged(self) -> tuple[SuppressionState, Callable[[], None]]:
        """A view whose alerts are remembered here only when the returned commit is called."""
        pending: dict[str, list[Any]] = {}

        def get(key: str) -> Sequence[Any] | None:
            return pending[key] if key in pending else self._get(key)

        def commit() -> None:
            for key, value in pending.items():
                self._put(key, value)

        return SuppressionState(get, pending.__setitem__), commit

    def last_alert(self, key: str) -> tuple[int, str] | None:
        """(event time ms, triggering event id) of the last alert for the key, if any."""
        value = self._get(key)
        return None if value is None else (int(value[0]), str(value[1]))

    def record_alert(self, key: str, event_time_ms: int, event_id: str) -> None:
        """Remember an alert for the key."""
        self._put(key, [event_time_ms, event_id])


class FeedActivityCounter:
    """Per feed and minute of ingest time, what this worker normalised and dead-lettered.

    Flushed every few seconds as FeedActivity records to the single-partition feed watch,
    so silence and spikes are judged over every partition of a feed, not one worker's share.
    """

    SAMPLE_IDS: Final = 20

    def __init__(self, worker: str) -> None:
        self.worker = worker
        self._minutes: dict[tuple[str, str, int], dict[str, Any]] = {}
        self._flushes = 0

    def count(
        self, organisation_id: str, source_kind: str, ingest_ms: int, record_id: str,
        *, unmapped: bool = False, dead_letter: bool = False,
    ) -> None:
        """Count one stored event (unmapped or not) or one dead letter."""
        minute = ingest_ms - ingest_ms % 60_000
        entry = self._minutes.setdefault(
            (organisation_id, source_kind, minute),
            {"events": 0, "unmapped": 0, "dead_letters": 0, "last_ingest_time": ingest_ms,
             "last_record_id": record_id, "dead_letter_ids": [], "unmapped_ids": []},
        )
        if dead_letter:
            entry["dead_letters"] += 1
            if len(entry["dead_letter_ids"]) < self.SAMPLE_IDS:
                entry["dead_letter_ids"].append(record_id)
        else:
            entry["events"] += 1
            if unmapped:
                entry["unmapped"] += 1
                if len(entry["unmapped_ids"]) < self.SAMPLE_IDS:
                    entry["unmapped_ids"].append(record_id)
        if ingest_ms >= entry["last_ingest_time"]:
            entry["last_ingest_time"] = ingest_ms
            entry["last_record_id"] = record_id

    def flush(self) -> list[dict[str, Any]]:
        """The FeedActivity records counted since the last flush (then forgotten)."""
        self._flushes += 1
        records = [
            {"organisation_id": org, "source_kind": kind, "minute_start": minute,
             "worker": self.worker, "flush_seq": self._flushes, **entry}
            for (org, kind, minute), entry in sorted(self._minutes.items())
        ]
        self._minutes = {}
        return records


class NormaliseStage:
    """Turns one raw record into norm.*, alerts and dlq outputs."""

    def __init__(
        self,
        kafka: KafkaSettings,
        registry: serde.SchemaRegistry,
        terminology: Terminology | TerminologySource,
        pseudonymiser: Pseudonymiser,
        critical_rules: CriticalValueRules | ReloadingFile[CriticalValueRules],
        quality_rules_path: str | None = None,
        identity_key: bytes | None = None,
        rules_dir: Path | None = None,
    ) -> None:
        # A TerminologySource reloads the dictionary when its files change (no restart).
        self._terminology_source = (
            terminology if isinstance(terminology, TerminologySource) else None
        )
        self.terminology = (
            terminology.current() if isinstance(terminology, TerminologySource) else terminology
        )
        self.pseudonymiser = pseudonymiser
        # Likewise a ReloadingFile of critical value rules.
        self._critical_source: ReloadingFile[CriticalValueRules] | None = None
        if isinstance(critical_rules, ReloadingFile):
            self._critical_source = critical_rules
            self.critical_rules = critical_rules.current()
        else:
            self.critical_rules = critical_rules
        self.decoders = {
            kind: serde.AvroDeserializer(registry, subject)
            for kind, subject in serde.RAW_SUBJECT_BY_KIND.items()
        }
        self.encoders = {
            kind: serde.AvroSerializer(registry, subject)
            for kind, subject in serde.NORM_SUBJECT_BY_KIND.items()
        }
        self.lifecycle_inputs = LifecycleInputs(kafka, registry)
        self.encode_dead_letter = serde.AvroSerializer(registry, serde.DEAD_LETTER)
        self.norm_topics = {k: kafka.topic(t) for k, t in NORM_TOPICS.items()}
        self.dlq_topic = kafka.topic(DLQ_TOPIC)
        self.quality_topic = kafka.topic(FACT_TOPICS["quality_issue"])
        self.encode_quality_issue = serde.AvroSerializer(registry, serde.QUALITY_ISSUE)
        self.quality_rules = ReloadingFile(
            "quality",
            quality_rules_path or rule_file("quality.yaml", rules_dir),
            load_quality_rules,
        )
        self._quality = QualityChecker(self.quality_rules.current())
        #: Duplicate-detection state when the caller keeps none (tests, the benchmark).
        self.local_quality_state = DictState()
        # Device rules run here, on the raw device topic keyed by device id, so one
        # partition sees every packet of a device (norm.observation is keyed by patient).
        self.device_rules = ReloadingFile(
            "devices", rule_file("devices.yaml", rules_dir), load_device_rules
        )
        self._devices = DeviceDetector(self.device_rules.current())
        self.local_device_state = DictState()
        # The master patient index gets keyed tokens of each record's demographics; the
        # cache skips a record whose tokens did not change since it was last sent.
        self.tokeniser = IdentityTokeniser(identity_key) if identity_key else None
        self.identity_topic = kafka.topic(IDENTITY_TOPIC)
        self.encode_identity = serde.AvroSerializer(registry, serde.IDENTITY_OBSERVATION)
        self._identities_sent: OrderedDict[str, str] = OrderedDict()
        self.feed_activity = FeedActivityCounter(f"{os.getpid()}")
        self.feed_activity_topic = kafka.topic(FEED_ACTIVITY_TOPIC)
        self.encode_feed_activity = serde.AvroSerializer(registry, serde.FEED_ACTIVITY)
        self.unmapped_topic = kafka.topic(FACT_TOPICS["terminology_unmapped"])
        self.encode_unmapped = serde.AvroSerializer(registry, serde.UNMAPPED_CODE)
        self.internal_errors = InternalErrors(STAGE)

    def handle(
        self,
        source_kind: str,
        ctx: RawContext,
        key: bytes | None,
        value: bytes | None,
        suppression: SuppressionState,
        now_ms: int | None = None,
        quality_state: KeyValueState | None = None,
        device_state: KeyValueState | None = None,
    ) -> list[Output]:
        """Every output of one raw record; never raises for bad input (it is dead-lettered).

        A record that triggers a bug is dead-lettered whole (``internal_error``, partial
        outputs dropped) so it cannot crash the worker on every re-read; only failures that
        are not the record's fault (``NOT_THE_RECORDS_FAULT``) raise.

        Each event is checked against the data quality rules: every broken rule becomes a
        quality issue; an event with an error-severity issue is unusable and dead-lettered
        (reason_code ``quality_error``) instead of stored, one with warnings is stored.
        """
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        # State changes are staged, so a record that fails half-way leaves none behind.
        staged_quality = StagedState(
            quality_state if quality_state is not None else self.local_quality_state
        )
        staged_devices = StagedState(
            device_state if device_state is not None else self.local_device_state
        )
        staged_suppression, commit_suppression = suppression.staged()
        try:
            outputs = self._handle(
                source_kind, ctx, key, value, now_ms,
                (staged_suppression, staged_quality, staged_devices),
            )
        except NOT_THE_RECORDS_FAULT:
            raise
        except Exception as exc:
            # One record's bug must not stop the partition (see NOT_THE_RECORDS_FAULT): its
            # partial outputs are dropped and the whole raw record is dead-lettered.
            rejected = self.internal_errors.rejected(exc, ctx)
            return [self._dead_letter(ctx, key, value, rejected, source_kind, now_ms)]
        staged_quality.commit()
        staged_devices.commit()
        commit_suppression()
        self.internal_errors.succeeded(ctx.topic)
        return outputs

    def _handle(
        self,
        source_kind: str,
        ctx: RawContext,
        key: bytes | None,
        value: bytes | None,
        now_ms: int,
        state: tuple[SuppressionState, KeyValueState, KeyValueState],
    ) -> list[Output]:
        suppression, quality_state, device_state = state
        if self._terminology_source is not None:
            self.terminology = self._terminology_source.current()
        if self._critical_source is not None:
            self.critical_rules = self._critical_source.current()
        quality = self._quality_checker()
        try:
            raw = self.decoders[source_kind](value)
        except serde.SerializationError as exc:
            rejected = RecordRejected(None, None, "undecodable", str(exc))
            return [self._dead_letter(ctx, key, value, rejected, source_kind, now_ms)]
        outputs: list[Output] = []
        identities = patient_identities(source_kind, raw, self.pseudonymiser)
        known = known_identifiers(identities)
        first_event_id: str | None = None
        for outcome in normalise(
            source_kind, raw, ctx, self.terminology, self.pseudonymiser, now_ms
        ):
            if isinstance(outcome, NormalisedEvent):
                _scrub(outcome.value, known)
                first_event_id = first_event_id or outcome.value["event_id"]
                issues = quality.check(
                    outcome.kind, outcome.value, quality_state, now_ms, historic=outcome.historic
                )
                for issue in issues:
                    QUALITY_ISSUES.labels(issue.event_kind, issue.category, issue.severity).inc()
                    outputs.append(
                        Output(
                            self.quality_topic,
                            issue.event_id.encode(),
                            self.encode_quality_issue(issue.as_record()),
                        )
                    )
                errors = [issue for issue in issues if issue.severity == "error"]
                if errors:
                    value_of = outcome.value
                    rejected = RecordRejected(
                        value_of["record_index"],
                        value_of["record_count"],
                        "quality_error",
                        "; ".join(f"{issue.rule_id}: {issue.detail}" for issue in errors),
                        value_of["organisation_id"],
                    )
                    outputs.append(
                        self._dead_letter(ctx, key, value, rejected, source_kind, now_ms)
                    )
                    continue
                outputs.append(self._event(outcome))
                self.feed_activity.count(
                    outcome.value["organisation_id"], source_kind, ctx.timestamp_ms,
                    outcome.value["event_id"],
                    unmapped=outcome.value["mapping_status"] in ("unmapped", "partial"),
                )
                outputs.extend(self._unmapped_codes(outcome))
                if outcome.kind == "observation":
                    found = self._device_detector().observe(
                        outcome.value, device_state, now_ms
                    )
                    outputs.extend(self.lifecycle_inputs.outputs(found, now_ms, outcome.value))
                if raises_critical_alerts(outcome):
                    alert = self._detect(outcome.value, suppression, now_ms)
                    if alert is not None:
                        outputs.append(alert)
            else:
                outputs.append(self._dead_letter(ctx, key, value, outcome, source_kind, now_ms))
        if self.tokeniser is not None and first_event_id is not None:
            outputs.extend(self._identity_observations(identities, first_event_id, ctx))
        return outputs

    def _unmapped_codes(self, event: NormalisedEvent) -> list[Output]:
        """One worklist occurrence per local code of the event the terminology could not map."""
        value = event.value
        if value["mapping_status"] == "mapped":
            return []
        organisation_id = value["organisation_id"]
        outputs = []
        for system, local_code, display in unmapped_local_codes(
            event.kind, value, self.terminology
        ):
            status: str = self.terminology.status(organisation_id, system, local_code)
            if value["mapping_status"] == "unit_unmapped":
                status = "unit_unmapped"
            elif status == "mapped":
                continue
            UNMAPPED_CODES.labels(system).inc()
            # A unit gap is fixed with a unit alias: ranked codes would only mislead.
            candidates = (
                []
                if status == "unit_unmapped"
                else self.terminology.rank_candidates(system, display or local_code)
            )
            record = {
                "event_id": value["event_id"],
                "organisation_id": organisation_id,
                "source_kind": value["source_kind"],
                "source_system": value["source_system"],
                "code_system": system,
                "local_code": local_code,
                "local_display": display,
                "status": status,
                "event_time": value["event_time"],
                "ingest_time": value["ingest_time"],
                "mapping_version": value["mapping_version"],
                "candidate_codes": [c.code for c in candidates],
                "candidate_displays": [c.display for c in candidates],
                "candidate_scores": [round(c.score, 4) for c in candidates],
            }
            outputs.append(
                Output(self.unmapped_topic, organisation_id.encode(), self.encode_unmapped(record))
            )
        return outputs

    def _identity_observations(
        self, identities: list[PatientIdentity], event_id: str, ctx: RawContext
    ) -> list[Output]:
        assert self.tokeniser is not None
        outputs = []
        for identity in identities:
            if not has_demographics(identity):
                continue
            # A digest of what the record says (no clear value is kept): tokenising is
            # costly, and a patient's demographics rarely change between messages.
            fingerprint = hashlib.blake2b(
                "\x1f".join(
                    str(v) for v in (identity.national_id, identity.name, identity.birth_date,
                                     identity.sex, identity.phone)
                ).encode(),
                digest_size=16,
            ).hexdigest()
            if self._identities_sent.get(identity.record_key) == fingerprint:
                self._identities_sent.move_to_end(identity.record_key)
                continue
            self._identities_sent[identity.record_key] = fingerprint
            if len(self._identities_sent) > IDENTITY_CACHE_SIZE:
                self._identities_sent.popitem(last=False)
            observation = self.tokeniser.observation(
                identity.record_key,
                identity.organisation_id,
                event_id,
                ctx.timestamp_ms,
                identity.national_id,
                identity.name,
                identity.birth_date,
                identity.sex,
                identity.phone,
            )
            record = dict(observation)
            record["event_time"] = record.pop("event_time_ms", ctx.timestamp_ms)
            outputs.append(
                Output(
                    self.identity_topic,
                    identity.organisation_id.encode(),
                    self.encode_identity(record),
                )
            )
        return outputs

    def feed_activity_outputs(self) -> list[Output]:
        """This worker's feed activity since the last call, for the feed watch."""
        return [
            Output(
                self.feed_activity_topic,
                f"{record['organisation_id']}|{record['source_kind']}".encode(),
                self.encode_feed_activity(record),
            )
            for record in self.feed_activity.flush()
        ]

    def prune_quality_state(self, state: KeyValueState, newest_ingest_ms: int) -> int:
        """Forget duplicate keys whose window has passed; returns how many were dropped."""
        return self._quality_checker().prune(state, newest_ingest_ms)

    def device_tick(
        self, state: KeyValueState, now_ms: int, watching_since_ms: int = 0
    ) -> list[Output]:
        """Device silence (wall clock, after a whole limit of watching) and pruning of
        forgotten devices."""
        found = self._device_detector().tick(state, now_ms, watching_since_ms)
        return self.lifecycle_inputs.outputs(found, now_ms)

    def _device_detector(self) -> DeviceDetector:
        rules = self.device_rules.current()
        if rules is not self._devices.rules:
            self._devices = DeviceDetector(rules)
        return self._devices

    def _quality_checker(self) -> QualityChecker:
        rules = self.quality_rules.current()
        if rules is not self._quality.rules:
            self._quality = QualityChecker(rules)
        return self._quality

    def _event(self, event: NormalisedEvent) -> Output:
        # Our own output not matching our own schema is a bug: handle() dead-letters the record.
        encoded = self.encoders[event.kind](event.value)
        return Output(self.norm_topics[event.kind], event.key.encode(), encoded)

    def _detect(
        self, lab_result: dict[str, Any], suppression: SuppressionState, now_ms: int
    ) -> Output | None:
        finding = check_critical(lab_result, self.critical_rules, self.terminology.units)
        if finding is None:
            return None
        unreadable = isinstance(finding, UnreadableCritical)
        if unreadable:
            CRITICAL_UNREADABLE.labels(finding.rule.rule_id).inc()
        key = unreadable_subject(lab_result) if unreadable else suppression_key(lab_result)
        event_time = int(lab_result["event_time"])
        last = suppression.last_alert(key)
        replayed = last is not None and last[1] == lab_result["event_id"]
        if not replayed:
            last_time = last[0] if last is not None else None
            if is_suppressed(last_time, event_time, self.critical_rules.suppression_ms):
                return None
            suppression.record_alert(key, event_time, lab_result["event_id"])
        # A replayed message re-emits the same finding, which the lifecycle recognises.
        lineage = dict(lab_result, source_topic=lab_result["source_topic"])
        if isinstance(finding, UnreadableCritical):
            alert = unreadable_finding(lab_result, finding, self.critical_rules)
        else:
            alert = critical_finding(lab_result, finding, self.critical_rules)
        return self.lifecycle_inputs.finding(alert, now_ms, lineage)

    def _dead_letter(
        self,
        ctx: RawContext,
        key: bytes | None,
        value: bytes | None,
        rejected: RecordRejected,
        source_kind: str,
        now_ms: int,
    ) -> Output:
        record = dead_letter_record(STAGE, ctx, key, value or b"", rejected, source_kind, now_ms)
        DEAD_LETTERS.labels(STAGE, rejected.reason_code).inc()
        if record["organisation_id"]:
            self.feed_activity.count(
                record["organisation_id"], source_kind, ctx.timestamp_ms, record["dlq_id"],
                dead_letter=True,
            )
        return Output(self.dlq_topic, key, self.encode_dead_letter(record))
