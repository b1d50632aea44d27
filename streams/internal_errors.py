"""What a stream stage does when its own code fails on one record or one timer tick.

A bug that one record's content triggers would trigger it again on every re-read: raising
would crash the worker each time and stall the partition (a poison pill). So the record is
dead-lettered whole (reason_code ``internal_error``) with its partial outputs and staged
state dropped, and the next record is processed normally. A timer tick has no record to
dead-letter: its failure is logged and counted, and the next tick runs as usual. Failures
that are not the record's fault (:data:`NOT_THE_RECORDS_FAULT`) raise in both cases.

A breaker stops this from hiding a broken worker: :data:`STORM_LIMIT` records in a row of
one topic failing that way are not one record's bug but a bug every record of that feed
hits (or a dependency failing in a way not listed below), which would otherwise
dead-letter the whole feed and every critical alert in it. Then :class:`InternalErrorStorm`
is raised instead and the record that tripped it is not dead-lettered; the worker's agents
(streams.app.stops_on_storm) end the process at once, before Faust acknowledges or commits
that record, with a non-zero exit code for its supervisor (`up`, systemd, Kubernetes) to
restart and report. After the fix the record is read again from the committed offset.
"""

from __future__ import annotations

import functools
import logging
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

from medstream.metrics import INTERNAL_ERRORS
from streams.model import RawContext, RecordRejected

log = logging.getLogger("medstream.streams.internal_errors")

#: Failures that are not the record's fault and must not be dead-lettered: the process
#: cannot go on (memory), or a service it depends on is unreachable (the schema registry
#: client raises serde.RegistryUnavailable, a ConnectionError; sockets raise OSError). They
#: raise, the worker exits non-zero and restarts from the committed offset, and the record
#: is processed again once the service is back. Anything else raised while one record is
#: handled is a bug that this record's content triggers, and it would trigger it again on
#: every re-read: that record is dead-lettered (``internal_error``) so the partition moves on.
NOT_THE_RECORDS_FAULT: Final = (MemoryError, OSError)
#: Records in a row that may fail with an internal error before the worker stops.
STORM_LIMIT: Final = 20


class InternalErrorStorm(RuntimeError):
    """Too many records in a row failed with an internal error: the worker must stop."""


def internal_error_reason(exc: Exception) -> str:
    """Where a bug struck, without its message: the type and the innermost function.

    Exception messages often repeat the value at fault (``KeyError: 'TESTPATIENT'``), so the
    reason, which is stored and shown to operators, never carries them.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" in {Path(frames[-1].filename).name}:{frames[-1].name}" if frames else ""
    return (
        f"internal error: {type(exc).__name__}{where}; the record was not processed "
        "(a bug: report it with this dead letter's id, then replay the record)"
    )


class InternalErrors:
    """Counts and logs the bugs one stage hits (the traceback once per site of a bug)."""

    def __init__(self, stage: str, storm_limit: int = STORM_LIMIT) -> None:
        self.stage = stage
        self.storm_limit = storm_limit
        #: Per topic: records in a row that failed with an internal error (a success of
        #: that topic starts it again; another feed's successes do not hide a broken one).
        self.in_a_row: dict[str, int] = {}
        self._logged: set[str] = set()

    def rejected(self, exc: Exception, source: RawContext) -> RecordRejected:
        """The rejection of a whole record whose processing raised ``exc`` (counted, logged).

        Raises :class:`InternalErrorStorm` instead when this is the ``storm_limit``-th record
        in a row: that record is then not dead-lettered and the worker stops.
        """
        reason = internal_error_reason(exc)
        where = f"at {source.topic}[{source.partition}]@{source.offset}"
        self._report(reason, exc, where)
        in_a_row = self.in_a_row[source.topic] = self.in_a_row.get(source.topic, 0) + 1
        if in_a_row >= self.storm_limit:
            log.critical(
                "%s: %d records in a row of %s failed with an internal error (the last %s); "
                "this is not one record's bug: stopping the worker instead of dead-lettering "
                "the whole feed (this record is not committed and is read again after the fix)",
                self.stage, in_a_row, source.topic, where,
            )
            raise InternalErrorStorm(
                f"{self.stage}: {in_a_row} records in a row of {source.topic} failed ({reason})"
            ) from exc
        return RecordRejected(None, None, "internal_error", reason)

    def succeeded(self, topic: str) -> None:
        """A record of ``topic`` was processed: the breaker's count of it starts again."""
        if self.in_a_row.get(topic):
            self.in_a_row[topic] = 0

    def tick_failed(self, exc: Exception, timer: str) -> None:
        """Count and log a timer tick that raised ``exc`` (the next tick runs as usual)."""
        reason = internal_error_reason(exc).replace("the record", f"the {timer} tick")
        self._report(reason, exc, "(the next tick runs as usual)")

    def _report(self, reason: str, exc: Exception, where: str) -> None:
        INTERNAL_ERRORS.labels(self.stage).inc()
        if reason in self._logged:
            log.error("%s: %s %s", self.stage, reason, where)
            return
        # The traceback names files, lines and code, never the exception's message or the
        # record (either may carry patient data); logged once per site of a bug.
        self._logged.add(reason)
        log.error(
            "%s: %s %s; traceback (message withheld):\n%s",
            self.stage, reason, where, "".join(traceback.format_tb(exc.__traceback__)),
        )


def surviving_tick(
    errors: InternalErrors,
) -> Callable[[Callable[[], Awaitable[None]]], Callable[[], Awaitable[None]]]:
    """A decorator of Faust timer bodies: a bug a tick raises is counted and logged, and the
    worker goes on (the timer calls it again at its next interval); NOT_THE_RECORDS_FAULT
    raises."""

    def decorate(tick: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        @functools.wraps(tick)
        async def guarded() -> None:
            try:
                await tick()
            except NOT_THE_RECORDS_FAULT:
                raise
            except Exception as exc:
                errors.tick_failed(exc, tick.__name__)

        return guarded

    return decorate
