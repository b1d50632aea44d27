"""The terminology dictionary: local codes and units of each organisation -> standard ones.

The dictionary is data (``streams/dictionaries/terminology.yaml``, versioned): lab test
codes to LOINC with unit conversion, diagnoses to ICD-10, departments, device metrics and
claim items. Unit conversions come from the UCUM units library (:mod:`streams.units`) with
the analyte facts of ``analytes.yaml``; display texts of the standard codes come from the
catalogue in ``dictionaries/catalogue/``. Everything is validated once at load and then
served from plain dicts, because the lookups run for every record in the hot path.
:class:`TerminologySource` reloads a changed file without a restart.
"""

from __future__ import annotations

import csv
import logging
import math
import re
import time
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
)
from rapidfuzz import fuzz

from streams.model import NonBlank
from streams.reloading import ReloadingFile
from streams.units import (
    DEFAULT_ANALYTES_PATH,
    Affine,
    Analytes,
    AnalytesError,
    UnitConversionError,
    UnitReader,
    affine_conversion,
    is_ucum,
    load_analytes,
    to_ucum,
)

logger = logging.getLogger(__name__)

DEFAULT_TERMINOLOGY_PATH: Final[Path] = (
    Path(__file__).resolve().parent / "dictionaries" / "terminology.yaml"
)
DEFAULT_CATALOGUE_DIR: Final[Path] = Path(__file__).resolve().parent / "dictionaries" / "catalogue"

# Converted values are rounded so that e.g. 100 mg/dL x 0.0555 is 5.55, not 5.550000000000001.
_DECIMALS: Final = 6

#: The code systems of a dictionary, as named by status(), candidates_declared() and
#: rank_candidates(). Device metric codes are written "device_type/metric".
SYSTEMS: Final = ("lab", "diagnosis", "department", "device_metric", "claim_item")
System = Literal["lab", "diagnosis", "department", "device_metric", "claim_item"]
MappingStatus = Literal["mapped", "unmapped", "ambiguous"]

#: Catalogue file (without .csv) that holds the standard codes of each system.
CATALOGUE_OF_SYSTEM: Final = {
    "lab": "loinc",
    "device_metric": "loinc",
    "diagnosis": "icd10",
    "department": "department",
    "claim_item": "atc",
}
_CATALOGUE_NAMES: Final = tuple(sorted(set(CATALOGUE_OF_SYSTEM.values())))
_CATALOGUE_HEADER: Final = ["code", "display_en", "display_zh"]

# rank_candidates keeps the best few per (system, display) and at most this many displays.
_RANK_DEPTH: Final = 10
_RANK_CACHE_SIZE: Final = 4096

# A hand-written factor (deprecated format) may differ from the library's by rounding only.
_DECLARED_FACTOR_TOLERANCE: Final = 0.01


class TerminologyError(ValueError):
    """The terminology file is missing, not YAML, or does not match the expected shape."""


@dataclass(frozen=True, slots=True)
class UnitMapping:
    """A local code mapped to a standard code with its unit conversion.

    A value sent in ``local_unit`` becomes ``value * factor + offset`` in ``unit``; a value
    already sent in ``unit`` is kept as is. Any other unit (another spelling, another case,
    meq/L for mmol/L of a monovalent ion, mg/dL for mmol/L of an analyte with a molar mass)
    is converted by ``reader`` when the units library can do it for certain. The factor and
    offset are computed at load by the units library (see :mod:`streams.units`).
    """

    code: str
    unit: str
    local_unit: str
    factor: float = 1.0
    offset: float = 0.0
    display: str | None = None
    reader: UnitReader | None = field(default=None, compare=False, repr=False)

    def to_standard(self, value: float, sent_unit: str) -> float | None:
        """The value in the standard unit, or None when ``sent_unit`` is not convertible."""
        if sent_unit == self.local_unit:
            if self.factor == 1.0 and self.offset == 0.0:
                return value
            return round(value * self.factor + self.offset, _DECIMALS)
        if sent_unit == self.unit:
            return value
        conversion = self._other_unit(sent_unit)
        return None if conversion is None else round(conversion.apply(value), _DECIMALS)

    def converts(self, sent_unit: str) -> bool:
        """True when values sent in ``sent_unit`` can be expressed in the standard unit."""
        return (
            sent_unit == self.local_unit
            or sent_unit == self.unit
            or self._other_unit(sent_unit) is not None
        )

    def _other_unit(self, sent_unit: str) -> Affine | None:
        if self.reader is None or not sent_unit:
            return None
        return self.reader.conversion(sent_unit, self.unit, self.code)


@dataclass(frozen=True, slots=True)
class CatalogueEntry:
    """One standard code with its English and (possibly empty) Chinese display text."""

    code: str
    display_en: str
    display_zh: str


@dataclass(frozen=True, slots=True)
class Candidate:
    """A standard code proposed for a local display, with a similarity score in 0..1."""

    code: str
    display: str
    score: float


@dataclass(frozen=True, slots=True)
class Catalogue:
    """The standard codes with display texts, per catalogue (loinc, icd10, atc, department).

    ``normalised`` holds the display texts prepared for ranking, computed once at load.
    """

    entries: dict[str, tuple[CatalogueEntry, ...]]
    by_code: dict[str, dict[str, CatalogueEntry]]
    normalised: dict[str, tuple[tuple[str, str], ...]]

    def entry(self, catalogue: str, code: str) -> CatalogueEntry | None:
        """The catalogue entry of a standard code, or None when the catalogue lacks it."""
        return self.by_code.get(catalogue, {}).get(code)


_EMPTY_CATALOGUE: Final = Catalogue({}, {}, {})


@dataclass(frozen=True, slots=True)
class OrganisationDictionary:
    """All code maps of one organisation, as plain dicts for fast lookups.

    ``ambiguous`` holds, per system, the local codes declared to mean one of several
    standard codes; they are absent from the lookup dicts, so lookups return None.
    """

    lab: dict[str, UnitMapping] = field(default_factory=dict)
    lab_by_loinc: dict[str, UnitMapping] = field(default_factory=dict)
    diagnosis: dict[str, str] = field(default_factory=dict)
    department: dict[str, str] = field(default_factory=dict)
    device_metric: dict[str, dict[str, UnitMapping]] = field(default_factory=dict)
    claim_item: dict[str, str] = field(default_factory=dict)
    ambiguous: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)


_EMPTY: Final = OrganisationDictionary()


class Terminology:
    """A loaded, validated terminology version with per-organisation lookups.

    Every lookup returns None for an unknown organisation or code: an unmapped code never
    blocks an event, it only marks it unmapped. The catalogue loaded with it is covered by
    the same ``version``.
    """

    __slots__ = ("version", "catalogue", "units", "_organisations", "_rankings")

    def __init__(
        self,
        version: str,
        organisations: dict[str, OrganisationDictionary],
        catalogue: Catalogue | None = None,
        units: UnitReader | None = None,
    ) -> None:
        self.version = version
        self.catalogue = _EMPTY_CATALOGUE if catalogue is None else catalogue
        #: Reads the units sources send (aliases of this version, any case, UCUM).
        self.units = UnitReader({}, Analytes("", {})) if units is None else units
        self._organisations = organisations
        self._rankings: dict[tuple[str, str], tuple[Candidate, ...]] = {}

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

    # --- mapping status ---------------------------------------------------------------

    def _mapped_code(self, organisation_id: str, system: str, local_code: str) -> str | None:
        if system == "lab":
            mapping = self.lab(organisation_id, local_code)
        elif system == "device_metric":
            device_type, _, metric = local_code.partition("/")
            mapping = self.device_metric(organisation_id, device_type, metric)
        elif system == "diagnosis":
            return self.diagnosis(organisation_id, local_code)
        elif system == "department":
            return self.department(organisation_id, local_code)
        elif system == "claim_item":
            return self.claim_item(organisation_id, local_code)
        else:
            raise ValueError(f"unknown code system {system!r}; expected one of {SYSTEMS}")
        return None if mapping is None else mapping.code

    def _ambiguous(self, organisation_id: str, system: str, local_code: str) -> tuple[str, ...]:
        by_system = self._organisations.get(organisation_id, _EMPTY).ambiguous
        return by_system.get(system, {}).get(local_code, ())

    def status(self, organisation_id: str, system: str, local_code: str) -> MappingStatus:
        """Whether a local code is mapped, unmapped, or declared ambiguous.

        ``system`` is one of :data:`SYSTEMS`; a device metric is "device_type/metric" (split
        at the first "/"). Raises ValueError for an unknown system.
        """
        mapped = self._mapped_code(organisation_id, system, local_code)
        if self._ambiguous(organisation_id, system, local_code):
            return "ambiguous"
        return "unmapped" if mapped is None else "mapped"

    def candidates_declared(
        self, organisation_id: str, system: str, local_code: str
    ) -> tuple[str, ...]:
        """The standard codes the dictionary declares for a local code.

        Several for an ambiguous code, the one mapped code for a mapped code, none for an
        unmapped code. Same arguments as :meth:`status`.
        """
        mapped = self._mapped_code(organisation_id, system, local_code)
        declared = self._ambiguous(organisation_id, system, local_code)
        if declared:
            return declared
        return () if mapped is None else (mapped,)

    # --- the catalogue -------------------------------------------------------------------

    def catalogue_entry(self, system: str, code: str) -> CatalogueEntry | None:
        """Display texts of a standard code of ``system``, or None when not catalogued."""
        return self.catalogue.entry(_catalogue_name(system), code)

    def known_loinc(self, code: str) -> bool:
        """True when a sender's LOINC code is well formed (check digit) and catalogued.

        A code that fails either is not taken as mapped: the result is marked unmapped and
        the code goes on the steward's worklist instead of being stored as if it were LOINC.
        """
        return valid_loinc(code) and self.catalogue.entry("loinc", code) is not None

    def rank_candidates(self, system: str, local_display: str, limit: int = 3) -> list[Candidate]:
        """The catalogue codes whose display text is most like ``local_display``, best first.

        A helper for the governance team mapping new local codes, not an automatic mapping.
        The score (0..1) is the better of the English and Chinese displays, each the mean of
        rapidfuzz's token-set and token-sort ratios on text normalised for case and
        punctuation, with every Han character a token of its own. Ties keep catalogue order.
        Results are cached per (system, display) for the best ten.
        """
        name = _catalogue_name(system)
        if limit <= 0:
            return []
        query = normalise_display(local_display)
        if limit > _RANK_DEPTH:
            return list(self._rank(name, query)[:limit])
        key = (name, query)
        ranking = self._rankings.get(key)
        if ranking is None:
            ranking = self._rank(name, query)[:_RANK_DEPTH]
            if len(self._rankings) >= _RANK_CACHE_SIZE:
                # Bounded: drop the oldest display (dicts keep insertion order).
                del self._rankings[next(iter(self._rankings))]
            self._rankings[key] = ranking
        return list(ranking[:limit])

    def _rank(self, name: str, query: str) -> tuple[Candidate, ...]:
        entries = self.catalogue.entries.get(name, ())
        normalised = self.catalogue.normalised.get(name, ())
        scored = [
            Candidate(
                entry.code,
                entry.display_en or entry.display_zh,
                max(_similarity(query, english), _similarity(query, chinese)),
            )
            for entry, (english, chinese) in zip(entries, normalised, strict=True)
        ]
        # sorted() is stable: equal scores keep catalogue order.
        return tuple(sorted(scored, key=lambda candidate: -candidate.score))


def _catalogue_name(system: str) -> str:
    try:
        return CATALOGUE_OF_SYSTEM[system]
    except KeyError:
        raise ValueError(f"unknown code system {system!r}; expected one of {SYSTEMS}") from None


def _is_han(char: str) -> bool:
    # CJK unified ideographs (basic block and extension A) and compatibility ideographs.
    return "\u4e00" <= char <= "\u9fff" or "\u3400" <= char <= "\u4dbf" or (
        "\uf900" <= char <= "\ufaff"
    )


_LOINC_CODE: Final = re.compile(r"(\d{1,7})-(\d)")


def valid_loinc(code: str) -> bool:
    """True when ``code`` has LOINC's form (up to 7 digits, hyphen, check digit) and its
    check digit is right (LOINC's mod 10 algorithm, the Luhn algorithm)."""
    match = _LOINC_CODE.fullmatch(code)
    if match is None:
        return False
    total = 0
    for position, digit in enumerate(reversed(match.group(1))):
        doubled = int(digit) * (2 if position % 2 == 0 else 1)
        total += doubled // 10 + doubled % 10
    return (10 - total % 10) % 10 == int(match.group(2))


def normalise_display(text: str) -> str:
    """A display text prepared for comparison: NFKC, case-folded, punctuation as spaces,
    and each Han character a separate token (Chinese has no spaces between words)."""
    parts: list[str] = []
    for char in unicodedata.normalize("NFKC", text).casefold():
        if _is_han(char):
            parts.append(f" {char} ")
        elif char.isalnum():
            parts.append(char)
        else:
            parts.append(" ")
    return " ".join("".join(parts).split())


def _similarity(query: str, display: str) -> float:
    if not query or not display:
        return 0.0
    # Token-set rewards a display that contains the query's words; token-sort penalises
    # the extra words, so the closest of several containing displays wins.
    both = fuzz.token_set_ratio(query, display) + fuzz.token_sort_ratio(query, display)
    return round(both / 200.0, 4)


def convert_unit(value: float, sent_unit: str, mapping: UnitMapping) -> float | None:
    """``value`` sent in ``sent_unit`` expressed in the mapping's standard unit, or None."""
    return mapping.to_standard(value, sent_unit)


# --- the file format, validated with pydantic -------------------------------------------

_STRICT = ConfigDict(extra="forbid", frozen=True)

# Union tags: they appear in pydantic's error locations and are removed by _describe.
_CODE_TAG: Final = "~code"
_MAPPING_TAG: Final = "~mapping"
_AMBIGUOUS_TAG: Final = "~ambiguous"


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


class _AmbiguousModel(BaseModel):
    """A local code that may mean any of several standard codes: never mapped by lookup."""

    model_config = _STRICT

    ambiguous: list[NonBlank] = Field(min_length=2)
    display: str | None = None

    @field_validator("ambiguous")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("lists a code twice")
        return value


class _UnitMappingModel(BaseModel):
    model_config = _STRICT

    loinc: NonBlank
    unit: NonBlank
    local_unit: str | None = None
    # Deprecated: conversions come from the units library. Kept so older dictionaries load;
    # when given they are used as written after a cross-check with the library.
    factor: float | None = None
    offset: float | None = None
    display: str | None = None

    _finite_numbers = field_validator("factor", "offset")(_finite)

    @field_validator("factor")
    @classmethod
    def _non_zero(cls, value: float | None) -> float | None:
        if value == 0:
            raise ValueError("must not be 0 (every value would become the offset)")
        return value


def _entry_tag(default: str) -> Callable[[Any], str]:
    def tag(value: Any) -> str:
        return _AMBIGUOUS_TAG if isinstance(value, dict) and "ambiguous" in value else default

    return tag


_CodeEntry = Annotated[
    Annotated[str, Tag(_CODE_TAG)] | Annotated[_AmbiguousModel, Tag(_AMBIGUOUS_TAG)],
    Discriminator(_entry_tag(_CODE_TAG)),
]
_UnitEntry = Annotated[
    Annotated[_UnitMappingModel, Tag(_MAPPING_TAG)]
    | Annotated[_AmbiguousModel, Tag(_AMBIGUOUS_TAG)],
    Discriminator(_entry_tag(_MAPPING_TAG)),
]


class _OrganisationModel(BaseModel):
    model_config = _STRICT

    lab: dict[str, _UnitEntry] = {}
    diagnosis: dict[str, _CodeEntry] = {}
    department: dict[str, _CodeEntry] = {}
    device_metric: dict[str, dict[str, _UnitEntry]] = {}
    claim_item: dict[str, _CodeEntry] = {}


class _TerminologyModel(BaseModel):
    model_config = _STRICT

    version: NonBlank
    # Local unit spellings that are not UCUM (or mean something else in UCUM) -> UCUM.
    unit_aliases: dict[NonBlank, NonBlank] = {}
    organisations: dict[str, _OrganisationModel]


@dataclass(slots=True)
class _Builder:
    """Turns the validated model into lookup dicts, computing unit conversions."""

    source: str
    aliases: Mapping[str, str]
    analytes: Analytes
    reader: UnitReader
    declared: list[str] = field(default_factory=list)

    def unit_mapping(self, entry: _UnitMappingModel, where: str) -> UnitMapping:
        local_unit = entry.unit if entry.local_unit is None else entry.local_unit
        units = f"{local_unit!r} -> {entry.unit!r}"
        local_ucum = to_ucum(local_unit, self.aliases)
        try:
            computed: Affine | None = affine_conversion(
                local_ucum, entry.unit, self.analytes.for_loinc(entry.loinc)
            )
            problem = ""
        except UnitConversionError as exc:
            computed, problem = None, str(exc)
            if local_ucum == local_unit and not is_ucum(local_unit):
                problem = f"{local_unit!r} is not UCUM: add it to unit_aliases"
        if entry.factor is None and entry.offset is None:
            if computed is None:
                raise TerminologyError(
                    f"{self.source}: {where} (LOINC {entry.loinc}): cannot convert {units}: "
                    f"{problem}"
                )
            factor, offset = computed.factor, computed.offset
        else:
            factor = 1.0 if entry.factor is None else entry.factor
            offset = 0.0 if entry.offset is None else entry.offset
            self.declared.append(where)
            if computed is not None and not (
                math.isclose(factor, computed.factor, rel_tol=_DECLARED_FACTOR_TOLERANCE)
                and math.isclose(
                    offset, computed.offset, rel_tol=_DECLARED_FACTOR_TOLERANCE, abs_tol=1e-9
                )
            ):
                raise TerminologyError(
                    f"{self.source}: {where} (LOINC {entry.loinc}): declared factor {factor:g} "
                    f"and offset {offset:g} for {units} disagree with the units library "
                    f"({computed.factor:.6g}, {computed.offset:.6g})"
                )
        if factor == 1.0 and abs(offset) < 1e-12:
            offset = 0.0  # identity: to_standard's fast path keeps the sent value untouched
        return UnitMapping(
            entry.loinc, entry.unit, local_unit, factor, offset, entry.display, self.reader
        )

    def organisation(self, organisation_id: str, org: _OrganisationModel) -> OrganisationDictionary:
        ambiguous: dict[str, dict[str, tuple[str, ...]]] = {}

        def split_codes(
            system: str, entries: Mapping[str, str | _AmbiguousModel]
        ) -> dict[str, str]:
            codes: dict[str, str] = {}
            for local_code, entry in entries.items():
                if isinstance(entry, _AmbiguousModel):
                    ambiguous.setdefault(system, {})[local_code] = tuple(entry.ambiguous)
                else:
                    codes[local_code] = entry
            return codes

        def split_units(
            system: str, prefix: str, entries: Mapping[str, _UnitMappingModel | _AmbiguousModel]
        ) -> dict[str, UnitMapping]:
            mappings: dict[str, UnitMapping] = {}
            for local_code, entry in entries.items():
                if isinstance(entry, _AmbiguousModel):
                    ambiguous.setdefault(system, {})[prefix + local_code] = tuple(entry.ambiguous)
                else:
                    where = f"organisation {organisation_id} {system} {prefix}{local_code}"
                    mappings[local_code] = self.unit_mapping(entry, where)
            return mappings

        lab = split_units("lab", "", org.lab)
        lab_by_loinc: dict[str, UnitMapping] = {}
        for mapping in lab.values():
            lab_by_loinc.setdefault(mapping.code, mapping)
        device_metric = {
            device_type: split_units("device_metric", f"{device_type}/", metrics)
            for device_type, metrics in org.device_metric.items()
        }
        return OrganisationDictionary(
            lab=lab,
            lab_by_loinc=lab_by_loinc,
            diagnosis=split_codes("diagnosis", org.diagnosis),
            department=split_codes("department", org.department),
            device_metric=device_metric,
            claim_item=split_codes("claim_item", org.claim_item),
            ambiguous=ambiguous,
        )


def _build(
    model: _TerminologyModel, source: str, analytes: Analytes, catalogue: Catalogue
) -> Terminology:
    for alias, ucum in model.unit_aliases.items():
        if not is_ucum(ucum):
            raise TerminologyError(
                f"{source}: unit_aliases.{alias}: {ucum!r} is not a UCUM unit the library knows"
            )
    reader = UnitReader(model.unit_aliases, analytes)
    builder = _Builder(source, model.unit_aliases, analytes, reader)
    organisations = {
        organisation_id: builder.organisation(organisation_id, org)
        for organisation_id, org in model.organisations.items()
    }
    if builder.declared:
        logger.warning(
            "%s: %d unit mapping(s) declare factor/offset by hand (deprecated: remove them, "
            "the units library computes the conversion), e.g. %s",
            source,
            len(builder.declared),
            builder.declared[0],
        )
    return Terminology(model.version, organisations, catalogue, reader)


def _describe(error: ValidationError, limit: int = 10) -> str:
    lines = []
    for item in error.errors()[:limit]:
        parts = [str(part) for part in item["loc"] if not str(part).startswith("~")]
        where = ".".join(parts) or "(top level)"
        lines.append(f"  {where}: {item['msg']}")
    more = error.error_count() - limit
    if more > 0:
        lines.append(f"  ... and {more} more")
    return "\n".join(lines)


# --- the catalogue ----------------------------------------------------------------------


def load_catalogue(directory: Path | str = DEFAULT_CATALOGUE_DIR) -> Catalogue:
    """Read the catalogue CSV files (one per code system); raises TerminologyError."""
    directory = Path(directory)
    entries: dict[str, tuple[CatalogueEntry, ...]] = {}
    for name in _CATALOGUE_NAMES:
        entries[name] = _read_catalogue_file(directory / f"{name}.csv")
    return Catalogue(
        entries,
        {name: {entry.code: entry for entry in rows} for name, rows in entries.items()},
        {
            name: tuple(
                (normalise_display(entry.display_en), normalise_display(entry.display_zh))
                for entry in rows
            )
            for name, rows in entries.items()
        },
    )


def _read_catalogue_file(path: Path) -> tuple[CatalogueEntry, ...]:
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TerminologyError(f"{path}: cannot read catalogue: {exc}") from None
    if not rows or rows[0] != _CATALOGUE_HEADER:
        raise TerminologyError(f"{path}: the header must be {','.join(_CATALOGUE_HEADER)}")
    entries: list[CatalogueEntry] = []
    seen: set[str] = set()
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(_CATALOGUE_HEADER):
            raise TerminologyError(f"{path}:{line}: expected 3 columns, found {len(row)}")
        code, display_en, display_zh = (cell.strip() for cell in row)
        if not code or not display_en:
            raise TerminologyError(f"{path}:{line}: code and display_en are required")
        if code in seen:
            raise TerminologyError(f"{path}:{line}: code {code} is listed twice")
        seen.add(code)
        entries.append(CatalogueEntry(code, display_en, display_zh))
    return tuple(entries)


# --- loading ------------------------------------------------------------------------------


def terminology_from_dict(
    document: Any,
    source: str = "<dict>",
    *,
    analytes: Analytes | None = None,
    catalogue: Catalogue | None = None,
) -> Terminology:
    """Validate a parsed terminology document and build the lookup tables.

    Unit conversions use ``analytes`` (default: the shipped analytes.yaml); display texts
    come from ``catalogue`` (default: the shipped catalogue). A mapping whose units the
    library cannot convert is refused here, naming organisation, code and units.
    """
    try:
        model = _TerminologyModel.model_validate(document)
    except ValidationError as exc:
        # Unquoted YAML keys such as 03 or NO arrive as int/bool: name them plainly.
        raise TerminologyError(
            f"{source}: invalid terminology dictionary "
            f"(quote codes that YAML could read as numbers or booleans):\n{_describe(exc)}"
        ) from None
    if analytes is None:
        try:
            analytes = load_analytes()
        except AnalytesError as exc:
            raise TerminologyError(str(exc)) from None
    if catalogue is None:
        catalogue = load_catalogue()
    return _build(model, source, analytes, catalogue)


def load_terminology(
    path: Path | str = DEFAULT_TERMINOLOGY_PATH,
    *,
    analytes_path: Path | str = DEFAULT_ANALYTES_PATH,
    catalogue_dir: Path | str = DEFAULT_CATALOGUE_DIR,
) -> Terminology:
    """Read, validate and index a terminology YAML file with its analytes and catalogue;
    raises TerminologyError when any of them is invalid."""
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
    try:
        analytes = load_analytes(analytes_path)
    except AnalytesError as exc:
        raise TerminologyError(str(exc)) from None
    return terminology_from_dict(
        document, str(path), analytes=analytes, catalogue=load_catalogue(catalogue_dir)
    )


# --- reloading without restart ------------------------------------------------------------


class TerminologySource(ReloadingFile[Terminology]):
    """Serves the current terminology and reloads it when its files change on disk.

    The terminology file, the analyte file and the catalogue CSVs are checked (modification
    time and size) at most every ``check_every_s`` seconds, on a call to :meth:`current`.
    A changed set that loads replaces the served version; one that does not is logged once
    per file version, counted, reported to the reload listeners (the audit trail), exposed
    as :attr:`last_error`, and the previous version stays in service. The first load happens
    in the constructor and raises TerminologyError.
    """

    def __init__(
        self,
        path: Path | str = DEFAULT_TERMINOLOGY_PATH,
        *,
        analytes_path: Path | str = DEFAULT_ANALYTES_PATH,
        catalogue_dir: Path | str = DEFAULT_CATALOGUE_DIR,
        check_every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        analytes, catalogue = Path(analytes_path), Path(catalogue_dir)

        def load(terminology_path: Path) -> Terminology:
            return load_terminology(
                terminology_path, analytes_path=analytes, catalogue_dir=catalogue
            )

        super().__init__(
            "terminology",
            path,
            load,
            check_every_s,
            clock,
            also_watch=[analytes, *(catalogue / f"{name}.csv" for name in _CATALOGUE_NAMES)],
        )
