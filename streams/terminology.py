"""The terminology dictionary: local codes and units of each organisation -> standard ones.

The dictionary is data (``streams/dictionaries/terminology.yaml``, versioned): lab test
codes to LOINC with unit conversion, diagnoses to ICD-10, departments, device metrics and
claim items. It is validated once at load and then served from plain dicts, because the
lookups run for every record in the hot path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from streams.model import NonBlank

DEFAULT_TERMINOLOGY_PATH: Final[Path] = (
    Path(__file__).resolve().parent / "dictionaries" / "terminology.yaml"
)

# Converted values are rounded so that e.g. 100 mg/dL x 0.0555 is 5.55, not 5.550000000000001.
_DECIMALS: Final = 6


class TerminologyError(ValueError):
    """The terminology file is missing, not YAML, or does not match the expected shape."""


@dataclass(frozen=True, slots=True)
class UnitMapping:
    """A local code mapped to a standard code with its unit conversion.

    A value sent in ``local_unit`` becomes ``value * factor + offset`` in ``unit``; a value
    already sent in ``unit`` is kept as is; any other unit cannot be converted.
    """

    code: str
    unit: str
    local_unit: str
    factor: float = 1.0
    offset: float = 0.0
    display: str | None = None

    def to_standard(self, value: float, sent_unit: str) -> float | None:
        """The value in the standard unit, or None when ``sent_unit`` is not convertible."""
        if sent_unit == self.local_unit:
            if self.factor == 1.0 and self.offset == 0.0:
                return value
            return round(value * self.factor + self.offset, _DECIMALS)
        if sent_unit == self.unit:
            return value
        return None

    def converts(self, sent_unit: str) -> bool:
        """True when values sent in ``sent_unit`` can be expressed in the standard unit."""
        return sent_unit == self.local_unit or sent_unit == self.unit


@dataclass(frozen=True, slots=True)
class OrganisationDictionary:
    """All code maps of one organisation, as plain dicts for fast lookups."""

    lab: dict[str, UnitMapping] = field(default_factory=dict)
    lab_by_loinc: dict[str, UnitMapping] = field(default_factory=dict)
    diagnosis: dict[str, str] = field(default_factory=dict)
    department: dict[str, str] = field(default_factory=dict)
    device_metric: dict[str, dict[str, UnitMapping]] = field(default_factory=dict)
    claim_item: dict[str, str] = field(default_factory=dict)


_EMPTY: Final = OrganisationDictionary()


class Terminology:
    """A loaded, validated terminology version with per-organisation lookups.

    Every lookup returns None for an unknown organisation or code: an unmapped code never
    blocks an event, it only marks it unmapped.
    """

    __slots__ = ("version", "_organisations")

    def __init__(self, version: str, organisations: dict[str, OrganisationDictionary]) -> None:
        self.version = version
        self._organisations = organisations

    @property
    def organisation_ids(self) -> list[str]:
        """Organisations that have a dictionary."""
        return sorted(self._organisations)

    def lab(self, organisation_id: str, local_code: str) -> UnitMapping | None:
        """LOINC mapping of a local lab test code."""
        return self._organisations.get(organisation_id, _EMPTY).lab.get(local_code)

    def lab_by_loinc(self, organisation_id: str, loinc: str) -> UnitMapping | None:
        """The organisation's lab mapping whose standard code is ``loinc`` (for LN-coded OBX)."""
        return self._organisations.get(organisation_id, _EMPTY).lab_by_loinc.get(loinc)

    def diagnosis(self, organisation_id: str, local_code: str) -> str | None:
        """ICD-10 code of a local diagnosis code."""
        return self._organisations.get(organisation_id, _EMPTY).diagnosis.get(local_code)

    def department(self, organisation_id: str, local_code: str) -> str | None:
        """Standard department code of a local department code."""
        return self._organisations.get(organisation_id, _EMPTY).department.get(local_code)

    def device_metric(
        self, organisation_id: str, device_type: str, metric: str
    ) -> UnitMapping | None:
        """LOINC mapping of a device-local metric code for one device type."""
        metrics = self._organisations.get(organisation_id, _EMPTY).device_metric.get(device_type)
        return None if metrics is None else metrics.get(metric)

    def claim_item(self, organisation_id: str, local_code: str) -> str | None:
        """Standard item code (ATC for drugs, national code otherwise) of a local claim item."""
        return self._organisations.get(organisation_id, _EMPTY).claim_item.get(local_code)


def convert_unit(value: float, sent_unit: str, mapping: UnitMapping) -> float | None:
    """``value`` sent in ``sent_unit`` expressed in the mapping's standard unit, or None."""
    return mapping.to_standard(value, sent_unit)


# --- the file format, validated with pydantic -------------------------------------------

_STRICT = ConfigDict(extra="forbid", frozen=True)


class _UnitMappingModel(BaseModel):
    model_config = _STRICT

    loinc: NonBlank
    unit: NonBlank
    local_unit: str | None = None
    factor: float = 1.0
    offset: float = 0.0
    display: str | None = None

    @field_validator("factor", "offset")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("factor")
    @classmethod
    def _non_zero(cls, value: float) -> float:
        if value == 0:
            raise ValueError("must not be 0 (every value would become the offset)")
        return value

    def build(self) -> UnitMapping:
        local_unit = self.unit if self.local_unit is None else self.local_unit
        return UnitMapping(
            self.loinc, self.unit, local_unit, self.factor, self.offset, self.display
        )


class _OrganisationModel(BaseModel):
    model_config = _STRICT

    lab: dict[str, _UnitMappingModel] = {}
    diagnosis: dict[str, str] = {}
    department: dict[str, str] = {}
    device_metric: dict[str, dict[str, _UnitMappingModel]] = {}
    claim_item: dict[str, str] = {}


class _TerminologyModel(BaseModel):
    model_config = _STRICT

    version: NonBlank
    organisations: dict[str, _OrganisationModel]


def _build(model: _TerminologyModel) -> Terminology:
    organisations: dict[str, OrganisationDictionary] = {}
    for organisation_id, org in model.organisations.items():
        lab = {code: entry.build() for code, entry in org.lab.items()}
        lab_by_loinc: dict[str, UnitMapping] = {}
        for mapping in lab.values():
            lab_by_loinc.setdefault(mapping.code, mapping)
        organisations[organisation_id] = OrganisationDictionary(
            lab=lab,
            lab_by_loinc=lab_by_loinc,
            diagnosis=dict(org.diagnosis),
            department=dict(org.department),
            device_metric={
                device_type: {metric: entry.build() for metric, entry in metrics.items()}
                for device_type, metrics in org.device_metric.items()
            },
            claim_item=dict(org.claim_item),
        )
    return Terminology(model.version, organisations)


def _describe(error: ValidationError, limit: int = 10) -> str:
    lines = []
    for item in error.errors()[:limit]:
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {where}: {item['msg']}")
    more = error.error_count() - limit
    if more > 0:
        lines.append(f"  ... and {more} more")
    return "\n".join(lines)


def terminology_from_dict(document: Any, source: str = "<dict>") -> Terminology:
    """Validate a parsed terminology document and build the lookup tables."""
    try:
        model = _TerminologyModel.model_validate(document)
    except ValidationError as exc:
        # Unquoted YAML keys such as 03 or NO arrive as int/bool: name them plainly.
        raise TerminologyError(
            f"{source}: invalid terminology dictionary "
            f"(quote codes that YAML could read as numbers or booleans):\n{_describe(exc)}"
        ) from None
    return _build(model)


def load_terminology(path: Path | str = DEFAULT_TERMINOLOGY_PATH) -> Terminology:
    """Read, validate and index a terminology YAML file; raises TerminologyError when invalid."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TerminologyError(f"{path}: cannot read terminology dictionary: {exc}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TerminologyError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(document, dict):
        raise TerminologyError(f"{path}: expected a mapping with version and organisations")
    return terminology_from_dict(document, str(path))
