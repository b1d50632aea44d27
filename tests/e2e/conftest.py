"""Fixtures of the end-to-end tier."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator

import pytest


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """The child processes a test starts; stopped (SIGTERM, then SIGKILL after 30 s) when
    it ends, also when it fails or times out."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in reversed(started):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
