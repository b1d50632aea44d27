"""Session fixtures: the real tansu broker process and the real embedded ClickHouse engine.

chdb allows one engine path per process, so the whole test process shares one engine and
every test gets its own database; every test also gets its own topic prefix and groups.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from clickhouse_connect.driver.client import Client

from medstream.clickhouse import connect, migrate
from medstream.runtime import EmbeddedBroker, ensure_topics
from medstream.settings import KafkaSettings

_counter = itertools.count()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """One real tansu broker for the session (memory storage)."""
    log = tmp_path_factory.mktemp("broker") / "broker.log"
    embedded = EmbeddedBroker(log_path=log).start()
    yield embedded
    embedded.stop()


@pytest.fixture
def kafka_factory(broker: EmbeddedBroker) -> Callable[..., KafkaSettings]:
    """KafkaSettings on the session broker with a unique topic prefix; topics created."""

    def make(**overrides: object) -> KafkaSettings:
        prefix = f"t{next(_counter)}-{uuid.uuid4().hex[:6]}."
        settings = KafkaSettings(
            bootstrap_servers=broker.bootstrap_servers,
            topic_prefix=prefix,
            raw_partitions=2,
            norm_partitions=2,
            **overrides,  # type: ignore[arg-type]
        )
        ensure_topics(settings)
        return settings

    return make


@pytest.fixture(scope="session")
def clickhouse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    """The real embedded ClickHouse engine (one per test process)."""
    path: Path = tmp_path_factory.mktemp("clickhouse")
    client = connect(f"chdb://{path}")
    yield client
    client.close()


@pytest.fixture
def database(clickhouse: Client) -> str:
    """A fresh, migrated database for one test."""
    name = f"test_{next(_counter)}_{uuid.uuid4().hex[:8]}"
    migrate(clickhouse, name)
    return name
