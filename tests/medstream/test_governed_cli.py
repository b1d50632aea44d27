"""`medstream users`, `medstream sql --user`, `medstream grants` and `medstream audit` as an
administrator and an analyst run them at the shell, on the real embedded engine."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.e2e.test_pipeline import env_for, medstream

pytestmark = pytest.mark.integration

PASSWORD = "synthetic-pass-01"


def run(data_dir: Path, *args: str, stdin: str | None = None,
        **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        medstream(*args), input=stdin, env=env_for(data_dir, **env), capture_output=True,
        text=True, timeout=120,
    )


def test_users_governed_sql_grants_and_the_audit_log(tmp_path: Path) -> None:
    data = tmp_path / "data"
    migrated = run(data, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert "de-identified analyst views in medstream_analyst" in migrated.stdout

    added = run(data, "users", "add", "analyst.east", "--role", "analyst", "--org", "H001",
                "--password-stdin", stdin=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    again = run(data, "users", "add", "analyst.east", "--role", "analyst", "--org", "H001",
                "--password-stdin", stdin=PASSWORD + "\n")
    assert again.returncode == 2 and "exists" in again.stderr
    listed = run(data, "users", "list")
    assert "analyst.east | analyst | H001" in listed.stdout and "$2b$" not in listed.stdout

    as_analyst = {"MEDSTREAM_SQL_PASSWORD": PASSWORD}
    ok = run(data, "sql", "--user", "analyst.east", "--format", "json",
             "SELECT count() AS n FROM medstream_analyst.lab_result", **as_analyst)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == [{"n": 0}]
    # CSV at the shell is as safe to open in a spreadsheet as the console's export.
    formula = run(data, "sql", "--user", "analyst.east", "--format", "csv",
                  "SELECT '=HYPERLINK(1)' AS f, -1 AS n", **as_analyst)
    assert formula.returncode == 0, formula.stderr
    assert formula.stdout.splitlines() == ["f,n", "'=HYPERLINK(1),-1"]
    refused = run(data, "sql", "--user", "analyst.east",
                  "SELECT order_id FROM medstream.lab_result", **as_analyst)
    assert refused.returncode == 1
    assert "role analyst may not read medstream.lab_result" in refused.stderr
    wrong = run(data, "sql", "--user", "analyst.east", "SELECT 1",
                MEDSTREAM_SQL_PASSWORD="not-the-password")
    assert wrong.returncode == 1 and "sign-in failed" in wrong.stderr

    grants = run(data, "grants")
    assert grants.returncode == 0, grants.stderr
    assert "CREATE USER OR REPLACE `analyst.east` IDENTIFIED WITH bcrypt_hash" in grants.stdout
    assert ("CREATE ROW POLICY OR REPLACE `medstream_scope_analyst.east` ON "
            "medstream.lab_result FOR SELECT USING organisation_id IN ('H001')") in grants.stdout

    audit = run(data, "audit", "--json", "--since", "1h")
    assert audit.returncode == 0, audit.stderr
    events = {(e["actor"], e["action"], e["outcome"], e["rows"]) for e in json.loads(audit.stdout)}
    assert ("analyst.east", "query", "ok", 1) in events
    assert ("analyst.east", "query", "refused", None) in events
    assert ("analyst.east", "sign_in_failed", "refused", None) in events
    changes = json.loads(run(data, "audit", "--json", "--action", "config_change").stdout)
    assert [c["target"] for c in changes] == ["user:analyst.east"]
    assert changes[0]["actor"].startswith("local:")
    bad = run(data, "audit", "--action", "delete_everything")
    assert bad.returncode == 1 and "unknown action" in bad.stderr


#: Seeds one sealed dead letter into the engine of MEDSTREAM_DATA_DIR (its own process: one
#: process per engine directory), sealed as the sink seals them.
SEED_DEAD_LETTER = """
from datetime import UTC, datetime
from medstream.cli import _dead_letter_secret
from medstream.keys import ensure_data_dir_secrets
from medstream.clickhouse import migrate, open_clickhouse
from medstream.sealing import derive_key, seal
from medstream.settings import ClickHouseSettings, RuntimeSettings
from sinks.clickhouse import DEAD_LETTER_PURPOSE

ch, runtime = ClickHouseSettings(), RuntimeSettings()
ensure_data_dir_secrets(runtime.data_dir)
client = open_clickhouse(ch, runtime)
migrate(client, ch.database, ch.cluster)
key = derive_key(_dead_letter_secret(), DEAD_LETTER_PURPOSE)
now = datetime.now(tz=UTC)
client.insert(f"{ch.database}.dead_letter", [[
    "dl-1", "normalise", "invalid_payload", "MSH-9 missing", "hl7_lab", "raw.hl7_lab", 0, 7,
    seal(b"MSH|^~\\\\&|SYNTHETIC", key, b"dl-1"), now, now,
]], column_names=["dlq_id", "stage", "reason_code", "reason", "source_kind", "original_topic",
                  "original_partition", "original_offset", "original_value", "ingest_time",
                  "failed_time"])
client.close()
"""


def test_opening_a_dead_letter_is_audited_before_it_is_shown(tmp_path: Path) -> None:
    import sys

    data = tmp_path / "data"
    assert run(data, "migrate").returncode == 0
    seeded = subprocess.run([sys.executable, "-c", SEED_DEAD_LETTER], env=env_for(data),
                            capture_output=True, text=True, timeout=120)
    assert seeded.returncode == 0, seeded.stderr
    shown = run(data, "dlq", "show", "dl-1")
    assert shown.returncode == 0, shown.stderr
    assert "normalise / invalid_payload: MSH-9 missing" in shown.stdout
    assert "MSH|^~\\&|SYNTHETIC" in shown.stdout
    audited = run(data, "audit", "--action", "dead_letter_open", "--json")
    assert audited.returncode == 0, audited.stderr
    [event] = json.loads(audited.stdout)
    assert (event["action"], event["outcome"], event["target"], event["channel"]) == (
        "dead_letter_open", "ok", "dl-1", "cli"
    )
    missing = run(data, "dlq", "show", "no-such-letter")
    assert missing.returncode == 1 and "no dead letter no-such-letter" in missing.stderr
