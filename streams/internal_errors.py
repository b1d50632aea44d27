"""What a stream stage does when its own code fails on one record or one timer tick.

A bug that one record's content triggers would trigger it again on every re-read: raising
would crash the worker each time and stall the partition (a poison pill). So the record is
dead-lettered whole (reason_code ``internal_error``) with its partial outputs and staged
state dropped, and the next record is processed normally. A timer tick has no record to
dead-letter: its failure is logged and counted, and the next tick runs as usual. Failures
that are not the record's fault (:data:`NOT_THE_RECORDS_FAULT`) raise in both cases.
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

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self._logged: set[str] = set()

    def rejected(self, exc: Exception, source: RawContext) -> RecordRejected:
        """The rejection of a whole record whose processing raised ``exc`` (counted, logged)."""
        reason = internal_error_reason(exc)
        self._report(reason, exc, f"at {source.topic}[{source.partition}]@{source.offset}")
        return RecordRejected(None, None, "internal_error", reason)

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
