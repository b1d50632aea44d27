"""Running a `medstream` command in-process against a test's database."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from typer.testing import CliRunner

from medstream import cli
from medstream.clickhouse import QueryResult, run_read_only


def cli_on_database(
    clickhouse: Client, database: str, monkeypatch: pytest.MonkeyPatch, command: str
) -> Callable[..., Any]:
    """``invoke(*args)`` runs `medstream COMMAND *args` in-process on the test's database and
    returns typer's result (chdb allows one engine per process, so the command's querier is
    pointed at the test's client)."""

    @contextmanager
    def test_querier(max_rows: int) -> Iterator[Callable[[str], QueryResult]]:
        yield lambda sql: run_read_only(clickhouse, sql, database, max_rows=max_rows)

    monkeypatch.setattr(cli, "_querier", test_querier)
    monkeypatch.setenv("MEDSTREAM_CLICKHOUSE_DATABASE", database)

    def invoke(*args: str) -> Any:
        return CliRunner().invoke(cli.app, [command, *args])

    return invoke
