"""Attacks on alert actions, and their refusal: acting on another organisation's alert from
the console, a forged action naming the wrong organisation sent past the console, and an
unattributed action. Real broker, real ClickHouse engine, the real lifecycle stage."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient
from clickhouse_connect.driver.client import Client

from medstream.access import UserStore
from medstream.alert_actions import AlertActionError, AlertState, request_action
from medstream.console import alert_view
from medstream.settings import KafkaSettings
from schemas import serde
from tests.lifecycle_helpers import LifecycleWorker, open_alert
from tests.medstream.test_console import PASSWORD, _console, _run, _sign_in, action_audit

pytestmark = pytest.mark.integration


@pytest.fixture
def users(tmp_path: Path) -> UserStore:
    store = UserStore(tmp_path / "users.yaml")
    store.add("mon.east", "monitor", ["H001"], PASSWORD)
    return store


def test_a_console_user_cannot_act_on_another_organisations_alert(
    kafka_factory: Callable[..., KafkaSettings], clickhouse: Client, database: str,
    users: UserStore,
) -> None:
    kafka = kafka_factory()
    console = _console(kafka, clickhouse, database, users, action_answer_s=5)
    with LifecycleWorker(kafka, serde.ManifestRegistry()) as worker:
        west = open_alert(kafka, worker, organisation="H002")
        console.board.merge(alert_view(west))
        before = dict(worker.state.values)

        async def scenario(client: TestClient) -> None:
            csrf = (await (await _sign_in(client, "mon.east")).json())["csrf"]
            for action in ("acknowledge", "resolve"):
                answer = await client.post(
                    f"/api/alerts/{west['alert_id']}/{action}", json={"note": "x"},
                    headers={"X-CSRF-Token": csrf},
                )
                # Out of scope looks like absent: nothing about the alert is revealed.
                assert answer.status == 404
                assert (await answer.json()) == {
                    "error": f"no alert {west['alert_id']} in your scope"
                }

        _run(console, scenario)
        assert worker.state.values == before  # nothing reached the lifecycle
    assert [(a[1], a[2], a[3]) for a in action_audit(clickhouse, database)] == [
        ("alert_acknowledge", "refused", west["alert_id"]),
        ("alert_resolve", "refused", west["alert_id"]),
    ]


def test_a_forged_action_naming_the_wrong_organisation_is_refused_by_the_lifecycle(
    kafka_factory: Callable[..., KafkaSettings],
) -> None:
    kafka = kafka_factory()
    with LifecycleWorker(kafka, serde.ManifestRegistry()) as worker:
        west = open_alert(kafka, worker, organisation="H002")
        before = dict(worker.state.values)
        # A client that skips the console's scope check and claims its own organisation.
        forged = AlertState(west["alert_id"], west["rule_id"], west["subject"], "open", "H001")
        outcome = request_action(
            kafka, serde.ManifestRegistry(), forged, "resolve", "mon.east", None, 20
        )
        assert (outcome.outcome, outcome.audit_outcome) == ("refused", "refused")
        assert outcome.reason == (
            f"cannot resolve alert {west['alert_id']}: the action names organisation H001, "
            "which the alert does not belong to"
        )
        assert outcome.status == "open"
        assert worker.state.values == before
        assert [a["action"] for a in worker.alerts] == ["opened"]


def test_an_unattributed_or_unknown_action_is_refused_before_it_is_sent(
    kafka_factory: Callable[..., KafkaSettings],
) -> None:
    kafka = kafka_factory()
    alert = AlertState("a1", "critical_value.potassium", "s", "open", "H001")
    with pytest.raises(AlertActionError, match="name who acts"):
        request_action(kafka, serde.ManifestRegistry(), alert, "resolve", "  ", None, 1)
    with pytest.raises(AlertActionError, match="unknown action 'delete'"):
        request_action(kafka, serde.ManifestRegistry(), alert, "delete", "mon.east", None, 1)
    with pytest.raises(AlertActionError, match="already resolved"):
        request_action(
            kafka, serde.ManifestRegistry(),
            AlertState("a1", "critical_value.potassium", "s", "resolved", "H001"),
            "acknowledge", "mon.east", None, 1,
        )
