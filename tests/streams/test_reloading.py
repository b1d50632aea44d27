"""Rules files reloaded on change, and the configuration changes they report for the audit
trail."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from medstream.audit import AuditTrail, BackgroundAudit, config_change_recorder
from streams import reloading
from streams.reloading import ReloadingFile


def load(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text())
    if not isinstance(document, dict) or "version" not in document:
        raise ValueError(f"{path.name}: no version")
    return document


@dataclass
class Recorded:
    """The worker's reload listener recording into a list, and a rules file at version 1."""

    audit: BackgroundAudit
    stored: list[dict[str, Any]]
    rules: Path


@pytest.fixture
def recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Recorded:
    monkeypatch.setattr(reloading, "_listeners", [])
    stored: list[dict[str, Any]] = []
    audit = BackgroundAudit(AuditTrail(None, insert=stored.append))
    reloading.on_reload(config_change_recorder(audit, "medstream-streams@test"))
    rules = tmp_path / "rules.yaml"
    rules.write_text("version: '1'\n")
    return Recorded(audit, stored, rules)


def test_changes_are_loaded_or_refused_and_reported(recorded: Recorded) -> None:
    audit, stored, rules = recorded.audit, recorded.stored, recorded.rules
    clock = [0.0]
    watched = ReloadingFile(
        "critical_values", rules, load, check_every_s=1, clock=lambda: clock[0]
    )
    # A second rule family watching the same file sees the same change: recorded once.
    twin = ReloadingFile("critical_values", rules, load, check_every_s=1, clock=lambda: clock[0])
    assert watched.current()["version"] == "1"
    rules.write_text("version: '2'\nextra: true\n")
    clock[0] = 2
    assert watched.current()["version"] == "2"
    assert twin.current()["version"] == "2"
    # Another edit that keeps the version is a change of its own.
    rules.write_text("version: '2'\nextra: false\nmore: 1\n")  # another size
    clock[0] = 4
    assert watched.current()["version"] == "2" and watched.generation == 2
    rules.write_text("- not a mapping\n")
    clock[0] = 6
    assert watched.current()["version"] == "2"  # the last good version stays in service
    assert watched.last_error == "rules.yaml: no version"
    audit.drain()
    assert [(e["outcome"], e["target"], e["detail"]) for e in stored] == [
        ("ok", "file:rules.yaml", "critical_values loaded: version ?"),
        ("ok", "file:rules.yaml", "critical_values loaded: version ?"),
        ("refused", "file:rules.yaml", "critical_values refused: rules.yaml: no version"),
    ]
    assert {e["actor"] for e in stored} == {"medstream-streams@test"}


def test_a_change_of_a_file_read_along_is_recorded_under_that_file(
    tmp_path: Path, recorded: Recorded
) -> None:
    audit, stored, rules = recorded.audit, recorded.stored, recorded.rules
    clock = [0.0]
    codes = tmp_path / "codes.csv"
    codes.write_text("code\nA\n")
    watched = ReloadingFile(
        "terminology", rules, load, check_every_s=1, clock=lambda: clock[0], also_watch=[codes]
    )
    codes.write_text("code\nA\nB\n")
    clock[0] = 2
    assert watched.current()["version"] == "1" and watched.generation == 1
    rules.write_text("version: '22'\n")  # another size: mtimes can tie
    codes.write_text("code\n")
    clock[0] = 4
    assert watched.current()["version"] == "22"
    audit.drain()
    assert [(e["target"], e["detail"]) for e in stored] == [
        ("file:codes.csv", "terminology loaded: version ?"),
        ("file:rules.yaml,codes.csv", "terminology loaded: version ?"),
    ]
