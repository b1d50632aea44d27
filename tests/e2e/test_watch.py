"""End to end, as monitoring staff and data stewards use it: `medstream up` runs, alerts are
acknowledged and resolved from the command line, the terminology worklist fills, and a
dead letter is opened from its sealed store, and a data steward splits a patient record out
of its person."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.e2e.test_pipeline import env_for, medstream
from tests.waiting import wait_for

pytestmark = pytest.mark.e2e


def sql(data_dir: Path, query: str) -> list[dict[str, object]]:
    result = subprocess.run(
        medstream("sql", query, "--format", "json"),
        env=env_for(data_dir), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def run(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        medstream(*args), env=env_for(data_dir), capture_output=True, text=True, timeout=60
    )


def worklist(data_dir: Path) -> list[dict[str, object]]:
    result = run(data_dir, "terminology", "unmapped", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.alone
def test_staff_acknowledge_and_resolve_alerts_and_stewards_see_the_worklist(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    up = subprocess.Popen(
        medstream("up", "--no-console", "--rate", "300", "--seed", "11"),
        env=env_for(data_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        wait_for(lambda: (data_dir / "runtime.json").exists(), 120, "runtime.json")

        # A data steward splits a patient record out of a person holding two or more.
        shared = (
            "SELECT record_key, person_key FROM medstream.person_membership WHERE person_key IN "
            "(SELECT person_key FROM medstream.person_membership GROUP BY person_key "
            "HAVING count() >= 2) ORDER BY record_key LIMIT 1"
        )
        wait_for(lambda: len(sql(data_dir, shared)) == 1, 120, "a person with two records")
        record = sql(data_dir, shared)[0]
        split = run(data_dir, "mpi", "unmerge", str(record["record_key"]), "--by", "steward.test",
                    "--reason", "two patients, one registration; called 13900001111")
        assert split.returncode == 0, split.stderr
        decision = (
            "SELECT action, method, person_key, previous_person_key, explanation "
            "FROM medstream.person_link FINAL WHERE record_key = "
            f"'{record['record_key']}' AND method = 'manual'"
        )
        wait_for(lambda: len(sql(data_dir, decision)) == 1, 150, "the unmerge decision")
        [unmerged] = sql(data_dir, decision)
        assert unmerged["action"] == "unmerge"
        assert unmerged["previous_person_key"] == record["person_key"] != unmerged["person_key"]
        assert "split by steward.test" in str(unmerged["explanation"])
        assert "13900001111" not in str(unmerged["explanation"])
        now = sql(data_dir, "SELECT person_key FROM medstream.person_membership WHERE "
                            f"record_key = '{record['record_key']}'")
        assert now == [{"person_key": unmerged["person_key"]}]
        missing = run(data_dir, "mpi", "unmerge", "no-such-record", "--by", "s", "--reason", "r")
        assert missing.returncode == 1 and "no-such-record" in missing.stderr

        def open_critical() -> list[dict[str, object]]:
            return sql(
                data_dir,
                "SELECT alert_id, status, explanation FROM medstream.alert_current FINAL "
                "WHERE rule_id LIKE 'critical_value.%' AND status = 'open' ORDER BY alert_id",
            )

        wait_for(lambda: len(open_critical()) > 0, 180, "an open critical-value alert")
        alert_id = str(open_critical()[0]["alert_id"])
        listed = run(data_dir, "alerts", "list", "--status", "open")
        assert listed.returncode == 0 and alert_id in listed.stdout

        ack = run(data_dir, "alerts", "ack", alert_id, "--by", "nurse.test",
                  "--note", "called the ward on 13900001111")
        assert ack.returncode == 0, ack.stderr
        state = "SELECT status, actor, note FROM medstream.alert_current FINAL WHERE alert_id = "

        def status() -> dict[str, object]:
            return sql(data_dir, f"{state}'{alert_id}'")[0]

        wait_for(lambda: status()["status"] == "acknowledged", 60, "the acknowledgement")
        # Who acted is recorded; the note lost the phone number before it was stored.
        assert status() == {
            "status": "acknowledged", "actor": "nurse.test", "note": "called the ward on [PHONE]"
        }
        again = run(data_dir, "alerts", "ack", alert_id, "--by", "nurse.test")
        assert again.returncode == 1 and "already acknowledged" in again.stderr
        resolved = run(data_dir, "alerts", "resolve", alert_id, "--by", "dr.test")
        assert resolved.returncode == 0, resolved.stderr
        wait_for(lambda: status()["status"] == "resolved", 60, "the resolution")
        history = sql(
            data_dir,
            f"SELECT action FROM medstream.alert_history FINAL WHERE alert_id = '{alert_id}' "
            "ORDER BY updated_time",
        )
        actions = [h["action"] for h in history if h["action"] not in ("updated", "escalated")]
        assert actions == ["opened", "acknowledged", "resolved"]
        unknown = run(data_dir, "alerts", "ack", "no-such-alert", "--by", "x")
        assert unknown.returncode == 1 and "no alert no-such-alert" in unknown.stderr

        # The steward's worklist: house codes the dictionary does not map yet.
        wait_for(lambda: len(worklist(data_dir)) > 2, 120, "unmapped codes in the worklist")
        entries = worklist(data_dir)
        assert {e["code_system"] for e in entries} >= {"lab"}
        assert all(e["occurrences"] >= 1 and e["first_seen"] <= e["last_seen"] for e in entries)
        assert any(e["candidates"] for e in entries)
        table = run(data_dir, "terminology", "unmapped")
        assert table.returncode == 0 and "code(s) to map" in table.stdout

        # A dead letter is stored sealed, and opens with the sink's secret.
        wait_for(
            lambda: sql(data_dir, "SELECT count() AS n FROM medstream.dead_letter")[0]["n"] > 0,
            120,
            "a dead letter",
        )
        letter = sql(
            data_dir,
            "SELECT dlq_id, position(original_value, 'MSH|') AS clear FROM medstream.dead_letter "
            "WHERE stage = 'normalise' ORDER BY dlq_id LIMIT 1",
        )[0]
        assert letter["clear"] == 0
        shown = run(data_dir, "dlq", "show", str(letter["dlq_id"]))
        assert shown.returncode == 0, shown.stderr
        assert "normalise /" in shown.stdout and "bytes:" in shown.stdout
        # Opening it may show patient data: it is in the audit log (recorded before).
        wait_for(
            lambda: sql(
                data_dir, "SELECT count() AS n FROM medstream.audit_log WHERE action = "
                f"'dead_letter_open' AND target = '{letter['dlq_id']}' AND channel = 'cli'"
            )[0]["n"] == 1,
            60, "the dead letter's opening in the audit log",
        )

    finally:
        os.killpg(up.pid, signal.SIGINT)
        output, _ = up.communicate(timeout=150)
    assert up.returncode == 0, output[-3000:]
