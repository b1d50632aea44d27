"""The console's HTTP side in process: sign-in, throttling, session expiry, CSRF and origin
checks, role refusals, Basic-auth SQL and the audit records of each, on the real broker and
the real ClickHouse engine (the browser test is tests/e2e/test_console.py)."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from clickhouse_connect.driver.client import Client

from medstream.access import UserStore, refresh_analyst_views
from medstream.alert_actions import restore_lifecycle
from medstream.audit import AuditTrail, direct_insert
from medstream.clickhouse import QueryResult, run_read_only
from medstream.console import Console, Querier, alert_view
from medstream.settings import ConsoleSettings, KafkaSettings
from schemas import serde
from sinks.dictionary import refresh_data_dictionary
from tests.lifecycle_helpers import LifecycleWorker, open_alert, store_alert
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

PASSWORD = "synthetic-pass-01"


def _console(
    kafka: KafkaSettings, clickhouse: Client, database: str, users: UserStore, **settings: Any
) -> Console:
    lock = threading.Lock()

    def run(sql: str, extra: dict[str, Any] | None, max_rows: int, timeout_s: int) -> QueryResult:
        with lock:
            return run_read_only(clickhouse, sql, database, timeout_s, max_rows, extra)

    def insert(event: dict[str, Any]) -> None:
        with lock:
            direct_insert(clickhouse, database)(event)

    return Console(
        ConsoleSettings(**settings), users, kafka, serde.ManifestRegistry(), Querier(run),
        AuditTrail(None, insert=insert), database,
    )


def _run(console: Console, scenario: Callable[[TestClient], Any]) -> None:
    async def main() -> None:
        async with TestClient(TestServer(console.application())) as client:
            await scenario(client)
        console.stop()

    asyncio.run(main())


@pytest.fixture
def users(tmp_path: Path) -> UserStore:
    store = UserStore(tmp_path / "users.yaml")
    store.add("mon.east", "monitor", ["H001"], PASSWORD)
    store.add("analyst.east", "analyst", ["H001"], PASSWORD)
    return store


def audit_rows(clickhouse: Client, database: str) -> list[tuple[Any, ...]]:
    return [
        tuple(r) for r in clickhouse.query(
            f"SELECT actor, action, outcome, target FROM {database}.audit_log ORDER BY event_time"
        ).result_rows
    ]


def _alert(organisation: str) -> dict[str, Any]:
    now = datetime.now(tz=UTC)
    return alert_view({
        "alert_id": f"alert-{organisation}", "rule_id": "critical_value.potassium",
        "severity": "critical", "status": "open", "organisation_id": organisation,
        "person_key": "P-1", "subject": "P-1", "explanation": "Potassium 7.4 mmol/L",
        "first_event_time": now, "updated_time": now,
    })


async def _sign_in(client: TestClient, name: str, password: str = PASSWORD) -> Any:
    return await client.post("/api/session", json={"name": name, "password": password})


def test_sign_in_sessions_csrf_and_roles(
    kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, database: str,
    users: UserStore,
) -> None:
    console = _console(kafka_factory(), clickhouse, database, users)
    console.board.merge(_alert("H001"))
    console.board.merge(_alert("H002"))

    async def scenario(client: TestClient) -> None:
        wrong = await _sign_in(client, "mon.east", "not the password")
        assert wrong.status == 401 and "sign-in failed" in (await wrong.json())["error"]
        assert (await client.get("/api/alerts")).status == 401

        signed = await _sign_in(client, "mon.east")
        assert signed.status == 200
        cookie = signed.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        csrf = (await signed.json())["csrf"]
        alerts = (await (await client.get("/api/alerts")).json())["alerts"]
        assert [a["alert_id"] for a in alerts] == ["alert-H001"]  # never another hospital's

        no_token = await client.post("/api/alerts/alert-H001/acknowledge", json={})
        assert no_token.status == 403 and "CSRF" in (await no_token.json())["error"]
        cross_site = await client.post(
            "/api/alerts/alert-H001/acknowledge", json={},
            headers={"X-CSRF-Token": csrf, "Origin": "https://evil.example"},
        )
        assert cross_site.status == 403
        other = await client.post(
            "/api/alerts/alert-H002/acknowledge", json={}, headers={"X-CSRF-Token": csrf}
        )
        assert other.status == 404  # out of scope looks like absent
        timeline = await client.get("/api/alerts/alert-H002/timeline")
        assert timeline.status == 404

        # An analyst may look but not act.
        client.session.cookie_jar.clear()
        analyst = await _sign_in(client, "analyst.east")
        analyst_csrf = (await analyst.json())["csrf"]
        refused = await client.post(
            "/api/alerts/alert-H001/resolve", json={"note": "x"},
            headers={"X-CSRF-Token": analyst_csrf},
        )
        assert refused.status == 403 and "may not" in (await refused.json())["error"]
        # Disabling the account, or changing its password, ends its session.
        users.update("analyst.east", disabled=True)
        assert (await client.get("/api/session")).status == 401
        users.update("analyst.east", disabled=False)
        assert (await _sign_in(client, "analyst.east")).status == 200
        users.update("analyst.east", password="another-synthetic-1")
        changed = await client.get("/api/session")
        assert changed.status == 401 and "password changed" in (await changed.json())["error"]
        users.update("analyst.east", password=PASSWORD)
        assert (await _sign_in(client, "analyst.east")).status == 200
        users.update("analyst.east", role_name="monitor")
        changed = await client.get("/api/session")
        assert changed.status == 401 and "role changed" in (await changed.json())["error"]
        users.update("analyst.east", role_name="analyst")

        # Signing out ends the session.
        client.session.cookie_jar.clear()
        csrf = (await (await _sign_in(client, "mon.east")).json())["csrf"]
        out = await client.delete("/api/session", headers={"X-CSRF-Token": csrf})
        assert out.status == 200
        assert (await client.get("/api/session")).status == 401

    _run(console, scenario)
    rows = audit_rows(clickhouse, database)
    assert ("mon.east", "sign_in_failed", "refused", "") in rows
    assert ("analyst.east", "alert_resolve", "refused", "alert-H001") in rows
    assert ("mon.east", "sign_out", "ok", "") in rows
    assert sum(1 for r in rows if r[1] == "sign_in" and r[2] == "ok") == 5


async def _stream_lifetime(client: TestClient, timeout: float) -> float:
    """Open the live stream, read it until the server ends it; seconds it lasted."""
    started = time.monotonic()
    stream = await client.get("/api/events")
    assert stream.status == 200
    received = b""
    while time.monotonic() - started < timeout:
        chunk = await asyncio.wait_for(stream.content.readany(), timeout)
        if not chunk:
            break
        received += chunk
    else:
        raise AssertionError(f"the stream was still open after {timeout} s")
    stream.close()
    assert b"event: snapshot" in received
    return time.monotonic() - started


def test_repeated_failures_are_throttled_and_idle_sessions_expire(
    kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, database: str,
    users: UserStore,
) -> None:
    console = _console(kafka_factory(), clickhouse, database, users, session_idle_minutes=0.02)
    console.heartbeat_s = 0.3

    async def scenario(client: TestClient) -> None:
        assert (await _sign_in(client, "mon.east")).status == 200
        assert (await client.get("/api/session")).status == 200
        # A page holding the live stream open keeps its session past the idle limit.
        stream = await client.get("/api/events")
        assert stream.status == 200
        received = b""
        deadline = time.monotonic() + 2.5  # twice the 1.2 s idle limit, no other request
        while time.monotonic() < deadline:
            received += await asyncio.wait_for(stream.content.readany(), 1.0)
        stream.close()
        assert b"event: snapshot" in received and received.count(b": heartbeat") >= 4
        assert (await client.get("/api/session")).status == 200
        # The last renewal may follow the close by up to two heartbeats (0.6 s).
        await asyncio.sleep(2.2)  # longer than the 1.2 s idle limit plus that
        expired = await client.get("/api/session")
        assert expired.status == 401 and "expired" in (await expired.json())["error"]

        # An analyst's open page does not keep its session: the stream ends with it.
        assert (await _sign_in(client, "analyst.east")).status == 200
        ended_after = await _stream_lifetime(client, timeout=6.0)
        assert 1.0 <= ended_after < 3.0, ended_after  # idle limit 1.2 s + a heartbeat
        assert (await client.get("/api/session")).status == 401  # the session ended with it

        # Disabling the account, or changing its role, ends an open stream within a
        # heartbeat or two (well before the idle limit), and the session with it.
        changes: list[tuple[dict[str, Any], dict[str, Any]]] = [
            ({"disabled": True}, {"disabled": False}),
            ({"role_name": "admin"}, {"role_name": "monitor"}),
        ]
        for change, undo in changes:
            assert (await _sign_in(client, "mon.east")).status == 200
            lifetime = asyncio.create_task(_stream_lifetime(client, timeout=6.0))
            await asyncio.sleep(0.5)
            users.update("mon.east", **change)
            assert 0.5 <= await lifetime < 2.5, change
            assert (await client.get("/api/session")).status == 401
            users.update("mon.east", **undo)
        statuses = [(await _sign_in(client, "mon.east", "wrong-password")).status
                    for _ in range(6)]
        assert statuses == [401] * 5 + [429]
        # Even the right password waits out the throttle.
        assert (await _sign_in(client, "mon.east")).status == 429

    _run(console, scenario)


def test_sql_endpoint_with_basic_auth_is_governed_and_audited(
    kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, database: str,
    users: UserStore,
) -> None:
    refresh_data_dictionary(clickhouse, database)
    refresh_analyst_views(clickhouse, database)
    console = _console(kafka_factory(), clickhouse, database, users)

    def basic(name: str, password: str = PASSWORD) -> dict[str, str]:
        token = base64.b64encode(f"{name}:{password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    async def scenario(client: TestClient) -> None:
        sql = f"SELECT count() AS n FROM {database}_analyst.lab_result"
        ok = await client.post("/api/sql", json={"sql": sql}, headers=basic("analyst.east"))
        assert ok.status == 200, await ok.text()
        assert await ok.json() == {"columns": ["n"], "rows": [[0]], "truncated": False}
        monitor = await client.post("/api/sql", json={"sql": "SELECT 1"},
                                    headers=basic("mon.east"))
        assert monitor.status == 400 and "no SQL access" in (await monitor.json())["error"]
        bad = await client.post("/api/sql", json={"sql": "SELECT 1"},
                                headers=basic("analyst.east", "wrong-password"))
        assert bad.status == 401
        fmt = await client.post("/api/sql", json={"sql": sql, "format": "xml"},
                                headers=basic("analyst.east"))
        assert fmt.status == 400
        # Basic sign-ins are throttled like the form (the success above cleared the earlier
        # failure of this name from this address).
        for _ in range(5):
            await client.post("/api/sql", json={"sql": "SELECT 1"},
                              headers=basic("analyst.east", "wrong-password"))
        throttled = await client.post("/api/sql", json={"sql": sql}, headers=basic("analyst.east"))
        assert throttled.status == 429

    _run(console, scenario)
    time.sleep(0.1)
    rows = audit_rows(clickhouse, database)
    # A query's target is the digest of the statement as it ran (see the audit module).
    queries = {r[:3]: r[3] for r in rows if r[1] == "query"}
    assert queries[("analyst.east", "query", "ok")].startswith("sha256:")
    assert queries[("mon.east", "query", "refused")].startswith("sha256:")
    # Six wrong passwords and the throttled attempt.
    assert sum(1 for r in rows if r[:3] == ("analyst.east", "sign_in_failed", "refused")) == 7
    channel = clickhouse.query(
        f"SELECT DISTINCT channel FROM {database}.audit_log WHERE action != 'sign_in'"
    ).result_rows
    assert channel == [("http",)]


def action_audit(clickhouse: Client, database: str) -> list[tuple[Any, ...]]:
    return [
        tuple(r) for r in clickhouse.query(
            f"SELECT actor, action, outcome, target, detail FROM {database}.audit_log "
            "WHERE action LIKE 'alert_%' ORDER BY event_time"
        ).result_rows
    ]


def test_an_alert_opened_before_a_restart_is_refused_visibly_then_restored_and_acknowledged(
    kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, database: str,
    users: UserStore,
) -> None:
    kafka = kafka_factory()
    console = _console(kafka, clickhouse, database, users, action_answer_s=20)
    with LifecycleWorker(kafka, serde.ManifestRegistry()) as worker:
        snapshot = open_alert(kafka, worker)
        store_alert(clickhouse, database, snapshot)  # as the sink stores it
        console.board.merge(alert_view(snapshot))
        alert_id = snapshot["alert_id"]
        worker.forget()  # the worker restarted on a broker that kept no changelog

        async def scenario(client: TestClient) -> None:
            csrf = (await (await _sign_in(client, "mon.east")).json())["csrf"]
            headers = {"X-CSRF-Token": csrf}
            refused = await client.post(
                f"/api/alerts/{alert_id}/acknowledge", json={"note": "called ward"},
                headers=headers,
            )
            body = await refused.json()
            assert refused.status == 409 and body["outcome"] == "refused"
            assert body["error"] == (
                f"acknowledge refused: cannot acknowledge alert {alert_id}: unknown alert "
                "(never opened here, or resolved and forgotten)"
            )
            # What ClickHouse holds is offered to the lifecycle (medstream up does it at start).
            loop = asyncio.get_running_loop()
            offered = await loop.run_in_executor(
                None, restore_lifecycle, console.query, database, kafka,
                serde.ManifestRegistry(),
            )
            assert offered == 1
            applied = await client.post(
                f"/api/alerts/{alert_id}/acknowledge", json={"note": "called ward"},
                headers=headers,
            )
            body = await applied.json()
            assert applied.status == 200
            assert (body["outcome"], body["status"], body["alert_id"]) == (
                "applied", "acknowledged", alert_id
            )
            assert body["message"] == f"alert {alert_id} is acknowledged (acknowledge applied)"
            # Once the new state is on the page, a second acknowledgement is refused at once.
            wait_for(lambda: console.board.get(alert_id)["status"] == "acknowledged", 30,
                     "the acknowledged alert on the console's live stream")
            again = await client.post(
                f"/api/alerts/{alert_id}/acknowledge", json={}, headers=headers
            )
            assert again.status == 409
            assert (await again.json())["error"] == (
                f"acknowledge refused: alert {alert_id} is already acknowledged"
            )

        _run(console, scenario)
    acknowledged = [a for a in worker.alerts if a["action"] == "acknowledged"]
    assert [(a["alert_id"], a["actor"], a["note"], a["value"]) for a in acknowledged] == [
        (alert_id, "mon.east", "called ward", 7.4)
    ]
    refusal = (f"acknowledge refused: cannot acknowledge alert {alert_id}: unknown alert "
               "(never opened here, or resolved and forgotten) (note: called ward)")
    assert action_audit(clickhouse, database) == [
        ("mon.east", "alert_acknowledge", "requested", alert_id, "called ward"),
        ("mon.east", "alert_acknowledge", "refused", alert_id, refusal),
        ("mon.east", "alert_acknowledge", "requested", alert_id, "called ward"),
        ("mon.east", "alert_acknowledge", "ok", alert_id, "called ward"),
        ("mon.east", "alert_acknowledge", "refused", alert_id,
         f"acknowledge refused: alert {alert_id} is already acknowledged"),
    ]


def test_an_action_nobody_answers_is_reported_as_not_confirmed(
    kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, database: str,
    users: UserStore,
) -> None:
    kafka = kafka_factory()
    console = _console(kafka, clickhouse, database, users, action_answer_s=1)
    console.board.merge(_alert("H001"))  # and no stream worker runs

    async def scenario(client: TestClient) -> None:
        csrf = (await (await _sign_in(client, "mon.east")).json())["csrf"]
        started = time.monotonic()
        answer = await client.post(
            "/api/alerts/alert-H001/resolve", json={}, headers={"X-CSRF-Token": csrf}
        )
        body = await answer.json()
        assert answer.status == 504 and body["outcome"] == "timed_out"
        assert "no answer from the stream workers within 1 s" in body["error"]
        assert time.monotonic() - started < 10

    _run(console, scenario)
    [(_, _, requested, _, _), (_, _, unconfirmed, _, detail)] = action_audit(clickhouse, database)
    assert (requested, unconfirmed) == ("requested", "unconfirmed")  # queued: may still apply
    assert detail.startswith("resolve of alert alert-H001 not confirmed: no answer")
