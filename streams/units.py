"""Unit conversion by UCUM, computed by a maintained units library instead of hand factors.

The terminology maps each local unit to a standard UCUM unit; this module asks pint (with
the UCUM grammar of ucumvert) for the conversion between them, once, at load, and reduces it
to an affine ``value * factor + offset`` so the per-record hot path does no unit parsing.
Conversions that physics alone cannot do (mass <-> amount of substance needs the analyte's
molar mass; equivalents <-> moles need the ion's valence) take those facts from the analyte
file ``streams/dictionaries/analytes.yaml``, keyed by LOINC, and only for that analyte.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pint
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ucumvert import PintUcumRegistry

from streams.model import NonBlank

DEFAULT_ANALYTES_PATH: Final[Path] = (
    Path(__file__).resolve().parent / "dictionaries" / "analytes.yaml"
)

# The pint name of UCUM's "eq" (equivalents), whatever its prefix (meq, ueq).
_EQUIVALENTS: Final = "equivalents"


class UnitConversionError(ValueError):
    """Two units cannot be converted (not UCUM, different kinds, or analyte facts missing)."""


class AnalytesError(ValueError):
    """The analyte file is missing, not YAML, or does not match the expected shape."""


@dataclass(frozen=True, slots=True)
class Analyte:
    """Physical facts of one measured substance that unit conversion may need.

    ``molar_mass_g_per_mol`` converts mass to amount of substance; ``valence`` (charge
    number, as a positive integer) converts equivalents to moles. ``source`` says where the
    numbers come from, so a reviewer can check them.
    """

    name: str
    loinc: tuple[str, ...]
    molar_mass_g_per_mol: float | None
    valence: int | None
    source: str


@dataclass(frozen=True, slots=True)
class Analytes:
    """A loaded analyte file: its version and the analytes by LOINC code."""

    version: str
    by_loinc: dict[str, Analyte]

    def for_loinc(self, loinc: str) -> Analyte | None:
        """The analyte a LOINC code measures, or None when the file does not declare it."""
        return self.by_loinc.get(loinc)


@dataclass(frozen=True, slots=True)
class Affine:
    """A conversion ``standard = value * factor + offset`` (offset only for temperatures)."""

    factor: float
    offset: float

    def apply(self, value: float) -> float:
        """``value`` converted (not rounded)."""
        return value * self.factor + self.offset


#: Longer unit texts are refused without parsing (real units are a few characters).
MAX_UNIT_CHARS: Final = 100
_ANNOTATION: Final = re.compile(r"\{[^{}]*\}")


@functools.cache
def _registry() -> Any:
    # Built once per process (about a second): pint's definitions plus UCUM's.
    return PintUcumRegistry()


@functools.lru_cache(maxsize=1024)
def _quantity(ucum: str) -> Any:
    """The pint quantity of one UCUM unit; raises UnitConversionError when not UCUM."""
    if len(ucum) > MAX_UNIT_CHARS:
        # The UCUM parser takes seconds on thousands of characters: refused unparsed.
        raise UnitConversionError(
            f"a unit of {len(ucum)} characters is not a UCUM unit (at most {MAX_UNIT_CHARS})"
        )
    try:
        quantity = _registry().from_ucum(ucum)
    except Exception as exc:  # ucumvert raises lark and pint errors of several kinds
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnitConversionError(
            f"{ucum!r} is not a UCUM unit the library knows ({reason})"
        ) from None
    if not isinstance(quantity, pint.Quantity):
        # ucumvert gives a bare annotation ("{ratio}", "{}") back as a parser token; in
        # UCUM it is the unity, as "{ratio}/L" is 1/L.
        if _ANNOTATION.fullmatch(ucum):
            return _registry().from_ucum("1")
        raise UnitConversionError(f"{ucum!r} is not a UCUM unit the library knows")
    try:
        finite = math.isfinite(float(quantity.magnitude))
    except (OverflowError, TypeError, ValueError):
        finite = False
    if not finite:  # a number as a unit ("1e999", 400 digits): no conversion can use it
        raise UnitConversionError(f"{ucum[:40]!r} has a factor no number can hold")
    return quantity


def is_ucum(unit: str) -> bool:
    """True when ``unit`` is a valid UCUM unit the library can convert."""
    try:
        _quantity(unit)
    except UnitConversionError:
        return False
    return True


def to_ucum(unit: str, aliases: Mapping[str, str]) -> str:
    """The UCUM spelling of a unit as a source sends it: its alias when it has one.

    Aliases win over UCUM parsing on purpose: "K/uL" (thousands per microlitre) parses as
    UCUM kelvin per microlitre, and only the alias table knows what the source meant.
    """
    return aliases.get(unit, unit)


def _equivalent_exponent(quantity: Any) -> int:
    """How many times UCUM "eq" appears in a unit (meq/L: 1, mol/L: 0)."""
    registry = quantity._REGISTRY
    exponent = 0
    for name, power in quantity.unit_items():
        if any(unit == _EQUIVALENTS for _, unit, _ in registry.parse_unit_name(name)):
            exponent += int(power)
    return exponent


def affine_conversion(source: str, target: str, analyte: Analyte | None = None) -> Affine:
    """The affine conversion of values in UCUM ``source`` into UCUM ``target``.

    Computed by the library from two points (0 and 1), so offsets (degF -> Cel) come out
    right. Mass <-> substance uses the analyte's molar mass (pint's chemistry context);
    UCUM defines eq as mol, so a unit in equivalents is divided by the analyte's valence.
    Raises UnitConversionError naming the units and what is missing.
    """
    source_q, target_q = _quantity(source), _quantity(target)
    equivalents = _equivalent_exponent(target_q) - _equivalent_exponent(source_q)
    if equivalents and (analyte is None or analyte.valence is None):
        raise UnitConversionError(
            f"{source!r} -> {target!r} converts equivalents and moles: it needs the analyte's "
            "valence in analytes.yaml"
        )
    # ucumvert builds quantities in pint's application registry, not in the
    # PintUcumRegistry instance: convert within the registry the quantities belong to.
    registry = source_q._REGISTRY

    def convert(value: float) -> float:
        local = registry.Quantity(value * source_q.magnitude, source_q.units)
        try:
            converted = local.to(target_q.units)
        except pint.DimensionalityError:
            if analyte is None or analyte.molar_mass_g_per_mol is None:
                raise UnitConversionError(
                    f"{source!r} ({source_q.dimensionality}) and {target!r} "
                    f"({target_q.dimensionality}) measure different kinds of quantity; mass <-> "
                    "amount of substance needs the analyte's molar mass in analytes.yaml"
                ) from None
            molar_mass = registry.Quantity(analyte.molar_mass_g_per_mol, "g/mol")
            try:
                converted = local.to(target_q.units, "chemistry", mw=molar_mass)
            except pint.DimensionalityError:
                raise UnitConversionError(
                    f"{source!r} ({source_q.dimensionality}) and {target!r} "
                    f"({target_q.dimensionality}) cannot be converted even with a molar mass"
                ) from None
        return float(converted.magnitude) / float(target_q.magnitude)

    offset = convert(0.0)
    factor = convert(1.0) - offset
    if equivalents:
        assert analyte is not None and analyte.valence is not None  # checked above
        # 1 eq of an ion of charge z is 1/z mol: each eq in the target multiplies by z.
        scale = float(analyte.valence) ** equivalents
        factor, offset = factor * scale, offset * scale
    if not (math.isfinite(factor) and math.isfinite(offset)) or factor == 0:
        raise UnitConversionError(f"{source!r} -> {target!r} gives no usable conversion")
    return Affine(factor, offset)


def _same(first: Affine, second: Affine) -> bool:
    """Whether two conversions agree (to rounding)."""
    return math.isclose(first.factor, second.factor, rel_tol=1e-9) and math.isclose(
        first.offset, second.offset, rel_tol=1e-9, abs_tol=1e-12
    )


class UnitReader:
    """Reads the units sources send, whatever their case, into conversions to a standard unit.

    A unit is looked up as sent first (an alias of the terminology, else UCUM). Only a unit
    that is neither is compared case-insensitively: "MEQ/L" and "MG/DL" are what
    upper-case laboratory systems send for meq/L and mg/dL. A unit that is UCUM as sent
    keeps its meaning ("U/L" is enzyme units, never "u/l", atomic mass units) unless a
    reading in another case contradicts it ("Mg/dL", megagrams, against "mg/dl"), and every
    case-insensitive reading that converts must agree, or the unit stays unread. Results
    are cached per (unit, target, analyte): the per-record path parses a unit once.
    """

    def __init__(self, aliases: Mapping[str, str], analytes: Analytes) -> None:
        self.aliases = dict(aliases)
        self.analytes = analytes
        folded: dict[str, set[str]] = {}
        for alias, ucum in self.aliases.items():
            folded.setdefault(alias.casefold(), set()).add(ucum)
        self._folded_aliases = folded
        self._conversion = functools.lru_cache(maxsize=4096)(self._convert)

    def conversion(self, sent: str, target: str, loinc: str | None = None) -> Affine | None:
        """The conversion of values sent in ``sent`` into UCUM ``target`` for the analyte a
        LOINC code measures, or None when the unit cannot be read or converted for certain."""
        return self._conversion(sent.strip(), target, loinc)

    def _convert(self, sent: str, target: str, loinc: str | None) -> Affine | None:
        if not sent:
            return None
        analyte = self.analytes.for_loinc(loinc) if loinc else None
        as_sent = to_ucum(sent, self.aliases)
        exact = self._try(as_sent, target, analyte)
        if as_sent != sent:
            return exact  # the terminology's alias says what the source means
        candidates = {*self._folded_aliases.get(sent.casefold(), ()), sent.lower()}
        if sent.casefold() == target.casefold():
            candidates.add(target)
        readings = [
            affine
            for affine in (self._try(ucum, target, analyte) for ucum in sorted(candidates))
            if affine is not None
        ]
        if exact is not None:
            # "Mg/dL" is UCUM for megagrams: when a reading in another case ("mg/dl")
            # contradicts it, nobody can tell which was meant.
            return exact if all(_same(exact, r) for r in readings) else None
        if is_ucum(sent) or not readings:
            # A unit that reads as sent means what it says ("U/L" is enzyme units, never
            # "u/l"): only a unit nothing can read is tried in other cases.
            return None
        return readings[0] if all(_same(readings[0], r) for r in readings) else None

    @staticmethod
    def _try(ucum: str, target: str, analyte: Analyte | None) -> Affine | None:
        try:
            return affine_conversion(ucum, target, analyte)
        except UnitConversionError:
            return None


# --- the analyte file, validated with pydantic -------------------------------------------


_STRICT = ConfigDict(extra="forbid", frozen=True)


class _AnalyteModel(BaseModel):
    model_config = _STRICT

    loinc: list[NonBlank] = Field(min_length=1)
    molar_mass_g_per_mol: float | None = Field(default=None, gt=0)
    valence: int | None = Field(default=None, ge=1, le=4)
    source: NonBlank

    @field_validator("molar_mass_g_per_mol")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


class _AnalytesModel(BaseModel):
    model_config = _STRICT

    version: NonBlank
    analytes: dict[str, _AnalyteModel]


def _describe(error: ValidationError, limit: int = 10) -> str:
    lines = []
    for item in error.errors()[:limit]:
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {where}: {item['msg']}")
    more = error.error_count() - limit
    if more > 0:
        lines.append(f"  ... and {more} more")
    return "\n".join(lines)


def analytes_from_dict(document: Any, source: str = "<dict>") -> Analytes:
    """Validate a parsed analyte document and index it by LOINC (each code once)."""
    try:
        model = _AnalytesModel.model_validate(document)
    except ValidationError as exc:
        raise AnalytesError(f"{source}: invalid analyte file:\n{_describe(exc)}") from None
    by_loinc: dict[str, Analyte] = {}
    for name, entry in model.analytes.items():
        if entry.molar_mass_g_per_mol is None and entry.valence is None:
            raise AnalytesError(f"{source}: analytes.{name}: give molar_mass_g_per_mol or valence")
        analyte = Analyte(
            name, tuple(entry.loinc), entry.molar_mass_g_per_mol, entry.valence, entry.source
        )
        for loinc in entry.loinc:
            if loinc in by_loinc:
                raise AnalytesError(
                    f"{source}: analytes.{name}: LOINC {loinc} is already declared by "
                    f"{by_loinc[loinc].name}"
                )
            by_loinc[loinc] = analyte
    return Analytes(model.version, by_loinc)


def load_analytes(path: Path | str = DEFAULT_ANALYTES_PATH) -> Analytes:
    """Read and validate an analyte YAML file; raises AnalytesError when invalid."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise AnalytesError(f"{path}: cannot read analyte file: {exc}") from None
    except yaml.YAMLError as exc:
        raise AnalytesError(f"{path}: not valid YAML: {exc}") from None
    return analytes_from_dict(document, str(path))
