"""The sign-in throttle's budgets, on a hand-driven clock."""

from __future__ import annotations

import pytest

from medstream.throttle import (
    ADDRESS_FAILURE_LIMIT,
    CONCURRENT_PER_NAME,
    NAME_FAILURE_LIMIT,
    PAIR_FAILURE_LIMIT,
    WINDOW_S,
    SignInThrottle,
    Throttled,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_attempts_in_flight_count_and_only_a_few_hash_at_once() -> None:
    throttle = SignInThrottle(Clock())
    running = [throttle.begin("mon.east", "10.0.0.1") for _ in range(CONCURRENT_PER_NAME)]
    with pytest.raises(Throttled, match="at once"):
        throttle.begin("mon.east", "10.0.0.1")
    for attempt in running:
        throttle.failed(attempt)
    # 2 checked + 1 refused at once = 3 of the 5; two more may be checked, then none.
    for _ in range(PAIR_FAILURE_LIMIT - CONCURRENT_PER_NAME - 1):
        throttle.failed(throttle.begin("mon.east", "10.0.0.1"))
    with pytest.raises(Throttled, match="from your address") as refused:
        throttle.begin("mon.east", "10.0.0.1")
    assert 0 < refused.value.retry_after_s <= WINDOW_S + 1


def test_parallel_requests_of_a_script_that_signed_in_are_refused_not_counted() -> None:
    throttle = SignInThrottle(Clock())
    throttle.succeeded(throttle.begin("analyst.east", "10.0.0.2"))
    for _ in range(ADDRESS_FAILURE_LIMIT + 1):
        running = [throttle.begin("analyst.east", "10.0.0.2") for _ in range(CONCURRENT_PER_NAME)]
        with pytest.raises(Throttled, match="at once"):
            throttle.begin("analyst.east", "10.0.0.2")
        for attempt in running:
            throttle.succeeded(attempt)
    # Neither the script nor another user at that address is held back.
    throttle.succeeded(throttle.begin("analyst.east", "10.0.0.2"))
    throttle.succeeded(throttle.begin("mon.east", "10.0.0.2"))


def test_failures_expire_and_a_success_clears_its_own_address() -> None:
    clock = Clock()
    throttle = SignInThrottle(clock)
    for _ in range(PAIR_FAILURE_LIMIT - 1):
        throttle.failed(throttle.begin("mon.east", "10.0.0.1"))
    throttle.succeeded(throttle.begin("mon.east", "10.0.0.1"))
    for _ in range(PAIR_FAILURE_LIMIT):
        throttle.failed(throttle.begin("mon.east", "10.0.0.1"))
    with pytest.raises(Throttled):
        throttle.begin("mon.east", "10.0.0.1")
    clock.now += WINDOW_S
    throttle.forget_stale()
    throttle.succeeded(throttle.begin("mon.east", "10.0.0.1"))


def test_spraying_from_one_address_and_guessing_from_many_are_bounded() -> None:
    clock = Clock()
    throttle = SignInThrottle(clock)
    for i in range(ADDRESS_FAILURE_LIMIT):
        throttle.failed(throttle.begin(f"user{i}", "10.0.0.9"))
    with pytest.raises(Throttled, match="from your address"):
        throttle.begin("someone.else", "10.0.0.9")

    throttle.succeeded(throttle.begin("nurse.li", "10.1.0.1"))  # her own workstation
    for i in range(NAME_FAILURE_LIMIT):
        throttle.failed(throttle.begin("nurse.li", f"192.0.2.{i}"))
    with pytest.raises(Throttled, match="many addresses"):
        throttle.begin("nurse.li", "198.51.100.1")
    # Not locked out where she signed in before.
    throttle.succeeded(throttle.begin("nurse.li", "10.1.0.1"))


def test_spraying_a_shared_address_does_not_lock_out_who_signed_in_there() -> None:
    """Review of issue 15: twenty failures under any names from a ward's shared address
    locked out every user of that workstation."""
    clock = Clock()
    throttle = SignInThrottle(clock)
    throttle.succeeded(throttle.begin("nurse.li", "10.0.0.9"))
    for i in range(ADDRESS_FAILURE_LIMIT):
        throttle.failed(throttle.begin(f"user{i}", "10.0.0.9"))
    with pytest.raises(Throttled, match="from your address"):
        throttle.begin("stranger", "10.0.0.9")
    throttle.succeeded(throttle.begin("nurse.li", "10.0.0.9"))  # she still signs in there
