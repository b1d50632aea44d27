"""What the security tests share: the console served on a real socket with its audit trail on
the real broker, and the real sink storing that trail in the real ClickHouse engine."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from clickhouse_connect.driver.client import Client

from medstream.access import UserStore
from medstream.audit import AuditTrail
from medstream.clickhouse import QueryResult, run_read_only
from medstream.console import Console, Querier
from medstream.settings import ConsoleSettings, KafkaSettings, SinkSettings
from schemas import serde
from sinks.clickhouse import ClickHouseSink
from tests.sinks.test_clickhouse import KEYS, running

PASSWORD = "synthetic-pass-01"


@contextmanager
def stored_audit(
    kafka: KafkaSettings, clickhouse: Client, database: str
) -> Iterator[threading.Lock]:
    """The real sink storing what reaches the topics (the audit trail among them) while the
    block runs; yields the lock every use of the shared engine takes."""
    lock = threading.Lock()
    sink = ClickHouseSink(
        kafka, SinkSettings(group_id=f"sink-{database}", batch_max_ms=50), clickhouse, database,
        serde.ManifestRegistry(), lock, include_raw_ledger=False, keys=KEYS,
    )
    with running(sink):
        yield lock


@dataclass
class ConsoleUnderAttack:
    """The console served on a real socket, its audit trail stored by the running sink."""

    kafka: KafkaSettings
    clickhouse: Client
    database: str
    users: UserStore
    lock: threading.Lock

    def serve(self, scenario: Callable[[TestClient], Awaitable[None]], **settings: Any) -> None:
        """Run ``scenario`` against a console with these ConsoleSettings."""
        serve(console_on(self.kafka, self.clickhouse, self.database, self.users, self.lock,
                         **settings), scenario)

    def audit(self, where: str = "1") -> list[tuple[Any, ...]]:
        """The stored audit events (see audit_rows)."""
        return audit_rows(self.clickhouse, self.lock, self.database, where)


def console_on(
    kafka: KafkaSettings, clickhouse: Client, database: str, users: UserStore,
    lock: threading.Lock, **settings: Any,
) -> Console:
    """A console whose audit trail goes to the broker, authenticated with the test key."""

    def run(
        sql: str, extra: dict[str, Any] | None, max_rows: int, timeout_s: int
    ) -> QueryResult:
        with lock:
            return run_read_only(clickhouse, sql, database, timeout_s, max_rows, extra)

    return Console(
        ConsoleSettings(**settings), users, kafka, serde.ManifestRegistry(), Querier(run),
        AuditTrail(kafka, serde.ManifestRegistry(), key=KEYS.audit_key), database,
    )


def serve(console: Console, scenario: Callable[[TestClient], Awaitable[None]]) -> None:
    """Serve the console on a real loopback socket and run ``scenario`` against it."""

    async def main() -> None:
        async with TestClient(TestServer(console.application())) as client:
            await scenario(client)
        console.stop()
        console.audit.close()

    asyncio.run(main())


def audit_rows(
    clickhouse: Client, lock: threading.Lock, database: str, where: str = "1"
) -> list[tuple[Any, ...]]:
    """(actor, channel, action, outcome, detail) of the stored audit events, oldest first."""
    with lock:
        return [
            tuple(r) for r in clickhouse.query(
                f"SELECT actor, channel, action, outcome, detail FROM {database}.audit_log "
                f"WHERE {where} ORDER BY event_time, audit_id"
            ).result_rows
        ]
