"""The terminology dictionary: validated loading, lookups, unit conversion by the units
library, ambiguous codes, the standard code catalogue, candidate ranking and reloading."""

from __future__ import annotations

import csv
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from medstream.metrics import RULES_RELOADS
from streams import reloading
from streams.terminology import (
    DEFAULT_CATALOGUE_DIR,
    DEFAULT_TERMINOLOGY_PATH,
    SYSTEMS,
    Terminology,
    TerminologyError,
    TerminologySource,
    UnitMapping,
    convert_unit,
    load_catalogue,
    load_terminology,
    normalise_display,
    terminology_from_dict,
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
    assert convert_unit(7.2, "", glucose) is None
    assert glucose.converts("mg/dL") and glucose.converts("mmol/L")
    assert convert_unit(98.6, "[degF]", temperature) == 37.0


def test_any_unit_the_library_converts_for_the_analyte_is_read_in_any_case(
    terminology: Terminology,
) -> None:
    """A unit other than the mapped pair is still converted when the library can do it for
    this analyte (case-insensitively only for units that are not UCUM as sent)."""
    glucose = terminology.lab("H001", "GLU")
    assert glucose is not None
    assert convert_unit(7.2, "mmol/l", glucose) == 7.2
    assert convert_unit(7.2, "MMOL/L", glucose) == 7.2
    assert convert_unit(100.0, "MG/DL", glucose) == 5.550745  # the library's molar mass
    assert convert_unit(1.0, "g/L", glucose) == 5.550745
    assert convert_unit(7.2, "U/L", glucose) is None  # enzyme units: another kind
    assert convert_unit(7.2, "meq/L", glucose) is None  # glucose has no valence
    assert not glucose.converts("U/L") and glucose.converts("g/L")
    # UCUM as sent but contradicted by another case (megagrams, megamoles): unread, not
    # a value a million times too high (review of issue 15).
    assert convert_unit(100.0, "Mg/dL", glucose) is None
    assert convert_unit(7.2, "Mmol/L", glucose) is None


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


# --- unit conversion comes from the units library -----------------------------------------


def _document(lab: dict[str, object], **top: object) -> dict[str, object]:
    return {"version": "t-1", **top, "organisations": {"H009": {"lab": lab}}}


def test_the_shipped_dictionary_declares_no_hand_factors() -> None:
    document = yaml.safe_load(DEFAULT_TERMINOLOGY_PATH.read_text(encoding="utf-8"))
    entries = [
        entry
        for organisation in document["organisations"].values()
        for entry in [
            *organisation.get("lab", {}).values(),
            *(e for metrics in organisation.get("device_metric", {}).values()
              for e in metrics.values()),
        ]
    ]
    assert len(entries) > 60
    assert not [e for e in entries if "factor" in e or "offset" in e]


def test_library_conversion_is_computed_at_load() -> None:
    terms = terminology_from_dict(
        _document(
            {
                "GLU": {"loinc": "2345-7", "unit": "mmol/L", "local_unit": "mg/dL"},
                "CA": {"loinc": "2000-8", "unit": "mmol/L", "local_unit": "mEq/L"},
                "HR": {"loinc": "8867-4", "unit": "/min", "local_unit": "bpm"},
            },
            unit_aliases={"mEq/L": "meq/L", "bpm": "/min"},
        )
    )
    glucose, calcium, heart_rate = (terms.lab("H009", c) for c in ("GLU", "CA", "HR"))
    assert glucose is not None and calcium is not None and heart_rate is not None
    assert glucose.factor == pytest.approx(1 / 18.0156)
    assert convert_unit(180.0, "mg/dL", glucose) == 9.991341  # 180 / 18.0156
    assert convert_unit(2.0, "mEq/L", calcium) == 1.0  # valence 2
    assert (heart_rate.factor, heart_rate.offset) == (1.0, 0.0)
    assert convert_unit(72.0, "bpm", heart_rate) == 72.0
    assert convert_unit(72.0, "/min", heart_rate) == 72.0
    assert convert_unit(72.0, "beats", heart_rate) is None


@pytest.mark.parametrize(
    ("entry", "aliases", "reason"),
    [
        # The molar mass is declared for glucose only, not for ALT.
        ({"loinc": "1742-6", "unit": "mmol/L", "local_unit": "mg/dL"}, {}, "molar mass"),
        ({"loinc": "2345-7", "unit": "mmol/L", "local_unit": "mEq/L"}, {"mEq/L": "meq/L"},
         "valence"),
        ({"loinc": "8867-4", "unit": "/min", "local_unit": "bpm"}, {}, "add it to unit_aliases"),
        ({"loinc": "8867-4", "unit": "beats", "local_unit": "/min"}, {}, "not a UCUM unit"),
        ({"loinc": "718-7", "unit": "g/L", "local_unit": "/min"}, {}, "different kinds"),
    ],
)
def test_a_mapping_the_library_cannot_convert_fails_at_load(
    entry: dict[str, str], aliases: dict[str, str], reason: str
) -> None:
    with pytest.raises(TerminologyError) as caught:
        terminology_from_dict(_document({"T1": entry}, unit_aliases=aliases), "t.yaml")
    message = str(caught.value)
    assert message.startswith(f"t.yaml: organisation H009 lab T1 (LOINC {entry['loinc']})")
    assert f"{entry['local_unit']!r} -> {entry['unit']!r}" in message
    assert reason in message


def test_an_alias_must_name_a_ucum_unit() -> None:
    with pytest.raises(TerminologyError, match=r"unit_aliases\.bpm: '/mn' is not a UCUM unit"):
        terminology_from_dict(_document({}, unit_aliases={"bpm": "/mn"}))


def test_deprecated_hand_factor_is_used_as_written_when_the_library_agrees(
    caplog: pytest.LogCaptureFixture,
) -> None:
    entry = {"loinc": "2345-7", "unit": "mmol/L", "local_unit": "mg/dL", "factor": 0.0555}
    with caplog.at_level(logging.WARNING, logger="streams.terminology"):
        terms = terminology_from_dict(_document({"GLU": entry}))
    glucose = terms.lab("H009", "GLU")
    assert glucose is not None and glucose.factor == 0.0555
    assert convert_unit(100.0, "mg/dL", glucose) == 5.55
    assert "1 unit mapping(s) declare factor/offset by hand" in caplog.text


def test_deprecated_hand_factor_that_disagrees_with_the_library_is_refused() -> None:
    # 0.0884 is the creatinine factor pasted on glucose: off by 59 %.
    entry = {"loinc": "2345-7", "unit": "mmol/L", "local_unit": "mg/dL", "factor": 0.0884}
    with pytest.raises(TerminologyError, match=r"lab GLU .*disagree with the units library"):
        terminology_from_dict(_document({"GLU": entry}))


# --- ambiguous codes -------------------------------------------------------------------------

AMBIGUOUS = {
    "version": "t-1",
    "organisations": {
        "H009": {
            "lab": {
                "GLU": {"loinc": "2345-7", "unit": "mmol/L"},
                "GLU-X": {"ambiguous": ["2345-7", "2339-0"], "display": "glucose, any"},
            },
            "diagnosis": {"DX1": "J18.9", "FLU": {"ambiguous": ["J10.1", "J11.1"]}},
            "department": {"NK": "03", "K9": {"ambiguous": ["03.01", "03.04"]}},
            "device_metric": {
                "mon": {"HR": {"loinc": "8867-4", "unit": "/min"},
                        "SAT": {"ambiguous": ["59408-5", "2708-6"]}},
            },
            "claim_item": {"D1": "C09AA05", "D9": {"ambiguous": ["A12BA01", "B05XA01"]}},
        }
    },
}


def test_ambiguous_codes_are_not_mapped_and_say_so() -> None:
    terms = terminology_from_dict(AMBIGUOUS)
    assert terms.lab("H009", "GLU-X") is None
    assert terms.lab_by_loinc("H009", "2339-0") is None
    assert terms.diagnosis("H009", "FLU") is None
    assert terms.department("H009", "K9") is None
    assert terms.device_metric("H009", "mon", "SAT") is None
    assert terms.claim_item("H009", "D9") is None
    expected = {
        ("lab", "GLU", "GLU-X"): ("2345-7", ("2345-7", "2339-0")),
        ("diagnosis", "DX1", "FLU"): ("J18.9", ("J10.1", "J11.1")),
        ("department", "NK", "K9"): ("03", ("03.01", "03.04")),
        ("device_metric", "mon/HR", "mon/SAT"): ("8867-4", ("59408-5", "2708-6")),
        ("claim_item", "D1", "D9"): ("C09AA05", ("A12BA01", "B05XA01")),
    }
    assert {system for system, _, _ in expected} == set(SYSTEMS)
    for (system, mapped, ambiguous), (code, declared) in expected.items():
        assert terms.status("H009", system, mapped) == "mapped", system
        assert terms.status("H009", system, ambiguous) == "ambiguous", system
        assert terms.status("H009", system, "NOPE") == "unmapped", system
        assert terms.status("H999", system, mapped) == "unmapped", system
        assert terms.candidates_declared("H009", system, mapped) == (code,)
        assert terms.candidates_declared("H009", system, ambiguous) == declared
        assert terms.candidates_declared("H009", system, "NOPE") == ()


def test_an_unknown_system_is_a_programming_error() -> None:
    terms = terminology_from_dict(AMBIGUOUS)
    with pytest.raises(ValueError, match="unknown code system 'labs'"):
        terms.status("H009", "labs", "GLU")
    with pytest.raises(ValueError, match="unknown code system 'loinc'"):
        terms.rank_candidates("loinc", "glucose")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"ambiguous": ["J11.1"]}, r"diagnosis\.FLU\.ambiguous: List should have at least 2"),
        ({"ambiguous": ["J11.1", "J11.1"]}, r"diagnosis\.FLU\.ambiguous: .*lists a code twice"),
        ({"ambiguous": ["J11.1", "J10.1"], "unit": "x"}, r"diagnosis\.FLU\.unit: Extra inputs"),
    ],
)
def test_bad_ambiguous_entries_are_named(entry: dict[str, object], message: str) -> None:
    document = {"version": "1", "organisations": {"H009": {"diagnosis": {"FLU": entry}}}}
    with pytest.raises(TerminologyError, match=message):
        terminology_from_dict(document)


# --- the standard code catalogue ----------------------------------------------------------


def _luhn_check_digit(digits: str) -> int:
    """LOINC's check digit (mod 10, the Luhn algorithm)."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char) * (2 if position % 2 == 0 else 1)
        total += value - 9 if value > 9 else value
    return (10 - total % 10) % 10


def test_catalogue_codes_are_well_formed() -> None:
    catalogue = load_catalogue()
    sizes = {name: len(rows) for name, rows in catalogue.entries.items()}
    assert set(sizes) == {"atc", "department", "icd10", "loinc"}
    assert min(sizes.values()) >= 50 and sum(sizes.values()) <= 500
    for entry in catalogue.entries["loinc"]:
        digits, check = entry.code.split("-")
        assert _luhn_check_digit(digits) == int(check), entry.code
    patterns = {
        "icd10": r"[A-Z]\d\d(\.\d)?",
        "atc": r"[A-Z]\d\d[A-Z]{2}\d\d",
        "department": r"\d\d(\.\d\d)?",
    }
    for name, pattern in patterns.items():
        for entry in catalogue.entries[name]:
            assert re.fullmatch(pattern, entry.code), (name, entry.code)


def test_the_catalogue_covers_every_code_the_shipped_dictionary_maps_to(
    shipped_terminology: Terminology,
) -> None:
    document = yaml.safe_load(DEFAULT_TERMINOLOGY_PATH.read_text(encoding="utf-8"))
    missing = []
    for organisation_id, organisation in document["organisations"].items():
        codes = [("lab", e["loinc"]) for e in organisation["lab"].values()]
        codes += [("device_metric", e["loinc"]) for metrics in
                  organisation["device_metric"].values() for e in metrics.values()]
        codes += [(system, code) for system in ("diagnosis", "department", "claim_item")
                  for code in organisation[system].values()
                  if not re.fullmatch(r"\d{9}", code)]  # national service codes: not catalogued
        missing += [(organisation_id, system, code) for system, code in codes
                    if shipped_terminology.catalogue_entry(system, code) is None]
    assert missing == []


def test_catalogue_display_texts(shipped_terminology: Terminology) -> None:
    potassium = shipped_terminology.catalogue_entry("lab", "2823-3")
    assert potassium is not None
    assert potassium.display_en == "Potassium [Moles/volume] in Serum or Plasma"
    assert potassium.display_zh == "血清钾"
    influenza = shipped_terminology.catalogue_entry("diagnosis", "J11.1")
    assert influenza is not None
    assert influenza.display_en == (
        "Influenza with other respiratory manifestations, virus not identified"
    )
    ramipril = shipped_terminology.catalogue_entry("claim_item", "C09AA05")
    assert ramipril is not None and ramipril.display_en == "ramipril"
    icu = shipped_terminology.catalogue_entry("department", "28")
    assert icu is not None and icu.display_zh == "重症医学科"
    assert shipped_terminology.catalogue_entry("lab", "J11.1") is None


def _copy_catalogue(tmp_path: Path) -> Path:
    directory = tmp_path / "catalogue"
    shutil.copytree(DEFAULT_CATALOGUE_DIR, directory)
    return directory


def test_bad_catalogue_files_are_named(tmp_path: Path) -> None:
    directory = _copy_catalogue(tmp_path)
    atc = directory / "atc.csv"
    with atc.open("a", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerow(["C09AA05", "ramipril again", ""])
    with pytest.raises(TerminologyError, match=r"atc\.csv:\d+: code C09AA05 is listed twice"):
        load_catalogue(directory)
    atc.write_text("code,name\nC09AA05,ramipril\n", encoding="utf-8")
    with pytest.raises(TerminologyError, match="the header must be code,display_en,display_zh"):
        load_catalogue(directory)
    atc.unlink()
    with pytest.raises(TerminologyError, match="atc.csv: cannot read catalogue"):
        load_catalogue(directory)


# --- ranking candidate codes for a local display ----------------------------------------


def test_display_normalisation() -> None:
    assert normalise_display("  Serum-POTASSIUM (K+) ") == "serum potassium k"
    assert normalise_display("血清钾（K）") == "血 清 钾 k"


@pytest.mark.parametrize(
    ("system", "display", "best"),
    [
        ("lab", "血钾", "2823-3"),
        ("lab", "Serum potassium", "2823-3"),
        ("lab", "SERUM  potassium!", "2823-3"),
        ("lab", "血清肌酐", "2160-0"),
        ("device_metric", "Resp. rate", "9279-1"),
        ("diagnosis", "Influenza with other respiratory manifestations", "J11.1"),
        ("diagnosis", "高钾血症", "E87.5"),
        ("department", "心血管内科", "03.04"),
        ("claim_item", "Amoxicillin 500mg capsule", "J01CA04"),
        ("claim_item", "阿莫西林胶囊", "J01CA04"),
    ],
)
def test_rank_candidates_puts_the_right_code_first(
    shipped_terminology: Terminology, system: str, display: str, best: str
) -> None:
    candidates = shipped_terminology.rank_candidates(system, display)
    assert len(candidates) == 3
    assert candidates[0].code == best
    assert candidates[0].score > candidates[2].score
    assert all(0.0 <= c.score <= 1.0 for c in candidates)
    assert [c.score for c in candidates] == sorted((c.score for c in candidates), reverse=True)


def test_rank_candidates_scores_nonsense_low(shipped_terminology: Terminology) -> None:
    for system in SYSTEMS:
        candidates = shipped_terminology.rank_candidates(system, "qwxz blorf vrrk", limit=5)
        assert len(candidates) == 5
        assert max(c.score for c in candidates) < 0.5, system
    assert shipped_terminology.rank_candidates("lab", "", limit=2)[0].score == 0.0


def test_rank_candidates_limit_and_cache(shipped_terminology: Terminology) -> None:
    first = shipped_terminology.rank_candidates("diagnosis", "Pneumonia", limit=5)
    again = shipped_terminology.rank_candidates("diagnosis", "Pneumonia", limit=2)
    assert again == first[:2]
    assert first[0].code == "J18.9" and first[0].display == "Pneumonia, unspecified"
    assert again[0] is first[0]  # served from the per-(system, display) cache
    many = shipped_terminology.rank_candidates("diagnosis", "Pneumonia", limit=40)
    assert len(many) == 40 and many[:5] == first
    assert shipped_terminology.rank_candidates("diagnosis", "Pneumonia", limit=0) == []


# --- reloading without restart ------------------------------------------------------------

SMALL = """\
version: "{version}"
organisations:
  H009:
    diagnosis: {{DX1: "{code}"}}
"""


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _rewrite(path: Path, text: str, tick: int) -> None:
    path.write_text(text, encoding="utf-8")
    # Same-second rewrites must still look changed: set the mtime explicitly.
    stamp = 1_800_000_000 + tick
    os.utime(path, (stamp, stamp))


def test_source_reloads_a_changed_file_and_keeps_the_last_good_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "terminology.yaml"
    _rewrite(path, SMALL.format(version="v1", code="J18.9"), 1)
    clock = _Clock()
    source = TerminologySource(path, check_every_s=5.0, clock=clock)
    assert source.current().version == "v1" and source.last_error is None

    _rewrite(path, SMALL.format(version="v2", code="J11.1"), 2)
    clock.now += 4.9
    assert source.current().version == "v1"  # not checked before check_every_s
    clock.now += 0.2
    reloaded = source.current()
    assert reloaded.version == "v2" and reloaded.diagnosis("H009", "DX1") == "J11.1"

    caplog.set_level(logging.ERROR, logger="medstream.streams.rules")
    _rewrite(path, SMALL.format(version="v3", code="J11.1") + "    labs: {}\n", 3)
    clock.now += 5.0
    assert source.current() is reloaded  # invalid: the previous version keeps serving
    assert source.last_error is not None and "labs: Extra inputs" in source.last_error
    clock.now += 5.0
    assert source.current() is reloaded
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # logged once per bad file version
    assert "terminology: the changed file was refused; still serving version v2" in (
        errors[0].getMessage()
    )

    _rewrite(path, SMALL.format(version="v4", code="A09"), 4)
    clock.now += 5.0
    fixed = source.current()
    assert fixed.version == "v4" and fixed.diagnosis("H009", "DX1") == "A09"
    assert source.last_error is None


def test_source_reports_every_reload_to_the_listeners_and_the_metric(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reloading, "_listeners", [])
    told: list[tuple[str, str, str, str, tuple[str, ...]]] = []
    reloading.on_reload(
        lambda c: told.append((c.name, c.path.name, c.outcome, c.detail, c.changed))
    )
    refused = RULES_RELOADS.labels("terminology", "refused")
    loaded = RULES_RELOADS.labels("terminology", "loaded")
    before = (loaded._value.get(), refused._value.get())
    directory = _copy_catalogue(tmp_path)
    path = tmp_path / "terminology.yaml"
    _rewrite(path, SMALL.format(version="v1", code="J18.9"), 1)
    clock = _Clock()
    source = TerminologySource(path, catalogue_dir=directory, clock=clock)
    _rewrite(path, SMALL.format(version="v2", code="J11.1"), 2)
    clock.now += 5.0
    assert source.current().version == "v2"
    # A catalogue file that no longer loads counts as a refused change of the terminology.
    _rewrite(directory / "icd10.csv", "not,the,header\n", 3)
    clock.now += 5.0
    assert source.current().version == "v2" and source.last_error is not None
    assert [(n, f, o, c) for n, f, o, _, c in told] == [
        ("terminology", "terminology.yaml", "loaded", ("terminology.yaml",)),
        ("terminology", "terminology.yaml", "refused", ("icd10.csv",)),
    ]
    assert told[0][3] == "version v2" and "icd10.csv" in told[1][3]
    assert (loaded._value.get(), refused._value.get()) == (before[0] + 1, before[1] + 1)


def test_source_watches_the_catalogue_and_refuses_a_bad_first_load(tmp_path: Path) -> None:
    path = tmp_path / "terminology.yaml"
    _rewrite(path, SMALL.format(version="v1", code="J18.9"), 1)
    directory = _copy_catalogue(tmp_path)
    clock = _Clock()
    source = TerminologySource(path, catalogue_dir=directory, clock=clock)
    first = source.current()
    assert first.catalogue_entry("diagnosis", "Z99.9") is None
    icd10 = directory / "icd10.csv"
    _rewrite(icd10, icd10.read_text(encoding="utf-8") + "Z99.9,Test only entry,\n", 2)
    clock.now += 5.0
    again = source.current()
    assert again is not first
    entry = again.catalogue_entry("diagnosis", "Z99.9")
    assert entry is not None and entry.display_en == "Test only entry"

    _rewrite(path, "version: [unclosed\n", 3)
    with pytest.raises(TerminologyError, match="not valid YAML"):
        TerminologySource(path)
