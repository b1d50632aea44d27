"""The terminology dictionary: validated loading, lookups and unit conversion."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.terminology import (
    DEFAULT_TERMINOLOGY_PATH,
    Terminology,
    TerminologyError,
    UnitMapping,
    convert_unit,
    load_terminology,
)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "terminology.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_fixture_loads_with_its_version(terminology: Terminology) -> None:
    assert terminology.version == "test-2026.1"
    assert terminology.organisation_ids == ["H001", "H002"]


def test_lab_lookup_by_local_code_and_by_loinc(terminology: Terminology) -> None:
    glucose = terminology.lab("H001", "GLU")
    assert glucose == UnitMapping("2345-7", "mmol/L", "mg/dL", 0.0555, 0.0, "Glucose")
    assert terminology.lab_by_loinc("H001", "2345-7") is glucose
    assert terminology.lab("H001", "UNKNOWN") is None
    assert terminology.lab("H999", "GLU") is None
    assert terminology.lab("H002", "GLU") is None


def test_local_unit_defaults_to_the_standard_unit(terminology: Terminology) -> None:
    sodium = terminology.lab("H001", "NA")
    assert sodium is not None
    assert (sodium.local_unit, sodium.factor, sodium.offset) == ("mmol/L", 1.0, 0.0)


def test_code_maps(terminology: Terminology) -> None:
    assert terminology.diagnosis("H001", "GX01") == "E11.9"
    assert terminology.diagnosis("H001", "GX02") is None
    assert terminology.department("H001", "NK") == "03"
    assert terminology.department("H002", "NK") is None
    assert terminology.claim_item("H001", "D001") == "C09AA05"
    assert terminology.claim_item("H001", "D002") is None


def test_device_metric_lookup(terminology: Terminology) -> None:
    heart_rate = terminology.device_metric("H001", "monitor-a", "HR")
    assert heart_rate is not None
    assert (heart_rate.code, heart_rate.unit, heart_rate.local_unit) == ("8867-4", "/min", "bpm")
    assert terminology.device_metric("H001", "monitor-b", "HR") is None
    assert terminology.device_metric("H001", "monitor-a", "RR") is None


def test_unit_conversion(terminology: Terminology) -> None:
    glucose = terminology.lab("H001", "GLU")
    temperature = terminology.device_metric("H001", "monitor-a", "TEMP")
    assert glucose is not None and temperature is not None
    assert convert_unit(100.0, "mg/dL", glucose) == 5.55  # rounded: no float noise
    assert convert_unit(180.0, "mg/dL", glucose) == 9.99
    assert convert_unit(7.2, "mmol/L", glucose) == 7.2  # already standard
    assert convert_unit(7.2, "mmol/l", glucose) is None  # units compare exactly
    assert convert_unit(7.2, "", glucose) is None
    assert glucose.converts("mg/dL") and glucose.converts("mmol/L")
    assert not glucose.converts("g/L")
    assert convert_unit(98.6, "[degF]", temperature) == 37.0


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TerminologyError, match="cannot read terminology dictionary"):
        load_terminology(tmp_path / "absent.yaml")


def test_not_yaml_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TerminologyError, match="not valid YAML"):
        load_terminology(_write(tmp_path, "version: [unclosed\n"))


def test_not_a_mapping_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TerminologyError, match="expected a mapping"):
        load_terminology(_write(tmp_path, "- just\n- a list\n"))


def test_missing_version_is_named(tmp_path: Path) -> None:
    with pytest.raises(TerminologyError, match=r"version: Field required"):
        load_terminology(_write(tmp_path, "organisations: {}\n"))


def test_unquoted_numeric_code_is_named_with_its_path(tmp_path: Path) -> None:
    text = 'version: "1"\norganisations:\n  H001:\n    department: {NK: 03}\n'
    with pytest.raises(TerminologyError) as caught:
        load_terminology(_write(tmp_path, text))
    message = str(caught.value)
    assert "organisations.H001.department.NK" in message
    assert "quote codes" in message


def test_misspelt_section_is_refused(tmp_path: Path) -> None:
    text = 'version: "1"\norganisations:\n  H001:\n    labs: {}\n'
    with pytest.raises(TerminologyError, match=r"organisations\.H001\.labs: Extra inputs"):
        load_terminology(_write(tmp_path, text))


def test_lab_entry_without_loinc_is_refused(tmp_path: Path) -> None:
    text = 'version: "1"\norganisations:\n  H001:\n    lab: {K: {unit: "mmol/L"}}\n'
    with pytest.raises(TerminologyError, match=r"organisations\.H001\.lab\.K\.loinc"):
        load_terminology(_write(tmp_path, text))


def test_zero_factor_is_refused(tmp_path: Path) -> None:
    text = (
        'version: "1"\norganisations:\n  H001:\n'
        '    lab: {K: {loinc: "2823-3", unit: "mmol/L", factor: 0}}\n'
    )
    with pytest.raises(TerminologyError, match=r"lab\.K\.factor.*must not be 0"):
        load_terminology(_write(tmp_path, text))


@pytest.mark.skipif(
    not DEFAULT_TERMINOLOGY_PATH.exists(),
    reason="streams/dictionaries/terminology.yaml not written yet",
)
def test_the_shipped_dictionary_loads() -> None:
    shipped = load_terminology()
    assert shipped.version
    assert shipped.organisation_ids
    assert load_terminology(DEFAULT_TERMINOLOGY_PATH).version == shipped.version
