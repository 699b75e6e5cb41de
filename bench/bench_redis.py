"""Benchmark callpolicy on the Redis store, next to what Redis itself can do here.

Starts a private `redis-server` on a free loopback port, then in one run:

1. `redis-benchmark` calling the very reserve script the store uses (SCRIPT LOAD, then
   EVALSHA with the same 13 keys and arguments the service sends for a bench check,
   random call/account/user per request): Redis's own ceiling for reserves here.
2. One `callpolicy serve --store redis://...`: check+end pairs/s (closed loop, pipelined
   over TCP), then checks at a fixed offered rate (open loop) for p50/p99.
3. Two `callpolicy serve` processes (two ports) on the same Redis, driven together.

Targets (issue 3): >= 10,000 pairs/s, p99 < 2 ms at 2,000 checks/s, service checks/s >= 50 %
of redis-benchmark's EVALSHA rate. Everything shares the machine's cores (Redis, the
service(s), the load generator, redis-benchmark), so run it a few times.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

try:  # run as a script (bench/ is on sys.path) or as a module (python -m bench.bench_redis)
    from bench import closed_loop, open_loop, pair_messages, pct, start_service  # type: ignore[attr-defined]
except ImportError:
    from bench.bench import closed_loop, open_loop, pair_messages, pct, start_service
from policy.rules import load_rules  # noqa: E402
from policy.store.base import CallInfo  # noqa: E402
from policy.store.redis import RedisStore  # noqa: E402
from tests.helpers import LineClient, RedisServer  # noqa: E402


def redis_cli(port: int, *args: str) -> str:
    """Run redis-cli against the private server."""
    out = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
                         capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.strip()


def evalsha_usec(port: int) -> float:
    """Redis's own microseconds per EVALSHA since the last CONFIG RESETSTAT."""
    m = re.search(r"cmdstat_evalsha:calls=(\d+),usec=(\d+)", redis_cli(port, "INFO", "commandstats"))
    return int(m.group(2)) / int(m.group(1)) if m and int(m.group(1)) else float("nan")


def reserve_argv(url: str) -> tuple[str, list[str]]:
    """The reserve script's text and an EVALSHA argv like the service's for a bench check,
    with redis-benchmark's __rand_int__ placeholders for the call, account and user."""
    store = RedisStore(url, prefix="rb")
    ruleset = load_rules(ROOT / "rules")
    req = {"call_id": "rb-__rand_int__", "from": "sip:u__rand_int__@bench.example",
           "from_user": "u__rand_int__", "from_domain": "bench.example",
           "to": "sip:6002@bench.example", "to_user": "6002", "to_domain": "bench.example",
           "account": "acct__rand_int__"}
    plan = ruleset.evaluate(req).plan
    call = CallInfo(req["call_id"], req["from"], req["to"], req["account"])
    keys, args, _, _ = store.reserve_command(call, plan, time.time(), 300.0)
    script = store._scripts["reserve"].script  # the exact text the store registers
    text = script.decode() if isinstance(script, bytes) else str(script)
    return text, [str(len(keys)), *keys, *args]


def run_redis_benchmark(port: int, requests: int, clients: int, pipeline: int) -> tuple[float, float]:
    """redis-benchmark EVALSHA of reserve.lua: (requests/s, Redis usec per call)."""
    text, argv = reserve_argv(f"redis://127.0.0.1:{port}/0")
    sha = redis_cli(port, "SCRIPT", "LOAD", text)
    redis_cli(port, "CONFIG", "RESETSTAT")
    out = subprocess.run(
        ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-n", str(requests), "-c", str(clients),
         "-P", str(pipeline), "-r", "100000000", "--csv", "EVALSHA", sha, *argv],
        capture_output=True, text=True, timeout=300, check=True).stdout
    rps = float("nan")
    for line in out.splitlines():  # "test","rps","avg_latency_ms",... (the test name has commas)
        cells = line.strip().strip('"').rsplit('","', 7)
        if len(cells) == 8 and cells[0].upper().startswith("EVALSHA"):
            rps = float(cells[1])
    usec = evalsha_usec(port)
    redis_cli(port, "FLUSHALL")
    return rps, usec


def store_errors(ports: list[int]) -> int:
    """Checks the services answered from the store-error policy so far (Redis too slow)."""
    total = 0
    for port in ports:
        c = LineClient(port=port)
        try:
            d = c.call("stats")["decisions"]
        finally:
            c.close()
        total += int(d.get("store_allow", 0)) + int(d.get("store_deny", 0))
    return total


def connector(ports: list[int]) -> Callable[[Callable[[], asyncio.Protocol]], Any]:
    """A connect function for closed_loop/open_loop that spreads connections over `ports`."""
    n = [0]

    def connect(factory: Callable[[], asyncio.Protocol]) -> Any:
        port = ports[n[0] % len(ports)]
        n[0] += 1
        return asyncio.get_running_loop().create_connection(factory, "127.0.0.1", port)

    return connect


def split(msgs: list[bytes], conns: int) -> list[list[bytes]]:
    """check+end pairs split over connections, pairs kept together."""
    per = len(msgs) // conns // 2 * 2
    return [msgs[i * per:(i + 1) * per] for i in range(conns)]


async def closed(ports: list[int], pairs: int, conns: int, window: int, tag: str) -> tuple[float, list[float]]:
    """check+end pairs/s through the given services."""
    secs, n, lat = await closed_loop(connector(ports), split(list(pair_messages(pairs, tag)), conns), window)
    return n / 2 / secs, lat


async def checks_only(port: int, n: int, conns: int, window: int, tag: str) -> tuple[float, list[float]]:
    """Checks alone, each a new call that is admitted and held (what redis-benchmark's reserves
    are), then their ends, untimed: (checks/s, latencies of the checks)."""
    msgs = list(pair_messages(n, tag, accounts=max(1, n // 5)))  # <= 5 calls per account: room
    checks = msgs[0::2]
    per = len(checks) // conns
    secs, done, lat = await closed_loop(connector([port]), [checks[i * per:(i + 1) * per] for i in range(conns)],
                                        window)
    await closed_loop(connector([port]), [msgs[1::2]], window)
    return done / secs, lat


async def open_checks(port: int, rate: float, seconds: float) -> tuple[float, list[float]]:
    """Checks at a fixed offered rate (then their ends): (achieved checks/s, latencies)."""
    msgs = list(pair_messages(int(rate * seconds), "open"))
    secs, lat = await open_loop(connector([port]), msgs[0::2], rate)
    await closed_loop(connector([port]), [msgs[1::2]], 64)
    return len(lat) / secs, lat


def main(argv: list[str] | None = None) -> int:
    """Run everything and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=60_000, help="check+end pairs per closed-loop run")
    ap.add_argument("--conns", type=int, default=8)
    ap.add_argument("--window", type=int, default=64, help="requests outstanding per connection")
    ap.add_argument("--rate", type=float, default=2000.0, help="offered checks/s for the open loop")
    ap.add_argument("--seconds", type=float, default=5.0, help="open-loop duration")
    ap.add_argument("--rb-requests", type=int, default=200_000, help="redis-benchmark requests")
    ap.add_argument("--rb-clients", type=int, default=50)
    ap.add_argument("--rb-pipeline", type=int, default=16)
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="one-service phases: do not pin the service to the last CPU and Redis plus "
                         "this load generator to the others (two services are never pinned)")
    args = ap.parse_args(argv)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run

    redis = RedisServer().start()
    procs: list[subprocess.Popen[bytes]] = []
    print(f"callpolicy redis bench: cores={os.cpu_count()} pairs={args.pairs} conns={args.conns}x{args.window} "
          f"python={sys.version.split()[0]} {redis_cli(redis.port, 'INFO', 'server').splitlines()[1]}",
          flush=True)
    try:
        rb_rps, rb_usec = run_redis_benchmark(redis.port, args.rb_requests, args.rb_clients, args.rb_pipeline)
        print(f"{'redis-benchmark EVALSHA reserve.lua':<40} {rb_rps:>10,.0f} calls/s  "
              f"(-c {args.rb_clients} -P {args.rb_pipeline}; Redis {rb_usec:.1f} us/call)", flush=True)

        p0, port0, _ = start_service("embedded")
        procs.append(p0)
        runner(closed([port0], 2000, args.conns, args.window, "warm"))
        base, lat0 = runner(closed([port0], args.pairs, args.conns, args.window, "emb"))
        print(f"{'embedded store (baseline): pairs':<40} {base:>10,.0f} pairs/s  p50 {pct(lat0, 50):6.3f} ms  "
              f"p99 {pct(lat0, 99):6.3f} ms", flush=True)
        p0.terminate()
        p0.wait(10)
        procs.remove(p0)

        url = redis.url
        p1, port1, _ = start_service(url)
        procs.append(p1)
        cpus = sorted(os.sched_getaffinity(0))
        pinned = args.pin and len(cpus) >= 2 and redis.proc is not None
        if pinned:
            assert redis.proc is not None
            os.sched_setaffinity(p1.pid, {cpus[-1]})
            os.sched_setaffinity(redis.proc.pid, set(cpus[:-1]))
            os.sched_setaffinity(0, set(cpus[:-1]))
            print(f"pinned: service on CPU {cpus[-1]}, Redis and the load generator on {cpus[:-1]}",
                  flush=True)
        runner(closed([port1], 2000, args.conns, args.window, "warm"))
        redis_cli(redis.port, "CONFIG", "RESETSTAT")
        e0 = store_errors([port1])
        one, lat1 = runner(closed([port1], args.pairs, args.conns, args.window, "one"))
        usec = evalsha_usec(redis.port)
        e1 = store_errors([port1])
        print(f"{'1 service: check+end pairs':<40} {one:>10,.0f} pairs/s  p50 {pct(lat1, 50):6.3f} ms  "
              f"p99 {pct(lat1, 99):6.3f} ms  (Redis {usec:.1f} us/EVALSHA, reserve+end mixed; "
              f"{e1 - e0} store-error answers)", flush=True)
        only, lat_c = runner(checks_only(port1, args.pairs, args.conns, args.window, "only"))
        print(f"{'1 service: checks alone (held calls)':<40} {only:>10,.0f} checks/s  p50 {pct(lat_c, 50):6.3f} ms  "
              f"p99 {pct(lat_c, 99):6.3f} ms  (ends sent afterwards, untimed)", flush=True)
        got, lat = runner(open_checks(port1, args.rate, args.seconds))
        e2 = store_errors([port1])
        print(f"{'1 service: open loop checks @ ' + format(args.rate, ',.0f') + '/s':<40} {got:>10,.0f} checks/s  "
              f"p50 {pct(lat, 50):6.3f} ms  p99 {pct(lat, 99):6.3f} ms  p99.9 {pct(lat, 99.9):6.3f} ms  "
              f"({e2 - e1} store-error answers)", flush=True)

        if pinned:
            assert redis.proc is not None
            for pid in (p1.pid, redis.proc.pid, 0):
                os.sched_setaffinity(pid, set(cpus))
        p2, port2, _ = start_service(url)
        procs.append(p2)
        runner(closed([port2], 2000, args.conns, args.window, "warm2"))
        e3 = store_errors([port1, port2])
        two, lat2 = runner(closed([port1, port2], args.pairs, args.conns, args.window, "two"))
        e4 = store_errors([port1, port2])
        print(f"{'2 services: check+end pairs':<40} {two:>10,.0f} pairs/s  p50 {pct(lat2, 50):6.3f} ms  "
              f"p99 {pct(lat2, 99):6.3f} ms  ({two / one:.2f}x one service; {e4 - e3} store-error answers)",
              flush=True)
        left = redis_cli(redis.port, "ZCARD", "{callpolicy}:exp")
        ratio = only / rb_rps if rb_rps == rb_rps and rb_rps else float("nan")
        print(f"ratio: 1 service checks/s (checks alone) / redis-benchmark EVALSHA reserves/s = {ratio:.0%} "
              f"(check+end pairs/s / reserves/s = {one / rb_rps:.0%}); redis store / embedded "
              f"= {one / base:.0%}; calls left held: {left}")
        ok = [("pairs/s >= 10,000", one >= 10_000), (f"p99 < 2 ms at {args.rate:,.0f}/s", pct(lat, 99) < 2.0),
              ("checks/s >= 50% of redis-benchmark", ratio >= 0.5)]
        print("targets: " + ", ".join(f"{name}: {'met' if good else 'MISSED'}" for name, good in ok))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        redis.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
