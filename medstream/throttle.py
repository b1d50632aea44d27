"""Sign-in throttling for the console (form and HTTP Basic): password guessing is bounded
without letting a stranger lock a user out.

An attempt is counted when it starts, before the password hash is checked, so requests
sent in parallel cannot all slip in before the first failure is recorded; attempts in
flight count against the same budgets as recorded failures, and only a few may hash at
once per name and per address (one more, sent meanwhile, is refused, and counted as a
failure unless the name signed in from that address before). Failures are counted per
(name, address), so someone guessing from elsewhere does not lock the user out at their
own workstation. Two wider budgets stop spraying: failures per address across names, and
failures per name across addresses; both spare a name at the addresses it recently signed
in from.

State is in memory, per console process: a restart forgets it (and several console
replicas each keep their own), which bounds guessing per process and window, not globally.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

#: Failures (and attempts in flight) of one name from one address per window.
PAIR_FAILURE_LIMIT: Final = 5
#: Failures from one address across every name per window (spraying from one place).
ADDRESS_FAILURE_LIMIT: Final = 20
#: Failures of one name from every address per window (a distributed guess); addresses the
#: name signed in from within KNOWN_ADDRESS_S are not held back by it.
NAME_FAILURE_LIMIT: Final = 50
#: Password checks in flight at once for one name, and from one address.
CONCURRENT_PER_NAME: Final = 2
CONCURRENT_PER_ADDRESS: Final = 4
WINDOW_S: Final = 300.0
KNOWN_ADDRESS_S: Final = 12 * 3600.0


class Throttled(Exception):
    """A sign-in attempt refused before its password was checked; the message says why."""

    def __init__(self, reason: str, retry_after_s: int) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Attempt:
    """One sign-in attempt in flight (its password is being checked)."""

    name: str
    address: str


@dataclass
class _Window:
    """Failure times in the window and attempts in flight, for one key."""

    failures: list[float] = field(default_factory=list)
    in_flight: int = 0

    def count(self, now: float) -> int:
        self.failures = [t for t in self.failures if now - t < WINDOW_S]
        return len(self.failures) + self.in_flight

    def retry_after(self, now: float) -> int:
        oldest = min(self.failures, default=now)
        return max(1, int(WINDOW_S - (now - oldest)) + 1)


class SignInThrottle:
    """Admits or refuses sign-in attempts; not thread-safe (one event loop calls it)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._pairs: dict[tuple[str, str], _Window] = {}
        self._names: dict[str, _Window] = {}
        self._addresses: dict[str, _Window] = {}
        self._known: dict[tuple[str, str], float] = {}  # (name, address) -> last sign-in

    def begin(self, name: str, address: str) -> Attempt:
        """Count an attempt before its password is checked; Throttled when over a budget."""
        now = self._clock()
        pair = self._pairs.setdefault((name, address), _Window())
        by_name = self._names.setdefault(name, _Window())
        by_address = self._addresses.setdefault(address, _Window())
        if pair.count(now) >= PAIR_FAILURE_LIMIT:
            raise Throttled(
                "too many failed sign-ins for this name from your address: wait "
                f"{pair.retry_after(now)} s", pair.retry_after(now),
            )
        known = now - self._known.get((name, address), -KNOWN_ADDRESS_S) < KNOWN_ADDRESS_S
        # A shared address (a ward's workstation, a NAT) sprayed by someone else does not
        # hold back a user who signed in from it before.
        if by_address.count(now) >= ADDRESS_FAILURE_LIMIT and not known:
            raise Throttled(
                f"too many failed sign-ins from your address: wait {by_address.retry_after(now)} s",
                by_address.retry_after(now),
            )
        if by_name.count(now) - by_name.in_flight >= NAME_FAILURE_LIMIT and not known:
            raise Throttled(
                "too many failed sign-ins for this name from many addresses: sign in from an "
                f"address it used before, or wait {by_name.retry_after(now)} s",
                by_name.retry_after(now),
            )
        busy = by_name.in_flight >= CONCURRENT_PER_NAME
        if busy or by_address.in_flight >= CONCURRENT_PER_ADDRESS:
            # Counted like a failure: its password was never checked, but a person does not
            # sign in several times at once; a guesser sending in parallel spends the budget.
            # A script's parallel requests from where it signed in before are only refused.
            if not known:
                self.refused(name, address)
            raise Throttled("too many sign-ins at once: try again in a second", 1)
        for window in (pair, by_name, by_address):
            window.in_flight += 1
        return Attempt(name, address)

    def failed(self, attempt: Attempt) -> None:
        """The password did not match: the attempt becomes a failure in every window."""
        now = self._clock()
        for window in self._windows(attempt):
            window.in_flight -= 1
            window.failures.append(now)

    def succeeded(self, attempt: Attempt) -> None:
        """Signed in: the attempt is not a failure, and the address becomes a known one."""
        now = self._clock()
        for window in self._windows(attempt):
            window.in_flight -= 1
        self._pairs[(attempt.name, attempt.address)].failures.clear()
        self._known[(attempt.name, attempt.address)] = now

    def refused(self, name: str, address: str) -> None:
        """A failure that needed no password check (a name that cannot exist, or one attempt
        too many at once)."""
        now = self._clock()
        for window in (
            self._pairs.setdefault((name, address), _Window()),
            self._names.setdefault(name, _Window()),
            self._addresses.setdefault(address, _Window()),
        ):
            window.failures.append(now)

    def forget_stale(self) -> None:
        """Drop windows with nothing in them and known addresses that are too old."""
        now = self._clock()
        for table in (self._pairs, self._names, self._addresses):
            for key in [k for k, w in table.items() if w.count(now) == 0]:
                del table[key]  # type: ignore[arg-type]
        for key in [k for k, t in self._known.items() if now - t >= KNOWN_ADDRESS_S]:
            del self._known[key]

    def _windows(self, attempt: Attempt) -> tuple[_Window, _Window, _Window]:
        return (
            self._pairs[(attempt.name, attempt.address)],
            self._names[attempt.name],
            self._addresses[attempt.address],
        )
