"""The live alert console as monitoring staff and analysts use it: `medstream up` with an
MLLP collector, real HL7 messages over a real socket, and pages in Debian's Chromium
driven by Playwright. Screenshots go to MEDSTREAM_SCREENSHOTS (docs/images when refreshed
by hand)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from medstream.access import UserStore
from medstream.runtime import free_port
from producers.hl7_mllp import mllp_wrap
from tests.e2e.test_pipeline import env_for, medstream
from tests.waiting import wait_for

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
PASSWORD = "synthetic-pass-01"
LIVE_WITHIN_S = 2.0


def hl7(*segments: str) -> bytes:
    return ("\r".join(segments) + "\r").encode()


def now_hl7() -> str:
    return datetime.now(tz=UTC).strftime("%Y%m%d%H%M%S+0000")


def admission(facility: str, mrn: str, control_id: str) -> bytes:
    return hl7(
        f"MSH|^~\\&|HIS|{facility}|MEDSTREAM|REGION|{now_hl7()}||ADT^A01^ADT_A01|{control_id}"
        "|P|2.5.1",
        f"EVN|A01|{now_hl7()}",
        f"PID|1||{mrn}^^^{facility}^MR||TESTPATIENT^ALPHA||19700101|F",
        "PV1|1|I|NK^101^1||||||||||||||||V-" + control_id,
    )


def potassium(facility: str, mrn: str, control_id: str, code: str, value: str, unit: str) -> bytes:
    return hl7(
        f"MSH|^~\\&|LIS|{facility}|MEDSTREAM|REGION|{now_hl7()}||ORU^R01^ORU_R01|{control_id}"
        "|P|2.5.1",
        f"PID|1||{mrn}^^^{facility}^MR||TESTPATIENT^ALPHA||19700101|F",
        f"OBR|1|PL-{control_id}|FO-{control_id}|PANEL^Chemistry panel^L|||{now_hl7()}",
        f"OBX|1|NM|{code}^Potassium^L||{value}|{unit}|3.5-5.3|HH|||F",
    )


def send(port: int, message: bytes) -> str:
    """Send one message over MLLP; returns the ACK's MSA-1 once the collector answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(mllp_wrap(message))
        answer = b""
        while not answer.endswith(b"\x1c\r"):
            chunk = connection.recv(4096)
            assert chunk, "the collector closed the connection without an ACK"
            answer += chunk
    msa = next(s for s in answer.decode().strip("\x0b\x1c\r").split("\r") if s.startswith("MSA"))
    return msa.split("|")[1]


def sign_in(browser: Any, url: str, name: str) -> Any:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.goto(url)
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", PASSWORD)
    page.click("#sign-in button[type=submit]")
    page.wait_for_selector('#connection[data-state="live"]', timeout=15_000)
    assert page.inner_text("#who").startswith(name)
    return page


def row_selector(organisation: str, rule: str = "critical_value.potassium") -> str:
    return f'#alerts tr[data-organisation="{organisation}"][data-rule="{rule}"]'


def seen_within(page: Any, selector: str, since: float, limit_s: float) -> float:
    """Seconds from ``since`` until the selector is on the page (fails after 10 s)."""
    page.wait_for_selector(selector, timeout=10_000)
    return time.monotonic() - since


def test_console_live_alerts_actions_scope_and_governed_sql(tmp_path: Path) -> None:
    playwright_api = pytest.importorskip("playwright.sync_api")
    assert Path(CHROMIUM).exists(), "Debian's chromium is needed (make test installs it)"
    data_dir = tmp_path / "data"
    shots = Path(os.environ.get("MEDSTREAM_SCREENSHOTS", tmp_path / "shots"))
    shots.mkdir(parents=True, exist_ok=True)
    env = env_for(data_dir, MEDSTREAM_CONSOLE_PORT="0")

    # An administrator adds one user from the shell (audited); the others directly.
    added = subprocess.run(
        medstream("users", "add", "mon.east", "--role", "monitor", "--org", "H001",
                  "--password-stdin"),
        input=PASSWORD + "\n", env=env, capture_output=True, text=True, timeout=60,
    )
    assert added.returncode == 0, added.stderr
    store = UserStore(data_dir / "users.yaml")
    store.add("mon.west", "monitor", ["H002"], PASSWORD)
    store.add("admin.all", "admin", ["*"], PASSWORD)
    store.add("analyst.east", "analyst", ["H001"], PASSWORD)

    mllp_port = free_port()
    collector = tmp_path / "mllp.yaml"
    collector.write_text(
        "kind: mllp\nname: lab-mllp\norganisation_id: H001\nsource_system: LIS-MLLP\n"
        f"host: 127.0.0.1\nport: {mllp_port}\n"
        "facilities:\n  LAB-EAST: H001\n  LAB-WEST: H002\n"
    )
    up = subprocess.Popen(
        medstream("up", "--collector", str(collector)), env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        runtime = data_dir / "runtime.json"
        wait_for(lambda: runtime.exists(), 150, "runtime.json")
        url = json.loads(runtime.read_text())["console_url"]
        assert url.startswith("http://127.0.0.1:")

        with playwright_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            admin = sign_in(browser, url, "admin.all")
            east = sign_in(browser, url, "mon.east")
            west = sign_in(browser, url, "mon.west")

            # A critical potassium at the east hospital reaches its consoles within 2 s.
            assert send(mllp_port, admission("LAB-EAST", "SYNTH-E-0001", "ADT-E1")) == "AA"
            assert send(mllp_port, potassium("LAB-EAST", "SYNTH-E-0001", "ORU-E1", "K", "7.4",
                                             "mmol/L")) == "AA"
            acked = time.monotonic()
            east_delay = seen_within(east, row_selector("H001"), acked, LIVE_WITHIN_S)
            admin_delay = seen_within(admin, row_selector("H001"), acked, LIVE_WITHIN_S)
            assert east_delay <= LIVE_WITHIN_S, f"east console after {east_delay:.2f} s"
            assert admin_delay <= LIVE_WITHIN_S, f"admin console after {admin_delay:.2f} s"
            east_row = east.locator(row_selector("H001"))
            assert "7.4" in east_row.inner_text()
            assert east_row.get_attribute("data-status") == "open"

            # ... and the west hospital's gets its own, never the other's.
            assert send(mllp_port, potassium("LAB-WEST", "SYNTH-W-0001", "ORU-W1", "LAB0022",
                                             "7.6", "mEq/L")) == "AA"
            west_delay = seen_within(west, row_selector("H002"), time.monotonic(), LIVE_WITHIN_S)
            assert west_delay <= LIVE_WITHIN_S + 0.5
            admin.wait_for_selector(row_selector("H002"), timeout=10_000)
            east.wait_for_timeout(1500)
            assert east.locator('#alerts tr[data-organisation="H002"]').count() == 0
            assert west.locator('#alerts tr[data-organisation="H001"]').count() == 0
            assert east.request.get(f"{url}api/alerts").json()["alerts"][0]["organisation_id"] \
                == "H001"
            assert {a["organisation_id"] for a in east.request.get(f"{url}api/alerts")
                    .json()["alerts"]} == {"H001"}

            # The department comes from the patient's admission; the timeline holds the result.
            east.wait_for_function(
                "sel => document.querySelector(sel)?.querySelector('.department')"
                "?.textContent === '03'", arg=row_selector("H001"), timeout=20_000,
            )
            east.locator(row_selector("H001")).click()
            east.wait_for_selector("#timeline tbody tr", timeout=20_000)
            assert "2823-3" in east.inner_text("#timeline")
            east.screenshot(path=str(shots / "console-en.png"))

            # Acknowledging on the east console updates every open console, without reload.
            east.locator(f"{row_selector('H001')} .act-acknowledge").click()
            east.fill("#act-note", "called ward, repeat sample ordered")
            east.click("#act-confirm")
            # The outcome is shown on the page, not only in the row.
            east.wait_for_selector('#act-result[data-outcome="applied"]', timeout=15_000)
            assert east.get_attribute("#act-result", "data-http-status") == "200"
            assert east.inner_text("#act-result").startswith("Done: Acknowledge")
            for page in (east, admin):
                page.wait_for_selector(f'{row_selector("H001")}[data-status="acknowledged"]',
                                       timeout=10_000)
            assert "called ward" in admin.locator(row_selector("H001")).inner_text()

            # Chinese labels at the press of a button.
            admin.click("#lang")
            assert admin.inner_text("th[data-i18n=severity]") == "级别"
            assert "已接收" in admin.locator(row_selector("H001")).inner_text()
            admin.screenshot(path=str(shots / "console-zh.png"))
            # The outcome of an action is shown in the page's language.
            admin.locator(f"{row_selector('H002')} .act-resolve").click()
            admin.click("#act-confirm")
            admin.wait_for_selector('#act-result[data-outcome="applied"]', timeout=15_000)
            assert admin.inner_text("#act-result").startswith("已完成: 处置完成")

            # A state change without the CSRF token is refused.
            alert_id = east.locator(row_selector("H001")).get_attribute("data-alert-id")
            forged = east.request.post(f"{url}api/alerts/{alert_id}/resolve", data={})
            assert forged.status == 403 and "CSRF" in forged.json()["error"]

            # Analysts: no actions, and SQL limited to their hospital and de-identified views.
            analyst = sign_in(browser, url, "analyst.east")
            analyst.wait_for_selector(row_selector("H001"), timeout=10_000)
            assert analyst.locator(".act-resolve").count() == 0
            csrf = analyst.request.get(f"{url}api/session").json()["csrf"]

            def query(sql: str, output: str = "json") -> Any:
                return analyst.request.post(
                    f"{url}api/sql", data=json.dumps({"sql": sql, "format": output}),
                    headers={"X-CSRF-Token": csrf, "Content-Type": "application/json"},
                )

            scoped = "SELECT DISTINCT organisation_id FROM medstream_analyst.lab_result"
            wait_for(lambda: query(scoped).json().get("rows") == [["H001"]], 60,
                     "the analyst's lab results")
            refused = query("SELECT * FROM medstream.lab_result")
            assert refused.status == 400 and "may not read medstream.lab_result" in \
                refused.json()["error"]
            assert query("DROP TABLE medstream.alert_history").status == 400
            as_csv = query(scoped, "csv")
            assert as_csv.text().splitlines() == ["organisation_id", "H001"]
            import pyarrow as pa

            table = pa.ipc.open_stream(io.BytesIO(query(scoped, "arrow").body())).read_all()
            assert table.column("organisation_id").to_pylist() == ["H001"]
            browser.close()

        # Every sign-in, query and action is in the audit log (an admin reads it).
        def audit(*args: str) -> list[dict[str, Any]]:
            result = subprocess.run(medstream("audit", "--json", *args), env=env,
                                    capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stderr
            return json.loads(result.stdout)

        wait_for(lambda: len(audit("--user", "analyst.east", "--action", "query")) >= 5, 60,
                 "the analyst's queries in the audit log")
        queries = audit("--user", "analyst.east", "--action", "query")
        outcomes = {(q["outcome"], q["rows"]) for q in queries}
        assert ("ok", 1) in outcomes and ("refused", None) in outcomes
        assert any("DROP TABLE" in q["detail"] for q in queries)
        actions = audit("--action", "alert_acknowledge")
        # The request (before it was sent), then the lifecycle's real outcome.
        assert sorted((a["outcome"], a["actor"], a["detail"]) for a in actions) == [
            ("ok", "mon.east", "called ward, repeat sample ordered"),
            ("requested", "mon.east", "called ward, repeat sample ordered"),
        ]
        sign_ins = {a["actor"] for a in audit("--action", "sign_in")}
        assert sign_ins == {"admin.all", "mon.east", "mon.west", "analyst.east"}
        changes = audit("--action", "config_change")
        assert any(c["target"] == "user:mon.east" for c in changes)
    finally:
        up.send_signal(signal.SIGINT)
        try:
            output, _ = up.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            output, _ = up.communicate()
        if os.environ.get("MEDSTREAM_KEEP_E2E"):
            shutil.copytree(data_dir, Path(os.environ["MEDSTREAM_KEEP_E2E"]), dirs_exist_ok=True)
    assert "stopped cleanly" in output, output[-3000:]
