"""How late the event loop runs a periodic timer: the longest stall, and recent percentiles.

A probe asks the loop to wake it every `interval` seconds and records how much later than
asked it really woke up. Anything that holds the loop (a long computation, a blocking call,
a garbage collection, a thread holding the GIL) shows up as lag. It costs one timer callback
per interval (a few microseconds every 10 ms by default).

Lag is wall-clock time, so it also counts the time the OS did not run the process at all (a
saturated machine). `busy_max_ms` separates the two: the most CPU time the loop thread itself
used between two firings. A stall of our own making shows up in both; a stall of the
scheduler's making only in `max_ms`.

    probe = LoopLagProbe()
    probe.start()           # on the running loop
    probe.read()            # {"max_ms": ..., "p50_ms": ..., "p99_ms": ..., ...}
    probe.stop()

`current()` returns the probe a process started with `start(register=True)`, so the server,
`stats` and the metrics endpoint can all read the same one.

Reading never resets anything, so any number of readers can share the probe. To know the
longest stall of a given stretch of time (a bench run, an outage) without a reset, `read()`
also lists the last `history` wall-clock seconds (`per_second`: `[second, max_ms,
busy_max_ms, stalls, samples]`, oldest first, the current second last; wall clock from the
injected `clock`): a reader that noted when its stretch began and ended takes the rows of
those seconds (`window()`). A firing counts in the second it happened, so a stall that spans
a second boundary lands in the later one.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from policy.clock import Clock, SystemClock

_current: LoopLagProbe | None = None


def current() -> LoopLagProbe | None:
    """The process-wide probe (the last one started with `register=True`), if any."""
    return _current


class LoopLagProbe:
    """Measure how late a periodic timer fires on the running loop."""

    def __init__(self, interval: float = 0.01, window: int = 1000, stall: float = 0.010,
                 history: int = 120, clock: Clock | None = None) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0")
        if history < 1:
            raise ValueError("history must be >= 1 second")
        self.interval = interval
        self.clock: Clock = clock or SystemClock()  # wall clock of the per-second history only
        self.stall = stall  # a firing later than this counts as a stall
        self.stalls = 0
        self.last_lag = 0.0
        self.samples = 0  # timer firings measured since start (or the last reset)
        self.max_lag = 0.0  # seconds, since start (or the last reset)
        self.total_lag = 0.0
        self.max_busy = 0.0  # seconds of loop-thread CPU between two firings, since start
        self._recent: deque[float] = deque(maxlen=window)
        # one row per wall-clock second: [second, max lag, max busy, stalls, samples]
        self._seconds: deque[list[Any]] = deque(maxlen=history)
        self._cpu_mark = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._due = 0.0

    @property
    def running(self) -> bool:
        """Whether the probe is armed."""
        return self._handle is not None

    def start(self, register: bool = False) -> LoopLagProbe:
        """Arm the timer on the running loop; with `register`, make it the one `current()` returns."""
        global _current
        if self._handle is not None:
            return self
        self._loop = asyncio.get_running_loop()
        self._arm()
        if register:
            _current = self
        return self

    def stop(self) -> None:
        """Disarm the timer (the figures stay readable)."""
        global _current
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if _current is self:
            _current = None

    def reset(self) -> None:
        """Forget every figure measured so far (e.g. to measure one phase alone)."""
        self.samples = 0
        self.max_lag = 0.0
        self.total_lag = 0.0
        self.max_busy = 0.0
        self._recent.clear()
        self._seconds.clear()

    def _arm(self) -> None:
        assert self._loop is not None
        self._due = time.perf_counter() + self.interval
        self._cpu_mark = time.thread_time()
        self._handle = self._loop.call_later(self.interval, self._fire)

    def _fire(self) -> None:
        lag = time.perf_counter() - self._due
        busy = time.thread_time() - self._cpu_mark  # the callbacks run on the loop's thread
        if busy > self.max_busy:
            self.max_busy = busy
        if lag < 0.0:  # timers may fire a hair early (millisecond clocks): not a stall
            lag = 0.0
        self.samples += 1
        self.last_lag = lag
        if lag > self.stall:
            self.stalls += 1
        self.total_lag += lag
        if lag > self.max_lag:
            self.max_lag = lag
        self._recent.append(lag)
        sec = int(self.clock.now())
        rows = self._seconds
        if not rows or rows[-1][0] != sec:
            rows.append([sec, lag, busy, 0, 0])
        row = rows[-1]
        if lag > row[1]:
            row[1] = lag
        if busy > row[2]:
            row[2] = busy
        if lag > self.stall:
            row[3] += 1
        row[4] += 1
        self._arm()

    def read(self) -> dict[str, Any]:
        """The figures in milliseconds: max since start, and percentiles over the recent window."""
        recent = sorted(self._recent)
        return {
            "interval_ms": self.interval * 1000.0,
            "samples": self.samples,
            "max_ms": round(self.max_lag * 1000.0, 3),
            "busy_max_ms": round(self.max_busy * 1000.0, 3),
            "mean_ms": round(self.total_lag / self.samples * 1000.0, 3) if self.samples else 0.0,
            "recent_max_ms": round(recent[-1] * 1000.0, 3) if recent else 0.0,
            "p50_ms": round(_pct(recent, 0.50) * 1000.0, 3),
            "p99_ms": round(_pct(recent, 0.99) * 1000.0, 3),
            # for metrics, in base units
            "lag_seconds": round(self.last_lag, 6),
            "lag_max_seconds": round(recent[-1], 6) if recent else 0.0,
            "stalls": self.stalls,
            "stall_threshold_seconds": self.stall,
            "per_second": [[sec, round(lag * 1000.0, 3), round(busy * 1000.0, 3), stalls, n]
                           for sec, lag, busy, stalls, n in self._seconds],
        }


def window(per_second: list[list[Any]], start: float, end: float) -> dict[str, Any]:
    """The figures of the seconds from `start` to `end` (wall clock, `time.time()`) out of a
    `read()["per_second"]`: longest lag and busy time, stalls, samples, and whether the history
    still covered all of it (`complete`: rows older than `history` seconds are gone)."""
    first, last = int(start), int(end)
    rows = [r for r in per_second if first <= r[0] <= last]
    return {
        "max_ms": max((r[1] for r in rows), default=None),
        "busy_max_ms": max((r[2] for r in rows), default=None),
        "stalls": sum(r[3] for r in rows),
        "samples": sum(r[4] for r in rows),
        "seconds": last - first + 1,
        "complete": bool(per_second) and per_second[0][0] <= first and per_second[-1][0] >= last,
    }


def _pct(ordered: list[float], q: float) -> float:
    """The q-quantile of an ascending list (nearest rank), 0.0 when empty."""
    if not ordered:
        return 0.0
    i = min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))
    return ordered[i]
