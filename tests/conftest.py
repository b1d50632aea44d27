"""Session fixtures: one real Apache Kafka broker and the real embedded ClickHouse engine.

The broker is Apache Kafka (KRaft, one node, jars from Maven Central) for the session;
MEDSTREAM_TEST_BROKER=tansu runs the same tests on tansu instead. Where Apache Kafka cannot
start (no Java or jars), the suite fails when MEDSTREAM_REQUIRE_SOURCES=1 (CI), else falls
back to tansu with a warning. ``tansu_broker`` is the zero-Java fallback's own small tier.

chdb allows one engine path per process, so the whole test process shares one engine and
every test gets its own database; every test also gets its own topic prefix and groups.
"""

from __future__ import annotations

import itertools
import os
import uuid
import warnings
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from medstream import kafka_broker
from medstream.clickhouse import connect, migrate
from medstream.runtime import Broker, TansuBroker, ensure_topics
from medstream.settings import KafkaSettings

_counter = itertools.count()


def _kafka_required() -> bool:
    return os.environ.get("MEDSTREAM_REQUIRE_SOURCES") == "1"


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One real broker for the session: Apache Kafka (or tansu, see the module docstring)."""
    wanted = os.environ.get("MEDSTREAM_TEST_BROKER", "kafka")
    if wanted not in ("kafka", "tansu"):
        pytest.fail(f"MEDSTREAM_TEST_BROKER must be kafka or tansu, not {wanted!r}")
    directory = tmp_path_factory.mktemp("broker")
    embedded: Broker
    if wanted == "kafka":
        reason = kafka_broker.available()
        if reason is not None and _kafka_required():
            pytest.fail(f"Apache Kafka is required (MEDSTREAM_REQUIRE_SOURCES=1): {reason}")
        if reason is None:
            embedded = kafka_broker.KafkaNode(directory / "kafka").start()
        else:
            warnings.warn(
                f"Apache Kafka unavailable ({reason}); the suite runs on tansu", stacklevel=1
            )
            embedded = TansuBroker(log_path=directory / "broker.log").start()
    else:
        embedded = TansuBroker(log_path=directory / "broker.log").start()
    # Child processes that inherit the environment know which broker they talk to.
    os.environ["MEDSTREAM_KAFKA_BROKER_KIND"] = embedded.kind
    yield embedded
    embedded.stop()


@pytest.fixture(scope="session")
def tansu_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuBroker]:
    """The real tansu broker (memory storage): the zero-Java fallback's own tests."""
    embedded = TansuBroker(log_path=tmp_path_factory.mktemp("tansu") / "broker.log").start()
    yield embedded
    embedded.stop()


def _settings_factory(embedded: Broker) -> Callable[..., KafkaSettings]:
    def make(**overrides: object) -> KafkaSettings:
        prefix = f"t{next(_counter)}-{uuid.uuid4().hex[:6]}."
        settings = KafkaSettings(
            bootstrap_servers=embedded.bootstrap_servers,
            broker_kind=embedded.kind,
            topic_prefix=prefix,
            raw_partitions=2,
            norm_partitions=2,
            **overrides,  # type: ignore[arg-type]
        )
        ensure_topics(settings)
        return settings

    return make


@pytest.fixture
def kafka_factory(broker: Broker) -> Callable[..., KafkaSettings]:
    """KafkaSettings on the session broker with a unique topic prefix; topics created."""
    return _settings_factory(broker)


@pytest.fixture
def tansu_kafka_factory(tansu_broker: TansuBroker) -> Callable[..., KafkaSettings]:
    """KafkaSettings on the session's tansu broker with a unique topic prefix."""
    return _settings_factory(tansu_broker)


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


#: Where the logs of a failed end-to-end test are copied: pytest keeps only its last three
#: base directories, and a failure seen in CI was gone 40 minutes later.
FAILED_LOGS = Path(os.environ.get("MEDSTREAM_FAILED_TEST_LOGS", "/tmp/medstream-failed-tests"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """After a failed e2e test, its logs (``*.log`` under its tmp_path, not Kafka's log
    segments) are copied to FAILED_LOGS/<test>-<time>/ and the place is added to the
    report."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed or item.get_closest_marker("e2e") is None:
        return
    tmp_path = getattr(item, "funcargs", {}).get("tmp_path")
    if not isinstance(tmp_path, Path) or not tmp_path.exists():
        return
    import re
    import shutil
    import time

    name = re.sub(r"[^\w.-]+", "_", item.name)[:80]
    target = FAILED_LOGS / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}"
    copied = 0
    for log in tmp_path.rglob("*.log"):
        if log.stem.isdigit():
            continue  # a Kafka log segment, not a component's log
        destination = target / log.relative_to(tmp_path)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(log, destination)
        copied += 1
    if copied:
        report.sections.append(("failed test logs", f"{copied} logs copied to {target}"))
