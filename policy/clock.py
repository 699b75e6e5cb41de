"""Injected time: the service reads the clock, tests move it."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Something that tells the wall-clock time in seconds since the epoch."""

    def now(self) -> float:
        """Return the current time in seconds."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> float:
        """Return `time.time()`."""
        return time.time()


class ManualClock:
    """A clock that only moves when told to (for tests)."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start

    def now(self) -> float:
        """Return the current manual time."""
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        self._now += seconds

    def set(self, when: float) -> None:
        """Jump to an absolute time."""
        self._now = when
