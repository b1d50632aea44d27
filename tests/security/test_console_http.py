"""Attacks on the console's HTTP side, run against the real console on a real socket, with
its audit trail on the real broker and stored by the real sink: parallel password guessing,
locking a user out, huge names, cross-origin and CSRF requests, audit reads, spreadsheet
formulas in CSV exports, missing security headers and a cookie without Secure behind TLS."""

from __future__ import annotations

import asyncio
import base64
import csv
import io
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient
from clickhouse_connect.driver.client import Client

from medstream.access import UserStore
from medstream.settings import KafkaSettings
from medstream.throttle import PAIR_FAILURE_LIMIT
from tests.security.harness import PASSWORD, ConsoleUnderAttack, stored_audit
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@pytest.fixture
def users(tmp_path: Path) -> UserStore:
    store = UserStore(tmp_path / "users.yaml")
    store.add("mon.east", "monitor", ["H001"], PASSWORD)
    store.add("analyst.east", "analyst", ["H001"], PASSWORD)
    store.add("admin.all", "admin", ["*"], PASSWORD)
    return store


@pytest.fixture
def console(
    kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, database: str,
    users: UserStore,
) -> Iterator[ConsoleUnderAttack]:
    kafka = kafka_factory()
    with stored_audit(kafka, clickhouse, database) as lock:
        yield ConsoleUnderAttack(kafka, clickhouse, database, users, lock)


def _sign_in(client: TestClient, name: str, password: str = PASSWORD, **headers: str):  # type: ignore[no-untyped-def]
    return client.post("/api/session", json={"name": name, "password": password}, headers=headers)


def _basic(name: str, password: str = PASSWORD) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()}


def test_parallel_guesses_cannot_outrun_the_throttle(console: ConsoleUnderAttack) -> None:
    statuses: list[int] = []

    async def scenario(client: TestClient) -> None:
        guesses = [f"wrong-guess-{i:02d}" for i in range(40)] + [PASSWORD]

        async def attempt(password: str) -> int:
            response = await _sign_in(client, "mon.east", password)
            await response.read()
            return response.status

        statuses.extend(await asyncio.gather(*(attempt(p) for p in guesses)))
        assert statuses[-1] == 429  # the right password, sent with the guesses, is refused
        # The budget is spent: even the right password now waits.
        late = await _sign_in(client, "mon.east")
        assert late.status == 429 and "wait" in (await late.json())["error"]
        assert int(late.headers["Retry-After"]) > 0

    console.serve(scenario)
    counts = Counter(statuses)
    checked = counts[200] + counts[401]
    # At most the budget of passwords was ever checked, whatever arrived in parallel.
    assert checked <= PAIR_FAILURE_LIMIT, counts
    assert counts[429] == 41 - checked and counts[429] >= 36, counts
    # Every refusal is in the audit trail (41 + the late one, minus a success if any).
    refusals = counts[401] + counts[429] + 1
    wait_for(lambda: len(console.audit("action = 'sign_in_failed'")) == refusals,
             what="audited refusals")


def test_a_stranger_cannot_lock_a_user_out(console: ConsoleUnderAttack) -> None:
    async def scenario(client: TestClient) -> None:
        attacker = {"X-Forwarded-For": "203.0.113.9"}
        statuses = []
        for i in range(PAIR_FAILURE_LIMIT + 1):
            response = await _sign_in(client, "mon.east", f"guess-{i}", **attacker)
            statuses.append(response.status)
        assert statuses == [401] * PAIR_FAILURE_LIMIT + [429]
        # The user at their own workstation still signs in.
        own = await _sign_in(client, "mon.east", **{"X-Forwarded-For": "198.51.100.7"})
        assert own.status == 200, await own.text()
        # The attacker's address stays held back.
        assert (await _sign_in(client, "mon.east", **attacker)).status == 429

    console.serve(scenario, trusted_proxy=True)


def test_a_sign_in_with_a_huge_name_is_refused_and_audited(console: ConsoleUnderAttack) -> None:
    huge = "x" * 1_000_000  # just under the console's 1 MiB request limit

    async def scenario(client: TestClient) -> None:
        refused = await _sign_in(client, huge)
        assert refused.status == 401
        assert "sign-in failed" in (await refused.json())["error"]
        basic = await client.post("/api/sql", json={"sql": "SELECT 1"},
                                  headers=_basic("y" * 6_000))
        assert basic.status == 401 and "WWW-Authenticate" in basic.headers

    console.serve(scenario)
    wait_for(lambda: len(console.audit()) == 2, what="both audited")
    rows = console.audit()
    assert rows[0][:4] == ("x" * 64 + "...[1000000 characters]", "console",
                           "sign_in_failed", "refused")
    assert rows[1][:4] == ("y" * 64 + "...[6000 characters]", "http",
                           "sign_in_failed", "refused")


def test_refused_requests_and_audit_reads_are_audited(console: ConsoleUnderAttack) -> None:
    async def scenario(client: TestClient) -> None:
        cross_site = await _sign_in(client, "mon.east", Origin="https://evil.example")
        assert cross_site.status == 403
        signed = await _sign_in(client, "analyst.east")
        assert signed.status == 200
        no_token = await client.delete("/api/session")
        assert no_token.status == 403 and "CSRF" in (await no_token.json())["error"]
        audit = await client.get("/api/audit")
        assert audit.status == 403
        # Basic-auth guessing until it is throttled.
        for i in range(PAIR_FAILURE_LIMIT):
            wrong = await client.post("/api/sql", json={"sql": "SELECT 1"},
                                      headers=_basic("mon.east", f"guess-{i}"))
            assert wrong.status == 401
        throttled = await client.post("/api/sql", json={"sql": "SELECT 1"},
                                      headers=_basic("mon.east"))
        assert throttled.status == 429

    console.serve(scenario)
    wait_for(lambda: len(console.audit()) == 10, what="audit events")
    rows = console.audit()
    summary = [r[:4] for r in rows]
    assert summary[0] == ("", "console", "request_refused", "refused")
    assert "POST /api/session: cross-origin request refused" in rows[0][4]
    assert ("analyst.east", "console", "sign_in", "ok") in summary
    assert ("analyst.east", "console", "request_refused", "refused") in summary
    assert ("analyst.east", "console", "audit_read", "refused") in summary
    assert summary.count(("mon.east", "http", "sign_in_failed", "refused")) == 6
    assert "wait" in rows[-1][4]  # the 429 says why


def test_error_responses_carry_the_security_headers(console: ConsoleUnderAttack) -> None:
    async def scenario(client: TestClient) -> None:
        responses = [
            await client.get("/api/alerts"),  # 401
            await _sign_in(client, "mon.east", Origin="https://evil.example"),  # 403
            await client.get("/no/such/page"),  # 404
            await client.post("/api/session", data=b"not json"),  # 400
        ]
        for i in range(PAIR_FAILURE_LIMIT + 1):
            last = await _sign_in(client, "mon.east", f"guess-{i}")
        responses.append(last)  # 429
        assert [r.status for r in responses] == [401, 403, 404, 400, 429]
        for response in responses:
            assert {k: response.headers.get(k) for k in SECURITY_HEADERS} == SECURITY_HEADERS

    console.serve(scenario)


def test_csv_export_cannot_carry_spreadsheet_formulas(console: ConsoleUnderAttack) -> None:
    cells = ["=HYPERLINK(\"http://evil.example\")", "+1+2", "-3+4", "@SUM(A1)", "\tx", "\rx",
             "plain"]
    literals = [c.replace("\t", "\\t").replace("\r", "\\r") for c in cells]
    sql = "SELECT " + ", ".join(f"'{c}' AS c{i}" for i, c in enumerate(literals)) + ", -5 AS n"

    async def scenario(client: TestClient) -> None:
        response = await client.post("/api/sql", json={"sql": sql, "format": "csv"},
                                     headers=_basic("admin.all"))
        assert response.status == 200, await response.text()
        header, row = list(csv.reader(io.StringIO(await response.text())))
        assert header == [f"c{i}" for i in range(len(cells))] + ["n"]
        assert row == ["'" + c for c in cells[:-1]] + ["plain", "-5"]

    console.serve(scenario)


def test_the_session_cookie_is_secure_behind_a_tls_proxy(console: ConsoleUnderAttack) -> None:
    async def scenario(client: TestClient) -> None:
        tls = await _sign_in(client, "mon.east", **{"X-Forwarded-Proto": "https"})
        assert tls.status == 200
        assert "Secure" in tls.headers["Set-Cookie"]
        plain = await _sign_in(client, "mon.east")  # plain HTTP on loopback: no Secure
        assert plain.status == 200 and "Secure" not in plain.headers["Set-Cookie"]

    console.serve(scenario, trusted_proxy=True)
