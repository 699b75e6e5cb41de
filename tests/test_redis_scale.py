"""The Redis store at scale, on a real redis-server: 100k held calls created in bulk through the
store API (pipelined, not one by one over a socket), then every read the service offers stays
O(1) or paged, and no script runs 5 ms or more inside Redis (SLOWLOG); expiries are reported
exactly once across instances.
"""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from collections.abc import Sequence
from typing import Any

import pytest
import redis.asyncio as aredis

from policy.store.base import CallInfo, PlanEntry
from policy.store.redis import RedisStore
from tests.helpers import RedisServer

pytestmark = pytest.mark.redis

T0 = 1_800_000_000.0
HELD = 100_000
ACCOUNTS = 20_000  # 5 calls each: under the cap of 10
CHUNK = 5_000


def plan(i: int) -> list[PlanEntry]:
    """The shipped rules' plan for a local call: 5 keys, two of them limited."""
    return [PlanEntry("total", None, None, False, "count-all"),
            PlanEntry("type", "local", None, False, "count-all"),
            PlanEntry("local", None, None, False, "count-local"),
            PlanEntry("account", f"acct{i % ACCOUNTS}", 10, False, "account-cap"),
            PlanEntry("user", f"u{i}@bulk.example", 4, False, "user-cap")]


def call(i: int, node: str = "kam1") -> CallInfo:
    return CallInfo(f"bulk-{i}", f"sip:u{i}@bulk.example", "sip:6002@bulk.example", f"acct{i % ACCOUNTS}",
                    f"ft{i}", node)


async def bulk(store: RedisStore, ids: Sequence[int], timeout: float) -> None:
    """Reserve these calls through the store API, CHUNK at a time (each chunk one burst; the
    cyclic GC is paused meanwhile: thousands of tasks per burst made it this test's main cost)."""
    gc.disable()
    try:
        for start in range(0, len(ids), CHUNK):
            res = await asyncio.gather(*(store.reserve(call(i), plan(i), T0, timeout, f"t{i}")
                                         for i in ids[start:start + CHUNK]))
            assert all(r.admitted for r in res)
    finally:
        gc.enable()


async def timed(coro: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    res = await coro
    return res, time.perf_counter() - t0


def slow_entries(entries: list[dict[str, Any]]) -> list[tuple[int, bytes]]:
    """SLOWLOG entries as (microseconds, the command's start)."""
    return [(int(e["duration"]), bytes(e["command"])[:100]) for e in entries]


def cpu_ns(server: RedisServer) -> int:
    """Nanoseconds the redis-server process has spent on a CPU (not waiting for one)."""
    assert server.proc is not None
    with open(f"/proc/{server.proc.pid}/schedstat") as fh:
        return int(fh.read().split()[0])


async def test_100k_held_calls_reads_stay_fast_and_slowlog_stays_empty(private_redis: RedisServer) -> None:
    """100k held calls (the shipped rules' 5-key plan), then every whole-profile size, the stats,
    a page of every listing: each O(1) or bounded: SLOWLOG (5 ms) stays empty for them, and no
    script (reads, reserves, sweeps) costs Redis 5 ms of CPU.

    This machine (a shared 2-core VM) stalls Redis itself now and then, for 2-4 ms and up to
    ~100 ms (measured: `redis-cli --intrinsic-latency` worst 2.3 ms even at nice -15; single
    ZADD/ZREM commands logged at 4-90 ms under load; Redis waits for a CPU ~40 % of its run
    time). So SLOWLOG, which is wall time, must be empty for the reads in one of five tries (an
    O(n) walk at 100k is slow every time: the old `profile size total` ran 2.15 s), and the
    bounds on every script are asserted on Redis's own CPU time (/proc/<pid>/schedstat)."""
    raw = aredis.Redis(host="127.0.0.1", port=private_redis.port)
    await raw.config_set("slowlog-log-slower-than", 5000)  # microseconds
    await raw.config_set("slowlog-max-len", 10_000)
    await raw.slowlog_reset()
    s = RedisStore(private_redis.url, timeout=10.0)  # bulk creation: deadlines are not the point
    await s.start()
    try:
        t0, c0 = time.perf_counter(), cpu_ns(private_redis)
        await bulk(s, range(HELD), 300)
        created, bulk_cpu = time.perf_counter() - t0, (cpu_ns(private_redis) - c0) / HELD
        bulk_slow = await raw.slowlog_get(10_000)
        print(f"\n100k held calls created in {created:.1f} s (Redis CPU {bulk_cpu / 1e3:.1f} us per reserve); "
              f"SLOWLOG entries meanwhile (stalls): {len(bulk_slow)}")
        assert bulk_cpu < 1e6  # under 1 ms of Redis CPU per reserve, on average, at 100k calls

        def reads() -> dict[str, Any]:
            return {
                "profile_size total": s.profile_size("total", None, T0),
                "profile_size account": s.profile_size("account", None, T0),
                "profile_size user": s.profile_size("user", None, T0),
                "profile_size type": s.profile_size("type", None, T0),
                "profile_size local": s.profile_size("local", None, T0),
                "profile_size account=acct7": s.profile_size("account", "acct7", T0),
                "stats": s.stats(T0),
                "profile_list total (page)": s.profile_list("total", None, T0, "", 1000),
                "profile_list account (page)": s.profile_list("account", None, T0, "", 1000),
                "profile_list account=acct7": s.profile_list("account", "acct7", T0),
                "profile_values user (page)": s.profile_values("user", T0, "", 1000),
                "node_calls kam1 (page)": s.node_calls("kam1", T0, "", 1000),
                "sweep (nothing ended)": s.sweep(T0),
            }

        for attempt in range(5):
            await raw.slowlog_reset()
            got = {}
            for name, coro in reads().items():
                c1 = cpu_ns(private_redis)
                got[name] = (*(await timed(coro)), (cpu_ns(private_redis) - c1) / 1e6)
            read_slow = await raw.slowlog_get(100)
            if not read_slow:
                break
            print(f"  reads, try {attempt + 1}: SLOWLOG {slow_entries(read_slow)}")
        for name, (_, secs, cpu_ms) in got.items():
            print(f"  {name:32s} {secs * 1e3:8.2f} ms, Redis CPU {cpu_ms:6.2f} ms")
        assert not read_slow, slow_entries(read_slow)
        for name, (_, _, cpu_ms) in got.items():
            # a page reads 1000 records (each its own command); everything else is O(1)
            assert cpu_ms < (20.0 if "(page)" in name else 5.0), (name, cpu_ms)
        sizes = {k: v for k, (v, _, _) in got.items() if k.startswith("profile_size")}
        assert sizes == {"profile_size total": HELD, "profile_size account": HELD, "profile_size user": HELD,
                         "profile_size type": HELD, "profile_size local": HELD,
                         "profile_size account=acct7": 5}
        stats = got["stats"][0]
        assert (stats.early_dialogs, stats.processed_dialogs) == (HELD, HELD)
        for name in ("profile_list total (page)", "profile_list account (page)", "node_calls kam1 (page)",
                     "profile_values user (page)"):
            page = got[name][0]
            assert len(page.items) == 1000 and page.cursor, name
        # everything expires: sweeps drop 100k calls in bounded scripts
        await raw.slowlog_reset()
        t1 = time.perf_counter()
        reported = 0
        worst = 0.0
        scripts = 0
        while True:
            before = int((await raw.info("commandstats"))["cmdstat_evalsha"]["calls"])
            c1 = cpu_ns(private_redis)
            batch = await s.sweep(T0 + 301)
            spent = cpu_ns(private_redis) - c1
            n = int((await raw.info("commandstats"))["cmdstat_evalsha"]["calls"]) - before
            scripts += n
            worst = max(worst, spent / max(n, 1) / 1e6)
            reported += len(batch)
            if not batch:
                break
        sweep_slow = await raw.slowlog_get(10_000)
        print(f"  swept {reported} expired calls in {time.perf_counter() - t1:.1f} s, {scripts} sweep scripts, "
              f"Redis CPU per script (worst sweep call's mean) {worst:.2f} ms; SLOWLOG entries (stalls) "
              f"{len(sweep_slow)}, longest {max((d for d, _ in slow_entries(sweep_slow)), default=0)} us")
        assert reported == HELD
        assert await s.profile_size("total", None, T0 + 301) == 0
        assert worst < 5.0
    finally:
        await s.close()
        await raw.aclose()


async def test_sweeps_report_every_expiry_exactly_once_across_two_instances(redis_url: str) -> None:
    """5,000 leases end; one instance's check drops some lazily first, then both instances sweep
    at once: every expired call is reported by exactly one sweep, and counted once."""
    prefix = f"s{uuid.uuid4().hex[:6]}"
    a = RedisStore(redis_url, prefix=prefix, timeout=5.0)
    b = RedisStore(redis_url, prefix=prefix, timeout=5.0)
    await a.start()
    await b.start()
    try:
        await bulk(a, range(5000), 10)
        full = PlanEntry("account", "acct0", 0, False, "account-cap")
        r = await b.reserve(CallInfo("probe", "", "", "acct0"), [full], T0 + 10, 300, "p")
        assert not r.admitted  # (its check dropped ended leases first: counts were exact)
        got_a, got_b = await asyncio.gather(a.sweep(T0 + 10), b.sweep(T0 + 10))
        while True:
            more = await a.sweep(T0 + 10) + await b.sweep(T0 + 10)
            if not more:
                break
            got_a += more
        ids = [rec.uid for rec in got_a + got_b]
        assert len(ids) == 5000 and len(set(ids)) == 5000
        st = await a.stats(T0 + 10)
        assert (st.expired_dialogs, st.early_dialogs, st.processed_dialogs) == (5000, 0, 5000)
        assert await b.profile_size("account", None, T0 + 10) == 0
    finally:
        await a.close()
        await b.close()
