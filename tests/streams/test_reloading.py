"""Rules files reloaded on change, and the configuration changes they report for the audit
trail."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from medstream.audit import AuditTrail, BackgroundAudit
from streams import reloading
from streams.reloading import ReloadingFile


def load(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text())
    if not isinstance(document, dict) or "version" not in document:
        raise ValueError(f"{path.name}: no version")
    return document


def test_changes_are_loaded_or_refused_and_reported(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(reloading, "_listeners", [])
    clock = [0.0]
    rules = tmp_path / "rules.yaml"
    rules.write_text("version: '1'\n")
    stored: list[dict[str, Any]] = []
    audit = BackgroundAudit(AuditTrail(None, insert=stored.append))
    reloading.on_reload(
        lambda name, path, outcome, detail: audit.record(
            actor="medstream-streams", actor_role="operator", channel="workers",
            action="config_change", outcome="ok" if outcome == "loaded" else "refused",
            target=f"file:{path.name}", detail=f"{name} {outcome}: {detail}",
        )
    )
    watched = ReloadingFile(
        "critical_values", rules, load, check_every_s=1, clock=lambda: clock[0]
    )
    assert watched.current()["version"] == "1"
    rules.write_text("version: '2'\nextra: true\n")
    clock[0] = 2
    assert watched.current()["version"] == "2"
    rules.write_text("- not a mapping\n")
    clock[0] = 4
    assert watched.current()["version"] == "2"  # the last good version stays in service
    assert watched.last_error == "rules.yaml: no version"
    deadline = time.monotonic() + 5
    while len(stored) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [(e["outcome"], e["target"], e["detail"]) for e in stored] == [
        ("ok", "file:rules.yaml", "critical_values loaded: version ?"),
        ("refused", "file:rules.yaml", "critical_values refused: rules.yaml: no version"),
    ]
