"""Unit conversion by the UCUM units library, checked against published reference factors."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.terminology import Terminology
from streams.units import (
    Affine,
    Analyte,
    AnalytesError,
    UnitConversionError,
    affine_conversion,
    analytes_from_dict,
    is_ucum,
    load_analytes,
    to_ucum,
)

GLUCOSE = Analyte("glucose", ("2345-7",), 180.156, None, "C6H12O6")
CREATININE = Analyte("creatinine", ("2160-0",), 113.12, None, "C4H7N3O")
POTASSIUM = Analyte("potassium", ("2823-3",), None, 1, "K+")
CALCIUM = Analyte("calcium", ("17861-6", "2000-8"), 40.078, 2, "Ca2+")


def test_glucose_mass_to_substance_uses_the_molar_mass() -> None:
    # 180.156 g/mol: 100 mg/dL = 1000 mg/L / 180.156 = 5.5507 mmol/L. The textbook factor
    # 0.0555 (DOMAIN.md) is this one rounded to three digits: both give 5.55 at 2 decimals.
    glucose = affine_conversion("mg/dL", "mmol/L", GLUCOSE)
    assert glucose.offset == 0.0
    assert glucose.factor == pytest.approx(0.0555074, rel=1e-6)
    assert round(glucose.apply(100.0), 4) == 5.5507
    assert round(glucose.apply(100.0), 2) == round(100.0 * 0.0555, 2) == 5.55
    back = affine_conversion("mmol/L", "mg/dL", GLUCOSE)
    assert back.apply(5.5507) == pytest.approx(100.0, abs=1e-3)  # 1 mmol/L = 18.0156 mg/dL


def test_creatinine_substance_to_mass_uses_the_molar_mass() -> None:
    # 113.12 g/mol: 1 mg/dL = 88.40 umol/L, the divisor of the usual creatinine conversion.
    creatinine = affine_conversion("umol/L", "mg/dL", CREATININE)
    assert creatinine.apply(88.4) == pytest.approx(1.0, abs=1e-4)
    assert creatinine.factor == pytest.approx(0.011312, rel=1e-9)
    assert affine_conversion("mg/dL", "umol/L", CREATININE).apply(1.0) == pytest.approx(
        88.40, abs=0.005
    )


def test_calcium_mass_to_substance() -> None:
    # Calcium 40.078 g/mol: mg/dL x 0.2495 = mmol/L (10 mg/dL = 2.495 mmol/L).
    calcium = affine_conversion("mg/dL", "mmol/L", CALCIUM)
    assert calcium.apply(10.0) == pytest.approx(2.495, abs=5e-4)


def test_equivalents_are_divided_by_the_valence() -> None:
    # mEq/L = mmol/L x valence: K 4 mEq/L = 4 mmol/L; Ca 2 mEq/L = 1 mmol/L.
    assert affine_conversion("meq/L", "mmol/L", POTASSIUM) == Affine(1.0, 0.0)
    assert affine_conversion("meq/L", "mmol/L", POTASSIUM).apply(4.0) == 4.0
    assert affine_conversion("meq/L", "mmol/L", CALCIUM).apply(2.0) == pytest.approx(1.0)
    assert affine_conversion("mmol/L", "meq/L", CALCIUM).apply(1.0) == pytest.approx(2.0)
    # Mass -> equivalents needs both facts: 10 mg/dL calcium = 4.99 mEq/L.
    assert affine_conversion("mg/dL", "meq/L", CALCIUM).apply(10.0) == pytest.approx(
        4.990, abs=1e-3
    )


def test_plain_ucum_conversions() -> None:
    assert affine_conversion("g/dL", "g/L").apply(13.5) == pytest.approx(135.0)
    assert affine_conversion("10*3/uL", "10*9/L") == Affine(1.0, 0.0)
    assert affine_conversion("mm[Hg]", "mm[Hg]") == Affine(1.0, 0.0)
    assert affine_conversion("/min", "/min") == Affine(1.0, 0.0)
    assert affine_conversion("%", "%") == Affine(1.0, 0.0)
    assert affine_conversion("mg/L", "mg/dL").apply(10.0) == pytest.approx(1.0)


def test_fahrenheit_to_celsius_is_affine() -> None:
    # C = (F - 32) x 5/9: 32 -> 0, 98.6 -> 37, 212 -> 100, -40 -> -40.
    fahrenheit = affine_conversion("[degF]", "Cel")
    assert fahrenheit.factor == pytest.approx(5 / 9)
    assert fahrenheit.offset == pytest.approx(-160 / 9)
    for value, expected in ((32.0, 0.0), (98.6, 37.0), (212.0, 100.0), (-40.0, -40.0)):
        assert fahrenheit.apply(value) == pytest.approx(expected, abs=1e-9)


def test_mass_to_substance_without_a_molar_mass_is_refused() -> None:
    with pytest.raises(UnitConversionError, match="needs the analyte's molar mass"):
        affine_conversion("mg/dL", "mmol/L")
    with pytest.raises(UnitConversionError, match="needs the analyte's molar mass"):
        affine_conversion("mg/dL", "mmol/L", POTASSIUM)  # potassium declares a valence only


def test_equivalents_without_a_valence_are_refused() -> None:
    with pytest.raises(UnitConversionError, match="needs the analyte's valence"):
        affine_conversion("meq/L", "mmol/L")
    with pytest.raises(UnitConversionError, match="needs the analyte's valence"):
        affine_conversion("meq/L", "mmol/L", GLUCOSE)


def test_units_of_different_kinds_are_refused() -> None:
    with pytest.raises(UnitConversionError, match="different kinds"):
        affine_conversion("g/L", "/min")
    with pytest.raises(UnitConversionError, match="cannot be converted even with a molar mass"):
        affine_conversion("g/L", "/min", GLUCOSE)


def test_non_ucum_units_are_refused_and_aliases_win() -> None:
    assert not is_ucum("bpm") and not is_ucum("mEq/L") and not is_ucum("mmHg")
    assert is_ucum("meq/L") and is_ucum("mm[Hg]") and is_ucum("10*9/L")
    with pytest.raises(UnitConversionError, match="'bpm' is not a UCUM unit"):
        affine_conversion("bpm", "/min")
    # "K/uL" is valid UCUM but means kelvin per microlitre: only the alias gives 10^3/uL.
    assert is_ucum("K/uL")
    with pytest.raises(UnitConversionError):
        affine_conversion("K/uL", "10*9/L")
    aliases = {"K/uL": "10*3/uL"}
    assert to_ucum("K/uL", aliases) == "10*3/uL"
    assert to_ucum("g/L", aliases) == "g/L"
    assert affine_conversion(to_ucum("K/uL", aliases), "10*9/L").apply(7.5) == 7.5


def test_the_shipped_analytes_file() -> None:
    analytes = load_analytes()
    glucose = analytes.for_loinc("2345-7")
    assert glucose is not None and glucose.molar_mass_g_per_mol == 180.156
    assert "PubChem" in glucose.source
    creatinine = analytes.for_loinc("2160-0")
    assert creatinine is not None and creatinine.molar_mass_g_per_mol == 113.12
    valences = {
        loinc: analyte.valence
        for loinc in ("2823-3", "2951-2", "2075-0", "2000-8")
        if (analyte := analytes.for_loinc(loinc)) is not None
    }
    assert valences == {"2823-3": 1, "2951-2": 1, "2075-0": 1, "2000-8": 2}
    assert analytes.for_loinc("718-7") is None  # hemoglobin g/dL -> g/L needs no facts


def test_analytes_file_errors_are_named(tmp_path: Path) -> None:
    with pytest.raises(AnalytesError, match="give molar_mass_g_per_mol or valence"):
        analytes_from_dict({"version": "1", "analytes": {"x": {"loinc": ["1-8"], "source": "s"}}})
    twice = {
        "version": "1",
        "analytes": {
            "a": {"loinc": ["1-8"], "valence": 1, "source": "s"},
            "b": {"loinc": ["1-8"], "valence": 2, "source": "s"},
        },
    }
    with pytest.raises(AnalytesError, match="LOINC 1-8 is already declared by a"):
        analytes_from_dict(twice)
    negative = {"version": "1", "analytes": {"a": {"loinc": ["1-8"], "molar_mass_g_per_mol": -1,
                                                   "source": "s"}}}
    with pytest.raises(AnalytesError, match=r"analytes\.a\.molar_mass_g_per_mol"):
        analytes_from_dict(negative)
    with pytest.raises(AnalytesError, match="cannot read analyte file"):
        load_analytes(tmp_path / "absent.yaml")


# --- the shipped dictionary converts as the old hand factors did ------------------------


def test_shipped_dictionary_reference_conversions(shipped_terminology: Terminology) -> None:
    """Published conversions through the shipped terminology (H002: US-style units)."""
    terms = shipped_terminology
    glucose = terms.lab("H002", "LAB0021")
    creatinine = terms.lab("H002", "LAB0025")
    hemoglobin = terms.lab("H002", "LAB0031")
    potassium = terms.lab("H002", "LAB0022")
    wbc = terms.lab("H002", "LAB0032")
    temperature = terms.device_metric("H002", "monitor-b", "TEMPF")
    assert None not in (glucose, creatinine, hemoglobin, potassium, wbc, temperature)
    assert glucose and creatinine and hemoglobin and potassium and wbc and temperature
    assert glucose.to_standard(100.0, "mg/dL") == 5.550745  # 6 decimals, molar mass 180.156
    assert creatinine.to_standard(88.4, "umol/L") == pytest.approx(1.0, abs=1e-4)
    assert hemoglobin.to_standard(13.5, "g/dL") == 135.0
    assert potassium.to_standard(4.0, "mEq/L") == 4.0
    assert wbc.to_standard(7.5, "K/uL") == 7.5
    assert temperature.to_standard(98.6, "degF") == 37.0
    assert temperature.to_standard(37.0, "Cel") == 37.0  # already standard: kept
