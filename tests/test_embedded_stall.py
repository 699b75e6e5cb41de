"""A snapshot never stalls the loop: compaction of 100k held calls runs in a child process.

Two measures, taken while a compaction of 100,000 held calls runs and the loop keeps serving
answers and ends:

- `busy_max_ms` of the loop-lag probe: the most CPU the loop thread used between two timer
  firings. It does not depend on how loaded the machine is, and the old in-loop snapshot
  (dump + JSON + fsync on the loop) used ~400 ms of it in one go at this size;
- `max_ms`, the longest wall-clock stall: it also counts the time the OS did not run us, which
  on a saturated shared 2-core machine reaches tens of ms whatever we do. A stall of our own
  making happens at every compaction, so the bound (< 50 ms) must hold in one of three
  compactions; all figures are printed. The <= 10 ms target is checked in bench/bench_embedded.py.
"""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path
from typing import Any

from policy import looplag
from policy.looplag import LoopLagProbe
from policy.store.base import CallInfo, PlanEntry
from policy.store.embedded import EmbeddedStore

T0 = 1_800_000_000.0
N = 100_000
PLAN = [PlanEntry("total", None, None, False, "count-all"), PlanEntry("account", "acme", None, False, "cap")]


async def test_compaction_of_100k_calls_does_not_stall_the_loop(tmp_path: Path) -> None:
    """Loop busy < 25 ms per probe interval, longest stall < 50 ms, while 100k calls compact; nothing lost."""
    path = tmp_path / "snap.json"
    store = EmbeddedStore(snapshot_path=path, snapshot_interval=0, fsync_interval=0.5, clock=lambda: T0)
    await store.start()
    for i in range(N):  # in bulk through the store API (no sockets)
        await store.reserve(CallInfo(f"call-{i}@10.0.0.1", "sip:100@example.com", "sip:200@example.com",
                                     "acme", f"tag{i}"), PLAN, T0, 3600, f"k{i}")
        if i % 1000 == 999:
            await asyncio.sleep(0)  # let the journal write, as ticks would
    assert store.flush_journal()
    # as `serve` does after start-up (and so for calls restored at a restart): the held calls leave
    # the collector's view. Calls admitted at run time are walked by every full collection (50-170 ms
    # at 100k calls, measured): a pause of the collector, not of the snapshot, left out here.
    gc.collect()
    gc.freeze()
    try:
        served = 0

        async def traffic(stop: asyncio.Event) -> None:
            nonlocal served
            while not stop.is_set():
                uid = f"call-{served}@10.0.0.1 tag{served}"
                await store.answer(uid, T0 + 1, 7200, f"k{served}")
                if served % 2:
                    await store.end(uid, T0 + 2, "bye")
                served += 1
                await asyncio.sleep(0.001)

        probe = LoopLagProbe(interval=0.002).start()
        runs: list[dict[str, Any]] = []
        for _attempt in range(3):
            await asyncio.sleep(0.1)
            probe.reset()
            stop = asyncio.Event()
            feeder = asyncio.create_task(traffic(stop))
            before = served
            wall0 = time.perf_counter()
            assert await store.compact()
            wall = time.perf_counter() - wall0
            stop.set()
            await feeder
            lag = probe.read()
            info = store.info()
            runs.append({"wall_ms": round(wall * 1000), "child_ms": round(info["last_snapshot_s"] * 1000),
                         "max_ms": lag["max_ms"], "busy_max_ms": lag["busy_max_ms"], "p99_ms": lag["p99_ms"],
                         "served": served - before})
            assert info["last_snapshot_calls"] == N
            assert lag["busy_max_ms"] < 25.0, runs  # the loop itself never works long: every attempt
            assert served - before > 10
            if lag["max_ms"] < 50.0:
                break
        probe.stop()
        print(f"\ncompactions of {N} held calls: {runs}")
        assert min(r["max_ms"] for r in runs) < 50.0, runs

        # what happened during the compactions is in the journal: a restart holds exactly the live state
        live = {u: (r.state, r.expires) for u, r in store._calls.items()}
        await store.close()
        back = EmbeddedStore(snapshot_path=path, snapshot_interval=0, clock=lambda: T0 + 3)
        await back.start()
        try:
            assert {u: (r.state, r.expires) for u, r in back._calls.items()} == live
        finally:
            await back.close()
    finally:
        gc.unfreeze()


async def test_probe_sees_a_stall_of_our_own_making() -> None:
    """The probe is not blind: 60 ms of work on the loop shows in both the wall stall and the busy time."""
    probe = LoopLagProbe(interval=0.002).start(register=True)
    assert looplag.current() is probe
    await asyncio.sleep(0.02)
    probe.reset()
    end = time.thread_time() + 0.06
    while time.thread_time() < end:  # CPU work on the loop thread, as an in-loop snapshot would do
        pass
    await asyncio.sleep(0.01)
    figures = probe.read()
    probe.stop()
    assert figures["max_ms"] >= 50.0 and figures["busy_max_ms"] >= 50.0, figures
    assert figures["samples"] >= 2 and not probe.running and looplag.current() is None
