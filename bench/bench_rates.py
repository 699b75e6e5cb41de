"""What a call rate costs: Redis time per reserve.lua with and without rates in the plan, and
the embedded store's reserve.

    .venv/bin/python bench/bench_rates.py [--calls 20000]

A private `redis-server` on a free loopback port; the shipped rules' plan for a domestic call
of an account (five profile keys, two limits), reserved through `RedisStore` 64 at a time,
every call new and admitted (each its own account and user, so no cap is reached). Redis's own time per EVALSHA comes from `INFO commandstats`
(`cmdstat_evalsha`: calls, usec) before and after each phase; the phases alternate (no rate,
one rate, two rates, ...) three times and the median is reported, so a busy machine shifts
them alike. Rates (never refusing): one of 1,000 buckets (a per-account CPS with 1,000 busy
accounts) and, for two, also a platform-wide one (one bucket for every call).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from policy.rules import load_rules  # noqa: E402
from policy.store.base import CallInfo, RateEntry  # noqa: E402
from policy.store.embedded import EmbeddedStore  # noqa: E402
from tests.helpers import RedisServer  # noqa: E402

ACCOUNTS = 1000


def evalsha_stats(port: int) -> tuple[int, int]:
    """(calls, usec) of EVALSHA so far."""
    text = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), "INFO", "commandstats"],
                          capture_output=True, text=True, timeout=30, check=True).stdout
    m = re.search(r"cmdstat_evalsha:calls=(\d+),usec=(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def plan_for(i: int) -> tuple[CallInfo, list[object], str]:
    account = f"acct{i}"  # every call its own account and user: no cap is ever reached
    req = {"call_id": f"c{i}", "from": f"sip:u{i}@bench.example", "from_user": f"u{i}",
           "from_domain": "bench.example", "to": "sip:0301234@bench.example", "to_user": "0301234",
           "to_domain": "bench.example", "account": account}
    return CallInfo(req["call_id"], req["from"], req["to"], account), RULES.evaluate(req).plan, f"a{i % ACCOUNTS}"


RULES = load_rules(ROOT / "rules")


def rates_for(account: str, n: int) -> list[RateEntry]:
    out = []
    if n >= 1:
        out.append(RateEntry("account-cps", account, 1e6, 1_000_000))  # never refuses: every call admitted
    if n >= 2:
        out.append(RateEntry("platform-cps", None, 1e6, 1_000_000))
    return out


async def redis_phase(store: object, port: int, start: int, calls: int, rates: int) -> float:
    """Redis usec per reserve.lua over `calls` new calls."""
    from policy.store.redis import RedisStore

    assert isinstance(store, RedisStore)
    before = evalsha_stats(port)
    now = time.time()
    for base in range(start, start + calls, 64):
        batch = []
        for i in range(base, min(base + 64, start + calls)):
            call, plan, account = plan_for(i)
            batch.append(store.reserve(call, plan, now, 300.0, "t", rates=rates_for(account, rates)))  # type: ignore[arg-type]
        results = await asyncio.gather(*batch)
        assert all(r.admitted for r in results)
    after = evalsha_stats(port)
    return (after[1] - before[1]) / max(1, after[0] - before[0])


async def embedded_phase(start: int, calls: int, rates: int) -> float:
    """Microseconds per embedded reserve."""
    store = EmbeddedStore()
    await store.start()
    work = [plan_for(i) for i in range(start, start + calls)]
    now = time.time()
    t0 = time.perf_counter()
    for call, plan, account in work:
        await store.reserve(call, plan, now, 300.0, "t", rates=rates_for(account, rates))  # type: ignore[arg-type]
    took = time.perf_counter() - t0
    await store.close()
    return took / calls * 1e6


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20_000, help="reserves per phase")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from policy.store.redis import RedisStore

    server = RedisServer().start()
    try:
        store = RedisStore(server.url, prefix="br", timeout=2.0)
        await store.start()
        redis: dict[int, list[float]] = {0: [], 1: [], 2: []}
        emb: dict[int, list[float]] = {0: [], 1: [], 2: []}
        start = 0
        for _ in range(args.rounds):
            for n in (0, 1, 2):
                redis[n].append(await redis_phase(store, server.port, start, args.calls, n))
                emb[n].append(await embedded_phase(start, args.calls, n))
                start += args.calls
        await store.close()
    finally:
        server.stop()
    print(f"reserve of the shipped rules' plan (5 keys, 2 limits), {args.calls:,} new calls per phase, "
          f"min / median of {args.rounds}:")
    for n, label in ((0, "no rate"), (1, "one rate (per account)"), (2, "two rates (+ platform-wide)")):
        print(f"  {label:30s} Redis {min(redis[n]):6.2f} / {statistics.median(redis[n]):6.2f} us per reserve.lua   "
              f"embedded {min(emb[n]):5.2f} / {statistics.median(emb[n]):5.2f} us per reserve")


if __name__ == "__main__":
    asyncio.run(main())
