"""Redis store benchmark: `make bench-redis` runs the Redis part of `bench/bench.py`.

A private `redis-server` on a free loopback port, a background of held calls written through
the service, then (each figure the median of the runs, next to the baseline's):

- one `callpolicy serve --store redis://...` (unpinned): check+end pairs/s, closed loop
  8 connections x 64 pipelined, with Redis's own time per EVALSHA over the run;
- open loop at 1,000 and 2,000 pairs/s offered: check latency from the scheduled send;
- Redis time per script: a checks-only phase (every call new and admitted: reserve.lua) then
  an ends-only phase releasing the same calls (end.lua), reading `cmdstat_evalsha` (calls,
  usec) from `INFO commandstats` before and after each phase. Every script goes through
  EVALSHA, so the phases are what separates them; the service's own sweep and stats scripts
  (about two a second) fall into both phases and are reported as `other_calls`;
- two `callpolicy serve` on one port (`[listen] reuse_port = true`): pairs/s, how the kernel
  spread the connections, and whether this machine has the cores for two services, Redis
  and the generator at once.

- last, the outage phases (`bench/faults.py`): open-loop checks at 500/s with Redis up,
  SIGSTOPped, SIGKILLed, then restarted empty: latency against `store.timeout`, CPU per check
  against the up phase, the answers the rules give without the store, the loop's stalls.

`--redis-benchmark` adds `redis-benchmark` running the store's own reserve script (EVALSHA,
same keys and arguments as a bench check): what Redis alone does with it here.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))


def redis_cli(port: int, *args: str) -> str:
    """Run redis-cli against the private server."""
    out = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
                         capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.strip()


def script_stats(port: int) -> dict[str, tuple[int, int]]:
    """{command: (calls, usec)} for the script commands in INFO commandstats."""
    text = redis_cli(port, "INFO", "commandstats")
    out = {}
    for name in ("evalsha", "eval", "fcall"):
        m = re.search(rf"cmdstat_{name}:calls=(\d+),usec=(\d+)", text)
        out[name] = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    return out


def script_delta(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(calls, usec) of every script command between two script_stats()."""
    calls = sum(after[k][0] - before[k][0] for k in after)
    usec = sum(after[k][1] - before[k][1] for k in after)
    return calls, usec


def server_version(port: int) -> str:
    """redis_version of the private server."""
    m = re.search(r"redis_version:(\S+)", redis_cli(port, "INFO", "server"))
    return m.group(1) if m else "?"


def run_redis_benchmark(port: int, requests: int = 50_000, clients: int = 50, pipeline: int = 16) -> dict[str, Any]:
    """redis-benchmark EVALSHA of the store's reserve script with a bench check's keys and
    arguments (random call, account and user): (requests/s, Redis usec per call). Uses the
    store's internals (`reserve_command`, `_scripts`): skipped with a reason if they changed."""
    sys.path.insert(0, str(ROOT))
    from policy.rules import load_rules
    from policy.store.base import CallInfo
    from policy.store.redis import RedisStore

    store = RedisStore(f"redis://127.0.0.1:{port}/0", prefix="rb")
    req = {"call_id": "rb-__rand_int__", "from": "sip:u__rand_int__@bench.example",
           "from_user": "u__rand_int__", "from_domain": "bench.example",
           "to": "sip:6002@bench.example", "to_user": "6002", "to_domain": "bench.example",
           "account": "acct__rand_int__"}
    plan = load_rules(ROOT / "rules").evaluate(req).plan
    call = CallInfo(req["call_id"], req["from"], req["to"], req["account"])
    keys, args, _, _ = store.reserve_command(call, plan, time.time(), 300.0)
    script = store._scripts["reserve"].script
    text = script.decode() if isinstance(script, bytes) else str(script)
    sha = redis_cli(port, "SCRIPT", "LOAD", text)
    before = script_stats(port)
    out = subprocess.run(
        ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-n", str(requests), "-c", str(clients),
         "-P", str(pipeline), "-r", "100000000", "--csv", "EVALSHA", sha, str(len(keys)), *keys, *args],
        capture_output=True, text=True, timeout=300, check=True).stdout
    calls, usec = script_delta(before, script_stats(port))
    rps = float("nan")
    for line in out.splitlines():  # "test","rps",... (the test name has commas)
        cells = line.strip().strip('"').rsplit('","', 7)
        if len(cells) == 8 and cells[0].upper().startswith("EVALSHA"):
            rps = float(cells[1])
    subprocess.run(["redis-cli", "-p", str(port), "EVAL",
                    "for _, k in ipairs(redis.call('KEYS', '{rb}*')) do redis.call('DEL', k) end", "0"],
                   capture_output=True, timeout=60)
    return {"requests_per_s": rps, "usec_per_call": usec / calls if calls else float("nan"), "requests": requests,
            "clients": clients, "pipeline": pipeline}


def main(argv: list[str] | None = None) -> int:
    """`make bench-redis`: bench.py's Redis section."""
    import bench  # type: ignore[import-not-found]

    return int(bench.main(["--only", "redis", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    raise SystemExit(main())
