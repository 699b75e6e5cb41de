"""Warnings a client can cause, at most one line per interval per event, with a count.

A flood of bad messages, refused connections or dropped datagrams must not turn into a flood
of log lines (disk, log shipping, the event loop's time). The first occurrence of an event is
logged at once; the ones that follow within `interval` seconds are only counted, and one line
when the interval ends carries the last one's fields plus `repeated` (how many were folded
into it). Nothing is lost: every occurrence is either a line or part of a count.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


class _Event:
    __slots__ = ("fields", "last", "level", "suppressed", "timer")

    def __init__(self) -> None:
        self.last = float("-inf")
        self.suppressed = 0
        self.fields: dict[str, Any] = {}
        self.level = "warning"
        self.timer: asyncio.TimerHandle | None = None


class RateLimitedLog:
    """One line per `interval` per event name (the rest counted into `repeated`)."""

    def __init__(self, logger: Any, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._events: dict[str, _Event] = {}

    def warning(self, event: str, **fields: Any) -> None:
        """Log (or count) a warning."""
        self.emit("warning", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        """Log (or count) an info line."""
        self.emit("info", event, fields)

    def emit(self, level: str, event: str, fields: dict[str, Any]) -> None:
        """Log `event` now if its interval has passed, else count it for the interval's line."""
        st = self._events.get(event)
        if st is None:
            st = self._events[event] = _Event()
        now = self.clock()
        if now - st.last >= self.interval and not st.suppressed:
            st.last = now
            getattr(self.logger, level)(event, **fields)
            return
        st.suppressed += 1
        st.fields = fields
        st.level = level
        if st.timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                if now - st.last >= self.interval:
                    self._flush(event)
                return
            st.timer = loop.call_later(max(0.0, st.last + self.interval - now), self._flush, event)

    def _flush(self, event: str) -> None:
        st = self._events[event]
        st.timer = None
        if st.suppressed:
            n, st.suppressed = st.suppressed, 0
            st.last = self.clock()
            getattr(self.logger, st.level)(event, **st.fields, repeated=n, interval=self.interval)

    def flush(self) -> None:
        """Write out every pending count now (at shutdown)."""
        for event, st in self._events.items():
            if st.timer is not None:
                st.timer.cancel()
            self._flush(event)
