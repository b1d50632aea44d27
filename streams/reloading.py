"""Rules and dictionaries that change on disk are picked up without a restart.

:class:`ReloadingFile` wraps a loader (``path -> loaded rules``): :meth:`current` re-reads
the file when its modification time or size changed (or that of a file it reads along,
``also_watch``), at most every ``check_every_s``.
A file that no longer loads keeps the previous version in service: the error is logged
once per bad file state and kept in :attr:`last_error`, so an operator's typo never stops
the stream nor silently switches a rule off.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from medstream.metrics import RULES_RELOADS

log = logging.getLogger("medstream.streams.rules")
Loaded = TypeVar("Loaded")
Stamp = tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class Reload:
    """One change of a watched file set, loaded or refused (the worker audits it)."""

    name: str  # the rules family, e.g. "terminology"
    path: Path  # its main file
    outcome: str  # "loaded" or "refused"
    detail: str  # "version v3", or why the change was refused
    changed: tuple[str, ...]  # names of the files that changed since the version in service
    stamp: Stamp  # the files' (mtime, size): equal stamps are the same change


ReloadListener = Callable[[Reload], None]
_listeners: list[ReloadListener] = []


def on_reload(listener: ReloadListener) -> None:
    """Call ``listener`` after every reloaded or refused change of any watched file."""
    _listeners.append(listener)


def _tell(event: Reload) -> None:
    for listener in _listeners:
        try:
            listener(event)
        except Exception:  # a listener must never stop the stream
            log.exception("reload listener failed")


class ReloadingFile(Generic[Loaded]):
    """A loaded rules (or dictionary) file, reloaded when the file changes."""

    def __init__(
        self,
        name: str,
        path: Path | str,
        loader: Callable[[Path], Loaded],
        check_every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        also_watch: Sequence[Path | str] = (),
    ) -> None:
        self.name = name
        self.path = Path(path)
        self._watched = [self.path, *(Path(other) for other in also_watch)]
        self._loader = loader
        self._check_every_s = check_every_s
        self._clock = clock
        self._stamp = self._file_stamp()
        # The first load must succeed: a worker never starts on rules it cannot read.
        self._loaded: Loaded = loader(self.path)
        self._checked_at = clock()
        self._bad_stamp: Stamp | None = None
        self.last_error: str | None = None
        self.generation = 0

    def _file_stamp(self) -> Stamp:
        stamps = []
        for path in self._watched:
            try:
                stat = path.stat()
            except OSError:
                stamps.append((-1, -1))
            else:
                stamps.append((stat.st_mtime_ns, stat.st_size))
        return tuple(stamps)

    def current(self) -> Loaded:
        """The newest version that loaded; checks the file at most every check_every_s."""
        now = self._clock()
        if now - self._checked_at < self._check_every_s:
            return self._loaded
        self._checked_at = now
        stamp = self._file_stamp()
        if stamp == self._stamp or stamp == self._bad_stamp:
            return self._loaded
        try:
            loaded = self._loader(self.path)
        except (ValueError, OSError) as exc:
            self._bad_stamp = stamp
            self.last_error = str(exc)
            RULES_RELOADS.labels(self.name, "refused").inc()
            log.error(
                "%s: the changed file was refused; still serving version %s:\n%s",
                self.name,
                getattr(self._loaded, "version", "?"),
                exc,
            )
            _tell(Reload(self.name, self.path, "refused", str(exc), self._changed(stamp), stamp))
            return self._loaded
        changed = self._changed(stamp)
        self._stamp = stamp
        self._bad_stamp = None
        self.last_error = None
        self._loaded = loaded
        self.generation += 1
        RULES_RELOADS.labels(self.name, "loaded").inc()
        version = str(getattr(loaded, "version", "?"))
        log.warning("%s: reloaded %s (version %s)", self.name, ", ".join(changed), version)
        _tell(Reload(self.name, self.path, "loaded", f"version {version}", changed, stamp))
        return loaded

    def _changed(self, stamp: Stamp) -> tuple[str, ...]:
        """Names of the watched files whose state differs from the version in service."""
        return tuple(
            path.name
            for path, before, after in zip(self._watched, self._stamp, stamp, strict=True)
            if before != after
        )
