"""Shared fixtures of the stream-stage tests: a small terminology, a pseudonymiser, a context."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.model import RawContext
from streams.pseudonym import Pseudonymiser
from streams.terminology import Terminology, load_terminology

# A small fictional dictionary, independent of streams/dictionaries/terminology.yaml.
TERMINOLOGY_YAML = """\
version: "test-2026.1"
organisations:
  H001:
    lab:
      K: {loinc: "2823-3", display: "Potassium", unit: "mmol/L", local_unit: "mmol/L",
          factor: 1.0, offset: 0.0}
      GLU: {loinc: "2345-7", display: "Glucose", unit: "mmol/L", local_unit: "mg/dL",
            factor: 0.0555, offset: 0.0}
      NA: {loinc: "2951-2", display: "Sodium", unit: "mmol/L", local_unit: "mmol/L"}
      HGB: {loinc: "718-7", display: "Hemoglobin", unit: "g/L", local_unit: "g/dL", factor: 10}
    diagnosis: {"J11.1": "J11.1", "GX01": "E11.9"}
    department: {NK: "03", EM: "07"}
    device_metric:
      monitor-a:
        HR: {loinc: "8867-4", unit: "/min", local_unit: "bpm", factor: 1.0, offset: 0.0}
        TEMP: {loinc: "8310-5", unit: "Cel", local_unit: "[degF]",
               factor: 0.5555555555555556, offset: -17.77777777777778}
    claim_item: {"D001": "C09AA05"}
  H002:
    lab: {}
"""

PSEUDONYM_KEY = b"test-only-pseudonym-key-0123456789"


@pytest.fixture(scope="session")
def terminology_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dictionaries") / "terminology.yaml"
    path.write_text(TERMINOLOGY_YAML, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def terminology(terminology_path: Path) -> Terminology:
    return load_terminology(terminology_path)


@pytest.fixture(scope="session")
def pseudonymiser() -> Pseudonymiser:
    return Pseudonymiser(PSEUDONYM_KEY)


@pytest.fixture
def ctx() -> RawContext:
    return RawContext(topic="raw.hl7_lab", partition=3, offset=4711, timestamp_ms=1_793_700_000_000)


@pytest.fixture(scope="session")
def shipped_terminology() -> Terminology:
    """The shipped dictionary (streams/dictionaries), with its analytes and catalogue."""
    return load_terminology()
