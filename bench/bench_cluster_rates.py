"""What a call rate costs the Redis Cluster store: Redis's own time per `cluster_rate.lua` call,
next to a profile key's step, and the reserve's latency with and without a rate.

    .venv/bin/python bench/bench_cluster_rates.py [--rounds 5] [--calls 20000]

A private cluster of 3 primaries. Script time: the scripts are sent straight to the primary
that owns the key (pipelined, 200 at a time, over one connection) and Redis's time per call is
`cmdstat_evalsha` (calls, usec) of `INFO commandstats` around each run (`CONFIG RESETSTAT`
first). Variants, each `--calls` times:

- take, then settle, each its own script (an admitted call whose bucket no other call touched in
  the same event-loop tick: 2 scripts per call and rate), on one bucket every call shares;
- take + settle in one script (what coalescing makes of the ticks a busy bucket shares);
- the same on a new bucket per call (a per-account rate whose accounts are mostly idle: each
  bucket created, then left to expire);
- a refused take (an empty bucket: read, nothing written);
- a profile key's step (cluster_step.lua: one call added to a key without a limit), for scale.

Latency: the store in-process on the same cluster, `--calls` / 10 sequential reserves of a
plan with one capped key, without a rate and with one (its own step: one more round trip).
Min and median over `--rounds`.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import hiredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from policy.store.base import CallInfo, PlanEntry, RateEntry  # noqa: E402
from policy.store.redis.cluster import RedisClusterStore, cluster_script_source  # noqa: E402
from policy.store.redis.cluster_layout import key_slot  # noqa: E402
from tests.cluster import RedisClusterNodes  # noqa: E402

BIG = 1_000_000.0
T0 = 1_800_000_000.0


class Conn:
    """One RESP connection (pipelined sends, replies in order)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.reader = hiredis.Reader(encoding="utf-8")

    def send(self, cmds: list[tuple[Any, ...]]) -> list[Any]:
        self.sock.sendall(b"".join(bytes(hiredis.pack_command(c)) for c in cmds))
        out: list[Any] = []
        while len(out) < len(cmds):
            reply = self.reader.gets()
            if reply is False:
                self.reader.feed(self.sock.recv(1 << 16))
                continue
            out.append(reply)
        return out

    def one(self, *cmd: Any) -> Any:
        return self.send([cmd])[0]


def evalsha(conn: Conn) -> tuple[int, int]:
    m = re.search(r"cmdstat_evalsha:calls=(\d+),usec=(\d+)", conn.one("INFO", "commandstats"))
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def owner(cluster: RedisClusterNodes, slot: int) -> int:
    for start, end, port in cluster._slot_owners(cluster.primaries()[0]):
        if start <= slot <= end:
            return port
    raise RuntimeError(f"no owner for slot {slot}")


def script_runs(cluster: RedisClusterNodes, rounds: int, calls: int) -> dict[str, list[float]]:
    """Redis µs per call of each variant."""
    tag = "{bench}"  # every key of a variant in one slot, on one primary
    port = owner(cluster, key_slot(tag))
    conn = Conn(port)
    rate = conn.one("SCRIPT", "LOAD", cluster_script_source("cluster_rate"))
    step = conn.one("SCRIPT", "LOAD", cluster_script_source("cluster_step"))
    lease, slack = "30.0", "1000"

    def take(i: int) -> tuple[Any, ...]:
        return ("t", f"h{i}", repr(T0), repr(BIG), int(BIG), "")

    def settle(i: int) -> tuple[Any, ...]:
        return ("s", f"h{i}", repr(T0), "0", 0, "")

    def rate_cmd(name: str, *ops: tuple[Any, ...]) -> tuple[Any, ...]:
        return ("EVALSHA", rate, 1, name, repr(T0), lease, slack, *(a for op in ops for a in op))

    variants = {
        "take, settle (2 scripts)": lambda r, i: [rate_cmd(f"{tag}:r:hot{r}", take(i)),
                                                 rate_cmd(f"{tag}:r:hot{r}", settle(i))],
        "take + settle (1 script)": lambda r, i: [rate_cmd(f"{tag}:r:hot1{r}", take(i), settle(i))],
        "take + settle, new bucket": lambda r, i: [rate_cmd(f"{tag}:r:new{r}.{i}", take(i), settle(i))],
        "refused take": lambda r, i: [rate_cmd(f"{tag}:r:empty{r}", ("t", f"h{i}", repr(T0), "0.001", 1, ""))],
        "profile key step": lambda r, i: [("EVALSHA", step, 1, f"{tag}:k:total{r}", repr(T0), f"c{i}",
                                           repr(T0 + 300), "", "")],
    }
    out: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        conn.one("EVALSHA", rate, 1, f"{tag}:r:empty{r}", repr(T0), lease, slack,
                 "t", "first", repr(T0), "0.001", 1, "")  # (empty from now on)
        for name, make in variants.items():
            conn.one("CONFIG", "RESETSTAT")
            for start in range(0, calls, 200):
                cmds = [c for i in range(start, min(calls, start + 200)) for c in make(r, i)]
                for reply in conn.send(cmds):
                    if isinstance(reply, hiredis.ReplyError):
                        raise RuntimeError(f"{name}: {reply}")
            _, usec = evalsha(conn)
            out[name].append(usec / calls)  # per call (2 scripts in the first variant)
    return out


async def latency_runs(cluster: RedisClusterNodes, rounds: int, calls: int) -> dict[str, list[float]]:
    """Median µs per sequential reserve, without and with a rate."""
    out: dict[str, list[float]] = {"no rate": [], "1 rate": []}
    for r in range(rounds):
        store = RedisClusterStore(cluster.url, prefix=f"lat{r}", timeout=1.0)
        await store.start()
        try:
            plan = [PlanEntry("account", "acme", 10**9, False, "account-cap")]
            for name, rates in (("no rate", []), ("1 rate", [RateEntry("cps", "acme", BIG, int(BIG))])):
                times = []
                for i in range(calls):
                    t0 = time.perf_counter()
                    res = await store.reserve(CallInfo(f"{name}{i}", "sip:a@x", "sip:b@x", "acme"), plan,
                                              T0, 300.0, "t", rates=rates)
                    times.append((time.perf_counter() - t0) * 1e6)
                    assert res.admitted
                out[name].append(statistics.median(times))
        finally:
            await store.close()
    return out


def show(title: str, runs: dict[str, list[float]]) -> None:
    print(title)
    for name, values in runs.items():
        print(f"  {name:28s} {min(values):7.2f} / {statistics.median(values):7.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20_000)
    args = ap.parse_args()
    cluster = RedisClusterNodes(primaries=3).start()
    try:
        show(f"Redis µs per call (script time, commandstats), min / median of {args.rounds}:",
             script_runs(cluster, args.rounds, args.calls))
        show(f"reserve latency µs (median of {args.calls // 10} sequential), min / median of {args.rounds}:",
             asyncio.run(latency_runs(cluster, args.rounds, args.calls // 10)))
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
