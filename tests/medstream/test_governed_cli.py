"""`medstream users`, `medstream sql --user`, `medstream grants` and `medstream audit` as an
administrator and an analyst run them at the shell, on the real embedded engine."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

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
rows = [
    ["dl-1", "normalise", "invalid_payload", "MSH-9 missing", "hl7_lab", "raw.hl7_lab", 0, 7,
     None, seal(b"MSH|^~\\\\&|SYNTHETIC", key, b"dl-1"), now, now],
    ["dl-2", "normalise", "internal_error", "internal error: KeyError", "hl7_lab", TOPIC, 1, 8,
     seal(b"pk-2", key, b"dl-2|key"), seal(b"original two", key, b"dl-2"), now, now],
    ["dl-3", "mpi", "internal_error", "internal error: KeyError", None, TOPIC, 0, 9,
     None, seal(b"original three", key, b"dl-3"), now, now],
    ["dl-4", "producer", "internal_error", "internal error: KeyError", "hl7_lab",
     "collector/lis", 0, 5, None, seal(b"refused", key, b"dl-4"), now, now],
]
client.insert(f"{ch.database}.dead_letter", rows, column_names=[
    "dlq_id", "stage", "reason_code", "reason", "source_kind", "original_topic",
    "original_partition", "original_offset", "original_key", "original_value", "ingest_time",
    "failed_time"])
client.close()
"""


def test_opening_a_dead_letter_is_audited_before_it_is_shown(tmp_path: Path) -> None:
    import sys

    data = tmp_path / "data"
    assert run(data, "migrate").returncode == 0
    seeded = subprocess.run(
        [sys.executable, "-c", "TOPIC = 'unused'\n" + SEED_DEAD_LETTER], env=env_for(data),
        capture_output=True, text=True, timeout=120,
    )
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


def test_dead_letters_are_replayed_to_their_topics_after_a_dry_run_and_audited(
    tmp_path: Path, kafka_factory: Any
) -> None:
    import sys

    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from tests.kafka_helpers import consume

    def read_back(expected: int, wait_s: float) -> list[tuple[Any, ...]]:
        """The topic's records as they are (the sealed originals here are not Avro)."""
        consumer = Consumer(kafka.consumer_config("replay-read"))
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING)
                         for p in range(kafka.raw_partitions)])
        found: list[tuple[Any, ...]] = []
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and len(found) < expected:
            message = consumer.poll(0.2)
            if message is not None and message.error() is None:
                found.append((message.key(), message.value(),
                              dict(message.headers() or [])["medstream-replay"]))
        consumer.close()
        return sorted(found, key=lambda record: record[2])  # by dead letter id

    kafka = kafka_factory()
    topic = kafka.topic("raw.hl7_lab")
    data = tmp_path / "data"
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
           "MEDSTREAM_KAFKA_BROKER_KIND": kafka.broker_kind,
           "MEDSTREAM_KAFKA_TOPIC_PREFIX": kafka.topic_prefix}
    assert run(data, "migrate").returncode == 0
    seeded = subprocess.run(
        [sys.executable, "-c", f"TOPIC = {topic!r}\n" + SEED_DEAD_LETTER],
        env=env_for(data), capture_output=True, text=True, timeout=120,
    )
    assert seeded.returncode == 0, seeded.stderr
    unsaid = run(data, "dlq", "replay", **env)
    assert unsaid.returncode == 2 and "say which dead letters" in unsaid.stderr
    dry = run(data, "dlq", "replay", "--reason-code", "internal_error", **env)
    assert dry.returncode == 0, dry.stderr
    assert "would replay 2 dead letters (mpi 1, normalise 1); nothing was published" in dry.stdout
    assert "not replayed: dl-4: a collector's refusal never reached a topic" in dry.stderr
    assert read_back(1, 3) == []

    done = run(data, "dlq", "replay", "--reason-code", "internal_error", "--yes", **env)
    assert done.returncode == 0, done.stderr
    assert "published 2 original records again (mpi 1, normalise 1)" in done.stdout
    assert read_back(2, 30) == [
        (b"pk-2", b"original two", b"dl-2"), (None, b"original three", b"dl-3"),
    ]
    # With a configured broker the audit events go to its audit topic (a sink stores them).
    audited = consume(kafka, ["audit"], 2)
    events = sorted((e.value["outcome"], e.value["target"]) for e in audited
                    if e.value["action"] == "dead_letter_replay")
    assert events == [("ok", "2 dead letters (mpi 1, normalise 1)"),
                      ("requested", "2 dead letters (mpi 1, normalise 1)")]
    unknown = run(data, "dlq", "replay", "no-such-letter", "--yes", **env)
    assert unknown.returncode == 1
    assert "not replayed: no-such-letter: no such dead letter" in unknown.stderr
