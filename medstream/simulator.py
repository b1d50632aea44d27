"""Synthetic region simulator: a fictional region's hospitals, devices and payers as raw sources.

:class:`RegionSimulator` generates, purely and deterministically for a seed, the source
messages that the edge collectors of ``medstream/region.yaml`` would publish (EMR row
changes, HL7 ORU^R01 lab messages, device packets, claims) together with their ground
truth: one label per expected record outcome, including deliberately injected problems
(critical lab values, malformed records, unknown local codes, duplicate deliveries), and
one anomaly label per injected anomaly that a detection rule must find (NEWS2 episodes,
device, claim, feed and syndromic anomalies; see :data:`ANOMALY_KINDS`).
Ordinary data is built to raise no alert of any rule in ``streams/rules/``: the simulator
reads those rule files (and the terminology map) so that its ordinary values and its
injected anomalies follow the thresholds exactly.
:class:`SimulatorProducer` publishes them to the raw topics and writes a label only once
the broker has acknowledged its message, so the labels file is exactly what Kafka holds.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import json
import logging
import math
import random
import re
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

import yaml

from medstream.metrics import RECORDS_OUT, labelled
from medstream.published import PublishedLedger, new_run_id
from medstream.settings import RAW_TOPICS, KafkaSettings
from schemas.identity import event_id, national_id_check_digit
from schemas.serde import RAW_SUBJECT_BY_KIND, RUN_HEADER, AvroSerializer, SchemaRegistry

if TYPE_CHECKING:  # the stream rules are imported when a simulator is built, not on import
    from streams.claim_rules import ClaimRules
    from streams.device_rules import DeviceRules
    from streams.feed_rules import FeedRules
    from streams.news2 import BandedParameter, News2Rules, Spo2Parameter
    from streams.syndromic import SyndromicRules
    from streams.terminology import Terminology, UnitMapping

log = logging.getLogger("medstream.simulator")
DEFAULT_REGION_PATH: Final = Path(__file__).resolve().parent / "region.yaml"

#: Source kinds in the order of RAW_TOPICS; each has one raw topic and one Avro subject.
SOURCE_KINDS: Final = ("emr_cdc", "hl7_lab", "device", "claim")
RAW_SUBJECTS: Final = RAW_SUBJECT_BY_KIND
#: Target share of clinical records per source kind. Device records follow the devices'
#: wall-clock cadence instead (see RegionSimulator); this share sizes the active fleet
#: when the caller states its rate.
RECORD_MIX: Final = {"hl7_lab": 0.35, "device": 0.35, "emr_cdc": 0.15, "claim": 0.15}

#: Injected problem kinds. The rotation below is shuffled once per cycle, so every kind
#: appears after len(PROBLEM_ROTATION) problems; criticals and duplicates come twice.
PROBLEM_KINDS: Final = (
    "critical",              # a critical lab value that must raise exactly one alert
    "critical_haemolysed",   # critical potassium on a haemolysed specimen: no alert
    "critical_unmapped",     # critical value on an unmapped local test code: no alert
    "undecodable",           # (a) bytes that are not Confluent-framed Avro
    "invalid_hl7",           # (b) a valid Hl7Message whose payload is not HL7
    "nonnumeric_obx",        # (c) an NM OBX with a text value
    "negative_claim_amount",  # (d) a claim line with a negative amount
    "invalid_admit_time",    # (e) a patient_visit row with an unusable admit_time
    "unmapped_lab",          # lab test code unknown to the terminology map
    "unmapped_diagnosis",    # diagnosis code unknown to the terminology map
    "unmapped_claim_item",   # claim item code unknown to the terminology map
    "duplicate",             # the same message delivered a second time
)
PROBLEM_ROTATION: Final = PROBLEM_KINDS + ("critical", "duplicate")

#: Injected anomaly kinds (each one anomaly label, rule id in ANOMALY_RULES). They rotate
#: like the problems, with their own share (``anomaly_rate``). Not in the rotation: the
#: syndromic ILI outbreak, injected once at the start of a run (it needs a baseline history
#: before any other diagnosis of its district), and feed silence is skipped unless the
#: caller says the run is long enough (``long_run_s``).
ANOMALY_KINDS: Final = (
    "news2_urgent",              # NEWS2 total 5-6 or a single parameter scoring 3
    "news2_emergency",           # NEWS2 total >= 7
    "device_out_of_range",       # one sample beyond a device alarm limit
    "device_flat_line",          # a metric frozen for the flat-line sample count and duration
    "device_silence",            # a device stops sending for good (a new one replaces it)
    "claims_exact_duplicate",    # a claim line billed again on another claim
    "claims_near_duplicate",     # ... re-dated by a day
    "claims_cost_outlier",       # a unit price far from the item's recent prices
    "claims_after_death",        # a service dated after the person's recorded death
    "claims_outside_encounter",  # a service dated days before its visit began
    "feed_silence",              # one organisation's EMR feed stops for good
    "feed_dead_letter_spike",    # one organisation's lab feed sends many unusable messages
    "feed_unmapped_spike",       # ... or many results under a test code nobody mapped
)
ANOMALY_ROTATION: Final = ANOMALY_KINDS
ANOMALY_RULES: Final = {
    "news2_urgent": "news2.urgent",
    "news2_emergency": "news2.emergency",
    "device_out_of_range": "device.out_of_range",
    "device_flat_line": "device.flat_line",
    "device_silence": "device.silence",
    "claims_exact_duplicate": "claims.exact_duplicate",
    "claims_near_duplicate": "claims.near_duplicate",
    "claims_cost_outlier": "claims.cost_outlier",
    "claims_after_death": "claims.after_death",
    "claims_outside_encounter": "claims.outside_encounter",
    "feed_silence": "feed.silence",
    "feed_dead_letter_spike": "feed.dead_letter_spike",
    "feed_unmapped_spike": "feed.unmapped_spike",
    "syndromic_ili": "syndromic.ili",
}
#: Rules that fire on a statistic of many records rather than on the records themselves.
STATISTICAL_RULES: Final = frozenset({
    "claims.cost_outlier", "syndromic.ili", "feed.dead_letter_spike", "feed.unmapped_spike",
})

MAX_EVENT_DELAY_MS: Final = 600_000
#: Rounds of samples (one value of every metric) per device packet: a packet is due every
#: PACKET_ROUNDS x sample interval, half the silence threshold of devices.yaml (4 intervals).
PACKET_ROUNDS: Final = 2
#: Ordinary samples never repeat a value more often than this in a row (flat-line rule).
MAX_REPEATS: Final = 3
#: Ordinary claim prices: the tariff x (1 + PRICE_NOISE x s), s cycling through
#: PRICE_POINTS evenly spaced points of (-1, 1) per organisation and item, so any 20
#: consecutive prices of an item span the whole band and no ordinary price has a robust z
#: above about 2 (claims.yaml flags 3.5).
PRICE_NOISE: Final = 0.05
PRICE_POINTS: Final = 10
#: Background syndromic diagnoses: one per district and syndrome every hour of wall clock,
#: so ordinary hours never reach the syndromic min_count (ILI 5, GI 3).
SYNDROME_BACKGROUND_MS: Final = 3_600_000
#: Extra ILI diagnoses in the outbreak hour, on top of the background one.
OUTBREAK_EXTRA_CASES: Final = 11
#: Feed silence is injected only when the run lasts this much longer than the threshold
#: (or, for thresholds shorter than this, than twice the threshold).
FEED_SILENCE_MARGIN_MS: Final = 600_000
#: A spike episode makes this many times feeds.yaml's min_rate of its feed's records bad.
SPIKE_RATE_FACTOR: Final = 3.0
#: A spike episode lasts this many spike windows, so one whole window lies inside it.
SPIKE_EPISODE_WINDOWS: Final = 2
#: After an episode its feed is left alone this many windows (the baseline recovers).
SPIKE_REST_WINDOWS: Final = 4
#: The feed watch judges closed windows on a timer; the run must outlast this as well.
FEED_JUDGE_SLACK_MS: Final = 45_000
#: A device silence is injected only this long (plus its threshold) before the run ends,
#: so the silence becomes detectable while the pipeline still runs.
DEVICE_SILENCE_MARGIN_MS: Final = 30_000
_HOUR_MS: Final = 3_600_000
_DAY_MS: Final = 86_400_000
_CST: Final = timezone(timedelta(hours=8))
_HL7_DELIMITERS: Final = frozenset("|^~\\&\r")
_KIND_BY_TABLE: Final = {"patient_visit": "encounter", "visit_diagnosis": "diagnosis"}
_NON_NUMERIC_VALUES: Final = ("see note", "pending", "见备注", "Test not performed")
_INVALID_ADMIT_TIMES: Final = ("0000-00-00 00:00:00", "unknown", "2026-13-45T25:61:00+08:00")
_RECENT_CLEAN: Final = 32
_RECENT_CLAIMS: Final = 64
_MIN_OPEN_VISITS: Final = 6
_MAX_OPEN_VISITS: Final = 80
_VISIT_PREFIX: Final = {"I": "ZY", "O": "MZ", "E": "JZ"}  # 住院 / 门诊 / 急诊 numbers
#: A fleet is scaled to the caller's rate at most this much beyond region.yaml.
_MAX_FLEET_SCALE: Final = 100.0
#: An anomaly kind that cannot be injected yet is retried this often before it is dropped.
_MAX_ANOMALY_DEFERRALS: Final = 200


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


# --- the rules the simulator must satisfy ----------------------------------------------------


@dataclass(frozen=True)
class RuleReference:
    """The detection rules and terminology the simulator's data is built against."""

    news2: News2Rules
    devices: DeviceRules
    claims: ClaimRules
    feeds: FeedRules
    syndromic: SyndromicRules
    terminology: Terminology


@functools.lru_cache(maxsize=4)
def load_rule_reference(rules_dir: Path | None = None) -> RuleReference:
    """The rule files the stream workers run with and the terminology map (loaded once).

    The simulator is a test tool, not an edge collector: it reads the stream stage's rules
    (a site's ``rules_dir`` over the shipped streams/rules) so that ordinary data stays
    inside every threshold and anomalies cross exactly one.
    """
    from streams.claim_rules import load_claim_rules
    from streams.device_rules import load_device_rules
    from streams.feed_rules import load_feed_rules
    from streams.news2 import load_news2_rules
    from streams.rules_file import rule_file
    from streams.syndromic import load_syndromic_rules
    from streams.terminology import load_terminology

    return RuleReference(
        news2=load_news2_rules(rule_file("news2.yaml", rules_dir)),
        devices=load_device_rules(rule_file("devices.yaml", rules_dir)),
        claims=load_claim_rules(rule_file("claims.yaml", rules_dir)),
        feeds=load_feed_rules(rule_file("feeds.yaml", rules_dir)),
        syndromic=load_syndromic_rules(rule_file("syndromic.yaml", rules_dir)),
        terminology=load_terminology(),
    )


#: Kinds sent in RECORD_MIX proportions whenever no device packet is due.
_UNSCHEDULED_KINDS: Final = ("emr_cdc", "hl7_lab", "claim")
#: Quantities billed: one item is billed to a person at most once per quantity, and any
#: two of these differ by 25 % or more, beyond claims.yaml's near_amount_pct (10 %) plus
#: twice the price noise.
_QUANTITIES: Final = (1, 2, 3, 4, 6, 10, 14, 20, 28)


def value_of(message: SimulatedMessage) -> dict[str, Any]:
    """The raw record of a well-formed message (raises for deliberately malformed bytes)."""
    if not isinstance(message.value, dict):
        raise TypeError("the message is deliberately malformed bytes, not a raw record")
    return message.value


def _org_of(message: SimulatedMessage) -> str:
    """The organisation of a message (from its key when the value is not decodable)."""
    if isinstance(message.value, dict):
        return str(message.value["organisation_id"])
    return message.key.decode().partition(":")[0]
# --- national ID numbers (synthetic) ------------------------------------------------------


# --- the region (medstream/region.yaml)  -----------------------------------------------------


@dataclass(frozen=True)
class LabTest:
    """A hospital's local lab test, with ranges in its local unit."""

    code: str
    display: str
    analyte: str
    unit: str
    normal: tuple[float, float]
    critical: tuple[float | None, float | None]
    decimals: int
    unmapped: bool


@dataclass(frozen=True)
class LabPanel:
    """An orderable panel: several tests reported in one ORU^R01 message."""

    code: str
    display: str
    tests: tuple[LabTest, ...]
    weight: float


@dataclass(frozen=True)
class DeviceMetric:
    """One metric a device family reports, in the device's local unit."""

    code: str
    analyte: str
    unit: str
    normal: tuple[float, float]
    decimals: int


@dataclass(frozen=True)
class DeviceType:
    """A device model family; its metric codes select the terminology metric map."""

    device_type: str
    display: str
    sample_interval_s: int
    metrics: tuple[DeviceMetric, ...]


@dataclass(frozen=True)
class Department:
    """A local department and the visit types (I/O/E) it receives."""

    code: str
    display: str
    visit_types: tuple[str, ...]


@dataclass(frozen=True)
class CodedItem:
    """A local diagnosis or claim item code; unmapped ones are absent from terminology.yaml."""

    code: str
    display: str
    unmapped: bool
    kind: str = ""
    unit_price: float = 0.0


@dataclass(frozen=True)
class Hospital:
    """One hospital with its own source systems, local codes and units."""

    organisation_id: str
    name: str
    weight: float
    his_source_system: str
    device_gateway: str
    mrn_format: str
    initial_patients: int
    specimen_segment: str
    departments: tuple[Department, ...]
    diagnoses: tuple[CodedItem, ...]
    lab_tests: dict[str, LabTest]
    lab_panels: tuple[LabPanel, ...]
    devices: tuple[tuple[str, int], ...]
    claim_items: tuple[CodedItem, ...]


@dataclass(frozen=True)
class Payer:
    """An insurer submitting claims for any hospital's patients."""

    payer_id: str
    name: str
    source_system: str
    weight: float


@dataclass(frozen=True)
class AlertingAnalyte:
    """An analyte with a regional critical-value rule."""

    analyte: str
    rule_id: str
    sides: tuple[str, ...]
    excluded_specimen: str | None


@dataclass(frozen=True)
class Region:
    """The whole fictional region as loaded from region.yaml."""

    version: str
    name: str
    reference_date: date
    national_id_area_code: str
    alerting: dict[str, AlertingAnalyte]
    specimen_conditions: dict[str, str]
    surnames: tuple[tuple[str, str], ...]
    given_names: tuple[tuple[str, str], ...]
    device_types: dict[str, DeviceType]
    hospitals: tuple[Hospital, ...]
    payers: tuple[Payer, ...]


def _range(values: Sequence[Any]) -> tuple[float | None, float | None]:
    low, high = values
    return (None if low is None else float(low), None if high is None else float(high))


def _normal(values: Sequence[Any]) -> tuple[float, float]:
    low, high = values
    return float(low), float(high)


def load_region(path: Path | None = None) -> Region:
    """Read and check region.yaml (panels name known tests, every hospital can be simulated)."""
    path = path or DEFAULT_REGION_PATH
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    device_types = {
        name: DeviceType(
            name,
            str(spec["display"]),
            int(spec["sample_interval_s"]),
            tuple(
                DeviceMetric(
                    str(code), str(m["analyte"]), str(m["unit"]), _normal(m["normal"]),
                    int(m["decimals"]),
                )
                for code, m in spec["metrics"].items()
            ),
        )
        for name, spec in document["device_types"].items()
    }
    hospitals = []
    for spec in document["hospitals"]:
        org = str(spec["organisation_id"])
        tests = {
            str(code): LabTest(
                str(code), str(t["display"]), str(t["analyte"]), str(t["unit"]),
                _normal(t["normal"]), _range(t["critical"]), int(t["decimals"]),
                bool(t.get("unmapped", False)),
            )
            for code, t in spec["lab_tests"].items()
        }
        panels = []
        for code, p in spec["lab_panels"].items():
            missing = [str(c) for c in p["tests"] if str(c) not in tests]
            if missing:
                raise ValueError(f"{path}: {org} panel {code} names unknown tests {missing}")
            panels.append(
                LabPanel(str(code), str(p["display"]), tuple(tests[str(c)] for c in p["tests"]),
                         float(p["weight"]))
            )
        for device_type in spec["devices"]:
            if device_type not in device_types:
                raise ValueError(f"{path}: {org} runs unknown device type {device_type}")
        hospitals.append(
            Hospital(
                organisation_id=org,
                name=str(spec["name"]),
                weight=float(spec["weight"]),
                his_source_system=str(spec["his_source_system"]),
                device_gateway=str(spec["device_gateway"]),
                mrn_format=str(spec["mrn_format"]),
                initial_patients=int(spec["initial_patients"]),
                specimen_segment=str(spec["specimen_segment"]),
                departments=tuple(
                    Department(str(code), str(d["display"]), tuple(d["visit_types"]))
                    for code, d in spec["departments"].items()
                ),
                diagnoses=tuple(
                    CodedItem(str(code), str(d["display"]), bool(d.get("unmapped", False)))
                    for code, d in spec["diagnoses"].items()
                ),
                lab_tests=tests,
                lab_panels=tuple(panels),
                devices=tuple((str(k), int(v)) for k, v in spec["devices"].items()),
                claim_items=tuple(
                    CodedItem(str(code), str(i["display"]), bool(i.get("unmapped", False)),
                              str(i["kind"]), float(i["unit_price"]))
                    for code, i in spec["claim_items"].items()
                ),
            )
        )
    alerting = {
        str(name): AlertingAnalyte(
            str(name), str(a["rule_id"]), tuple(a["sides"]), a.get("excluded_specimen")
        )
        for name, a in document["alerting"].items()
    }
    names = document["names"]
    region = Region(
        version=str(document["version"]),
        name=str(document["region"]["name"]),
        reference_date=date.fromisoformat(str(document["region"]["reference_date"])),
        national_id_area_code=str(document["region"]["national_id_area_code"]),
        alerting=alerting,
        specimen_conditions={str(k): str(v) for k, v in document["specimen_conditions"].items()},
        surnames=tuple((str(zh), str(py)) for zh, py in names["surnames"]),
        given_names=tuple((str(zh), str(py)) for zh, py in names["given"]),
        device_types=device_types,
        hospitals=tuple(hospitals),
        payers=tuple(
            Payer(str(p["payer_id"]), str(p["name"]), str(p["source_system"]), float(p["weight"]))
            for p in document["payers"]
        ),
    )
    _check_region(region, path)
    return region


def _check_region(region: Region, path: Path) -> None:
    """Every hospital must be able to produce every injected problem."""
    if len(region.national_id_area_code) != 6 or not region.national_id_area_code.isdigit():
        raise ValueError(f"{path}: national_id_area_code must be 6 digits")
    for hospital in region.hospitals:
        org = hospital.organisation_id
        tests = hospital.lab_tests.values()
        if not any(t.unmapped and t.analyte in region.alerting for t in tests):
            raise ValueError(f"{path}: {org} needs an unmapped test of an alerting analyte")
        if not any(d.unmapped for d in hospital.diagnoses) or not any(
            i.unmapped for i in hospital.claim_items
        ):
            raise ValueError(f"{path}: {org} needs unmapped diagnoses and claim items")
        if not any(len(p.tests) > 1 for p in hospital.lab_panels):
            raise ValueError(f"{path}: {org} needs a panel of several tests")
        for panel in hospital.lab_panels:
            if any(t.unmapped for t in panel.tests):
                raise ValueError(f"{path}: {org} panel {panel.code} holds an unmapped test")
        for panel in hospital.lab_panels:
            for text in (panel.code, panel.display):
                if _HL7_DELIMITERS.intersection(text):
                    raise ValueError(f"{path}: {org} panel {text!r} holds an HL7 delimiter")
        for test in tests:
            # These go into ER7 fields unescaped: a "^" in 10^9/L would split OBX-6.
            for text in (test.code, test.display, test.unit):
                if _HL7_DELIMITERS.intersection(text):
                    raise ValueError(f"{path}: {org} lab test {text!r} holds an HL7 delimiter")
            low, high = test.critical
            if (low is not None and low >= test.normal[0]) or (
                high is not None and high <= test.normal[1]
            ):
                raise ValueError(f"{path}: {org} test {test.code}: critical inside normal range")




# --- generated state ------------------------------------------------------------------------


@dataclass(frozen=True)
class AnomalyLabel:
    """Ground truth of one injected anomaly, written once its last needed record is acked.

    ``event_ids`` are the records that make the rule fire (for a silence: the last record
    before it); ``delay_ms`` is how long after that acknowledgement the rule can see it
    (0, or the silence threshold of the rule).
    """

    rule_id: str
    source_kind: str
    organisation_id: str
    subject: str | None
    event_ids: tuple[str, ...]
    delay_ms: int = 0

    def line(self, acknowledged_ms: int) -> dict[str, Any]:
        """The JSON label line; record-label fields are present (null) so readers of either
        kind of line can rely on them."""
        return {
            "source_kind": self.source_kind,
            "organisation_id": self.organisation_id,
            "source_ref": None,
            "record_index": None,
            "record_count": None,
            "event_id": None,
            "kind": None,
            "expect": "anomaly",
            "reason_code": None,
            "critical_rule": None,
            "critical_suppressed_reason": None,
            "unmapped": False,
            "duplicate_delivery": False,
            "rule_id": self.rule_id,
            "subject": self.subject,
            "event_ids": list(self.event_ids),
            "statistical": self.rule_id in STATISTICAL_RULES,
            "detectable_from_ms": acknowledged_ms + self.delay_ms,
        }


@dataclass(frozen=True)
class SimulatedMessage:
    """One source message as an edge collector would publish it, with its ground truth.

    ``key`` is ``organisation_id:patient MRN`` so one patient's events keep their order
    (device packets: the device id, as the device collector keys them); ``value`` is a raw
    record dict matching the source kind's raw Avro schema, or bytes for a deliberately
    malformed record published as is; ``labels`` hold one expected outcome per clinical
    record (one line for a message that must fail whole); ``anomalies`` the anomalies whose
    last needed record this message carries.
    """

    source_kind: str
    key: bytes
    value: dict[str, Any] | bytes
    labels: list[dict[str, Any]]
    anomalies: tuple[AnomalyLabel, ...] = ()


@dataclass(eq=False)
class _Person:
    id_number: str
    name_zh: str
    family: str
    given: str
    birth_date: date
    sex: str
    # NEWS2 scores a person (every hospital's records of them), so both marks are per person.
    # A NEWS2 episode is armed for the person: no other device may report for them.
    episode: bool = False
    # A device sent an out-of-range vital sign for the person: it may still be held and
    # scored, so the person is given no NEWS2 episode (its plan assumes a clean slate).
    out_of_range_sent: bool = False
    # At most one episode per person: their NEWS2 alert stays open until staff resolve it.
    news2_given: bool = False


@dataclass(eq=False)
class _Visit:
    visit_no: str
    patient: _Patient
    visit_type: str
    admit_ms: int
    last_ms: int
    row: dict[str, str | None]
    diagnoses: list[dict[str, str | None]] = field(default_factory=list)
    last_event_id: str | None = None


@dataclass(eq=False)
class _Patient:
    organisation_id: str
    mrn: str
    person: _Person
    visit: _Visit | None = None
    # Claim items billed to the patient: never billed twice across claims (no duplicates).
    billed: set[str] = field(default_factory=set)
    dead: bool = False

    @property
    def episode(self) -> bool:
        """The person is in a NEWS2 episode (armed at any of their hospitals)."""
        return self.person.episode

    @property
    def key(self) -> bytes:
        return f"{self.organisation_id}:{self.mrn}".encode()


@dataclass
class _FlatRun:
    """A metric frozen at ``value`` for ``remaining`` more samples (an injected flat line)."""

    code: str
    loinc: str
    value: float
    remaining: int
    event_ids: list[str] = field(default_factory=list)


@dataclass(eq=False)
class _Device:
    device_id: str
    device_type: DeviceType
    hs: _HospitalState
    next_packet: int = 1
    patient: _Patient | None = None
    due_ms: int = 0
    last_values: dict[str, float] = field(default_factory=dict)
    repeats: dict[str, int] = field(default_factory=dict)
    armed: str | None = None  # an anomaly kind for the next packet
    armed_metric: str | None = None
    flat: _FlatRun | None = None
    silenced: bool = False
    # After a NEWS2 episode: metric codes to send first in the next packet, highest score
    # first, so the patient's level falls without passing through a lower alert level.
    recovery: list[str] | None = None

    @property
    def free(self) -> bool:
        """No anomaly under way on this device."""
        return (
            self.armed is None and self.flat is None and self.recovery is None
            and not self.silenced
        )


class _HospitalState:
    """Counters, patients, open visits and devices of one hospital, plus lookup lists."""

    def __init__(self, hospital: Hospital, region: Region, reference: RuleReference) -> None:
        self.hospital = hospital
        self.org = hospital.organisation_id
        self.patients: list[_Patient] = []
        self.patient_by_person: dict[str, _Patient] = {}
        self.open_visits: list[_Visit] = []
        self.devices: list[_Device] = []
        self.device_seq: dict[str, int] = {}
        self.mrn_seq = 10_000
        self.visit_seq = 0
        self.diag_seq = 0
        self.position_seq = 0
        self.transaction_id = 41_000
        self.last_commit_ms = 0
        self.control_seq = 0
        self.order_seq = 0
        tests = list(hospital.lab_tests.values())
        self.panels = list(hospital.lab_panels)
        self.panel_weights = list(itertools.accumulate(p.weight for p in self.panels))
        self.multi_panels = [p for p in self.panels if len(p.tests) > 1]
        self.panels_by_test: dict[str, list[LabPanel]] = {}
        for panel in self.panels:
            for test in panel.tests:
                self.panels_by_test.setdefault(test.code, []).append(panel)
        self.mapped_tests_by_analyte: dict[str, list[LabTest]] = {}
        for test in tests:
            if not test.unmapped and test.code in self.panels_by_test:
                self.mapped_tests_by_analyte.setdefault(test.analyte, []).append(test)
        self.unmapped_tests = [t for t in tests if t.unmapped]
        self.unmapped_alerting_tests = [
            t for t in self.unmapped_tests if t.analyte in region.alerting
        ]
        self.departments = list(hospital.departments)
        # Diagnoses that count for a syndrome are only sent on a cadence (or in an outbreak):
        # ordinary random diagnoses never use them, so hourly counts stay far below the
        # syndromic thresholds whatever the rate.
        terminology, syndromic = reference.terminology, reference.syndromic
        self.syndrome_diagnoses: dict[str, list[CodedItem]] = {}
        self.mapped_diagnoses: list[CodedItem] = []
        for diagnosis in hospital.diagnoses:
            if diagnosis.unmapped:
                continue
            syndromes = syndromic.syndromes_of(terminology.diagnosis(self.org, diagnosis.code))
            for syndrome in syndromes:
                self.syndrome_diagnoses.setdefault(syndrome.syndrome, []).append(diagnosis)
            if not syndromes:
                self.mapped_diagnoses.append(diagnosis)
        self.unmapped_diagnoses = [d for d in hospital.diagnoses if d.unmapped]
        self.mapped_items = [i for i in hospital.claim_items if not i.unmapped]
        self.unmapped_items = [i for i in hospital.claim_items if i.unmapped]
        # The cost-outlier window is per organisation and STANDARD item code.
        self.standard_item = {
            i.code: terminology.claim_item(self.org, i.code) or "" for i in self.mapped_items
        }
        self.price_cycle: dict[str, list[float]] = {}
        self.price_count: dict[str, int] = {}


def _label(
    source_kind: str,
    organisation_id: str,
    source_ref: str,
    record_index: int | None,
    record_count: int | None,
    kind: str | None,
    *,
    expect: str = "stored",
    reason_code: str | None = None,
    critical_rule: str | None = None,
    critical_suppressed_reason: str | None = None,
    unmapped: bool = False,
) -> dict[str, Any]:
    """One ground-truth line: the expected outcome of one record (or of a whole message)."""
    return {
        "source_kind": source_kind,
        "organisation_id": organisation_id,
        "source_ref": source_ref,
        "record_index": record_index,
        "record_count": record_count,
        "event_id": None if record_index is None else event_id(
            source_kind, organisation_id, source_ref, record_index
        ),
        "kind": kind,
        "expect": expect,
        "reason_code": reason_code,
        "critical_rule": critical_rule,
        "critical_suppressed_reason": critical_suppressed_reason,
        "unmapped": unmapped,
        "duplicate_delivery": False,
    }


def _cst(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, _CST)


def _hl7_ts(ms: int) -> str:
    return _cst(ms).strftime("%Y%m%d%H%M%S") + "+0800"


def _iso(ms: int) -> str:
    return _cst(ms).isoformat(timespec="seconds")


def _fmt(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


def _segment(name: str, fields: dict[int, str]) -> str:
    """An ER7 segment from 1-based field positions (gaps become empty, trailing ones dropped)."""
    last = max(i for i, text in fields.items() if text)
    return "|".join([name, *(fields.get(i, "") for i in range(1, last + 1))])


@dataclass
class _Observation:
    """One OBX to be written, with its label expectations."""

    test: LabTest
    value_text: str
    flag: str
    expect: str = "stored"
    critical_rule: str | None = None
    suppressed: str | None = None



class RegionSimulator:
    """Deterministic for a given seed and clock sequence (content never depends on the
    absolute time, only timestamps do).

    Generates the raw source messages of the region in region.yaml, about ``problem_rate``
    of them carrying an injected problem and about ``anomaly_rate`` an injected anomaly,
    each with its ground truth.

    Devices: every active device sends a packet of PACKET_ROUNDS sample rounds each
    PACKET_ROUNDS x its sample interval on the clock passed to :meth:`messages` (due packets
    go first), so no ordinary device is ever silent for devices.yaml's missed_intervals x
    interval as long as the caller keeps up. The active fleet is sized to the caller's
    ``records_per_second``: devices then make about RECORD_MIX["device"] of the records. A
    rate too low for region.yaml's fleet REDUCES the active device count (down to none at
    very low rates; device anomalies are then not injected), a higher one adds devices (at
    most x100); None keeps region.yaml's counts (at high unthrottled rates devices are then
    a small share of the records). Other source kinds fill the remaining messages in their
    RECORD_MIX proportions.

    Anomalies (ANOMALY_KINDS) need history: cost outliers need claims.yaml min_samples (20)
    earlier prices of the item at the organisation in the same run, NEWS2 episodes an open
    inpatient visit and an active monitor; a kind not yet possible is retried later. The
    syndromic ILI outbreak (``syndromic_outbreak``) is the first thing a run sends: a CDC
    snapshot of one diagnosis per hour over warmup_hours + 1 past hours of one district, a
    step of extra ILI cases three hours ago, then two later hours that close it. Feed silence
    is only injected when the rest of the run (``long_run_s``: how long the caller will run,
    in seconds) outlasts the feeds.yaml threshold of the EMR feed (30 min shipped) by
    FEED_SILENCE_MARGIN_MS (or by the threshold, when that is shorter). Feed spikes need a
    known ``records_per_second`` and a run that outlasts SPIKE_EPISODE_WINDOWS spike windows
    (15 min shipped) plus FEED_JUDGE_SLACK_MS; a site's ``rules_dir`` may shorten both.
    """

    def __init__(
        self,
        seed: int,
        region_path: Path | None = None,
        problem_rate: float = 0.02,
        max_patients_per_hospital: int = 20_000,
        *,
        anomaly_rate: float = 0.005,
        records_per_second: float | None = None,
        long_run_s: float | None = None,
        syndromic_outbreak: bool = True,
        rules_dir: Path | None = None,
        run_id: str | None = None,
    ) -> None:
        if not 0.0 <= problem_rate <= 1.0:
            raise ValueError("problem_rate must be between 0 and 1")
        if not 0.0 <= anomaly_rate <= 1.0:
            raise ValueError("anomaly_rate must be between 0 and 1")
        if records_per_second is not None and records_per_second <= 0:
            raise ValueError("records_per_second must be positive")
        self.region = load_region(region_path)
        self.reference = load_rule_reference(rules_dir)
        self.problem_rate = problem_rate
        self.anomaly_rate = anomaly_rate
        self.long_run_s = long_run_s
        self.syndromic_outbreak = syndromic_outbreak and anomaly_rate > 0
        self._rng = random.Random(seed)
        # Bounds memory in an endless run (`make run`): past it, admissions reuse patients.
        self.max_patients_per_hospital = max_patients_per_hospital
        # Source ids (control ids, packet ids, visit and claim numbers, CDC positions) carry
        # the seed and the run id, so no two runs reuse an id, as real senders don't: a
        # second run of the same seed sends the same content under new ids. Within a run
        # ids are deterministic, so a duplicate delivery repeats its original's ids.
        self.seed = seed
        self.run_id = run_id if run_id is not None else new_run_id()
        if not re.fullmatch(r"[A-Za-z0-9]{1,16}", self.run_id):
            raise ValueError("run_id must be 1 to 16 letters or digits (it is part of source ids)")
        self.id_tag = f"S{seed}R{self.run_id}"
        self._hospitals = [
            _HospitalState(h, self.region, self.reference) for h in self.region.hospitals
        ]
        self._hospital_weights = list(
            itertools.accumulate(h.weight for h in self.region.hospitals)
        )
        self._payer_weights = list(itertools.accumulate(p.weight for p in self.region.payers))
        self._claim_seq = dict.fromkeys((p.payer_id for p in self.region.payers), 0)
        self._persons: list[_Person] = []
        self._id_sequence: dict[date, int] = {}
        # (person id number, analyte) pairs that got a critical value / an out-of-range value:
        # a person gets at most one critical per analyte and nothing else out of range for it.
        self._critical_used: set[tuple[str, str]] = set()
        self._abnormal_seen: set[tuple[str, str]] = set()
        self._recent_clean: deque[SimulatedMessage] = deque(maxlen=_RECENT_CLEAN)
        self._recent_claims: deque[tuple[_HospitalState, _Patient, dict[str, Any], list[str]]]
        self._recent_claims = deque(maxlen=_RECENT_CLAIMS)
        self._problem_debt = 0.0
        self._problem_queue: list[str] = []
        self._pending_problem: str | None = None
        self._pending_attempts = 0
        self._anomaly_debt = 0.0
        self._anomaly_queue: list[str] = []
        self._anomaly_deferrals: dict[str, int] = {}
        self._undecodable_seq = 0
        self._kind_weights = self._source_kind_weights()
        self._followups: deque[SimulatedMessage] = deque()
        self._started: int | None = None
        self._device_heap: list[tuple[int, int, _Device]] = []
        self._heap_seq = itertools.count()
        self._background: list[tuple[int, int, str, str]] = []
        self._silent_feeds: set[tuple[str, str]] = set()
        self._feed_silence_armed: tuple[str, str] | None = None
        self._feed_silence_done = False
        self.records_per_second = records_per_second
        # Feed spike episodes under way, per rule id: (organisation, until ms, share of the
        # feed's messages made bad, the anomaly label waiting for its first bad message).
        self._feed_spikes: dict[str, tuple[str, int, float, AnomalyLabel | None]] = {}
        self._feed_spike_rest_until: dict[str, int] = {}
        self._vital_cache: dict[tuple[str, str, str, str], list[float]] = {}
        self.fleet_scale = self._fleet_scale(records_per_second)
        for hs in self._hospitals:
            for _ in range(hs.hospital.initial_patients):
                self._register(hs)
            for device_type, count in hs.hospital.devices:
                active = min(999, round(count * self.fleet_scale))
                for _ in range(active):
                    self._new_device(hs, self.region.device_types[device_type])

    # -- the public generator ----------------------------------------------------------

    def messages(
        self, events: int, now_ms: Callable[[], int] = _wall_clock_ms
    ) -> Iterator[SimulatedMessage]:
        """Yield source messages until at least `events` clinical records were generated.

        A clinical record is one record of a message (one OBX, one sample, one claim line,
        one row change; a message that fails whole counts as one). Duplicate deliveries
        repeat records already counted and do not count again. ``now_ms`` is the wall clock
        the devices' and background cadences follow (the publisher's clock).
        """
        produced = 0
        while produced < events:
            message = self._next_message(now_ms())
            if not message.labels[0]["duplicate_delivery"]:
                produced += len(message.labels)
            yield message

    @property
    def active_devices(self) -> int:
        """Devices currently sending (after sizing the fleet to the rate)."""
        return sum(len(hs.devices) for hs in self._hospitals)

    # -- scheduling ----------------------------------------------------------------------

    def _source_kind_weights(self) -> list[float]:
        """Message weights of the unscheduled kinds (EMR, lab, claims) that give their
        RECORD_MIX proportions in records, from the mean records per message."""
        lab_mean = self._lab_records_per_message()
        mean_records = {"emr_cdc": 1.0, "hl7_lab": lab_mean, "claim": 3.5}
        return list(
            itertools.accumulate(RECORD_MIX[k] / mean_records[k] for k in _UNSCHEDULED_KINDS)
        )

    def _fleet_scale(self, records_per_second: float | None) -> float:
        """How many times region.yaml's device counts are active at the caller's rate."""
        devices = self.reference.devices
        full = 0.0
        for hospital in self.region.hospitals:
            for device_type, count in hospital.devices:
                spec = self.region.device_types[device_type]
                period = PACKET_ROUNDS * spec.sample_interval_s * 1000
                if period >= devices.silence_after_ms(device_type):
                    raise ValueError(
                        f"{device_type}: a packet every {period} ms would look silent to "
                        "streams/rules/devices.yaml"
                    )
                full += count * len(spec.metrics) / spec.sample_interval_s
        if records_per_second is None or full == 0:
            return 1.0
        return min(_MAX_FLEET_SCALE, RECORD_MIX["device"] * records_per_second / full)

    def _start(self, now: int) -> None:
        """Schedule the devices and background diagnoses; queue the syndromic outbreak."""
        self._started = now
        for hs in self._hospitals:
            for device in hs.devices:
                period = self._period_ms(device.device_type)
                self._schedule(device, now + self._rng.randrange(period))
        districts = self.reference.syndromic.districts
        for syndrome in self.reference.syndromic.syndromes:
            for district in sorted(set(districts.values())):
                if any(districts.get(hs.org) == district
                       and hs.syndrome_diagnoses.get(syndrome.syndrome) for hs in self._hospitals):
                    due = now + self._rng.randrange(SYNDROME_BACKGROUND_MS)
                    heapq.heappush(
                        self._background, (due, next(self._heap_seq), district, syndrome.syndrome)
                    )
        if self.syndromic_outbreak:
            self._followups.extend(self._outbreak(now))

    def _next_problem(self) -> str:
        if self._pending_problem is not None:
            return self._pending_problem
        if not self._problem_queue:
            self._problem_queue = list(PROBLEM_ROTATION)
            self._rng.shuffle(self._problem_queue)
        return self._problem_queue.pop()

    def _next_message(self, now: int) -> SimulatedMessage:
        if self._started is None:
            self._start(now)
        self._problem_debt += self.problem_rate
        self._anomaly_debt = min(3.0, self._anomaly_debt + self.anomaly_rate)
        if self._followups:
            return self._followups.popleft()
        device = self._due_device(now)
        if device is not None:
            return self._device_packet(device)
        background = self._due_background(now)
        if background is not None:
            return background
        if self._anomaly_debt >= 1.0:
            injected = self._try_anomaly(now)
            if injected is not None:
                return injected
        if self._problem_debt >= 1.0:
            problem = self._next_problem()
            injected = self._inject(problem, now)
            if injected is not None:
                self._problem_debt -= 1.0
                self._pending_problem = None
                self._pending_attempts = 0
                return injected
            # Not possible yet (e.g. no open visit): retry on the next message, give up later.
            self._pending_attempts += 1
            self._pending_problem = problem if self._pending_attempts < 50 else None
            if self._pending_problem is None:
                self._pending_attempts = 0
        kind = self._rng.choices(_UNSCHEDULED_KINDS, cum_weights=self._kind_weights)[0]
        message = self._regular(kind, now)
        armed = self._feed_silence_armed
        spiked = self._spike_message(message, now)
        if spiked is not None:
            message = spiked  # bad on purpose: never delivered twice
        elif armed is not None and (message.source_kind, _org_of(message)) == (
            armed[1], armed[0]
        ):
            message = self._silence_feed(message)
        else:
            # Only ordinary messages are ever delivered twice: a duplicate never carries a
            # critical value, an unmapped code, a record that must be dead-lettered or the
            # last record of an anomaly.
            self._recent_clean.append(message)
        return message

    def _regular(self, kind: str, now: int) -> SimulatedMessage:
        if kind == "claim":
            claim = self._claim_message(now)
            if claim is not None:
                return claim
            kind = "hl7_lab"  # every patient of the hospital is billed out: send a lab result
        hs = self._hospital(kind)
        if kind == "hl7_lab":
            message = self._lab_message(hs, now)
        else:
            message = self._emr_message(hs, now)
        assert message is not None
        return message

    def _inject(self, problem: str, now: int) -> SimulatedMessage | None:
        if problem == "duplicate":
            return self._duplicate()
        if problem == "undecodable":
            return self._undecodable()
        if problem in ("negative_claim_amount", "unmapped_claim_item"):
            return self._claim_message(now, problem)
        if problem in ("invalid_admit_time", "unmapped_diagnosis"):
            return self._emr_message(self._hospital("emr_cdc"), now, problem)
        hs = self._hospital("hl7_lab")
        if problem == "invalid_hl7":
            return self._invalid_hl7(hs, now)
        return self._lab_message(hs, now, problem)

    # -- anomaly rotation --------------------------------------------------------------------

    def _try_anomaly(self, now: int) -> SimulatedMessage | None:
        """Inject the next anomaly kind of the rotation; a message to send now, if any.

        A kind that is not possible yet goes back to the end of the current cycle (at most
        _MAX_ANOMALY_DEFERRALS times); one that is not applicable to this run is skipped.
        """
        if not self._anomaly_queue:
            self._anomaly_queue = list(ANOMALY_ROTATION)
            self._rng.shuffle(self._anomaly_queue)
        kind = self._anomaly_queue.pop()
        outcome = self._inject_anomaly(kind, now)
        if outcome is None:
            deferrals = self._anomaly_deferrals.get(kind, 0) + 1
            if deferrals < _MAX_ANOMALY_DEFERRALS:
                self._anomaly_deferrals[kind] = deferrals
                self._anomaly_queue.insert(0, kind)
            else:
                self._anomaly_deferrals.pop(kind, None)
            return None
        self._anomaly_deferrals.pop(kind, None)
        if outcome is False:
            return None  # not applicable to this run: no share used
        self._anomaly_debt -= 1.0
        return outcome if isinstance(outcome, SimulatedMessage) else None

    def _inject_anomaly(self, kind: str, now: int) -> SimulatedMessage | bool | None:
        """A message carrying the anomaly, True when armed for a later message, None when
        not possible yet, False when not applicable to this run."""
        if kind in ("news2_urgent", "news2_emergency"):
            return self._arm_news2(kind)
        if kind == "device_out_of_range":
            return self._arm_out_of_range()
        if kind == "device_flat_line":
            return self._arm_flat_line()
        if kind == "device_silence":
            return self._arm_device_silence(now)
        if kind in ("claims_exact_duplicate", "claims_near_duplicate"):
            return self._duplicate_claim(now, near=kind == "claims_near_duplicate")
        if kind == "claims_cost_outlier":
            return self._cost_outlier_claim(now)
        if kind == "claims_after_death":
            return self._after_death(now)
        if kind == "claims_outside_encounter":
            return self._outside_encounter_claim(now)
        if kind == "feed_silence":
            return self._arm_feed_silence(now)
        if kind in ("feed_dead_letter_spike", "feed_unmapped_spike"):
            return self._arm_feed_spike(kind, now)
        raise ValueError(f"unknown anomaly kind {kind!r}")

    # -- people ----------------------------------------------------------------------------

    def _hospital(self, kind: str | None = None) -> _HospitalState:
        """A hospital by activity weight, never one whose feed of ``kind`` went silent."""
        if not self._silent_feeds or kind is None:
            return self._rng.choices(self._hospitals, cum_weights=self._hospital_weights)[0]
        candidates = [hs for hs in self._hospitals if (hs.org, kind) not in self._silent_feeds]
        return self._rng.choices(candidates, weights=[hs.hospital.weight for hs in candidates])[0]

    def _national_id(self, birth: date, sex: str) -> tuple[str, date]:
        """A synthetic, unique ID number (fictional area code, valid MOD 11-2 check digit)."""
        while True:
            n = self._id_sequence.get(birth, 0)
            if n < 500:
                break
            birth -= timedelta(days=1)
        self._id_sequence[birth] = n + 1
        sequence = n * 2 + (1 if sex == "M" else 2)  # odd for men, even for women
        first17 = f"{self.region.national_id_area_code}{birth:%Y%m%d}{sequence:03d}"
        return first17 + national_id_check_digit(first17), birth

    def _new_person(self) -> _Person:
        rng = self._rng
        roll = rng.random()
        sex = "M" if roll < 0.495 else "F" if roll < 0.99 else "U"
        band = rng.random()
        age = (rng.randint(0, 14) if band < 0.15 else rng.randint(15, 44) if band < 0.5
               else rng.randint(45, 64) if band < 0.8 else rng.randint(65, 95))
        birth = self.region.reference_date - timedelta(days=age * 365 + rng.randint(0, 364))
        id_number, birth = self._national_id(birth, sex)
        family_zh, family = rng.choice(self.region.surnames)
        syllables = [rng.choice(self.region.given_names) for _ in range(rng.choice((1, 2, 2)))]
        return _Person(
            id_number=id_number,
            name_zh=family_zh + "".join(zh for zh, _ in syllables),
            family=family,
            given="".join(py for _, py in syllables),
            birth_date=birth,
            sex=sex,
        )

    def _register(self, hs: _HospitalState, fresh: bool = False) -> _Patient:
        """A new patient record at a hospital; one in ten is a person known elsewhere."""
        person: _Person | None = None
        if not fresh and self._persons and self._rng.random() < 0.1:
            candidate = self._rng.choice(self._persons)
            if candidate.id_number not in hs.patient_by_person:
                person = candidate
        if person is None:
            person = self._new_person()
            self._persons.append(person)
        hs.mrn_seq += 1
        patient = _Patient(hs.org, hs.hospital.mrn_format.format(hs.mrn_seq), person)
        hs.patients.append(patient)
        hs.patient_by_person[person.id_number] = patient
        return patient

    def _pick_patient(self, hs: _HospitalState, inpatient_bias: float = 0.7) -> _Patient:
        if hs.open_visits and self._rng.random() < inpatient_bias:
            return self._rng.choice(hs.open_visits).patient
        return self._rng.choice(hs.patients)

    def _critical_patient(self, hs: _HospitalState, analyte: str) -> _Patient:
        """A patient with no critical and no out-of-range result yet for the analyte."""
        for _ in range(20):
            patient = self._pick_patient(hs)
            pair = (patient.person.id_number, analyte)
            if pair not in self._critical_used and pair not in self._abnormal_seen:
                return patient
        return self._register(hs, fresh=True)


    # -- lab results (HL7 ORU^R01) -----------------------------------------------------------

    def _lab_value(self, test: LabTest, person_id: str, allow_abnormal: bool = True
                   ) -> tuple[str, str]:
        """A realistic value (mostly normal, sometimes mildly abnormal, never critical)."""
        rng = self._rng
        low, high = test.normal
        pair = (person_id, test.analyte)
        value = rng.uniform(low, high)
        if allow_abnormal and pair not in self._critical_used and rng.random() < 0.12:
            crit_low, crit_high = test.critical
            span = high - low
            if rng.random() < 0.5 and low > 0:
                floor = crit_low if crit_low is not None else low * 0.5
                value = rng.uniform(low - (low - floor) * 0.5, low)
            else:
                ceiling = crit_high if crit_high is not None else high + span
                value = rng.uniform(high, high + (ceiling - high) * 0.5)
        text = _fmt(value, test.decimals)
        rounded = float(text)
        flag = "L" if rounded < low else "H" if rounded > high else "N"
        if flag != "N":
            self._abnormal_seen.add(pair)
        return text, flag

    def _critical_value(self, test: LabTest, side: str) -> tuple[str, str]:
        """A value beyond the test's critical limit on ``side`` by 8 % or more."""
        crit_low, crit_high = test.critical
        if side == "high":
            assert crit_high is not None
            limit = crit_high
            value = crit_high * self._rng.uniform(1.08, 1.3)
        else:
            assert crit_low is not None
            limit = crit_low
            value = crit_low * self._rng.uniform(0.7, 0.92)
        text = _fmt(value, test.decimals)
        rounded = float(text)
        if (side == "high" and rounded <= limit) or (side == "low" and rounded >= limit):
            raise AssertionError(f"critical {test.code} {text} not beyond {limit}")
        return text, "HH" if side == "high" else "LL"

    def _critical_side(self, test: LabTest, analyte: str) -> str:
        sides = [
            side for side in self.region.alerting[analyte].sides
            if test.critical[0 if side == "low" else 1] is not None
        ]
        return self._rng.choice(sides)

    def _lab_message(
        self, hs: _HospitalState, now: int, problem: str | None = None
    ) -> SimulatedMessage | None:
        rng = self._rng
        alerting = self.region.alerting
        event = now - rng.randint(0, MAX_EVENT_DELAY_MS)
        haemolysed = False
        special: dict[int, _Observation] = {}  # OBX position -> a prepared observation
        panel: LabPanel | None = None  # None: a single-test order of tests[0]
        if problem == "critical":
            analyte = rng.choice(sorted(alerting))
            candidates = hs.mapped_tests_by_analyte.get(analyte)
            if not candidates:
                return None
            test = rng.choice(candidates)
            panel = rng.choice(hs.panels_by_test[test.code])
            patient = self._critical_patient(hs, analyte)
            text, flag = self._critical_value(test, self._critical_side(test, analyte))
            special[panel.tests.index(test)] = _Observation(
                test, text, flag, critical_rule=alerting[analyte].rule_id
            )
            self._critical_used.add((patient.person.id_number, analyte))
        elif problem == "critical_haemolysed":
            analytes = [a for a in sorted(alerting) if alerting[a].excluded_specimen == "haemolysed"
                        and hs.mapped_tests_by_analyte.get(a)]
            if not analytes:
                return None
            analyte = rng.choice(analytes)
            test = rng.choice(hs.mapped_tests_by_analyte[analyte])
            panel = rng.choice(hs.panels_by_test[test.code])
            patient = self._critical_patient(hs, analyte)
            text, flag = self._critical_value(test, "high")  # haemolysis raises potassium
            special[panel.tests.index(test)] = _Observation(
                test, text, flag, suppressed="haemolysed"
            )
            self._critical_used.add((patient.person.id_number, analyte))
            haemolysed = True
        elif problem == "critical_unmapped":
            test = rng.choice(hs.unmapped_alerting_tests)
            patient = self._critical_patient(hs, test.analyte)
            text, flag = self._critical_value(test, self._critical_side(test, test.analyte))
            special[0] = _Observation(test, text, flag, suppressed="unmapped")
            self._critical_used.add((patient.person.id_number, test.analyte))
        elif problem == "unmapped_lab":
            test = rng.choice(hs.unmapped_tests)
            patient = self._pick_patient(hs)
            text, flag = self._lab_value(test, patient.person.id_number, allow_abnormal=False)
            special[0] = _Observation(test, text, flag)
        elif problem == "nonnumeric_obx":
            panel = rng.choice(hs.multi_panels)
            patient = self._pick_patient(hs)
            bad = rng.randrange(len(panel.tests))
            special[bad] = _Observation(
                panel.tests[bad], rng.choice(_NON_NUMERIC_VALUES), "", expect="dead_letter"
            )
        else:
            panel = rng.choices(hs.panels, cum_weights=hs.panel_weights)[0]
            patient = self._pick_patient(hs)
        if panel is not None:
            tests, panel_code, panel_display = panel.tests, panel.code, panel.display
        else:
            tests, panel_code, panel_display = (test,), test.code, test.display
        person_id = patient.person.id_number
        observations = [
            special.get(i) or _Observation(test, *self._lab_value(test, person_id))
            for i, test in enumerate(tests)
        ]
        control_id, payload = self._oru(
            hs, patient, panel_code, panel_display, observations, event, now, haemolysed
        )
        count = len(observations)
        labels = [
            _label(
                "hl7_lab", hs.org, control_id, i, count, "lab_result",
                expect=o.expect,
                reason_code="invalid_record" if o.expect == "dead_letter" else None,
                critical_rule=o.critical_rule,
                critical_suppressed_reason=o.suppressed,
                unmapped=o.test.unmapped,
            )
            for i, o in enumerate(observations)
        ]
        value = {
            "message_control_id": control_id,
            "organisation_id": hs.org,
            "source_system": "LIS",
            "message_type": "ORU^R01",
            "received_time": now,
            "payload": payload,
        }
        return SimulatedMessage("hl7_lab", patient.key, value, labels)

    def _oru(
        self,
        hs: _HospitalState,
        patient: _Patient,
        panel_code: str,
        panel_display: str,
        observations: list[_Observation],
        event: int,
        now: int,
        haemolysed: bool,
    ) -> tuple[str, str]:
        """An ORU^R01 v2.5.1 message in ER7 (segments separated by CR) and its MSH-10.

        The field numbers given for MSH are one less than HL7's, because MSH-1 is the field
        separator itself: {1: encoding characters, 2: MSH-3, ...}.
        """
        hs.control_seq += 1
        hs.order_seq += 1
        control_id = f"{hs.org}-LIS-{self.id_tag}-{hs.control_seq:08d}"
        message_time = min(now, event + self._rng.randint(30, 300) * 1000)
        observed = _hl7_ts(event)
        person = patient.person
        visit = patient.visit
        if visit is not None:
            patient_class, location, visit_no = (
                visit.visit_type, visit.row["dept_code"] or "", visit.visit_no
            )
        else:
            patient_class, location, visit_no = "O", self._rng.choice(hs.departments).code, ""
        segments = [
            _segment("MSH", {1: "^~\\&", 2: "LIS", 3: hs.org, 4: "MEDSTREAM", 5: "REGION",
                             6: _hl7_ts(message_time), 8: "ORU^R01^ORU_R01", 9: control_id,
                             10: "P", 11: "2.5.1", 17: "UNICODE UTF-8"}),
            _segment("PID", {1: "1",
                             3: f"{patient.mrn}^^^{hs.org}^MR~{person.id_number}^^^CHN^NI",
                             5: f"{person.family}^{person.given}",
                             7: f"{person.birth_date:%Y%m%d}", 8: person.sex}),
            _segment("PV1", {1: "1", 2: patient_class, 3: f"{location}^^^{hs.org}",
                             19: visit_no}),
            _segment("OBR", {1: "1", 2: f"{hs.org}P{hs.order_seq:09d}",
                             3: f"{hs.org}F{hs.order_seq:09d}",
                             4: f"{panel_code}^{panel_display}^L", 7: observed, 25: "F"}),
        ]
        for i, o in enumerate(observations, start=1):
            low, high = o.test.normal
            segments.append(_segment("OBX", {
                1: str(i), 2: "NM", 3: f"{o.test.code}^{o.test.display}^L",
                5: o.value_text, 6: o.test.unit,
                7: f"{_fmt(low, o.test.decimals)}-{_fmt(high, o.test.decimals)}",
                8: o.flag, 11: "F", 14: observed,
            }))
        if haemolysed or hs.hospital.specimen_segment == "always":
            condition = self.region.specimen_conditions["haemolysed"] if haemolysed else ""
            segments.append(_segment("SPM", {1: "1", 4: "SER^Serum^HL70487", 24: condition}))
        return control_id, "\r".join(segments)

    def _invalid_hl7(self, hs: _HospitalState, now: int) -> SimulatedMessage:
        """(b) An Hl7Message that decodes but whose payload is not a usable HL7 message."""
        patient = self._pick_patient(hs)
        variant = self._rng.randrange(3)
        panel = self._rng.choices(hs.panels, cum_weights=hs.panel_weights)[0]
        observations = [
            _Observation(t, *self._lab_value(t, patient.person.id_number, allow_abnormal=False))
            for t in panel.tests
        ]
        event = now - self._rng.randint(0, MAX_EVENT_DELAY_MS)
        control_id, full = self._oru(
            hs, patient, panel.code, panel.display, observations, event, now, False
        )
        if variant == 0:
            payload = full.split("\r", 1)[1]  # the MSH segment was lost
        elif variant == 1:
            payload = ""
        else:
            payload = "ERROR 504: upstream interface engine timeout, message not retrieved"
        value = {
            "message_control_id": control_id,
            "organisation_id": hs.org,
            "source_system": "LIS",
            "message_type": "ORU^R01",
            "received_time": now,
            "payload": payload,
        }
        label = _label("hl7_lab", hs.org, control_id, None, None, None,
                       expect="dead_letter", reason_code="invalid_message")
        return SimulatedMessage("hl7_lab", patient.key, value, [label])

    # -- device telemetry --------------------------------------------------------------------

    def _period_ms(self, device_type: DeviceType) -> int:
        return PACKET_ROUNDS * device_type.sample_interval_s * 1000

    def _new_device(self, hs: _HospitalState, device_type: DeviceType) -> _Device:
        n = hs.device_seq.get(device_type.device_type, 0) + 1
        hs.device_seq[device_type.device_type] = n
        device = _Device(f"{hs.org}-{device_type.device_type}-{n:03d}", device_type, hs)
        hs.devices.append(device)
        return device

    def _schedule(self, device: _Device, due_ms: int) -> None:
        device.due_ms = due_ms
        heapq.heappush(self._device_heap, (due_ms, next(self._heap_seq), device))

    def _due_device(self, now: int) -> _Device | None:
        """The device whose packet is most overdue at ``now``, if any."""
        while self._device_heap and self._device_heap[0][0] <= now:
            _, _, device = heapq.heappop(self._device_heap)
            if not device.silenced:
                return device
        return None

    def _metric_mapping(self, org: str, device_type: str, metric: DeviceMetric) -> UnitMapping:
        mapping = self.reference.terminology.device_metric(org, device_type, metric.code)
        if mapping is None:
            raise ValueError(f"{org} {device_type} metric {metric.code} is not in terminology")
        return mapping

    def _metric_value(self, device: _Device, metric: DeviceMetric) -> float:
        """An ordinary value inside the metric's normal range, never repeated more than
        MAX_REPEATS times in a row (a live signal varies)."""
        low, high = metric.normal
        last = device.last_values.get(metric.code)
        value = round(self._rng.uniform(low, high), metric.decimals)
        while value == last and device.repeats.get(metric.code, 0) >= MAX_REPEATS:
            value = round(self._rng.uniform(low, high), metric.decimals)
        self._remember_value(device, metric.code, value)
        return value

    @staticmethod
    def _remember_value(device: _Device, code: str, value: float) -> None:
        if device.last_values.get(code) == value:
            device.repeats[code] = device.repeats.get(code, 1) + 1
        else:
            device.repeats[code] = 1
        device.last_values[code] = value

    def _device_patient(self, hs: _HospitalState) -> _Patient:
        """A patient for a device (mostly an inpatient), never one in a NEWS2 episode."""
        for _ in range(10):
            patient = self._pick_patient(hs, inpatient_bias=0.9)
            if not patient.episode:
                return patient
        return self._register(hs, fresh=True)

    def _device_packet(self, device: _Device) -> SimulatedMessage:
        """The packet due at ``device.due_ms``, with any anomaly armed on the device."""
        rng = self._rng
        hs = device.hs
        spec = device.device_type
        if device.patient is None or (device.free and rng.random() < 0.03):
            device.patient = self._device_patient(hs)
        patient = device.patient
        assert patient is not None
        due = device.due_ms
        interval = spec.sample_interval_s * 1000
        packet_id = f"{self.id_tag}-{device.next_packet:010d}"
        device.next_packet += 1
        source_ref = f"{device.device_id}:{packet_id}"
        armed, armed_metric = device.armed, device.armed_metric
        recovery, device.recovery = device.recovery, None
        if recovery is not None:
            patient.person.episode = False  # this packet brings the person's level back down
        plan: list[tuple[DeviceMetric, float]] | None = None
        if armed in ("news2_urgent", "news2_emergency"):
            plan = self._news2_plan(device, armed == "news2_emergency")
        samples: list[dict[str, Any]] = []
        event_ids: list[str] = []
        anomalies: list[AnomalyLabel] = []
        last_round: list[str] = []
        for r in range(PACKET_ROUNDS):
            final = r == PACKET_ROUNDS - 1
            moment = due - (PACKET_ROUNDS - 1 - r) * interval
            metrics: Sequence[DeviceMetric] = spec.metrics
            if final and plan is not None:
                metrics = [metric for metric, _ in plan]
            elif r == 0 and recovery is not None:
                metrics = sorted(spec.metrics, key=lambda m: recovery.index(m.code)
                                 if m.code in recovery else len(recovery))
            for i, metric in enumerate(metrics):
                index = len(samples)
                identity = event_id("device", hs.org, source_ref, index)
                flat = device.flat
                if final and plan is not None:
                    value = plan[i][1]
                    self._remember_value(device, metric.code, value)
                elif flat is not None and metric.code == flat.code:
                    value = flat.value
                    self._remember_value(device, metric.code, value)
                    flat.remaining -= 1
                    flat.event_ids.append(identity)
                    if flat.remaining == 0:
                        anomalies.append(AnomalyLabel(
                            ANOMALY_RULES["device_flat_line"], "device", hs.org,
                            f"{device.device_id}|{flat.loinc}", tuple(flat.event_ids),
                        ))
                        device.flat = None
                        device.repeats[metric.code] = MAX_REPEATS  # the next value differs
                elif final and armed == "device_out_of_range" and metric.code == armed_metric:
                    value = self._out_of_range_value(device, metric)
                    self._remember_value(device, metric.code, value)
                    patient.person.out_of_range_sent = True
                    mapping = self._metric_mapping(hs.org, spec.device_type, metric)
                    anomalies.append(AnomalyLabel(
                        ANOMALY_RULES["device_out_of_range"], "device", hs.org,
                        f"{device.device_id}|{mapping.code}", (identity,),
                    ))
                else:
                    value = self._metric_value(device, metric)
                samples.append({
                    "metric": metric.code,
                    "value": value,
                    "unit": metric.unit,
                    "sample_time": moment,
                })
                event_ids.append(identity)
                if final:
                    last_round.append(identity)
        if plan is not None and armed is not None:
            anomalies.append(AnomalyLabel(
                ANOMALY_RULES[armed], "device", hs.org, None, tuple(last_round)
            ))
            # The patient stays reserved to this device until the next packet recovers.
            device.recovery = [m.code for m, _ in reversed(plan)]
        device.armed = device.armed_metric = None
        if armed == "device_silence":
            anomalies.append(AnomalyLabel(
                ANOMALY_RULES["device_silence"], "device", hs.org, device.device_id,
                (event_ids[-1],), self.reference.devices.silence_after_ms(spec.device_type),
            ))
            self._retire(device)
        else:
            self._schedule(device, due + self._period_ms(spec))
        record = {
            "packet_id": packet_id,
            "device_id": device.device_id,
            "device_type": spec.device_type,
            "organisation_id": hs.org,
            "source_system": hs.hospital.device_gateway,
            "patient_ref": patient.mrn,
            "sent_time": due,
            "samples": samples,
        }
        count = len(samples)
        labels = [_label("device", hs.org, source_ref, i, count, "observation")
                  for i in range(count)]
        message = SimulatedMessage(
            "device", device.device_id.encode(), record, labels, tuple(anomalies)
        )
        if not anomalies and device.flat is None:
            self._recent_clean.append(message)
        return message

    def _retire(self, device: _Device) -> None:
        """A device stops for good; a new one (new id) takes its place on the same cadence."""
        device.silenced = True
        device.hs.devices.remove(device)
        self._forget_recent(lambda m: isinstance(m.value, dict)
                            and m.value.get("device_id") == device.device_id)
        replacement = self._new_device(device.hs, device.device_type)
        self._schedule(replacement, device.due_ms + self._period_ms(device.device_type))

    def _forget_recent(self, matches: Callable[[SimulatedMessage], bool]) -> None:
        """Drop messages from the duplicate candidates: a late redelivery would break a
        silence the labels promise."""
        kept = [m for m in self._recent_clean if not matches(m)]
        self._recent_clean.clear()
        self._recent_clean.extend(kept)

    def _free_devices(self, hs: _HospitalState | None = None, monitors: bool = False
                      ) -> list[_Device]:
        hospitals = [hs] if hs is not None else self._hospitals
        return [
            d for h in hospitals for d in h.devices
            if d.free and (not monitors or self._is_monitor(d))
            and (d.patient is None or not d.patient.episode)
        ]

    def _is_monitor(self, device: _Device) -> bool:
        """True when the device reports every NEWS2 parameter that is required."""
        news2 = self.reference.news2
        codes = {self._metric_mapping(device.hs.org, device.device_type.device_type, m).code
                 for m in device.device_type.metrics}
        return all(
            codes & p.metric_codes for p in news2.parameters() if p.required
        )

    # NEWS2 bands and device limits, both on the charted standard value.

    def _news2_parameter(self, loinc: str) -> BandedParameter | Spo2Parameter | None:
        from streams.news2 import BandedParameter, Spo2Parameter

        parameter = self.reference.news2.parameter_for_code(loinc)
        if isinstance(parameter, BandedParameter | Spo2Parameter):
            return parameter
        return None

    def _news2_score(self, loinc: str, standard: float) -> int:
        from streams.news2 import BandedParameter, chart_value

        parameter = self._news2_parameter(loinc)
        if parameter is None:
            return 0
        bands = parameter.bands if isinstance(parameter, BandedParameter) else parameter.scale_1
        charted = chart_value(standard, parameter.decimals)
        return next(band.score for band in bands if band.contains(charted))

    def _vital_values(self, device: _Device, metric: DeviceMetric, want: str) -> list[float]:
        """Local values of a metric whose standard value scores ``want`` on NEWS2 ("0".."3")
        inside the device limits, or ("oor") lies beyond a device limit (at most 5 % beyond)
        while scoring below NEWS2's single-parameter trigger. Cached per device model."""
        org, device_type = device.hs.org, device.device_type.device_type
        key = (org, device_type, metric.code, want)
        cached = self._vital_cache.get(key)
        if cached is not None:
            return cached
        mapping = self._metric_mapping(org, device_type, metric)
        limit = self.reference.devices.limits.get(mapping.code)
        low = limit.low if limit is not None and limit.low is not None else 0.0
        high = limit.high if limit is not None and limit.high is not None else 100.0
        if want == "oor":
            scan_low, scan_high = low * 0.95, high * 1.05
        else:
            scan_low, scan_high = low, high
        # The local grid between the standard bounds (the unit mapping is affine).
        base = mapping.to_standard(0.0, metric.unit)
        slope = mapping.to_standard(1.0, metric.unit)
        assert base is not None and slope is not None
        slope -= base
        step = 10.0 ** -metric.decimals
        ends = sorted(((scan_low - base) / slope, (scan_high - base) / slope))
        single = self.reference.news2.single_parameter_score
        values = []
        for k in range(math.floor(ends[0] / step), math.ceil(ends[1] / step) + 1):
            local = round(k * step, metric.decimals)
            standard = mapping.to_standard(local, metric.unit)
            assert standard is not None
            if not 0 < standard <= (100 if mapping.unit == "%" else math.inf):
                continue  # not a value a body can have
            inside = limit is None or (
                (limit.low is None or standard >= limit.low + 1e-6)
                and (limit.high is None or standard <= limit.high - 1e-6)
            )
            beyond = limit is not None and (
                (limit.low is not None and standard < limit.low - 1e-6)
                or (limit.high is not None and standard > limit.high + 1e-6)
            )
            score = self._news2_score(mapping.code, standard)
            if want == "oor":
                if beyond and score < single:
                    values.append(local)
            elif inside and score == int(want):
                values.append(local)
        self._vital_cache[key] = values
        return values

    def _news2_plan(self, device: _Device, emergency: bool
                    ) -> list[tuple[DeviceMetric, float]]:
        """The final round of a NEWS2 episode packet: every metric, ordered so that the
        score climbs straight to the target level (no lower alert on the way).

        Emergency: four parameters scoring 1 (total 4, "low") then one scoring 3 (total 7).
        Urgent: zeros then a single 3 (total 3), or 1, (1), 2, 2 (total 5 or 6 reached only
        by the last sample).
        """
        rng = self._rng
        news2 = self.reference.news2
        spec = device.device_type
        loinc = {
            m.code: self._metric_mapping(device.hs.org, spec.device_type, m).code
            for m in spec.metrics
        }
        scored = [m for m in spec.metrics if self._news2_parameter(loinc[m.code]) is not None]
        can = {m.code: {s for s in "0123" if self._vital_values(device, m, s)} for m in scored}
        for _ in range(50):
            order = list(scored)
            rng.shuffle(order)
            targets: dict[str, int] = {}
            threes = [m for m in order if "3" in can[m.code]]
            if emergency:
                three = threes[0]
                targets = {m.code: 1 for m in order if m is not three}
                targets[three.code] = 3
            elif rng.random() < 0.5:
                targets = {threes[0].code: 3}
            else:
                twos = [m for m in order if "2" in can[m.code]][:2]
                ones = [m for m in order if m not in twos][: rng.choice((1, 2))]
                targets = {**{m.code: 2 for m in twos}, **{m.code: 1 for m in ones}}
            if not all(str(targets.get(m.code, 0)) in can[m.code] for m in scored):
                continue
            plan = sorted(scored, key=lambda m: targets.get(m.code, 0))
            totals = list(itertools.accumulate(targets.get(m.code, 0) for m in plan))
            level = [self._level(t, max(targets.get(m.code, 0) for m in plan[: i + 1]))
                     for i, (t, m) in enumerate(zip(totals, plan, strict=True))]
            want = "emergency" if emergency else "urgent"
            if level[-1] != want or any(lv in ("urgent", "emergency") for lv in level[:-1]):
                continue
            unscored = [m for m in spec.metrics if m not in scored]
            return [(m, self._metric_value(device, m)) for m in unscored] + [
                (m, rng.choice(self._vital_values(device, m, str(targets.get(m.code, 0)))))
                for m in plan
            ]
        raise AssertionError(f"no NEWS2 plan for {spec.device_type} under {news2.version}")

    def _level(self, total: int, highest: int) -> str:
        news2 = self.reference.news2
        if total >= news2.emergency_total:
            return "emergency"
        if total >= news2.urgent_total or highest >= news2.single_parameter_score:
            return "urgent"
        return "low" if total else "none"

    def _out_of_range_value(self, device: _Device, metric: DeviceMetric) -> float:
        return self._rng.choice(self._vital_values(device, metric, "oor"))

    def _arm_news2(self, kind: str) -> bool | None:
        """Arm a NEWS2 episode on a monitor of an inpatient: the monitor's next packet ends
        with a complete abnormal set, and no other device reports for that patient.

        A person has at most one episode per run: their NEWS2 alert stays open until staff
        resolve it, so a second episode would rightly fold into it and raise nothing new."""
        rng = self._rng
        options = []
        for hs in self._hospitals:
            monitors = self._free_devices(hs, monitors=True)
            visits = [
                v for v in hs.open_visits
                if v.visit_type == "I" and not v.patient.episode
                and not v.patient.person.out_of_range_sent
                and not v.patient.person.news2_given
            ]
            if monitors and visits:
                options.append((hs, monitors, visits))
        if not options:
            return None
        hs, monitors, visits = rng.choice(options)
        device = rng.choice(monitors)
        patient = rng.choice(visits).patient
        for other in (d for h in self._hospitals for d in h.devices):
            if other is not device and other.patient is not None and (
                other.patient.person is patient.person
            ):
                other.patient = None  # reassigned at its next packet
        device.patient = patient
        patient.person.episode = True
        patient.person.news2_given = True
        device.armed = kind
        return True

    def _arm_out_of_range(self) -> bool | None:
        """Arm one sample beyond a device limit that NEWS2 scores below its single-parameter
        trigger (e.g. systolic BP 201-210, temperature above 39.5), so only the device rule
        fires."""
        options = [
            (d, m) for d in self._free_devices() for m in d.device_type.metrics
            if self._vital_values(d, m, "oor")
        ]
        if not options:
            return None
        device, metric = self._rng.choice(options)
        device.armed, device.armed_metric = "device_out_of_range", metric.code
        return True

    def _arm_flat_line(self) -> bool | None:
        """Freeze one metric of a device for the sample count and span devices.yaml needs."""
        rules = self.reference.devices.flat_line
        options = []
        for device in self._free_devices():
            spec = device.device_type
            interval = spec.sample_interval_s * 1000
            best: tuple[int, DeviceMetric, str] | None = None
            for metric in spec.metrics:
                loinc = self._metric_mapping(device.hs.org, spec.device_type, metric).code
                rule = rules.get(loinc)
                if rule is None:
                    continue
                samples = max(rule.min_samples, math.ceil(rule.min_duration_ms / interval) + 1)
                if best is None or samples * interval < best[0] * interval:
                    best = (samples, metric, loinc)
            if best is not None:
                options.append((device, best))
        if not options:
            return None
        device, (samples, metric, loinc) = self._rng.choice(options)
        last = device.last_values.get(metric.code)
        value = last
        while value == last:  # the run must start at its first frozen sample
            value = round(self._rng.uniform(*metric.normal), metric.decimals)
        assert value is not None
        device.flat = _FlatRun(metric.code, loinc, value, samples)
        return True

    def _arm_device_silence(self, now: int) -> bool | None:
        """Arm a device's next packet as its last, choosing among devices whose silence
        becomes detectable before the run ends (a run ending first cannot show it): that
        packet is due only at the device's next cadence, the threshold counts from there."""
        if self.long_run_s is None or self._started is None:
            return False
        devices = self._free_devices()
        if not devices:
            return None
        remaining_ms = self._started + self.long_run_s * 1000 - now
        fitting = [
            d for d in devices
            if max(0, d.due_ms - now)
            + self.reference.devices.silence_after_ms(d.device_type.device_type)
            + DEVICE_SILENCE_MARGIN_MS <= remaining_ms
        ]
        if not fitting:
            return False
        self._rng.choice(fitting).armed = "device_silence"
        return True

    # -- EMR row changes (CDC) -----------------------------------------------------------------

    def _emr_message(
        self, hs: _HospitalState, now: int, problem: str | None = None
    ) -> SimulatedMessage | None:
        rng = self._rng
        event = now - rng.randint(0, MAX_EVENT_DELAY_MS)
        if problem == "invalid_admit_time":
            return self._admission(hs, event, now, invalid_admit_time=True)
        if problem == "unmapped_diagnosis":
            if not hs.open_visits:
                return None
            return self._add_diagnosis(hs, rng.choice(hs.open_visits), event, now, unmapped=True)
        open_count = len(hs.open_visits)
        if open_count < _MIN_OPEN_VISITS:
            return self._admission(hs, event, now)
        if open_count > _MAX_OPEN_VISITS:
            return self._discharge(hs, rng.choice(hs.open_visits), event, now)
        action = rng.choices(
            ("admit", "diagnose", "discharge", "transfer", "undiagnose", "cancel"),
            cum_weights=(25, 57, 79, 87, 94, 100),
        )[0]
        visit = rng.choice(hs.open_visits)
        if action == "diagnose":
            return self._add_diagnosis(hs, visit, event, now)
        if action == "discharge":
            return self._discharge(hs, visit, event, now)
        if action == "transfer":
            return self._transfer(hs, visit, event, now)
        if action == "undiagnose" and visit.diagnoses:
            return self._delete_diagnosis(hs, visit, event, now)
        if action == "cancel" and not visit.diagnoses:
            return self._cancel(hs, visit, event, now)
        return self._admission(hs, event, now)

    def _row_change(
        self,
        hs: _HospitalState,
        patient: _Patient,
        op: str,
        table: str,
        before: dict[str, str | None] | None,
        after: dict[str, str | None] | None,
        now: int,
        *,
        expect: str = "stored",
        unmapped: bool = False,
    ) -> SimulatedMessage:
        """One CDC row change at the next log position of the hospital database."""
        hs.position_seq += self._rng.randint(1, 3)
        hs.transaction_id += 1
        lsn = 0x16B3_0000_0000 + hs.position_seq * 0x1A8
        commit = max(now - self._rng.randint(0, 2000), hs.last_commit_ms)
        hs.last_commit_ms = commit
        source_system = hs.hospital.his_source_system
        message_id = f"{source_system}:{self.id_tag}:{hs.position_seq}:0"
        value = {
            "message_id": message_id,
            "organisation_id": hs.org,
            "source_system": source_system,
            "op": op,
            "table": table,
            "before": None if before is None else dict(before),
            "after": None if after is None else dict(after),
            "source_position": f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:08X}",
            "position_seq": hs.position_seq,
            "transaction_id": hs.transaction_id,
            "commit_time": commit,
            "captured_time": max(now, commit),
        }
        label = _label(
            "emr_cdc", hs.org, message_id, 0, 1, _KIND_BY_TABLE[table], expect=expect,
            reason_code="invalid_record" if expect == "dead_letter" else None, unmapped=unmapped,
        )
        return SimulatedMessage("emr_cdc", patient.key, value, [label])

    def _admission(
        self, hs: _HospitalState, event: int, now: int, invalid_admit_time: bool = False
    ) -> SimulatedMessage:
        rng = self._rng
        patient: _Patient | None = None
        full = len(hs.patients) >= self.max_patients_per_hospital
        if full or rng.random() >= 0.25:
            for _ in range(50 if full else 5):
                candidate = rng.choice(hs.patients)
                if candidate.visit is None:
                    patient = candidate
                    break
        if patient is None:
            patient = self._register(hs)
        department = rng.choice(hs.departments)
        visit_type = rng.choice(department.visit_types)
        hs.visit_seq += 1
        visit_no = f"{_VISIT_PREFIX[visit_type]}{self.id_tag}{hs.visit_seq:08d}"
        person = patient.person
        row: dict[str, str | None] = {
            "visit_no": visit_no,
            "patient_mrn": patient.mrn,
            "patient_name": person.name_zh,
            "id_number": person.id_number,
            "birth_date": person.birth_date.isoformat(),
            "sex": person.sex,
            "visit_type": visit_type,
            "dept_code": department.code,
            "admit_time": rng.choice(_INVALID_ADMIT_TIMES) if invalid_admit_time else _iso(event),
            "discharge_time": None,
            "death_time": None,
        }
        if invalid_admit_time:
            # The row is rejected downstream, so the visit never opens here either.
            return self._row_change(hs, patient, "c", "patient_visit", None, row, now,
                                    expect="dead_letter")
        visit = _Visit(visit_no, patient, visit_type, event, event, row)
        patient.visit = visit
        hs.open_visits.append(visit)
        message = self._row_change(hs, patient, "c", "patient_visit", None, row, now)
        visit.last_event_id = message.labels[0]["event_id"]
        return message

    def _update_visit(
        self, hs: _HospitalState, visit: _Visit, changes: dict[str, str | None], now: int
    ) -> SimulatedMessage:
        before = visit.row
        visit.row = {**before, **changes}
        message = self._row_change(
            hs, visit.patient, "u", "patient_visit", before, visit.row, now
        )
        visit.last_event_id = message.labels[0]["event_id"]
        return message

    def _close(self, hs: _HospitalState, visit: _Visit) -> None:
        hs.open_visits.remove(visit)
        visit.patient.visit = None

    def _discharge(self, hs: _HospitalState, visit: _Visit, event: int, now: int
                   ) -> SimulatedMessage:
        moment = max(event, visit.last_ms + 60_000)
        visit.last_ms = moment
        self._close(hs, visit)
        return self._update_visit(hs, visit, {"discharge_time": _iso(moment)}, now)

    def _transfer(self, hs: _HospitalState, visit: _Visit, event: int, now: int
                  ) -> SimulatedMessage:
        targets = [d for d in hs.departments
                   if visit.visit_type in d.visit_types and d.code != visit.row["dept_code"]]
        if not targets:
            return self._discharge(hs, visit, event, now)
        visit.last_ms = max(event, visit.last_ms)
        return self._update_visit(hs, visit, {"dept_code": self._rng.choice(targets).code}, now)

    def _cancel(self, hs: _HospitalState, visit: _Visit, event: int, now: int
                ) -> SimulatedMessage:
        self._close(hs, visit)
        return self._row_change(hs, visit.patient, "d", "patient_visit", visit.row, None, now)

    def _add_diagnosis(
        self,
        hs: _HospitalState,
        visit: _Visit,
        event: int,
        now: int,
        unmapped: bool = False,
        diagnosis: CodedItem | None = None,
    ) -> SimulatedMessage:
        rng = self._rng
        if diagnosis is None:
            diagnosis = rng.choice(hs.unmapped_diagnoses if unmapped else hs.mapped_diagnoses)
        diag_type = "A" if not visit.diagnoses else rng.choice(("O", "D", "O"))
        hs.diag_seq += 1
        moment = max(event, visit.admit_ms)
        row: dict[str, str | None] = {
            "diag_id": f"{self.id_tag}-{hs.diag_seq}",
            "visit_no": visit.visit_no,
            "patient_mrn": visit.patient.mrn,
            "diag_code": diagnosis.code,
            "diag_name": diagnosis.display,
            "diag_type": diag_type,
            "diag_time": _iso(moment),
        }
        if not unmapped:  # unmapped rows are left alone (never deleted, never billed)
            visit.diagnoses.append(row)
        return self._row_change(hs, visit.patient, "c", "visit_diagnosis", None, row, now,
                                unmapped=unmapped)

    def _delete_diagnosis(self, hs: _HospitalState, visit: _Visit, event: int, now: int
                          ) -> SimulatedMessage:
        row = visit.diagnoses.pop(self._rng.randrange(len(visit.diagnoses)))
        return self._row_change(hs, visit.patient, "d", "visit_diagnosis", row, None, now)

    # -- claims ----------------------------------------------------------------------------------

    def _price(self, hs: _HospitalState, item: CodedItem) -> float:
        """The unit price of one line: the tariff with small, evenly cycled noise (mapped
        items) or the plain tariff (unmapped items, which no price rule compares)."""
        if item.unmapped:
            return item.unit_price
        cycle = hs.price_cycle.setdefault(hs.standard_item[item.code], [])
        if not cycle:
            points = [(2 * k + 1) / PRICE_POINTS - 1 for k in range(PRICE_POINTS)]
            self._rng.shuffle(points)
            cycle.extend(points)
        return round(item.unit_price * (1 + PRICE_NOISE * cycle.pop()), 4)

    @staticmethod
    def _free_quantities(patient: _Patient, item: CodedItem) -> list[int]:
        """Quantities of an item not yet billed to the patient. Lines of one item for one
        person always differ in quantity: their amounts then differ by more than
        claims.yaml's near_amount_pct, so ordinary lines are never (near) duplicates."""
        return [q for q in _QUANTITIES if f"{item.code}|{q}" not in patient.billed]

    def _claim_patient(self, hs: _HospitalState, item: CodedItem | None = None,
                       fresh_item: bool = False) -> _Patient | None:
        """A patient with something left to bill (``item`` never billed when fresh_item)."""
        for _ in range(20):
            patient = self._pick_patient(hs, inpatient_bias=0.5)
            if item is None:
                if any(self._free_quantities(patient, i) for i in hs.mapped_items):
                    return patient
            elif fresh_item:
                if not any(key.startswith(f"{item.code}|") for key in patient.billed):
                    return patient
            elif self._free_quantities(patient, item):
                return patient
        if len(hs.patients) < self.max_patients_per_hospital:
            return self._register(hs, fresh=True)
        return None

    def _claim_line(
        self, hs: _HospitalState, patient: _Patient, item: CodedItem, line_no: int,
        service_date: date, quantity: float | None = None, price: float | None = None,
    ) -> dict[str, Any]:
        free = self._free_quantities(patient, item)
        if quantity is None:
            quantity = float(self._rng.choices(free, weights=[1 / q for q in free])[0])
        if price is None:
            price = self._price(hs, item)
        if quantity > 0:
            patient.billed.add(f"{item.code}|{int(quantity)}")
            if not item.unmapped:
                key = hs.standard_item[item.code]
                hs.price_count[key] = hs.price_count.get(key, 0) + 1
        return {
            "line_no": line_no,
            "item_code": item.code,
            "item_display": item.display,
            "quantity": quantity,
            "unit_price": price,
            "amount": round(quantity * price, 2),
            "service_date": service_date,
        }

    def _claim(
        self,
        hs: _HospitalState,
        patient: _Patient,
        lines: list[dict[str, Any]],
        event: int,
        encounter_ref: str | None,
        diagnosis_codes: list[str],
        payer: Payer | None = None,
        problem: str | None = None,
        bad: int = -1,
    ) -> SimulatedMessage:
        """A claim message of ``lines`` with one label per line."""
        rng = self._rng
        if payer is None:
            payer = rng.choices(self.region.payers, cum_weights=self._payer_weights)[0]
        self._claim_seq[payer.payer_id] += 1
        claim_id = f"{payer.payer_id}C{self.id_tag}-{self._claim_seq[payer.payer_id]:09d}"
        source_ref = f"{payer.payer_id}:{claim_id}"
        value = {
            "claim_id": claim_id,
            "payer_id": payer.payer_id,
            "organisation_id": hs.org,
            "source_system": payer.source_system,
            "submitted_time": event,
            "patient_id_number": patient.person.id_number if rng.random() < 0.97 else None,
            "patient_local_id": patient.mrn,
            "encounter_ref": encounter_ref,
            "diagnosis_codes": diagnosis_codes,
            "lines": lines,
        }
        count = len(lines)
        labels = []
        for i in range(count):
            negative = problem == "negative_claim_amount" and i == bad
            labels.append(_label(
                "claim", hs.org, source_ref, i, count, "claim_line",
                expect="dead_letter" if negative else "stored",
                reason_code="invalid_record" if negative else None,
                unmapped=problem == "unmapped_claim_item" and i == bad,
            ))
        return SimulatedMessage("claim", patient.key, value, labels)

    def _diagnosis_codes(self, hs: _HospitalState, visit: _Visit | None) -> list[str]:
        if visit is not None and visit.diagnoses:
            return [d["diag_code"] or "" for d in visit.diagnoses[:3]]
        return [d.code for d in self._rng.sample(hs.mapped_diagnoses, self._rng.randint(1, 2))]

    def _claim_message(self, now: int, problem: str | None = None) -> SimulatedMessage | None:
        """An ordinary claim (or one with a record problem); None when nobody is left to
        bill at the chosen hospital."""
        rng = self._rng
        hs = self._hospital("claim")
        payer = rng.choices(self.region.payers, cum_weights=self._payer_weights)[0]
        patient = self._claim_patient(hs)
        if patient is None:
            return None
        visit = patient.visit
        event = now - rng.randint(0, MAX_EVENT_DELAY_MS)
        diagnosis_codes = self._diagnosis_codes(hs, visit)
        items = [i for i in hs.mapped_items if self._free_quantities(patient, i)]
        count = min(rng.randint(1, 6), len(items))
        bad = rng.randrange(count) if problem else -1
        unmapped: list[CodedItem] = []
        if problem == "unmapped_claim_item":
            unmapped = [i for i in hs.unmapped_items if self._free_quantities(patient, i)]
            if not unmapped:
                return None
        chosen = rng.sample(items, count)
        service_date = _cst(event).date()
        lines = []
        for i, item in enumerate(chosen):
            if problem == "unmapped_claim_item" and i == bad:
                item = rng.choice(unmapped)
            quantity = None
            if problem == "negative_claim_amount" and i == bad:
                # A reversal line the contract does not allow (dead-lettered, never billed).
                quantity = -float(rng.choice(_QUANTITIES[:4]))
            lines.append(self._claim_line(hs, patient, item, i + 1, service_date, quantity))
        encounter_ref = visit.visit_no if visit is not None else None
        message = self._claim(hs, patient, lines, event, encounter_ref, diagnosis_codes,
                              payer, problem, bad)
        if problem is None:
            self._recent_claims.append(
                (hs, patient, value_of(message), [label["event_id"] for label in message.labels])
            )
        return message

    def _one_line_anomaly(
        self,
        kind: str,
        hs: _HospitalState,
        patient: _Patient,
        line: dict[str, Any],
        event: int,
        encounter_ref: str | None,
        evidence: tuple[str, ...] = (),
        payer: Payer | None = None,
        diagnosis_codes: list[str] | None = None,
    ) -> SimulatedMessage:
        """A one-line claim carrying the anomaly of ``kind`` (its line first in event_ids)."""
        if diagnosis_codes is None:
            diagnosis_codes = self._diagnosis_codes(hs, patient.visit)
        message = self._claim(hs, patient, [line], event, encounter_ref, diagnosis_codes, payer)
        label = message.labels[0]
        anomaly = AnomalyLabel(
            ANOMALY_RULES[kind], "claim", hs.org, f"{label['source_ref']}|{line['line_no']}",
            (label["event_id"], *evidence),
        )
        return replace(message, anomalies=(anomaly,))

    def _duplicate_claim(self, now: int, near: bool) -> SimulatedMessage | None:
        """A line of a recent ordinary claim billed again on a new claim: the same service
        date (exact duplicate) or one day earlier (near duplicate, amount identical)."""
        rng = self._rng
        candidates = [
            entry for entry in self._recent_claims
            if (entry[0].org, "claim") not in self._silent_feeds and not entry[1].dead
        ]
        if not candidates:
            return None
        entry = rng.choice(candidates)
        self._recent_claims.remove(entry)  # one duplicate per original
        hs, patient, original, event_ids = entry
        index = rng.randrange(len(original["lines"]))
        line = {**original["lines"][index], "line_no": 1}
        if near:
            line["service_date"] = line["service_date"] - timedelta(days=1)
        payer = next(p for p in self.region.payers if p.payer_id == original["payer_id"])
        event = now - rng.randint(0, MAX_EVENT_DELAY_MS)
        kind = "claims_near_duplicate" if near else "claims_exact_duplicate"
        return self._one_line_anomaly(
            kind, hs, patient, line, event,
            None if near else original["encounter_ref"], (event_ids[index],), payer,
            list(original["diagnosis_codes"]),
        )

    def _cost_outlier_claim(self, now: int) -> SimulatedMessage | None:
        """A line priced far from the item's tariff, once claims.yaml min_samples earlier
        prices of that item at that organisation were sent in this run."""
        rng = self._rng
        needed = self.reference.claims.min_samples
        options = [
            (hs, item) for hs in self._hospitals if (hs.org, "claim") not in self._silent_feeds
            for item in hs.mapped_items
            if hs.price_count.get(hs.standard_item[item.code], 0) >= needed
        ]
        if not options:
            return None
        hs, item = rng.choice(options)
        patient = self._claim_patient(hs, item, fresh_item=True)
        if patient is None:
            return None
        factor = rng.uniform(2.5, 4.0) if rng.random() < 0.7 else rng.uniform(0.15, 0.3)
        event = now - rng.randint(0, MAX_EVENT_DELAY_MS)
        line = self._claim_line(hs, patient, item, 1, _cst(event).date(),
                                price=round(item.unit_price * factor, 4))
        # Its amount may equal an ordinary amount of another quantity: never bill the item
        # to this patient again (that line would be a near duplicate of the outlier).
        patient.billed.update(f"{item.code}|{q}" for q in _QUANTITIES)
        visit = patient.visit
        return self._one_line_anomaly("claims_cost_outlier", hs, patient, line, event,
                                      visit.visit_no if visit is not None else None)

    def _after_death(self, now: int) -> SimulatedMessage | None:
        """A visit that began before the run ends with the patient's death two days ago (a
        CDC update carrying ``death_time``); then a claim for a service today."""
        rng = self._rng
        options = [hs for hs in self._hospitals
                   if (hs.org, "emr_cdc") not in self._silent_feeds
                   and (hs.org, "claim") not in self._silent_feeds]
        if not options:
            return None
        hs = rng.choice(options)
        patient = self._register(hs, fresh=True)
        # The dead leave the population: no later visit, device, lab or claim names them.
        hs.patients.remove(patient)
        self._persons.remove(patient.person)
        patient.dead = True
        death = now - 2 * _DAY_MS - rng.randint(0, 12 * _HOUR_MS)
        admit = death - rng.randint(1, 5) * _DAY_MS
        department = rng.choice([d for d in hs.departments if "I" in d.visit_types])
        hs.visit_seq += 1
        person = patient.person
        before: dict[str, str | None] = {
            "visit_no": f"{_VISIT_PREFIX['I']}{self.id_tag}{hs.visit_seq:08d}",
            "patient_mrn": patient.mrn,
            "patient_name": person.name_zh,
            "id_number": person.id_number,
            "birth_date": person.birth_date.isoformat(),
            "sex": person.sex,
            "visit_type": "I",
            "dept_code": department.code,
            "admit_time": _iso(admit),
            "discharge_time": None,
            "death_time": None,
        }
        after = {**before, "discharge_time": _iso(death), "death_time": _iso(death)}
        update = self._row_change(hs, patient, "u", "patient_visit", before, after, now)
        event = now - rng.randint(0, MAX_EVENT_DELAY_MS)
        item = rng.choice(hs.mapped_items)
        line = self._claim_line(hs, patient, item, 1, _cst(event).date())
        self._followups.append(self._one_line_anomaly(
            "claims_after_death", hs, patient, line, event, None,
            (update.labels[0]["event_id"],),
        ))
        return update

    def _outside_encounter_claim(self, now: int) -> SimulatedMessage | None:
        """A line for an open visit dated grace_days + 2 days before its admission."""
        rng = self._rng
        visits = [
            (hs, v) for hs in self._hospitals if (hs.org, "claim") not in self._silent_feeds
            for v in hs.open_visits if v.last_event_id is not None
        ]
        if not visits:
            return None
        hs, visit = rng.choice(visits)
        patient = visit.patient
        items = [i for i in hs.mapped_items
                 if not any(key.startswith(f"{i.code}|") for key in patient.billed)]
        if not items:
            return None
        days = self.reference.claims.grace_days + 2
        service_date = _cst(visit.admit_ms).date() - timedelta(days=days)
        line = self._claim_line(hs, patient, rng.choice(items), 1, service_date)
        event = now - rng.randint(0, MAX_EVENT_DELAY_MS)
        assert visit.last_event_id is not None
        return self._one_line_anomaly("claims_outside_encounter", hs, patient, line, event,
                                      visit.visit_no, (visit.last_event_id,))

    # -- feeds and syndromic surveillance --------------------------------------------------

    def _arm_feed_silence(self, now: int) -> bool:
        """Arm the next EMR message of one organisation as its last (once per run), when the
        rest of the run outlasts the feeds.yaml threshold; False when not applicable."""
        if self._feed_silence_done or self.long_run_s is None or self._started is None:
            return False
        threshold = self.reference.feeds.silence_after_ms("emr_cdc")
        remaining_ms = self._started + self.long_run_s * 1000 - now
        if remaining_ms <= threshold + min(FEED_SILENCE_MARGIN_MS, threshold):
            return False
        hs = self._rng.choice(self._hospitals)
        self._feed_silence_armed = (hs.org, "emr_cdc")
        self._feed_silence_done = True
        return True

    def _silence_feed(self, message: SimulatedMessage) -> SimulatedMessage:
        """``message`` is the feed's last: it carries the feed.silence label, then the feed
        stops for good."""
        assert self._feed_silence_armed is not None
        org, kind = self._feed_silence_armed
        self._feed_silence_armed = None
        self._silent_feeds.add((org, kind))
        self._forget_recent(lambda m: m.source_kind == kind and _org_of(m) == org)
        anomaly = AnomalyLabel(
            ANOMALY_RULES["feed_silence"], kind, org, f"{org}|{kind}",
            (message.labels[-1]["event_id"],), self.reference.feeds.silence_after_ms(kind),
        )
        return replace(message, anomalies=(anomaly,))

    def _arm_feed_spike(self, kind: str, now: int) -> bool:
        """Start a spike episode on one organisation's lab feed: for SPIKE_EPISODE_WINDOWS
        spike windows a share of its messages is bad (unusable, or under an unmapped test
        code), SPIKE_RATE_FACTOR x feeds.yaml's min_rate of its records. False when not
        applicable: an episode under way or resting, no known rate, too little traffic per
        window to judge, or a run ending before the windows close."""
        rules = self.reference.feeds
        rule = ANOMALY_RULES[kind]
        spike = (
            rules.dead_letter_spike if kind == "feed_dead_letter_spike" else rules.unmapped_spike
        )
        if (
            rule in self._feed_spikes
            or now < self._feed_spike_rest_until.get(rule, 0)
            or self.records_per_second is None
            or self.long_run_s is None
            or self._started is None
        ):
            return False
        episode_ms = SPIKE_EPISODE_WINDOWS * rules.window_ms
        remaining_ms = self._started + self.long_run_s * 1000 - now
        if remaining_ms < episode_ms + rules.lateness_ms + FEED_JUDGE_SLACK_MS:
            return False
        candidates = [hs for hs in self._hospitals if hs.unmapped_tests]
        if not candidates:
            return False
        hs = self._rng.choice(candidates)
        total_weight = sum(h.hospital.weight for h in self._hospitals)
        feed_records = (
            self.records_per_second * RECORD_MIX["hl7_lab"] * hs.hospital.weight / total_weight
            * rules.window_ms / 1000
        )
        if feed_records < 5 * spike.min_events:
            return False
        # Share of messages to spoil so that SPIKE_RATE_FACTOR x min_rate of the records are
        # bad: a spoiled message is one bad record, an ordinary one has the mean record count.
        rate = min(0.9, SPIKE_RATE_FACTOR * spike.min_rate)
        mean_records = self._lab_records_per_message()
        share = rate * mean_records / (1 - rate + rate * mean_records)
        label = AnomalyLabel(rule, "hl7_lab", hs.org, f"{hs.org}|hl7_lab", ())
        self._feed_spikes[rule] = (hs.org, now + episode_ms, share, label)
        return True

    def _lab_records_per_message(self) -> float:
        total_weight = sum(h.weight for h in self.region.hospitals)
        return sum(
            h.weight / total_weight
            * sum(p.weight * len(p.tests) for p in h.lab_panels)
            / sum(p.weight for p in h.lab_panels)
            for h in self.region.hospitals
        )

    def _spike_message(self, message: SimulatedMessage, now: int) -> SimulatedMessage | None:
        """The bad message that replaces ``message`` during a spike episode of its feed."""
        for rule, (org, until, share, label) in list(self._feed_spikes.items()):
            if now >= until:
                del self._feed_spikes[rule]
                rest = SPIKE_REST_WINDOWS * self.reference.feeds.window_ms
                self._feed_spike_rest_until[rule] = now + rest
                continue
            if message.source_kind != "hl7_lab" or _org_of(message) != org:
                continue
            if self._rng.random() >= share:
                continue
            hs = next(h for h in self._hospitals if h.org == org)
            if rule == ANOMALY_RULES["feed_dead_letter_spike"]:
                bad = self._invalid_hl7(hs, now)
            else:
                unmapped = self._lab_message(hs, now, problem="unmapped_lab")
                assert unmapped is not None
                bad = unmapped
            if label is not None:
                # The episode's first bad record: the rule can see the spike from here on.
                # A dead letter has no event id: its alert is matched by feed and time.
                self._feed_spikes[rule] = (org, until, share, None)
                first = bad.labels[0]["event_id"]
                ids = (first,) if first else ()
                bad = replace(bad, anomalies=(replace(label, event_ids=ids),))
            return bad
        return None

    def _due_background(self, now: int) -> SimulatedMessage | None:
        """A background syndromic diagnosis due at ``now`` (one per district, syndrome and
        hour of wall clock), if any."""
        if not self._background or self._background[0][0] > now:
            return None
        due, _, district, syndrome = heapq.heappop(self._background)
        heapq.heappush(self._background,
                       (due + SYNDROME_BACKGROUND_MS, next(self._heap_seq), district, syndrome))
        options = [
            hs for hs in self._hospitals
            if self.reference.syndromic.districts.get(hs.org) == district
            and hs.syndrome_diagnoses.get(syndrome) and hs.open_visits
            and (hs.org, "emr_cdc") not in self._silent_feeds
        ]
        if not options:
            return None
        hs = self._rng.choice(options)
        visit = self._rng.choice(hs.open_visits)
        event = now - self._rng.randint(0, MAX_EVENT_DELAY_MS)
        diagnosis = self._rng.choice(hs.syndrome_diagnoses[syndrome])
        return self._add_diagnosis(hs, visit, event, now, diagnosis=diagnosis)

    def _outbreak(self, start: int) -> list[SimulatedMessage]:
        """The ILI outbreak of one district, sent first: a CDC snapshot (op r) of one ILI
        diagnosis per past hour, warmup_hours + 1 hours of baseline, then a step of
        OUTBREAK_EXTRA_CASES more in the hour three hours ago (op c from there on), then one
        diagnosis in each of the next two hours so the step hour closes."""
        rng = self._rng
        rules = self.reference.syndromic
        ili = next((s for s in rules.syndromes if s.syndrome == "ili"), None)
        if ili is None:
            return []
        by_district: dict[str, list[_HospitalState]] = {}
        for hs in self._hospitals:
            district = rules.districts.get(hs.org)
            if district is not None and hs.syndrome_diagnoses.get("ili"):
                by_district.setdefault(district, []).append(hs)
        if not by_district:
            return []
        district = rng.choice(sorted(by_district))
        orgs = by_district[district]
        step_hs = rng.choice(orgs)
        step_hour = start - start % _HOUR_MS - 3 * _HOUR_MS
        first_hour = step_hour - (ili.warmup_hours + 1) * _HOUR_MS
        planned: list[tuple[int, _HospitalState, str]] = []
        for hour in range(first_hour, step_hour + 3 * _HOUR_MS, _HOUR_MS):
            cases = 1 + (OUTBREAK_EXTRA_CASES if hour == step_hour else 0)
            span = min(_HOUR_MS, start - 60_000 - hour)
            for _ in range(cases):
                hs = step_hs if hour == step_hour else rng.choice(orgs)
                planned.append((hour + rng.randrange(span), hs, "r" if hour < step_hour else "c"))
        planned.sort(key=lambda entry: entry[0])
        messages: list[SimulatedMessage] = []
        step_ids: list[str] = []
        for moment, hs, op in planned:
            patient = rng.choice(hs.patients)
            hs.visit_seq += 1
            hs.diag_seq += 1
            diagnosis = rng.choice(hs.syndrome_diagnoses["ili"])
            row: dict[str, str | None] = {
                "diag_id": f"{self.id_tag}-{hs.diag_seq}",
                # An outpatient visit of the past: only its diagnosis is in the snapshot.
                "visit_no": f"{_VISIT_PREFIX['O']}{self.id_tag}{hs.visit_seq:08d}",
                "patient_mrn": patient.mrn,
                "diag_code": diagnosis.code,
                "diag_name": diagnosis.display,
                "diag_type": "A",
                "diag_time": _iso(moment),
            }
            message = self._row_change(hs, patient, op, "visit_diagnosis", None, row, start)
            messages.append(message)
            if step_hour <= moment < step_hour + _HOUR_MS:
                step_ids.append(message.labels[0]["event_id"])
        anomaly = AnomalyLabel(
            ANOMALY_RULES["syndromic_ili"], "emr_cdc", step_hs.org, f"{district}|{ili.syndrome}",
            tuple(step_ids),
        )
        messages[-1] = replace(messages[-1], anomalies=(anomaly,))
        return messages

    # -- whole-message problems ----------------------------------------------------------------

    def _undecodable(self) -> SimulatedMessage:
        """(a) Bytes that no raw-topic deserializer can decode."""
        rng = self._rng
        kind = rng.choice(SOURCE_KINDS)
        hs = self._hospital(kind)
        patient = self._pick_patient(hs)
        variant = rng.randrange(3)
        if variant == 0:
            value = b"\x00\x00\x00\x00e garbage"
        elif variant == 1:  # a misconfigured collector sending JSON text
            value = json.dumps({"source": kind, "organisation_id": hs.org, "status": "test"}
                               ).encode()
        else:  # random bytes; never starting with the Avro magic byte
            value = bytes([rng.randint(1, 255)]) + rng.randbytes(rng.randint(8, 60))
        self._undecodable_seq += 1
        label = _label(kind, hs.org, f"undecodable:{self._undecodable_seq}", None, None, None,
                       expect="dead_letter", reason_code="undecodable")
        return SimulatedMessage(kind, patient.key, value, [label])

    def _duplicate(self) -> SimulatedMessage | None:
        """The same message (same key and value) delivered a second time."""
        if not self._recent_clean:
            return None
        index = self._rng.randrange(len(self._recent_clean))
        original = self._recent_clean[index]
        del self._recent_clean[index]  # one duplicate per original at most
        labels = [{**label, "duplicate_delivery": True} for label in original.labels]
        return replace(original, labels=labels, anomalies=())


# --- publishing -----------------------------------------------------------------------------


@dataclass
class PublishReport:
    """What a run published, counted on broker acknowledgement.

    ``messages`` counts every acknowledged message (duplicates included); ``records``
    counts the new clinical records they carried (duplicate copies excluded, a message
    that must fail whole counts as one); ``duplicates`` and ``malformed`` count messages
    (malformed = at least one record or the whole message must be dead-lettered);
    ``anomalies`` counts anomaly labels written (also counted in ``labels_written``).
    ``run_id`` is the simulator run's id, carried by its source ids, labels and records.
    """

    run_id: str = ""
    messages: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCE_KINDS, 0))
    records: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCE_KINDS, 0))
    duplicates: int = 0
    malformed: int = 0
    anomalies: int = 0
    delivery_failures: int = 0
    labels_written: int = 0
    elapsed_s: float = 0.0

    @property
    def total_messages(self) -> int:
        """Messages acknowledged, all source kinds."""
        return sum(self.messages.values())

    @property
    def total_records(self) -> int:
        """New clinical records acknowledged, all source kinds."""
        return sum(self.records.values())

    def snapshot(self) -> PublishReport:
        """An independent copy (for progress callbacks)."""
        return replace(self, messages=dict(self.messages), records=dict(self.records))


class PublishError(RuntimeError):
    """Some messages were not acknowledged by the broker; carries the run's report."""

    def __init__(self, report: PublishReport) -> None:
        self.report = report
        super().__init__(
            f"{report.delivery_failures} simulated messages were not delivered "
            f"({report.total_messages} were)"
        )


class TokenBucket:
    """Limits a rate of tokens per second; waits with ``sleep``, never spins."""

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate / 10)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._last = clock()

    def acquire(self, tokens: float) -> None:
        """Take ``tokens``, sleeping first as long as the bucket is in debt."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= tokens
        if self._tokens < 0:
            self._sleep(-self._tokens / self.rate)


#: The simulator's name in the published counters (see :mod:`medstream.published`).
SIMULATOR_PUBLISHER: Final = "simulator"


class SimulatorProducer:
    """Publishes simulated messages to the raw topics with confluent-kafka; writes labels JSONL.

    ``now_ms`` is the wall clock: the simulator's device cadence follows it, and an anomaly
    label's ``detectable_from_ms`` is its reading when the broker acknowledged the anomaly's
    last record (plus the rule's silence threshold for silences).

    Every record carries the run id in a Kafka header (the sink keeps it in the raw ledger)
    and every label line names it, so a run's ground truth can be checked against its own
    rows only. With ``published`` (see :mod:`medstream.published`) every acknowledged
    position is also counted on disk, independently of the sink and the broker.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        registry: SchemaRegistry,
        simulator: RegionSimulator,
        labels_path: Path | None = None,
        rate: float | None = None,
        *,
        flush_timeout_s: float = 60.0,
        now_ms: Callable[[], int] = _wall_clock_ms,
        published: Path | None = None,
    ) -> None:
        self._kafka = kafka
        self._published_path = published
        self._headers: list[tuple[str, str | bytes | None]] = [
            (RUN_HEADER, simulator.run_id.encode())
        ]
        self._now_ms = now_ms
        self._simulator = simulator
        self._serializers = {
            kind: AvroSerializer(registry, subject) for kind, subject in RAW_SUBJECTS.items()
        }
        self._topics = {kind: kafka.topic(RAW_TOPICS[kind]) for kind in SOURCE_KINDS}
        self._labels_path = labels_path
        self._bucket = TokenBucket(rate) if rate is not None else None
        self._flush_timeout_s = flush_timeout_s
        if labels_path is not None:
            labels_path.parent.mkdir(parents=True, exist_ok=True)
            labels_path.write_text("")  # this producer's runs append to a fresh file

    @property
    def run_id(self) -> str:
        """The id of the simulator run this producer publishes."""
        return self._simulator.run_id

    def run(
        self,
        events: int,
        progress: Callable[[PublishReport], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> PublishReport:
        """Publish until `events` clinical records were generated (or should_stop), then flush.

        Raises :class:`PublishError` at the end when any message was not acknowledged.
        """
        from confluent_kafka import Producer

        producer = Producer(self._kafka.producer_config())
        report = PublishReport(run_id=self._simulator.run_id)
        ledger = (
            PublishedLedger(
                self._published_path, SIMULATOR_PUBLISHER, self._simulator.run_id,
                lambda: producer.list_topics(timeout=10).cluster_id or "",
            )
            if self._published_path is not None
            else None
        )
        started = time.monotonic()
        next_progress = started + 1.0
        labels_file = (
            self._labels_path.open("a", encoding="utf-8") if self._labels_path else None
        )
        try:
            for message in self._simulator.messages(events, self._now_ms):
                if should_stop():
                    break
                value = (
                    message.value if isinstance(message.value, bytes)
                    else self._serializers[message.source_kind](message.value)
                )
                if self._bucket is not None and not message.labels[0]["duplicate_delivery"]:
                    self._bucket.acquire(len(message.labels))
                self._produce(producer, message, value, report, labels_file, ledger)
                producer.poll(0)
                if ledger is not None:
                    ledger.flush_due()
                now = time.monotonic()
                if now >= next_progress:
                    next_progress = now + 1.0
                    if labels_file is not None:
                        labels_file.flush()
                    if progress is not None:
                        report.elapsed_s = now - started
                        progress(report.snapshot())
        finally:
            undelivered = producer.flush(self._flush_timeout_s)
            report.delivery_failures += undelivered
            if ledger is not None:
                ledger.close()
            report.elapsed_s = time.monotonic() - started
            if labels_file is not None:
                labels_file.close()
        if progress is not None:
            progress(report.snapshot())
        if report.delivery_failures:
            raise PublishError(report)
        return report

    def _produce(
        self,
        producer: Any,
        message: SimulatedMessage,
        value: bytes,
        report: PublishReport,
        labels_file: IO[str] | None,
        ledger: PublishedLedger | None = None,
    ) -> None:
        topic = self._topics[message.source_kind]

        def delivered(err: Any, msg: Any) -> None:
            if err is not None:
                # Counted, and run() raises at the end; the error names no message content.
                report.delivery_failures += 1
                log.error("delivery to %s failed: %s", topic, err)
                return
            if ledger is not None:
                ledger.acknowledged(topic, msg.partition(), msg.offset(), msg.timestamp()[1])
            self._acknowledged(message, topic, report, labels_file)

        while True:
            try:
                producer.produce(
                    topic, key=message.key, value=value, headers=self._headers,
                    on_delivery=delivered,
                )
                return
            except BufferError:  # local queue full: let deliveries drain, then retry
                producer.poll(0.1)

    def _acknowledged(
        self,
        message: SimulatedMessage,
        topic: str,
        report: PublishReport,
        labels_file: IO[str] | None,
    ) -> None:
        kind = message.source_kind
        report.messages[kind] += 1
        if message.labels[0]["duplicate_delivery"]:
            report.duplicates += 1
        else:
            report.records[kind] += len(message.labels)
        if any(label["expect"] == "dead_letter" for label in message.labels):
            report.malformed += 1
        labelled(RECORDS_OUT, "simulator", topic).inc()
        report.anomalies += len(message.anomalies)
        if labels_file is not None:
            lines = list(message.labels)
            if message.anomalies:
                acknowledged_ms = self._now_ms()
                lines += [anomaly.line(acknowledged_ms) for anomaly in message.anomalies]
            run = {"run_id": self._simulator.run_id}
            labels_file.write(
                "".join(json.dumps({**line, **run}, ensure_ascii=False) + "\n" for line in lines)
            )
            report.labels_written += len(lines)

