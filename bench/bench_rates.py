"""What a call rate costs in the stores: Redis's own time per reserve.lua with and without rates
in the plan, and the embedded store's reserve.

    .venv/bin/python bench/bench_rates.py [--rounds 5] [--requests 40000]

Redis: a private `redis-server` on a free loopback port runs `redis-benchmark` (20 clients,
pipeline 16) sending EVALSHA of the store's reserve script with the keys and arguments
`RedisStore.reserve_command` builds for the shipped rules' plan of a domestic call (five
profile keys, two limits), Call-ID, user and account random per call (`__rand_int__`), so every
call is new and admitted. Redis's time per call is `cmdstat_evalsha` (calls, usec) of `INFO
commandstats` around each run. Variants (the rates never refuse): no rate; one bucket every call
shares (a platform-wide rate: read and rewritten); one bucket per random value (a per-account
rate: created every call); both. Variants alternate, `--rounds` times; min and median.

Embedded: the same plan reserved in a loop (µs per reserve, the loop included), without a rate,
with one and with two.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from policy.rules import load_rules  # noqa: E402
from policy.store.base import CallInfo, PlanEntry, RateEntry  # noqa: E402
from policy.store.embedded import EmbeddedStore  # noqa: E402
from policy.store.redis.store import RedisStore, script_source  # noqa: E402
from tests.helpers import RedisServer  # noqa: E402

REQ = {"call_id": "rb-__rand_int__", "from": "sip:u__rand_int__@bench.example", "from_user": "u__rand_int__",
       "from_domain": "bench.example", "to": "sip:0301234@bench.example", "to_user": "0301234",
       "to_domain": "bench.example", "account": "acct__rand_int__"}
BIG = 1_000_000  # rates that never refuse: every call is admitted and takes a token
VARIANTS: dict[str, list[RateEntry]] = {
    "no rate": [],
    "1 rate, shared bucket": [RateEntry("platform-cps", None, float(BIG), BIG)],
    "1 rate, new bucket": [RateEntry("account-cps", "acct__rand_int__", float(BIG), BIG)],
    "2 rates (new + shared)": [RateEntry("account-cps", "acct__rand_int__", float(BIG), BIG),
                               RateEntry("platform-cps", None, float(BIG), BIG)],
}


def cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args], capture_output=True,
                          text=True, timeout=60, check=True).stdout.strip()


def evalsha(port: int) -> tuple[int, int]:
    """(calls, usec) of EVALSHA so far."""
    m = re.search(r"cmdstat_evalsha:calls=(\d+),usec=(\d+)", cli(port, "INFO", "commandstats"))
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def redis_runs(rounds: int, requests: int) -> dict[str, list[float]]:
    """Redis µs per reserve.lua for each variant, `rounds` times."""
    server = RedisServer().start()
    try:
        store = RedisStore(server.url, prefix="rb")
        plan = load_rules(ROOT / "rules").evaluate(dict(REQ)).plan
        call = CallInfo(REQ["call_id"], REQ["from"], REQ["to"], REQ["account"])
        sha = cli(server.port, "SCRIPT", "LOAD", script_source("reserve"))
        out: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(rounds):
            for name, rates in VARIANTS.items():
                keys, args = store.reserve_command(call, plan, time.time(), 300.0, rates=rates)
                before = evalsha(server.port)
                subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(server.port), "-n", str(requests),
                                "-c", "20", "-P", "16", "-r", "100000000", "-q", "EVALSHA", sha, str(len(keys)),
                                *keys, *(str(a) for a in args)], capture_output=True, timeout=600, check=True)
                after = evalsha(server.port)
                out[name].append((after[1] - before[1]) / max(1, after[0] - before[0]))
                cli(server.port, "FLUSHALL")
        return out
    finally:
        server.stop()


async def embedded_runs(rounds: int, calls: int) -> dict[str, list[float]]:
    """Embedded µs per reserve with 0, 1 and 2 rates."""
    plan = [PlanEntry("total", None, None, False, "count-all"), PlanEntry("type", "domestic", None, False, "count-all"),
            PlanEntry("domestic", None, None, False, "count-domestic"),
            PlanEntry("account", "acme", BIG, False, "account-cap"), PlanEntry("user", "u", BIG, False, "user-cap")]
    rates = {"no rate": [], "1 rate": [RateEntry("account-cps", "acme", float(BIG), BIG)],
             "2 rates": [RateEntry("account-cps", "acme", float(BIG), BIG),
                         RateEntry("platform-cps", None, float(BIG), BIG)]}
    out: dict[str, list[float]] = {name: [] for name in rates}
    for _ in range(rounds):
        for name, rs in rates.items():
            store = EmbeddedStore()
            await store.start()
            work = [CallInfo(f"c{i}", "sip:a@x", "sip:b@x", "acme") for i in range(calls)]
            now = time.time()
            t0 = time.perf_counter()
            for c in work:
                await store.reserve(c, plan, now, 300.0, "t", rates=rs)
            out[name].append((time.perf_counter() - t0) / calls * 1e6)
            await store.close()
    return out


def show(title: str, runs: dict[str, list[float]]) -> None:
    print(title)
    for name, values in runs.items():
        print(f"  {name:24s} {min(values):6.2f} / {statistics.median(values):6.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=40_000, help="EVALSHA per redis-benchmark run")
    ap.add_argument("--calls", type=int, default=50_000, help="embedded reserves per run")
    args = ap.parse_args()
    if shutil.which("redis-benchmark") and shutil.which("redis-server"):
        show(f"Redis µs per reserve.lua (shipped plan, 5 keys), min / median of {args.rounds}:",
             redis_runs(args.rounds, args.requests))
    else:
        print("Redis: skipped (redis-server or redis-benchmark not installed)")
    show(f"embedded µs per reserve (5 keys), min / median of {args.rounds}:",
         asyncio.run(embedded_runs(args.rounds, args.calls)))


if __name__ == "__main__":
    main()
