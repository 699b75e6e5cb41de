"""Benchmark callpolicy on the Redis store, next to what Redis itself can do here.

Starts a private `redis-server` on a free loopback port, then in one run:

1. `redis-benchmark` calling the very reserve script the store uses (SCRIPT LOAD, then
   EVALSHA with the same keys and arguments the service sends for a bench check,
   random call/account/user per request): Redis's own ceiling for reserves here.
2. One `callpolicy serve --store redis://...`: check+end pairs/s (closed loop, pipelined
   over TCP), checks alone with Redis's own microseconds per reserve.lua and per end.lua
   (INFO commandstats around each phase), then checks at a fixed offered rate (open loop).
3. Two `callpolicy serve` processes (two ports) on the same Redis, driven together.
4. Outages (issue 10): checks at 500/s with pings alongside (the pings' latency is the
   service's event-loop lag), with Redis up, SIGSTOPped and killed: latency of every check
   against `store.timeout`, the service's CPU per check (/proc/<pid>/schedstat), store-error
   answers; then how long after a restart (empty) checks are exact again.

Targets (issue 3): >= 10,000 pairs/s, p99 < 2 ms at 2,000 checks/s, service checks/s >= 50 %
of redis-benchmark's EVALSHA rate. Everything shares the machine's cores (Redis, the
service(s), the load generator, redis-benchmark), so run it a few times.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

try:  # run as a script (bench/ is on sys.path) or as a module (python -m bench.bench_redis)
    from bench import closed_loop, open_loop, pair_messages, pct, start_service  # type: ignore[attr-defined]
except ImportError:
    from bench.bench import closed_loop, open_loop, pair_messages, pct, start_service
from policy.rules import load_rules  # noqa: E402
from policy.store.base import CallInfo  # noqa: E402
from policy.store.redis import RedisStore, script_source  # noqa: E402
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
    keys, args = store.reserve_command(call, plan, time.time(), 300.0)  # (no epoch: not checked)
    return script_source("reserve"), [str(len(keys)), *keys, *(str(a) for a in args)]


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


async def checks_only(port: int, n: int, conns: int, window: int, tag: str,
                      redis_port: int) -> tuple[float, list[float], float, float]:
    """Checks alone, each a new call that is admitted and held (what redis-benchmark's reserves
    are), then their ends, untimed: (checks/s, latencies of the checks, Redis us per reserve.lua,
    Redis us per end.lua; the service's sweep and stats scripts, two a second, are in the noise)."""
    msgs = list(pair_messages(n, tag, accounts=max(1, n // 5)))  # <= 5 calls per account: room
    checks = msgs[0::2]
    per = len(checks) // conns
    redis_cli(redis_port, "CONFIG", "RESETSTAT")
    secs, done, lat = await closed_loop(connector([port]), [checks[i * per:(i + 1) * per] for i in range(conns)],
                                        window)
    reserve_us = evalsha_usec(redis_port)
    redis_cli(redis_port, "CONFIG", "RESETSTAT")
    await closed_loop(connector([port]), [msgs[1::2]], window)
    end_us = evalsha_usec(redis_port)
    return done / secs, lat, reserve_us, end_us


async def open_checks(port: int, rate: float, seconds: float) -> tuple[float, list[float]]:
    """Checks at a fixed offered rate (then their ends): (achieved checks/s, latencies)."""
    msgs = list(pair_messages(int(rate * seconds), "open"))
    secs, lat = await open_loop(connector([port]), msgs[0::2], rate)
    await closed_loop(connector([port]), [msgs[1::2]], 64)
    return len(lat) / secs, lat


def cpu_seconds(pid: int) -> float:
    """Seconds a process has spent on a CPU (/proc/<pid>/schedstat, nanoseconds)."""
    with open(f"/proc/{pid}/schedstat") as fh:
        return int(fh.read().split()[0]) / 1e9


async def outage_phase(port: int, pid: int, rate: float, seconds: float, tag: str) -> dict[str, Any]:
    """Checks at `rate`/s with pings at 100/s alongside: latencies, CPU per check, store errors."""
    n = int(rate * seconds)
    checks = [orjson.dumps({"op": "check", "call_id": f"{tag}-{i}", "from": f"sip:o{i}@bench.example",
                            "to": "sip:6002@bench.example", "account": f"acct{i % 1000}"}) + b"\n"
              for i in range(n)]
    pings = [b'{"op":"ping"}\n'] * int(100 * seconds)
    c0 = cpu_seconds(pid)
    (_, lat), (_, plat) = await asyncio.gather(open_loop(connector([port]), checks, rate),
                                               open_loop(connector([port]), pings, 100.0, conns=1))
    cpu = (cpu_seconds(pid) - c0) / n
    return {"lat": lat, "ping": plat, "cpu": cpu, "n": n, "tag": tag}


async def end_calls(port: int, tag: str, n: int) -> None:
    """End the calls a phase checked (those admitted leave; the others are no-ops)."""
    ends = [orjson.dumps({"op": "end", "call_id": f"{tag}-{i}"}) + b"\n" for i in range(n)]
    await closed_loop(connector([port]), [ends], 64)


def outages(redis: RedisServer, svc: subprocess.Popen[bytes], port: int, rate: float, seconds: float,
            runner: Any) -> RedisServer:
    """Issue 10's outage figures for one service: Redis up, SIGSTOPped, killed; then restarted.
    Returns the Redis server in use afterwards (a new one after the restart)."""
    print(f"outages: checks at {rate:,.0f}/s for {seconds:g} s each, pings at 100/s alongside (loop lag); "
          f"store.timeout 50 ms", flush=True)

    def show(name: str, r: dict[str, Any], base_cpu: float) -> None:
        lat, ping = r["lat"], r["ping"]
        print(f"  {name:<18} checks p50 {pct(lat, 50):7.3f} ms  p99 {pct(lat, 99):7.3f} ms  "
              f"max {max(lat) * 1e3:7.2f} ms | pings (loop lag) p99 {pct(ping, 99):6.3f} ms "
              f"max {max(ping) * 1e3:6.2f} ms | CPU {r['cpu'] * 1e6:6.1f} us/check ({r['cpu'] / base_cpu:.2f}x up)"
              f" | store-error answers {r['errors']}/{r['n']}", flush=True)

    e0 = store_errors([port])  # (the stats op needs the store: counted while Redis is up)
    up = runner(outage_phase(port, svc.pid, rate, seconds, "up"))
    runner(end_calls(port, "up", up["n"]))
    e1 = store_errors([port])
    up["errors"] = e1 - e0
    show("Redis up", up, up["cpu"])
    assert redis.proc is not None
    redis.proc.send_signal(signal.SIGSTOP)
    try:
        stopped = runner(outage_phase(port, svc.pid, rate, seconds, "stop"))
    finally:
        redis.proc.send_signal(signal.SIGCONT)
    time.sleep(1.0)
    e2 = store_errors([port])
    stopped["errors"] = e2 - e1
    show("Redis SIGSTOPped", stopped, up["cpu"])
    redis_port = redis.port
    redis.stop(signal.SIGKILL)
    down = runner(outage_phase(port, svc.pid, rate, seconds, "down"))
    back = RedisServer(port=redis_port).start()
    t0 = time.perf_counter()
    c = LineClient(port=port)
    try:
        i = 0
        while True:
            i += 1
            r = c.call("check", call_id=f"back-{i}", **{"from": "sip:b@bench.example"}, to="sip:6002@bench.example",
                       account="acctb")
            if "store_error" not in r:
                break
            time.sleep(0.005)
        took = time.perf_counter() - t0
        info = c.call("stats")["store_info"]
    finally:
        c.close()
    down["errors"] = store_errors([port]) - e2 - (i - 1)  # (minus the probes above)
    show("Redis killed", down, up["cpu"])
    print(f"  Redis restarted (empty): checks exact again after {took:.3f} s "
          f"(data losses detected: {info.get('data_losses')})", flush=True)
    return back


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
    ap.add_argument("--outage-rate", type=float, default=500.0, help="offered checks/s in the outage phases")
    ap.add_argument("--outage-seconds", type=float, default=4.0, help="length of each outage phase (0: skip)")
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
        only, lat_c, res_us, end_us = runner(checks_only(port1, args.pairs, args.conns, args.window, "only",
                                                         redis.port))
        e_only = store_errors([port1])
        print(f"{'1 service: checks alone (held calls)':<40} {only:>10,.0f} checks/s  p50 {pct(lat_c, 50):6.3f} ms  "
              f"p99 {pct(lat_c, 99):6.3f} ms  (ends sent afterwards, untimed; {e_only - e1} store-error answers)",
              flush=True)
        print(f"{'Redis per script (INFO commandstats)':<40} reserve.lua {res_us:.1f} us, end.lua {end_us:.1f} us "
              f"(targets: <= 40 us, <= 20 us)", flush=True)
        got, lat = runner(open_checks(port1, args.rate, args.seconds))
        e2 = store_errors([port1])
        print(f"{'1 service: open loop checks @ ' + format(args.rate, ',.0f') + '/s':<40} {got:>10,.0f} checks/s  "
              f"p50 {pct(lat, 50):6.3f} ms  p99 {pct(lat, 99):6.3f} ms  p99.9 {pct(lat, 99.9):6.3f} ms  "
              f"({e2 - e_only} store-error answers)", flush=True)

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
        settle = time.perf_counter()  # late reserves are undone and refused ends retried: wait for it
        while left != "0" and time.perf_counter() - settle < 5:
            time.sleep(0.1)
            left = redis_cli(redis.port, "ZCARD", "{callpolicy}:exp")
        left += f" (after {time.perf_counter() - settle:.1f} s)"
        ratio = only / rb_rps if rb_rps == rb_rps and rb_rps else float("nan")
        print(f"ratio: 1 service checks/s (checks alone) / redis-benchmark EVALSHA reserves/s = {ratio:.0%} "
              f"(check+end pairs/s / reserves/s = {one / rb_rps:.0%}); redis store / embedded "
              f"= {one / base:.0%}; calls left held: {left}")
        ok = [("pairs/s >= 10,000", one >= 10_000), (f"p99 < 2 ms at {args.rate:,.0f}/s", pct(lat, 99) < 2.0),
              ("checks/s >= 50% of redis-benchmark", ratio >= 0.5),
              ("reserve.lua <= 40 us", res_us <= 40), ("end.lua <= 20 us", end_us <= 20)]
        print("targets: " + ", ".join(f"{name}: {'met' if good else 'MISSED'}" for name, good in ok))
        p2.terminate()
        p2.wait(10)
        procs.remove(p2)
        if args.outage_seconds > 0:
            redis = outages(redis, p1, port1, args.outage_rate, args.outage_seconds, runner)
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
