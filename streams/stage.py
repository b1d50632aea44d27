"""The normalise stage for one raw record, without Faust: decode, normalise, detect, encode.

The Faust agents only iterate and send what this returns, so the whole per-record
behaviour (including dead-lettering and critical-value suppression) is testable without a
broker. Critical values are checked here, on the lab results this record produced, because
the raw HL7 topic is keyed by patient: the suppression state then lives in the partition
that owns the patient, and no second pass over norm.lab_result is needed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from medstream.metrics import DEAD_LETTERS
from medstream.settings import DLQ_TOPIC, NORM_TOPICS, KafkaSettings
from schemas import serde
from streams.critical_values import (
    CriticalValueRules,
    check_critical,
    critical_finding,
    is_suppressed,
    suppression_key,
)
from streams.detect import LifecycleInputs
from streams.detect import Output as Output
from streams.model import NormalisedEvent, RawContext, RecordRejected
from streams.normalise import dead_letter_record, normalise, raises_critical_alerts
from streams.pseudonym import Pseudonymiser
from streams.terminology import Terminology

STAGE = "normalise"


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

    def last_alert(self, key: str) -> tuple[int, str] | None:
        """(event time ms, triggering event id) of the last alert for the key, if any."""
        value = self._get(key)
        return None if value is None else (int(value[0]), str(value[1]))

    def record_alert(self, key: str, event_time_ms: int, event_id: str) -> None:
        """Remember an alert for the key."""
        self._put(key, [event_time_ms, event_id])


class NormaliseStage:
    """Turns one raw record into norm.*, alerts and dlq outputs."""

    def __init__(
        self,
        kafka: KafkaSettings,
        registry: serde.SchemaRegistry,
        terminology: Terminology,
        pseudonymiser: Pseudonymiser,
        critical_rules: CriticalValueRules,
    ) -> None:
        self.terminology = terminology
        self.pseudonymiser = pseudonymiser
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

    def handle(
        self,
        source_kind: str,
        ctx: RawContext,
        key: bytes | None,
        value: bytes | None,
        suppression: SuppressionState,
        now_ms: int | None = None,
    ) -> list[Output]:
        """Every output of one raw record; never raises for bad input (it is dead-lettered)."""
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        try:
            raw = self.decoders[source_kind](value)
        except serde.SerializationError as exc:
            rejected = RecordRejected(None, None, "undecodable", str(exc))
            return [self._dead_letter(ctx, key, value, rejected, source_kind, now_ms)]
        outputs: list[Output] = []
        for outcome in normalise(
            source_kind, raw, ctx, self.terminology, self.pseudonymiser, now_ms
        ):
            if isinstance(outcome, NormalisedEvent):
                outputs.append(self._event(outcome))
                if raises_critical_alerts(outcome):
                    alert = self._detect(outcome.value, suppression, now_ms)
                    if alert is not None:
                        outputs.append(alert)
            else:
                outputs.append(self._dead_letter(ctx, key, value, outcome, source_kind, now_ms))
        return outputs

    def _event(self, event: NormalisedEvent) -> Output:
        # Our own output not matching our own schema is a bug: it raises and the worker crashes.
        encoded = self.encoders[event.kind](event.value)
        return Output(self.norm_topics[event.kind], event.key.encode(), encoded)

    def _detect(
        self, lab_result: dict[str, Any], suppression: SuppressionState, now_ms: int
    ) -> Output | None:
        finding = check_critical(lab_result, self.critical_rules)
        if finding is None:
            return None
        key = suppression_key(lab_result)
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
        return self.lifecycle_inputs.finding(
            critical_finding(lab_result, finding, self.critical_rules), now_ms, lineage
        )

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
        return Output(self.dlq_topic, key, self.encode_dead_letter(record))
