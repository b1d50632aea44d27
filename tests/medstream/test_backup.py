"""`medstream backup` and `medstream restore` on the real embedded engine (chdb).

The engine belongs to one process, so every step runs in its own `medstream` process, as
an operator would run them: seed a migrated engine, back it up, restore into a fresh data
directory, compare the counts; then the refusals (an existing target, a database that
already exists, a server URL, a directory that is not a backup).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from medstream.clickhouse import migration_files

MEDSTREAM = [sys.executable, "-m", "medstream"]
SEED = """
import sys
from medstream.clickhouse import connect, migrate
client = connect("chdb://" + sys.argv[1])
migrate(client, "medstream")
client.command("INSERT INTO medstream.lab_result (event_id, organisation_id) "
               "SELECT concat('lab-', toString(number)), 'H001' FROM numbers(2500)")
client.command("INSERT INTO medstream.dead_letter (dlq_id, reason_code) "
               "SELECT concat('dlq-', toString(number)), 'invalid_record' FROM numbers(40)")
client.command("INSERT INTO medstream.alert_history (alert_id, rule_id, transition_id, action) "
               "SELECT concat('a-', toString(number)), 'news2.urgent', 't1', 'opened' "
               "FROM numbers(7)")
"""


def env_for(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MEDSTREAM_", "KAFKA_", "CLICKHOUSE_"))}
    env["MEDSTREAM_DATA_DIR"] = str(data_dir)
    return env


def medstream(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MEDSTREAM, *args], env=env_for(data_dir), capture_output=True,
                          text=True, timeout=180)


def counts(data_dir: Path) -> dict[str, int]:
    result = medstream(
        data_dir, "sql", "--format", "json",
        "SELECT 'lab_result' AS t, count() AS n FROM medstream.lab_result UNION ALL "
        "SELECT 'dead_letter', count() FROM medstream.dead_letter UNION ALL "
        "SELECT 'alert_history', count() FROM medstream.alert_history UNION ALL "
        "SELECT 'alert_current', count() FROM medstream.alert_current",
    )
    assert result.returncode == 0, result.stderr
    return {row["t"]: int(row["n"]) for row in json.loads(result.stdout)}


def test_a_backup_restores_into_a_fresh_engine_with_every_count(tmp_path: Path) -> None:
    source, fresh, target = tmp_path / "site", tmp_path / "fresh", tmp_path / "backups" / "b1"
    seeded = subprocess.run([sys.executable, "-c", SEED, str(source / "clickhouse")],
                            capture_output=True, text=True, timeout=180)
    assert seeded.returncode == 0, seeded.stderr
    before = counts(source)
    assert before == {"lab_result": 2500, "dead_letter": 40, "alert_history": 7,
                      "alert_current": 7}

    backup = medstream(source, "backup", str(target))
    assert backup.returncode == 0, backup.stderr
    assert "backup written to" in backup.stdout and (target / "data").is_dir()
    manifest = json.loads((target / "medstream-backup.json").read_text())
    assert manifest["database"] == "medstream"
    assert manifest["counts"]["lab_result"] == 2500 and manifest["counts"]["dead_letter"] == 40

    restore = medstream(fresh, "restore", str(target))
    assert restore.returncode == 0, restore.stdout + restore.stderr
    assert "every count matches the backup" in restore.stdout
    assert counts(fresh) == before
    migrations = medstream(fresh, "sql", "--format", "json",
                           "SELECT count() AS n FROM medstream.schema_migrations")
    assert migrations.returncode == 0, migrations.stderr
    assert json.loads(migrations.stdout) == [{"n": len(migration_files())}]

    # Refusals: a target that exists, a database that exists, a server URL, not a backup.
    again = medstream(source, "backup", str(target))
    assert again.returncode == 1 and "already exists" in again.stderr
    twice = medstream(fresh, "restore", str(target))
    assert twice.returncode == 1 and "database medstream already exists" in twice.stderr
    server_env = env_for(source) | {"CLICKHOUSE_URL": "https://ch.example:8443/"}
    server = subprocess.run([*MEDSTREAM, "backup", str(tmp_path / "b2")], env=server_env,
                            capture_output=True, text=True, timeout=60)
    assert server.returncode == 2 and "BACKUP DATABASE" in server.stderr
    not_backup = medstream(tmp_path / "other", "restore", str(tmp_path))
    assert not_backup.returncode == 1 and "is not a medstream backup" in not_backup.stderr
