"""Backup and restore of medstream's ClickHouse database (ClickHouse BACKUP / RESTORE).

Embedded (chdb): the engine is opened with a configuration that allows backups under the
target's parent directory, and the database is backed up to that directory (a directory
backup: chdb is built without zip support). The engine belongs to one process, so these
commands run while `medstream up` is stopped. A ClickHouse server is backed up with its own
``BACKUP DATABASE medstream TO Disk('backups', ...)`` (deploy/README.md); these commands
refuse a server URL rather than pretend.

Each backup carries a manifest (``medstream-backup.json`` beside the data for the embedded
engine) with the row count of every table; a restore compares the restored counts with it
and fails loudly on any difference.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.client import Client

from medstream.clickhouse import QueryError, connect, sql_string

MANIFEST = "medstream-backup.json"
_ALLOW_BACKUPS = """<clickhouse>
    <backups><allowed_path>{path}/</allowed_path></backups>
</clickhouse>
"""

Out = Callable[[str], None]


@dataclass(frozen=True)
class BackupReport:
    """What one backup or restore did: the row count per table, and any mismatch."""

    target: str
    counts: dict[str, int]
    mismatches: dict[str, tuple[int, int]]  # table -> (expected, found); restores only


#: Tables a refreshable view rewrites on its own schedule: backed up and restored, but their
#: row counts move with every refresh, so the manifest does not pin them.
RECOMPUTED_TABLES = frozenset({"monitoring_minute"})


def table_counts(client: Client, database: str) -> dict[str, int]:
    """Rows of every MergeTree-family table of ``database`` (views and their targets' data
    are counted once, at the table that stores it), recomputed tables left out."""
    rows = [
        row for row in client.query(
            f"SELECT name FROM system.tables WHERE database = {sql_string(database)} "
            "AND engine LIKE '%MergeTree' ORDER BY name"
        ).result_rows
        if row[0] not in RECOMPUTED_TABLES
    ]
    return {
        str(name): int(client.query(f"SELECT count() FROM {database}.`{name}`").result_rows[0][0])
        for (name,) in rows
    }


def _embedded_client(engine_path: Path, allowed: Path, scratch: Path) -> Client:
    """A chdb client on ``engine_path`` whose configuration allows backups under ``allowed``."""
    config = scratch / "allow-backups.xml"
    config.write_text(_ALLOW_BACKUPS.format(path=allowed), encoding="utf-8")
    return connect(f"chdb://{engine_path}", chdb_config=config)


def backup_embedded(engine_path: Path, database: str, target: Path, out: Out) -> BackupReport:
    """Back ``database`` of the engine at ``engine_path`` up into the new directory
    ``target``, with a manifest of the row counts."""
    target = target.resolve()
    if target.exists():
        raise QueryError(f"{target} already exists: choose a new directory for each backup")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        client = _embedded_client(engine_path, target.parent, Path(scratch))
        try:
            counts = table_counts(client, database)
            if not counts:
                raise QueryError(f"database {database} at {engine_path} holds no tables")
            out(f"backing up {database}: {len(counts)} tables, {sum(counts.values())} rows")
            data = target / "data"
            client.command(f"BACKUP DATABASE {database} TO File({sql_string(str(data))})")
        finally:
            client.close()
    manifest = {
        "database": database,
        "created": datetime.now(UTC).isoformat(),
        "engine": "chdb",
        "counts": counts,
    }
    (target / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    out(f"backup written to {target}")
    return BackupReport(str(target), counts, {})


def restore_embedded(engine_path: Path, source: Path, out: Out) -> BackupReport:
    """Restore the backup in ``source`` into the engine at ``engine_path`` (whose database
    must not exist yet) and compare every table's rows with the backup's manifest."""
    source = source.resolve()
    manifest = _read_manifest(source)
    database = manifest["database"]
    with tempfile.TemporaryDirectory() as scratch:
        client = _embedded_client(engine_path, source, Path(scratch))
        try:
            exists = client.query(
                f"SELECT count() FROM system.databases WHERE name = {sql_string(database)}"
            ).result_rows[0][0]
            if exists:
                raise QueryError(
                    f"database {database} already exists at {engine_path}: restore into a "
                    "fresh data directory (MEDSTREAM_DATA_DIR) and switch to it"
                )
            out(f"restoring {database} from {source}")
            client.command(
                f"RESTORE DATABASE {database} FROM File({sql_string(str(source / 'data'))})"
            )
            counts = table_counts(client, database)
        finally:
            client.close()
    return _compared(str(source), manifest["counts"], counts, out)


def _read_manifest(source: Path) -> dict[str, Any]:
    path = source / MANIFEST
    if not path.is_file():
        raise QueryError(f"{source} is not a medstream backup (no {MANIFEST})")
    manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return manifest


def _compared(
    target: str, expected: dict[str, int], found: dict[str, int], out: Out
) -> BackupReport:
    mismatches = {
        table: (expected.get(table, 0), found.get(table, 0))
        for table in sorted(set(expected) | set(found))
        if expected.get(table, 0) != found.get(table, 0)
    }
    for table, (want, got) in mismatches.items():
        out(f"  MISMATCH {table}: {want} rows in the backup, {got} restored")
    out(
        f"restored {len(found)} tables, {sum(found.values())} rows"
        + ("; every count matches the backup" if not mismatches else "")
    )
    return BackupReport(target, found, mismatches)
