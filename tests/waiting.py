"""Test helpers: poll a condition with a deadline (no fixed sleeps), and require a service."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest


def wait_for(
    condition: Callable[[], object],
    timeout_s: float = 30.0,
    what: str = "condition",
    interval_s: float = 0.05,
) -> None:
    """Poll ``condition`` until it is truthy; AssertionError naming ``what`` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def require_source(available: bool, what: str) -> None:
    """Skip a test whose local service is missing, or fail when MEDSTREAM_REQUIRE_SOURCES=1
    (as `make test` sets: there the services must be present and prepared)."""
    if available:
        return
    if os.environ.get("MEDSTREAM_REQUIRE_SOURCES") == "1":
        pytest.fail(
            f"{what} is required (MEDSTREAM_REQUIRE_SOURCES=1); see deploy/dev/services.sh"
        )
    pytest.skip(f"{what} is not available")


def require_kafka() -> None:
    """:func:`require_source` for Apache Kafka run by medstream (Java 17+ and its jars)."""
    from medstream import kafka_broker

    reason = kafka_broker.available()
    require_source(reason is None, f"Apache Kafka ({reason})")
