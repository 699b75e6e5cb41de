"""Redis Cluster store benchmark: `make bench-cluster` runs the cluster part of `bench/bench.py`.

A private Redis Cluster (3 primaries by default, `--cluster-replicas 1` adds a replica each) on
free loopback ports, a background of held calls written through the service, then (each figure
the median of the runs, next to the baseline's and to the single-Redis store's, interleaved):

- one `callpolicy serve --store redis+cluster://...`: check+end pairs/s, closed loop, and, read
  from every primary's INFO before and after each run: its Redis time per check (the EVALSHA
  usec of `INFO commandstats`, the scripts only; and the server's whole CPU, `used_cpu_sys` +
  `used_cpu_user`, which includes reading and writing the sockets), its share of the commands
  (`total_commands_processed`) and of the CPU: how the load spreads over the primaries;
- the same service on one private `redis-server` in the same rounds, for the same figures;
- a checks-only then an ends-only phase (Redis time per reserve and per end, by primary);
- an open loop at 1,000 checks/s: latency from the scheduled send;
- the client cost that chose the connection layer (`client_cost`): redis-py's RedisCluster
  against the store's own RESP pipes, CPU per command for the same EVALSHA on the same cluster.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))


def redis_info(port: int, *sections: str) -> str:
    out = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), "INFO", *sections],
                         capture_output=True, text=True, timeout=30, check=True)
    return out.stdout


def node_stats(port: int) -> dict[str, float]:
    """What one Redis has done so far: script calls and usec, every command, CPU seconds."""
    text = redis_info(port, "commandstats", "cpu", "stats")
    out: dict[str, float] = {"evalsha_calls": 0, "evalsha_usec": 0}
    m = re.search(r"cmdstat_evalsha:calls=(\d+),usec=(\d+)", text)
    if m:
        out["evalsha_calls"], out["evalsha_usec"] = int(m.group(1)), int(m.group(2))
    m = re.search(r"total_commands_processed:(\d+)", text)
    out["commands"] = int(m.group(1)) if m else 0
    cpu = 0.0
    for name in ("used_cpu_sys", "used_cpu_user"):
        m = re.search(rf"{name}:([\d.]+)", text)
        cpu += float(m.group(1)) if m else 0.0
    out["cpu_s"] = cpu
    return out


def stats_of(ports: list[int]) -> dict[int, dict[str, float]]:
    return {p: node_stats(p) for p in ports}


def per_node(before: dict[int, dict[str, float]], after: dict[int, dict[str, float]],
             checks: int) -> dict[str, Any]:
    """Per primary: Redis usec per check (scripts; whole CPU), share of commands and of CPU."""
    nodes = {}
    total_cmds = sum(after[p]["commands"] - before[p]["commands"] for p in after) or 1
    total_cpu = sum(after[p]["cpu_s"] - before[p]["cpu_s"] for p in after) or 1e-9
    for p in after:
        d = {k: after[p][k] - before[p][k] for k in after[p]}
        nodes[str(p)] = {
            "scripts_usec_per_check": d["evalsha_usec"] / checks if checks else None,
            "cpu_usec_per_check": d["cpu_s"] * 1e6 / checks if checks else None,
            "commands_share": d["commands"] / total_cmds,
            "cpu_share": d["cpu_s"] / total_cpu,
            "commands": d["commands"], "evalsha_calls": d["evalsha_calls"],
        }
    return {"checks": checks, "nodes": nodes,
            "scripts_usec_per_check": sum(n["scripts_usec_per_check"] or 0 for n in nodes.values()),
            "cpu_usec_per_check": sum(n["cpu_usec_per_check"] or 0 for n in nodes.values()),
            "commands_per_check": total_cmds / checks if checks else None}


def client_cost(seeds: str, n: int = 20_000, batch: int = 128) -> dict[str, Any]:
    """CPU per command of the same EVALSHA (one key, 3 arguments) on the same cluster, `batch`
    concurrent at a time: redis-py's RedisCluster (one awaited call each, gathered; and its
    pipeline), and the store's own pipes (one per primary, one write per event-loop tick)."""
    import hiredis
    import uvloop
    from redis.asyncio.cluster import RedisCluster

    from policy.store.redis.cluster_layout import key_slot
    from policy.store.redis.cluster_map import ClusterMap, parse_cluster_url

    script = ("local n = redis.call('ZCARD', KEYS[1]) if n >= tonumber(ARGV[3]) then return {0, n} end "
              "redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1]) return {1, n + 1}")
    hosts, _, _ = parse_cluster_url(seeds)
    out: dict[str, Any] = {"commands": n, "concurrent": batch}

    async def run() -> None:
        rc = RedisCluster(host=hosts[0][0], port=hosts[0][1])
        await rc.initialize()
        sha = await rc.script_load(script)
        await rc.execute_command("SCRIPT LOAD", script, target_nodes=RedisCluster.PRIMARIES)
        keys = [f"cc:k:user=u{i}@x" for i in range(n)]

        def clock() -> tuple[float, float]:
            return time.perf_counter(), time.process_time()

        w0, c0 = clock()
        for i in range(0, n, batch):
            await asyncio.gather(*(rc.evalsha(sha, 1, keys[j] + "a", f"u{j}", 1e9, 10)  # type: ignore[misc]
                                   for j in range(i, min(n, i + batch))))
        w1, c1 = clock()
        out["redis_py_cluster_us"] = {"cpu": (c1 - c0) * 1e6 / n, "wall": (w1 - w0) * 1e6 / n}
        for i in range(0, n, batch):
            pipe = rc.pipeline(transaction=False)
            for j in range(i, min(n, i + batch)):
                pipe.execute_command("EVALSHA", sha, 1, keys[j] + "b", f"u{j}", 1e9, 10)
            await pipe.execute()
        w2, c2 = clock()
        out["redis_py_cluster_pipeline_us"] = {"cpu": (c2 - c1) * 1e6 / n, "wall": (w2 - w1) * 1e6 / n}
        m = 2000
        for j in range(m):
            await rc.evalsha(sha, 1, keys[j] + "c", f"u{j}", 1e9, 10)  # type: ignore[misc]
        w3, c3 = clock()
        out["redis_py_cluster_one_at_a_time_us"] = {"cpu": (c3 - c2) * 1e6 / m, "wall": (w3 - w2) * 1e6 / m}
        await rc.aclose()

        import structlog

        cmap = ClusterMap(hosts, username=None, password=None, timeout=2.0, connect_timeout=2.0,
                          log=structlog.get_logger("bench"), prepare=_no_prepare, reload_commands=list,
                          on_change=lambda failover, why: None)
        await cmap.start()
        pack = hiredis.pack_command
        w4, c4 = clock()
        for i in range(0, n, batch):
            futs = []
            for j in range(i, min(n, i + batch)):
                k = keys[j] + "d"
                futs.append(cmap.send(key_slot(k), bytes(pack(("EVALSHA", sha, 1, k, f"u{j}", 1e9, 10)))))
            for f in futs:
                await f
        w5, c5 = clock()
        out["store_pipes_us"] = {"cpu": (c5 - c4) * 1e6 / n, "wall": (w5 - w4) * 1e6 / n}
        await cmap.close()

    uvloop.run(run())
    out["cpu_ratio"] = out["redis_py_cluster_us"]["cpu"] / out["store_pipes_us"]["cpu"]
    return out


async def _no_prepare(link: Any, conn: Any) -> None:
    return None


def main(argv: list[str] | None = None) -> int:
    """`make bench-cluster`: bench.py's cluster section."""
    import bench  # type: ignore[import-not-found]

    return int(bench.main(["--only", "cluster", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    raise SystemExit(main())
