"""What every detection rule returns, and the state it may keep, independent of Faust.

A rule family (NEWS2, device, claims, feeds, syndromic surveillance...) is a pure class:
it reads normalised events (dicts, timestamps as int epoch ms or aware datetimes) and a
:class:`KeyValueState`, and returns :class:`Finding` values. The detect stage turns a
finding into an Alert record and hands it to the alert lifecycle; in the worker the
state is a Faust table (JSON values), in tests a dict.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

#: Severities an alert may carry, most urgent first.
SEVERITIES: Final = ("critical", "high", "medium", "low")


@dataclass(frozen=True, slots=True)
class Finding:
    """One rule firing: which rule and version, about what, triggered by which events, and why.

    ``subject`` names what the alert is about (``person_key|news2``, a device id, a claim
    id, ``organisation|source``, ``district|syndrome``): while an alert of the same rule and
    subject is open, a new finding updates it instead of opening another one.
    ``explanation`` is readable by monitoring staff and must never hold a direct
    identifier (names, ID numbers, phone numbers, MRNs): pseudonymous keys only.
    """

    rule_id: str
    rule_version: str
    severity: str
    organisation_id: str
    subject: str
    event_time_ms: int
    triggering_event_ids: tuple[str, ...]
    explanation: str
    person_key: str | None = None
    analyte_code: str | None = None
    value: float | None = None
    unit: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {', '.join(SEVERITIES)}")
        if not self.triggering_event_ids and not self.rule_id.startswith(("feed.", "device.")):
            # Silence rules fire on the absence of events; every other rule names its evidence.
            raise ValueError(f"{self.rule_id}: a finding must name its triggering events")


@dataclass(frozen=True, slots=True)
class Cleared:
    """A condition a rule fired on is over (a device sends again, a feed resumes).

    The alert lifecycle resolves the open alert of the same rule and subject, if any.
    """

    rule_id: str
    organisation_id: str
    subject: str
    time_ms: int
    reason: str


class KeyValueState(Protocol):
    """Keyed rule state: values are JSON-serialisable (dicts, lists, str, numbers, None)."""

    def get(self, key: str) -> Any | None:
        """The value stored under ``key``, or None."""

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key`` (replacing any earlier value)."""

    def delete(self, key: str) -> None:
        """Forget ``key`` (no error when absent)."""

    def items(self) -> Iterator[tuple[str, Any]]:
        """Every (key, value) held, for timers that scan the state (silence rules)."""


class DictState:
    """A dict-backed :class:`KeyValueState` for tests, the benchmark and single-process use."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def get(self, key: str) -> Any | None:
        """The value stored under ``key``, or None."""
        return self.values.get(key)

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key``."""
        self.values[key] = value

    def delete(self, key: str) -> None:
        """Forget ``key``."""
        self.values.pop(key, None)

    def items(self) -> Iterator[tuple[str, Any]]:
        """A snapshot of every (key, value), safe to iterate while the state changes."""
        return iter(list(self.values.items()))


class StagedWrites:
    """A :class:`KeyValueState` whose writes reach the underlying state only at :meth:`commit`.

    A record whose processing fails half-way must leave no trace in rule state (a quality
    duplicate key, a suppression entry), or its replay would be judged against itself.
    """

    _DELETED: Final = object()

    def __init__(self, state: KeyValueState) -> None:
        self._state = state
        self._pending: dict[str, Any] = {}

    def get(self, key: str) -> Any | None:
        """The value staged or stored under ``key``, or None."""
        if key in self._pending:
            value = self._pending[key]
            return None if value is self._DELETED else value
        return self._state.get(key)

    def put(self, key: str, value: Any) -> None:
        """Stage ``value`` under ``key``."""
        self._pending[key] = value

    def delete(self, key: str) -> None:
        """Stage forgetting ``key``."""
        self._pending[key] = self._DELETED

    def items(self) -> Iterator[tuple[str, Any]]:
        """Every (key, value) as it would be after :meth:`commit`."""
        for key, value in list(self._pending.items()):
            if value is not self._DELETED:
                yield key, value
        for key, value in self._state.items():
            if key not in self._pending:
                yield key, value

    def commit(self) -> None:
        """Write every staged change to the underlying state."""
        for key, value in self._pending.items():
            if value is self._DELETED:
                self._state.delete(key)
            else:
                self._state.put(key, value)
        self._pending.clear()
