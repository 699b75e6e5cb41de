"""The embedded store's durability costs: loop stalls during snapshots, and journaling per operation.

    python bench/bench_embedded.py [--calls 100000] [--rounds 5]

1. Stall: N calls held (built through the store API, then frozen out of the collector as
   `serve` does after start-up), a light stream of answers/ends, and a loop-lag probe (1 ms
   timer). For each round it measures the longest loop stall (`max_ms`, wall clock) and the
   most CPU the loop thread used between two probe firings (`busy_max_ms`) during
   (a) the previous design's snapshot: dump of every call + orjson + fsync on the loop
       (the code of `write_snapshot` before the journal, copied here), and
   (b) a compaction: journal rotation on the loop, fold + write + fsync in a child process.
   The target is a longest stall <= 10 ms at 100k calls with default settings.
2. Per-operation cost of journaling: reserve / answer / end through the store API with and
   without a journal, a loop iteration every 64 operations (one pipelined batch), the
   minimum over repeats (the machine is shared, the minimum is the least disturbed).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from policy.looplag import LoopLagProbe  # noqa: E402
from policy.store.base import CallInfo, CallRecord, PlanEntry  # noqa: E402
from policy.store.embedded import EmbeddedStore  # noqa: E402

T0 = 1_800_000_000.0
PLAN = [PlanEntry("total", None, None, False, "count-all"), PlanEntry("account", "acme", 1_000_000, False, "cap"),
        PlanEntry("user", "sip:100@example.com", None, False, "user")]


def info(i: int, tag: str = "c") -> CallInfo:
    """A realistic call."""
    return CallInfo(f"{tag}{i}-a84b4c76e66710@10.0.0.1", "sip:100@example.com", "sip:200@example.com", "acme",
                    f"as{i:08d}")


def old_snapshot(store: EmbeddedStore, path: Path) -> None:
    """The previous design's periodic snapshot, as it ran on the loop (version 1, objects per call)."""
    doc = {"version": 1, "stats": {"processed_dialogs": 0, "expired_dialogs": 0, "failed_dialogs": 0},
           "calls": [r.to_json() for r in store._calls.values()]}
    tmp = path.with_name(path.name + ".old.tmp")
    with open(tmp, "wb") as fh:
        fh.write(orjson.dumps(doc))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path.with_name(path.name + ".old"))


async def stalls(n: int, rounds: int) -> None:
    """Part 1."""
    d = Path(tempfile.mkdtemp(prefix="bench-embedded-"))
    store = EmbeddedStore(snapshot_path=d / "snapshot.json", snapshot_interval=0, clock=lambda: T0)
    await store.start()
    t = time.perf_counter()
    for i in range(n):
        await store.reserve(info(i), PLAN, T0, 3600, f"k{i}")
        if i % 64 == 63:
            await asyncio.sleep(0)
    store.flush_journal()
    print(f"{n} calls held (built in {time.perf_counter() - t:.1f} s, journal "
          f"{store.info()['journal_bytes'] / 1e6:.1f} MB)")
    gc.collect()
    gc.freeze()
    served = 0
    stop = asyncio.Event()

    async def traffic() -> None:
        nonlocal served
        while not stop.is_set():
            uid = info(served).uid
            await store.answer(uid, T0 + 1, 7200, f"k{served}")
            if served % 2:
                await store.end(uid, T0 + 2, "bye")
            served += 1
            await asyncio.sleep(0.001)

    feeder = asyncio.create_task(traffic())
    probe = LoopLagProbe(interval=0.001).start()
    await asyncio.sleep(0.5)
    rows: dict[str, list[dict[str, Any]]] = {"idle (1 s, noise floor)": [], "old in-loop snapshot": [],
                                             "compaction (child process)": []}
    for _ in range(rounds):
        probe.reset()
        await asyncio.sleep(1.0)
        rows["idle (1 s, noise floor)"].append(probe.read())
        probe.reset()
        t = time.perf_counter()
        old_snapshot(store, d / "snapshot.json")
        await asyncio.sleep(0.05)
        r = probe.read()
        r["wall_ms"] = (time.perf_counter() - t) * 1000
        rows["old in-loop snapshot"].append(r)
        await asyncio.sleep(0.2)
        probe.reset()
        t = time.perf_counter()
        assert await store.compact()
        await asyncio.sleep(0.05)
        r = probe.read()
        r["wall_ms"] = (time.perf_counter() - t) * 1000
        r["child_ms"] = store.info()["last_snapshot_s"] * 1000
        rows["compaction (child process)"].append(r)
    stop.set()
    await feeder
    probe.stop()
    print(f"\nloop stalls with {n} held calls, {rounds} rounds (ms; max over rounds, median in brackets):")
    for name, rs in rows.items():
        def col(key: str, rs: list[dict[str, Any]] = rs) -> str:
            vals = [float(r[key]) for r in rs if key in r]
            return f"{max(vals):8.1f} [{statistics.median(vals):6.1f}]" if vals else " " * 17

        print(f"  {name:28} longest stall {col('max_ms')}  loop busy {col('busy_max_ms')}  "
              f"p99 {col('p99_ms')}  duration {col('wall_ms')}  child {col('child_ms')}")
    print(f"  ({served} answers/ends served meanwhile)")
    await store.close()
    gc.unfreeze()


async def per_op(ops: int, repeats: int) -> None:
    """Part 2."""
    async def run(store: EmbeddedStore, tag: str) -> tuple[float, float, float]:
        calls = [info(i, tag) for i in range(ops)]
        t0 = time.perf_counter()
        for i, c in enumerate(calls):
            await store.reserve(c, PLAN, T0, 300, "k")
            if i % 64 == 63:
                await asyncio.sleep(0)
        t1 = time.perf_counter()
        for i, c in enumerate(calls):
            await store.answer(c.uid, T0 + 1, 3600, "k")
            if i % 64 == 63:
                await asyncio.sleep(0)
        t2 = time.perf_counter()
        for i, c in enumerate(calls):
            await store.end(c.uid, T0 + 2, "bye", "k")
            if i % 64 == 63:
                await asyncio.sleep(0)
        t3 = time.perf_counter()
        return (t1 - t0) / ops * 1e6, (t2 - t1) / ops * 1e6, (t3 - t2) / ops * 1e6

    best: dict[str, list[float]] = {"memory": [1e9] * 3, "journal": [1e9] * 3}
    gc_was = gc.isenabled()
    gc.disable()
    for rep in range(repeats):
        plain = EmbeddedStore()
        await plain.start()
        d = Path(tempfile.mkdtemp(prefix="bench-embedded-"))
        journaled = EmbeddedStore(snapshot_path=d / "snapshot.json", snapshot_interval=0, clock=lambda: T0)
        await journaled.start()
        for name, s in (("memory", plain), ("journal", journaled)) if rep % 2 == 0 else \
                (("journal", journaled), ("memory", plain)):
            got = await run(s, f"{name}{rep}-")
            best[name] = [min(a, b) for a, b in zip(best[name], got, strict=True)]
        await journaled.close()
        await plain.close()
    if gc_was:
        gc.enable()
    m, j = best["memory"], best["journal"]
    print(f"\nper operation (µs, best of {repeats} x {ops}, a loop iteration per 64 operations):")
    print("                reserve  answer     end   check+answer+end")
    print(f"  memory only   {m[0]:7.2f} {m[1]:7.2f} {m[2]:7.2f}   {sum(m):7.2f}")
    print(f"  with journal  {j[0]:7.2f} {j[1]:7.2f} {j[2]:7.2f}   {sum(j):7.2f}")
    print(f"  journaling    {j[0] - m[0]:7.2f} {j[1] - m[1]:7.2f} {j[2] - m[2]:7.2f}   {sum(j) - sum(m):7.2f}")


def journal_alone(repeats: int) -> None:
    """Part 3: the journal's own work per operation (encode + append + its share of one write per 64)."""
    import timeit

    from policy.store.journal import Journal

    d = Path(tempfile.mkdtemp(prefix="bench-embedded-"))
    j = Journal(d / "snapshot.json", 1)
    j.open()
    rec = CallRecord(
        "c1-a84b4c76e66710@10.0.0.1", "sip:100@example.com", "sip:200@example.com", "acme", "early", T0, None,
        300.0, T0 + 300, [("total", None), ("account", "acme"), ("user", "sip:100@example.com")], "as00000001",
        "", "k1", {})
    uid = rec.uid

    class NoLoop:  # the flush is driven below, once per 64 lines, as a loop iteration would
        def call_soon(self, _f: Any) -> None:
            pass

    j._loop = NoLoop()  # type: ignore[assignment]

    def batch(line: Any) -> None:
        for _ in range(64):
            line()
        j._scheduled = False
        j.flush()

    print("\njournal alone (µs per line: encode, append, 1/64 of a write):")
    for name, line in (("reserve", lambda: j.reserve(rec)), ("answer", lambda: j.answer(uid, rec)),
                       ("end", lambda: j.end(uid, "bye"))):
        n = 64 * 2000
        best = min(timeit.repeat(lambda line=line: batch(line), number=n // 64, repeat=repeats)) / n * 1e6
        print(f"  {name:8} {best:6.2f}")
    j.close()


def main() -> None:
    """Run both parts on uvloop."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ops", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    from policy import logs

    logs.configure("warning", "console")
    import uvloop

    journal_alone(args.repeats)
    uvloop.run(per_op(args.ops, args.repeats))
    uvloop.run(stalls(args.calls, args.rounds))


if __name__ == "__main__":
    main()
