"""Synthetic region simulator: a fictional region's hospitals, devices and payers as raw sources.

:class:`RegionSimulator` generates, purely and deterministically for a seed, the source
messages that the edge collectors of ``producers/region.yaml`` would publish (EMR row
changes, HL7 ORU^R01 lab messages, device packets, claims) together with their ground
truth: one label per expected record outcome, including deliberately injected problems
(critical lab values, malformed records, unknown local codes, duplicate deliveries).
:class:`SimulatorProducer` publishes them to the raw topics and writes a label only once
the broker has acknowledged its message, so the labels file is exactly what Kafka holds.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any, Final

import yaml

from medstream.metrics import RECORDS_OUT, labelled
from medstream.settings import RAW_TOPICS, KafkaSettings
from schemas.identity import event_id
from schemas.serde import RAW_SUBJECT_BY_KIND, AvroSerializer, SchemaRegistry

log = logging.getLogger("medstream.simulator")
DEFAULT_REGION_PATH: Final = Path(__file__).resolve().parent / "region.yaml"

#: Source kinds in the order of RAW_TOPICS; each has one raw topic and one Avro subject.
SOURCE_KINDS: Final = ("emr_cdc", "hl7_lab", "device", "claim")
RAW_SUBJECTS: Final = RAW_SUBJECT_BY_KIND
#: Target share of clinical records per source kind.
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

MAX_EVENT_DELAY_MS: Final = 600_000
_CST: Final = timezone(timedelta(hours=8))
_ID_WEIGHTS: Final = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK: Final = "10X98765432"
_HL7_DELIMITERS: Final = frozenset("|^~\\&\r")
_KIND_BY_TABLE: Final = {"patient_visit": "encounter", "visit_diagnosis": "diagnosis"}
_NON_NUMERIC_VALUES: Final = ("see note", "pending", "见备注", "Test not performed")
_INVALID_ADMIT_TIMES: Final = ("0000-00-00 00:00:00", "unknown", "2026-13-45T25:61:00+08:00")
_RECENT_CLEAN: Final = 32
_MIN_OPEN_VISITS: Final = 6
_MAX_OPEN_VISITS: Final = 80
_VISIT_PREFIX: Final = {"I": "ZY", "O": "MZ", "E": "JZ"}  # 住院 / 门诊 / 急诊 numbers


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


# --- national ID numbers (synthetic) ------------------------------------------------------


def national_id_check_digit(first17: str) -> str:
    """ISO 7064 MOD 11-2 check character of the first 17 digits of a national ID number."""
    total = sum(int(digit) * weight for digit, weight in zip(first17, _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11]


def national_id_is_valid(id_number: str) -> bool:
    """True when an 18-character national ID number has 17 digits and a correct check digit."""
    return (
        len(id_number) == 18
        and id_number[:17].isdigit()
        and national_id_check_digit(id_number[:17]) == id_number[17]
    )


# --- the region (producers/region.yaml) -----------------------------------------------------


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
    plausible: tuple[float, float]
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
                    _normal(m["plausible"]), int(m["decimals"]),
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
class SimulatedMessage:
    """One source message as an edge collector would publish it, with its ground truth.

    ``key`` is ``organisation_id:patient MRN`` so one patient's events keep their order;
    ``value`` is a raw record dict matching the source kind's raw Avro schema, or bytes for
    a deliberately malformed record published as is; ``labels`` hold one expected outcome
    per clinical record (one line for a message that must fail whole).
    """

    source_kind: str
    key: bytes
    value: dict[str, Any] | bytes
    labels: list[dict[str, Any]]


@dataclass(eq=False)
class _Person:
    id_number: str
    name_zh: str
    family: str
    given: str
    birth_date: date
    sex: str


@dataclass(eq=False)
class _Visit:
    visit_no: str
    patient: _Patient
    visit_type: str
    admit_ms: int
    last_ms: int
    row: dict[str, str | None]
    diagnoses: list[dict[str, str | None]] = field(default_factory=list)


@dataclass(eq=False)
class _Patient:
    organisation_id: str
    mrn: str
    person: _Person
    visit: _Visit | None = None

    @property
    def key(self) -> bytes:
        return f"{self.organisation_id}:{self.mrn}".encode()


@dataclass(eq=False)
class _Device:
    device_id: str
    device_type: DeviceType
    next_packet: int = 1
    patient: _Patient | None = None


class _HospitalState:
    """Counters, patients, open visits and devices of one hospital, plus lookup lists."""

    def __init__(self, hospital: Hospital, region: Region) -> None:
        self.hospital = hospital
        self.org = hospital.organisation_id
        self.patients: list[_Patient] = []
        self.patient_by_person: dict[str, _Patient] = {}
        self.open_visits: list[_Visit] = []
        self.devices: list[_Device] = []
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
        self.mapped_diagnoses = [d for d in hospital.diagnoses if not d.unmapped]
        self.unmapped_diagnoses = [d for d in hospital.diagnoses if d.unmapped]
        self.mapped_items = [i for i in hospital.claim_items if not i.unmapped]
        self.unmapped_items = [i for i in hospital.claim_items if i.unmapped]


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
    """Deterministic for a given seed (no wall-clock dependence in content except timestamps).

    Generates the raw source messages of the region in region.yaml, about
    ``problem_rate`` of them carrying an injected problem with its ground truth.
    """

    def __init__(
        self,
        seed: int,
        region_path: Path | None = None,
        problem_rate: float = 0.02,
        max_patients_per_hospital: int = 20_000,
    ) -> None:
        if not 0.0 <= problem_rate <= 1.0:
            raise ValueError("problem_rate must be between 0 and 1")
        self.region = load_region(region_path)
        self.problem_rate = problem_rate
        self._rng = random.Random(seed)
        # Bounds memory in an endless run (`make run`): past it, admissions reuse patients.
        self.max_patients_per_hospital = max_patients_per_hospital
        # Source ids (control ids, packet ids, visit and claim numbers, CDC positions) carry
        # the seed, so runs with different seeds never reuse an id, as real senders don't.
        self.id_tag = f"S{seed}"
        self._hospitals = [_HospitalState(h, self.region) for h in self.region.hospitals]
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
        self._problem_debt = 0.0
        self._problem_queue: list[str] = []
        self._pending_problem: str | None = None
        self._pending_attempts = 0
        self._undecodable_seq = 0
        self._kind_weights = self._source_kind_weights()
        for hs in self._hospitals:
            for _ in range(hs.hospital.initial_patients):
                self._register(hs)
            for device_type, count in hs.hospital.devices:
                for n in range(1, count + 1):
                    hs.devices.append(
                        _Device(f"{hs.org}-{device_type}-{n:03d}",
                                self.region.device_types[device_type])
                    )

    # -- the public generator ----------------------------------------------------------

    def messages(
        self, events: int, now_ms: Callable[[], int] = _wall_clock_ms
    ) -> Iterator[SimulatedMessage]:
        """Yield source messages until at least `events` clinical records were generated.

        A clinical record is one record of a message (one OBX, one sample, one claim line,
        one row change; a message that fails whole counts as one). Duplicate deliveries
        repeat records already counted and do not count again.
        """
        produced = 0
        while produced < events:
            message = self._next_message(now_ms())
            if not message.labels[0]["duplicate_delivery"]:
                produced += len(message.labels)
            yield message

    # -- scheduling ----------------------------------------------------------------------

    def _source_kind_weights(self) -> list[float]:
        """Message weights that give RECORD_MIX in records, from the mean records per message."""
        total_weight = sum(h.weight for h in self.region.hospitals)
        lab_mean = sum(
            h.weight / total_weight
            * sum(p.weight * len(p.tests) for p in h.lab_panels)
            / sum(p.weight for p in h.lab_panels)
            for h in self.region.hospitals
        )
        mean_records = {"emr_cdc": 1.0, "hl7_lab": lab_mean, "device": 5.5, "claim": 3.5}
        return list(
            itertools.accumulate(RECORD_MIX[k] / mean_records[k] for k in SOURCE_KINDS)
        )

    def _next_problem(self) -> str:
        if self._pending_problem is not None:
            return self._pending_problem
        if not self._problem_queue:
            self._problem_queue = list(PROBLEM_ROTATION)
            self._rng.shuffle(self._problem_queue)
        return self._problem_queue.pop()

    def _next_message(self, now: int) -> SimulatedMessage:
        self._problem_debt += self.problem_rate
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
        kind = self._rng.choices(SOURCE_KINDS, cum_weights=self._kind_weights)[0]
        message = self._regular(kind, now)
        # Only ordinary messages are ever delivered twice: a duplicate never carries a
        # critical value, an unmapped code or a record that must be dead-lettered.
        self._recent_clean.append(message)
        return message

    def _regular(self, kind: str, now: int) -> SimulatedMessage:
        if kind == "claim":
            return self._claim_message(now)
        hs = self._hospital()
        if kind == "hl7_lab":
            message = self._lab_message(hs, now)
        elif kind == "device":
            message = self._device_message(hs, now)
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
        hs = self._hospital()
        if problem == "invalid_hl7":
            return self._invalid_hl7(hs, now)
        if problem in ("invalid_admit_time", "unmapped_diagnosis"):
            return self._emr_message(hs, now, problem)
        return self._lab_message(hs, now, problem)

    # -- people ----------------------------------------------------------------------------

    def _hospital(self) -> _HospitalState:
        return self._rng.choices(self._hospitals, cum_weights=self._hospital_weights)[0]

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

    def _device_value(self, metric: DeviceMetric) -> float:
        low, high = metric.normal if self._rng.random() < 0.92 else metric.plausible
        return round(self._rng.uniform(low, high), metric.decimals)

    def _device_message(self, hs: _HospitalState, now: int) -> SimulatedMessage:
        rng = self._rng
        device = rng.choice(hs.devices)
        if device.patient is None or rng.random() < 0.03:
            device.patient = self._pick_patient(hs, inpatient_bias=0.9)
        patient = device.patient
        sent = now - rng.randint(0, MAX_EVENT_DELAY_MS)
        metrics = device.device_type.metrics
        count = rng.randint(3, 8)
        rounds = (count + len(metrics) - 1) // len(metrics)
        interval = device.device_type.sample_interval_s * 1000
        samples = [
            {
                "metric": metrics[i % len(metrics)].code,
                "value": self._device_value(metrics[i % len(metrics)]),
                "unit": metrics[i % len(metrics)].unit,
                "sample_time": sent - (rounds - 1 - i // len(metrics)) * interval,
            }
            for i in range(count)
        ]
        packet_id = f"{self.id_tag}-{device.next_packet:010d}"
        device.next_packet += 1
        source_ref = f"{device.device_id}:{packet_id}"
        value = {
            "packet_id": packet_id,
            "device_id": device.device_id,
            "device_type": device.device_type.device_type,
            "organisation_id": hs.org,
            "source_system": hs.hospital.device_gateway,
            "patient_ref": patient.mrn,
            "sent_time": sent,
            "samples": samples,
        }
        labels = [_label("device", hs.org, source_ref, i, count, "observation")
                  for i in range(count)]
        return SimulatedMessage("device", patient.key, value, labels)

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
        }
        if invalid_admit_time:
            # The row is rejected downstream, so the visit never opens here either.
            return self._row_change(hs, patient, "c", "patient_visit", None, row, now,
                                    expect="dead_letter")
        visit = _Visit(visit_no, patient, visit_type, event, event, row)
        patient.visit = visit
        hs.open_visits.append(visit)
        return self._row_change(hs, patient, "c", "patient_visit", None, row, now)

    def _update_visit(
        self, hs: _HospitalState, visit: _Visit, changes: dict[str, str | None], now: int
    ) -> SimulatedMessage:
        before = visit.row
        visit.row = {**before, **changes}
        return self._row_change(hs, visit.patient, "u", "patient_visit", before, visit.row, now)

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
        self, hs: _HospitalState, visit: _Visit, event: int, now: int, unmapped: bool = False
    ) -> SimulatedMessage:
        rng = self._rng
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

    def _claim_message(self, now: int, problem: str | None = None) -> SimulatedMessage:
        rng = self._rng
        hs = self._hospital()
        payer = rng.choices(self.region.payers, cum_weights=self._payer_weights)[0]
        patient = self._pick_patient(hs, inpatient_bias=0.5)
        visit = patient.visit
        event = now - rng.randint(0, MAX_EVENT_DELAY_MS)
        if visit is not None and visit.diagnoses:
            diagnosis_codes = [d["diag_code"] or "" for d in visit.diagnoses[:3]]
        else:
            diagnosis_codes = [d.code for d in rng.sample(hs.mapped_diagnoses, rng.randint(1, 2))]
        count = rng.randint(1, 6)
        bad = rng.randrange(count) if problem else -1
        service_date = _cst(event).date()
        lines = []
        for i in range(count):
            item = rng.choice(hs.unmapped_items if problem == "unmapped_claim_item" and i == bad
                              else hs.mapped_items)
            quantity = float(rng.choice((1, 2, 3, 6, 10, 14, 28) if item.kind == "drug"
                                        else (1, 1, 1, 2, 3, 5)))
            if problem == "negative_claim_amount" and i == bad:
                quantity = -quantity  # a reversal line the contract does not allow
            lines.append({
                "line_no": i + 1,
                "item_code": item.code,
                "item_display": item.display,
                "quantity": quantity,
                "unit_price": item.unit_price,
                "amount": round(quantity * item.unit_price, 2),
                "service_date": service_date,
            })
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
            "encounter_ref": visit.visit_no if visit is not None else None,
            "diagnosis_codes": diagnosis_codes,
            "lines": lines,
        }
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

    # -- whole-message problems ----------------------------------------------------------------

    def _undecodable(self) -> SimulatedMessage:
        """(a) Bytes that no raw-topic deserializer can decode."""
        rng = self._rng
        kind = rng.choice(SOURCE_KINDS)
        hs = self._hospital()
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
        return replace(original, labels=labels)


# --- publishing -----------------------------------------------------------------------------


@dataclass
class PublishReport:
    """What a run published, counted on broker acknowledgement.

    ``messages`` counts every acknowledged message (duplicates included); ``records``
    counts the new clinical records they carried (duplicate copies excluded, a message
    that must fail whole counts as one); ``duplicates`` and ``malformed`` count messages
    (malformed = at least one record or the whole message must be dead-lettered).
    """

    messages: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCE_KINDS, 0))
    records: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCE_KINDS, 0))
    duplicates: int = 0
    malformed: int = 0
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


class SimulatorProducer:
    """Publishes simulated messages to the raw topics with confluent-kafka; writes labels JSONL."""

    def __init__(
        self,
        kafka: KafkaSettings,
        registry: SchemaRegistry,
        simulator: RegionSimulator,
        labels_path: Path | None = None,
        rate: float | None = None,
        *,
        flush_timeout_s: float = 60.0,
    ) -> None:
        self._kafka = kafka
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
        report = PublishReport()
        started = time.monotonic()
        next_progress = started + 1.0
        labels_file = (
            self._labels_path.open("a", encoding="utf-8") if self._labels_path else None
        )
        try:
            for message in self._simulator.messages(events):
                if should_stop():
                    break
                value = (
                    message.value if isinstance(message.value, bytes)
                    else self._serializers[message.source_kind](message.value)
                )
                if self._bucket is not None and not message.labels[0]["duplicate_delivery"]:
                    self._bucket.acquire(len(message.labels))
                self._produce(producer, message, value, report, labels_file)
                producer.poll(0)
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
    ) -> None:
        topic = self._topics[message.source_kind]

        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                # Counted, and run() raises at the end; the error names no message content.
                report.delivery_failures += 1
                log.error("delivery to %s failed: %s", topic, err)
                return
            self._acknowledged(message, topic, report, labels_file)

        while True:
            try:
                producer.produce(topic, key=message.key, value=value, on_delivery=delivered)
                return
            except BufferError:  # local queue full: let deliveries drain, then retry
                producer.poll(0.1)

    @staticmethod
    def _acknowledged(
        message: SimulatedMessage, topic: str, report: PublishReport, labels_file: IO[str] | None
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
        if labels_file is not None:
            labels_file.write(
                "".join(json.dumps(label, ensure_ascii=False) + "\n" for label in message.labels)
            )
            report.labels_written += len(message.labels)

