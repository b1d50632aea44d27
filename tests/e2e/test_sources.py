"""End to end with real sources: hospital database rows (PostgreSQL CDC) and HL7 messages over
MLLP reach ClickHouse as standardised events, counted by reconcile, across a kill -9 of the
collector and a restart of the database in mid-stream.

Runs `medstream up --collector ...` exactly as an operator would, against the local
PostgreSQL prepared by `make test` (wal_level=logical).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from medstream.runtime import free_port
from producers.hl7_mllp import Frame, MllpFramer, mllp_wrap
from tests.waiting import require_source, wait_for

pytestmark = pytest.mark.e2e
PG = ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-v", "ON_ERROR_STOP=1", "-qtA"]
T0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)


def medstream(*args: str) -> list[str]:
    return [sys.executable, "-m", "medstream", *args]


def env_for(data_dir: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MEDSTREAM_", "KAFKA_", "CLICKHOUSE_"))
    }
    env.update(MEDSTREAM_DATA_DIR=str(data_dir), MEDSTREAM_STATUS_INTERVAL_S="1")
    return env


def psql(sql: str) -> str:
    done = subprocess.run([*PG, "-c", sql], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def postgres_available() -> bool:
    try:
        return psql("SHOW wal_level") == "logical"
    except (AssertionError, OSError, subprocess.TimeoutExpired):
        return False






def send_hl7(port: int, messages: list[str]) -> list[str]:
    """Send messages over one MLLP connection, one at a time; returns each ACK's MSA-1."""
    codes = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        framer = MllpFramer(1 << 20)
        for message in messages:
            sock.sendall(mllp_wrap(message.encode()))
            frames: list[bytes] = []
            while not frames:
                data = sock.recv(65536)
                assert data, "the collector closed the connection before acknowledging"
                events, _ = framer.feed(data)
                frames = [e.content for e in events if isinstance(e, Frame)]
            msa = next(s for s in frames[0].decode().split("\r") if s.startswith("MSA|"))
            codes.append(msa.split("|")[1])
    return codes


def oru(n: int) -> str:
    """A synthetic ORU^R01 with two LOINC-coded results (synthetic patient)."""
    taken = (T0 + timedelta(minutes=n)).strftime("%Y%m%d%H%M%S+0000")
    return "\r".join(
        [
            f"MSH|^~\\&|LIS|LAB-EAST|MEDSTREAM|REGION|{taken}||ORU^R01^ORU_R01|E2E-LAB-{n}|P|2.5.1",
            f"PID|1||SYNTH-E2E-{n % 7}^^^H001^MR||TESTPATIENT^E2E||19800101|M",
            f"OBR|1|PO-{n}|FO-{n}|24323-8^Metabolic panel^LN|||{taken}",
            f"OBX|1|NM|2823-3^Potassium^LN||4.{n % 9}|mmol/L|3.5-5.3|N|||F|||{taken}",
            f"OBX|2|NM|2951-2^Sodium^LN||14{n % 5}|mmol/L|135-145|N|||F|||{taken}",
        ]
    ) + "\r"


def potassium(n: int, value: str, unit: str) -> str:
    """A LOINC-coded potassium from another lab system (its own synthetic patient)."""
    taken = (T0 + timedelta(minutes=30 + n)).strftime("%Y%m%d%H%M%S+0000")
    return "\r".join(
        [
            f"MSH|^~\\&|LIS-SAFETY|LAB-EAST|MEDSTREAM|REGION|{taken}||ORU^R01^ORU_R01|"
            f"E2E-K-{n}|P|2.5.1",
            f"PID|1||SYNTH-SAFE-{n}^^^H001^MR||TESTPATIENT^SAFETY||19800101|F",
            f"OBR|1|PK-{n}|FK-{n}|24323-8^Metabolic panel^LN|||{taken}",
            f"OBX|1|NM|2823-3^Potassium^LN||{value}|{unit}|3.5-5.3||||F|||{taken}",
        ]
    ) + "\r"


@pytest.fixture
def his_tables() -> Iterator[tuple[str, str, str]]:
    """Two uniquely named HIS tables; the slot and publication are dropped afterwards."""
    require_source(postgres_available(), "PostgreSQL with wal_level=logical")
    tag = uuid.uuid4().hex[:8]
    visit, diagnosis, name = f"e2e_visit_{tag}", f"e2e_diag_{tag}", f"e2e-his-{tag}"
    psql(
        f"CREATE TABLE {visit} (visit_id text PRIMARY KEY, mrn text, vtype text, dept text, "
        f"admitted timestamptz, discharged timestamptz);"
        f"CREATE TABLE {diagnosis} (diag_id text PRIMARY KEY, visit_id text, mrn text, "
        f"code text, name text, dtype text, diagnosed timestamptz);"
        f"ALTER TABLE {visit} REPLICA IDENTITY FULL; ALTER TABLE {diagnosis} REPLICA IDENTITY FULL"
    )
    yield visit, diagnosis, name
    slot = f"medstream_{name.replace('-', '_')}"
    psql(
        f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
        f"WHERE slot_name = '{slot}' AND NOT active"
    )
    psql(f"DROP PUBLICATION IF EXISTS {slot}; DROP TABLE {visit}; DROP TABLE {diagnosis}")


def insert_visits(visit: str, diagnosis: str, numbers: range) -> None:
    rows, diags = [], []
    for n in numbers:
        admitted = (T0 + timedelta(minutes=n)).isoformat()
        rows.append(f"('E2E-V{n}', 'SYNTH-E2E-{n % 7}', 'I', '0301', '{admitted}', NULL)")
        diags.append(
            f"('E2E-D{n}', 'E2E-V{n}', 'SYNTH-E2E-{n % 7}', 'J18.9', 'pneumonia', 'A', "
            f"'{admitted}')"
        )
    psql(
        f"BEGIN; INSERT INTO {visit} VALUES {', '.join(rows)}; "
        f"INSERT INTO {diagnosis} VALUES {', '.join(diags)}; COMMIT"
    )


def sql(data_dir: Path, query: str) -> list[dict[str, object]]:
    done = subprocess.run(
        medstream("sql", query, "--format", "json"),
        env=env_for(data_dir), capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def collector_pid(config: Path) -> int | None:
    found = subprocess.run(
        ["pgrep", "-f", f"collect postgres --config {config}"], capture_output=True, text=True
    )
    pids = [int(p) for p in found.stdout.split()]
    return pids[0] if pids else None


def test_database_rows_and_mllp_messages_reach_clickhouse_across_restarts(
    tmp_path: Path, his_tables: tuple[str, str, str]
) -> None:
    visit, diagnosis, name = his_tables
    data_dir = tmp_path / "data"
    mllp_port = free_port()
    pg_config = tmp_path / "his.yaml"
    pg_config.write_text(
        f"""kind: postgres
name: {name}
organisation_id: H001
source_system: HIS-PG
dsn: "host=127.0.0.1 port=5432 user=postgres dbname=test"
heartbeat_interval_s: 1
tables:
  - source: public.{visit}
    target: patient_visit
    columns: {{visit_no: visit_id, patient_mrn: mrn, visit_type: vtype, dept_code: dept,
               admit_time: admitted, discharge_time: discharged}}
  - source: public.{diagnosis}
    target: visit_diagnosis
    columns: {{diag_id: diag_id, visit_no: visit_id, patient_mrn: mrn, diag_code: code,
               diag_name: name, diag_type: dtype, diag_time: diagnosed}}
"""
    )
    mllp_config = tmp_path / "lis.yaml"
    mllp_config.write_text(
        f"kind: mllp\nname: e2e-lis\norganisation_id: H001\nsource_system: LIS-MLLP\n"
        f"host: 127.0.0.1\nport: {mllp_port}\n"
    )
    insert_visits(visit, diagnosis, range(0, 20))  # before the collector: the snapshot
    log = open(tmp_path / "up.log", "w")  # noqa: SIM115
    up = subprocess.Popen(
        medstream("up", "--no-console", "--collector", str(pg_config), "--collector", str(mllp_config)),
        env=env_for(data_dir), stdout=log, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        wait_for(lambda: "running:" in (tmp_path / "up.log").read_text(), 180, "up to start")
        wait_for(lambda: collector_pid(pg_config) is not None, 60, "the PostgreSQL collector")
        first = send_hl7(mllp_port_when_ready(mllp_port), [oru(n) for n in range(0, 10)])
        assert first == ["AA"] * 10
        # Issue 15, as reproduced on `up` with an MLLP collector: a decimal comma is read, a
        # critical potassium in mEq/L alerts, text in an NM value is answered AE, and a
        # potassium in a unit nobody can convert raises critical_value.unreadable.
        unsafe = [
            potassium(1, "4,5", "mmol/L"), potassium(2, "7.8", "mEq/L"),
            potassium(3, "abc", "mmol/L"), potassium(4, "7.8", "U/L"),
        ]
        assert send_hl7(mllp_port, unsafe) == ["AA", "AA", "AE", "AA"]
        insert_visits(visit, diagnosis, range(20, 40))  # streamed
        psql(f"UPDATE {visit} SET discharged = '{(T0 + timedelta(days=3)).isoformat()}' "
             "WHERE visit_id = 'E2E-V3'")
        psql(f"DELETE FROM {diagnosis} WHERE diag_id = 'E2E-D5'")

        def stored(table: str, where: str = "1") -> int:
            rows = sql(
                data_dir,
                f"SELECT count() AS n FROM medstream.{table} FINAL "
                f"WHERE source_system = 'HIS-PG' AND {where}",
            )
            return int(rows[0]["n"])  # type: ignore[call-overload]

        wait_for(lambda: stored("encounter") == 40, 120, "40 encounters before the restarts")

        # kill -9 the collector mid-stream: `up` restarts it; it resumes from the slot.
        os.kill(collector_pid(pg_config) or 0, signal.SIGKILL)
        insert_visits(visit, diagnosis, range(40, 60))
        # restart the database mid-stream: the collector reconnects.
        restart = subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", "15", "main", "restart"],
            capture_output=True, text=True, timeout=120,
        )
        assert restart.returncode == 0, restart.stderr
        wait_for(postgres_available, 60, "PostgreSQL to come back")
        insert_visits(visit, diagnosis, range(60, 80))
        assert send_hl7(mllp_port, [oru(n) for n in range(10, 20)]) == ["AA"] * 10

        wait_for(lambda: stored("encounter") == 80, 180, "80 encounters after the restarts")
        wait_for(lambda: stored("diagnosis", "is_deleted = 0") == 79, 60, "79 diagnoses")
        admitted = (T0 + timedelta(minutes=3)).strftime("%Y-%m-%d %H:%M:%S")
        discharged = sql(
            data_dir,
            "SELECT discharge_time IS NOT NULL AS d FROM medstream.encounter FINAL "
            f"WHERE source_system = 'HIS-PG' AND admit_time = toDateTime64('{admitted}', 3, 'UTC')",
        )
        assert discharged == [{"d": 1}]
        labs = sql(
            data_dir,
            "SELECT loinc_code, count() AS n FROM medstream.lab_result FINAL "
            "WHERE source_system = 'LIS' GROUP BY 1 ORDER BY 1",
        )
        assert labs == [{"loinc_code": "2823-3", "n": 20}, {"loinc_code": "2951-2", "n": 20}]
        read = sql(
            data_dir,
            "SELECT original_value, value, unit, mapping_status FROM medstream.lab_result FINAL "
            "WHERE source_system = 'LIS-SAFETY' ORDER BY source_ref",
        )
        assert read == [
            {"original_value": "4,5", "value": 4.5, "unit": "mmol/L", "mapping_status": "mapped"},
            {"original_value": "7.8", "value": 7.8, "unit": "mmol/L", "mapping_status": "mapped"},
            {"original_value": "7.8", "value": None, "unit": None,
             "mapping_status": "unit_unmapped"},
        ]
        wait_for(
            lambda: sql(
                data_dir,
                "SELECT groupArray(rule_id) AS r FROM (SELECT rule_id FROM "
                "medstream.alert_history FINAL WHERE action = 'opened' "
                "AND rule_id LIKE 'critical_value.%' ORDER BY rule_id)",
            ) == [{"r": ["critical_value.potassium", "critical_value.unreadable"]}],
            60, "the critical and the unreadable potassium alerts",
        )
        worklist = subprocess.run(
            medstream("terminology", "unmapped", "--json", "--system", "lab"),
            env=env_for(data_dir), capture_output=True, text=True, timeout=60,
        )
        assert worklist.returncode == 0, worklist.stderr
        gaps = {(e["local_code"], e["status"]) for e in json.loads(worklist.stdout)}
        assert ("2823-3 [U/L]", "unit_unmapped") in gaps

        def reconciled() -> dict[str, object] | None:
            # Everything above was waited for: nothing is in flight, so up to now.
            until = datetime.now(tz=UTC).isoformat()
            done = subprocess.run(
                medstream("reconcile", "--json", "--until", until),
                env=env_for(data_dir), capture_output=True, text=True, timeout=120,
            )
            report = json.loads(done.stdout)
            return report if done.returncode == 0 else None

        wait_for(lambda: reconciled() is not None, 60, "a clean reconcile")
        report = reconciled()
        assert report is not None
        collectors = {c["collector"]: c for c in report["collectors"]}  # type: ignore[index]
        # Every row change published at least once (repeats only of unacknowledged ones).
        assert collectors[name]["published_messages"] >= 80 + 80 + 2
        assert collectors[name]["unaccounted_messages"] == 0
        assert collectors["e2e-lis"]["published_messages"] == 23  # the AE one is not
    finally:
        os.killpg(up.pid, signal.SIGINT)
        try:
            up.wait(timeout=180)
        finally:
            log.close()
    output = (tmp_path / "up.log").read_text()
    assert "restarting it in" in output, output[-3000:]
    assert up.returncode == 0, output[-3000:]


def mllp_port_when_ready(port: int, timeout_s: float = 60) -> int:
    """The MLLP port once the collector listens on it."""

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    wait_for(listening, timeout_s, f"the MLLP collector on port {port}")
    return port
