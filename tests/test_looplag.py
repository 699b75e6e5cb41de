"""The loop-lag probe's per-second history: readers measure a stretch of time without a reset.

The bench reads `stats.loop` before and after each run and takes the longest stall of the
seconds in between (`window`); nothing is reset, so the metrics endpoint and `stats` readers
do not disturb each other.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from policy.clock import ManualClock
from policy.looplag import LoopLagProbe, window
from tests.helpers import ServiceProcess


async def test_a_stall_shows_in_the_seconds_it_happened_and_not_elsewhere() -> None:
    """60 ms of work on the loop in second S: the window over S says >= 50 ms, the one before not."""
    clock = ManualClock(1_000.0)
    probe = LoopLagProbe(interval=0.002, clock=clock).start()
    try:
        await asyncio.sleep(0.05)  # quiet, in second 1000
        clock.set(1_001.2)
        await asyncio.sleep(0.01)
        end = time.thread_time() + 0.06
        while time.thread_time() < end:  # CPU work on the loop thread
            pass
        await asyncio.sleep(0.01)  # the next firing records it, in second 1001
        clock.set(1_002.5)
        await asyncio.sleep(0.02)
        fig = probe.read()
    finally:
        probe.stop()
    rows = fig["per_second"]
    assert [r[0] for r in rows] == [1000, 1001, 1002]
    assert sum(r[4] for r in rows) == fig["samples"]
    assert sum(r[3] for r in rows) == fig["stalls"] >= 1
    stall = window(rows, 1_001.0, 1_001.9)
    assert stall["max_ms"] >= 50.0 and stall["busy_max_ms"] >= 50.0 and stall["stalls"] >= 1, stall
    assert stall["complete"] and stall["seconds"] == 1
    quiet = window(rows, 1_000.0, 1_000.99)
    assert quiet["max_ms"] < 50.0 and quiet["stalls"] == 0, quiet
    both = window(rows, 1_000.5, 1_002.1)
    assert both["max_ms"] == max(r[1] for r in rows) and both["samples"] == fig["samples"]
    # reading changed nothing: the figures since start are still there
    again = probe.read()
    assert again["max_ms"] == fig["max_ms"] and again["per_second"] == rows


async def test_history_keeps_the_last_seconds_only() -> None:
    """`history` bounds the rows; a window reaching before the oldest row says it is incomplete."""
    clock = ManualClock(2_000.0)
    probe = LoopLagProbe(interval=0.001, history=3, clock=clock).start()
    try:
        for _ in range(5):
            await asyncio.sleep(0.01)
            clock.advance(1.0)
        await asyncio.sleep(0.01)
        rows = probe.read()["per_second"]
    finally:
        probe.stop()
    assert [r[0] for r in rows] == [2003, 2004, 2005]
    assert window(rows, 2_003.0, 2_005.0)["complete"]
    gone = window(rows, 2_001.0, 2_005.0)
    assert not gone["complete"] and gone["samples"] == sum(r[4] for r in rows)
    assert window(rows, 2_004.0, 2_009.0)["complete"] is False  # not yet measured
    empty = window([], 1.0, 2.0)
    assert empty == {"max_ms": None, "busy_max_ms": None, "stalls": 0, "samples": 0, "seconds": 2,
                     "complete": False}


def test_history_must_be_positive() -> None:
    with pytest.raises(ValueError):
        LoopLagProbe(history=0)


def test_the_running_service_lists_its_seconds_in_stats(tmp_path: Path) -> None:
    """`stats.loop.per_second` of a real `serve`: rows for the seconds it ran, about 100 firings
    each (10 ms interval), the current second last; a window over them is complete."""
    svc = ServiceProcess(workdir=tmp_path).start()
    try:
        c = svc.client()
        t0 = time.time()
        time.sleep(2.2)
        loop = c.call("stats")["loop"]
        t1 = time.time()
        c.close()
    finally:
        svc.stop()
    rows = loop["per_second"]
    assert rows and int(t0) - 30 <= rows[0][0] and rows[-1][0] in (int(t1), int(t1) - 1), (rows, t0, t1)
    seen = window(rows, t0, t1 - 1)
    assert seen["complete"] and seen["samples"] >= 100, seen  # a loaded machine fires late, not never
    assert sum(r[4] for r in rows) == loop["samples"]
    assert seen["max_ms"] is not None and seen["max_ms"] <= loop["max_ms"]
